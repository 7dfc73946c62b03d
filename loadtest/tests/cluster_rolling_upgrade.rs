//! A rolling upgrade under load: each gateway in turn is drained (SIGTERM),
//! exits, and is started again as a new incarnation, while sessions keep
//! their heartbeats and new sessions keep arriving.
//!
//! Only the drained node's sessions re-handshake (explicitly, `go_away`),
//! every one of them succeeds, nothing else moves, and no HELLO is ever
//! spliced to a gateway that is not placeable.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jvpn_loadtest::cluster::{ClusterOptions, node_name};
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::eventually;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_moves_only_the_drained_nodes_sessions() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 3,
        routers: 2,
        gateway_env: vec![(
            "JVPN_GATEWAY__TIMEOUTS__DRAIN_TIMEOUT_MS".into(),
            "4000".into(),
        )],
        ..ClusterOptions::default()
    })
    .await;
    let routers = c.router_addrs();
    let mut fleet = Fleet::start(&c.pki, &routers, 90, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(60))
        .await
        .unwrap();
    let all: Vec<String> = (0..3).map(node_name).collect();

    for node in &all {
        let before = fleet.snapshots();
        let who: BTreeSet<usize> = before
            .iter()
            .enumerate()
            .filter(|(_, r)| r.node_id == *node)
            .map(|(i, _)| i)
            .collect();
        assert!(!who.is_empty(), "{node} holds no session");
        let t0 = Instant::now();
        c.gateway(node).unwrap().signal(Signal::SIGTERM).unwrap();
        // Load meanwhile: new sessions keep arriving through both routers.
        let arrivals_from = fleet.len();
        let exited = {
            let (_, gw) = c
                .gateways
                .iter_mut()
                .rev()
                .find(|(n, _)| n == node)
                .unwrap();
            let wait = gw.wait();
            tokio::pin!(wait);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    s = &mut wait => break s.unwrap(),
                    _ = tick.tick() => {
                        let n = fleet.len();
                        let one = Fleet::start(&c.pki, &routers, 1, n).unwrap();
                        fleet.agents.extend(one.agents);
                    }
                }
            }
        };
        assert!(exited.success(), "{node} drained with {exited:?}");
        // Every session of the drained node re-established elsewhere.
        eventually(Duration::from_secs(20), "drained sessions moved", || {
            let snaps = fleet.snapshots();
            let done = who.iter().all(|i| {
                snaps[*i].established_at.is_some_and(|t| t > t0) && snaps[*i].node_id != *node
            });
            async move { done }
        })
        .await
        .unwrap();
        let after = fleet.snapshots();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a.ended, None, "agent {i} lost its session");
            if who.contains(&i) {
                assert_eq!(a.rehandshakes, b.rehandshakes + 1, "agent {i}");
                let reasons = |r: &jvpn_agent::AgentReport, k: &str| {
                    r.rehandshake_reasons.get(k).copied().unwrap_or(0)
                };
                let moved = (reasons(a, "go_away") + reasons(a, "draining"))
                    - (reasons(b, "go_away") + reasons(b, "draining"));
                assert_eq!(moved, 1, "agent {i}: {:?}", a.rehandshake_reasons);
            } else {
                assert_eq!(a.node_id, b.node_id, "agent {i} moved off {}", b.node_id);
                assert_eq!(a.rehandshakes, b.rehandshakes, "agent {i} re-handshaked");
                assert_eq!(a.binding_epoch, b.binding_epoch, "agent {i} rebound");
            }
        }
        // Sessions that arrived during the drain never landed on it.
        fleet
            .wait_established(Duration::from_secs(30))
            .await
            .unwrap();
        for a in &fleet.agents[arrivals_from..] {
            assert_ne!(
                a.snapshot().node_id,
                *node,
                "a new session was placed on {node}"
            );
        }
        // The upgraded binary comes back as a new incarnation.
        c.start_gateway(node).await.unwrap();
        c.wait_placeable(&all, Duration::from_secs(15))
            .await
            .unwrap();
    }

    let reports = common::close_clean(&c, fleet).await;
    assert!(reports.len() > 90);
}
