//! The cluster secret and the keys derived from it.
//!
//! Routers and gateways share one 32-byte cluster secret tagged with a key id
//! (the byte carried in every preamble). The owner-tag and routing-token keys
//! are derived from it with BLAKE3 `derive_key` under their own context
//! strings, so one leaked derived key reveals neither the secret nor its
//! siblings.
//!
//! The placement keys (ring SipHash and view id) are *not* secret-derived:
//! nothing a client sends is ever hashed onto the ring (HELLOs are placed by
//! router randomness, session ids are minted by gateways), so their secrecy
//! protects nothing, while their stability is what lets the secret rotate
//! without every router and gateway switching at the same instant
//! (design note 20).

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// Context strings; changing one changes every golden vector.
const CTX_RING: &str = "jvpn 2026-11 placement ring siphash v1";
const CTX_VIEW: &str = "jvpn 2026-11 view id v1";
const CTX_TAG: &str = "jvpn 2026-11 owner tag v1";
const CTX_ROUTE: &str = "jvpn 2026-11 routing token chacha20poly1305 v1";
const CTX_MEMBERSHIP: &str = "jvpn 2026-12 membership secret proof v1";
const CTX_STORE: &str = "jvpn 2026-12 store record key chacha20poly1305 v1";
/// Input of the placement keys: a constant, so placement survives rotations.
const PLACEMENT_KEY_MATERIAL: &[u8] = b"jvpn placement v2";

/// Errors reading a cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The secret was not 64 hexadecimal digits.
    #[error("cluster secret must be 64 hex digits (32 bytes)")]
    SecretFormat,
}

/// The shared cluster secret with its key id. Zeroized on drop; `Debug` shows the id only.
#[derive(Clone)]
pub struct ClusterSecret {
    key_id: u8,
    secret: Zeroizing<[u8; 32]>,
}

impl ClusterSecret {
    pub fn new(key_id: u8, secret: [u8; 32]) -> Self {
        Self {
            key_id,
            secret: Zeroizing::new(secret),
        }
    }

    /// Parses 64 hex digits.
    pub fn from_hex(key_id: u8, hex_secret: &str) -> Result<Self, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_secret.trim(), &mut secret[..])
            .map_err(|_| KeyError::SecretFormat)?;
        Ok(Self { key_id, secret })
    }

    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// Derives every working key.
    pub fn derive(&self) -> ClusterKeys {
        // Placement: fixed, the same under every secret (see the module docs).
        let ring = blake3::derive_key(CTX_RING, PLACEMENT_KEY_MATERIAL);
        let (k0, k1) = ring.split_at(8);
        ClusterKeys {
            key_id: self.key_id,
            ring_sip: (
                u64::from_le_bytes(k0.try_into().unwrap_or_default()),
                u64::from_le_bytes(k1[..8].try_into().unwrap_or_default()),
            ),
            view: Zeroizing::new(blake3::derive_key(CTX_VIEW, PLACEMENT_KEY_MATERIAL)),
            tag: Zeroizing::new(blake3::derive_key(CTX_TAG, &self.secret[..])),
            route: Zeroizing::new(blake3::derive_key(CTX_ROUTE, &self.secret[..])),
            membership: Zeroizing::new(blake3::derive_key(CTX_MEMBERSHIP, &self.secret[..])),
            store: Zeroizing::new(blake3::derive_key(CTX_STORE, &self.secret[..])),
        }
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(key_id={}, <redacted>)", self.key_id)
    }
}

impl FromStr for ClusterSecret {
    type Err = KeyError;
    /// `"<key_id>:<64 hex digits>"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, hex_secret) = s.split_once(':').ok_or(KeyError::SecretFormat)?;
        let key_id = id.trim().parse().map_err(|_| KeyError::SecretFormat)?;
        Self::from_hex(key_id, hex_secret)
    }
}

/// Keys derived from one [`ClusterSecret`].
#[derive(Clone)]
pub struct ClusterKeys {
    key_id: u8,
    ring_sip: (u64, u64),
    view: Zeroizing<[u8; 32]>,
    tag: Zeroizing<[u8; 32]>,
    route: Zeroizing<[u8; 32]>,
    membership: Zeroizing<[u8; 32]>,
    store: Zeroizing<[u8; 32]>,
}

impl ClusterKeys {
    pub fn key_id(&self) -> u8 {
        self.key_id
    }
    /// SipHash-2-4 keys of the placement ring.
    pub fn ring_sip_keys(&self) -> (u64, u64) {
        self.ring_sip
    }
    /// BLAKE3 key for `view_id`.
    pub fn view_key(&self) -> &[u8; 32] {
        &self.view
    }
    /// BLAKE3 key for owner tags.
    pub fn tag_key(&self) -> &[u8; 32] {
        &self.tag
    }
    /// ChaCha20-Poly1305 key of routing tokens.
    pub fn route_key(&self) -> &[u8; 32] {
        &self.route
    }
    /// HMAC key of the membership secret proofs ([`crate::membership_proof`]).
    pub fn membership_key(&self) -> &[u8; 32] {
        &self.membership
    }
    /// ChaCha20-Poly1305 key wrapping resume keys in the shared store
    /// ([`crate::store_record`]).
    pub fn store_key(&self) -> &[u8; 32] {
        &self.store
    }
}

impl fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKeys(key_id={}, <redacted>)", self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_distinct_and_stable() {
        let s = ClusterSecret::new(3, [7; 32]);
        let a = s.derive();
        let b = s.derive();
        assert_eq!(a.route_key(), b.route_key());
        assert_ne!(a.route_key(), a.tag_key());
        assert_ne!(a.view_key(), a.tag_key());
        assert_ne!(a.store_key(), a.route_key());
        assert_ne!(a.store_key(), a.membership_key());
        assert_eq!(a.key_id(), 3);
        let other = ClusterSecret::new(4, [8; 32]).derive();
        // Secret keys change with the secret; placement does not.
        assert_ne!(a.route_key(), other.route_key());
        assert_ne!(a.tag_key(), other.tag_key());
        assert_ne!(a.store_key(), other.store_key());
        assert_eq!(a.ring_sip_keys(), other.ring_sip_keys());
        assert_eq!(a.view_key(), other.view_key());
    }

    #[test]
    fn parse_and_redact() {
        let s: ClusterSecret = format!("2:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(s.key_id(), 2);
        assert!(!format!("{s:?}").contains("abab"));
        assert_eq!(
            "2:abc".parse::<ClusterSecret>().err(),
            Some(KeyError::SecretFormat)
        );
        assert_eq!(
            "zz".parse::<ClusterSecret>().err(),
            Some(KeyError::SecretFormat)
        );
    }
}
