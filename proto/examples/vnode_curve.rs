//! Measures ring balance and build time against `vnodes_per_weight`.
//! `cargo run --release -p jvpn-proto --example vnode_curve`
//! Prints one Markdown table row per setting (100 members, 1M random ids).

use std::time::Instant;

use jvpn_proto::keys::ClusterSecret;
use jvpn_proto::ring::{Member, Ring, RingParams, View};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use rand::{Rng, SeedableRng};

fn main() {
    let keys = ClusterSecret::new(1, [42; 32]).derive();
    let members: Vec<Member> = (0..100)
        .map(|i| Member {
            node_id: NodeId::new(&format!("gw-{i:03}")).expect("valid"),
            incarnation: Incarnation(i),
            addr: format!("10.0.{}.{}:7000", i / 250, i % 250)
                .parse()
                .expect("addr"),
            weight: 1,
        })
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let ids: Vec<SessionId> = (0..1_000_000)
        .map(|_| SessionId::from_bytes(rng.random()))
        .collect();
    println!("| vnodes_per_weight | max/mean | min/mean | build ms (100 members) |");
    println!("|---|---|---|---|");
    for v in [160u32, 256, 512, 768, 1024, 1536, 2048, 4096] {
        let view = View::new(
            members.clone(),
            RingParams {
                vnodes_per_weight: v,
            },
            &keys,
        )
        .expect("view");
        let t = Instant::now();
        let ring = Ring::new(view, &keys);
        let build = t.elapsed();
        let mut counts = vec![0u64; 100];
        for id in &ids {
            counts[ring.owner_index(id).expect("non-empty")] += 1;
        }
        let mean = ids.len() as f64 / 100.0;
        let max = *counts.iter().max().expect("100") as f64 / mean;
        let min = *counts.iter().min().expect("100") as f64 / mean;
        println!(
            "| {v} | {max:.3} | {min:.3} | {:.2} |",
            build.as_secs_f64() * 1e3
        );
    }
}
