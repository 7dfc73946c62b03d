//! Generated protobuf types, plus hand-written `Debug` for messages that carry secrets.

use std::fmt;

/// Agent ↔ gateway frames (`proto/session.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod session {
    tonic::include_proto!("jvpn.session.v1");
}

/// Gateway → router membership service (`proto/membership.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod membership {
    tonic::include_proto!("jvpn.membership.v1");
}

/// A session's record in the shared store (`proto/store.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod store {
    tonic::include_proto!("jvpn.store.v1");
}

/// The part of etcd's v3 API the shared store calls (`proto/etcd.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

impl fmt::Debug for session::Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("protocol_version", &self.protocol_version)
            .field("auth", &Redacted(self.auth.len()))
            .field("channel", &self.channel)
            .finish()
    }
}

impl fmt::Debug for session::Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resume")
            .field("session_id", &hex::encode(&self.session_id))
            .field("counter", &self.counter)
            .field("binding_epoch", &self.binding_epoch)
            .field("proof", &Redacted(self.proof.len()))
            .field("received", &self.received)
            .finish()
    }
}

/// Prints `<redacted N bytes>` in place of a secret.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::session::{Hello, Resume};

    #[test]
    fn debug_redacts_secrets() {
        let hello = Hello {
            keepalive: false,
            protocol_version: 1,
            auth: b"s3cret-token".to_vec(),
            channel: false,
            migration: false,
        };
        let text = format!("{hello:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("redacted 12 bytes"), "{text}");
        let resume = Resume {
            keepalive: false,
            session_id: vec![0xab; 16],
            counter: 7,
            binding_epoch: 2,
            proof: vec![0xcd; 32],
            received: None,
        };
        let text = format!("{resume:?}");
        assert!(!text.contains("cdcd"), "{text}");
        assert!(text.contains("counter: 7"), "{text}");
    }
}
