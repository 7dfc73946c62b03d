//! The cluster end to end at its smallest: sessions placed through a router
//! land on several gateways and resume on their owner.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::{agent_config, source_ip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_gateways_and_resume_on_their_owner() {
    let c = common::cluster(ClusterOptions::default()).await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut agents = Vec::new();
    for i in 0..30 {
        let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(i))).unwrap();
        let mut a = jvpn_agent::Agent::new(cfg).unwrap();
        let t = common::hello(&mut a).await;
        let node = a.session.as_ref().unwrap().node_id.clone();
        *per_node.entry(node).or_default() += 1;
        agents.push((a, t));
    }
    assert!(
        per_node.len() >= 2,
        "one gateway took everything: {per_node:?}"
    );
    for (a, t) in &mut agents {
        let before = a.session.as_ref().unwrap().clone();
        drop(std::mem::replace(t, common::resume(a).await.unwrap()));
        let after = a.session.as_ref().unwrap();
        assert_eq!(after.node_id, before.node_id);
        assert_eq!(after.binding_epoch, before.binding_epoch + 1);
    }
    let r = &c.routers[0];
    assert_eq!(
        r.metric("jvpn_router_routed_to_unplaceable_total", &[])
            .await
            .unwrap(),
        0.0
    );
    assert_eq!(
        r.metric(
            "jvpn_router_connections_total",
            &[("kind", "resume"), ("result", "spliced")]
        )
        .await
        .unwrap(),
        0.0,
        "resumed transports are still open"
    );
}
