//! Placement ring properties: balance, minimal movement, order independence.

#![allow(clippy::unwrap_used)]

use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::ring::{Member, Ring, RingParams, View};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

fn keys() -> ClusterKeys {
    ClusterSecret::new(1, [0x5a; 32]).derive()
}

fn member(i: u64) -> Member {
    Member {
        node_id: NodeId::new(&format!("gw-{i:03}")).unwrap(),
        incarnation: Incarnation(1000 + i),
        addr: format!("10.0.{}.{}:7000", i / 200, i % 200 + 1)
            .parse()
            .unwrap(),
        weight: 1,
    }
}

fn ring(members: Vec<Member>) -> Ring {
    let k = keys();
    Ring::new(View::new(members, RingParams::default(), &k).unwrap(), &k)
}

fn ids(n: usize, seed: u64) -> Vec<SessionId> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| SessionId::from_bytes(rng.random()))
        .collect()
}

fn owners(r: &Ring, ids: &[SessionId]) -> Vec<NodeId> {
    ids.iter()
        .map(|id| r.owner(id).unwrap().node_id.clone())
        .collect()
}

#[test]
fn hundred_members_are_balanced_within_15_percent() {
    let r = ring((0..100).map(member).collect());
    let ids = ids(1_000_000, 1);
    let mut counts = [0u64; 100];
    for id in &ids {
        counts[r.owner_index(id).unwrap()] += 1;
    }
    let mean = ids.len() as f64 / 100.0;
    let max = *counts.iter().max().unwrap() as f64 / mean;
    let min = *counts.iter().min().unwrap() as f64 / mean;
    assert!(max <= 1.15, "max/mean {max:.3}");
    assert!(min >= 0.85, "min/mean {min:.3}");
}

#[test]
fn adding_a_member_moves_only_its_share_and_only_to_it() {
    let ids = ids(200_000, 2);
    for n in [3u64, 10, 100] {
        let before = ring((0..n).map(member).collect());
        let after = ring((0..=n).map(member).collect());
        let new_node = member(n).node_id;
        let (a, b) = (owners(&before, &ids), owners(&after, &ids));
        let mut moved = 0usize;
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                moved += 1;
                assert_eq!(y, &new_node, "an id moved to an old member");
            }
        }
        let frac = moved as f64 / ids.len() as f64;
        let bound = 1.3 / (n as f64 + 1.0);
        assert!(frac <= bound, "n={n}: moved {frac:.4} > {bound:.4}");
        assert!(moved > 0, "n={n}: the new member got nothing");
    }
}

#[test]
fn removing_a_member_moves_only_its_ids() {
    let ids = ids(200_000, 3);
    let all: Vec<Member> = (0..10).map(member).collect();
    let gone = all[4].node_id.clone();
    let before = ring(all.clone());
    let after = ring(all.into_iter().filter(|m| m.node_id != gone).collect());
    for (x, y) in owners(&before, &ids).iter().zip(owners(&after, &ids)) {
        if *x != gone {
            assert_eq!(*x, y, "an id of a surviving member moved");
        } else {
            assert_ne!(y, gone);
        }
    }
}

#[test]
fn member_order_does_not_matter() {
    let ids = ids(100_000, 4);
    let base_members: Vec<Member> = (0..20).map(member).collect();
    let base = ring(base_members.clone());
    let base_owners = owners(&base, &ids);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..3 {
        let mut shuffled = base_members.clone();
        shuffled.shuffle(&mut rng);
        let r = ring(shuffled);
        assert_eq!(r.view().id(), base.view().id());
        assert_eq!(owners(&r, &ids), base_owners);
    }
}

#[test]
fn weight_two_gets_about_twice_the_share() {
    let mut ms: Vec<Member> = (0..4).map(member).collect();
    ms[0].weight = 2;
    let r = ring(ms);
    let ids = ids(200_000, 6);
    let heavy = ids.iter().filter(|id| r.owner_index(id) == Some(0)).count() as f64;
    let share = heavy / ids.len() as f64; // ideal 2/5
    assert!((share - 0.4).abs() < 0.03, "share {share:.3}");
}
