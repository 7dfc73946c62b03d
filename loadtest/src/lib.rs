//! jvpn-loadtest: load tool, local-cluster harness, fault proxy and
//! end-to-end checks.
//!
//! Not built yet: the single-node and load-tool issues fill this crate.

#![forbid(unsafe_code)]
