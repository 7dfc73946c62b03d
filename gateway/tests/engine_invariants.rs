//! The preview spec's invariant cases (SPEC-NOTES §8, 1.1 to 9.1), adapted to
//! DESIGN's decisions, plus the RESUME acceptance cases of the engine issue.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{Sim, binding, exporter, fast_policy, resume_on, send, send_on};
use jvpn_gateway::engine::{
    Action, Engine, EngineConfig, EngineEvent, HelloRequest, Mono, Policy, State, Termination,
};
use jvpn_proto::keys::ClusterSecret;
use jvpn_proto::ring::{Member, Ring, RingParams, View};
use jvpn_proto::{Incarnation, NodeId, ReasonCode as R};
use rand::SeedableRng;

#[test]
fn inv_1_1_reattach_a_to_b_leaves_only_b_active() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let old = a.transport;
    let t = sim.transport();
    let w = a.build(t);
    let acc = resume_on(&mut sim, &w, t).unwrap();
    assert_eq!(acc.replaced, Some(old));
    assert_eq!(
        sim.engine.poll_action(),
        Some(Action::CloseTransport {
            session_id: a.id,
            transport: old,
            reason: R::TransportReplaced
        })
    );
    assert_eq!(sim.engine.poll_action(), None);
    let s = sim.session(a.id).unwrap();
    assert_eq!((s.state(), s.transport()), (State::Attached, Some(t)));
    // The old transport is no longer the binding.
    assert!(!sim.engine.activity(sim.now, &a.id, old));
    assert!(sim.engine.activity(sim.now, &a.id, t));
}

#[test]
fn inv_1_2_two_concurrent_reattaches_exactly_one_wins() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let (t1, t2) = (sim.transport(), sim.transport());
    let w1 = a.build(t1);
    let w2 = a.build(t2);
    let r1 = send(&mut sim, &w1);
    let r2 = send(&mut sim, &w2);
    assert!(r1.is_ok());
    let rej = r2.unwrap_err();
    assert_eq!(rej.reason, R::StaleBinding);
    assert_eq!(rej.current_binding_epoch, Some(2));
    // The loser did not disturb the winner's binding.
    let s = sim.session(a.id).unwrap();
    assert_eq!(
        (s.state(), s.transport(), s.binding_epoch()),
        (State::Attached, Some(t1), 2)
    );
}

#[test]
fn inv_2_1_transport_death_bumps_version_by_one() {
    let mut sim = Sim::new(fast_policy());
    let a = sim.connect();
    let v = sim.session(a.id).unwrap().state_version();
    sim.engine.transport_closed(sim.now, &a.id, a.transport);
    sim.drain();
    let s = sim.session(a.id).unwrap();
    assert_eq!((s.state(), s.state_version()), (State::Volatile, v + 1));
    let last = sim.changes(a.id).pop().unwrap();
    assert_eq!((last.reason, last.state_version), (R::TransportDead, v + 1));
}

#[test]
fn inv_2_2_stale_binding_is_rejected_and_version_unchanged() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    a.resume(&mut sim).unwrap(); // epoch 2
    let v = sim.session(a.id).unwrap().state_version();
    a.binding_epoch = 1; // claims the epoch it had before
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(
        (rej.reason, rej.current_binding_epoch),
        (R::StaleBinding, Some(2))
    );
    assert_eq!(sim.session(a.id).unwrap().state_version(), v);
    assert!(sim.log.iter().any(|e| matches!(
        e,
        EngineEvent::ResumeRefused {
            reason: R::StaleBinding,
            ..
        }
    )));
}

#[test]
fn inv_3_1_session_id_is_unchanged_after_reattach() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let id = a.id;
    for _ in 0..3 {
        sim.advance(250);
        a.resume(&mut sim).unwrap();
    }
    assert_eq!(a.id, id);
    assert_eq!(sim.engine.len(), 1);
    assert_eq!(sim.session(id).unwrap().binding_epoch(), 4);
}

#[test]
fn inv_3_2_an_id_this_gateway_did_not_issue_is_unknown() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let genuine = a.id;
    a.id = jvpn_proto::SessionId::from_bytes([0x42; 16]);
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(
        (rej.reason, rej.wire_reason()),
        (R::UnknownSession, R::UnknownSession)
    );
    assert_eq!(rej.current_binding_epoch, None, "nothing disclosed");
    assert_eq!(sim.session(genuine).unwrap().state(), State::Attached);
}

#[test]
fn inv_4_1_reattach_inside_the_bound_attaches() {
    let mut sim = Sim::new(fast_policy()); // transport_lost_ttl 1000 ms
    let mut a = sim.connect();
    sim.engine.transport_closed(sim.now, &a.id, a.transport);
    sim.run_for(500);
    a.resume(&mut sim).unwrap();
    assert_eq!(sim.session(a.id).unwrap().state(), State::Attached);
}

#[test]
fn inv_4_2_no_reattach_by_2000_ms_terminates() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    sim.engine.transport_closed(sim.now, &a.id, a.transport);
    sim.run_for(2_000);
    assert!(sim.session(a.id).is_none());
    let reasons: Vec<R> = sim.changes(a.id).iter().map(|c| c.reason).collect();
    assert_eq!(
        reasons,
        [
            R::HandshakeOk,
            R::TransportDead,
            R::VolatilePersisted,
            R::TransportTtlExceeded
        ]
    );
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(rej.wire_reason(), R::UnknownSession);
}

#[test]
fn inv_5_1_counter_1_is_accepted() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let t = sim.transport();
    let w = a.build(t);
    assert_eq!(w.counter, 1);
    assert!(send(&mut sim, &w).is_ok());
}

#[test]
fn inv_5_2_replayed_counter_1_is_rejected_version_unchanged() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let t = sim.transport();
    let w = a.build(t);
    send(&mut sim, &w).unwrap();
    let before = sim.session(a.id).unwrap();
    // Same frame again on the same connection.
    let rej = send(&mut sim, &w).unwrap_err();
    assert_eq!(rej.reason, R::ReplayDetected);
    assert_eq!(sim.session(a.id).unwrap(), before);
    // Captured and sent on another connection: the proof is bound to the first one.
    let other = sim.transport();
    let rej = send_on(&mut sim, &w, other).unwrap_err();
    assert_eq!(
        (rej.reason, rej.wire_reason()),
        (R::BadProof, R::UnknownSession)
    );
    assert_eq!(sim.session(a.id).unwrap(), before);
}

/// A scripted run with every kind of input; returns its full event log.
fn scripted_run(seed: u64) -> Vec<EngineEvent> {
    let mut sim = Sim::with_node("g1", fast_policy(), seed);
    let mut agents: Vec<_> = (0..5).map(|_| sim.connect()).collect();
    for round in 0..20u64 {
        for (i, a) in agents.iter_mut().enumerate() {
            match (round + i as u64) % 4 {
                0 => {
                    sim.engine.transport_closed(sim.now, &a.id, a.transport);
                }
                1 => {
                    let _ = a.resume(&mut sim);
                }
                2 => {
                    sim.engine.activity(sim.now, &a.id, a.transport);
                }
                _ => {}
            }
        }
        sim.run_for(130);
    }
    sim.engine.terminate_all(sim.now, Termination::Drain);
    sim.drain();
    sim.log
}

#[test]
fn inv_6_1_repeated_runs_are_identical() {
    let a = scripted_run(9);
    let b = scripted_run(9);
    assert!(
        a.len() > 50,
        "the script exercises the engine: {} events",
        a.len()
    );
    assert_eq!(a, b);
    assert_ne!(scripted_run(10), a, "a different seed mints different ids");
}

#[test]
fn inv_7_1_rapid_switches_with_5_switches_per_min_end_degraded_or_terminated() {
    // SPEC 7.1 says "rapid deaths"; since design note 30 only switches away
    // from a live transport are governed (recoveries after a loss are
    // `recoveries_from_lost_transports_do_not_spend_the_switch_budget`), so
    // each RESUME here leaves the previous transport attached.
    let mut sim = Sim::new(fast_policy()); // 5/min, 200 ms cooldown
    let mut a = sim.connect();
    let mut denied = 0;
    for _ in 0..20 {
        sim.run_for(250);
        match a.resume(&mut sim) {
            Ok(_) => {}
            Err(rej) => {
                assert!(
                    matches!(rej.reason, R::SwitchRateLimited | R::CooldownActive),
                    "{rej:?}"
                );
                assert!(rej.retry_after_ms > 0);
                denied += 1;
            }
        }
    }
    assert!(denied > 0);
    let state = sim.session(a.id).map(|s| s.state());
    assert!(matches!(state, Some(State::Degraded) | None), "{state:?}");
    assert!(
        sim.session(a.id)
            .is_none_or(|s| s.switches_in_window(sim.now) <= 5)
    );
}

#[test]
fn inv_8_1_two_node_race_one_wins() {
    // Two gateways of one view: each mints only inside its own shard, so a
    // RESUME reaching the wrong one is refused and only the owner binds.
    let keys = ClusterSecret::new(1, [3; 32]).derive();
    let members = ["g1", "g2"]
        .iter()
        .enumerate()
        .map(|(i, n)| Member {
            node_id: NodeId::new(n).unwrap(),
            incarnation: Incarnation(i as u64 + 1),
            addr: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
            weight: 1,
        })
        .collect();
    let ring = Arc::new(Ring::new(
        View::new(members, RingParams::default(), &keys).unwrap(),
        &keys,
    ));
    let mut g1 = Sim::with_node("g1", fast_policy(), 1);
    let mut g2 = Sim::with_node("g2", fast_policy(), 2);
    g1.engine.set_placement(Some(ring.clone()));
    g2.engine.set_placement(Some(ring.clone()));
    let mut a = g1.connect();
    assert_eq!(ring.owner(&a.id).unwrap().node_id.as_str(), "g1");
    let t = g2.transport();
    let w = a.build(t);
    assert_eq!(send(&mut g2, &w).unwrap_err().reason, R::UnknownSession);
    let w = a.build(t);
    assert!(send(&mut g1, &w).is_ok());
    assert!(g2.engine.is_empty());
}

#[test]
fn inv_9_1_lifetime_expiry_gives_session_lifetime_exceeded() {
    let p = Policy {
        session_max_lifetime_ms: 5_000,
        ..fast_policy()
    };
    let mut sim = Sim::new(p);
    let a = sim.connect();
    for _ in 0..60 {
        sim.advance(100);
        sim.engine.activity(sim.now, &a.id, a.transport);
    }
    assert!(sim.session(a.id).is_none());
    let last = sim.changes(a.id).pop().unwrap();
    assert_eq!(
        (last.to, last.reason),
        (State::Terminated, R::SessionLifetimeExceeded)
    );
}

#[test]
fn credential_expiry_bounds_the_lifetime() {
    let mut sim = Sim::new(fast_policy());
    let t = sim.transport();
    let exp = sim.now + std::time::Duration::from_millis(300);
    let acc = sim
        .engine
        .hello(
            sim.now,
            HelloRequest {
                transport: t,
                principal: Arc::from("p"),
                credential_expiry: Some(exp),
            },
            |ctx| exporter(t, ctx),
        )
        .unwrap();
    assert_eq!(sim.session(acc.session_id).unwrap().end_of_life(), exp);
    let expired = HelloRequest {
        transport: t,
        principal: Arc::from("p"),
        credential_expiry: Some(sim.now),
    };
    let rej = sim
        .engine
        .hello(sim.now, expired, |ctx| exporter(t, ctx))
        .unwrap_err();
    assert_eq!(rej.reason, R::AuthFailed);
}

#[test]
fn ten_thousand_bad_resumes_change_nothing_then_a_genuine_one_succeeds() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let mut victim = sim.connect();
    // Give the target some history: one switch, then transport loss.
    a.resume(&mut sim).unwrap();
    sim.engine.transport_closed(sim.now, &a.id, a.transport);
    sim.drain();
    let before = sim.session(a.id).unwrap();
    let other_before = sim.session(victim.id).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
    for i in 0..10_000u64 {
        let t = sim.transport();
        let mut w = a.clone().build(t);
        match i % 5 {
            0 => w.proof = rand::Rng::random(&mut rng),   // bad proof
            1 => w.counter = rand::Rng::random(&mut rng), // counter not covered by the proof
            2 => w.epoch += 1 + i,                        // epoch not covered by the proof
            3 => w.id = jvpn_proto::SessionId::from_bytes(rand::Rng::random(&mut rng)), // unknown id
            _ => {
                // Proof made for another connection (a relay).
                let b = binding(jvpn_gateway::engine::TransportId(t.0 + 1_000_000));
                w.proof = a.key().resume_proof(&a.id, w.counter, w.epoch, &b);
            }
        }
        let rej = send(&mut sim, &w).unwrap_err();
        assert_eq!(rej.wire_reason(), R::UnknownSession);
        assert_eq!(rej.current_binding_epoch, None);
    }
    assert_eq!(sim.session(a.id).unwrap(), before, "target bit-identical");
    assert_eq!(sim.session(victim.id).unwrap(), other_before);
    assert!(
        sim.log
            .iter()
            .all(|e| !matches!(e, EngineEvent::ResumeRefused { .. }))
    );
    // Expired-session variant: past the TTL everything is unknown_session too.
    sim.advance(250);
    a.resume(&mut sim).unwrap();
    assert_eq!(sim.session(a.id).unwrap().state(), State::Attached);
    victim.resume(&mut sim).unwrap();
}

#[test]
fn requests_for_an_expired_session_change_nothing() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    sim.engine.transport_closed(sim.now, &a.id, a.transport);
    sim.drain();
    // Jump past the TTL without running timers: the session is still in the table.
    sim.now = sim.now + std::time::Duration::from_millis(1_500);
    let before = sim.session(a.id).unwrap();
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(
        (rej.reason, rej.wire_reason()),
        (R::TransportTtlExceeded, R::UnknownSession)
    );
    assert_eq!(sim.session(a.id).unwrap(), before);
}

#[test]
fn lost_resume_ok_is_recovered_with_the_previous_key() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let old_key = a.key().clone();
    // A RESUME commits, but its ResumeOk never reaches the agent.
    let t = sim.transport();
    let w = a.build(t);
    let acc = send(&mut sim, &w).unwrap();
    assert_eq!(acc.binding_epoch, 2);
    // The agent still has key 1 and epoch 1. Its retry learns the epoch...
    sim.advance(250);
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(
        (rej.reason, rej.current_binding_epoch),
        (R::StaleBinding, Some(2))
    );
    assert_eq!(a.binding_epoch, 2);
    // ...and the retry with current_binding_epoch and the previous key succeeds.
    let acc = a.resume(&mut sim).unwrap();
    assert_eq!(acc.binding_epoch, 3);
    // The agent now holds key 3 and has used a key the gateway issued after
    // key 1? Not yet: it used key 1 again. Use the new key once...
    sim.advance(250);
    a.resume(&mut sim).unwrap();
    // ...after which key 1 is refused.
    let mut stale = a.clone();
    stale.set_key(old_key);
    let rej = stale.resume(&mut sim).unwrap_err();
    assert_eq!(rej.reason, R::BadProof);
}

#[test]
fn the_previous_key_dies_once_the_new_one_is_used() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let key1 = a.key().clone();
    a.resume(&mut sim).unwrap(); // agent now on key 2, gateway keeps key 1 as fallback
    let mut old = a.clone();
    old.set_key(key1.clone());
    sim.advance(250);
    // Before key 2 is used, key 1 still authenticates (the ResumeOk might have been lost).
    let mut probe = old.clone();
    assert!(probe.resume(&mut sim).is_ok());
    // That retry with key 1 was the agent's; now the agent uses the key it got back.
    let mut b = probe.clone();
    sim.advance(250);
    b.resume(&mut sim).unwrap();
    old.set_counter(b.counter());
    old.binding_epoch = b.binding_epoch;
    let rej = old.resume(&mut sim).unwrap_err();
    assert_eq!(rej.reason, R::BadProof);
}

#[test]
fn anti_flap_never_terminates_a_session_inside_its_ttl() {
    // ttl 1000, hb timeout 400, 5/min, 200 ms cooldown; a lifetime that does not interfere.
    let p = Policy {
        session_max_lifetime_ms: 600_000,
        ..fast_policy()
    };
    let mut sim = Sim::new(p.clone());
    let mut a = sim.connect();
    let mut last_allowed = sim.now;
    let mut successes = 0;
    // The transport dies right after every switch, and the agent retries every 50 ms.
    for _ in 0..400 {
        sim.advance(50);
        if sim.session(a.id).is_none() {
            break;
        }
        match a.resume(&mut sim) {
            Ok(_) => {
                successes += 1;
                last_allowed = sim.now;
                sim.engine.transport_closed(sim.now, &a.id, a.transport);
                sim.drain();
            }
            Err(rej) => assert!(
                matches!(rej.reason, R::SwitchRateLimited | R::CooldownActive),
                "{rej:?}"
            ),
        }
    }
    assert!(successes >= 5, "{successes}");
    // Still alive: a retrying agent always makes it back within the TTL.
    assert!(sim.session(a.id).is_some(), "terminated while retrying");
    // Now the agent stops retrying: it ends no earlier than TTL after the last allowed switch.
    let deadline = last_allowed + std::time::Duration::from_millis(p.transport_lost_ttl_ms);
    while sim.session(a.id).is_some() {
        sim.advance(10);
    }
    assert!(
        sim.now >= deadline,
        "ended at {:?}, before {:?}",
        sim.now,
        deadline
    );
    let last = sim.changes(a.id).pop().unwrap();
    assert_eq!(last.reason, R::TransportTtlExceeded);
}

#[test]
fn deny_after_ttl_would_lapse_extends_the_deadline() {
    let p = Policy {
        max_switches_per_min: 2,
        session_max_lifetime_ms: 600_000,
        ..fast_policy()
    };
    let mut sim = Sim::new(p.clone());
    let mut a = sim.connect();
    sim.advance(250);
    a.resume(&mut sim).unwrap();
    sim.advance(250);
    a.resume(&mut sim).unwrap();
    // A third switch away from the live transport (a chosen one).
    sim.advance(300);
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(rej.reason, R::SwitchRateLimited);
    let next_allowed = sim.now + std::time::Duration::from_millis(rej.retry_after_ms);
    let d = sim
        .session(a.id)
        .unwrap()
        .transport_lost_deadline()
        .unwrap();
    assert!(
        d >= next_allowed + p.heartbeat_timeout(),
        "{d:?} < {next_allowed:?}"
    );
    // The agent waits as told and gets back in.
    while sim.now < next_allowed {
        sim.advance(100);
    }
    a.resume(&mut sim).unwrap();
    assert_eq!(sim.session(a.id).unwrap().state(), State::Attached);
}

#[test]
fn heartbeat_timeout_retires_the_transport_and_activity_keeps_it() {
    let mut sim = Sim::new(fast_policy());
    let a = sim.connect();
    let b = sim.connect();
    for _ in 0..13 {
        sim.advance(100);
        sim.engine.activity(sim.now, &b.id, b.transport);
    }
    assert_eq!(sim.session(b.id).unwrap().state(), State::Attached);
    assert_eq!(sim.session(a.id).unwrap().state(), State::Degraded);
    let reasons: Vec<R> = sim.changes(a.id).iter().map(|c| c.reason).collect();
    assert_eq!(
        reasons,
        [R::HandshakeOk, R::HeartbeatTimeout, R::VolatilePersisted]
    );
    assert!(sim.engine.poll_timeout().is_some());
    assert_eq!(sim.engine.count(State::Attached), 1);
    assert_eq!(sim.engine.count(State::Degraded), 1);
}

#[test]
fn minting_stays_in_the_own_shard_or_fails_not_in_cluster() {
    let keys = ClusterSecret::new(1, [5; 32]).derive();
    let members: Vec<Member> = (0..10)
        .map(|i| Member {
            node_id: NodeId::new(&format!("g{i}")).unwrap(),
            incarnation: Incarnation(i),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
        })
        .collect();
    let ring = Arc::new(Ring::new(
        View::new(members, RingParams::default(), &keys).unwrap(),
        &keys,
    ));
    let mut sim = Sim::with_node("g3", fast_policy(), 3);
    sim.engine.set_placement(Some(ring.clone()));
    for _ in 0..200 {
        let a = sim.connect();
        assert_eq!(ring.owner(&a.id).unwrap().node_id.as_str(), "g3");
    }
    // Wrong incarnation, or absent from the view: not_in_cluster, nothing created.
    let mut stranger = Engine::new(
        EngineConfig {
            node_id: NodeId::new("g3").unwrap(),
            incarnation: Incarnation(99),
            policy: fast_policy(),
        },
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
    )
    .unwrap();
    stranger.set_placement(Some(ring));
    let t = jvpn_gateway::engine::TransportId(1);
    let rej = stranger
        .hello(
            Mono::ZERO,
            HelloRequest {
                transport: t,
                principal: Arc::from("p"),
                credential_expiry: None,
            },
            |ctx| exporter(t, ctx),
        )
        .unwrap_err();
    assert_eq!(rej.reason, R::NotInCluster);
    assert!(stranger.is_empty());
    assert!(stranger.poll_event().is_none());
}

/// Issue 18 L5: an authenticated agent sending stale-epoch RESUMEs (each
/// with a fresh counter, so each is authenticated) or replays got one
/// `ResumeRefused` event per request: event-log amplification. Refusal
/// events are capped per session per minute; the refusals themselves, and
/// the state, are unchanged.
#[test]
fn refusal_events_of_one_session_are_capped() {
    let mut sim = Sim::new(jvpn_gateway::engine::Policy {
        session_max_lifetime_ms: 3_600_000,
        ..fast_policy()
    });
    let mut a = sim.connect();
    a.resume(&mut sim).unwrap(); // epoch 2
    let before = sim.session(a.id).unwrap().state_version();
    let mut stale = a.clone();
    for _ in 0..1_000 {
        stale.binding_epoch = 1;
        let t = sim.transport();
        let w = stale.build(t);
        let rej = send(&mut sim, &w).unwrap_err();
        assert_eq!(rej.reason, R::StaleBinding);
    }
    let refused = |sim: &Sim| {
        sim.log
            .iter()
            .filter(|e| matches!(e, EngineEvent::ResumeRefused { .. }))
            .count()
    };
    let n = refused(&sim);
    assert!(
        (1..=jvpn_gateway::engine::REFUSED_EVENTS_PER_MIN as usize).contains(&n),
        "{n} refusal events for one session"
    );
    assert_eq!(sim.session(a.id).unwrap().state_version(), before);
    // A minute later the session may be reported again.
    sim.now = sim.now + std::time::Duration::from_secs(61);
    stale.binding_epoch = 1;
    let t = sim.transport();
    let w = stale.build(t);
    let _ = send(&mut sim, &w);
    assert_eq!(refused(&sim), n + 1);
}

/// Issue 18 A1: a transport the network took away is not a switch the client
/// chose; recovering from it never spends the anti-flap budget.
#[test]
fn recoveries_from_lost_transports_do_not_spend_the_switch_budget() {
    let p = Policy {
        max_switches_per_min: 3,
        switch_cooldown_ms: 1_500,
        transport_lost_ttl_ms: 15_000,
        session_max_lifetime_ms: 600_000,
        ..fast_policy()
    };
    let mut sim = Sim::new(p.clone());
    let mut a = sim.connect();
    // Twelve losses in 30 s, each recovered 100 ms later: four times the budget.
    for i in 0..12 {
        sim.advance(2_400);
        sim.engine.transport_closed(sim.now, &a.id, a.transport);
        sim.drain();
        sim.advance(100);
        a.resume(&mut sim)
            .unwrap_or_else(|rej| panic!("recovery {i} refused: {rej:?}"));
        assert_eq!(sim.session(a.id).unwrap().state(), State::Attached);
    }
}

/// Issue 18 A1: a refused switch names the deadline the gateway now keeps,
/// so the agent can wait past its own copy of the TTL.
#[test]
fn a_denied_switch_tells_the_agent_the_extended_deadline() {
    let p = Policy {
        max_switches_per_min: 2,
        session_max_lifetime_ms: 600_000,
        ..fast_policy()
    };
    let mut sim = Sim::new(p.clone());
    let mut a = sim.connect();
    for _ in 0..2 {
        sim.advance(250);
        a.resume(&mut sim).unwrap();
    }
    sim.advance(300);
    let rej = a.resume(&mut sim).unwrap_err();
    assert_eq!(rej.reason, R::SwitchRateLimited);
    let d = sim
        .session(a.id)
        .unwrap()
        .transport_lost_deadline()
        .unwrap();
    let told = rej
        .transport_lost_deadline_ms
        .expect("an authenticated denial carries the deadline");
    assert_eq!(sim.now + std::time::Duration::from_millis(told), d);
    assert!(
        told > rej.retry_after_ms,
        "{told} <= {}",
        rej.retry_after_ms
    );
}

/// SPEC 7.1 for deaths (design note 30): recoveries have a budget of their
/// own, `RECOVERY_FACTOR` × `max_switches_per_min` per minute, so a client
/// that closes its transport to dodge the switch budget, or a network that
/// dies every 250 ms, still ends DEGRADED, inside its TTL.
#[test]
fn inv_7_1_rapid_deaths_end_degraded_within_the_recovery_budget() {
    use jvpn_gateway::engine::RECOVERY_FACTOR;
    let p = Policy {
        max_switches_per_min: 3,
        session_max_lifetime_ms: 600_000,
        transport_lost_ttl_ms: 15_000,
        ..fast_policy()
    };
    let budget = 3 * RECOVERY_FACTOR;
    let mut sim = Sim::new(p.clone());
    let mut a = sim.connect();
    let mut ok = 0;
    let refused = loop {
        sim.advance(250);
        sim.engine.transport_closed(sim.now, &a.id, a.transport);
        sim.drain();
        match a.resume(&mut sim) {
            Ok(_) => ok += 1,
            Err(rej) => break rej,
        }
        assert!(ok <= budget, "more recoveries than the budget");
    };
    assert_eq!(ok, budget);
    assert_eq!(refused.reason, R::SwitchRateLimited);
    let s = sim.session(a.id).unwrap();
    assert_eq!(s.state(), State::Degraded);
    // Asking again at once changes nothing: still the recovery budget.
    assert_eq!(a.resume(&mut sim).unwrap_err().reason, R::SwitchRateLimited);
    // After the hint it comes back, inside the (extended) deadline.
    let back = sim.now + std::time::Duration::from_millis(refused.retry_after_ms);
    while sim.now < back {
        sim.advance(500);
    }
    a.resume(&mut sim).unwrap();
    assert_eq!(sim.session(a.id).unwrap().state(), State::Attached);
}

/// A RESUME on the connection the session is attached on (an agent
/// retrying there) is not a switch: anti-flap does not apply, and that
/// connection is neither retired nor counted. It used to be taken as a
/// switch away from itself: inside the cooldown it was refused and the
/// very connection it came on was closed.
#[test]
fn a_resume_on_the_attached_connection_is_not_a_switch() {
    let mut sim = Sim::new(fast_policy());
    let mut a = sim.connect();
    let t = a.transport;
    // More than the switch budget (5 a minute), inside one cooldown.
    for i in 0..8 {
        let w = a.build(t);
        let r = resume_on(&mut sim, &w, t);
        assert!(r.is_ok(), "resume {i}: {:?}", r.as_ref().err());
        assert_eq!(r.as_ref().unwrap().replaced, None, "resume {i}");
        assert_eq!(sim.engine.poll_action(), None, "resume {i}");
        sim.drain();
        a.apply(&sim, &w, &r);
        let s = sim.session(a.id).unwrap();
        assert_eq!((s.state(), s.transport()), (State::Attached, Some(t)));
    }
    // The budget is whole: a real switch now is allowed.
    assert!(a.resume(&mut sim).is_ok());
}
