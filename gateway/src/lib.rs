//! jvpn-gateway: terminates client TLS and owns sessions exclusively.
//!
//! # Layout
//!
//! - [`engine`]: the sans-IO session engine (state machine, RESUME validation,
//!   replay window, anti-flap, timers). No sockets, no tokio, no clock reads:
//!   the async shell hands it `now`, bytes and exporter values, and drains the
//!   events and transport actions it returns.

#![forbid(unsafe_code)]

pub mod engine;
