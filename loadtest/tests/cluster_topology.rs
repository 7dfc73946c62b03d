//! Changes that must disturb no session: adding a gateway, restarting the
//! only router, and running two routers side by side.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jvpn_loadtest::cluster::{ClusterOptions, node_name};
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::{agent_config, eventually, http_get, source_ip};
use jvpn_loadtest::invariants;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `n` fresh HELLOs from distinct sources, `conc` at a time; sessions per node.
async fn place_many(
    pki: &jvpn_loadtest::harness::TestPki,
    routers: &[std::net::SocketAddr],
    n: usize,
    first_source: usize,
) -> BTreeMap<String, usize> {
    let cfgs: Vec<_> = (0..n)
        .map(|i| agent_config(pki, routers.to_vec(), Some(source_ip(first_source + i))).unwrap())
        .collect();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for cfg in cfgs {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut a = jvpn_agent::Agent::new(cfg).unwrap();
            let t = common::hello(&mut a).await;
            drop(t);
            a.session.as_ref().unwrap().node_id.clone()
        }));
    }
    let mut out = BTreeMap::new();
    for t in tasks {
        *out.entry(t.await.unwrap()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_then_router_restart_force_no_rehandshake() {
    let _serial = SERIAL.lock().await;
    let mut c = common::cluster(ClusterOptions::default()).await;
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), 90, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(60))
        .await
        .unwrap();
    let before = fleet.snapshots();

    // Scale out 3 → 4 under load (agents keep pinging throughout).
    c.start_gateway(&node_name(3)).await.unwrap();
    let four: Vec<String> = (0..4).map(node_name).collect();
    c.wait_placeable(&four, Duration::from_secs(15))
        .await
        .unwrap();
    let placed = place_many(&c.pki, &c.router_addrs(), 2_000, 1_000).await;
    eprintln!("2,000 new sessions after scale-out: {placed:?}");
    assert_eq!(placed.len(), 4, "{placed:?}");
    for (node, n) in &placed {
        let share = *n as f64 / 2_000.0;
        assert!(
            (0.17..=0.33).contains(&share),
            "{node} got {:.1}% of new sessions",
            share * 100.0
        );
    }
    let mid = fleet.snapshots();
    for (b, m) in before.iter().zip(&mid) {
        assert_eq!(m.rehandshakes, 0, "scale-out forced a re-handshake");
        assert_eq!((&m.node_id, m.binding_epoch), (&b.node_id, b.binding_epoch));
    }

    // Kill the only router and start it again on the same ports: every
    // spliced connection breaks; every session resumes on its owner.
    fleet
        .wait_switch_allowed(Duration::from_millis(1_600))
        .await
        .unwrap();
    let before = fleet.resume_counts();
    let t0 = Instant::now();
    c.restart_router(0).await.unwrap();
    fleet
        .wait_each_resumed(&before, Duration::from_secs(15), "every session resumed")
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "within the transport-lost TTL"
    );
    let after = fleet.snapshots();
    for (m, a) in mid.iter().zip(&after) {
        assert_eq!(a.rehandshakes, 0, "{:?}", a.rehandshake_reasons);
        assert_eq!(a.node_id, m.node_id, "resumed on its owner");
        assert_eq!(a.binding_epoch, m.binding_epoch + 1);
    }
    eprintln!(
        "router restart: {} sessions resumed in {took:?}",
        fleet.len()
    );
    let reports = fleet.close().await;
    assert!(invariants::from_agents(&reports).all_zero());
    assert_eq!(
        c.router_metric("jvpn_router_routed_to_unplaceable_total", &[])
            .await
            .unwrap(),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_agree_on_placement_and_a_session_resumes_through_either() {
    let _serial = SERIAL.lock().await;
    let c = common::cluster(ClusterOptions {
        routers: 2,
        ..ClusterOptions::default()
    })
    .await;
    let (r1, r2) = (&c.routers[0], &c.routers[1]);
    eventually(Duration::from_secs(10), "same view id", || async {
        let (a, b) = (r1.view_id().await.unwrap(), r2.view_id().await.unwrap());
        a == b && r1.placeable().await.unwrap().len() == 3
    })
    .await
    .unwrap();
    let digest = |addr| async move {
        let (code, body) = http_get(addr, "/ring/digest").await.unwrap();
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let (d1, d2) = (digest(r1.admin_addr).await, digest(r2.admin_addr).await);
    assert_eq!(d1["keys"], 1_000_000);
    assert_eq!(d1["view_id"], d2["view_id"]);
    assert_eq!(d1["digest"], d2["digest"], "placement of 1M keys differs");
    assert_eq!(d1["per_member"], d2["per_member"]);

    // HELLO through r1, RESUME through r2, and back through r1.
    let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(7))).unwrap();
    let mut a = jvpn_agent::Agent::new(cfg).unwrap();
    let t = common::hello(&mut a).await;
    let owner = a.session.as_ref().unwrap().node_id.clone();
    drop(t);
    for _ in 0..2 {
        a.rotate_server();
        let t = common::resume(&mut a).await.unwrap();
        assert_eq!(a.session.as_ref().unwrap().node_id, owner);
        drop(t);
    }
    assert_eq!(a.session.as_ref().unwrap().binding_epoch, 3);
    // Counted when each spliced connection ends.
    for r in &c.routers {
        eventually(
            Duration::from_secs(5),
            "one RESUME spliced by each router",
            || async {
                r.metric(
                    "jvpn_router_connections_total",
                    &[("kind", "resume"), ("result", "spliced")],
                )
                .await
                .unwrap()
                    == 1.0
            },
        )
        .await
        .unwrap();
    }
}

/// A router whose view is wrong: it forwards HELLOs to the real router but
/// answers every RESUME with `owner_lost`.
async fn confused_router(real: std::net::SocketAddr) -> std::net::SocketAddr {
    use jvpn_proto::preamble::{PREAMBLE_LEN, Preamble, Status, StatusReply};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut pre = [0u8; PREAMBLE_LEN];
                if s.read_exact(&mut pre).await.is_err() {
                    return;
                }
                match Preamble::decode(&pre) {
                    Ok(Preamble::Hello { .. }) => {
                        let mut up = tokio::net::TcpStream::connect(real).await.unwrap();
                        up.write_all(&pre).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                    _ => {
                        let reply = StatusReply {
                            status: Status::OwnerLost,
                            retry_after_ms: 0,
                        };
                        let _ = s.write_all(&reply.encode()).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_lost_from_one_router_is_checked_with_another_before_rehandshaking() {
    let _serial = SERIAL.lock().await;
    let c = common::cluster(ClusterOptions::default()).await;
    let confused = confused_router(c.routers[0].client_addr).await;
    // The agent tries the confused router first.
    let fleet = Fleet::start(&c.pki, &[confused, c.routers[0].client_addr], 1, 60).unwrap();
    fleet
        .wait_established(Duration::from_secs(20))
        .await
        .unwrap();
    let before = fleet.snapshots().remove(0);
    fleet
        .wait_switch_allowed(Duration::from_millis(1_600))
        .await
        .unwrap();
    fleet.each(|| jvpn_agent::Command::Jump).await;
    eventually(Duration::from_secs(10), "resumed", || {
        let n = fleet.resumes_ok();
        async move { n == 1 }
    })
    .await
    .unwrap();
    let after = fleet.close().await.remove(0);
    assert_eq!(after.rehandshakes, 0, "{:?}", after.rehandshake_reasons);
    assert_eq!(after.resumes_rejected.get("owner_lost"), Some(&1));
    assert_eq!(after.node_id, before.node_id);
}
