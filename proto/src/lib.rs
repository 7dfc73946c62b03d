//! The Jumping VPN wire contract, shared bit for bit by router, gateway and agent.
//!
//! Everything here is pure: no sockets, no clock reads, no global state. Callers
//! hand in bytes, keys, nonces and randomness; they get values or typed errors back.
//!
//! # Layout
//!
//! - [`pb`]: prost/tonic code generated from `proto/*.proto` (frames, membership service).
//! - [`ids`]: `SessionId`, `NodeId`, `Incarnation`, `ViewId`, `OwnerTag`.
//! - [`reason`]: the one `ReasonCode` enum and its lower_snake names.
//! - [`keys`]: the cluster secret and the keys derived from it (BLAKE3 `derive_key`).
//! - [`preamble`]: the 64-byte plaintext preamble and the 8-byte pre-TLS status reply.
//! - [`token`]: the encrypted routing token carried in RESUME preambles.
//! - [`proxy`]: PROXY protocol v2 header with the router TLVs.
//! - [`frame`]: the length-delimited frame codec used inside TLS.
//! - [`ring`]: views, `view_id`, the consistent-hash ring and owner tags.
//! - [`crypto`]: proofs and exporter labels of the RESUME exchange.
//! - [`channel`]: the resumable byte channel of the data plane, sans-IO ([`channel::Channel`]).
//! - [`client`]: the client's half of a session, sans-IO ([`client::ClientSession`]).
//! - [`store_record`]: a session's record in the shared store and its wrapped resume key.
//! - [`stream`]: a stream's destination (`host:port`) and why a gateway refused one.
//! - [`time`]: [`Mono`], the monotonic instant every sans-IO core takes as `now`.

#![forbid(unsafe_code)]

pub mod channel;
pub mod client;
pub mod crypto;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keys;
pub mod membership_proof;
pub mod pb;
pub mod preamble;
pub mod proxy;
pub mod reason;
pub mod ring;
pub mod store_record;
pub mod stream;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod time;
pub mod token;

pub use ids::{Incarnation, NodeId, OwnerTag, SessionId, ViewId};
pub use reason::ReasonCode;

/// With gateway keep-alives every `k` (`HelloOk.keepalive_ms`), the agent
/// checks in (a `Ping`) every `KEEPALIVE_CHECK_IN × k`, and the gateway
/// retires a transport it has heard nothing on for `KEEPALIVE_SILENCE ×
/// k` (docs/protocol.md, "Liveness"; design note 52).
pub const KEEPALIVE_CHECK_IN: u32 = 10;
pub const KEEPALIVE_SILENCE: u32 = 30;
/// A gateway's heartbeat stream gives a TCP connect to a router this long
/// (a router host that is rebooting drops SYNs rather than refusing) ...
pub const HEARTBEAT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// ... and waits at most this long before opening the stream again
/// (doubling from 50 ms). A restarted router's warm-up outlasts both.
pub const HEARTBEAT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(500);
pub use time::Mono;

/// ALPN protocol id; the only protocol-version negotiation there is.
pub const ALPN: &[u8] = b"jvpn/1";
/// `Hello.protocol_version` that matches [`ALPN`].
pub const PROTOCOL_VERSION: u32 = 1;
