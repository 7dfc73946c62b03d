//! jvpn-router: the stateless front router (placement of HELLOs on the
//! gateway ring, token-based routing of RESUMEs, PROXY v2 and splicing,
//! membership from gateway heartbeat streams).
//!
//! # Layout
//!
//! - [`membership`]: the sans-IO membership rules of DESIGN §4 (alive,
//!   placeable, rise, hold-down, supersession, self-suspicion, warm-up).
//!
//! The networked router (listener, gRPC heartbeat service, splice) is the
//! cluster milestone's next step.

#![forbid(unsafe_code)]

pub mod membership;
