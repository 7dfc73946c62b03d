//! RESUME validation in the engine: `cargo bench -p jvpn-gateway --bench engine`.
//! Includes the HMAC proof check, replay window, anti-flap and the commit
//! (key rotation and server proof); the exporter is a precomputed key, since
//! the real one belongs to TLS. The RESUME is built by the real client
//! session (one HMAC per iteration, as before); the client's own check of
//! the server proof is outside what is measured.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, HelloRequest, Mono, Policy, ResumeRequest, TransportId,
};
use jvpn_proto::client::{ClientSession, ExportError, Exporter};
use jvpn_proto::crypto::ResumeKey;
use jvpn_proto::token::TOKEN_LEN;
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

/// A connection whose exporter gives the same bytes for every label.
struct Fixed;

impl Exporter for Fixed {
    fn export(&self, _label: &[u8], _context: &[u8]) -> Result<[u8; 32], ExportError> {
        Ok([7; 32])
    }
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
    let ok = acc.to_wire(
        &NodeId::new("g1").unwrap(),
        Incarnation(1),
        vec![0; TOKEN_LEN],
        0,
    );
    let mut client = ClientSession::from_hello_ok(ok, &Fixed).unwrap();
    let id = client.id;
    let binding = Fixed.channel_binding().unwrap();
    let mut t = 0u64;
    c.bench_function("engine_resume_commit", |b| {
        b.iter(|| {
            t += 1;
            now = now + Duration::from_millis(61);
            let sent = client.build_resume(&Fixed).unwrap();
            let r = e
                .resume(
                    now,
                    &ResumeRequest::from_wire(&sent).unwrap(),
                    Conn {
                        transport: TransportId(t),
                        binding: &binding,
                    },
                    |_| key.clone(),
                )
                .unwrap();
            client.binding_epoch = r.binding_epoch;
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
                    counter: client.counter() + 1,
                    binding_epoch: client.binding_epoch,
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
