//! Membership that does not grow with N² (issue 14): a steady view is
//! built into a ring once per gateway, however many routers report it and
//! however many heartbeats go by; only a change makes a new one.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster, node_name};
use jvpn_loadtest::harness::eventually;

async fn gateway_counter(c: &LocalCluster, node: &str, name: &str) -> f64 {
    c.gateway(node).unwrap().metric(name, &[]).await.unwrap()
}

/// Waits until every gateway has sent `more` heartbeats beyond `from`.
async fn heartbeats_go_by(c: &LocalCluster, nodes: &[String], from: &[f64], more: f64) {
    for (n, f) in nodes.iter().zip(from) {
        eventually(Duration::from_secs(30), "heartbeats to go by", || async {
            gateway_counter(c, n, "jvpn_gateway_heartbeats_sent_total").await >= f + more
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_view_is_built_once_per_gateway_not_per_reply() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 3,
        routers: 2,
        spare_gateways: 1,
        ..ClusterOptions::default()
    })
    .await;
    let nodes: Vec<String> = (0..3).map(node_name).collect();
    c.wait_placeable(&nodes, Duration::from_secs(30))
        .await
        .unwrap();
    let mut builds = Vec::new();
    let mut sent = Vec::new();
    for n in &nodes {
        builds.push(gateway_counter(&c, n, "jvpn_gateway_ring_builds_total").await);
        sent.push(gateway_counter(&c, n, "jvpn_gateway_heartbeats_sent_total").await);
    }
    // 20 heartbeats per gateway, 10 to each router, all with this view.
    heartbeats_go_by(&c, &nodes, &sent, 20.0).await;
    for (n, b) in nodes.iter().zip(&builds) {
        let now = gateway_counter(&c, n, "jvpn_gateway_ring_builds_total").await;
        assert_eq!(now, *b, "{n} rebuilt a ring it already had");
        assert!(*b >= 1.0, "{n} never built one");
    }
    // A change (a fourth gateway) is one more ring on each gateway, shared
    // by both routers' links.
    let spare = node_name(3);
    c.start_gateway(&spare).await.unwrap();
    let all: Vec<String> = (0..4).map(node_name).collect();
    c.wait_placeable(&all, Duration::from_secs(30))
        .await
        .unwrap();
    let mut sent = Vec::new();
    for n in &nodes {
        sent.push(gateway_counter(&c, n, "jvpn_gateway_heartbeats_sent_total").await);
    }
    heartbeats_go_by(&c, &nodes, &sent, 20.0).await;
    for (n, b) in nodes.iter().zip(&builds) {
        let now = gateway_counter(&c, n, "jvpn_gateway_ring_builds_total").await;
        // The new member's STARTING → READY may be one or two views.
        assert!(
            (b + 1.0..=b + 2.0).contains(&now),
            "{n}: {b} → {now} ring builds for one join seen by two routers"
        );
    }
}
