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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_drains_on_an_authorized_post() {
    use jvpn_loadtest::harness::{http_get, http_request};
    use std::time::Duration;
    let (mut c, _dir) = common::cluster_with_router_token(ClusterOptions {
        gateways: 1,
        ..ClusterOptions::default()
    })
    .await;
    let admin = c.routers[0].admin_addr;
    let (code, _) = http_request(admin, "POST", "/drain", None).await.unwrap();
    assert_eq!(code, 401);
    assert!(matches!(http_get(admin, "/readyz").await, Ok((200, _))));
    let (code, _) = http_request(admin, "POST", "/drain", Some(common::ROUTER_TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 202);
    let status = tokio::time::timeout(Duration::from_secs(20), c.routers[0].wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A client that leaves before its preamble is whole (a load balancer's
/// health check, a port scan) is counted `closed_early`, not as the broken
/// agent `bad_preamble` means; a whole preamble that is wrong still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_its_preamble_is_not_a_bad_preamble() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = common::cluster(ClusterOptions {
        gateways: 1,
        ..ClusterOptions::default()
    })
    .await;
    let r = &c.routers[0];
    let count = |result: &'static str| refused_before_routing(r, result);
    for sent in [&b""[..], b"JVPN\x01hi"] {
        let mut s = tokio::net::TcpStream::connect(r.client_addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    // A whole preamble of garbage.
    let mut s = tokio::net::TcpStream::connect(r.client_addr).await.unwrap();
    s.write_all(&[0x5a; 64]).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    jvpn_loadtest::harness::eventually(
        std::time::Duration::from_secs(5),
        "the three connections counted",
        || async { count("closed_early").await + count("bad_preamble").await >= 3.0 },
    )
    .await
    .unwrap();
    assert_eq!(count("closed_early").await, 2.0);
    assert_eq!(count("bad_preamble").await, 1.0);
}

/// SIGHUP on a router applies `[admission]` at once and refuses anything
/// else; the router keeps running either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_reloads_its_admission_limits_on_sighup() {
    use jvpn_loadtest::harness::{eventually, http_get};
    use nix::sys::signal::Signal;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let c = common::one_gateway_cluster().await;
    let r = &c.routers[0];
    let text = std::fs::read_to_string(&r.config_path).unwrap();
    let reloads = |ok: f64, failed: f64| async move {
        eventually(Duration::from_secs(5), "reload counted", || async {
            r.metric("jvpn_router_config_reloads_total", &[])
                .await
                .unwrap()
                == ok
                && r.metric("jvpn_router_config_reload_failures_total", &[])
                    .await
                    .unwrap()
                    == failed
        })
        .await
        .unwrap();
    };
    std::fs::write(
        &r.config_path,
        format!("{text}\n[admission]\nper_source_max_connections = 1\n"),
    )
    .unwrap();
    r.signal(Signal::SIGHUP).unwrap();
    reloads(1.0, 0.0).await;
    // One open connection per source now: of two, one is refused at accept
    // (which one depends on which connection task runs first).
    let mut a = tokio::net::TcpStream::connect(r.client_addr).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(r.client_addr).await.unwrap();
    let (mut ra, mut rb) = ([0u8; 8], [0u8; 8]);
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            r = a.read_exact(&mut ra) => r.map(|_| ra),
            r = b.read_exact(&mut rb) => r.map(|_| rb),
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&reply[..4], b"JVPN");
    assert_eq!(reply[5], jvpn_proto::preamble::Status::Overloaded as u8);

    // A restart-only key: refused, counted, nothing changes.
    std::fs::write(
        &r.config_path,
        text.replace("router_id = \"r1\"", "router_id = \"r9\""),
    )
    .unwrap();
    r.signal(Signal::SIGHUP).unwrap();
    reloads(1.0, 1.0).await;
    assert!(r.log().contains("router_id cannot change"), "{}", r.log());

    // The secret file rewritten in place: read only at start, so the
    // reload is refused naming it (it used to say "applied" and keep the
    // old secret).
    std::fs::write(&r.config_path, &text).unwrap();
    let secret_file = text
        .lines()
        .find_map(|l| l.strip_prefix("secret_file = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("the router's secret_file");
    let old = std::fs::read_to_string(&secret_file).unwrap();
    let key_id = old.split(':').next().unwrap().to_owned();
    std::fs::write(&secret_file, format!("{key_id}:{}\n", "5a".repeat(32))).unwrap();
    r.signal(Signal::SIGHUP).unwrap();
    reloads(1.0, 2.0).await;
    assert!(
        r.log().contains("cluster.secret_file cannot change"),
        "{}",
        r.log()
    );
    std::fs::write(&secret_file, old).unwrap();
    assert!(matches!(
        http_get(r.admin_addr, "/readyz").await,
        Ok((200, _))
    ));
}

/// The one gateway never died on the router and is placeable.
async fn g1_kept_its_place(c: &jvpn_loadtest::cluster::LocalCluster) {
    let r = &c.routers[0];
    assert_eq!(
        r.metric("jvpn_router_member_deaths_total", &[])
            .await
            .unwrap(),
        0.0
    );
    c.wait_placeable(&["g1".to_owned()], std::time::Duration::from_secs(5))
        .await
        .unwrap();
}

/// Slowloris on the membership port: connections that never finish a TLS
/// handshake are closed after the handshake timeout, and gateways keep
/// their heartbeat streams meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_membership_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = common::one_gateway_cluster().await;
    let r = &c.routers[0];
    let mut idle = Vec::new();
    // As many as one source may hold, so the TLS timeout (not the
    // per-source cap) is what closes them.
    for _ in 0..8 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(([127, 0, 0, 10], 0).into()).unwrap();
        let mut s = sock.connect(r.membership_addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello
        idle.push(s);
    }
    let within = jvpn_router::server::MEMBERSHIP_TLS_TIMEOUT * 2;
    for s in &mut idle {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle membership connection outlived {within:?}"
        );
    }
    // The real gateway never lost its place.
    g1_kept_its_place(&c).await;
}

/// A connection flood on the membership port from one source: past its cap
/// (8 open connections) the router closes new ones before any TLS work, the
/// source gets its slots back as connections close, and the gateways
/// (another source) keep their place throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_connection_flood_is_capped_per_source() {
    use jvpn_loadtest::harness::eventually;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let c = common::one_gateway_cluster().await;
    let r = &c.routers[0];
    let flooder = std::net::SocketAddr::from(([127, 0, 0, 9], 0));
    let connect = || async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(flooder).unwrap();
        s.connect(r.membership_addr).await.unwrap()
    };
    // A refused connection is closed right after accept; an admitted one
    // waits for its ClientHello up to the 5 s TLS timeout.
    let closed_within = |mut s: tokio::net::TcpStream, within: Duration| async move {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect().await);
    }
    for i in 0..12 {
        assert!(
            closed_within(connect().await, Duration::from_secs(2)).await,
            "connection {i} over the cap stayed open"
        );
    }
    assert_eq!(
        r.metric("jvpn_router_membership_connections_refused_total", &[])
            .await
            .unwrap(),
        12.0
    );
    // The eight within the cap are still open (no data, no EOF).
    let mut buf = [0u8; 64];
    for s in &held {
        assert!(
            matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a connection within the cap was closed"
        );
    }
    // Closing them gives the source its slots back.
    drop(held);
    eventually(Duration::from_secs(5), "slots released", || async {
        !closed_within(connect().await, Duration::from_millis(500)).await
    })
    .await
    .unwrap();
    g1_kept_its_place(&c).await;
}

/// A router whose open-file limit cannot hold `admission.max_connections`
/// (100,000 by default, two descriptors each) admits what the limit holds
/// and answers the rest `overloaded` at once, instead of leaving them
/// unaccepted in the listen backlog, unanswered, while accepts fail for
/// want of descriptors. It says so at start, naming the key, and exports
/// the cap in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_admits_what_its_open_file_limit_holds_and_answers_the_rest() {
    use jvpn_loadtest::harness::{Launcher, Role};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let bin = env!("CARGO_BIN_EXE_jvpn-loadtest");
    // Per-source limits out of the way (one source opens every
    // connection), and idle connections kept for the whole test.
    let env = [
        ("ADMISSION__PER_SOURCE_MAX_CONNECTIONS", "100000"),
        ("ADMISSION__PER_SOURCE_RATE_PER_S", "100000"),
        ("ADMISSION__PER_SOURCE_BURST", "100000"),
        ("TIMEOUTS__PREAMBLE_TIMEOUT_MS", "60000"),
    ]
    .map(|(k, v)| (format!("JVPN_ROUTER__{k}"), v.to_owned()));
    let c = jvpn_loadtest::cluster::LocalCluster::start(
        Launcher::for_tests(bin),
        Launcher::for_tests_as(bin, Role::Router).with_nofile(512),
        jvpn_loadtest::cluster::ClusterOptions {
            gateways: 1,
            router_env: env.to_vec(),
            ..jvpn_loadtest::cluster::ClusterOptions::default()
        },
    )
    .await
    .unwrap();
    let r = &c.routers[0];
    // More idle connections than the router has descriptors.
    let mut held = Vec::new();
    for _ in 0..600 {
        held.push(tokio::net::TcpStream::connect(r.client_addr).await.unwrap());
    }
    // Those past the cap were answered (or, past the room for answers,
    // closed at once); the router holds what it admitted.
    jvpn_loadtest::harness::eventually(Duration::from_secs(10), "answers given", || async {
        r.metric("jvpn_router_connections_open", &[])
            .await
            .is_ok_and(|v| v <= 112.0)
    })
    .await
    .unwrap();
    let mut last = tokio::net::TcpStream::connect(r.client_addr).await.unwrap();
    let mut reply = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), last.read_exact(&mut reply))
        .await
        .expect("no answer within 10 s")
        .expect("closed without a status");
    assert_eq!(&reply[..4], b"JVPN");
    assert_eq!(reply[5], jvpn_proto::preamble::Status::Overloaded as u8);
    let cap = r.metric("jvpn_router_max_connections", &[]).await.unwrap();
    // 512 less a reserve of 256 + 512 / 16, two descriptors each.
    assert_eq!(cap, 112.0);
    let log = std::fs::read_to_string(r.dir.join("r1.log")).unwrap();
    assert!(log.contains("admission.max_connections"), "{log}");
    let count = |result: &'static str| refused_before_routing(r, result);
    assert!(count("overloaded").await >= 488.0, "past the cap: refused");
    assert_eq!(
        count("rate_limited").await,
        0.0,
        "refused by the per-source limits, not by the cap"
    );
    drop(held);
}

/// A router's count of connections that ended before a HELLO or RESUME
/// was read (`kind="none"`), for `result`.
async fn refused_before_routing(r: &jvpn_loadtest::cluster::LocalRouter, result: &str) -> f64 {
    r.metric(
        "jvpn_router_connections_total",
        &[("kind", "none"), ("result", result)],
    )
    .await
    .unwrap()
}
