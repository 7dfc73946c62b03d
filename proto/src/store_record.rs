//! A session's record in the shared store (topology 3, DESIGN.md §9) and the
//! sealing of its resume key.
//!
//! The resume key travels to etcd only wrapped: `nonce(12) ‖
//! ChaCha20-Poly1305(k_store, nonce, aad, key(32)) ‖ tag(16)`. Records this
//! version writes (`seal = 2`) have `aad = "jvpn store v2" ‖ session_id ‖`
//! every other field of the record, so whoever cannot open the key cannot
//! change the principal, the credential, the end of life, the owner or the
//! migration flag either (a taker restores them). Older writers' records
//! (`seal` 0) have `aad = "jvpn store v1" ‖ session_id ‖ owner_epoch ‖
//! state_version` (big-endian) and are still read.
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
const AAD_LABEL_V2: &[u8] = b"jvpn store v2";

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
    /// A way of sealing this version does not know (a newer writer's).
    #[error("store record sealed as {0}, unknown here")]
    UnknownSeal(u32),
}

/// `SessionRecord.seal` of records whose every field is sealed with the key.
pub const SEAL_V2: u32 = 2;

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
    seal_with(keys, nonce, &aad(at), resume_key)
}

fn seal_with(
    keys: &ClusterKeys,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    resume_key: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(resume_key);
    let tag = aead(keys)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
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
    open_with(keys, wrapped, &aad(at))
}

fn open_with(
    keys: &ClusterKeys,
    wrapped: &[u8],
    aad: &[u8],
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
            Aad::from(aad),
            &mut body[..],
        )
        .map_err(|_| RecordError::Open)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(plain);
    Ok(key)
}

/// How a record's resume key is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seal {
    /// As the previous version seals (`seal` 0): the key's place only (its
    /// session, owner epoch and state version), which that version opens.
    V1,
    /// Every field of the record (`seal` 2).
    V2,
}

/// Seals `resume_key` into `rec` under `keys` as `seal` says (sets
/// `key_id`, `seal` and `wrapped_key`): every other field must be final.
pub fn seal_record(
    keys: &ClusterKeys,
    nonce: [u8; NONCE_LEN],
    sid: &SessionId,
    rec: &mut SessionRecord,
    resume_key: &[u8; KEY_LEN],
    seal: Seal,
) {
    rec.key_id = u32::from(keys.key_id());
    rec.wrapped_key = match seal {
        Seal::V1 => {
            rec.seal = 0;
            let at = KeyPlace {
                sid,
                owner_epoch: rec.owner_epoch,
                state_version: rec.state_version,
            };
            wrap_key(keys, nonce, at, resume_key)
        }
        Seal::V2 => {
            rec.seal = SEAL_V2;
            seal_with(keys, nonce, &aad_v2(sid, rec), resume_key)
        }
    };
}

/// `"jvpn store v2"` ‖ session id ‖ every field of `rec` but the wrapped
/// key, in field order: numbers big-endian, strings length-prefixed (u32),
/// the flag one byte. A field added later needs a new seal version.
fn aad_v2(sid: &SessionId, rec: &SessionRecord) -> Vec<u8> {
    let mut a = Vec::with_capacity(128);
    let text = |a: &mut Vec<u8>, s: &str| {
        a.extend_from_slice(&(s.len() as u32).to_be_bytes());
        a.extend_from_slice(s.as_bytes());
    };
    a.extend_from_slice(AAD_LABEL_V2);
    a.extend_from_slice(sid.as_bytes());
    text(&mut a, &rec.owner_node);
    a.extend_from_slice(&rec.owner_incarnation.to_be_bytes());
    a.extend_from_slice(&rec.owner_epoch.to_be_bytes());
    a.extend_from_slice(&rec.state_version.to_be_bytes());
    a.extend_from_slice(&rec.binding_epoch.to_be_bytes());
    a.extend_from_slice(&rec.key_id.to_be_bytes());
    text(&mut a, &rec.principal);
    a.extend_from_slice(&rec.owner_lease.to_be_bytes());
    text(&mut a, &rec.credential);
    a.extend_from_slice(&rec.end_of_life_unix_ms.to_be_bytes());
    a.push(u8::from(rec.agent_migrates));
    a.extend_from_slice(&rec.seal.to_be_bytes());
    a
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
    match rec.seal {
        // An older writer's: only the key's place is sealed.
        0 => unwrap_key(
            k,
            &rec.wrapped_key,
            KeyPlace {
                sid,
                owner_epoch: rec.owner_epoch,
                state_version: rec.state_version,
            },
        ),
        SEAL_V2 => open_with(k, &rec.wrapped_key, &aad_v2(sid, rec)),
        other => Err(RecordError::UnknownSeal(other)),
    }
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

    /// Review of topology 3: whoever can write etcd without the cluster
    /// secret must not be able to change who a session is, how long it
    /// lives, or whom it belongs to: the taker restores those from the
    /// record. Every field but the wrapped key itself is sealed with it.
    #[test]
    fn a_sealed_records_fields_cannot_be_changed() {
        let k = keys(1, 7);
        let sid = SessionId::from_bytes([3; 16]);
        let mut rec = SessionRecord {
            owner_node: "g1".into(),
            owner_incarnation: 5,
            owner_epoch: 2,
            state_version: 4,
            binding_epoch: 3,
            principal: "alice".into(),
            owner_lease: 77,
            credential: "cert:abc".into(),
            end_of_life_unix_ms: 1_000,
            agent_migrates: true,
            ..Default::default()
        };
        seal_record(&k, [9; 12], &sid, &mut rec, &[5; 32], Seal::V2);
        assert_eq!(rec.seal, SEAL_V2);
        let back = decode(&encode(&rec)).unwrap();
        assert_eq!(*open_record_key([&k], &sid, &back).unwrap(), [5; 32]);
        type Change = fn(&mut SessionRecord);
        let tampered: [(&str, Change); 11] = [
            ("principal", |r| r.principal = "admin".into()),
            ("credential", |r| r.credential = "cert:root".into()),
            ("end of life", |r| r.end_of_life_unix_ms = u64::MAX),
            ("migrates", |r| r.agent_migrates = false),
            ("owner node", |r| r.owner_node = "g2".into()),
            ("owner incarnation", |r| r.owner_incarnation = 6),
            ("owner lease", |r| r.owner_lease = 78),
            ("binding epoch", |r| r.binding_epoch = 4),
            ("owner epoch", |r| r.owner_epoch = 3),
            ("state version", |r| r.state_version = 5),
            // Read as an older writer's record instead.
            ("seal", |r| r.seal = 0),
        ];
        for (what, change) in tampered {
            let mut bad = back.clone();
            change(&mut bad);
            assert_eq!(
                open_record_key([&k], &sid, &bad),
                Err(RecordError::Open),
                "{what} changed, yet the key opened"
            );
        }
        let mut unknown = back.clone();
        unknown.seal = 9;
        assert_eq!(
            open_record_key([&k], &sid, &unknown),
            Err(RecordError::UnknownSeal(9))
        );
    }

    /// A record an older gateway wrote (its key sealed with the session,
    /// epoch and version only) still opens: a rolling upgrade takes such
    /// sessions over.
    #[test]
    fn an_older_writers_record_still_opens() {
        let k = keys(1, 7);
        let sid = SessionId::from_bytes([3; 16]);
        let mut rec = SessionRecord {
            owner_epoch: 2,
            state_version: 4,
            principal: "alice".into(),
            ..Default::default()
        };
        seal_record(&k, [1; 12], &sid, &mut rec, &[6; 32], Seal::V1);
        assert_eq!(rec.seal, 0);
        assert_eq!(
            rec.wrapped_key,
            wrap_key(&k, [1; 12], at(&sid, 2, 4), &[6; 32]),
            "exactly what the previous version writes"
        );
        assert_eq!(*open_record_key([&k], &sid, &rec).unwrap(), [6; 32]);
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
