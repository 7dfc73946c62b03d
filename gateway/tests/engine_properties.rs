//! Property tests of the session engine and the replay window.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::{Agent, Sim, Wire, fast_policy, send};
use jvpn_gateway::engine::{EngineEvent, ReplayWindow, State, Termination};
use jvpn_proto::SessionId;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Close(usize),
    Resume(usize),
    BadProof(usize),
    Replay(usize),
    Stale(usize),
    Activity(usize),
    Advance(u64),
    Terminate(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0usize..3;
    prop_oneof![
        1 => i.clone().prop_map(Op::Close),
        3 => i.clone().prop_map(Op::Resume),
        1 => i.clone().prop_map(Op::BadProof),
        1 => i.clone().prop_map(Op::Replay),
        1 => i.clone().prop_map(Op::Stale),
        1 => i.clone().prop_map(Op::Activity),
        3 => (1u64..1_500).prop_map(Op::Advance),
        1 => i.prop_map(Op::Terminate),
    ]
}

struct Checker {
    versions: HashMap<SessionId, u64>,
    terminated: HashSet<SessionId>,
}

impl Checker {
    /// Checks new events against the invariants; returns per-session transition counts.
    fn events(&mut self, evs: &[EngineEvent]) -> HashMap<SessionId, u64> {
        let mut n = HashMap::new();
        for e in evs {
            let EngineEvent::StateChange(c) = e else {
                continue;
            };
            assert!(
                !self.terminated.contains(&c.session_id),
                "event after TERMINATED: {c:?}"
            );
            let prev = self
                .versions
                .insert(c.session_id, c.state_version)
                .unwrap_or(0);
            assert_eq!(
                c.state_version,
                prev + 1,
                "version +1 per transition: {c:?}"
            );
            if c.to == State::Terminated {
                self.terminated.insert(c.session_id);
            }
            *n.entry(c.session_id).or_insert(0) += 1;
        }
        n
    }
}

fn check_table(sim: &Sim, agents: &[Agent], checker: &Checker) {
    let mut total = 0;
    for a in agents {
        match sim.engine.session(&a.id) {
            Some(s) => {
                total += 1;
                assert!(
                    !checker.terminated.contains(&a.id),
                    "terminated session still in table"
                );
                // Exactly one transport in ATTACHED, none elsewhere.
                assert_eq!(
                    s.state() == State::Attached,
                    s.transport().is_some(),
                    "{s:?}"
                );
                assert!(s.state().is_live());
                assert_ne!(
                    s.state(),
                    State::Recovering,
                    "RECOVERING never outlives a call"
                );
            }
            None => assert!(
                checker.terminated.contains(&a.id),
                "session vanished silently"
            ),
        }
    }
    let by_state: u64 = State::ALL.iter().map(|s| sim.engine.count(*s)).sum();
    assert_eq!(by_state, total as u64);
    assert_eq!(sim.engine.len(), total);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn engine_invariants_hold_for_any_input_sequence(ops in proptest::collection::vec(op(), 1..80)) {
        let mut sim = Sim::new(fast_policy());
        let mut agents: Vec<Agent> = (0..3).map(|_| sim.connect()).collect();
        let mut last_wire: Vec<Option<Wire>> = vec![None; 3];
        let mut checker = Checker { versions: HashMap::new(), terminated: HashSet::new() };
        let initial: Vec<EngineEvent> = sim.log.clone();
        checker.events(&initial);
        for op in ops {
            let before: HashMap<SessionId, u64> = agents
                .iter()
                .filter_map(|a| sim.engine.session(&a.id).map(|s| (a.id, s.state_version())))
                .collect();
            let mut rejected = None;
            let log_len = sim.log.len();
            match op {
                Op::Close(i) => {
                    let a = &agents[i];
                    sim.engine.transport_closed(sim.now, &a.id, a.transport);
                }
                Op::Resume(i) => {
                    let t = sim.transport();
                    let w = agents[i].build(t);
                    let r = send(&mut sim, &w);
                    agents[i].apply(&sim, &w, &r);
                    if let Err(rej) = &r { rejected = Some((i, rej.reason)); }
                    last_wire[i] = Some(w);
                }
                Op::BadProof(i) => {
                    let t = sim.transport();
                    let mut w = agents[i].clone().build(t);
                    w.proof[0] ^= 1;
                    let r = send(&mut sim, &w);
                    prop_assert!(r.is_err());
                    rejected = Some((i, r.unwrap_err().reason));
                }
                Op::Replay(i) => {
                    if let Some(w) = last_wire[i].clone() {
                        let r = send(&mut sim, &w);
                        prop_assert!(r.is_err(), "a replay was accepted");
                        rejected = Some((i, r.unwrap_err().reason));
                    }
                }
                Op::Stale(i) => {
                    let t = sim.transport();
                    let mut a = agents[i].clone();
                    a.binding_epoch = a.binding_epoch.saturating_sub(1);
                    let w = a.build(t);
                    agents[i].set_counter(a.counter());
                    let r = send(&mut sim, &w);
                    prop_assert!(r.is_err());
                    rejected = Some((i, r.unwrap_err().reason));
                }
                Op::Activity(i) => {
                    let a = &agents[i];
                    sim.engine.activity(sim.now, &a.id, a.transport);
                }
                Op::Advance(ms) => sim.advance(ms),
                Op::Terminate(i) => {
                    sim.engine.terminate(sim.now, &agents[i].id, Termination::Operator);
                }
            }
            sim.drain();
            let new = sim.log[log_len..].to_vec();
            let counts = checker.events(&new);
            // Version moves by exactly the number of transitions, so by zero on
            // every rejection that made none.
            for a in &agents {
                if let (Some(v0), Some(s)) = (before.get(&a.id), sim.engine.session(&a.id)) {
                    let n = counts.get(&a.id).copied().unwrap_or(0);
                    prop_assert_eq!(s.state_version(), v0 + n);
                }
            }
            if let Some((i, reason)) = rejected {
                use jvpn_proto::ReasonCode as R;
                if !matches!(reason, R::SwitchRateLimited | R::CooldownActive) {
                    prop_assert_eq!(counts.get(&agents[i].id).copied().unwrap_or(0), 0);
                }
            }
            check_table(&sim, &agents, &checker);
        }
    }

    #[test]
    fn replay_window_matches_its_model(
        window in 1u32..=256,
        counters in proptest::collection::vec(1u64..1_000, 1..400),
    ) {
        let mut w = ReplayWindow::new(window);
        let mut seen = HashSet::new();
        let mut top = 0u64;
        for c in counters {
            let model_ok = !seen.contains(&c) && (c > top || top - c < u64::from(window));
            let got = w.check(c).is_ok();
            prop_assert_eq!(got, model_ok, "counter {} top {} window {}", c, top, window);
            if got {
                w.record(c);
                seen.insert(c);
                top = top.max(c);
            }
        }
    }

    #[test]
    fn replay_window_accepts_out_of_order_inside_and_rejects_all_older(
        window in 1u32..=256,
        base in 1_000u64..1_000_000,
        perm_seed in any::<u64>(),
    ) {
        let mut w = ReplayWindow::new(window);
        w.record(base);
        // Every counter inside the window, in a shuffled order, is accepted once.
        let mut inside: Vec<u64> = (base - u64::from(window) + 1..base).collect();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(perm_seed);
        rand::seq::SliceRandom::shuffle(&mut inside[..], &mut rng);
        for c in &inside {
            prop_assert!(w.check(*c).is_ok());
            w.record(*c);
        }
        for c in inside.iter().chain([base].iter()) {
            prop_assert!(w.check(*c).is_err(), "accepted {} twice", c);
        }
        for c in (base.saturating_sub(u64::from(window) + 64)..=base - u64::from(window)).filter(|c| *c > 0) {
            prop_assert!(w.check(c).is_err(), "older counter {} accepted", c);
        }
    }
}
