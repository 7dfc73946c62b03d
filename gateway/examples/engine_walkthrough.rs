//! A session's life in the engine, on a virtual clock: handshake, three
//! transport jumps, a replayed RESUME, a stale one, a transport that dies and
//! is never replaced. Prints every transition with its reason.
//!
//! `cargo run -p jvpn-gateway --example engine_walkthrough`

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, EngineEvent, HelloRequest, Mono, Policy, ResumeRequest, TransportId,
};
use jvpn_proto::crypto::{ResumeKey, resume_key_context};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use rand::SeedableRng;

/// Stand-ins for the TLS exporter and channel binding of connection `t`.
fn exporter(t: u64, ctx: &[u8]) -> ResumeKey {
    ResumeKey::new(*blake3::hash(&[&t.to_be_bytes()[..], ctx].concat()).as_bytes())
}
fn binding(t: u64) -> [u8; 32] {
    *blake3::hash(&[b"cb".as_slice(), &t.to_be_bytes()].concat()).as_bytes()
}

fn print_events(e: &mut Engine, start: Mono) {
    while e
        .poll_event()
        .map(|ev| match ev {
            EngineEvent::StateChange(c) => println!(
                "  t={:>6} ms  {:<10} -> {:<10} v{:<2} {}",
                c.at.saturating_since(start).as_millis(),
                c.from.as_str(),
                c.to.as_str(),
                c.state_version,
                c.reason
            ),
            EngineEvent::ResumeRefused { at, reason, .. } => println!(
                "  t={:>6} ms  resume refused: {reason}",
                at.saturating_since(start).as_millis()
            ),
        })
        .is_some()
    {}
    while e.poll_action().is_some() {}
}

fn main() {
    let mut e = Engine::new(
        EngineConfig {
            node_id: NodeId::new("g1").unwrap(),
            incarnation: Incarnation(1),
            policy: Policy::default(),
        },
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
    )
    .unwrap();
    let start = Mono::from_millis(1);
    let mut now = start;
    let acc = e
        .hello(
            now,
            HelloRequest {
                transport: TransportId(1),
                principal: Arc::from("demo"),
                credential_expiry: None,
            },
            |c| exporter(1, c),
        )
        .unwrap();
    let id: SessionId = acc.session_id;
    println!(
        "session established (id hidden), epoch {}",
        acc.binding_epoch
    );
    print_events(&mut e, start);
    let (mut key, mut epoch, mut counter) = (exporter(1, &resume_key_context(&id, 1)), 1u64, 0u64);
    for t in 2..=4u64 {
        now = now + Duration::from_secs(2);
        e.handle_timeout(now);
        counter += 1;
        let proof = key.resume_proof(&id, counter, epoch, &binding(t));
        let b = binding(t);
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
                    binding: &b,
                },
                |c| exporter(t, c),
            )
            .unwrap();
        assert!(key.verify_server_proof(&id, counter, r.binding_epoch, &b, &r.server_proof));
        println!(
            "jump to transport {t}: epoch {} (server proof verified)",
            r.binding_epoch
        );
        print_events(&mut e, start);
        epoch = r.binding_epoch;
        key = exporter(t, &resume_key_context(&id, epoch));
        if t == 3 {
            let replay = e.resume(
                now,
                &ResumeRequest {
                    session_id: id,
                    counter,
                    binding_epoch: epoch - 1,
                    proof: &proof,
                },
                Conn {
                    transport: TransportId(t),
                    binding: &b,
                },
                |c| exporter(t, c),
            );
            println!("same Resume replayed: {}", replay.unwrap_err().reason);
            print_events(&mut e, start);
        }
    }
    println!("transport 4 dies and nothing replaces it:");
    e.transport_closed(now, &id, TransportId(4));
    for _ in 0..200 {
        now = now + Duration::from_millis(100);
        e.handle_timeout(now);
    }
    print_events(&mut e, start);
    println!("sessions left: {}", e.len());
}
