//! The routing token: how a router finds a session's owner without learning
//! anything else.
//!
//! `nonce(12) ‖ ChaCha20-Poly1305(k_route, nonce, aad = preamble[0..8],
//! session_id(16) ‖ owner_tag(8)) ‖ tag(16)`, 52 bytes. The owner issues a
//! fresh one (fresh random nonce) in `HelloOk` and every `ResumeOk`; the agent
//! uses each once, so observers cannot link a session across networks.

use ::ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use crate::keys::ClusterKeys;
use crate::preamble::{Kind, Preamble};
use crate::{OwnerTag, SessionId};

pub const TOKEN_LEN: usize = 52;
const NONCE_LEN: usize = 12;
const PLAIN_LEN: usize = 24;

/// A token did not open: forged, corrupted, or sealed under another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Authentication failed.
    #[error("routing token failed to authenticate")]
    Open,
    /// The preamble named a key id this process does not hold.
    #[error("unknown routing key id {0}")]
    UnknownKeyId(u8),
}

/// What a token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenContents {
    pub session_id: SessionId,
    pub owner_tag: OwnerTag,
}

/// Seals and opens tokens under one cluster key.
pub struct TokenKey {
    key_id: u8,
    raw: zeroize::Zeroizing<[u8; 32]>,
    aead: LessSafeKey,
}

impl Clone for TokenKey {
    fn clone(&self) -> Self {
        Self::from_raw(self.key_id, *self.raw)
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey(key_id={})", self.key_id)
    }
}

impl TokenKey {
    pub fn new(keys: &ClusterKeys) -> Self {
        Self::from_raw(keys.key_id(), *keys.route_key())
    }

    fn from_raw(key_id: u8, raw: [u8; 32]) -> Self {
        // A 32-byte key is always valid for ChaCha20-Poly1305.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &raw)
            .unwrap_or_else(|_| unreachable!("32-byte ChaCha20-Poly1305 key"));
        Self {
            key_id,
            raw: zeroize::Zeroizing::new(raw),
            aead: LessSafeKey::new(unbound),
        }
    }

    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// Seals a token with a caller-supplied random nonce (the caller owns the RNG).
    pub fn seal(&self, nonce: [u8; NONCE_LEN], contents: &TokenContents) -> [u8; TOKEN_LEN] {
        let mut out = [0u8; TOKEN_LEN];
        out[..NONCE_LEN].copy_from_slice(&nonce);
        let body = &mut out[NONCE_LEN..NONCE_LEN + PLAIN_LEN];
        body[..16].copy_from_slice(contents.session_id.as_bytes());
        body[16..].copy_from_slice(&contents.owner_tag.0);
        let aad = Preamble::header(Kind::Resume, self.key_id);
        // Sealing a fixed 24-byte buffer cannot fail.
        if let Ok(tag) = self.aead.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            body,
        ) {
            out[NONCE_LEN + PLAIN_LEN..].copy_from_slice(tag.as_ref());
        }
        out
    }

    /// Opens a token from a RESUME preamble. Constant work for every input.
    pub fn open(&self, token: &[u8; TOKEN_LEN]) -> Result<TokenContents, TokenError> {
        let aad = Preamble::header(Kind::Resume, self.key_id);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&token[..NONCE_LEN]);
        let mut sealed = [0u8; TOKEN_LEN - NONCE_LEN];
        sealed.copy_from_slice(&token[NONCE_LEN..]);
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| TokenError::Open)?;
        let body: &[u8] = plain;
        let mut sid = [0u8; 16];
        sid.copy_from_slice(&body[..16]);
        let mut tag8 = [0u8; 8];
        tag8.copy_from_slice(&body[16..]);
        Ok(TokenContents {
            session_id: SessionId::from_bytes(sid),
            owner_tag: OwnerTag(tag8),
        })
    }
}

/// Current and previous token keys, so tokens issued before a secret rotation
/// still open until they age out.
#[derive(Clone, Debug)]
pub struct TokenKeyring {
    current: TokenKey,
    previous: Option<TokenKey>,
}

impl TokenKeyring {
    pub fn new(current: TokenKey, previous: Option<TokenKey>) -> Self {
        Self { current, previous }
    }

    pub fn current(&self) -> &TokenKey {
        &self.current
    }

    pub fn open(&self, key_id: u8, token: &[u8; TOKEN_LEN]) -> Result<TokenContents, TokenError> {
        if key_id == self.current.key_id {
            return self.current.open(token);
        }
        match &self.previous {
            Some(prev) if prev.key_id == key_id => prev.open(token),
            _ => Err(TokenError::UnknownKeyId(key_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ClusterSecret;

    fn key(id: u8, b: u8) -> TokenKey {
        TokenKey::new(&ClusterSecret::new(id, [b; 32]).derive())
    }

    fn contents() -> TokenContents {
        TokenContents {
            session_id: SessionId::from_bytes([5; 16]),
            owner_tag: OwnerTag([9; 8]),
        }
    }

    #[test]
    fn seal_open_round_trip_and_privacy() {
        let k = key(1, 1);
        let a = k.seal([1; 12], &contents());
        let b = k.seal([2; 12], &contents());
        assert_ne!(a[12..], b[12..], "fresh nonce, unlinkable ciphertext");
        assert!(
            !a.windows(16).any(|w| w == [5; 16]),
            "session id never in clear"
        );
        assert_eq!(k.open(&a), Ok(contents()));
        assert_eq!(k.open(&b), Ok(contents()));
    }

    #[test]
    fn every_single_bit_flip_fails() {
        let k = key(1, 1);
        let t = k.seal([3; 12], &contents());
        for i in 0..TOKEN_LEN * 8 {
            let mut f = t;
            f[i / 8] ^= 1 << (i % 8);
            assert_eq!(k.open(&f), Err(TokenError::Open), "bit {i}");
        }
    }

    #[test]
    fn other_key_or_key_id_fails() {
        let t = key(1, 1).seal([3; 12], &contents());
        assert_eq!(key(1, 2).open(&t), Err(TokenError::Open));
        // Same secret, other key id: the AAD differs.
        assert_eq!(key(2, 1).open(&t), Err(TokenError::Open));
    }

    #[test]
    fn keyring_accepts_previous_key_id_only() {
        let old = key(1, 1);
        let new = key(2, 2);
        let t_old = old.seal([0; 12], &contents());
        let ring = TokenKeyring::new(new.clone(), Some(old));
        assert_eq!(ring.open(1, &t_old), Ok(contents()));
        assert_eq!(ring.open(3, &t_old), Err(TokenError::UnknownKeyId(3)));
        let ring = TokenKeyring::new(new, None);
        assert_eq!(ring.open(1, &t_old), Err(TokenError::UnknownKeyId(1)));
    }
}
