//! jvpn-agent: the client library and CLI that keeps a session across
//! transport changes (RESUME) and re-handshakes explicitly when its owner is
//! gone.
//!
//! Not built yet: the single-node issue fills this crate.

#![forbid(unsafe_code)]
