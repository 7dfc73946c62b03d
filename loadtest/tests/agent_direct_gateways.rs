//! An agent given several gateways directly, with no router in front (real
//! gateway processes): only the gateway that made a session holds it, so a
//! RESUME goes there first; and a GoAway moves the agent to another one
//! without sending new streams to the session that is leaving.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jvpn_agent::Command;
use jvpn_loadtest::faultproxy::{FaultProxy, Mode};
use jvpn_loadtest::harness::{self, GatewayOptions, LocalGateway, TestPki};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Streaming, target};

const DRAIN_MS: u64 = 3_000;

async fn gateway(pki: &TestPki, dir: &tempfile::TempDir, node: &str) -> LocalGateway {
    gateway_with(pki, dir, node, "").await
}

async fn gateway_with(
    pki: &TestPki,
    dir: &tempfile::TempDir,
    node: &str,
    extra: &str,
) -> LocalGateway {
    let opts = GatewayOptions {
        node_id: node.into(),
        extra_toml: format!(
            "{}[timeouts]\ndrain_timeout_ms = {DRAIN_MS}\n{extra}",
            jvpn_loadtest::streamload::LOOPBACK_EGRESS
        ),
        ..Default::default()
    };
    let d = dir.path().join(node);
    std::fs::create_dir_all(&d).unwrap();
    LocalGateway::start(&common::launcher(), pki, &d, &opts)
        .await
        .unwrap()
}

async fn echo_round(s: &mut jvpn_agent::streams::Stream, round: u64) -> std::io::Result<()> {
    let sent = round.to_be_bytes();
    let mut got = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(&sent).await?;
        s.read_exact(&mut got).await.map(|_| ())
    })
    .await
    .map_err(|_| std::io::Error::other("the stream hung"))??;
    assert_eq!(got, sent, "round {round}: the echo differs");
    Ok(())
}

async fn until(a: &Streaming, what: &str, f: impl Fn(&jvpn_agent::AgentReport) -> bool) {
    harness::eventually(Duration::from_secs(10), what, || {
        let yes = f(&a.report.lock().unwrap());
        async move { yes }
    })
    .await
    .unwrap();
}

/// After a GoAway moved the session to the second gateway, a transport
/// loss is resumed there: the first (still draining) never held the new
/// session, and its `unknown_session` used to make the agent give the
/// session up and reset its streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_goes_to_the_gateway_that_holds_the_session() {
    let pki = TestPki::new(&["g1", "g2"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g1 = gateway(&pki, &dir, "g1").await;
    let g2 = gateway(&pki, &dir, "g2").await;
    let echo: SocketAddr = jvpn_loadtest::streamload::echo_destination().await.unwrap();
    let a = common::streaming_agent(&pki, vec![g1.client_addr, g2.client_addr]);
    let mut first = a.tunnel.connect(&target(echo)).await.unwrap();
    echo_round(&mut first, 1).await.unwrap();
    assert_eq!(a.report.lock().unwrap().node_id, "g1");
    g1.signal(Signal::SIGTERM).unwrap();
    until(&a, "the agent moved to g2", |r| {
        r.go_aways == 1 && r.node_id == "g2"
    })
    .await;
    let mut late = a.tunnel.connect(&target(echo)).await.unwrap();
    echo_round(&mut late, 2).await.unwrap();
    let resumed = a.report.lock().unwrap().resumes_ok;
    // A transport loss while g1 still drains (and answers).
    a.cmds.send(Command::Jump).await.unwrap();
    until(&a, "the agent reattached", |r| {
        r.resumes_ok > resumed || r.rehandshakes > 1
    })
    .await;
    echo_round(&mut late, 3).await.unwrap();
    let r = a.report.lock().unwrap().clone();
    assert_eq!(r.resumes_ok, resumed + 1, "{r:?}");
    assert_eq!(r.node_id, "g2", "{r:?}");
    assert_eq!(r.rehandshakes, 1, "only the GoAway's: {r:?}");
    assert_eq!(r.rehandshake_reasons.get("unknown_session"), None, "{r:?}");
    drop(first);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// A GoAway with no stream open: the next session is made in the
/// background, and a stream asked for meanwhile waits for it. It used to
/// go over the leaving session (and fail when that one was replaced), or,
/// with that session's HTTP/2 not yet up, be reset at the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_asked_for_during_a_move_goes_to_the_next_session() {
    // Twice: with the leaving session's HTTP/2 up (a stream came and went)
    // and without (no stream yet).
    for warm in [true, false] {
        let pki = TestPki::new(&["g1", "g2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let g1 = gateway(&pki, &dir, "g1").await;
        let g2 = gateway(&pki, &dir, "g2").await;
        // The way to g2 is slow, so the move takes a while.
        let slow = FaultProxy::start(g2.client_addr).await.unwrap();
        let echo = jvpn_loadtest::streamload::echo_destination().await.unwrap();
        let a = common::streaming_agent(&pki, vec![g1.client_addr, slow.addr]);
        if warm {
            let mut s = a.tunnel.connect(&target(echo)).await.unwrap();
            echo_round(&mut s, 1).await.unwrap();
        } else {
            until(&a, "the agent attached", |r| r.node_id == "g1").await;
        }
        assert_eq!(a.report.lock().unwrap().node_id, "g1");
        slow.set_mode(Mode::Delay(Duration::from_millis(300)));
        let sigterm_at = Instant::now();
        g1.signal(Signal::SIGTERM).unwrap();
        until(&a, "the GoAway reached the agent", |r| r.go_aways == 1).await;
        let mut s = a.tunnel.connect(&target(echo)).await.unwrap();
        echo_round(&mut s, 2)
            .await
            .unwrap_or_else(|e| panic!("warm {warm}: {e}"));
        // It lives past g1's whole drain (g1 has exited by then).
        while sigterm_at.elapsed() < Duration::from_millis(DRAIN_MS + 1_000) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        echo_round(&mut s, 3)
            .await
            .unwrap_or_else(|e| panic!("warm {warm}: {e}"));
        let r = a.report.lock().unwrap().clone();
        assert_eq!(r.node_id, "g2", "warm {warm}: {r:?}");
        assert_eq!(r.rehandshakes, 1, "warm {warm}: {r:?}");
        assert_eq!(
            r.streams_reset.values().sum::<u64>(),
            0,
            "warm {warm}: {r:?}"
        );
        drop(s);
        drop(a.cmds);
        a.task.await.unwrap();
    }
}

/// The session's own gateway answers `overloaded` (its per-source rate:
/// one connection per 5 s) to the RESUMEs after a transport loss. The
/// agent waits for it as it asks, and never takes the other gateway's
/// `unknown_session` (it never held the session) for the session's end.
/// It used to ask the other one after each refusal and believe its second
/// `unknown_session`: a re-handshake while its own gateway held the
/// session (design note 66).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_home_gateway_is_waited_for() {
    let pki = TestPki::new(&["g1", "g2"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g1 = gateway_with(
        &pki,
        &dir,
        "g1",
        "[admission]\nper_source_rate_per_s = 0.2\nper_source_burst = 1\n",
    )
    .await;
    let g2 = gateway(&pki, &dir, "g2").await;
    let a = common::streaming_agent(&pki, vec![g1.client_addr, g2.client_addr]);
    until(&a, "the agent attached", |r| r.node_id == "g1").await;
    let before = a.report.lock().unwrap().clone();
    // The HELLO spent g1's only token: the next connections are refused
    // `overloaded` until the next one, 5 s later.
    a.cmds.send(Command::Jump).await.unwrap();
    harness::eventually(Duration::from_secs(30), "reattached", || {
        let r = a.report.lock().unwrap().clone();
        assert_eq!(r.rehandshakes, before.rehandshakes, "{r:?}");
        async move { r.resumes_ok > before.resumes_ok }
    })
    .await
    .unwrap();
    let r = a.report.lock().unwrap().clone();
    assert_eq!(r.node_id, "g1", "{r:?}");
    assert!(
        r.resumes_rejected.contains_key("overloaded"),
        "g1 refused first: {r:?}"
    );
    drop(a.cmds);
    a.task.await.unwrap();
}
