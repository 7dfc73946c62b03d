//! The one reason-code enum. Its protobuf value names are the lower_snake
//! strings used on the wire, in metrics labels, logs and events.

use std::fmt;
use std::str::FromStr;

pub use crate::pb::session::ReasonCode;

impl ReasonCode {
    /// The lower_snake name, e.g. `"unknown_session"`.
    pub fn as_str(self) -> &'static str {
        self.as_str_name()
    }

    /// Every code, in value order; for tables, metrics pre-registration and tests.
    pub fn all() -> impl Iterator<Item = ReasonCode> {
        (0..i32::MAX).map_while(|v| ReasonCode::try_from(v).ok())
    }

    /// What an unauthenticated peer may learn: every failure before the proof
    /// check is reported as `unknown_session`; metrics keep the exact code.
    pub fn on_wire_before_auth(self) -> ReasonCode {
        match self {
            ReasonCode::UnknownSession
            | ReasonCode::BadProof
            | ReasonCode::SessionLifetimeExceeded
            | ReasonCode::TransportTtlExceeded => ReasonCode::UnknownSession,
            other => other,
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason code {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for ReasonCode {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReasonCode::from_str_name(s).ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN §2.7: these names are part of the contract and never change.
    const REQUIRED: &[&str] = &[
        "handshake_ok",
        "reattach_success",
        "switch_initiated",
        "transport_dead",
        "heartbeat_timeout",
        "transport_replaced",
        "volatile_persisted",
        "unknown_session",
        "owner_lost",
        "owner_unreachable",
        "bad_proof",
        "replay_detected",
        "stale_binding",
        "switch_rate_limited",
        "cooldown_active",
        "session_lifetime_exceeded",
        "transport_ttl_exceeded",
        "rate_limited",
        "overloaded",
        "auth_failed",
        "not_in_cluster",
        "draining",
        "superseded",
        "operator_terminated",
        "frame_too_large",
        "protocol_error",
        "invalid_transition",
    ];

    #[test]
    fn every_required_code_exists_with_its_name() {
        for name in REQUIRED {
            let code: ReasonCode = name.parse().expect(name);
            assert_eq!(code.as_str(), *name);
        }
    }

    #[test]
    fn names_are_lower_snake_and_round_trip() {
        let all: Vec<_> = ReasonCode::all().collect();
        assert!(all.len() > REQUIRED.len());
        for code in all {
            let s = code.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert_eq!(s.parse::<ReasonCode>().ok(), Some(code));
            assert_eq!(code.to_string(), s);
        }
        assert!("Unknown_Session".parse::<ReasonCode>().is_err());
    }

    #[test]
    fn pre_auth_failures_are_all_unknown_session_on_the_wire() {
        for c in [
            ReasonCode::BadProof,
            ReasonCode::SessionLifetimeExceeded,
            ReasonCode::TransportTtlExceeded,
        ] {
            assert_eq!(c.on_wire_before_auth(), ReasonCode::UnknownSession);
        }
        assert_eq!(
            ReasonCode::ReplayDetected.on_wire_before_auth(),
            ReasonCode::ReplayDetected
        );
    }
}
