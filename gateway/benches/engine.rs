//! RESUME validation in the engine: `cargo bench -p jvpn-gateway --bench engine`.
//! Includes the HMAC proof check, replay window, anti-flap and the commit
//! (key rotation and server proof); the exporter is a precomputed key, since
//! the real one belongs to TLS.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, HelloRequest, Mono, Policy, ResumeRequest, TransportId,
};
use jvpn_proto::crypto::ResumeKey;
use jvpn_proto::{Incarnation, NodeId};
use rand::SeedableRng;

fn engine() -> Engine {
    // Anti-flap and lifetime loose enough for millions of back-to-back commits.
    let policy = Policy {
        max_switches_per_min: 1000,
        switch_cooldown_ms: 1,
        session_max_lifetime_ms: 10 * 365 * 24 * 3600 * 1000,
        ..Policy::default()
    };
    Engine::new(
        EngineConfig {
            node_id: NodeId::new("g1").unwrap(),
            incarnation: Incarnation(1),
            policy,
        },
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
    )
    .unwrap()
}

fn resume(c: &mut Criterion) {
    let mut e = engine();
    let key = ResumeKey::new([7; 32]);
    let mut now = Mono::from_millis(1);
    let acc = e
        .hello(
            now,
            HelloRequest {
                transport: TransportId(0),
                principal: Arc::from("bench"),
                credential_expiry: None,
            },
            |_| key.clone(),
        )
        .unwrap();
    let id = acc.session_id;
    let binding = [5u8; 32];
    let (mut counter, mut epoch, mut t) = (0u64, acc.binding_epoch, 0u64);
    c.bench_function("engine_resume_commit", |b| {
        b.iter(|| {
            counter += 1;
            t += 1;
            now = now + Duration::from_millis(61);
            let proof = key.resume_proof(&id, counter, epoch, &binding);
            let r = e
                .resume(
                    now,
                    &ResumeRequest {
                        session_id: id,
                        counter,
                        binding_epoch: epoch,
                        proof: &proof,
                    },
                    Conn {
                        transport: TransportId(t),
                        binding: &binding,
                    },
                    |_| key.clone(),
                )
                .unwrap();
            epoch = r.binding_epoch;
            while e.poll_event().is_some() {}
            while e.poll_action().is_some() {}
            black_box(r)
        })
    });
    let bad = [0u8; 32];
    c.bench_function("engine_resume_bad_proof", |b| {
        b.iter(|| {
            let r = e.resume(
                now,
                &ResumeRequest {
                    session_id: id,
                    counter: counter + 1,
                    binding_epoch: epoch,
                    proof: &bad,
                },
                Conn {
                    transport: TransportId(0),
                    binding: &binding,
                },
                |_| key.clone(),
            );
            black_box(r.unwrap_err())
        })
    });
}

criterion_group!(benches, resume);
criterion_main!(benches);
