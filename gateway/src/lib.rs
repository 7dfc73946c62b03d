//! jvpn-gateway: terminates client TLS and owns sessions exclusively.
//!
//! # Layout
//!
//! - [`engine`]: the sans-IO session engine (state machine, RESUME validation,
//!   replay window, anti-flap, timers). No sockets, no tokio, no clock reads.
//! - [`gate`]: the pre-TLS gate and HELLO fencing as pure functions of
//!   their inputs and `now` (sans-IO).
//! - [`server`]: the async shell, split by stage: serve and lifecycle,
//!   connection admission, session I/O, shared state.
//! - [`issuer`]: seals routing tokens naming this incarnation (pure).
//! - [`membership`]: heartbeat streams to routers and the leases that fence HELLO.
//! - [`config`]: TOML + environment configuration and its validation.
//! - [`tls`]: rustls server configuration (TLS 1.3, ALPN `jvpn/1`).
//! - [`events`]: the JSON-lines event sink behind a bounded queue.
//! - [`metrics`]: the metrics catalogue.
//! - [`pki`]: the development PKI (`jvpn-gateway pki init`).
//! - [`store`]: the shared session store on etcd (topology 3) and its self-fence.
//! - [`cli`]: the `jvpn-gateway` command line (`run`, `check`, `pki init`).
//!
//! Process running, config helpers, the admin port and admission buckets
//! come from `jvpn-runtime`, shared with the router.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod egress;
pub mod engine;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod incarnation;
pub mod issuer;
pub mod membership;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod store;
pub mod syslog;
pub mod tickets;
pub mod timeline;
pub mod tls;
