//! Proofs of the RESUME exchange and the TLS exporter labels they rely on.
//!
//! `B(conn)` is the RFC 9266 channel binding of the TLS connection carrying the
//! RESUME. Binding the proof to it means a relay holding two TLS connections
//! (two different `B`) cannot forward a valid proof.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::SessionId;

/// RFC 9266 exporter label for `B(conn)`; empty context, 32 bytes.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// Exporter label of session resume keys; context is [`resume_key_context`].
pub const RESUME_KEY_LABEL: &[u8] = b"EXPERIMENTAL-jvpn-resume-key-v1";
const PROOF_LABEL: &[u8] = b"jvpn-resume-v1";
const SERVER_PROOF_LABEL: &[u8] = b"jvpn-resume-ok-v1";

pub const PROOF_LEN: usize = 32;
pub type ChannelBinding = [u8; 32];

/// A per-session resume key. Zeroized on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeKey(Zeroizing<[u8; 32]>);

impl ResumeKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn mac(
        &self,
        label: &[u8],
        sid: &SessionId,
        counter: u64,
        epoch: u64,
        b: &ChannelBinding,
    ) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..])
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(label);
        m.update(sid.as_bytes());
        m.update(&counter.to_be_bytes());
        m.update(&epoch.to_be_bytes());
        m.update(b);
        m
    }

    /// The agent's proof: HMAC(key, "jvpn-resume-v1" ‖ sid ‖ counter ‖ epoch ‖ B).
    pub fn resume_proof(
        &self,
        sid: &SessionId,
        counter: u64,
        epoch: u64,
        b: &ChannelBinding,
    ) -> [u8; PROOF_LEN] {
        self.mac(PROOF_LABEL, sid, counter, epoch, b)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time check of a resume proof.
    pub fn verify_resume_proof(
        &self,
        sid: &SessionId,
        counter: u64,
        epoch: u64,
        b: &ChannelBinding,
        proof: &[u8],
    ) -> bool {
        self.mac(PROOF_LABEL, sid, counter, epoch, b)
            .verify_slice(proof)
            .is_ok()
    }

    /// The gateway's answer: HMAC(key used, "jvpn-resume-ok-v1" ‖ sid ‖ counter ‖ new epoch ‖ B).
    pub fn server_proof(
        &self,
        sid: &SessionId,
        counter: u64,
        new_epoch: u64,
        b: &ChannelBinding,
    ) -> [u8; PROOF_LEN] {
        self.mac(SERVER_PROOF_LABEL, sid, counter, new_epoch, b)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Constant-time check of a server proof (agent side).
    pub fn verify_server_proof(
        &self,
        sid: &SessionId,
        counter: u64,
        new_epoch: u64,
        b: &ChannelBinding,
        proof: &[u8],
    ) -> bool {
        self.mac(SERVER_PROOF_LABEL, sid, counter, new_epoch, b)
            .verify_slice(proof)
            .is_ok()
    }
}

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeKey(<redacted>)")
    }
}

/// Exporter context of the resume key for `epoch`: `session_id ‖ epoch(u64 BE)`.
pub fn resume_key_context(sid: &SessionId, epoch: u64) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[..16].copy_from_slice(sid.as_bytes());
    ctx[16..].copy_from_slice(&epoch.to_be_bytes());
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_every_input() {
        let k = ResumeKey::new([1; 32]);
        let sid = SessionId::from_bytes([2; 16]);
        let b = [3; 32];
        let p = k.resume_proof(&sid, 5, 1, &b);
        assert!(k.verify_resume_proof(&sid, 5, 1, &b, &p));
        assert!(!k.verify_resume_proof(&sid, 6, 1, &b, &p));
        assert!(!k.verify_resume_proof(&sid, 5, 2, &b, &p));
        assert!(!k.verify_resume_proof(&sid, 5, 1, &[4; 32], &p));
        assert!(!k.verify_resume_proof(&SessionId::from_bytes([9; 16]), 5, 1, &b, &p));
        assert!(!ResumeKey::new([0; 32]).verify_resume_proof(&sid, 5, 1, &b, &p));
        assert!(!k.verify_resume_proof(&sid, 5, 1, &b, &p[..31]));
        // Client and server proofs are domain-separated.
        assert!(!k.verify_server_proof(&sid, 5, 1, &b, &p));
        let s = k.server_proof(&sid, 5, 2, &b);
        assert!(k.verify_server_proof(&sid, 5, 2, &b, &s));
        assert_eq!(format!("{k:?}"), "ResumeKey(<redacted>)");
    }

    #[test]
    fn key_context_layout() {
        let ctx = resume_key_context(&SessionId::from_bytes([0xaa; 16]), 0x0102);
        assert_eq!(&ctx[16..], &[0, 0, 0, 0, 0, 0, 1, 2]);
    }
}
