//! Gateway failures in a real cluster (router + gateways as processes):
//! SIGKILL, SIGSTOP, a restart under the same node id, a graceful drain and
//! a flapping node. Only the failed owner's sessions re-handshake, always
//! explicitly, and nothing is ever placed on a node that is not placeable.
//!
//! Tests here measure detection times, so they run one at a time.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster};
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::{eventually, http_get};
use jvpn_loadtest::invariants;
use nix::sys::signal::Signal;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls the router until `node` is not alive; returns how long it took.
async fn detection(c: &LocalCluster, node: &str, from: Instant) -> Duration {
    loop {
        if !c.routers[0].alive().await.unwrap().contains(node) {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < Duration::from_secs(10),
            "{node} never died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn unplaceable(c: &LocalCluster) -> f64 {
    c.router_metric("jvpn_router_routed_to_unplaceable_total", &[])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_gateway_rehandshakes_exactly_its_sessions_explicitly() {
    let _serial = SERIAL.lock().await;
    let c = common::cluster(ClusterOptions::default()).await;
    let victim = "g2";
    let (fleet, before, who) = common::settled_fleet(&c, 300, victim).await;
    assert!(who.len() > 50, "g2 holds {} of 300", who.len());

    let t0 = Instant::now();
    c.gateway(victim).unwrap().signal(Signal::SIGKILL).unwrap();
    let detected = detection(&c, victim, t0).await;
    // Stream closed: fast death after 2 × 250 ms; slack for a loaded 2-core box.
    assert!(
        detected <= Duration::from_millis(1_000),
        "detected after {detected:?}"
    );
    common::wait_moved(&fleet, &who, victim, t0).await;

    let after = fleet.snapshots();
    common::assert_survivors_untouched(&before, &after, &who);
    let mut failover: Vec<u64> = Vec::new();
    for i in &who {
        let (b, a) = (&before[*i], &after[*i]);
        assert_eq!(a.rehandshakes, b.rehandshakes + 1, "agent {i}");
        assert_eq!(
            a.rehandshake_reasons.get("owner_lost"),
            Some(
                &(b.rehandshake_reasons
                    .get("owner_lost")
                    .copied()
                    .unwrap_or(0)
                    + 1)
            ),
            "agent {i} re-handshaked explicitly: {:?}",
            a.rehandshake_reasons
        );
        failover.push(a.established_at.unwrap().duration_since(t0).as_millis() as u64);
    }
    failover.sort_unstable();
    let p99 = failover[(failover.len() - 1) * 99 / 100];
    assert!(p99 <= 2_000, "failover p99 {p99} ms");
    eprintln!(
        "detection {} ms; failover p50 {} p99 {p99} max {} ms over {} sessions",
        detected.as_millis(),
        failover[failover.len() / 2],
        failover[failover.len() - 1],
        failover.len()
    );
    assert_eq!(unplaceable(&c).await, 0.0);
    let reports = fleet.close().await;
    let inv = invariants::from_agents(&reports);
    assert!(inv.all_zero(), "{inv:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_is_silent_death_then_the_node_is_readmitted_after_hold_down() {
    let _serial = SERIAL.lock().await;
    let c = common::cluster(ClusterOptions::default()).await;
    let victim = "g3";
    let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;

    // New HELLOs keep arriving during the pause.
    let load = common::HelloLoad::start(&c, 500, Duration::from_millis(30));

    let t0 = Instant::now();
    c.gateway(victim).unwrap().signal(Signal::SIGSTOP).unwrap();
    let detected = detection(&c, victim, t0).await;
    // failure_timeout (1 s) + one interval (250 ms), plus slack.
    assert!(
        detected <= Duration::from_millis(1_750),
        "detected after {detected:?}"
    );
    common::wait_moved(&fleet, &who, victim, t0).await;
    let after = fleet.snapshots();
    common::assert_survivors_untouched(&before, &after, &who);
    // The paused owner's spliced connections were cut by the router when it
    // died (its agents would otherwise wait for their own ping timeout).
    let cut = c
        .router_metric("jvpn_router_connections_closed_on_member_death_total", &[])
        .await
        .unwrap();
    assert!(
        cut >= who.len() as f64,
        "{cut} cut for {} sessions",
        who.len()
    );

    c.gateway(victim).unwrap().signal(Signal::SIGCONT).unwrap();
    // Same incarnation back from the dead: a flap, held down 2 s, then placeable.
    let all: Vec<String> = (0..3).map(jvpn_loadtest::cluster::node_name).collect();
    c.wait_placeable(&all, Duration::from_secs(10))
        .await
        .unwrap();
    let placed = load.stop().await;
    assert!(!placed.is_empty());
    assert_eq!(unplaceable(&c).await, 0.0);
    let reports = fleet.close().await;
    assert!(invariants::from_agents(&reports).all_zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_id_supersedes_its_old_incarnation_which_exits_75() {
    let _serial = SERIAL.lock().await;
    let mut c = common::cluster(ClusterOptions::default()).await;
    let victim = "g2";
    let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;

    // The old process is frozen (it cannot notice anything), then a new
    // process starts as g2: a new incarnation.
    c.gateway(victim).unwrap().signal(Signal::SIGSTOP).unwrap();
    let old_index = c.gateways.iter().position(|(n, _)| n == victim).unwrap();
    let t0 = Instant::now();
    c.start_gateway(victim).await.unwrap();
    wait_moved_or_same_node(&fleet, &who, t0).await;
    let after = fleet.snapshots();
    common::assert_survivors_untouched(&before, &after, &who);
    for i in &who {
        assert!(
            after[*i].rehandshake_reasons.contains_key("owner_lost"),
            "{:?}",
            after[*i].rehandshake_reasons
        );
    }
    // None resumed on the new process.
    let new_gw = c.gateway(victim).unwrap();
    assert_eq!(
        new_gw
            .metric("jvpn_gateway_resumes_total", &[("result", "ok")])
            .await
            .unwrap(),
        0.0
    );
    // The old incarnation wakes up, heartbeats, is told `superseded`, exits 75.
    let (_, old) = &mut c.gateways[old_index];
    old.signal(Signal::SIGCONT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), old.wait())
        .await
        .expect("superseded gateway exits")
        .unwrap();
    assert_eq!(status.code(), Some(75), "{}", old.log());
    assert!(
        c.router_metric("jvpn_router_heartbeats_total", &[("verdict", "superseded")])
            .await
            .unwrap()
            >= 1.0
    );
    let reports = fleet.close().await;
    assert!(invariants::from_agents(&reports).all_zero());
}

/// Victims re-established after `t0` (possibly on the new incarnation of the
/// same node id: a fresh HELLO may land anywhere).
async fn wait_moved_or_same_node(fleet: &Fleet, who: &BTreeSet<usize>, t0: Instant) {
    eventually(Duration::from_secs(30), "victims re-established", || {
        let snaps = fleet.snapshots();
        let done = who
            .iter()
            .all(|i| snaps[*i].established_at.is_some_and(|t| t > t0));
        async move { done }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_spread_goaways_and_sessions_move_elsewhere() {
    let _serial = SERIAL.lock().await;
    let drain_ms = 6_000u64;
    let mut c = common::cluster(ClusterOptions {
        gateway_env: vec![(
            "JVPN_GATEWAY__TIMEOUTS__DRAIN_TIMEOUT_MS".into(),
            drain_ms.to_string(),
        )],
        ..ClusterOptions::default()
    })
    .await;
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), 60, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(60))
        .await
        .unwrap();
    let before = fleet.snapshots();
    let victim = "g1";
    let who = common::victims(&before, victim);
    assert!(who.len() >= 5, "{}", who.len());

    let t0 = Instant::now();
    let admin = c.gateway(victim).unwrap().admin_addr;
    c.gateway(victim).unwrap().signal(Signal::SIGTERM).unwrap();
    eventually(Duration::from_millis(500), "readyz 503", || async {
        matches!(http_get(admin, "/readyz").await, Ok((503, _)))
    })
    .await
    .unwrap();
    // Routers stop placing on it once they saw DRAINING.
    eventually(Duration::from_secs(3), "g1 not placeable", || async {
        !c.routers[0].placeable().await.unwrap().contains(victim)
    })
    .await
    .unwrap();
    let acked = t0.elapsed();
    // Sessions the draining gateway had created by the acknowledgement.
    let hellos_at_ack = c
        .gateway(victim)
        .unwrap()
        .metric("jvpn_gateway_hellos_total", &[("result", "ok")])
        .await
        .unwrap();
    common::wait_moved(&fleet, &who, victim, t0).await;
    let after = fleet.snapshots();
    common::assert_survivors_untouched(&before, &after, &who);
    let mut moved_at: Vec<Duration> = who
        .iter()
        .map(|i| {
            let a = &after[*i];
            assert_eq!(a.go_aways, 1, "agent {i}");
            assert_eq!(a.rehandshake_reasons.get("go_away"), Some(&1), "agent {i}");
            a.established_at.unwrap().duration_since(t0)
        })
        .collect();
    moved_at.sort();
    let half = Duration::from_millis(drain_ms / 2);
    let (first, last) = (moved_at[0], moved_at[moved_at.len() - 1]);
    // Spread over the first half (after the routers' acknowledgement), not all at once.
    assert!(
        last <= half + Duration::from_millis(1_500),
        "last moved at {last:?}"
    );
    assert!(
        last - first >= half / 3,
        "GoAways not spread: {first:?}..{last:?} (acked after {acked:?})"
    );
    let (_, gw) = c.gateways.iter_mut().find(|(n, _)| n == victim).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Its event file (flushed at exit) shows no session created after the
    // routers acknowledged DRAINING.
    let events = std::fs::read_to_string(&gw.events_path).unwrap();
    let created = events.matches("\"handshake_ok\"").count() as f64;
    assert_eq!(
        created, hellos_at_ack,
        "a session was placed on the draining gateway"
    );
    assert_eq!(unplaceable(&c).await, 0.0);
    let reports = fleet.close().await;
    assert!(invariants::from_agents(&reports).all_zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_gateway_changes_the_ring_a_bounded_number_of_times() {
    let _serial = SERIAL.lock().await;
    let c = common::cluster(ClusterOptions::default()).await;
    let changes_before = c.routers[0].ring().await.unwrap()["ring_changes"]
        .as_u64()
        .unwrap();
    let load = common::HelloLoad::start(&c, 900, Duration::from_millis(50));
    let flapper = c.gateway("g3").unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut stopped = false;
    let mut tick = tokio::time::interval(Duration::from_millis(1_500));
    tick.tick().await;
    while Instant::now() < end {
        tick.tick().await;
        stopped = !stopped;
        flapper
            .signal(if stopped {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            })
            .unwrap();
    }
    if stopped {
        flapper.signal(Signal::SIGCONT).unwrap();
    }
    let hellos = load.stop().await.len();
    let changes = c.routers[0].ring().await.unwrap()["ring_changes"]
        .as_u64()
        .unwrap()
        - changes_before;
    eprintln!("{changes} ring changes, {hellos} HELLOs placed during 20 s of flapping");
    assert!(changes <= 8, "{changes} ring changes");
    assert!(hellos > 50);
    assert_eq!(unplaceable(&c).await, 0.0);
}
