//! Golden vectors: placement, view ids, owner tags and routing tokens must be
//! bit-identical in every build and every component. The expected values live
//! in `tests/golden/vectors.json`; regenerate only for a deliberate,
//! versioned contract change: `JVPN_BLESS_GOLDEN=1 cargo test -p jvpn-proto --test golden`.

#![allow(clippy::unwrap_used)]

use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::preamble::Preamble;
use jvpn_proto::ring::{Member, Ring, RingParams, View, owner_tag};
use jvpn_proto::token::{TokenContents, TokenKey};
use jvpn_proto::{Incarnation, NodeId, OwnerTag, SessionId};
use serde_json::{Value, json};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/vectors.json");

fn keys() -> ClusterKeys {
    let secret: [u8; 32] = std::array::from_fn(|i| i as u8);
    ClusterSecret::new(1, secret).derive()
}

fn members() -> Vec<Member> {
    [
        ("g1", 11u64, "10.0.0.1:7443", 1u32),
        ("g2", 22, "10.0.0.2:7443", 1),
        ("g3", 33, "[2001:db8::3]:7443", 2),
    ]
    .into_iter()
    .map(|(n, inc, addr, w)| Member {
        node_id: NodeId::new(n).unwrap(),
        incarnation: Incarnation(inc),
        addr: addr.parse().unwrap(),
        weight: w,
    })
    .collect()
}

/// Session ids with no pattern: BLAKE3 of the index.
fn session_ids() -> Vec<SessionId> {
    (0u32..64)
        .map(|i| {
            let h = blake3::hash(&i.to_be_bytes());
            SessionId::from_slice(&h.as_bytes()[..16]).unwrap()
        })
        .collect()
}

fn compute() -> Value {
    let k = keys();
    let view = View::new(members(), RingParams::default(), &k).unwrap();
    let view_id = view.id();
    let ring = Ring::new(view, &k);
    let owners: Vec<Value> = session_ids()
        .iter()
        .map(|id| json!([id.to_string(), ring.owner(id).unwrap().node_id.as_str()]))
        .collect();
    let tags: Vec<Value> = members()
        .iter()
        .map(|m| {
            json!([
                m.node_id.as_str(),
                m.incarnation.0,
                owner_tag(&k, &m.node_id, m.incarnation).to_string()
            ])
        })
        .collect();
    let contents = TokenContents {
        session_id: session_ids()[0],
        owner_tag: OwnerTag([0xa5; 8]),
    };
    let token = TokenKey::new(&k).seal([7u8; 12], &contents);
    let preamble = Preamble::Resume {
        key_id: k.key_id(),
        token,
    }
    .encode();
    json!({
        "comment": "secret = bytes 0..32, key id 1; see tests/golden.rs",
        "vnodes_per_weight": RingParams::default().vnodes_per_weight,
        "view_id": view_id.to_string(),
        "owners": owners,
        "owner_tags": tags,
        "token": {
            "nonce": hex::encode([7u8; 12]),
            "session_id": contents.session_id.to_string(),
            "owner_tag": contents.owner_tag.to_string(),
            "sealed": hex::encode(token),
        },
        "resume_preamble": hex::encode(preamble),
    })
}

#[test]
fn golden_vectors_match() {
    let got = compute();
    if std::env::var_os("JVPN_BLESS_GOLDEN").is_some() {
        std::fs::write(PATH, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    // Compare field by field for a readable failure.
    for key in [
        "vnodes_per_weight",
        "view_id",
        "owner_tags",
        "token",
        "resume_preamble",
    ] {
        assert_eq!(got[key], want[key], "golden field {key} changed");
    }
    let (g, w) = (
        got["owners"].as_array().unwrap(),
        want["owners"].as_array().unwrap(),
    );
    assert_eq!(g.len(), w.len());
    for (a, b) in g.iter().zip(w) {
        assert_eq!(a, b, "placement changed");
    }
    // The ids spread over all three members (the vector is not degenerate).
    for n in ["g1", "g2", "g3"] {
        assert!(
            w.iter().any(|p| p[1] == n),
            "{n} owns none of the golden ids"
        );
    }
}

#[test]
fn golden_token_opens_to_its_contents() {
    let want: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let sealed: [u8; 52] = hex::decode(want["token"]["sealed"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let c = TokenKey::new(&keys()).open(&sealed).unwrap();
    assert_eq!(
        c.session_id.to_string(),
        want["token"]["session_id"].as_str().unwrap()
    );
    assert_eq!(
        c.owner_tag.to_string(),
        want["token"]["owner_tag"].as_str().unwrap()
    );
}

/// Placement and view ids are the same under any cluster secret, so a
/// rotation moves no session and needs no synchronised switch; tags and
/// tokens do change with it.
#[test]
fn placement_does_not_depend_on_the_secret() {
    let want: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let other = ClusterSecret::new(9, [0x5c; 32]).derive();
    let view = View::new(members(), RingParams::default(), &other).unwrap();
    assert_eq!(view.id().to_string(), want["view_id"].as_str().unwrap());
    let ring = Ring::new(view, &other);
    for (id, pair) in session_ids().iter().zip(want["owners"].as_array().unwrap()) {
        assert_eq!(
            ring.owner(id).unwrap().node_id.as_str(),
            pair[1].as_str().unwrap()
        );
    }
    let m = &members()[0];
    assert_ne!(
        owner_tag(&other, &m.node_id, m.incarnation).to_string(),
        want["owner_tags"][0][2].as_str().unwrap()
    );
}
