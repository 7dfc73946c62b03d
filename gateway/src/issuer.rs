//! The routing-token issuer: seals, for each session it answers, a token
//! naming this incarnation as the owner (under the current cluster key), so
//! any router can send the next RESUME here and nowhere else. Pure: the
//! caller brings the nonce.

use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::ring::owner_tag;
use jvpn_proto::token::{TokenContents, TokenKey};
use jvpn_proto::{Incarnation, NodeId, OwnerTag, SessionId};

/// Bytes of nonce each token takes.
pub const NONCE_LEN: usize = 12;

/// The routing-token key and this incarnation's owner tag under it.
#[derive(Debug)]
pub struct Issuer {
    key: TokenKey,
    tag: OwnerTag,
}

impl Issuer {
    pub fn new(keys: &ClusterKeys, node: &NodeId, incarnation: Incarnation) -> Self {
        Self {
            key: TokenKey::new(keys),
            tag: owner_tag(keys, node, incarnation),
        }
    }

    /// The cluster key id tokens are sealed under.
    pub fn key_id(&self) -> u8 {
        self.key.key_id()
    }

    /// This incarnation's owner tag under that key.
    pub fn tag(&self) -> OwnerTag {
        self.tag
    }

    /// A token for `sid` and the key id to put in `HelloOk`/`ResumeOk`.
    pub fn seal(&self, sid: SessionId, nonce: [u8; NONCE_LEN]) -> (Vec<u8>, u32) {
        let token = self.key.seal(
            nonce,
            &TokenContents {
                session_id: sid,
                owner_tag: self.tag,
            },
        );
        (token.to_vec(), u32::from(self.key.key_id()))
    }
}
