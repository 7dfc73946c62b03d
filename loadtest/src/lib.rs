//! jvpn-loadtest: the load tool, the local-cluster harness, the fault proxy
//! and the checks of the product's invariants.
//!
//! # Layout
//!
//! - [`harness`]: start real gateway processes on ephemeral loopback ports,
//!   wait for readiness, scrape metrics, build agents.
//! - [`cluster`]: a local cluster (routers + gateways as processes), restarts, scale-out.
//! - [`faultproxy`]: a user-space TCP proxy that cuts, stalls, delays or
//!   blackholes connections on command.
//! - [`fleet`]: many agents running the real keep-alive loop, observed through reports.
//! - [`invariants`]: the DESIGN §11 counters from agent reports and events.
//! - [`streamload`]: application bytes through agents' tunnels, checked
//!   byte for byte (lost, duplicated, explicitly reset).
//! - [`demo`]: the README's quick-start demo.
//! - [`report`]: the self-contained HTML page of a run report.
//! - [`scenario`]: `jvpn-loadtest run`: open-loop scenarios with HDR latencies and invariants.
//! - [`bench`]: gateway capacity against bare rustls, pinned to cores.
//! - [`bench_router`]: direct vs jvpn-router vs HAProxy, splice buffers,
//!   router memory per connection, failure detection times.
//! - [`bench_streams`]: the data plane vs `ssh -D`, wireguard-go, OpenVPN
//!   (TCP) and direct: bulk MiB/s, CPU per GiB, CONNECT-to-first-byte.
//! - [`bench_peers`]: the benchmark's namespace pair and tunnel peers.
//! - [`cli`]: the command line (the binary is a thin main around it).
//! - [`bench_takeover`]: topology 3's CAS latency and takeover times.
//! - [`chaos_store`]: topology 3 under seeded faults, with an independent
//!   checker of owner epochs over events and agents' answers.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_members;
pub mod bench_peers;
pub mod bench_router;
pub mod bench_streams;
pub mod bench_takeover;
pub mod chaos_store;
pub mod cli;
pub mod cluster;
pub mod demo;
pub mod demo_cluster;
pub mod etcd;
pub mod faultproxy;
pub mod fleet;
pub mod harness;
pub mod invariants;
pub mod members;
pub mod netns;
pub mod report;
pub mod scenario;
pub mod serve_cluster;
pub mod soak;
pub mod socks;
pub mod streamload;
