//! Every (state, event) pair of the session state machine: the DESIGN §3 rows
//! do what the table says; every other pair is `invalid_transition` and
//! changes nothing.

#![allow(clippy::unwrap_used)]

mod common;

use jvpn_gateway::engine::fsm::{Denial, Event, State, Termination, transition};
use jvpn_gateway::engine::{Mono, TransportId};
use jvpn_proto::ReasonCode as R;

/// DESIGN §3, written out independently of the implementation.
fn expected(from: State, ev: Event) -> Option<(State, R)> {
    use Event as E;
    use State as S;
    let live = [S::Attached, S::Volatile, S::Degraded, S::Recovering];
    let rows: Vec<(Vec<S>, E, S, R)> = vec![
        (
            vec![S::Birth],
            E::HandshakeDone,
            S::Attached,
            R::HandshakeOk,
        ),
        (vec![S::Birth], E::TakenOver, S::Attached, R::TakenOver),
        (
            vec![S::Attached],
            E::TransportClosed,
            S::Volatile,
            R::TransportDead,
        ),
        (
            vec![S::Attached],
            E::HeartbeatTimeout,
            S::Volatile,
            R::HeartbeatTimeout,
        ),
        (
            vec![S::Attached, S::Volatile, S::Degraded],
            E::ResumeAuthenticated,
            S::Recovering,
            R::SwitchInitiated,
        ),
        (
            vec![S::Recovering],
            E::SwitchAllowed,
            S::Attached,
            R::ReattachSuccess,
        ),
        (
            vec![S::Recovering],
            E::SwitchDenied(Denial::StaleBinding),
            S::Degraded,
            R::StaleBinding,
        ),
        (
            vec![S::Recovering],
            E::SwitchDenied(Denial::SwitchRateLimited),
            S::Degraded,
            R::SwitchRateLimited,
        ),
        (
            vec![S::Recovering],
            E::SwitchDenied(Denial::CooldownActive),
            S::Degraded,
            R::CooldownActive,
        ),
        (
            vec![S::Volatile],
            E::VolatileTimeout,
            S::Degraded,
            R::VolatilePersisted,
        ),
        // "no transport for transport_lost_ttl": the live states without one.
        (
            vec![S::Volatile, S::Degraded, S::Recovering],
            E::TransportTtlExpired,
            S::Terminated,
            R::TransportTtlExceeded,
        ),
        (
            live.to_vec(),
            E::LifetimeExpired,
            S::Terminated,
            R::SessionLifetimeExceeded,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::Operator),
            S::Terminated,
            R::OperatorTerminated,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::Drain),
            S::Terminated,
            R::Draining,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::Superseded),
            S::Terminated,
            R::Superseded,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::AgentClosed),
            S::Terminated,
            R::AgentClosed,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::LeaseLost),
            S::Terminated,
            R::NotInCluster,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::ChannelBroken),
            S::Terminated,
            R::ProtocolError,
        ),
        (
            live.to_vec(),
            E::Terminate(Termination::StoreUnavailable),
            S::Terminated,
            R::StoreUnavailable,
        ),
    ];
    rows.into_iter()
        .find(|(froms, e, _, _)| froms.contains(&from) && *e == ev)
        .map(|(_, _, to, r)| (to, r))
}

#[test]
fn every_state_event_pair_matches_the_design_table() {
    let mut listed = 0;
    let mut rejected = 0;
    for from in State::ALL {
        for ev in Event::all() {
            match expected(from, ev) {
                Some(want) => {
                    assert_eq!(transition(from, ev), Ok(want), "{from:?} + {ev:?}");
                    listed += 1;
                }
                None => {
                    assert_eq!(
                        transition(from, ev),
                        Err(R::InvalidTransition),
                        "{from:?} + {ev:?}"
                    );
                    rejected += 1;
                }
            }
        }
    }
    assert_eq!(listed + rejected, State::ALL.len() * Event::all().len());
    assert_eq!(listed, 47, "(state, event) pairs the table allows");
}

#[test]
fn terminated_and_birth_accept_almost_nothing() {
    for ev in Event::all() {
        assert!(
            transition(State::Terminated, ev).is_err(),
            "TERMINATED is absorbing: {ev:?}"
        );
        // BIRTH leaves only by a handshake or a takeover (topology 3).
        if ev != Event::HandshakeDone && ev != Event::TakenOver {
            assert!(transition(State::Birth, ev).is_err(), "{ev:?}");
        }
    }
}

/// Engine level: inputs that map to no valid transition leave the session
/// bit-identical and emit nothing.
#[test]
fn invalid_inputs_change_nothing_in_the_engine() {
    let mut sim = common::Sim::new(common::fast_policy());
    let agent = sim.connect();
    // Reach VOLATILE, then try to close a transport that is not bound.
    assert!(
        sim.engine
            .transport_closed(sim.now, &agent.id, agent.transport)
    );
    sim.drain();
    let before = sim.session(agent.id).unwrap();
    assert_eq!(before.state(), State::Volatile);
    assert!(
        !sim.engine
            .transport_closed(sim.now, &agent.id, agent.transport)
    );
    assert!(
        !sim.engine
            .transport_closed(sim.now, &agent.id, TransportId(999))
    );
    assert!(!sim.engine.activity(sim.now, &agent.id, agent.transport));
    assert!(sim.drain().is_empty());
    assert_eq!(sim.session(agent.id).unwrap(), before);
    // Timers that are not due change nothing either.
    sim.engine.handle_timeout(Mono::ZERO);
    assert!(sim.drain().is_empty());
    assert_eq!(sim.session(agent.id).unwrap(), before);
}
