//! Bad channel input from the gateway's side (issue 15, "from either
//! side"): a fake gateway (real TLS with the cluster's certificate, the
//! real wire) grants a channel and then breaks its rules. The agent must
//! end that session explicitly (a `Terminate` with `protocol_error` to the
//! gateway), count the violation, and start a new session that works.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use jvpn_loadtest::harness::{self, TestPki};
use jvpn_proto::ReasonCode;
use jvpn_proto::pb::session::{Ack, Data, HelloOk, Policy, Pong, Reject, Terminate, frame::Kind};
use jvpn_proto::preamble::PREAMBLE_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the fake gateway saw: (connection number, frame from the agent).
type Seen = mpsc::UnboundedReceiver<(usize, Kind)>;

/// A gateway that answers every HELLO with a session and a channel, then
/// sends connection `i` the frame `bad[i]` (later connections get none),
/// answers pings, refuses every RESUME (`unknown_session`), and reports
/// every frame it receives.
async fn fake_gateway(pki: &TestPki, bad: Vec<Kind>, keepalive_ms: u64) -> (SocketAddr, Seen) {
    let material = jvpn_gateway::tls::load_material(&jvpn_gateway::tls::TlsConfig {
        cert_file: pki.layout.gateway_cert("gw-fake"),
        key_file: pki.layout.gateway_key("gw-fake"),
        agent_ca_file: None,
    })
    .unwrap();
    let tls = jvpn_gateway::tls::server_config(&material, true, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut bad = bad.into_iter();
        for i in 0.. {
            let (mut tcp, _) = l.accept().await.unwrap();
            let mut preamble = [0u8; PREAMBLE_LEN];
            tcp.read_exact(&mut preamble).await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let bad = bad.next();
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    let k = loop {
                        if let Some(k) = jvpn_proto::frame::decode(&mut buf).unwrap() {
                            break k;
                        }
                        if tls.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    let mut out = BytesMut::new();
                    match &k {
                        Kind::Hello(_) => {
                            let ok = hello_ok(i, keepalive_ms);
                            jvpn_proto::frame::encode(Kind::HelloOk(ok), &mut out).unwrap();
                            if let Some(b) = bad.clone() {
                                jvpn_proto::frame::encode(b, &mut out).unwrap();
                            }
                        }
                        Kind::Ping(p) => {
                            let pong = Kind::Pong(Pong { seq: p.seq });
                            jvpn_proto::frame::encode(pong, &mut out).unwrap();
                        }
                        Kind::Resume(_) => {
                            let no = Kind::Reject(Reject {
                                reason: ReasonCode::UnknownSession as i32,
                                ..Default::default()
                            });
                            jvpn_proto::frame::encode(no, &mut out).unwrap();
                        }
                        _ => {}
                    }
                    let _ = seen_tx.send((i, k));
                    if tls.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn hello_ok(i: usize, keepalive_ms: u64) -> HelloOk {
    HelloOk {
        keepalive_ms,
        session_id: vec![i as u8 + 1; 16],
        node_id: "gw-fake".into(),
        incarnation: 1,
        state_version: 1,
        binding_epoch: 1,
        resume_token: vec![7u8; jvpn_proto::token::TOKEN_LEN],
        policy: Some(Policy {
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 5_000,
            transport_lost_ttl_ms: 10_000,
            session_max_lifetime_ms: 0,
            max_switches_per_min: 60,
            switch_cooldown_ms: 0,
        }),
        token_key_id: 0,
        channel_window: 1 << 20,
        migratable: false,
        via_router: None,
        // Like a gateway that predates the field.
        channel_finish: false,
    }
}

/// The next frame the fake saw, failing the test after 20 s.
async fn next(seen: &mut Seen) -> (usize, Kind) {
    tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the agent went quiet")
        .expect("the fake gateway stopped")
}

/// An agent with a tunnel (so it asks for a channel) running the real
/// session loop against `addr`: its command sender, report and task.
fn keep_alive_agent(
    pki: &TestPki,
    addr: std::net::SocketAddr,
) -> (
    mpsc::Sender<jvpn_agent::Command>,
    Arc<std::sync::Mutex<jvpn_agent::AgentReport>>,
    tokio::task::JoinHandle<jvpn_agent::AgentReport>,
    jvpn_agent::streams::Tunnel,
) {
    let cfg = harness::agent_config(pki, vec![addr], None).unwrap();
    let mut agent = jvpn_agent::Agent::new(cfg).unwrap();
    let tunnel = agent.tunnel();
    let (cmds, rx) = mpsc::channel(8);
    let report = Arc::new(std::sync::Mutex::new(jvpn_agent::AgentReport::default()));
    let task = tokio::spawn(jvpn_agent::keep_alive(agent, rx, None, report.clone()));
    (cmds, report, task, tunnel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_breaks_the_channel_loses_only_that_session() {
    let pki = TestPki::new(&["gw-fake"]).unwrap();
    // Connection 0: bytes past a gap (the agent received nothing yet).
    // Connection 1: an ack for bytes the agent never sent.
    let bad = vec![
        Kind::Data(Data {
            seq: 1_000,
            payload: vec![1u8; 10].into(),
        }),
        Kind::Ack(Ack { seq: 1 << 20 }),
    ];
    // No keep-alives announced (as from a gateway one version older): the
    // agent pings.
    let (addr, mut seen) = fake_gateway(&pki, bad, 0).await;
    let (cmds, report, task, _tunnel) = keep_alive_agent(&pki, addr);
    // Each broken session ends at the gateway explicitly, then a new HELLO.
    let mut terminated = Vec::new();
    let mut hellos = Vec::new();
    loop {
        match next(&mut seen).await {
            (i, Kind::Hello(_)) => hellos.push(i),
            (i, Kind::Terminate(t)) => terminated.push((i, t.reason)),
            // The third session is good: it carries on with pings.
            (2, Kind::Ping(_)) => break,
            _ => {}
        }
    }
    let pe = ReasonCode::ProtocolError as i32;
    // Each connection's frames reach this test through a task of its own:
    // the order between connections is not the agent's.
    terminated.sort_unstable();
    assert_eq!(terminated, [(0, pe), (1, pe)]);
    assert_eq!(hellos, [0, 1, 2]);
    // Several pings on the good session and no other frame: it stays.
    for _ in 0..5 {
        match next(&mut seen).await {
            (2, Kind::Ping(_)) => {}
            other => panic!("the good session should only ping, got {other:?}"),
        }
    }
    let r = report.lock().unwrap().clone();
    assert_eq!(r.protocol_violations, 2, "{r:?}");
    assert_eq!(r.rehandshakes, 2, "{r:?}");
    assert_eq!(
        r.rehandshake_reasons.get("channel_broken"),
        Some(&2),
        "{r:?}"
    );
    drop(cmds);
    let end = task.await.unwrap();
    assert_eq!(end.ended.as_deref(), Some("agent_closed"));
}

/// Keep-alives announced at an interval two of which do not fit in the
/// agent's silence limit (a taker in topology 3 may run another policy
/// than the one the agent was told): the agent does not rely on them and
/// pings at its interval, with pings the gateway answers (`seq` ≥ 1, not
/// the unanswered check-in `seq` 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_that_do_not_fit_the_silence_limit_are_not_relied_on() {
    let pki = TestPki::new(&["gw-fake"]).unwrap();
    // Silence limit 5 s (the policy in `hello_ok`), keep-alives every 4 s.
    let (addr, mut seen) = fake_gateway(&pki, Vec::new(), 4_000).await;
    let (cmds, _report, task, _tunnel) = keep_alive_agent(&pki, addr);
    let mut pings = Vec::new();
    while pings.len() < 5 {
        match next(&mut seen).await {
            (0, Kind::Ping(p)) => pings.push(p.seq),
            (0, Kind::Hello(h)) => assert!(h.keepalive, "the agent asks"),
            other => panic!("expected pings on the one session, got {other:?}"),
        }
    }
    assert!(pings.iter().all(|s| *s >= 1), "answered pings: {pings:?}");
    drop(cmds);
    task.await.unwrap();
}

/// A gateway that ends the session with `Terminate{protocol_error}` (its
/// channel broke there): the agent's RESUME then finds no session, and the
/// re-handshake that follows is counted as `protocol_error`, the reason
/// the gateway gave, not as the `unknown_session` it led to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_gateway_ended_for_a_protocol_error_is_remade_as_such() {
    let pki = TestPki::new(&["gw-fake"]).unwrap();
    let bad = vec![Kind::Terminate(Terminate {
        reason: ReasonCode::ProtocolError as i32,
    })];
    let (addr, mut seen) = fake_gateway(&pki, bad, 0).await;
    let (cmds, report, task, _tunnel) = keep_alive_agent(&pki, addr);
    let mut hellos = 0;
    loop {
        match next(&mut seen).await {
            (_, Kind::Hello(_)) => hellos += 1,
            // The new session carries on with pings.
            (i, Kind::Ping(_)) if i >= 1 && hellos == 2 => break,
            _ => {}
        }
    }
    let r = report.lock().unwrap().clone();
    assert_eq!(r.rehandshakes, 1, "{r:?}");
    assert_eq!(
        r.rehandshake_reasons.get("protocol_error"),
        Some(&1),
        "{r:?}"
    );
    drop(cmds);
    task.await.unwrap();
}
