//! A session's record in the shared store (topology 3, DESIGN.md §9) and the
//! sealing of its resume key.
//!
//! The resume key travels to etcd only wrapped: `nonce(12) ‖
//! ChaCha20-Poly1305(k_store, nonce, aad, key(32)) ‖ tag(16)` with `aad =
//! "jvpn store v1" ‖ session_id ‖ owner_epoch ‖ state_version` (big-endian).
//! Every write bumps `state_version`, so a wrapped key copied from an older
//! record of the same session (or from another session's) does not open
//! under the record it was pasted into: whoever can write etcd but does not
//! hold the cluster secret can neither read a key, move one, nor roll one
//! back. (Rolling back a whole record, version included, is what the
//! agent's `owner_epoch` check and the record's revision guard against.)

use ::ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use prost::Message;
use zeroize::Zeroizing;

use crate::SessionId;
use crate::keys::ClusterKeys;
use crate::pb::store::SessionRecord;

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Length of a wrapped resume key.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
const AAD_LABEL: &[u8] = b"jvpn store v1";

/// Why a record or its key could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The value is not a `SessionRecord`.
    #[error("store record does not decode: {0}")]
    Decode(String),
    /// The record names a cluster key id this process does not hold.
    #[error("store record sealed under unknown key id {0}")]
    UnknownKeyId(u32),
    /// The wrapped key is not `WRAPPED_LEN` bytes.
    #[error("wrapped resume key is {0} bytes, not {WRAPPED_LEN}")]
    Length(usize),
    /// Authentication failed: another secret, another session or epoch, or
    /// a tampered record.
    #[error("wrapped resume key failed to authenticate")]
    Open,
}

const AAD_LEN: usize = AAD_LABEL.len() + 16 + 8 + 8;

/// Where a wrapped key belongs: its session and the record version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPlace<'a> {
    pub sid: &'a SessionId,
    pub owner_epoch: u64,
    pub state_version: u64,
}

fn aad(at: KeyPlace<'_>) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    let l = AAD_LABEL.len();
    a[..l].copy_from_slice(AAD_LABEL);
    a[l..l + 16].copy_from_slice(at.sid.as_bytes());
    a[l + 16..l + 24].copy_from_slice(&at.owner_epoch.to_be_bytes());
    a[l + 24..].copy_from_slice(&at.state_version.to_be_bytes());
    a
}

fn aead(keys: &ClusterKeys) -> LessSafeKey {
    // A 32-byte key is always valid for ChaCha20-Poly1305.
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, keys.store_key())
        .unwrap_or_else(|_| unreachable!("32-byte ChaCha20-Poly1305 key"));
    LessSafeKey::new(unbound)
}

/// Wraps `resume_key` for the record at `at`, with a caller-supplied
/// random nonce (the caller owns the RNG; never reuse one under a key).
pub fn wrap_key(
    keys: &ClusterKeys,
    nonce: [u8; NONCE_LEN],
    at: KeyPlace<'_>,
    resume_key: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(resume_key);
    let tag = aead(keys)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(at)),
            &mut out[NONCE_LEN..],
        )
        .unwrap_or_else(|_| unreachable!("32 bytes fit ChaCha20-Poly1305"));
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens a wrapped key with the cluster keys that sealed it.
pub fn unwrap_key(
    keys: &ClusterKeys,
    wrapped: &[u8],
    at: KeyPlace<'_>,
) -> Result<Zeroizing<[u8; KEY_LEN]>, RecordError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(RecordError::Length(wrapped.len()));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&wrapped[..NONCE_LEN]);
    let mut body = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
    body.copy_from_slice(&wrapped[NONCE_LEN..]);
    let plain = aead(keys)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(at)),
            &mut body[..],
        )
        .map_err(|_| RecordError::Open)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(plain);
    Ok(key)
}

/// Picks, among `keys` (current first, then previous), the one the record
/// was sealed under and opens its resume key.
pub fn open_record_key<'a>(
    keys: impl IntoIterator<Item = &'a ClusterKeys>,
    sid: &SessionId,
    rec: &SessionRecord,
) -> Result<Zeroizing<[u8; KEY_LEN]>, RecordError> {
    let k = keys
        .into_iter()
        .find(|k| u32::from(k.key_id()) == rec.key_id)
        .ok_or(RecordError::UnknownKeyId(rec.key_id))?;
    unwrap_key(
        k,
        &rec.wrapped_key,
        KeyPlace {
            sid,
            owner_epoch: rec.owner_epoch,
            state_version: rec.state_version,
        },
    )
}

/// Decodes a stored value.
pub fn decode(value: &[u8]) -> Result<SessionRecord, RecordError> {
    SessionRecord::decode(value).map_err(|e| RecordError::Decode(e.to_string()))
}

/// Encodes a record for storing.
pub fn encode(rec: &SessionRecord) -> Vec<u8> {
    rec.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ClusterSecret;

    fn keys(id: u8, b: u8) -> ClusterKeys {
        ClusterSecret::new(id, [b; 32]).derive()
    }

    fn at(sid: &SessionId, owner_epoch: u64, state_version: u64) -> KeyPlace<'_> {
        KeyPlace {
            sid,
            owner_epoch,
            state_version,
        }
    }

    #[test]
    fn a_wrapped_key_opens_only_for_its_session_epoch_version_and_secret() {
        let k = keys(1, 7);
        let sid = SessionId::from_bytes([3; 16]);
        let w = wrap_key(&k, [9; 12], at(&sid, 4, 2), &[5; 32]);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert_eq!(*unwrap_key(&k, &w, at(&sid, 4, 2)).unwrap(), [5; 32]);
        // Pasted into a record of a later epoch (a takeover rotates the key).
        assert_eq!(unwrap_key(&k, &w, at(&sid, 5, 2)), Err(RecordError::Open));
        // Rolled back into a later version of the same epoch.
        assert_eq!(unwrap_key(&k, &w, at(&sid, 4, 3)), Err(RecordError::Open));
        // Another session's record.
        let other = SessionId::from_bytes([4; 16]);
        assert_eq!(unwrap_key(&k, &w, at(&other, 4, 2)), Err(RecordError::Open));
        // Another cluster secret.
        assert_eq!(
            unwrap_key(&keys(1, 8), &w, at(&sid, 4, 2)),
            Err(RecordError::Open)
        );
        // One bit flipped anywhere.
        for i in 0..w.len() {
            let mut bad = w.clone();
            bad[i] ^= 1;
            assert_eq!(unwrap_key(&k, &bad, at(&sid, 4, 2)), Err(RecordError::Open));
        }
        assert_eq!(
            unwrap_key(&k, &w[1..], at(&sid, 4, 2)),
            Err(RecordError::Length(WRAPPED_LEN - 1))
        );
    }

    #[test]
    fn a_record_is_opened_under_the_key_id_it_names() {
        let (cur, prev) = (keys(2, 1), keys(1, 2));
        let sid = SessionId::from_bytes([1; 16]);
        let rec = SessionRecord {
            owner_epoch: 3,
            state_version: 7,
            key_id: 1,
            wrapped_key: wrap_key(&prev, [0; 12], at(&sid, 3, 7), &[8; 32]),
            ..Default::default()
        };
        let back = decode(&encode(&rec)).unwrap();
        assert_eq!(back, rec);
        assert_eq!(
            *open_record_key([&cur, &prev], &sid, &back).unwrap(),
            [8; 32]
        );
        assert_eq!(
            open_record_key([&cur], &sid, &back),
            Err(RecordError::UnknownKeyId(1))
        );
        assert!(matches!(decode(&[0xff, 0xff]), Err(RecordError::Decode(_))));
    }
}
