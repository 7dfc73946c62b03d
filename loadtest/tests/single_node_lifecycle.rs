//! Lifecycle over real processes: a lost ResumeOk, anti-flap across a full
//! switch window, graceful drain, and the development PKI's file modes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_agent::AgentError;
use jvpn_loadtest::harness::{self, eventually};
use jvpn_proto::ReasonCode as R;
use jvpn_proto::pb::session::frame::Kind;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_resume_ok_is_recovered_with_the_current_binding_epoch() {
    let env = common::start(&format!(
        "{}switch_cooldown_ms = 100\n",
        common::QUIET_TRANSPORTS
    ))
    .await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _t = common::hello(&mut a).await;
    tokio::time::sleep(a.switch_allowed_in()).await;
    // A RESUME commits on the gateway, but its ResumeOk never reaches us.
    let mut lost = a.open_resume().await.unwrap();
    let r = a.build_resume(&lost).unwrap();
    lost.send(Kind::Resume(r)).await.unwrap();
    eventually(Duration::from_secs(5), "the switch to commit", || async {
        env.gw
            .metric("jvpn_gateway_resumes_total", &[("result", "ok")])
            .await
            .unwrap()
            == 1.0
    })
    .await
    .unwrap();
    drop(lost);
    assert_eq!(
        a.session.as_ref().unwrap().binding_epoch,
        1,
        "the agent never saw epoch 2"
    );
    // The agent's retry learns the epoch (stale_binding) and commits with its old key.
    tokio::time::sleep(Duration::from_millis(150)).await; // the gateway's cooldown
    let mut t = common::resume(&mut a).await.unwrap();
    assert_eq!(a.session.as_ref().unwrap().binding_epoch, 3);
    t.echo(b"recovered").await.unwrap();
    let stale = env
        .gw
        .metric("jvpn_gateway_resumes_total", &[("result", "stale_binding")])
        .await
        .unwrap();
    assert_eq!(stale, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_rate_limited_then_success_after_the_hinted_wait() {
    // 2 switches per minute; the TTL (1.5 s) is far shorter than the wait, so
    // this also proves anti-flap never kills a session inside its TTL.
    let policy =
        common::FAST_POLICY.replace("max_switches_per_min = 3", "max_switches_per_min = 2");
    let env = common::start(&policy).await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _t0 = common::hello(&mut a).await;
    let _t1 = common::resume(&mut a).await.unwrap();
    let _t2 = common::resume(&mut a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wait = match a.resume().await {
        Err(AgentError::Rejected {
            reason: R::SwitchRateLimited,
            retry_after_ms,
            ..
        }) => retry_after_ms,
        other => panic!("expected switch_rate_limited, got {other:?}"),
    };
    assert!(wait > 50_000, "{wait}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut t = a
        .resume()
        .await
        .expect("allowed again after retry_after_ms");
    t.echo(b"back").await.unwrap();
}

/// SIGTERM, then wait until the gateway says it is draining.
async fn sigterm_and_wait_draining(env: &common::Env) {
    env.gw.signal(Signal::SIGTERM).unwrap();
    eventually(Duration::from_secs(2), "/readyz 503", || async {
        matches!(
            harness::http_get(env.gw.admin_addr, "/readyz").await,
            Ok((503, _))
        )
    })
    .await
    .unwrap();
}

/// A session whose transport was gone when the drain began (so the
/// drain's GoAway went nowhere) and that resumes during the drain is told
/// GoAway on its new transport, so its agent can move before the
/// deadline, not only `Terminate{draining}` at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_during_a_drain_is_told_goaway() {
    let mut env = common::start(
        "[timeouts]\ndrain_timeout_ms = 4000\n[policy]\nheartbeat_timeout_ms = 10000\ntransport_lost_ttl_ms = 20000\n",
    )
    .await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let t = common::hello(&mut a).await;
    // The transport goes before the drain.
    drop(t);
    sigterm_and_wait_draining(&env).await;
    let mut t = common::resume(&mut a)
        .await
        .expect("resumed while draining");
    let told = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match t.recv().await {
                Ok(Kind::GoAway(g)) => return g,
                Ok(_) => {}
                Err(e) => panic!("no GoAway before {e}"),
            }
        }
    })
    .await
    .expect("no GoAway within 2 s of the resume");
    assert_eq!(told.reason, R::Draining as i32);
    assert!(told.deadline_ms > 0 && told.deadline_ms < 4000, "{told:?}");
    let status = tokio::time::timeout(Duration::from_secs(6), env.gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_goaway_then_terminate_and_exits_zero() {
    // These raw transports send no pings: keep liveness out of the way.
    let mut env = common::start(
        "[timeouts]\ndrain_timeout_ms = 3000\n[policy]\nheartbeat_timeout_ms = 10000\ntransport_lost_ttl_ms = 20000\n",
    )
    .await;
    let mut agents = Vec::new();
    for i in 0..4 {
        let mut a =
            harness::agent(&env.pki, env.gw.client_addr, Some(harness::source_ip(i))).unwrap();
        let t = common::hello(&mut a).await;
        agents.push((a, t));
    }
    let started = std::time::Instant::now();
    sigterm_and_wait_draining(&env).await;
    // New sessions are refused with an explicit reason.
    let mut late =
        harness::agent(&env.pki, env.gw.client_addr, Some(harness::source_ip(9))).unwrap();
    match late.hello().await {
        Err(AgentError::Rejected { reason, .. }) => assert_eq!(reason, R::Draining),
        other => panic!("expected draining, got {other:?}"),
    }
    // Every session hears GoAway, then Terminate{draining}.
    for (_, t) in agents.iter_mut() {
        let mut saw_goaway = false;
        loop {
            match t.recv().await {
                Ok(Kind::GoAway(g)) => {
                    assert_eq!(g.reason, R::Draining as i32);
                    saw_goaway = true;
                }
                Ok(_) => {}
                Err(AgentError::Terminated(r)) => {
                    assert_eq!(r, R::Draining);
                    break;
                }
                Err(e) => panic!("expected Terminate(draining), got {e}"),
            }
        }
        assert!(saw_goaway);
    }
    let status = tokio::time::timeout(Duration::from_secs(5), env.gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() <= Duration::from_millis(3_500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn pki_private_files_are_0600() {
    use std::os::unix::fs::PermissionsExt;
    let pki = jvpn_loadtest::harness::TestPki::new(&["g1", "g2"]).unwrap();
    let l = &pki.layout;
    for p in [
        l.gateway_key("g1"),
        l.gateway_key("g2"),
        l.agent_key(0),
        l.secret(),
        l.dev_token(),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let cert = std::fs::metadata(l.gateway_cert("g1"))
        .unwrap()
        .permissions()
        .mode()
        & 0o077;
    assert_ne!(cert, 0, "certificates are public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_state_dir_refuses_to_start() {
    let pki = harness::TestPki::new(&["g1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let opts = harness::GatewayOptions {
        extra_toml: String::new(),
        env: vec![(
            "JVPN_GATEWAY__STATE_DIR".into(),
            state.display().to_string(),
        )],
        ..Default::default()
    };
    let first =
        harness::LocalGateway::start(&common::launcher(), &pki, &dir.path().join("a"), &opts)
            .await
            .unwrap();
    let second =
        harness::LocalGateway::start(&common::launcher(), &pki, &dir.path().join("b"), &opts).await;
    let err = format!("{:#}", second.unwrap_err());
    assert!(err.contains("is locked by another gateway"), "{err}");
    let pid = first.pid().unwrap().to_string();
    assert!(err.contains(&pid), "the message names the holder: {err}");
    // The first one is unaffected.
    assert!(matches!(
        harness::http_get(first.admin_addr, "/readyz").await,
        Ok((200, _))
    ));
}

/// A `Type=notify` unit: the gateway says `READY=1` once it listens and
/// `STOPPING=1` when asked to stop, on the socket systemd names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut env = common::start_with(harness::GatewayOptions {
        env: vec![("NOTIFY_SOCKET".into(), sock_path.display().to_string())],
        ..Default::default()
    })
    .await;
    let mut buf = [0u8; 512];
    let within = Duration::from_secs(10);
    let n = tokio::time::timeout(within, sock.recv(&mut buf))
        .await
        .expect("no READY within 10 s")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    env.gw.signal(Signal::SIGTERM).unwrap();
    let n = tokio::time::timeout(within, sock.recv(&mut buf))
        .await
        .expect("no STOPPING within 10 s")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    // A SIGTERM right after READY is a drain, never the default action
    // (the handler is installed before readiness is announced).
    let status = tokio::time::timeout(within, env.gw.wait())
        .await
        .expect("no exit within 10 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// SIGHUP: a new policy reaches new sessions only, a new certificate is
/// served at once, and an invalid or restart-only change is refused,
/// counted, and leaves the running configuration as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policy_limits_and_certificates_and_refuses_bad_changes() {
    let env = common::start("").await;
    let gw = &env.gw;
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    let hello_policy = |pki: &harness::TestPki, token_from: &harness::TestPki| {
        let mut cfg = harness::agent_config(pki, vec![gw.client_addr], None).unwrap();
        cfg.credential = jvpn_agent::Credential::Token(zeroize::Zeroizing::new(
            token_from.dev_token().unwrap().into_bytes(),
        ));
        async move {
            let mut a = jvpn_agent::Agent::new(cfg).unwrap();
            a.hello()
                .await
                .map(|_| a.session.unwrap().policy.heartbeat_interval_ms)
        }
    };
    let count = |name: &'static str| async move { gw.metric(name, &[]).await.unwrap() };
    let reload = |text: String, ok: f64, failed: f64| async move {
        std::fs::write(&gw.config_path, text).unwrap();
        gw.signal(Signal::SIGHUP).unwrap();
        eventually(Duration::from_secs(5), "reload counted", || async {
            count("jvpn_gateway_config_reloads_total").await == ok
                && count("jvpn_gateway_config_reload_failures_total").await == failed
        })
        .await
        .unwrap();
    };
    assert_eq!(hello_policy(&env.pki, &env.pki).await.unwrap(), 500);

    // A valid policy change: new sessions get it.
    let slower = format!("{original}\n[policy]\nheartbeat_interval_ms = 700\n");
    reload(slower.clone(), 1.0, 0.0).await;
    assert_eq!(hello_policy(&env.pki, &env.pki).await.unwrap(), 700);

    // Invalid (timeout not above the interval): refused, 700 stays.
    let bad =
        format!("{original}\n[policy]\nheartbeat_interval_ms = 700\nheartbeat_timeout_ms = 600\n");
    reload(bad, 1.0, 1.0).await;
    assert_eq!(hello_policy(&env.pki, &env.pki).await.unwrap(), 700);

    // A restart-only key (the listener address): refused.
    let moved = slower.replace(
        "client_addr = \"127.0.0.1:0\"",
        "client_addr = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, slower);
    reload(moved, 1.0, 2.0).await;
    assert!(
        gw.log()
            .contains("client_addr cannot change without a restart"),
        "{}",
        gw.log()
    );

    // A new key id for the same secret is no rotation: refused (issue 18 M2).
    let secret_path = env.pki.layout.secret().display().to_string();
    assert!(slower.contains(&secret_path));
    let text = std::fs::read_to_string(&secret_path).unwrap();
    let (id, hex) = text.trim().split_once(':').unwrap();
    let renamed = env.dir.path().join("renamed.secret");
    let new_id = id.parse::<u8>().unwrap().wrapping_add(1);
    std::fs::write(&renamed, format!("{new_id}:{hex}\n")).unwrap();
    std::fs::set_permissions(
        &renamed,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    reload(
        slower.replace(&secret_path, &renamed.display().to_string()),
        1.0,
        3.0,
    )
    .await;
    assert!(
        gw.log()
            .contains("the key id changed but the secret did not"),
        "{}",
        gw.log()
    );

    // A certificate from another CA: served from the next connection on.
    let other = harness::TestPki::new(&["g1"]).unwrap();
    let old_cert = env.pki.layout.gateway_cert("g1").display().to_string();
    let old_key = env.pki.layout.gateway_key("g1").display().to_string();
    assert!(slower.contains(&old_cert) && slower.contains(&old_key));
    let recert = slower
        .replace(
            &old_cert,
            &other.layout.gateway_cert("g1").display().to_string(),
        )
        .replace(
            &old_key,
            &other.layout.gateway_key("g1").display().to_string(),
        );
    reload(recert, 2.0, 3.0).await;
    assert!(
        matches!(
            hello_policy(&env.pki, &env.pki).await,
            Err(AgentError::Tls(_))
        ),
        "the old certificate is still served"
    );
    assert_eq!(hello_policy(&other, &env.pki).await.unwrap(), 700);

    // Admission limits: one connection per source from now on.
    let strict = format!(
        "{}\n[admission]\nper_source_rate_per_s = 0.01\nper_source_burst = 1\n",
        std::fs::read_to_string(&gw.config_path).unwrap()
    );
    reload(strict, 3.0, 3.0).await;
    let mut cfg =
        harness::agent_config(&other, vec![gw.client_addr], Some(harness::source_ip(50))).unwrap();
    cfg.credential = jvpn_agent::Credential::Token(zeroize::Zeroizing::new(
        env.pki.dev_token().unwrap().into_bytes(),
    ));
    let mut a = jvpn_agent::Agent::new(cfg).unwrap();
    assert!(a.hello().await.is_ok());
    match a.hello().await {
        Err(AgentError::Status(s)) => {
            assert_eq!(s.status, jvpn_proto::preamble::Status::Overloaded)
        }
        other => panic!(
            "second connection from one source admitted: {:?}",
            other.err()
        ),
    }
}

/// The admin port's operator actions: a session looked up by id and a
/// drain started over HTTP, both behind the bearer token; refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_session_lookup_and_drain() {
    use jvpn_loadtest::harness::http_request;
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef-operator";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut env = common::start_with(harness::GatewayOptions {
        env: vec![(
            "JVPN_GATEWAY__ADMIN_TOKEN_FILE".into(),
            token_file.display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let admin = env.gw.admin_addr;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = common::hello(&mut a).await;
    let id = hex::encode(a.session.as_ref().unwrap().id.as_bytes());
    let path = format!("/sessions/{id}");

    for bearer in [None, Some("not-the-token-at-all")] {
        let (code, _) = http_request(admin, "GET", &path, bearer).await.unwrap();
        assert_eq!(code, 401, "{bearer:?}");
    }
    let (code, body) = http_request(admin, "GET", &path, Some(token))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "attached");
    assert_eq!(v["binding_epoch"], 1);
    assert_eq!(v["attached"], true);
    let unknown = format!("/sessions/{}", "00".repeat(16));
    let (code, _) = http_request(admin, "GET", &unknown, Some(token))
        .await
        .unwrap();
    assert_eq!(code, 404);
    let (code, _) = http_request(admin, "GET", "/drain", Some(token))
        .await
        .unwrap();
    assert_eq!(code, 405, "a drain needs POST");
    assert!(
        !env.gw.log().contains(&id),
        "the session id reached the log"
    );

    // A leaked token revoked: the file rewritten, SIGHUP. The old token
    // no longer passes, the new one does (it used to be kept until a
    // restart, while the reload said it had applied).
    let token = "fedcba9876543210-rotated";
    let reloads = || env.gw.metric("jvpn_gateway_config_reloads_total", &[]);
    let before = reloads().await.unwrap();
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    env.gw.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually(Duration::from_secs(10), "the reload applied", || async {
        reloads().await.unwrap_or(0.0) > before
    })
    .await
    .unwrap();
    let (code, _) = http_request(admin, "GET", &path, Some("0123456789abcdef-operator"))
        .await
        .unwrap();
    assert_eq!(code, 401, "the revoked token still passes");
    let (code, _) = http_request(admin, "GET", &path, Some(token))
        .await
        .unwrap();
    assert_eq!(code, 200, "the new token");

    // POST /drain: readyz goes 503, the session is told, the process exits 0.
    let (code, _) = http_request(admin, "POST", "/drain", Some(token))
        .await
        .unwrap();
    assert_eq!(code, 202);
    eventually(Duration::from_secs(2), "readyz 503", || async {
        matches!(harness::http_get(admin, "/readyz").await, Ok((503, _)))
    })
    .await
    .unwrap();
    let told = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            match t.recv().await {
                Ok(Kind::GoAway(_)) | Ok(Kind::Terminate(_)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(told, "the session was not told about the drain");
    drop(t);
    let status = tokio::time::timeout(Duration::from_secs(40), env.gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    // Without a configured token the actions are disabled.
    let other = common::start("").await;
    let (code, _) = http_request(other.gw.admin_addr, "POST", "/drain", Some(token))
        .await
        .unwrap();
    assert_eq!(code, 403);
}

/// Every test that pauses a process assumes it runs no more code once the
/// signal call returns. `kill(SIGSTOP)` alone does not give that: the
/// stop takes effect as each thread is next scheduled, so a busy machine
/// lets a "paused" gateway serve for a while (CI saw one send a stream's
/// bytes to a destination after its pause). The harness waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_is_stopped_in_every_thread_once_sigstop_returns() {
    let env = common::start("").await;
    let pid = env.gw.pid().unwrap();
    let states = || -> Vec<(String, char)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some((t.display().to_string(), state))
            })
            .collect()
    };
    for _ in 0..50 {
        env.gw.signal(Signal::SIGSTOP).unwrap();
        let running: Vec<_> = states().into_iter().filter(|(_, s)| *s != 'T').collect();
        assert!(running.is_empty(), "threads not stopped yet: {running:?}");
        env.gw.signal(Signal::SIGCONT).unwrap();
    }
    // And it runs again after SIGCONT.
    assert_eq!(
        harness::http_get(env.gw.admin_addr, "/readyz")
            .await
            .unwrap()
            .0,
        200
    );
}
