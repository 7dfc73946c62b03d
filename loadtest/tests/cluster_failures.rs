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
use jvpn_loadtest::harness::{eventually, http_get, http_request};
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

/// Whether the router's `/metrics` has a per-gateway series for `node`.
async fn listed(c: &LocalCluster, node: &str) -> Option<f64> {
    let text = c.routers[0].metrics().await.unwrap();
    let series = format!("jvpn_router_member_alive{{node_id=\"{node}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

/// Scale-in: a gateway told to leave (`POST /leave`) drains, exits, and
/// leaves the router's view and its metrics within seconds (no
/// `JvpnGatewayNotAlive` paging for a gateway taken out on purpose). One
/// that only drained (SIGTERM: a restart, maybe) or crashed may come back,
/// so it stays reported not alive until `forget_dead_after_ms`, then goes
/// too. Before, every dead gateway read 0 for the router's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_left_is_forgotten_at_once_and_a_dead_one_after_forget_dead_after() {
    let _serial = SERIAL.lock().await;
    let forget = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "gateway-operator-token-1\n").unwrap();
    let c = common::cluster(ClusterOptions {
        gateways: 4,
        spare_gateways: 0,
        router_env: vec![(
            "JVPN_ROUTER__MEMBERSHIP__FORGET_DEAD_AFTER_MS".into(),
            forget.as_millis().to_string(),
        )],
        gateway_env: vec![
            (
                "JVPN_GATEWAY__TIMEOUTS__DRAIN_TIMEOUT_MS".into(),
                "4000".into(),
            ),
            (
                "JVPN_GATEWAY__ADMIN_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
        ],
        ..ClusterOptions::default()
    })
    .await;
    for n in ["g1", "g2", "g3", "g4"] {
        assert_eq!(listed(&c, n).await, Some(1.0), "{n}\n{}", c.logs());
    }
    // g3 is taken out for good.
    let admin = c.gateway("g3").unwrap().admin_addr;
    let (code, body) = http_request(admin, "POST", "/leave", Some("gateway-operator-token-1"))
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    // Well before `forget`: as one that left, not as one that died.
    eventually(Duration::from_secs(8), "g3 forgotten", || async {
        listed(&c, "g3").await.is_none()
    })
    .await
    .unwrap();
    assert!(
        !c.routers[0]
            .ring()
            .await
            .unwrap()
            .to_string()
            .contains("\"g3\"")
    );
    // g1 drains (SIGTERM), then g2 crashes: both reported not alive, and
    // still so well after their deaths.
    c.gateway("g1").unwrap().signal(Signal::SIGTERM).unwrap();
    c.wait_not_alive("g1", Duration::from_secs(10))
        .await
        .unwrap();
    let g1_dead = Instant::now();
    c.gateway("g2").unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive("g2", Duration::from_secs(5))
        .await
        .unwrap();
    let dead_seen = Instant::now();
    for n in ["g1", "g2"] {
        assert_eq!(listed(&c, n).await, Some(0.0), "{n}");
    }
    // Well past what a gateway that left is given (failure_timeout), the
    // drained one is still reported: a drain alone is not a departure.
    tokio::time::sleep_until((g1_dead + Duration::from_secs(4)).into()).await;
    assert_eq!(
        listed(&c, "g1").await,
        Some(0.0),
        "a drained gateway forgotten early"
    );
    eventually(
        forget + Duration::from_secs(5),
        "g1 and g2 forgotten",
        || async { listed(&c, "g1").await.is_none() && listed(&c, "g2").await.is_none() },
    )
    .await
    .unwrap();
    let kept = dead_seen.elapsed();
    assert!(
        kept + Duration::from_secs(1) >= forget,
        "a dead gateway was forgotten after {kept:?}, before {forget:?}"
    );
    assert_eq!(listed(&c, "g4").await, Some(1.0));
    let known = c.routers[0]
        .metric("jvpn_router_members", &[("state", "known")])
        .await
        .unwrap();
    assert_eq!(known, 1.0);
}

/// A gateway whose host is gone for good never said it was leaving: the
/// operator tells each router to forget it (`POST
/// /members/<node_id>/forget`), and its series go at once instead of after
/// `forget_dead_after_ms` (24 h by default). A live gateway is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_makes_routers_forget_a_dead_gateway_at_once() {
    let _serial = SERIAL.lock().await;
    let (c, _dir) = common::cluster_with_router_token(ClusterOptions {
        gateways: 3,
        spare_gateways: 0,
        ..ClusterOptions::default()
    })
    .await;
    let admin = c.routers[0].admin_addr;
    let token = Some(common::ROUTER_TOKEN);
    let forget = |node: &'static str, bearer: Option<&'static str>| async move {
        http_request(admin, "POST", &format!("/members/{node}/forget"), bearer).await
    };
    for n in ["g1", "g2", "g3"] {
        assert_eq!(listed(&c, n).await, Some(1.0), "{n}\n{}", c.logs());
    }
    let (code, body) = forget("g2", token).await.unwrap();
    assert_eq!(code, 409, "a live gateway: {body}");
    assert!(body.contains("alive"), "{body}");
    c.gateway("g2").unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive("g2", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(listed(&c, "g2").await, Some(0.0));
    assert_eq!(forget("g2", None).await.unwrap().0, 401);
    assert_eq!(
        forget("g2", Some("wrong-token-xxxxxxxx")).await.unwrap().0,
        401
    );
    assert_eq!(forget("g9", token).await.unwrap().0, 404);
    let (code, body) = forget("g2", token).await.unwrap();
    assert_eq!(code, 200, "{body}\n{}", c.logs());
    assert!(body.contains("\"forgotten\":\"g2\""), "{body}");
    // Gone from the series and /ring at once, not after a day.
    eventually(Duration::from_secs(1), "g2's series gone", || async {
        listed(&c, "g2").await.is_none()
    })
    .await
    .unwrap();
    let ring = c.routers[0].ring().await.unwrap().to_string();
    assert!(!ring.contains("\"g2\""), "{ring}");
    // Forgetting twice: there is nothing left to forget.
    assert_eq!(forget("g2", token).await.unwrap().0, 404);
    for n in ["g1", "g3"] {
        assert_eq!(listed(&c, n).await, Some(1.0), "{n}");
    }
}
