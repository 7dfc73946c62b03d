//! Agent-side guarantees: a `ResumeOk` from another owner is refused (never
//! a silent migration), and the `jvpn-agent connect` CLI reports every
//! transition.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use jvpn_agent::AgentError;
use jvpn_loadtest::harness;
use jvpn_proto::frame;
use jvpn_proto::pb::session::{ResumeOk, frame::Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server holding a valid gateway certificate that answers any RESUME
/// with a `ResumeOk` claiming another node.
async fn impostor(pki: &harness::TestPki) -> std::net::SocketAddr {
    fake_gateway(pki, true).await
}

/// A server holding a valid gateway certificate that completes TLS, reads
/// the first frame and then says nothing: `impostor` answers a
/// `ResumeOk` claiming another node, otherwise nothing ever comes.
async fn fake_gateway(pki: &harness::TestPki, impostor: bool) -> std::net::SocketAddr {
    let material = jvpn_gateway::tls::load_material(&jvpn_gateway::config::TlsConfig {
        cert_file: pki.layout.gateway_cert("g2"),
        key_file: pki.layout.gateway_key("g2"),
        agent_ca_file: None,
    })
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        jvpn_gateway::tls::server_config(&material, true, None).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut pre = [0u8; 64];
                s.read_exact(&mut pre).await.unwrap();
                let mut tls = acceptor.accept(s).await.unwrap();
                let mut buf = BytesMut::new();
                let _ = jvpn_runtime::wire::read_frame(&mut tls, &mut buf).await;
                if !impostor {
                    // Holds the connection open, silent (a paused gateway).
                    let _ = jvpn_runtime::wire::read_frame(&mut tls, &mut buf).await;
                    return;
                }
                let ok = ResumeOk {
                    node_id: "g2".into(),
                    incarnation: 7,
                    owner_epoch: 1,
                    binding_epoch: 2,
                    server_proof: vec![0; 32],
                    ..Default::default()
                };
                let bytes = frame::to_bytes(Kind::ResumeOk(ok)).unwrap();
                tls.write_all(&bytes).await.unwrap();
                tls.flush().await.unwrap();
            });
        }
    });
    addr
}

/// A gateway that completes TLS and then never answers (paused, or the
/// path died after the handshake): the HELLO and the RESUME each give up
/// within the connect timeout instead of waiting for TCP, for ever or 15
/// minutes, with the agent's whole loop behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_hello_or_resume_gives_up() {
    let (pki, _dir, gw) = g1_with_g2_material().await;
    let mute = fake_gateway(&pki, false).await;
    let mut cfg = harness::agent_config(&pki, vec![mute], None).unwrap();
    // The answer is awaited twice this (TCP and TLS once each).
    cfg.connect_timeout = std::time::Duration::from_secs(1);
    let mut a = jvpn_agent::Agent::new(cfg.clone()).unwrap();
    let bound = std::time::Duration::from_secs(6);
    match tokio::time::timeout(bound, a.hello()).await {
        Ok(Err(e)) => assert!(e.to_string().contains("no answer"), "{e}"),
        other => panic!(
            "HELLO to a silent gateway: {:?}",
            other.map(|r| r.map(drop))
        ),
    }
    // A real session, whose next transport lands on the silent server.
    let mut real = harness::agent(&pki, gw.client_addr, None).unwrap();
    let _t = common::hello(&mut real).await;
    let mut moved = jvpn_agent::Agent::new(cfg).unwrap();
    moved.session = real.session.clone();
    match tokio::time::timeout(bound, moved.resume()).await {
        Ok(Err(e)) => assert!(e.to_string().contains("no answer"), "{e}"),
        other => panic!(
            "RESUME to a silent gateway: {:?}",
            other.map(|r| r.map(drop))
        ),
    }
}

/// A gateway g1, and a PKI that also holds g2's certificate (for a fake).
async fn g1_with_g2_material() -> (harness::TestPki, tempfile::TempDir, harness::LocalGateway) {
    let pki = harness::TestPki::new(&["g1", "g2"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw =
        harness::LocalGateway::start(&common::launcher(), &pki, dir.path(), &Default::default())
            .await
            .unwrap();
    (pki, dir, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_ok_from_another_owner_is_refused() {
    let (pki, _dir, gw) = g1_with_g2_material().await;
    let mut a = harness::agent(&pki, gw.client_addr, None).unwrap();
    let _t = common::hello(&mut a).await;
    let before = a.session.clone().unwrap();

    // Same session, but the next transport lands on an impostor.
    let fake = impostor(&pki).await;
    let mut moved = harness::agent(&pki, fake, None).unwrap();
    moved.session = a.session.clone();
    match moved.resume().await {
        Err(e @ AgentError::OwnerMismatch { .. }) => {
            assert!(e.session_gone(), "the agent must re-handshake explicitly");
            assert!(e.to_string().contains("g2"), "{e}");
        }
        other => panic!("expected OwnerMismatch, got {other:?}"),
    }
    // Nothing was adopted from the impostor.
    let after = moved.session.as_ref().unwrap();
    assert_eq!(
        (after.node_id.as_str(), after.incarnation),
        (before.node_id.as_str(), before.incarnation)
    );
    assert_eq!(after.binding_epoch, before.binding_epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_cli_prints_each_transition_with_its_reason() {
    let env = common::start("[policy]\nswitch_cooldown_ms = 200\n").await;
    let l = &env.pki.layout;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        common::agent_command()
            .arg("connect")
            .arg("--server")
            .arg(env.gw.client_addr.to_string())
            .arg("--ca")
            .arg(l.client_ca())
            .arg("--cert")
            .arg(l.agent_cert(0))
            .arg("--key")
            .arg(l.agent_key(0))
            .args(["--jump-every-s", "1", "--duration-s", "3"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("handshake: attached to g1 (epoch 1)"),
        "{text}"
    );
    assert!(text.contains("reattached in"), "{text}");
    assert!(text.contains("(epoch 2)"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(report["ended"], "agent_closed");
    assert!(report["resumes_ok"].as_u64().unwrap() >= 1);
    assert_eq!(report["rehandshakes"], 0);
}

/// An echo (sessions without a channel: the load tool's probe) on a path
/// that stalls (the sockets stay open, nothing crosses): the agent gives
/// the transport up within its silence limit and resumes, like for any
/// other silence. The echo used to wait for its reply with the whole loop
/// behind it, for as long as TCP kept the connection (for ever here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_on_a_stalled_path_gives_the_transport_up_within_the_silence_limit() {
    use jvpn_agent::{AgentReport, Command, keep_alive};
    use std::time::{Duration, Instant};
    let env =
        common::start("[policy]\nheartbeat_interval_ms = 250\nheartbeat_timeout_ms = 1000\n").await;
    let proxy = jvpn_loadtest::faultproxy::FaultProxy::start(env.gw.client_addr)
        .await
        .unwrap();
    let agent = harness::agent(&env.pki, proxy.addr, None).unwrap();
    let (cmds, rx) = tokio::sync::mpsc::channel(8);
    let report = Arc::new(std::sync::Mutex::new(AgentReport::default()));
    let task = tokio::spawn(keep_alive(agent, rx, None, report.clone()));
    let echo = |payload: &'static [u8]| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        cmds.try_send(Command::Echo(payload.to_vec(), tx)).unwrap();
        rx
    };
    harness::eventually(Duration::from_secs(10), "attached", || {
        let up = report.lock().unwrap().sessions_established == 1;
        async move { up }
    })
    .await
    .unwrap();
    echo(b"one").await.unwrap().unwrap();
    proxy.stall_all();
    let asked = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), echo(b"two")).await;
    assert!(
        matches!(answer, Ok(Ok(Err(_)))),
        "the echo on the stalled path: {answer:?}"
    );
    // The silence limit (1 s) and a generous margin, far below TCP's.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // New connections pass: the session resumes.
    harness::eventually(Duration::from_secs(20), "resumed", || {
        let r = report.lock().unwrap().clone();
        async move { r.resumes_ok >= 1 }
    })
    .await
    .unwrap();
    echo(b"three").await.unwrap().unwrap();
    let r = report.lock().unwrap().clone();
    assert_eq!(r.rehandshakes, 0, "{r:?}");
    drop(cmds);
    task.await.unwrap();
}
