//! Views and the placement ring: the function every router and gateway must
//! compute bit for bit identically.
//!
//! A [`View`] is the set of placeable members `(node_id, incarnation, addr,
//! weight)` sorted by node id, plus the ring parameters; its [`ViewId`] is a
//! keyed BLAKE3 hash of the canonical encoding. A [`Ring`] is built once per
//! view with `hashring` (`batch_add` of `weight × vnodes_per_weight` virtual
//! nodes per member) and never mutated: a membership change builds a new one,
//! published by an atomic swap in the shells.
//!
//! Hashing: keyed SipHash-2-4 over explicit bytes only. A virtual node hashes
//! `len(node_id) ‖ node_id ‖ vnode(u32 BE)`; a session id hashes its 16 bytes.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;

use hashring::HashRing;
use siphasher::sip::SipHasher24;

use crate::keys::ClusterKeys;
use crate::{Incarnation, NodeId, OwnerTag, SessionId, ViewId};

/// Virtual nodes per unit of weight, chosen by measurement (docs/ring.md):
/// 512 gives max/mean load 1.11 at 100 members (≤ 1.15 required) with margin.
pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 512;
/// Lower bound from the design contract.
pub const MIN_VNODES_PER_WEIGHT: u32 = 160;
/// Upper bound: keeps a 100-member ring build in milliseconds.
pub const MAX_VNODES_PER_WEIGHT: u32 = 4096;
/// Largest weight a member may claim.
pub const MAX_WEIGHT: u32 = 16;

/// One placeable gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    /// Where routers connect for this gateway's client traffic.
    pub addr: SocketAddr,
    pub weight: u32,
}

/// Ring parameters; part of the view id so two routers with different
/// parameters can never report the same view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingParams {
    pub vnodes_per_weight: u32,
}

impl Default for RingParams {
    fn default() -> Self {
        Self {
            vnodes_per_weight: DEFAULT_VNODES_PER_WEIGHT,
        }
    }
}

/// Why a set of members is not a valid view.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// Two members share a node id.
    #[error("node id {0} appears twice")]
    DuplicateNode(NodeId),
    /// A member has weight 0 or above [`MAX_WEIGHT`].
    #[error("node {node} has weight {weight}, allowed 1..={MAX_WEIGHT}")]
    Weight { node: NodeId, weight: u32 },
    /// `vnodes_per_weight` outside the allowed range.
    #[error("vnodes_per_weight {0} outside {MIN_VNODES_PER_WEIGHT}..={MAX_VNODES_PER_WEIGHT}")]
    Vnodes(u32),
}

/// Why a router's heartbeat reply does not describe a view a gateway can
/// mint sessions in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyViewError {
    /// A member's node id is not a valid node id.
    #[error("member node id {0:?} is not valid")]
    NodeId(String),
    /// A member's address does not parse as ip:port.
    #[error("member address {0:?} is not ip:port")]
    Addr(String),
    /// The members do not form a view.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The view id computed here differs from the router's.
    #[error("view id differs from the router's (different ring parameters?)")]
    IdMismatch,
}

fn member_from_reply(vm: &crate::pb::membership::ViewMember) -> Result<Member, ReplyViewError> {
    Ok(Member {
        node_id: NodeId::new(&vm.node_id)
            .map_err(|_| ReplyViewError::NodeId(vm.node_id.clone()))?,
        incarnation: Incarnation(vm.incarnation),
        addr: vm
            .addr
            .parse()
            .map_err(|_| ReplyViewError::Addr(vm.addr.clone()))?,
        weight: vm.weight,
    })
}

fn reply_params(reply: &crate::pb::membership::HeartbeatReply) -> RingParams {
    RingParams {
        vnodes_per_weight: reply.ring.as_ref().map_or(0, |r| r.vnodes_per_weight),
    }
}

/// `members` as the view `reply` names, checked against its id.
fn checked_view(
    members: Vec<Member>,
    reply: &crate::pb::membership::HeartbeatReply,
    keys: &ClusterKeys,
) -> Result<View, ReplyViewError> {
    let view = View::new(members, reply_params(reply), keys)?;
    if view.id().0.as_slice() != reply.view_id.as_slice() {
        return Err(ReplyViewError::IdMismatch);
    }
    Ok(view)
}

/// Rebuilds and checks the view a router's heartbeat reply describes;
/// `None` when it has no member. Shared by gateways and the fuzz target.
pub fn view_from_reply(
    reply: &crate::pb::membership::HeartbeatReply,
    keys: &ClusterKeys,
) -> Result<Option<View>, ReplyViewError> {
    if reply.members.is_empty() {
        return Ok(None);
    }
    let members = reply
        .members
        .iter()
        .map(member_from_reply)
        .collect::<Result<Vec<_>, _>>()?;
    checked_view(members, reply, keys).map(Some)
}

/// Rebuilds and checks the view a delta reply (`delta_base_view_id` set)
/// describes from `base`, the view it names: `base`'s members less
/// `members_removed`, plus `members`. The caller checks that `base` is the
/// view named. `None` when no member is left.
pub fn view_from_delta(
    base: &View,
    reply: &crate::pb::membership::HeartbeatReply,
    keys: &ClusterKeys,
) -> Result<Option<View>, ReplyViewError> {
    let gone = reply
        .members_removed
        .iter()
        .map(|vm| {
            NodeId::new(&vm.node_id)
                .map(|n| (n, Incarnation(vm.incarnation)))
                .map_err(|_| ReplyViewError::NodeId(vm.node_id.clone()))
        })
        .collect::<Result<std::collections::HashSet<_>, _>>()?;
    let mut members: Vec<Member> = base
        .members()
        .iter()
        .filter(|m| !gone.contains(&(m.node_id.clone(), m.incarnation)))
        .cloned()
        .collect();
    for vm in &reply.members {
        members.push(member_from_reply(vm)?);
    }
    if members.is_empty() {
        return Ok(None);
    }
    checked_view(members, reply, keys).map(Some)
}

/// What changed from `base` to `view`, as a delta reply carries it:
/// (members added, members removed).
pub fn view_delta(
    base: &View,
    view: &View,
) -> (
    Vec<crate::pb::membership::ViewMember>,
    Vec<crate::pb::membership::ViewMember>,
) {
    let to_reply = |m: &Member| crate::pb::membership::ViewMember {
        node_id: m.node_id.to_string(),
        incarnation: m.incarnation.0,
        addr: m.addr.to_string(),
        weight: m.weight,
    };
    // Both member lists are sorted by node id: one merge pass.
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (
        base.members().iter().peekable(),
        view.members().iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.node_id == y.node_id => {
                if x != y {
                    removed.push(to_reply(x));
                    added.push(to_reply(y));
                }
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x.node_id < y.node_id => {
                removed.push(to_reply(x));
                a.next();
            }
            (Some(x), None) => {
                removed.push(to_reply(x));
                a.next();
            }
            (_, Some(y)) => {
                added.push(to_reply(y));
                b.next();
            }
            (None, None) => break,
        }
    }
    (added, removed)
}

/// `view`'s members as a heartbeat reply carries them (the inverse of
/// [`view_from_reply`]).
pub fn members_to_reply(view: &View) -> Vec<crate::pb::membership::ViewMember> {
    view.members()
        .iter()
        .map(|m| crate::pb::membership::ViewMember {
            node_id: m.node_id.to_string(),
            incarnation: m.incarnation.0,
            addr: m.addr.to_string(),
            weight: m.weight,
        })
        .collect()
}

/// An immutable, canonical member set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    members: Vec<Member>,
    params: RingParams,
    id: ViewId,
}

impl View {
    /// Sorts, validates and identifies a member set. Input order does not matter.
    pub fn new(
        mut members: Vec<Member>,
        params: RingParams,
        keys: &ClusterKeys,
    ) -> Result<Self, ViewError> {
        if !(MIN_VNODES_PER_WEIGHT..=MAX_VNODES_PER_WEIGHT).contains(&params.vnodes_per_weight) {
            return Err(ViewError::Vnodes(params.vnodes_per_weight));
        }
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        for pair in members.windows(2) {
            if pair[0].node_id == pair[1].node_id {
                return Err(ViewError::DuplicateNode(pair[0].node_id.clone()));
            }
        }
        if let Some(m) = members
            .iter()
            .find(|m| m.weight == 0 || m.weight > MAX_WEIGHT)
        {
            return Err(ViewError::Weight {
                node: m.node_id.clone(),
                weight: m.weight,
            });
        }
        let mut view = Self {
            members,
            params,
            id: ViewId([0; 8]),
        };
        let digest = blake3::keyed_hash(keys.view_key(), &view.canonical_encoding());
        view.id = ViewId::from_slice(&digest.as_bytes()[..8]).unwrap_or(ViewId([0; 8]));
        Ok(view)
    }

    /// `"jvpn-view-v2" ‖ vnodes_per_weight(u32) ‖ count(u32)` then per
    /// member `len ‖ node_id ‖ incarnation(u64) ‖ weight(u32) ‖ addr`, where
    /// addr is `4|6 ‖ ip ‖ port(u16)`; all integers big-endian.
    pub fn canonical_encoding(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.members.len() * 48);
        // v2: no key id, so a view means the same under every secret.
        out.extend_from_slice(b"jvpn-view-v2");
        out.extend_from_slice(&self.params.vnodes_per_weight.to_be_bytes());
        out.extend_from_slice(&(self.members.len() as u32).to_be_bytes());
        for m in &self.members {
            m.node_id.encode_into(&mut out);
            out.extend_from_slice(&m.incarnation.0.to_be_bytes());
            out.extend_from_slice(&m.weight.to_be_bytes());
            match m.addr {
                SocketAddr::V4(a) => {
                    out.push(4);
                    out.extend_from_slice(&a.ip().octets());
                }
                SocketAddr::V6(a) => {
                    out.push(6);
                    out.extend_from_slice(&a.ip().octets());
                }
            }
            out.extend_from_slice(&m.addr.port().to_be_bytes());
        }
        out
    }

    pub fn id(&self) -> ViewId {
        self.id
    }
    pub fn members(&self) -> &[Member] {
        &self.members
    }
    pub fn params(&self) -> RingParams {
        self.params
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
    /// Is this exact incarnation of `node` a member?
    pub fn contains(&self, node: &NodeId, incarnation: Incarnation) -> bool {
        self.member(node)
            .is_some_and(|m| m.incarnation == incarnation)
    }
    pub fn member(&self, node: &NodeId) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.node_id.cmp(node))
            .ok()
            .map(|i| &self.members[i])
    }
}

/// One virtual node; hashes as explicit bytes.
#[derive(Clone, Debug)]
struct VNode {
    name: NodeId,
    index: u32,
    member: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut buf = [0u8; 1 + NodeId::MAX_LEN + 4];
        let name = self.name.as_str().as_bytes();
        buf[0] = name.len() as u8;
        buf[1..1 + name.len()].copy_from_slice(name);
        buf[1 + name.len()..5 + name.len()].copy_from_slice(&self.index.to_be_bytes());
        state.write(&buf[..5 + name.len()]);
    }
}

/// Keyed SipHash-2-4 (the `hashring` default has a zero key).
#[derive(Clone, Copy, Debug)]
struct RingHasher(u64, u64);

impl BuildHasher for RingHasher {
    type Hasher = SipHasher24;
    fn build_hasher(&self) -> SipHasher24 {
        SipHasher24::new_with_keys(self.0, self.1)
    }
}

/// The placement ring of one view. Immutable; rebuild for a new view.
pub struct Ring {
    view: View,
    inner: HashRing<VNode, RingHasher>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("view_id", &self.view.id)
            .field("members", &self.view.members.len())
            .field("vnodes", &self.inner.len())
            .finish()
    }
}

impl Ring {
    pub fn new(view: View, keys: &ClusterKeys) -> Self {
        let (k0, k1) = keys.ring_sip_keys();
        let mut inner = HashRing::with_hasher(RingHasher(k0, k1));
        let per = view.params.vnodes_per_weight;
        let total: usize = view.members.iter().map(|m| (m.weight * per) as usize).sum();
        let mut vnodes = Vec::with_capacity(total);
        // Canonical insertion order (members sorted by node id, then index), so
        // even equal hash points sort the same way everywhere.
        for (i, m) in view.members.iter().enumerate() {
            for index in 0..m.weight * per {
                vnodes.push(VNode {
                    name: m.node_id.clone(),
                    index,
                    member: i as u32,
                });
            }
        }
        inner.batch_add(vnodes);
        Self { view, inner }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// Number of virtual nodes on the ring.
    pub fn vnodes(&self) -> usize {
        self.inner.len()
    }

    /// Index into `view().members()` of the owner of `key`.
    pub fn owner_index(&self, key: &SessionId) -> Option<usize> {
        self.inner.get(key).map(|v| v.member as usize)
    }

    /// The member owning `key` (a session id, or a router's random placement key).
    pub fn owner(&self, key: &SessionId) -> Option<&Member> {
        self.owner_index(key).map(|i| &self.view.members[i])
    }
}

/// `owner_tag` = first 8 bytes of BLAKE3-keyed(tag key, len ‖ node_id ‖ incarnation(u64 BE)).
pub fn owner_tag(keys: &ClusterKeys, node: &NodeId, incarnation: Incarnation) -> OwnerTag {
    let mut buf = Vec::with_capacity(1 + NodeId::MAX_LEN + 8);
    node.encode_into(&mut buf);
    buf.extend_from_slice(&incarnation.0.to_be_bytes());
    let h = blake3::keyed_hash(keys.tag_key(), &buf);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&h.as_bytes()[..8]);
    OwnerTag(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ClusterSecret;

    fn keys() -> ClusterKeys {
        ClusterSecret::new(1, [1; 32]).derive()
    }

    fn member(name: &str, w: u32) -> Member {
        Member {
            node_id: NodeId::new(name).unwrap(),
            incarnation: Incarnation(7),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: w,
        }
    }

    #[test]
    fn view_validation() {
        let k = keys();
        let p = RingParams::default();
        assert!(matches!(
            View::new(vec![member("a", 1), member("a", 1)], p, &k),
            Err(ViewError::DuplicateNode(_))
        ));
        assert!(matches!(
            View::new(vec![member("a", 0)], p, &k),
            Err(ViewError::Weight { .. })
        ));
        assert!(matches!(
            View::new(vec![member("a", 17)], p, &k),
            Err(ViewError::Weight { .. })
        ));
        assert_eq!(
            View::new(
                vec![],
                RingParams {
                    vnodes_per_weight: 10
                },
                &k
            ),
            Err(ViewError::Vnodes(10))
        );
    }

    #[test]
    fn a_delta_rebuilds_the_view_it_was_made_for() {
        let k = ClusterSecret::new(1, [5; 32]).derive();
        let m = |id: &str, inc: u64, port: u16| Member {
            node_id: NodeId::new(id).unwrap(),
            incarnation: Incarnation(inc),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
            weight: 1,
        };
        let base = View::new(
            vec![m("a", 1, 1), m("b", 1, 2), m("c", 1, 3), m("e", 1, 5)],
            RingParams::default(),
            &k,
        )
        .unwrap();
        // a kept, b moved, c gone, d new, e replaced by a new incarnation.
        let view = View::new(
            vec![m("a", 1, 1), m("b", 1, 9), m("d", 1, 4), m("e", 2, 5)],
            RingParams::default(),
            &k,
        )
        .unwrap();
        let (added, removed) = view_delta(&base, &view);
        let names = |v: &[crate::pb::membership::ViewMember]| {
            v.iter().map(|x| x.node_id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&added), ["b", "d", "e"]);
        assert_eq!(names(&removed), ["b", "c", "e"]);
        let reply = crate::pb::membership::HeartbeatReply {
            view_id: view.id().0.to_vec(),
            members: added,
            members_removed: removed,
            delta_base_view_id: base.id().0.to_vec(),
            ring: Some(crate::pb::membership::RingParameters {
                vnodes_per_weight: view.params().vnodes_per_weight,
                key_id: 1,
            }),
            ..Default::default()
        };
        assert_eq!(view_from_delta(&base, &reply, &k).unwrap().unwrap(), view);
        // Applied to another base, it does not add up.
        assert!(view_from_delta(&view, &reply, &k).is_err());
    }

    #[test]
    fn view_id_covers_every_field() {
        let k = keys();
        let p = RingParams::default();
        let base = View::new(vec![member("a", 1), member("b", 1)], p, &k)
            .unwrap()
            .id();
        let mut m = member("b", 1);
        m.incarnation = Incarnation(8);
        assert_ne!(
            View::new(vec![member("a", 1), m], p, &k).unwrap().id(),
            base
        );
        assert_ne!(
            View::new(vec![member("a", 1), member("b", 2)], p, &k)
                .unwrap()
                .id(),
            base
        );
        let mut m = member("b", 1);
        m.addr = "127.0.0.1:2".parse().unwrap();
        assert_ne!(
            View::new(vec![member("a", 1), m], p, &k).unwrap().id(),
            base
        );
        let p2 = RingParams {
            vnodes_per_weight: 200,
        };
        assert_ne!(
            View::new(vec![member("a", 1), member("b", 1)], p2, &k)
                .unwrap()
                .id(),
            base
        );
        // Not the secret: a rotation must not change what a view means.
        let k2 = ClusterSecret::new(2, [1; 32]).derive();
        assert_eq!(
            View::new(vec![member("a", 1), member("b", 1)], p, &k2)
                .unwrap()
                .id(),
            base
        );
    }

    #[test]
    fn weights_scale_vnodes_and_empty_ring_has_no_owner() {
        let k = keys();
        let v = View::new(
            vec![member("a", 1), member("b", 3)],
            RingParams::default(),
            &k,
        )
        .unwrap();
        let r = Ring::new(v, &k);
        assert_eq!(r.vnodes(), 4 * DEFAULT_VNODES_PER_WEIGHT as usize);
        let empty = Ring::new(View::new(vec![], RingParams::default(), &k).unwrap(), &k);
        assert!(empty.owner(&SessionId::from_bytes([0; 16])).is_none());
    }

    #[test]
    fn owner_tags_differ_by_incarnation() {
        let k = keys();
        let n = NodeId::new("g1").unwrap();
        assert_ne!(
            owner_tag(&k, &n, Incarnation(1)),
            owner_tag(&k, &n, Incarnation(2))
        );
        assert_eq!(
            owner_tag(&k, &n, Incarnation(1)),
            owner_tag(&k, &n, Incarnation(1))
        );
    }
}
