//! Unit tests of the membership rules on a virtual clock.

use super::*;

fn hb(node: &str, inc: u64) -> Heartbeat {
    Heartbeat {
        node_id: NodeId::new(node).unwrap(),
        incarnation: Incarnation(inc),
        addr: "198.51.100.3:7000".parse().unwrap(),
        state: NodeState::Ready,
        weight: 1,
        lease_ok: true,
        in_view: true,
        ordered: true,
        leaving: false,
    }
}

/// A heartbeat from a gateway older than ordered incarnations.
fn legacy_hb(node: &str, inc: u64) -> Heartbeat {
    Heartbeat {
        ordered: false,
        ..hb(node, inc)
    }
}

/// Heartbeats every 250 ms for `node` from `from` to `to` (ms), ticking every 50 ms.
fn run(
    m: &mut Membership,
    nodes: &[(&str, u64)],
    from: u64,
    to: u64,
) -> Vec<(NodeId, Incarnation)> {
    let mut died = Vec::new();
    let mut t = from;
    while t < to {
        if t.is_multiple_of(250) {
            for (n, inc) in nodes {
                m.on_heartbeat(Mono::from_millis(t), &hb(n, *inc));
            }
        }
        died.extend(m.tick(Mono::from_millis(t)));
        t += 50;
    }
    died
}

fn placeable(m: &Membership, now_ms: u64) -> Vec<String> {
    m.placeable_members(Mono::from_millis(now_ms))
        .iter()
        .map(|x| x.node_id.to_string())
        .collect()
}

#[test]
fn rise_then_placeable_and_silence_kills_within_failure_timeout_plus_interval() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 200);
    assert!(placeable(&m, 200).is_empty(), "one heartbeat is not a rise");
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 200, 1000);
    assert_eq!(placeable(&m, 1000), ["g1", "g2", "g3"]);
    // g3 goes silent (SIGSTOP): dead within failure_timeout + one interval.
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 2300);
    assert_eq!(died, vec![(NodeId::new("g3").unwrap(), Incarnation(1))]);
    assert_eq!(placeable(&m, 2300), ["g1", "g2"]);
    let g3 = NodeId::new("g3").unwrap();
    // Dead by silence alone: not certainly gone yet (issue 18 A2; the
    // grace and the final `Lost` are tested below).
    assert_eq!(
        m.route(Mono::from_millis(2300), Some((&g3, Incarnation(1)))),
        OwnerRoute::Unreachable
    );
}

#[test]
fn closed_stream_is_fast_death() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    // Past the warm-up (3 s), when an unknown owner may be lost.
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 4000);
    let g2 = NodeId::new("g2").unwrap();
    m.on_stream_closed(Mono::from_millis(4000), &g2, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g3", 1)], 4000, 4600);
    assert_eq!(died.len(), 1);
    // Not ambiguous like silence: the owner is lost at once.
    assert_eq!(
        m.route(Mono::from_millis(4600), Some((&g2, Incarnation(1)))),
        OwnerRoute::Lost
    );
}

/// The shell ticks when a closed stream's death falls due (issue 14:
/// detection not rounded up to the next 50 ms step): the time announced is
/// the first at which a tick declares it, and none is announced for a
/// member already dead or still holding another stream.
#[test]
fn a_closed_streams_death_falls_due_when_announced() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    let g2 = NodeId::new("g2").unwrap();
    m.on_stream_opened(&g2, Incarnation(1));
    m.on_stream_opened(&g2, Incarnation(1));
    let closed = Mono::from_millis(1010);
    assert_eq!(m.on_stream_closed(closed, &g2, Incarnation(1)), None);
    let due = m
        .on_stream_closed(closed, &g2, Incarnation(1))
        .expect("the last stream closed: a death falls due");
    assert_eq!(due, closed + m.fast_death_after());
    // Steps that do not land on it (the others keep heartbeating).
    assert!(run(&mut m, &[("g1", 1), ("g3", 1)], 1050, 1500).is_empty());
    assert!(m.tick(due).is_empty(), "verdicts are strictly after");
    assert_eq!(
        m.tick(due + Duration::from_millis(1)),
        vec![(g2.clone(), Incarnation(1))]
    );
    assert_eq!(
        m.on_stream_closed(due + Duration::from_millis(2), &g2, Incarnation(1)),
        None
    );
}

/// Review of issue 14's extra ticks: closes spread over a few ms are one
/// mass death, even though each death now gets a tick of its own when it
/// falls due; the guard judges a whole step, not one tick.
#[test]
fn closes_spread_over_a_few_ms_still_trip_the_mass_death_guard() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    let names: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
    let all: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    run(&mut m, &all, 0, 1000);
    // Six of ten lose their streams 1 ms apart (a middlebox restart).
    let dues: Vec<Mono> = names[..6]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let at = Mono::from_millis(1000 + i as u64);
            m.on_stream_closed(at, &NodeId::new(n).unwrap(), Incarnation(1))
                .unwrap()
        })
        .collect();
    let healthy = &all[6..];
    let mut died = run(&mut m, healthy, 1000, 1500);
    for due in dues {
        for (n, inc) in healthy {
            m.on_heartbeat(due, &hb(n, *inc));
        }
        died.extend(m.tick(due + Duration::from_millis(2)));
    }
    assert!(died.is_empty(), "{died:?}");
    assert!(m.is_unhealthy());
}

#[test]
fn new_incarnation_supersedes_and_old_is_told_so() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 5)], 0, 1000);
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(1000), &hb("g2", 6)),
        HeartbeatVerdict::Accepted
    );
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(1010), &hb("g2", 5)),
        HeartbeatVerdict::Superseded
    );
    let g2 = NodeId::new("g2").unwrap();
    assert_eq!(
        m.route(Mono::from_millis(3000), Some((&g2, Incarnation(5)))),
        OwnerRoute::Lost
    );
    assert!(matches!(
        m.route(Mono::from_millis(3000), Some((&g2, Incarnation(6)))),
        OwnerRoute::Alive(_)
    ));
}

#[test]
fn flapping_node_is_held_down_exponentially() {
    let cfg = MembershipConfig::default();
    let mut m = Membership::new(cfg.clone(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    // g3 dies, comes back: held down 2 s.
    run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 2500);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 2500, 4000);
    assert_eq!(placeable(&m, 4000), ["g1", "g2"], "held down");
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 4000, 5000);
    assert_eq!(placeable(&m, 5000), ["g1", "g2", "g3"]);
    assert_eq!(hold_down_for(&cfg, 2), Duration::from_secs(4));
    assert_eq!(hold_down_for(&cfg, 10), Duration::from_secs(60));
    // A base so large that doubling it overflows: the cap, no panic.
    let huge = MembershipConfig {
        hold_down_base: Duration::from_secs(u64::MAX / 1_000),
        hold_down_max: Duration::from_secs(86_400),
        ..MembershipConfig::default()
    };
    assert_eq!(hold_down_for(&huge, 20), Duration::from_secs(86_400));
}

#[test]
fn late_ticks_suspend_verdicts_and_mass_death_marks_unhealthy() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    // The router itself stalls for 2 s: no deaths right after.
    assert!(m.tick(Mono::from_millis(3000)).is_empty());
    let g1 = NodeId::new("g1").unwrap();
    assert_eq!(
        m.route(Mono::from_millis(3000), Some((&g1, Incarnation(9)))),
        OwnerRoute::Unreachable
    );
    // Past the suspicion window, everyone silent: unhealthy, not a massacre.
    let mut t = 3050;
    while t < 4200 {
        assert!(m.tick(Mono::from_millis(t)).is_empty());
        t += 50;
    }
    assert!(m.is_unhealthy());
    assert_eq!(placeable(&m, 4200).len(), 3, "nobody killed");
}

#[test]
fn warm_up_answers_unknown_owners_unreachable() {
    let m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    let g = NodeId::new("gx").unwrap();
    assert_eq!(
        m.route(Mono::from_millis(100), Some((&g, Incarnation(1)))),
        OwnerRoute::Unreachable
    );
    assert_eq!(
        m.route(Mono::from_millis(100), None),
        OwnerRoute::Unreachable
    );
    assert_eq!(m.route(Mono::from_millis(3000), None), OwnerRoute::Lost);
}

/// A gateway whose first connect to a restarted router was dropped (a
/// host that is still booting answers no SYN) opens its stream again only
/// after its connect timeout and one back-off: until then its sessions'
/// RESUMEs are `owner_unreachable` (retry), not `owner_lost`, which would
/// make every agent of a live gateway re-handshake.
#[test]
fn warm_up_outlasts_a_gateways_slowest_reconnect() {
    let cfg = MembershipConfig::default();
    let mut m = Membership::new(cfg.clone(), Mono::ZERO);
    let reopened = cfg.failure_timeout
        + 2 * cfg.interval
        + jvpn_proto::HEARTBEAT_CONNECT_TIMEOUT
        + jvpn_proto::HEARTBEAT_BACKOFF_MAX;
    let just_before = Mono::ZERO + (reopened - Duration::from_millis(1));
    let g = NodeId::new("g1").unwrap();
    assert_eq!(
        m.route(just_before, Some((&g, Incarnation(7)))),
        OwnerRoute::Unreachable,
        "a gateway still reconnecting was declared lost"
    );
    m.on_heartbeat(just_before, &hb("g1", 7));
    assert!(matches!(
        m.route(just_before, Some((&g, Incarnation(7)))),
        OwnerRoute::Alive(_)
    ));
    // An owner never heard of is lost once the warm-up is over.
    let after = Mono::ZERO + reopened;
    assert_eq!(m.route(after, None), OwnerRoute::Lost);
}

/// The warm-up is for owners this router has not heard of yet. One it
/// heard, whose stream then closed (a SIGKILL soon after the router
/// started), is certainly gone: `owner_lost` at once, warm-up or not, so
/// its agents re-handshake within the failure timeout.
#[test]
fn a_death_seen_during_the_warm_up_is_lost_at_once() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    let g2 = NodeId::new("g2").unwrap();
    m.on_stream_closed(Mono::from_millis(1000), &g2, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g3", 1)], 1000, 1600);
    assert_eq!(died.len(), 1);
    for route in [
        m.route(Mono::from_millis(1600), Some((&g2, Incarnation(1)))),
        m.routes()
            .route(Mono::from_millis(1600), Some((&g2, Incarnation(1)))),
    ] {
        assert_eq!(route, OwnerRoute::Lost);
    }
    // Still warming up for owners it never heard of.
    assert_eq!(
        m.route(Mono::from_millis(1600), None),
        OwnerRoute::Unreachable
    );
}

/// During the warm-up, a gateway's first stream to the restarted router
/// may break after a single reply (the network of a booting host); the
/// gateway, whose back-off grew while the router was away, reopens only
/// 500 ms later, after the router has declared it dead. Not certainly
/// gone: its sessions' RESUMEs are `owner_unreachable` until the warm-up
/// ends, not `owner_lost`.
#[test]
fn a_stream_that_breaks_at_its_first_reply_during_the_warm_up_loses_nothing() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1)], 0, 300);
    let g3 = NodeId::new("g3").unwrap();
    m.on_heartbeat(Mono::from_millis(300), &hb("g3", 1));
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_stream_closed(Mono::from_millis(400), &g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 400, 1000);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    for route in [
        m.route(Mono::from_millis(1000), Some((&g3, Incarnation(1)))),
        m.routes()
            .route(Mono::from_millis(1000), Some((&g3, Incarnation(1)))),
    ] {
        assert_eq!(route, OwnerRoute::Unreachable);
    }

    // Two short streams, one reply each: the router has heard two
    // heartbeats, but no stream carried two replies, so the gateway's
    // back-off is still long. Not certain either.
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1)], 0, 300);
    let at = Mono::from_millis;
    m.on_heartbeat(at(300), &hb("g3", 1));
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_stream_closed(at(350), &g3, Incarnation(1));
    assert!(run(&mut m, &[("g1", 1), ("g2", 1)], 350, 700).is_empty());
    m.on_heartbeat(at(700), &hb("g3", 1));
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_stream_closed(at(750), &g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 700, 1400);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(
        m.route(at(1400), Some((&g3, Incarnation(1)))),
        OwnerRoute::Unreachable
    );
}

#[test]
fn failed_connects_unplace_then_unreachable_kills() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    for t in [1000, 1100, 1200] {
        m.on_connect(Mono::from_millis(t), &g3, Incarnation(1), false);
    }
    assert_eq!(placeable(&m, 1200), ["g1", "g2"]);
    assert!(matches!(
        m.route(Mono::from_millis(1200), Some((&g3, Incarnation(1)))),
        OwnerRoute::Alive(_)
    ));
    // Heartbeats still arrive, but 3 × failure_timeout unreachable: not alive.
    let died = run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 1200, 4300);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    // Its heartbeats keep arriving, yet it stays dead: a heartbeat says
    // nothing about the client port.
    let died = run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 4300, 9000);
    assert!(died.is_empty());
    assert_eq!(
        m.route(Mono::from_millis(9000), Some((&g3, Incarnation(1)))),
        OwnerRoute::Lost
    );
    // The router probes it once per interval; a failed probe changes nothing.
    let due = m.probes_due(Mono::from_millis(9000));
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].0, g3);
    assert!(
        m.probes_due(Mono::from_millis(9100)).is_empty(),
        "at most one per interval"
    );
    m.on_connect(Mono::from_millis(9100), &g3, Incarnation(1), false);
    assert_eq!(m.probes_due(Mono::from_millis(9250)).len(), 1);
    // A successful probe: back, as a flap (held down), then placeable.
    m.on_connect(Mono::from_millis(9300), &g3, Incarnation(1), true);
    assert!(matches!(
        m.route(Mono::from_millis(9300), Some((&g3, Incarnation(1)))),
        OwnerRoute::Alive(_)
    ));
    assert!(m.probes_due(Mono::from_millis(9600)).is_empty());
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 9300, 10000);
    assert_eq!(placeable(&m, 10000), ["g1", "g2"], "held down");
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 10000, 11500);
    assert_eq!(placeable(&m, 11500), ["g1", "g2", "g3"]);
}

#[test]
fn a_silent_death_is_undone_by_heartbeats_alone() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 2500);
    assert_eq!(died.len(), 1);
    assert!(
        m.probes_due(Mono::from_millis(2500)).is_empty(),
        "silence needs no probe"
    );
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 2500, 2600);
    let g3 = NodeId::new("g3").unwrap();
    assert!(matches!(
        m.route(Mono::from_millis(2600), Some((&g3, Incarnation(1)))),
        OwnerRoute::Alive(_)
    ));
}

/// Issue 18 A2: silence is ambiguous (a pause, a stalled host), a closed
/// stream is not. A member dead by silence alone answers RESUMEs for it
/// with `owner_unreachable` (retry) until `silence_grace` has passed since
/// its death; only then `owner_lost`. A member back within the grace
/// serves its sessions again.
#[test]
fn a_silent_owner_is_unreachable_until_certainly_gone() {
    let cfg = MembershipConfig::default();
    let grace = cfg.silence_grace;
    assert_eq!(grace, 3 * cfg.failure_timeout);
    let mut m = Membership::new(cfg, Mono::ZERO);
    // Past the warm-up (3 s), when an owner may be lost.
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 4000);
    // g3 pauses: its last heartbeat was at 3,750 ms.
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 4000, 5300);
    assert_eq!(died.len(), 1);
    let g3 = NodeId::new("g3").unwrap();
    let route = |m: &Membership, ms| m.route(Mono::from_millis(ms), Some((&g3, Incarnation(1))));
    assert_eq!(
        route(&m, 5300),
        OwnerRoute::Unreachable,
        "just dead by silence"
    );
    // Its death was at most at 4,800 ms (3,750 + failure timeout + a tick).
    run(&mut m, &[("g1", 1), ("g2", 1)], 5300, 7700);
    assert_eq!(route(&m, 7700), OwnerRoute::Unreachable, "inside the grace");
    run(&mut m, &[("g1", 1), ("g2", 1)], 7700, 8000);
    assert_eq!(route(&m, 8000), OwnerRoute::Lost, "certainly gone");
    // Another incarnation of the same node is not ambiguous: lost at once.
    assert_eq!(
        m.route(Mono::from_millis(5300), Some((&g3, Incarnation(2)))),
        OwnerRoute::Lost
    );
}

#[test]
fn a_paused_owner_back_within_the_grace_serves_its_sessions() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    // Paused for 2 x failure timeout.
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 3000);
    assert_eq!(died.len(), 1);
    let g3 = NodeId::new("g3").unwrap();
    assert_eq!(
        m.route(Mono::from_millis(2900), Some((&g3, Incarnation(1)))),
        OwnerRoute::Unreachable
    );
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 3000, 3300);
    assert!(matches!(
        m.route(Mono::from_millis(3300), Some((&g3, Incarnation(1)))),
        OwnerRoute::Alive(_)
    ));
}

/// Issue 18 M5: the mass-death guard had no exit. After a real failure of
/// most gateways the dead stayed alive for ever and `/readyz` stayed 503.
/// The guard now holds for `mass_death_hold` (10 × failure timeout); a
/// majority still silent after that is dead.
#[test]
fn a_real_majority_failure_is_accepted_after_the_guard_holds() {
    let cfg = MembershipConfig::default();
    let hold = cfg.mass_death_hold;
    assert_eq!(hold, 10 * cfg.failure_timeout);
    let mut m = Membership::new(cfg, Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    // g2 and g3 are killed silently; g1 lives.
    let died = run(&mut m, &[("g1", 1)], 1000, 5000);
    assert!(died.is_empty(), "guarded at first");
    assert!(m.is_unhealthy());
    // The guard began about a failure timeout after the kill (~1.8 s).
    let died = run(&mut m, &[("g1", 1)], 5000, 13_000);
    assert_eq!(
        died.len(),
        2,
        "accepted once the guard has held long enough"
    );
    assert!(!m.is_unhealthy(), "ready again");
    assert_eq!(placeable(&m, 13_000), ["g1"]);
}

/// Issue 18 L1: a gateway that reconnected has two streams for a moment;
/// the late close of the older one is not the gateway going away.
#[test]
fn a_late_close_of_an_older_stream_is_no_death() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    let g2 = NodeId::new("g2").unwrap();
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 50);
    m.on_stream_opened(&g2, Incarnation(1)); // stream A
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 50, 1000);
    m.on_stream_opened(&g2, Incarnation(1)); // stream B, after a reconnect
    m.on_stream_closed(Mono::from_millis(1000), &g2, Incarnation(1)); // A, late
    // B's next heartbeats are slow (700 ms, inside the failure timeout).
    let died = run(&mut m, &[("g1", 1), ("g3", 1)], 1000, 1700);
    assert!(died.is_empty(), "{died:?}");
    // B closes too: now the gateway is gone.
    m.on_stream_closed(Mono::from_millis(1700), &g2, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g3", 1)], 1700, 2600);
    assert_eq!(died.len(), 1);
}

/// Issue 18 L4: a certified gateway reconnecting with a new incarnation
/// each time left one tombstone per incarnation for 60 failure timeouts:
/// memory grew with its reconnect rate. A node keeps its newest
/// `TOMBSTONES_PER_NODE` tombstones; the most recent old incarnation is
/// still refused.
#[test]
fn tombstones_per_node_are_bounded() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    for inc in 1..=1_000u64 {
        let now = Mono::from_millis(inc);
        assert_eq!(
            m.on_heartbeat(now, &hb("g1", inc)),
            HeartbeatVerdict::Accepted
        );
    }
    assert!(
        m.tombstone_count() <= TOMBSTONES_PER_NODE,
        "{} tombstones for one node",
        m.tombstone_count()
    );
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(1_001), &hb("g1", 999)),
        HeartbeatVerdict::Superseded
    );
}

/// Issue 18 A3: an older incarnation never supersedes a newer one, in
/// whichever order a router hears them (a router that restarted may hear
/// the old, paused process first).
#[test]
fn an_older_ordered_incarnation_never_supersedes_a_newer_one() {
    let g1 = NodeId::new("g1").unwrap();
    for first_old in [false, true] {
        let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
        let (old, new) = (hb("g1", 100), hb("g1", 200));
        let order = if first_old {
            [&old, &new]
        } else {
            [&new, &old]
        };
        let verdicts: Vec<_> = order
            .iter()
            .enumerate()
            .map(|(i, h)| m.on_heartbeat(Mono::from_millis(10 * i as u64), h))
            .collect();
        let want = if first_old {
            vec![HeartbeatVerdict::Accepted, HeartbeatVerdict::Accepted]
        } else {
            vec![HeartbeatVerdict::Accepted, HeartbeatVerdict::Superseded]
        };
        assert_eq!(verdicts, want, "old first: {first_old}");
        // Either way the old one is refused from now on, tombstones or not.
        assert_eq!(
            m.on_heartbeat(Mono::from_millis(100_000), &old),
            HeartbeatVerdict::Superseded
        );
        assert!(matches!(
            m.route(Mono::from_millis(100_000), Some((&g1, Incarnation(200)))),
            OwnerRoute::Alive(_) | OwnerRoute::Unreachable
        ));
    }
}

/// Rolling upgrade: between unordered incarnations (a gateway one version
/// older), the newest to arrive still wins, as before.
#[test]
fn unordered_incarnations_keep_arrival_order() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    assert_eq!(
        m.on_heartbeat(Mono::ZERO, &legacy_hb("g1", 200)),
        HeartbeatVerdict::Accepted
    );
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(10), &legacy_hb("g1", 100)),
        HeartbeatVerdict::Accepted
    );
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(20), &legacy_hb("g1", 200)),
        HeartbeatVerdict::Superseded
    );
    // An upgraded process (ordered) supersedes an unordered one by arrival.
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(30), &hb("g1", 50)),
        HeartbeatVerdict::Accepted
    );
}

/// A dead member, even a newer one, does not lock its node id out (a
/// replacement whose host clock is behind must be able to join).
#[test]
fn a_dead_newer_incarnation_does_not_lock_its_node_id_out() {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    run(&mut m, &[("g1", 200), ("g2", 1)], 0, 1000);
    let died = run(&mut m, &[("g2", 1)], 1000, 3000);
    assert!(died.iter().any(|(n, _)| n.as_str() == "g1"), "{died:?}");
    assert_eq!(
        m.on_heartbeat(Mono::from_millis(3000), &hb("g1", 100)),
        HeartbeatVerdict::Accepted
    );
}

/// Issue 14: connection routing reads a published snapshot instead of
/// locking the membership. Whatever happened (joins, rises, closes,
/// failed connects, silence, supersession, holds, warm-up, suspicion), a
/// snapshot taken after the last event answers exactly as the membership
/// does at any later time, as long as nothing else happened: every
/// time-dependent rule is evaluated when read, not frozen when copied.
/// The snapshot checked is published as the shell publishes it: after an
/// event that changed that member's entry, and after a tick when
/// `tick_publishes` says so (the rule the shell calls).
#[test]
fn the_routing_snapshot_answers_as_the_membership_does() {
    use rand::{Rng, SeedableRng};
    let nodes = ["g1", "g2", "g3", "g4"];
    for seed in 0..50u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
        let mut t = 0u64;
        let mut published = m.routes();
        for _ in 0..300 {
            t += rng.random_range(0..120);
            let now = Mono::from_millis(t);
            let n = nodes[rng.random_range(0..nodes.len())];
            let node = NodeId::new(n).unwrap();
            let inc = Incarnation(rng.random_range(1..3));
            let before = m.route_entry_of(&node);
            let ticked = match rng.random_range(0..11) {
                0..=4 => {
                    let mut h = hb(n, inc.0);
                    h.in_view = rng.random_bool(0.8);
                    h.lease_ok = rng.random_bool(0.9);
                    h.leaving = rng.random_bool(0.05);
                    m.on_heartbeat(now, &h);
                    None
                }
                5 => {
                    m.on_stream_closed(now, &node, inc);
                    None
                }
                6 => {
                    m.on_stream_opened(&node, inc);
                    None
                }
                7 => {
                    m.on_connect(now, &node, inc, rng.random_bool(0.5));
                    None
                }
                8 => {
                    let _ = m.forget(now, &node);
                    None
                }
                _ => Some(m.tick(now)),
            };
            let publish = match ticked {
                Some(died) => m.tick_publishes(&died, &published),
                None => m.route_entry_of(&node) != before,
            };
            if publish {
                published = m.routes();
            }
            let routes = &published;
            // The same answers now and at later times.
            for later in [0u64, 30, 400, 2_500, 30_000] {
                let at = Mono::from_millis(t + later);
                for n in nodes {
                    let node = NodeId::new(n).unwrap();
                    for i in 1..3 {
                        let owner = Some((&node, Incarnation(i)));
                        assert_eq!(
                            routes.route(at, owner),
                            m.route(at, owner),
                            "seed {seed}, t {t}+{later}, {n}/{i}"
                        );
                        assert_eq!(
                            routes.hello_ready(at, &node, Incarnation(i)),
                            m.hello_ready(at, &node, Incarnation(i)),
                            "seed {seed}, t {t}+{later}, {n}/{i}"
                        );
                        assert_eq!(
                            routes.is_placeable(at, &node, Incarnation(i)),
                            m.is_placeable(at, &node, Incarnation(i)),
                            "seed {seed}, t {t}+{later}, {n}/{i}"
                        );
                    }
                }
                assert_eq!(routes.route(at, None), m.route(at, None));
            }
        }
    }
}

fn known(m: &Membership, now_ms: u64) -> Vec<String> {
    m.status(Mono::from_millis(now_ms))
        .iter()
        .map(|s| s.node_id.to_string())
        .collect()
}

/// g1, g2 and g3 live for a second under `cfg`; g3 is the one the test
/// takes out.
fn three_members(cfg: MembershipConfig) -> (Membership, NodeId) {
    let mut m = Membership::new(cfg, Mono::ZERO);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 0, 1000);
    (m, NodeId::new("g3").unwrap())
}

/// g3's heartbeat while it drains, saying it leaves or not.
fn g3_draining(leaving: bool) -> Heartbeat {
    Heartbeat {
        state: NodeState::Draining,
        leaving,
        ..hb("g3", 1)
    }
}

/// A planned scale-in (two of three gateways told to leave, exiting in
/// the same step) is not a mass death: members that said they drain are
/// expected to go. The guard used to count them, marked the router
/// unhealthy (`/readyz` 503 on every router at once) and held their deaths
/// back for `mass_death_hold`.
#[test]
fn gateways_that_said_they_drain_do_not_trip_the_mass_death_guard() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let g2 = NodeId::new("g2").unwrap();
    let g2_draining = Heartbeat {
        node_id: g2.clone(),
        ..g3_draining(true)
    };
    m.on_stream_opened(&g2, Incarnation(1));
    m.on_stream_opened(&g3, Incarnation(1));
    for (from, to) in [(1000, 1250), (1250, 1300)] {
        m.on_heartbeat(Mono::from_millis(from), &g2_draining);
        m.on_heartbeat(Mono::from_millis(from), &g3_draining(true));
        run(&mut m, &[("g1", 1)], from, to);
    }
    m.on_stream_closed(Mono::from_millis(1300), &g2, Incarnation(1));
    m.on_stream_closed(Mono::from_millis(1300), &g3, Incarnation(1));
    let mut died = run(&mut m, &[("g1", 1)], 1300, 1900);
    died.sort();
    assert_eq!(died, vec![(g2, Incarnation(1)), (g3, Incarnation(1))]);
    assert!(!m.is_unhealthy());
}

/// ...but the guard still protects the others: two gateways draining
/// and one Ready, all silent at once (this router's own network flapped):
/// the guard holds every death, the Ready one's included. Counting only
/// the members that did not say they drain left one "live" member, below
/// the guard's minimum of two, and all three died.
#[test]
fn the_guard_still_holds_when_draining_and_ready_members_go_silent_together() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let g2 = NodeId::new("g2").unwrap();
    let g2_draining = Heartbeat {
        node_id: g2.clone(),
        ..g3_draining(false)
    };
    for t in [1000, 1250] {
        m.on_heartbeat(Mono::from_millis(t), &g2_draining);
        m.on_heartbeat(Mono::from_millis(t), &g3_draining(false));
        m.on_heartbeat(Mono::from_millis(t), &hb("g1", 1));
    }
    let _ = g3;
    // Nothing arrives from anyone after 1250.
    let died = run(&mut m, &[], 1300, 3500);
    assert!(died.is_empty(), "{died:?}");
    assert!(m.is_unhealthy());
}

#[test]
fn a_gateway_that_left_is_forgotten() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    // g3 is taken out: it drains saying it leaves, then exits.
    let draining = g3_draining(true);
    m.on_stream_opened(&g3, Incarnation(1));
    for (from, to) in [(1000, 1250), (1250, 1300)] {
        m.on_heartbeat(Mono::from_millis(from), &draining);
        run(&mut m, &[("g1", 1), ("g2", 1)], from, to);
    }
    m.on_stream_closed(Mono::from_millis(1300), &g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1300, 1900);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(known(&m, 1900), ["g1", "g2", "g3"], "dead, still known");
    let published = m.routes();
    // It left: forgotten soon after (not alive, not reported at all).
    run(&mut m, &[("g1", 1), ("g2", 1)], 1900, 3000);
    assert_eq!(known(&m, 3000), ["g1", "g2"]);
    assert_eq!(
        m.route(Mono::from_millis(3000), Some((&g3, Incarnation(1)))),
        OwnerRoute::Lost
    );
    // The snapshot connections read is published again, without it.
    assert!(m.tick_publishes(&[], &published));
    assert_eq!(m.routes().members.len(), 2);
    // Back after all (within the flap memory): held down like any flap.
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 2)], 3000, 4000);
    assert_eq!(placeable(&m, 4000), ["g1", "g2"], "held down");
}

/// A plain drain (SIGTERM, a restart) is not a departure: the gateway may
/// be meant to come back, so it is remembered like a crash.
#[test]
fn a_gateway_that_drained_without_leaving_is_remembered() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let draining = g3_draining(false);
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_heartbeat(Mono::from_millis(1000), &draining);
    run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 1300);
    m.on_stream_closed(Mono::from_millis(1300), &g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1300, 10_000);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(known(&m, 10_000), ["g1", "g2", "g3"]);
}

/// A member whose heartbeat stream is still open is never forgotten, even
/// silent past every bound: it may speak again as the same member.
#[test]
fn a_member_with_a_stream_open_is_not_forgotten() {
    let cfg = MembershipConfig {
        forget_failed_after: Duration::from_secs(5),
        ..MembershipConfig::default()
    };
    let (mut m, g3) = three_members(cfg);
    m.on_stream_opened(&g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 20_000);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(known(&m, 20_000), ["g1", "g2", "g3"]);
}

#[test]
fn a_failed_gateway_is_remembered_until_forget_failed_after() {
    let cfg = MembershipConfig {
        forget_failed_after: Duration::from_secs(60),
        ..MembershipConfig::default()
    };
    let mut m = Membership::new(cfg, Mono::ZERO);
    run(
        &mut m,
        &[("g1", 1), ("g2", 1), ("g3", 1), ("g4", 1)],
        0,
        1000,
    );
    let (g3, g4) = (NodeId::new("g3").unwrap(), NodeId::new("g4").unwrap());
    // g3 crashes (its stream closes while READY).
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_stream_closed(Mono::from_millis(1000), &g3, Incarnation(1));
    // g4's client port stops answering while its heartbeats go on: dead,
    // but heard from, so never forgotten.
    for t in [1000, 1100, 1200] {
        m.on_connect(Mono::from_millis(t), &g4, Incarnation(1), false);
    }
    let died = run(&mut m, &[("g1", 1), ("g2", 1), ("g4", 1)], 1000, 59_000);
    assert_eq!(died.len(), 2, "{died:?}");
    assert_eq!(known(&m, 59_000), ["g1", "g2", "g3", "g4"]);
    run(&mut m, &[("g1", 1), ("g2", 1), ("g4", 1)], 59_000, 62_000);
    assert_eq!(known(&m, 62_000), ["g1", "g2", "g4"]);
    // A new process of the forgotten node id joins, held down first as
    // after any flap.
    let all = [("g1", 1), ("g2", 1), ("g4", 1), ("g3", 2)];
    run(&mut m, &all, 62_000, 63_000);
    assert_eq!(placeable(&m, 63_000), ["g1", "g2"]);
    run(&mut m, &all, 63_000, 65_000);
    assert_eq!(placeable(&m, 65_000), ["g1", "g2", "g3"]);
}

#[test]
fn a_gateway_that_went_silent_while_leaving_keeps_its_grace() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let draining = g3_draining(true);
    m.on_heartbeat(Mono::from_millis(1000), &draining);
    // Silence (a pause, maybe): dead after failure_timeout, "retry" for
    // its RESUMEs during the grace, so still known until the grace ends.
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 2300);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    run(&mut m, &[("g1", 1), ("g2", 1)], 2300, 4000);
    assert_eq!(
        m.route(Mono::from_millis(4000), Some((&g3, Incarnation(1)))),
        OwnerRoute::Unreachable
    );
    assert_eq!(known(&m, 4000), ["g1", "g2", "g3"]);
    run(&mut m, &[("g1", 1), ("g2", 1)], 4000, 6000);
    assert_eq!(known(&m, 6000), ["g1", "g2"]);
}

/// An operator forgets a gateway whose host is gone (it never said it was
/// leaving) at once; one that is alive, still has a heartbeat stream open
/// or still heartbeats is refused, and a return is held down.
#[test]
fn an_operator_forgets_only_a_member_nothing_says_is_there() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let at = Mono::from_millis;
    let nobody = NodeId::new("g9").unwrap();
    assert_eq!(m.forget(at(1000), &nobody), Err(NotForgotten::Unknown));
    assert_eq!(m.forget(at(1000), &g3), Err(NotForgotten::Alive));
    // g3's host dies: its stream closes, then it is declared dead.
    m.on_stream_opened(&g3, Incarnation(1));
    m.on_stream_closed(at(1000), &g3, Incarnation(1));
    // Dead, but its (second) stream is still open: it may speak again.
    m.on_stream_opened(&g3, Incarnation(1));
    let died = run(&mut m, &[("g1", 1), ("g2", 1)], 1000, 2100);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(m.forget(at(2100), &g3), Err(NotForgotten::StillHeard));
    m.on_stream_closed(at(2100), &g3, Incarnation(1));
    assert_eq!(m.forget(at(2100), &g3), Ok(Incarnation(1)));
    assert_eq!(known(&m, 2100), ["g1", "g2"]);
    // Once the warm-up (3 s) is over, its sessions are lost.
    run(&mut m, &[("g1", 1), ("g2", 1)], 2100, 3000);
    assert_eq!(
        m.route(at(3000), Some((&g3, Incarnation(1)))),
        OwnerRoute::Lost
    );
    // Back after all: held down like any flap.
    run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 2)], 3000, 4000);
    assert_eq!(placeable(&m, 4000), ["g1", "g2"], "held down");

    // One that died for its client port but still heartbeats is heard.
    let (mut m, g3) = three_members(MembershipConfig::default());
    for t in [1000, 1100, 1200] {
        m.on_connect(at(t), &g3, Incarnation(1), false);
    }
    let died = run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 1200, 4300);
    assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
    assert_eq!(m.forget(at(4300), &g3), Err(NotForgotten::StillHeard));
}

/// One failed connect (a lost SYN) to a gateway that then gets no other
/// connect: the router probes it, the probe connects, and it stays alive.
/// Before, it died `3 × failure_timeout` later for want of a good connect.
#[test]
fn one_failed_connect_is_probed_not_fatal() {
    let (mut m, g3) = three_members(MembershipConfig::default());
    let at = Mono::from_millis;
    m.on_connect(at(1000), &g3, Incarnation(1), false);
    let mut probed = 0;
    let mut t = 1000;
    while t < 4300 {
        t += 50;
        for (n, inc, _) in m.probes_due(at(t)) {
            probed += 1;
            m.on_connect(at(t), &n, inc, true);
        }
        run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], t - 50, t);
    }
    assert_eq!(probed, 1, "one probe, then nothing to probe");
    assert_eq!(placeable(&m, 4300), ["g1", "g2", "g3"]);

    // Probes that keep failing are what kills it.
    let (mut m, g3) = three_members(MembershipConfig::default());
    m.on_connect(at(1000), &g3, Incarnation(1), false);
    let mut died = Vec::new();
    let mut t = 1000;
    while t < 4300 {
        t += 50;
        for (n, inc, _) in m.probes_due(at(t)) {
            m.on_connect(at(t), &n, inc, false);
        }
        died.extend(run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], t - 50, t));
    }
    assert_eq!(died, vec![(g3, Incarnation(1))]);
}

/// A member that died for its client port heartbeats on after its death;
/// once it stops too (its host is gone), it is forgotten like any other,
/// and an operator may forget it.
#[test]
fn a_member_that_died_unreachable_and_then_fell_silent_is_forgotten() {
    let at = Mono::from_millis;
    let fell_silent = || {
        let cfg = MembershipConfig {
            forget_failed_after: Duration::from_secs(5),
            ..MembershipConfig::default()
        };
        let (mut m, g3) = three_members(cfg);
        for t in [1000, 1100, 1200] {
            m.on_connect(at(t), &g3, Incarnation(1), false);
        }
        let died = run(&mut m, &[("g1", 1), ("g2", 1), ("g3", 1)], 1200, 4500);
        assert_eq!(died, vec![(g3.clone(), Incarnation(1))]);
        assert_eq!(m.forget(at(4500), &g3), Err(NotForgotten::StillHeard));
        run(&mut m, &[("g1", 1), ("g2", 1)], 4500, 6000);
        (m, g3)
    };
    let (mut m, g3) = fell_silent();
    assert_eq!(m.forget(at(6000), &g3), Ok(Incarnation(1)));
    let (mut m, _) = fell_silent();
    run(&mut m, &[("g1", 1), ("g2", 1)], 6000, 12_000);
    assert_eq!(known(&m, 12_000), ["g1", "g2"]);
}
