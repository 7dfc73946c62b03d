//! Issue 18 A1: with the default policy, clients on flappy networks and
//! router crash loops never lose their session. Real processes, real TLS,
//! the agent's own keep-alive loop.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use jvpn_agent::{AgentReport, Command};
use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::eventually;
use jvpn_loadtest::invariants;

/// Waits until agent `i` resumed once more than `before`, failing at once if
/// it re-handshook instead.
async fn resumed_or_lost(fleet: &Fleet, i: usize, before: &AgentReport, what: &str) {
    eventually(Duration::from_secs(90), what, || {
        let now = fleet.agents[i].snapshot();
        assert_eq!(
            now.rehandshakes, before.rehandshakes,
            "{what}: re-handshake {:?}\n{:?}",
            now.rehandshake_reasons, now.timeline
        );
        let done = now.resumes_ok > before.resumes_ok;
        async move { done }
    })
    .await
    .unwrap();
}

/// Twelve network changes in under 25 s (one and a half times the default
/// budget of 8 switches per minute): every one ends in a RESUME on the same
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_network_changes_every_two_seconds_keeps_its_session() {
    let env = common::start("").await;
    let fleet = Fleet::start(&env.pki, &[env.gw.client_addr], 2, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(20))
        .await
        .unwrap();
    for jump in 0..12 {
        tokio::time::sleep(Duration::from_millis(1_600)).await;
        let before = fleet.snapshots();
        fleet.each(|| Command::Jump).await;
        for (i, b) in before.iter().enumerate() {
            resumed_or_lost(&fleet, i, b, &format!("agent {i} jump {jump}")).await;
        }
    }
    let reports = fleet.close().await;
    for r in &reports {
        assert_eq!(r.resumes_ok, 12, "{:?}", r.resumes_rejected);
        // Recoveries, not chosen switches: never refused for flapping.
        assert!(r.resumes_rejected.is_empty(), "{:?}", r.resumes_rejected);
    }
    assert!(invariants::from_agents(&reports).all_zero());
}

/// A switch away from a transport the gateway still holds does count; when
/// the gateway refuses it with a wait longer than the agent's copy of the
/// TTL, the agent waits for the gateway's extended deadline instead of
/// giving the session up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_switch_waits_for_the_gateways_extended_deadline() {
    let env = common::start(
        "[policy]\nheartbeat_interval_ms = 250\nheartbeat_timeout_ms = 1000\n\
         transport_lost_ttl_ms = 2000\nswitch_cooldown_ms = 5000\n",
    )
    .await;
    let fleet = Fleet::start(&env.pki, &[env.gw.client_addr], 1, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(20))
        .await
        .unwrap();
    // The old transport stays open and attached at the gateway: chosen
    // switches. The second comes inside the 5 s cooldown, which is longer
    // than the 2 s transport-lost TTL.
    for jump in 0..2 {
        let before = fleet.agents[0].snapshot();
        fleet.each(|| Command::StallAndJump).await;
        resumed_or_lost(&fleet, 0, &before, &format!("switch {jump}")).await;
    }
    let reports = fleet.close().await;
    assert_eq!(reports[0].resumes_ok, 2);
    assert!(
        reports[0].resumes_rejected.contains_key("cooldown_active"),
        "the second switch was refused first: {:?}",
        reports[0].resumes_rejected
    );
    assert!(invariants::from_agents(&reports).all_zero());
}

/// Both routers killed and restarted alternately every 3 s for 90 s, no
/// gateway touched: no session is lost and none re-handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_crash_loop_costs_no_session() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 2,
        routers: 2,
        spare_gateways: 0,
        ..ClusterOptions::default()
    })
    .await;
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), 20, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(30))
        .await
        .unwrap();
    // Where each session lives before the loop: a move during it would
    // show as another node at the end.
    let before = fleet.snapshots();
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.restart_router(kills % 2).await.unwrap();
        kills += 1;
        let lost = fleet.rehandshakes();
        assert_eq!(lost, 0, "after {kills} router kills\n{}", c.logs());
    }
    // Every session is attached again after the loop.
    eventually(Duration::from_secs(30), "every session attached", || {
        let echoes = fleet.echo_all("after the crash loop");
        async move { echoes.await.1 == 0 }
    })
    .await
    .unwrap();
    let reports = fleet.close().await;
    for (b, r) in before.iter().zip(&reports) {
        assert_eq!(r.rehandshakes, 0, "{:?}", r.rehandshake_reasons);
        assert_eq!(r.node_id, b.node_id, "resumed on its owner");
    }
    assert!(
        reports.iter().map(|r| r.resumes_ok).sum::<u64>() >= 20,
        "sessions really lost transports"
    );
    assert!(invariants::from_agents(&reports).all_zero());
}

/// A router that accepts connections and then says nothing (hung, or
/// swamped past answering): a RESUME through it goes on to the next router
/// once the handshake times out. It used to be tried again and again until
/// the session's TTL ran out, and then the agent re-handshook through the
/// next router while the owner still held the session (design note 66).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_router_is_stepped_around_by_a_resume() {
    let c = common::cluster(ClusterOptions {
        gateways: 1,
        routers: 2,
        spare_gateways: 0,
        ..ClusterOptions::default()
    })
    .await;
    let routers = c.router_addrs();
    let first = jvpn_loadtest::faultproxy::FaultProxy::start(routers[0])
        .await
        .unwrap();
    let fleet = Fleet::start(&c.pki, &[first.addr, routers[1]], 1, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(30))
        .await
        .unwrap();
    let before = fleet.agents[0].snapshot();
    // The session was made through the first router, its home.
    assert_eq!(first.open_connections(), 1, "{:?}", before.timeline);
    first.set_mode(jvpn_loadtest::faultproxy::Mode::Blackhole);
    fleet.each(|| Command::Jump).await;
    resumed_or_lost(&fleet, 0, &before, "resumed through the other router").await;
    let reports = fleet.close().await;
    assert_eq!(reports[0].rehandshakes, 0, "{:?}", reports[0].timeline);
    assert_eq!(reports[0].node_id, before.node_id);
    assert!(invariants::from_agents(&reports).all_zero());
}
