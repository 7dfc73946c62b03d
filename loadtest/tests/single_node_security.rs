//! Single-node security behaviour over real processes and TLS: replay,
//! relay, forged proofs, anti-flap, TLS downgrade, ALPN and CA checks.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use jvpn_agent::{AgentConfig, AgentError, Credential};
use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::harness::{self, TestPki, eventually};
use jvpn_proto::ReasonCode as R;
use jvpn_proto::pb::session::frame::Kind;
use jvpn_proto::preamble::Preamble;

fn rejected(e: AgentError) -> (R, u64) {
    match e {
        AgentError::Rejected {
            reason,
            retry_after_ms,
            ..
        } => (reason, retry_after_ms),
        other => panic!("expected a Reject, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_relayed_and_forged_resumes_change_nothing() {
    let env = common::start(common::QUIET_TRANSPORTS).await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _first = common::hello(&mut a).await;
    tokio::time::sleep(a.switch_allowed_in()).await;

    // A genuine RESUME, captured.
    let mut t = a.open_resume().await.unwrap();
    let captured = a.build_resume(&t).unwrap();
    t.send(Kind::Resume(captured.clone())).await.unwrap();
    a.await_resume(&mut t, &captured).await.unwrap();
    let epoch = a.session.as_ref().unwrap().binding_epoch;
    assert_eq!(epoch, 2);

    // Replayed on the same connection: replay_detected, nothing changes.
    t.send(Kind::Resume(captured.clone())).await.unwrap();
    let (reason, _) = rejected(a.await_resume(&mut t, &captured).await.unwrap_err());
    assert_eq!(reason, R::ReplayDetected);
    t.echo(b"still attached").await.unwrap();

    // Sent on another connection: the proof is bound to the first one.
    let mut other = a.open_resume().await.unwrap();
    other.send(Kind::Resume(captured.clone())).await.unwrap();
    let (reason, _) = rejected(a.await_resume(&mut other, &captured).await.unwrap_err());
    assert_eq!(
        reason,
        R::UnknownSession,
        "pre-auth failures are unknown_session on the wire"
    );

    // A wrong proof: unknown_session on the wire, bad_proof in metrics.
    let mut third = a.open_resume().await.unwrap();
    let mut forged = a.build_resume(&third).unwrap();
    forged.proof[0] ^= 0x80;
    third.send(Kind::Resume(forged.clone())).await.unwrap();
    let (reason, _) = rejected(a.await_resume(&mut third, &forged).await.unwrap_err());
    assert_eq!(reason, R::UnknownSession);

    let m = env.gw.metrics().await.unwrap();
    let count = |r: &str| harness::metric_value(&m, "jvpn_gateway_resumes_total", &[("result", r)]);
    assert_eq!(count("replay_detected"), 1.0);
    assert_eq!(count("bad_proof"), 2.0, "relayed and forged");
    assert_eq!(count("ok"), 1.0);
    // Every RESUME connection above resumed TLS from the ticket of the
    // connection before it (issue 17): the forged one changed nothing
    // either.
    let tls =
        |k: &str| harness::metric_value(&m, "jvpn_gateway_tls_handshakes_total", &[("kind", k)]);
    assert_eq!(
        (tls("full"), tls("resumed")),
        (1.0, 3.0),
        "HELLO full, RESUMEs resumed"
    );
    // The session is untouched: same epoch, still attached, still echoing.
    assert_eq!(a.session.as_ref().unwrap().binding_epoch, epoch);
    t.echo(b"after all that").await.unwrap();
    let (_, body) = harness::http_get(env.gw.admin_addr, "/sessions")
        .await
        .unwrap();
    assert!(body.contains("\"attached\":1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_flap_limits_switches_and_the_retry_hint_is_honoured() {
    let env = common::start(common::FAST_POLICY).await; // 3 per minute, 300 ms cooldown
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _t = common::hello(&mut a).await;
    // Cooldown: a switch right after another is refused with a hint, then succeeds.
    let _t1 = common::resume(&mut a).await.unwrap();
    let (reason, wait) = rejected(a.resume().await.unwrap_err());
    assert_eq!(reason, R::CooldownActive);
    assert!(wait > 0 && wait <= 300, "{wait}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let _t2 = a.resume().await.unwrap();
    let _t3 = common::resume(&mut a).await.unwrap();
    // Three switches in the window: the fourth is rate limited for most of a minute.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (reason, wait) = rejected(a.resume().await.unwrap_err());
    assert_eq!(reason, R::SwitchRateLimited);
    assert!(wait > 50_000 && wait <= 60_000, "{wait}");
    // The agent's own pacing agrees with the gateway.
    assert!(a.switch_allowed_in() > Duration::from_secs(50));
}

async fn tls_failures(env: &common::Env) -> f64 {
    env.gw
        .metric(
            "jvpn_gateway_connections_rejected_total",
            &[("reason", "tls_failed")],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_12_only_clients_are_refused() {
    let env = common::start("").await;
    let prefix = Preamble::Hello { key_id: 0 }.encode().to_vec();
    let proxy = FaultProxy::with_prefix(env.gw.client_addr, prefix)
        .await
        .unwrap();
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.addr.to_string(),
            "-tls1_2",
            "-alpn",
            "jvpn/1",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("openssl is installed by .ci/run");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a TLS 1.2 handshake succeeded:\n{text}"
    );
    assert!(!text.contains("Cipher is ECDHE"), "{text}");
    eventually(Duration::from_secs(5), "tls_failed counted", || async {
        tls_failures(&env).await >= 1.0
    })
    .await
    .unwrap();
    // Control: the same tool with TLS 1.3 completes the handshake.
    let ok = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.addr.to_string(),
            "-tls1_3",
            "-alpn",
            "jvpn/1",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("TLSv1.3"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_alpn_are_closed() {
    let env = common::start("").await;
    let roots = AgentConfig::roots_from_pem(&env.pki.layout.client_ca()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(); // and no ALPN
    let mut tcp = tokio::net::TcpStream::connect(env.gw.client_addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("jvpn-dev").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::io::AsyncReadExt::read(&mut tls, &mut buf)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "the gateway closes a connection without ALPN jvpn/1");
    common::wait_rejected(&env, "alpn_mismatch", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_wrong_ca_are_refused() {
    let env = common::start("").await;
    let stranger = TestPki::new(&["g1"]).unwrap();
    let base = harness::agent_config(&env.pki, vec![env.gw.client_addr], None).unwrap();

    // An agent certificate from another agent CA.
    let wrong = AgentConfig::certificate_from_pem(
        &stranger.layout.agent_cert(0),
        &stranger.layout.agent_key(0),
    )
    .unwrap();
    let mut a = jvpn_agent::Agent::new(AgentConfig {
        credential: wrong,
        ..base.clone()
    })
    .unwrap();
    let err = a.hello().await.unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Tls(_) | AgentError::Closed | AgentError::Io(_)
        ),
        "{err:?}"
    );
    eventually(Duration::from_secs(5), "tls_failed counted", || async {
        tls_failures(&env).await >= 1.0
    })
    .await
    .unwrap();

    // A gateway certificate the agent does not trust.
    let untrusting = AgentConfig {
        roots: Arc::new(AgentConfig::roots_from_pem(&stranger.layout.client_ca()).unwrap()),
        ..base.clone()
    };
    let err = jvpn_agent::Agent::new(untrusting)
        .unwrap()
        .hello()
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Tls(_)), "{err:?}");

    // Control: the right agent CA's certificate is accepted.
    let right = AgentConfig::certificate_from_pem(
        &env.pki.layout.agent_cert(0),
        &env.pki.layout.agent_key(0),
    )
    .unwrap();
    let mut ok = jvpn_agent::Agent::new(AgentConfig {
        credential: right,
        ..base.clone()
    })
    .unwrap();
    let mut t = ok.hello().await.unwrap();
    t.echo(b"cert auth").await.unwrap();

    // And a wrong dev token is refused inside TLS.
    let bad_token = Credential::Token(zeroize::Zeroizing::new(
        b"not-the-token-0123456789".to_vec(),
    ));
    let mut b = jvpn_agent::Agent::new(AgentConfig {
        credential: bad_token,
        ..base
    })
    .unwrap();
    let (reason, _) = rejected(b.hello().await.unwrap_err());
    assert_eq!(reason, R::AuthFailed);
}

/// A targeted attack: 10,000 RESUMEs with wrong proofs for one live
/// session, from 100 sources, four per connection. The session does not
/// notice (same version, same epoch, still attached and echoing) and then
/// resumes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_resumes_from_a_hundred_sources_leave_the_session_alone() {
    let dir = tempfile::tempdir().unwrap();
    let token = "security-test-admin-token";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, token).unwrap();
    let env = common::start_with(harness::GatewayOptions {
        extra_toml: common::QUIET_TRANSPORTS.into(),
        env: vec![(
            "JVPN_GATEWAY__ADMIN_TOKEN_FILE".into(),
            token_file.display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = common::hello(&mut a).await;
    let victim = a.session.clone().unwrap();
    let lookup = format!("/sessions/{}", hex::encode(victim.id.as_bytes()));
    let state = || async {
        let (code, body) = harness::http_request(env.gw.admin_addr, "GET", &lookup, Some(token))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let before = state().await;

    const SOURCES: usize = 100;
    const CONNS_PER_SOURCE: usize = 25;
    const PER_CONN: usize = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SOURCES {
        let mut attacker = harness::agent(
            &env.pki,
            env.gw.client_addr,
            Some(harness::source_ip(1_000 + s)),
        )
        .unwrap();
        attacker.session = Some(victim.clone());
        tasks.spawn(async move {
            let mut refused = 0usize;
            for _ in 0..CONNS_PER_SOURCE {
                let mut c = attacker.open_resume().await.unwrap();
                for _ in 0..PER_CONN {
                    let mut forged = attacker.build_resume(&c).unwrap();
                    forged.proof[7] ^= 0x01;
                    c.send(Kind::Resume(forged.clone())).await.unwrap();
                    let (reason, _) =
                        rejected(attacker.await_resume(&mut c, &forged).await.unwrap_err());
                    assert_eq!(reason, R::UnknownSession);
                    refused += 1;
                }
            }
            refused
        });
        // At most a few sources' connections in flight at once.
        if tasks.len() >= 8 {
            let n = tasks.join_next().await.unwrap().unwrap();
            assert_eq!(n, CONNS_PER_SOURCE * PER_CONN);
        }
    }
    while let Some(n) = tasks.join_next().await {
        assert_eq!(n.unwrap(), CONNS_PER_SOURCE * PER_CONN);
    }

    let bad = env
        .gw
        .metric("jvpn_gateway_resumes_total", &[("result", "bad_proof")])
        .await
        .unwrap();
    assert_eq!(bad, (SOURCES * CONNS_PER_SOURCE * PER_CONN) as f64);
    let after = state().await;
    for k in ["state", "state_version", "binding_epoch", "attached"] {
        assert_eq!(after[k], before[k], "{k} changed under the attack");
    }
    t.echo(b"unaffected").await.unwrap();
    tokio::time::sleep(a.switch_allowed_in()).await;
    drop(std::mem::replace(
        &mut t,
        common::resume(&mut a).await.unwrap(),
    ));
    assert_eq!(
        a.session.as_ref().unwrap().binding_epoch,
        victim.binding_epoch + 1
    );
    t.echo(b"resumed").await.unwrap();
}
