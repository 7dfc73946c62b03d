//! The RESUME routing decision, sans-IO: a routing token → the owner that
//! minted it → where the connection goes. The router's shell and the
//! cluster simulation both call [`route_token`]; neither has a copy.
//!
//! Owners are known by their owner tags (`jvpn_proto::ring::owner_tag`),
//! learned from accepted heartbeats under every cluster key in use, and
//! forgotten once no router state mentions that incarnation.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use jvpn_proto::Mono;
use jvpn_proto::ids::{Incarnation, NodeId, OwnerTag, SessionId};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::ring::owner_tag;
use jvpn_proto::token::{TOKEN_LEN, TokenKeyring};
use jvpn_runtime::wire::lock;

use crate::membership::{Membership, OwnerRoute};
use crate::state::ResumeRoute;

/// Owner tag (under a key id) → the incarnation it names.
#[derive(Debug, Default)]
pub struct OwnerTags(HashMap<(u8, OwnerTag), (NodeId, Incarnation)>);

impl OwnerTags {
    /// Learns a member whose heartbeat was accepted, under every key given.
    pub fn learn<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ClusterKeys>,
        node: &NodeId,
        incarnation: Incarnation,
    ) {
        for k in keys {
            self.0
                .entry((k.key_id(), owner_tag(k, node, incarnation)))
                .or_insert_with(|| (node.clone(), incarnation));
        }
    }

    /// The incarnation a token's owner tag names, if known.
    pub fn owner(&self, key_id: u8, tag: &OwnerTag) -> Option<(NodeId, Incarnation)> {
        self.0.get(&(key_id, *tag)).cloned()
    }

    /// Forgets incarnations not in `current`.
    pub fn retain(&mut self, current: &HashSet<(NodeId, Incarnation)>) {
        self.0.retain(|_, v| current.contains(v));
    }
}

/// A routing decision and the session id the token carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub route: ResumeRoute,
    pub session_id: Option<SessionId>,
}

/// Where a RESUME carrying `token` (sealed under `key_id`) goes at `now`.
/// Locks `tags`, then `membership`, one after the other.
pub fn route_token(
    tokens: &TokenKeyring,
    tags: &Mutex<OwnerTags>,
    membership: &Mutex<Membership>,
    now: Mono,
    key_id: u8,
    token: &[u8; TOKEN_LEN],
) -> Routed {
    let Ok(contents) = tokens.open(key_id, token) else {
        return Routed {
            route: ResumeRoute::BadToken,
            session_id: None,
        };
    };
    let owner = lock(tags).owner(key_id, &contents.owner_tag);
    let route = lock(membership).route(now, owner.as_ref().map(|(n, i)| (n, *i)));
    let route = match (route, owner) {
        (OwnerRoute::Alive(addr), Some((node, incarnation))) => ResumeRoute::Splice {
            node,
            incarnation,
            addr,
        },
        (OwnerRoute::Alive(_), None) | (OwnerRoute::Lost, _) => ResumeRoute::Lost,
        (OwnerRoute::Unreachable, _) => ResumeRoute::Unreachable,
    };
    Routed {
        route,
        session_id: Some(contents.session_id),
    }
}
