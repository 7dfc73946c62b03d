//! Single-node topology over real processes and real TLS: sessions survive
//! transport jumps with their id, a fresh binding epoch and a rotated key.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::harness::{self, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_sessions_survive_three_forced_jumps_each() {
    let env = common::start(
        "[admission]\nmax_tls_handshakes_in_flight = 256\n\
         [policy]\nswitch_cooldown_ms = 300\nheartbeat_timeout_ms = 60000\ntransport_lost_ttl_ms = 120000\n",
    )
    .await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    let mut sessions = Vec::new();
    for i in 0..100 {
        let mut a = harness::agent(&env.pki, proxy.addr, Some(harness::source_ip(i))).unwrap();
        let mut t = common::hello(&mut a).await;
        t.echo(b"hello").await.unwrap();
        let id = a.session.as_ref().unwrap().id;
        sessions.push((a, id, t));
    }
    for jump in 1..=3u64 {
        let cut = proxy.cut_all();
        assert_eq!(cut, 100, "jump {jump}: every transport cut at the proxy");
        let mut tasks = Vec::new();
        for (mut a, id, old) in sessions.drain(..) {
            tasks.push(tokio::spawn(async move {
                drop(old); // already cut at the proxy
                let before = a.session.as_ref().unwrap().binding_epoch;
                let mut t = common::resume(&mut a).await.expect("resume after the cut");
                let s = a.session.as_ref().unwrap();
                assert_eq!(s.id, id, "same session id");
                assert_eq!(s.binding_epoch, before + 1, "binding epoch +1 per jump");
                t.echo(format!("after jump {jump}").as_bytes())
                    .await
                    .expect("echo flows");
                (a, id, t)
            }));
        }
        for task in tasks {
            sessions.push(task.await.unwrap());
        }
    }
    for (a, _, _) in &sessions {
        assert_eq!(a.session.as_ref().unwrap().binding_epoch, 4);
    }
    let ok = env
        .gw
        .metric("jvpn_gateway_resumes_total", &[("result", "ok")])
        .await
        .unwrap();
    assert_eq!(ok, 300.0);
    let hellos = env
        .gw
        .metric("jvpn_gateway_hellos_total", &[("result", "ok")])
        .await
        .unwrap();
    assert_eq!(hellos, 100.0, "no re-handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_jump_succeeds_at_once_and_retires_the_old_transport() {
    let env = common::start(common::QUIET_TRANSPORTS).await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    let mut a = harness::agent(&env.pki, proxy.addr, Some(harness::source_ip(1))).unwrap();
    let mut old = common::hello(&mut a).await;
    old.echo(b"x").await.unwrap();
    assert_eq!(proxy.stall_all(), 1);
    // The gateway still sees the old transport as attached.
    let replaced = || async {
        env.gw
            .metric(
                "jvpn_gateway_state_transitions_total",
                &[("from", "attached"), ("to", "recovering")],
            )
            .await
            .unwrap()
    };
    assert_eq!(replaced().await, 0.0);
    let started = std::time::Instant::now();
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no wait for a heartbeat timeout"
    );
    t.echo(b"y").await.unwrap();
    assert_eq!(
        replaced().await,
        1.0,
        "the ATTACHED transport was replaced, not timed out"
    );
    let (_, body) = harness::http_get(env.gw.admin_addr, "/sessions")
        .await
        .unwrap();
    assert!(body.contains("\"attached\":1"), "{body}");
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_transport_lost_ttl_the_session_is_gone() {
    let env = common::start(common::FAST_POLICY).await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let t = common::hello(&mut a).await;
    t.abandon();
    eventually(
        Duration::from_secs(10),
        "the session to be terminated",
        || async {
            env.gw
                .metric(
                    "jvpn_gateway_state_transitions_total",
                    &[("to", "terminated"), ("reason", "transport_ttl_exceeded")],
                )
                .await
                .unwrap()
                == 1.0
        },
    )
    .await
    .unwrap();
    match common::resume(&mut a).await {
        Err(jvpn_agent::AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::UnknownSession)
        }
        other => panic!("expected unknown_session, got {other:?}"),
    }
    let exact = env
        .gw
        .metric(
            "jvpn_gateway_resumes_total",
            &[("result", "unknown_session")],
        )
        .await
        .unwrap();
    assert_eq!(exact, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_transport_is_abandoned_after_the_heartbeat_timeout() {
    // The proxy stops forwarding but keeps both sockets open: TCP never
    // reports an error, only silence tells the agent the transport is dead.
    let env = common::start(common::FAST_POLICY).await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    let fleet = jvpn_loadtest::fleet::Fleet::start(&env.pki, &[proxy.addr], 3, 40).unwrap();
    fleet
        .wait_established(Duration::from_secs(20))
        .await
        .unwrap();
    let before = fleet.resume_counts();
    assert_eq!(proxy.stall_all(), 3);
    fleet
        .wait_each_resumed(&before, Duration::from_secs(10), "every agent reattached")
        .await
        .unwrap();
    let reports = fleet.close().await;
    for r in &reports {
        assert_eq!(r.rehandshakes, 0, "{:?}", r.rehandshake_reasons);
        assert_eq!(r.resumes_ok, 1);
    }
}
