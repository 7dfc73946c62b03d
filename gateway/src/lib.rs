//! jvpn-gateway: terminates client TLS and owns sessions exclusively.
//!
//! # Layout
//!
//! - [`engine`]: the sans-IO session engine (state machine, RESUME validation,
//!   replay window, anti-flap, timers). No sockets, no tokio, no clock reads.
//! - [`server`]: the async shell: listener, admission, TLS, frames, timers, drain.
//! - [`admission`]: per-source buckets and the handshake budget (sans-IO).
//! - [`config`]: TOML + environment configuration and its validation.
//! - [`tls`]: rustls server configuration (TLS 1.3, ALPN `jvpn/1`).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/sessions`.
//! - [`events`]: the JSON-lines event sink behind a bounded queue.
//! - [`metrics`]: the metrics catalogue.
//! - [`pki`]: the development PKI (`jvpn-gateway pki init`).
//! - [`cli`]: command-line definitions shared by the binary and harnesses.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod cli;
pub mod config;
pub mod engine;
pub mod events;
pub mod membership;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod tls;
