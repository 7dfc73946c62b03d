//! Placement and token costs: `cargo bench -p jvpn-proto --bench placement`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::ring::{Member, Ring, RingParams, View};
use jvpn_proto::token::{TokenContents, TokenKey};
use jvpn_proto::{Incarnation, NodeId, OwnerTag, SessionId};

fn keys() -> ClusterKeys {
    ClusterSecret::new(1, [9; 32]).derive()
}

fn view(n: u64, k: &ClusterKeys) -> View {
    let members = (0..n)
        .map(|i| Member {
            node_id: NodeId::new(&format!("gw-{i:04}")).unwrap(),
            incarnation: Incarnation(i),
            addr: format!("10.0.{}.{}:7443", i / 250, i % 250)
                .parse()
                .unwrap(),
            weight: 1,
        })
        .collect();
    View::new(members, RingParams::default(), k).unwrap()
}

fn ring_lookup(c: &mut Criterion) {
    let k = keys();
    let mut g = c.benchmark_group("ring_lookup");
    for n in [10u64, 100, 1000] {
        let ring = Ring::new(view(n, &k), &k);
        let ids: Vec<SessionId> = (0..1024u32)
            .map(|i| {
                SessionId::from_slice(&blake3::hash(&i.to_be_bytes()).as_bytes()[..16]).unwrap()
            })
            .collect();
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(n), &ring, |b, ring| {
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(ring.owner_index(black_box(&ids[i])))
            })
        });
    }
    g.finish();
}

fn ring_build(c: &mut Criterion) {
    let k = keys();
    for n in [100, 1000] {
        let v = view(n, &k);
        c.bench_function(&format!("ring_build/{n}"), |b| {
            b.iter(|| Ring::new(black_box(v.clone()), &k))
        });
    }
}

fn token(c: &mut Criterion) {
    let key = TokenKey::new(&keys());
    let contents = TokenContents {
        session_id: SessionId::from_bytes([1; 16]),
        owner_tag: OwnerTag([2; 8]),
    };
    let t = key.seal([3; 12], &contents);
    c.bench_function("token_open", |b| b.iter(|| key.open(black_box(&t))));
    c.bench_function("token_seal", |b| {
        b.iter(|| key.seal(black_box([4; 12]), &contents))
    });
}

criterion_group!(benches, ring_lookup, ring_build, token);
criterion_main!(benches);
