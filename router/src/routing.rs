//! The RESUME routing decision, sans-IO: a routing token → the owner that
//! minted it → where the connection goes. The router's shell and the
//! cluster simulation both call [`route_token`]; neither has a copy. It
//! locks nothing: the caller passes how to look an owner tag up and how to
//! route an owner (the router locks its tables inside those closures, one
//! at a time).
//!
//! Owners are known by their owner tags (`jvpn_proto::ring::owner_tag`),
//! learned from accepted heartbeats under every cluster key in use, and
//! forgotten once no router state mentions that incarnation.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use jvpn_proto::ids::{Incarnation, NodeId, OwnerTag, SessionId};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::ring::owner_tag;
use jvpn_proto::token::{TOKEN_LEN, TokenKeyring};

use crate::membership::OwnerRoute;

/// Where a RESUME goes, once its token was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeRoute {
    Splice {
        node: NodeId,
        incarnation: Incarnation,
        addr: SocketAddr,
    },
    Lost,
    Unreachable,
    /// The token did not open under any key we hold.
    BadToken,
    /// Topology 3: the owner is lost; the session's shard owner on the
    /// current ring is asked to claim it from the shared store.
    Takeover {
        node: NodeId,
        incarnation: Incarnation,
        addr: SocketAddr,
    },
}

/// Topology 3: where a RESUME whose owner is lost goes instead of
/// `owner_lost`: the session's owner on the current ring, once it can take
/// sessions (`ready`); until then, `Unreachable` (retry), so a taker that
/// joined a moment ago is not skipped for one that is not the shard owner.
pub fn takeover_route(
    ring: &jvpn_proto::ring::Ring,
    sid: &SessionId,
    ready: impl Fn(&NodeId, Incarnation) -> bool,
) -> ResumeRoute {
    match ring.owner(sid) {
        Some(m) if ready(&m.node_id, m.incarnation) => ResumeRoute::Takeover {
            node: m.node_id.clone(),
            incarnation: m.incarnation,
            addr: m.addr,
        },
        Some(_) => ResumeRoute::Unreachable,
        None => ResumeRoute::Lost,
    }
}

/// Random keys a HELLO placement draws before it walks the member list.
const DRAWS: usize = 16;

/// Where a HELLO goes: the index into `ring.view().members()` of the
/// owner of a random key from `draw`, among the members `ready` accepts.
/// Drawing again, rather than taking the member after the owner, spreads
/// the share of a member passed over (it cannot take HELLOs yet; for the
/// one retry, `ready` also refuses the member whose connect failed) over
/// all the others in proportion to theirs. After [`DRAWS`] misses (most
/// members not ready) it walks the members from the last owner drawn, so a
/// placement exists whenever a ready member does.
pub fn place_hello(
    ring: &jvpn_proto::ring::Ring,
    mut draw: impl FnMut() -> SessionId,
    ready: impl Fn(&jvpn_proto::ring::Member) -> bool,
) -> Option<usize> {
    let members = ring.view().members();
    let mut last = 0;
    for _ in 0..DRAWS {
        last = ring.owner_index(&draw())?;
        if ready(&members[last]) {
            return Some(last);
        }
    }
    (1..=members.len())
        .map(|k| (last + k) % members.len())
        .find(|&i| ready(&members[i]))
}

/// Owner tag (under a key id) → the incarnation it names.
#[derive(Clone, Debug, Default)]
pub struct OwnerTags {
    tags: HashMap<(u8, OwnerTag), (NodeId, Incarnation)>,
    /// The incarnations learned, so that a heartbeat can tell cheaply
    /// whether its tags are known.
    known: HashSet<(NodeId, Incarnation)>,
}

impl OwnerTags {
    /// Incarnations learned.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Whether `(node, incarnation)` has been learned (and not forgotten).
    pub fn knows(&self, node: &NodeId, incarnation: Incarnation) -> bool {
        self.known.contains(&(node.clone(), incarnation))
    }

    /// Learns a member whose heartbeat was accepted, under every key given.
    pub fn learn<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ClusterKeys>,
        node: &NodeId,
        incarnation: Incarnation,
    ) {
        for k in keys {
            self.tags
                .entry((k.key_id(), owner_tag(k, node, incarnation)))
                .or_insert_with(|| (node.clone(), incarnation));
        }
        self.known.insert((node.clone(), incarnation));
    }

    /// The incarnation a token's owner tag names, if known.
    pub fn owner(&self, key_id: u8, tag: &OwnerTag) -> Option<(NodeId, Incarnation)> {
        self.tags.get(&(key_id, *tag)).cloned()
    }

    /// Forgets incarnations not in `current`; `true` if any was.
    pub fn retain(&mut self, current: &HashSet<(NodeId, Incarnation)>) -> bool {
        let before = self.known.len();
        self.tags.retain(|_, v| current.contains(v));
        self.known.retain(|v| current.contains(v));
        self.known.len() != before
    }
}

/// A routing decision and the session id the token carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub route: ResumeRoute,
    pub session_id: Option<SessionId>,
}

/// Where a RESUME carrying `token` (sealed under `key_id`) goes: the token
/// opened, its owner tag looked up (`owner_of`), that owner routed by the
/// membership rules (`route`, which knows `now`).
pub fn route_token(
    tokens: &TokenKeyring,
    owner_of: impl FnOnce(u8, &OwnerTag) -> Option<(NodeId, Incarnation)>,
    route: impl FnOnce(Option<(&NodeId, Incarnation)>) -> OwnerRoute,
    key_id: u8,
    token: &[u8; TOKEN_LEN],
) -> Routed {
    let Ok(contents) = tokens.open(key_id, token) else {
        return Routed {
            route: ResumeRoute::BadToken,
            session_id: None,
        };
    };
    let owner = owner_of(key_id, &contents.owner_tag);
    let route = match (route(owner.as_ref().map(|(n, i)| (n, *i))), owner) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(n: usize) -> jvpn_proto::ring::Ring {
        use jvpn_proto::ring::{Member, Ring, RingParams, View};
        let members = (0..n)
            .map(|i| Member {
                node_id: NodeId::new(&format!("gw-{i:02}")).unwrap(),
                incarnation: Incarnation(1),
                addr: "127.0.0.1:1".parse().unwrap(),
                weight: 1,
            })
            .collect();
        let k = jvpn_proto::keys::ClusterSecret::new(1, [3; 32]).derive();
        Ring::new(View::new(members, RingParams::default(), &k).unwrap(), &k)
    }

    /// Random keys, reproducibly.
    fn draws(seed: u64) -> impl FnMut() -> SessionId {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        move || SessionId::from_bytes(rng.random())
    }

    /// A member that cannot take HELLOs yet (it joined a moment ago): its
    /// share goes to every other member in proportion, not all to one
    /// neighbour (which then took twice its share); and a retry after a
    /// failed connect goes anywhere but the member that failed, in
    /// proportion too (it went to the same neighbour).
    #[test]
    fn a_member_that_is_not_ready_spreads_its_share() {
        const N: usize = 10;
        const HELLOS: usize = 40_000;
        let ring = ring_of(N);
        let members = ring.view().members();
        let not_ready = NodeId::new("gw-04").unwrap();
        let ready = |m: &jvpn_proto::ring::Member| m.node_id != not_ready;
        let mut draw = draws(1);
        let (mut first, mut retry) = ([0usize; N], [0usize; N]);
        for _ in 0..HELLOS {
            let a = place_hello(&ring, &mut draw, ready).unwrap();
            let failed = &members[a].node_id;
            let b = place_hello(&ring, &mut draw, |m| ready(m) && m.node_id != *failed).unwrap();
            assert_ne!(a, b, "the retry goes elsewhere");
            first[a] += 1;
            retry[b] += 1;
        }
        assert_eq!(first[4] + retry[4], 0, "never the member not ready");
        // Each ready member's share of a fair 1/9, within a third (the
        // ring's own spread at 512 points a member is a few per cent).
        let fair = HELLOS / (N - 1);
        for (i, (f, r)) in first.iter().zip(&retry).enumerate() {
            if i == 4 {
                continue;
            }
            assert!(
                *f < fair * 4 / 3 && *r < fair * 4 / 3,
                "member {i}: {f} first placements, {r} retries; fair {fair}: {first:?} {retry:?}"
            );
        }
    }

    #[test]
    fn placement_needs_a_ready_member() {
        let ring = ring_of(3);
        let only = NodeId::new("gw-02").unwrap();
        assert_eq!(place_hello(&ring, draws(2), |m| m.node_id == only), Some(2));
        assert_eq!(place_hello(&ring, draws(3), |_| false), None);
        let one = ring_of(1);
        assert_eq!(place_hello(&one, draws(4), |_| true), Some(0));
    }

    use jvpn_proto::keys::ClusterSecret;
    use jvpn_proto::token::{TokenContents, TokenKey};

    fn keys(byte: &str) -> ClusterKeys {
        format!("1:{}", byte.repeat(32))
            .parse::<ClusterSecret>()
            .unwrap()
            .derive()
    }

    fn sealed(k: &ClusterKeys, node: &NodeId, inc: Incarnation) -> [u8; TOKEN_LEN] {
        TokenKey::new(k).seal(
            [1; 12],
            &TokenContents {
                session_id: SessionId::from_bytes([4; 16]),
                owner_tag: owner_tag(k, node, inc),
            },
        )
    }

    #[test]
    fn a_token_routes_to_the_owner_it_names_and_only_while_it_is_alive() {
        let k = keys("11");
        let ring = TokenKeyring::new(TokenKey::new(&k), None);
        let g1 = NodeId::new("g1").unwrap();
        let mut tags = OwnerTags::default();
        tags.learn([&k], &g1, Incarnation(7));
        let token = sealed(&k, &g1, Incarnation(7));
        let addr: SocketAddr = "192.0.2.1:7443".parse().unwrap();
        let owner_of = |id: u8, t: &OwnerTag| tags.owner(id, t);
        let alive = |o: Option<(&NodeId, Incarnation)>| {
            assert_eq!(o, Some((&g1, Incarnation(7))));
            OwnerRoute::Alive(addr)
        };
        let r = route_token(&ring, owner_of, alive, 1, &token);
        assert_eq!(
            r.route,
            ResumeRoute::Splice {
                node: g1.clone(),
                incarnation: Incarnation(7),
                addr
            }
        );
        assert_eq!(r.session_id, Some(SessionId::from_bytes([4; 16])));
        for (says, expect) in [
            (OwnerRoute::Lost, ResumeRoute::Lost),
            (OwnerRoute::Unreachable, ResumeRoute::Unreachable),
        ] {
            let r = route_token(&ring, owner_of, |_| says.clone(), 1, &token);
            assert_eq!(r.route, expect);
        }
    }

    #[test]
    fn a_takeover_goes_to_the_shard_owner_once_it_is_ready() {
        use jvpn_proto::ring::{Member, Ring, RingParams, View};
        let members: Vec<Member> = (1..=3)
            .map(|i| Member {
                node_id: NodeId::new(&format!("g{i}")).unwrap(),
                incarnation: Incarnation(i),
                addr: SocketAddr::from(([127, 0, 0, i as u8], 7443)),
                weight: 1,
            })
            .collect();
        let k = keys("11");
        let ring = Ring::new(View::new(members, RingParams::default(), &k).unwrap(), &k);
        for b in 0..32u8 {
            let sid = SessionId::from_bytes([b; 16]);
            let owner = ring.owner(&sid).unwrap().clone();
            assert_eq!(
                takeover_route(&ring, &sid, |_, _| true),
                ResumeRoute::Takeover {
                    node: owner.node_id.clone(),
                    incarnation: owner.incarnation,
                    addr: owner.addr
                }
            );
            // Not ready (e.g. joined a moment ago): retry, never another
            // member (the claim must be the shard owner's).
            assert_eq!(
                takeover_route(&ring, &sid, |n, _| *n != owner.node_id),
                ResumeRoute::Unreachable
            );
        }
    }

    #[test]
    fn an_unknown_owner_is_lost_and_a_foreign_token_is_bad() {
        let k = keys("11");
        let ring = TokenKeyring::new(TokenKey::new(&k), None);
        let g1 = NodeId::new("g1").unwrap();
        let tags = OwnerTags::default();
        let token = sealed(&k, &g1, Incarnation(7));
        // Alive says the membership, but no known incarnation has that tag.
        let addr: SocketAddr = "192.0.2.1:7443".parse().unwrap();
        let r = route_token(
            &ring,
            |id, t| tags.owner(id, t),
            |_| OwnerRoute::Alive(addr),
            1,
            &token,
        );
        assert_eq!(r.route, ResumeRoute::Lost);
        // Sealed under another cluster's key: never routed.
        let foreign = sealed(&keys("22"), &g1, Incarnation(7));
        let r = route_token(
            &ring,
            |id, t| tags.owner(id, t),
            |_| OwnerRoute::Alive(addr),
            1,
            &foreign,
        );
        assert_eq!((r.route, r.session_id), (ResumeRoute::BadToken, None));
    }
}
