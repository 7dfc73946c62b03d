//! jvpn-runtime: what every Jumping VPN service binary shares, and nothing
//! about sessions, rings or routing.
//!
//! # Layout
//!
//! - [`process`]: `run`/`check` arguments, tracing, exit codes, readiness,
//!   signals, SIGHUP reload, the open-file limit.
//! - [`config`]: layered TOML + environment, problems that name their key,
//!   the documented-keys checks.
//! - [`tls`]: certificates, keys and CAs checked as TLS will use them;
//!   keying material exported from a connection.
//! - [`admin`]: the admin HTTP port (`/metrics`, `/healthz`, `/readyz`,
//!   operator actions behind a bearer token) for any [`admin::AdminApp`].
//! - [`channel_io`]: the resumable session channel as an async byte stream
//!   (for the HTTP/2 multiplexer) and its transport side.
//! - [`relay`]: a stream's TCP end joined to its multiplexed stream (copy
//!   both ways, half-close, reset on error), for the agent's front doors
//!   and the gateway's egress.
//! - [`admission`]: per-source token buckets, the handshake budget and the
//!   TLS waiting room; sans-IO, every call takes `now`.
//! - [`memory`]: freed heap pages given back to the kernel once a burst
//!   of stream traffic is over.
//! - [`metrics`]: the Prometheus recorder, its upkeep and `jvpn_build_info`.
//! - [`wire`]: pre-TLS status replies, frame read/write, accept with
//!   back-off, a poison-tolerant lock.
//!
//! Dependencies point one way: `jvpn-proto ← jvpn-runtime ← {gateway,
//! router, agent}`.

#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod channel_io;
pub mod config;
pub mod h2_stream;
pub mod memory;
pub mod metrics;
pub mod process;
pub mod relay;
pub mod tls;
pub mod wire;
