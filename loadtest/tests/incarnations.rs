//! Issue 18 A3: incarnations of one node id are ordered, and an older one
//! never wins against a newer one: not after both routers restarted, not
//! after a pause longer than the routers' tombstones live, not under churn.
//! Real processes; the old one is frozen with SIGSTOP while its replacement
//! starts under the same node id.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster};
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::eventually;
use jvpn_loadtest::invariants;
use nix::sys::signal::Signal;

const VICTIM: &str = "g1";

/// Gateways `g1` and `g2` behind `opts.routers` routers, both placeable.
async fn two_gateways(opts: ClusterOptions) -> LocalCluster {
    let c = common::cluster(ClusterOptions {
        gateways: 2,
        spare_gateways: 0,
        ..opts
    })
    .await;
    c.wait_placeable(&both(), Duration::from_secs(15))
        .await
        .unwrap();
    c
}

fn both() -> Vec<String> {
    vec!["g1".to_owned(), "g2".to_owned()]
}

/// Two gateways and two routers; `g1` frozen and replaced by a new process.
/// Returns the cluster and the index of the frozen process.
async fn replaced(router_env: Vec<(String, String)>) -> (LocalCluster, usize) {
    let mut c = two_gateways(ClusterOptions {
        routers: 2,
        router_env,
        ..ClusterOptions::default()
    })
    .await;
    let all = both();
    let old = c.gateways.iter().position(|(n, _)| n == VICTIM).unwrap();
    c.gateway(VICTIM).unwrap().signal(Signal::SIGSTOP).unwrap();
    c.wait_not_alive(VICTIM, Duration::from_secs(10))
        .await
        .unwrap();
    c.start_gateway(VICTIM).await.unwrap();
    c.wait_placeable(&all, Duration::from_secs(20))
        .await
        .unwrap();
    (c, old)
}

/// Sessions attached, some of them on the new `g1`.
async fn fleet_on_new(c: &LocalCluster) -> Fleet {
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), 30, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(fleet.by_node().get(VICTIM).is_some_and(|n| *n > 0));
    fleet
}

/// The old process wakes up and must exit 75, while the new one keeps its
/// sessions: they all resume on it, none re-handshakes.
async fn old_loses(mut c: LocalCluster, old: usize, fleet: Fleet) {
    let load = common::HelloLoad::start(&c, 500, Duration::from_millis(30));
    let (_, old_gw) = &mut c.gateways[old];
    old_gw.signal(Signal::SIGCONT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), old_gw.wait())
        .await
        .unwrap_or_else(|_| panic!("the old incarnation kept running\n{}", c.logs()))
        .unwrap();
    assert_eq!(status.code(), Some(75), "{}", c.gateways[old].1.log());
    // The new process is still serving: its sessions resume on it.
    let before = fleet.snapshots();
    fleet
        .jump_all(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let placed = load.stop_with_incarnations().await;
    for (b, a) in before.iter().zip(fleet.snapshots()) {
        assert_eq!(
            a.rehandshakes, b.rehandshakes,
            "{:?}",
            a.rehandshake_reasons
        );
        assert_eq!(a.node_id, b.node_id, "resumed on its owner");
    }
    let answered: BTreeSet<u64> = placed
        .iter()
        .filter(|(n, _, _)| n == VICTIM)
        .map(|(_, i, _)| *i)
        .collect();
    // The new process's incarnation, as its own events write it.
    let (_, new_gw) = c
        .gateways
        .iter()
        .enumerate()
        .find(|(i, (n, _))| *i != old && n == VICTIM)
        .map(|(_, g)| g)
        .expect("the new process");
    let events = std::fs::read_to_string(&new_gw.events_path).unwrap();
    let new = events
        .lines()
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            u64::from_str_radix(v["incarnation"].as_str()?, 16).ok()
        })
        .expect("the new process wrote events (its sessions)");
    // Placement is random: in a short run the load may miss the victim's
    // node altogether; whatever reached it, the new process answered.
    assert!(!placed.is_empty(), "the HELLO load placed nothing");
    assert!(
        answered.iter().all(|i| *i == new),
        "HELLOs answered by another incarnation of {VICTIM} than the new one \
         ({new:016x}): {answered:x?}"
    );
    let reports = fleet.close().await;
    assert!(invariants::from_agents(&reports).all_zero());
}

/// Variant (a) and (c): both routers restart while the old process is
/// frozen (they forget every tombstone), then it wakes up under HELLO churn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_incarnation_loses_after_both_routers_restarted() {
    let (mut c, old) = replaced(Vec::new()).await;
    let fleet = fleet_on_new(&c).await;
    let before = fleet.resume_counts();
    c.restart_router(0).await.unwrap();
    c.restart_router(1).await.unwrap();
    fleet
        .wait_each_resumed(
            &before,
            Duration::from_secs(30),
            "resumed after the restarts",
        )
        .await
        .unwrap();
    old_loses(c, old, fleet).await;
}

/// Variant (b): the old process stays frozen longer than the routers keep
/// tombstones (60 failure timeouts; 36 s with a 600 ms failure timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_incarnation_loses_after_a_pause_longer_than_tombstones_live() {
    let env = vec![
        (
            "JVPN_ROUTER__MEMBERSHIP__FAILURE_TIMEOUT_MS".to_owned(),
            "600".to_owned(),
        ),
        (
            "JVPN_ROUTER__MEMBERSHIP__LEASE_TIMEOUT_MS".to_owned(),
            "450".to_owned(),
        ),
    ];
    let (c, old) = replaced(env).await;
    let fleet = fleet_on_new(&c).await;
    let tombstones_gone = std::time::Instant::now() + Duration::from_secs(37);
    eventually(Duration::from_secs(60), "tombstones expired", || {
        let done = std::time::Instant::now() >= tombstones_gone;
        let c = &c;
        async move {
            // Keep the routers observed; the clock is what is waited for.
            done && c.routers[0].alive().await.is_ok()
        }
    })
    .await
    .unwrap();
    old_loses(c, old, fleet).await;
}

/// A gateway that no router leased for `cluster.unleased_exit_ms` (here
/// 2 s) exits 75 when it wakes up instead of heartbeating again: routers
/// may have forgotten whatever replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_unleased_for_too_long_exits_instead_of_rejoining() {
    let mut c = two_gateways(ClusterOptions {
        routers: 1,
        gateway_env: vec![(
            "JVPN_GATEWAY__CLUSTER__UNLEASED_EXIT_MS".to_owned(),
            "2000".to_owned(),
        )],
        ..ClusterOptions::default()
    })
    .await;
    let frozen_at = std::time::Instant::now();
    c.gateway(VICTIM).unwrap().signal(Signal::SIGSTOP).unwrap();
    c.wait_not_alive(VICTIM, Duration::from_secs(10))
        .await
        .unwrap();
    // The fault itself: frozen for longer than the limit (not a wait for
    // anything to happen).
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(frozen_at.elapsed())).await;
    let gw = c.gateway_mut(VICTIM).unwrap();
    gw.signal(Signal::SIGCONT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), gw.wait())
        .await
        .expect("the abandoned gateway exits")
        .unwrap();
    assert_eq!(status.code(), Some(75), "{}", gw.log());
    assert!(gw.log().contains("unleased_exit_ms"), "{}", gw.log());
    // It never came back into any view.
    assert!(!c.routers[0].alive().await.unwrap().contains(VICTIM));
}
