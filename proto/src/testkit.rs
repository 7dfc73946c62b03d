//! Test support shared by every simulation and benchmark: a simulated TLS
//! connection whose exporter both ends compute alike, so the client session
//! ([`crate::client`]) and the gateway's engine can be driven in memory.
//! Not for production: its keys are a public function of the connection id.

use crate::client::{ExportError, Exporter};
use crate::crypto::{ChannelBinding, RESUME_KEY_LABEL, ResumeKey};

/// One simulated connection, named by an id unique within a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SimConn(pub u64);

impl Exporter for SimConn {
    fn export(&self, label: &[u8], context: &[u8]) -> Result<[u8; 32], ExportError> {
        Ok(self.material(label, context))
    }
}

impl SimConn {
    /// The simulated exporter (it never fails).
    pub fn material(&self, label: &[u8], context: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&[7; 32]);
        h.update(&self.0.to_be_bytes());
        h.update(&(label.len() as u64).to_be_bytes());
        h.update(label);
        h.update(context);
        *h.finalize().as_bytes()
    }

    /// What the gateway's exporter closure gives the engine for `context`.
    pub fn resume_key(&self, context: &[u8]) -> ResumeKey {
        ResumeKey::new(self.material(RESUME_KEY_LABEL, context))
    }

    /// The connection's channel binding, as the gateway passes it.
    pub fn binding(&self) -> ChannelBinding {
        self.material(crate::crypto::CHANNEL_BINDING_LABEL, &[])
    }
}

/// A connection whose exporter always fails (a handshake that never
/// completed), for fail-closed tests.
#[derive(Clone, Copy, Debug)]
pub struct BrokenConn;

impl Exporter for BrokenConn {
    fn export(&self, _label: &[u8], _context: &[u8]) -> Result<[u8; 32], ExportError> {
        Err(ExportError)
    }
}
