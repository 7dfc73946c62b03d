//! jvpn-router: the stateless front router (placement of HELLOs on the
//! gateway ring, token-based routing of RESUMEs, PROXY v2 and splicing,
//! membership from gateway heartbeat streams).
//!
//! Not built yet: the cluster issue fills this crate. It depends on
//! `jvpn-proto` for the preamble, token, PROXY and ring code it will use.

#![forbid(unsafe_code)]
