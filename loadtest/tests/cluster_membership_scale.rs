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

/// A real gateway and two routers, then `n` emulated members (250 ms
/// interval), once both routers place all of them; the members' names.
async fn emulated_beside_a_gateway(
    n: usize,
) -> (LocalCluster, jvpn_loadtest::members::Emulator, Vec<String>) {
    use jvpn_loadtest::members::{Emulator, EmulatorOptions, member_name};
    let c = common::cluster(ClusterOptions {
        gateways: 1,
        routers: 2,
        ..ClusterOptions::default()
    })
    .await;
    let opts = EmulatorOptions {
        routers: c.routers.iter().map(|r| r.membership_addr).collect(),
        interval: Duration::from_millis(250),
        old_format: false,
    };
    let e = Emulator::start(&c.pki.layout.dir, n, opts).await.unwrap();
    let all: Vec<String> = (0..n).map(member_name).collect();
    for r in &c.routers {
        eventually(
            Duration::from_secs(60),
            "every member placeable",
            || async {
                let placeable = r.placeable().await.unwrap_or_default();
                placeable.contains(&node_name(0)) && all.iter().all(|m| placeable.contains(m))
            },
        )
        .await
        .unwrap();
    }
    (c, e, all)
}

/// The member emulator against two real routers, beside a real gateway:
/// 100 members join (placeable on both), a steady view then travels without its members
/// (replies of at most 128 bytes whatever N), a member whose streams drop
/// and one that goes silent are declared dead within the usual times, and
/// the real gateway builds one ring per view change, not per reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_emulated_members_cost_a_steady_view_nothing() {
    const N: usize = 100;
    let (c, mut e, all) = emulated_beside_a_gateway(N).await;
    // Steady: 2 s of heartbeats from 100 members to 2 routers.
    let g1 = node_name(0);
    // A window in which neither router's view changed (the last joins
    // may still be settling when the first window starts).
    let views = || async {
        let mut v = Vec::new();
        for r in &c.routers {
            v.push(r.view_id().await.unwrap());
        }
        v
    };
    // A window counts when the views were the same already one window
    // before it: replies to requests sent before the last change (naming
    // the view before it) are out of the way by then.
    let (mut s0, mut s1, mut builds0);
    let mut tries = 0;
    let mut before = None;
    loop {
        tries += 1;
        let v0 = views().await;
        builds0 = gateway_counter(&c, &g1, "jvpn_gateway_ring_builds_total").await;
        s0 = e.stats.snapshot();
        eventually(Duration::from_secs(30), "steady heartbeats", || {
            let replies = e.stats.snapshot().replies;
            async move { replies >= s0.replies + 1_600 }
        })
        .await
        .unwrap();
        s1 = e.stats.snapshot();
        let v1 = views().await;
        if v1 == v0 && before.as_ref() == Some(&v0) {
            break;
        }
        before = Some(v1);
        assert!(tries < 10, "the views never settled");
    }
    let replies = s1.replies - s0.replies;
    let per_reply = (s1.reply_bytes - s0.reply_bytes) / replies;
    let omitted = s1.omitted - s0.omitted;
    eprintln!("steady: {replies} replies, {per_reply} bytes each, {omitted} without members");
    assert!(per_reply <= 128, "{per_reply} bytes per reply");
    assert!(
        omitted * 10 >= replies * 9,
        "{omitted} of {replies} omitted"
    );
    let builds1 = gateway_counter(&c, &g1, "jvpn_gateway_ring_builds_total").await;
    assert_eq!(builds0, builds1, "the real gateway rebuilt a steady view");
    // A member's streams drop (SIGKILL), another goes silent (paused).
    let killed = e.kill(0);
    let silent = e.pause(1, true);
    let t0 = std::time::Instant::now();
    for (who, within) in [(&killed, 2), (&silent, 4)] {
        for r in &c.routers {
            eventually(Duration::from_secs(within), "the member dead", || async {
                !r.alive().await.unwrap_or_default().contains(who)
            })
            .await
            .unwrap();
        }
        eprintln!("{who} not alive on both routers after {:?}", t0.elapsed());
    }
    // Nobody else died.
    for r in &c.routers {
        let alive = r.alive().await.unwrap();
        let missing: Vec<_> = all[2..].iter().filter(|m| !alive.contains(*m)).collect();
        assert!(missing.is_empty(), "{missing:?} died too");
    }
    assert!(e.len() == N);
}

/// Churn (issue 14): 150 emulated members beside a real gateway, two
/// routers, one member joining or leaving every second for 20 s. No
/// healthy member is ever declared dead (the routers' death counters grow
/// by the leaves alone), and after every change both routers come to the
/// same view with exactly the expected members alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_kills_no_healthy_member_and_the_routers_agree_after_each_change() {
    use jvpn_loadtest::members::churn;
    const N: usize = 150;
    let (c, mut e, _) = emulated_beside_a_gateway(N).await;
    // Until the members hold the settled view: two rounds of heartbeats
    // in a row that brought no change.
    let mut quiet = 0;
    for _ in 0..40 {
        let before = e.stats.snapshot();
        eventually(Duration::from_secs(30), "a round of heartbeats", || {
            let replies = e.stats.snapshot().replies;
            async move { replies >= before.replies + 2 * N as u64 }
        })
        .await
        .unwrap();
        let after = e.stats.snapshot();
        let changed = after.replies - after.omitted - (before.replies - before.omitted);
        quiet = if changed == 0 { quiet + 1 } else { 0 };
        if quiet == 2 {
            break;
        }
    }
    assert_eq!(quiet, 2, "the members' views never settled");
    let others = [node_name(0)].into_iter().collect();
    let s0 = e.stats.snapshot();
    let r = churn(&mut e, &c.routers, &others, 20, 7).await.unwrap();
    let s1 = e.stats.snapshot();
    eprintln!(
        "churn: {} joins, {} leaves, converged p50 {} ms, max {} ms, {} late, {} false deaths",
        r.joins,
        r.leaves,
        r.converge_quantile_ms(0.5),
        r.converge_quantile_ms(1.0),
        r.late,
        r.false_deaths
    );
    assert_eq!((r.joins, r.leaves), (10, 10));
    assert_eq!(r.false_deaths, 0, "{r:?}");
    assert_eq!(r.converge_ms.len(), 20);
    // Changes travel as deltas: about one per member, router and change,
    // each a fraction of the 150-member view (about 6 kB).
    let (replies, bytes, deltas, delta_bytes, omitted) = (
        s1.replies - s0.replies,
        s1.reply_bytes - s0.reply_bytes,
        s1.deltas - s0.deltas,
        s1.delta_bytes - s0.delta_bytes,
        s1.omitted - s0.omitted,
    );
    let full = replies - deltas - omitted;
    eprintln!(
        "churn: {replies} replies ({} B each on average): {omitted} without members, \
         {deltas} deltas ({} B each), {full} whole views",
        bytes / replies,
        delta_bytes / deltas.max(1)
    );
    assert!(deltas >= 20 * 100 * 2, "{deltas} deltas");
    assert!(
        delta_bytes / deltas <= 256,
        "{} bytes per delta",
        delta_bytes / deltas
    );
    // The real gateway applied them all: no view it could not rebuild,
    // and it still holds a lease.
    let g = c.gateway(&node_name(0)).unwrap();
    assert_eq!(
        g.metric("jvpn_gateway_view_mismatch_total", &[])
            .await
            .unwrap(),
        0.0,
        "{}",
        g.log()
            .lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // One lease per router (the gauge has a router label).
    assert_eq!(
        g.metric("jvpn_gateway_lease_valid", &[]).await.unwrap(),
        2.0
    );
}
