//! jvpn-router: the stateless front router (placement of HELLOs on the
//! gateway ring, token-based routing of RESUMEs, PROXY v2 and splicing,
//! membership from gateway heartbeat streams).
//!
//! # Layout
//!
//! - [`membership`]: the sans-IO membership rules of DESIGN §4 (alive,
//!   placeable, rise, hold-down, supersession, self-suspicion, warm-up).
//! - [`state`]: shared state: membership behind a mutex, the ring behind an
//!   atomic swap, owner tags, admission tables, death signals.
//! - [`service`]: the tonic heartbeat service (mTLS identity from URI SANs).
//! - [`routing`]: the RESUME routing decision (token → owner → route), sans-IO.
//! - [`forward`]: one client connection: preamble, placement/routing, PROXY v2.
//! - [`splice`]: the copy loop (buffers only while data is in flight).
//! - [`server`]: listeners, ticker, admin, shutdown.
//! - [`config`], [`metrics`], [`cli`].

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod forward;
pub mod fuzzing;
pub mod membership;
pub mod membership_port;
pub mod metrics;
pub mod replay;
pub mod routing;
pub mod server;
pub mod service;
pub mod splice;
pub mod state;
