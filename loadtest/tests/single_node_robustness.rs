//! Bad input at the listener, a broken event sink, the metrics endpoint, and
//! the quick-start demo itself.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::harness::{self, GatewayOptions, eventually};
use jvpn_proto::preamble::Preamble;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the gateway closes the connection (or 10 s pass).
async fn closed_by_gateway(s: &mut TcpStream) -> bool {
    closed_by_server(s, Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_closed_and_other_sessions_carry_on() {
    let env = common::start(&format!(
        "[timeouts]\npreamble_timeout_ms = 300\ntls_handshake_timeout_ms = 500\n\
             first_frame_timeout_ms = 500\n{}",
        common::QUIET_TRANSPORTS
    ))
    .await;
    let addr = env.gw.client_addr;
    // A healthy session alongside.
    let mut good = harness::agent(&env.pki, addr, Some(harness::source_ip(7))).unwrap();
    let mut gt = common::hello(&mut good).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);

    // Random bytes instead of a preamble.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut junk = [0u8; 64];
    rng.fill_bytes(&mut junk);
    s.write_all(&junk).await.unwrap();
    assert!(closed_by_gateway(&mut s).await);

    // A slow preamble: 10 bytes, then nothing.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 0 }.encode()[..10])
        .await
        .unwrap();
    assert!(closed_by_gateway(&mut s).await);

    // A TLS handshake that never starts after a valid preamble.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    assert!(closed_by_gateway(&mut s).await);

    // TLS garbage after a valid preamble.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Preamble::Hello { key_id: 0 }.encode())
        .await
        .unwrap();
    let mut garbage = [0u8; 300];
    rng.fill_bytes(&mut garbage);
    garbage[0] = 0x16;
    s.write_all(&garbage).await.unwrap();
    assert!(closed_by_gateway(&mut s).await);

    // An oversize frame on an attached session.
    let mut victim = harness::agent(&env.pki, addr, Some(harness::source_ip(8))).unwrap();
    let mut vt = common::hello(&mut victim).await;
    vt.send_raw(&[0x00, 0x10, 0x00, 0x00, 1, 2, 3])
        .await
        .unwrap(); // 1 MiB announced
    match vt.recv().await {
        Err(jvpn_agent::AgentError::Terminated(r)) => {
            assert_eq!(r, jvpn_proto::ReasonCode::FrameTooLarge)
        }
        other => panic!("expected Terminate(frame_too_large), got {other:?}"),
    }

    for (reason, want) in [
        ("bad_preamble", 1.0),
        ("preamble_timeout", 1.0),
        ("tls_timeout", 1.0),
        ("tls_failed", 1.0),
        ("frame_too_large", 1.0),
    ] {
        eventually(Duration::from_secs(5), reason, || async {
            common::rejected(&env, reason).await == want
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", env.gw.log()));
    }
    // The healthy session never noticed.
    gt.echo(b"unaffected").await.unwrap();
}

async fn some_events_dropped(env: &common::Env) {
    eventually(Duration::from_secs(5), "events dropped", || async {
        env.gw
            .metric("jvpn_gateway_events_dropped_total", &[])
            .await
            .unwrap()
            > 0.0
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_nobody_reads_drops_events_and_never_slows_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("events.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let env = common::start_with(GatewayOptions {
        // Appended right after the generated [events] table.
        extra_toml: "queue_capacity = 4\n".into(),
        events_path: Some(fifo.display().to_string()),
        ..Default::default()
    })
    .await;
    let mut agents = Vec::new();
    for i in 0..5 {
        let mut a =
            harness::agent(&env.pki, env.gw.client_addr, Some(harness::source_ip(i))).unwrap();
        let t = common::hello(&mut a).await;
        agents.push((a, t));
    }
    for (a, t) in agents.iter_mut() {
        *t = common::resume(a).await.unwrap();
        t.echo(b"still flowing").await.unwrap();
    }
    some_events_dropped(&env).await;
    assert_eq!(
        env.gw
            .metric("jvpn_gateway_events_written_total", &[])
            .await
            .unwrap(),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_carry_no_identifiers() {
    let env = common::start("").await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, Some(harness::source_ip(3))).unwrap();
    let mut t = common::hello(&mut a).await;
    t.echo(b"x").await.unwrap();
    let _t = common::resume(&mut a).await.unwrap();
    let text = env.gw.metrics().await.unwrap();
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by .ci/run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // No session id, address or key in any label or value line.
    let sid = a.session.as_ref().unwrap().id.to_string();
    assert!(!text.contains(&sid));
    assert!(!text.contains("127.0."), "an address leaked into metrics");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split('{').nth(1).unwrap_or("");
        let hexrun = labels
            .split(|c: char| !c.is_ascii_hexdigit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(hexrun < 16, "a long hex string in labels: {line}");
    }
    assert!(
        text.contains("jvpn_gateway_sessions{state=\"attached\"}")
            || text.contains("jvpn_gateway_hellos_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_demo_runs_and_reports_zero_invariant_violations() {
    let stdout = common::loadtest_ok(
        ["demo", "--single-node", "--json", "--agents", "10"],
        Duration::from_secs(120),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["sessions_established"], 10);
    assert_eq!(v["resumes_ok"], 30, "three jumps per session");
    assert_eq!(v["rehandshakes"], 0);
    assert_eq!(v["echo_failed"], 0);
    assert!(v["resumes_rejected"].is_object());
    for k in ["silent_migrations", "forced_rehandshakes", "lost_sessions"] {
        assert_eq!(v[k], 0, "{k}");
    }
    // One incarnation cannot be dual-active: not checked, not a 0.
    assert!(v["dual_active_detected"].is_null(), "{v}");
    assert_eq!(v["gateway_exit_code"], 0);
    // Every transition was scanned: per session 1 handshake, 3 × 2 switch
    // transitions, 1 termination (more if the gateway saw a transport die first).
    assert!(
        v["events_checked"].as_u64().unwrap() >= 80,
        "{}",
        v["events_checked"]
    );
}

/// `n` HELLOs at once, each from its own source: how many got a session and
/// how many were refused `overloaded` before TLS.
async fn concurrent_hellos(env: &common::Env, n: usize) -> (usize, usize) {
    use jvpn_agent::AgentError;
    use jvpn_proto::preamble::Status;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut a = harness::agent(
                &env.pki,
                env.gw.client_addr,
                Some(harness::source_ip(100 + i)),
            )
            .unwrap();
            tokio::spawn(async move {
                match a.hello().await {
                    Ok(_) => Ok(()),
                    Err(AgentError::Status(s)) if s.status == Status::Overloaded => Err(true),
                    Err(e) => panic!("hello failed otherwise: {e}"),
                }
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_slots_wait_in_the_queue_instead_of_being_refused() {
    // One slot: 40 simultaneous HELLOs must queue, and all get a session.
    let env = common::start(
        "[admission]\nmax_tls_handshakes_in_flight = 1\ntls_queue_max = 256\ntls_queue_wait_ms = 5000\n",
    )
    .await;
    let (ok, refused) = concurrent_hellos(&env, 40).await;
    assert_eq!((ok, refused), (40, 0));
    let m = env.gw.metrics().await.unwrap();
    let full = harness::metric_value(
        &m,
        "jvpn_gateway_rate_limited_total",
        &[("stage", "tls_queue_full")],
    );
    assert_eq!(full, 0.0);

    // The same burst without a waiting room: refusals, counted by stage.
    let env =
        common::start("[admission]\nmax_tls_handshakes_in_flight = 1\ntls_queue_max = 0\n").await;
    let (ok, refused) = concurrent_hellos(&env, 40).await;
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    let m = env.gw.metrics().await.unwrap();
    let full = harness::metric_value(
        &m,
        "jvpn_gateway_rate_limited_total",
        &[("stage", "tls_queue_full")],
    );
    assert_eq!(full, refused as f64);
}

/// True when the server closes `s` within `within` (reading whatever it
/// sends until then) without an HTTP 200 among it.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(k)) if String::from_utf8_lossy(&buf[..k]).contains(" 200 ") => return false,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Slowloris on the admin port: idle connections are closed after the
/// header timeout, connections past the cap are closed at once, and the
/// port serves again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_hold_the_admin_port() {
    use jvpn_runtime::admin::{ADMIN_HEADER_TIMEOUT, MAX_ADMIN_CONNECTIONS};
    let env = common::start("").await;
    let admin = env.gw.admin_addr;
    let n = MAX_ADMIN_CONNECTIONS + 50;
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(admin).await.unwrap();
        // Half a request line, then nothing.
        s.write_all(b"GET /metr").await.unwrap();
        idle.push(s);
    }
    // The ones past the cap (the last accepted) are closed at once...
    let deadline = ADMIN_HEADER_TIMEOUT * 3;
    let started = std::time::Instant::now();
    for s in idle.iter_mut().rev().take(n - MAX_ADMIN_CONNECTIONS) {
        assert!(
            closed_by_server(s, deadline).await,
            "a connection past the cap was served"
        );
    }
    assert!(
        started.elapsed() < ADMIN_HEADER_TIMEOUT / 2,
        "connections past the cap were not closed at once ({:?})",
        started.elapsed()
    );
    // ...and every other one within the header timeout, none answered.
    for s in idle.iter_mut().take(MAX_ADMIN_CONNECTIONS) {
        assert!(
            closed_by_server(s, deadline).await,
            "an idle admin connection stayed open past {deadline:?}"
        );
    }
    drop(idle);
    let (code, _) = harness::http_get(admin, "/healthz").await.unwrap();
    assert_eq!(code, 200);
}

/// A full source table fails closed without shutting known sources out:
/// new sources share one overflow bucket (counted), sources already in the
/// table keep their own buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_limiter_table_uses_the_overflow_bucket_and_spares_known_sources() {
    use jvpn_agent::AgentError;
    use jvpn_proto::preamble::Status;
    // Buckets refill over 300 s, so none counts as refilled (evictable)
    // while the test runs.
    let env = common::start(
        "[admission]\nsource_table_capacity = 4\nper_source_rate_per_s = 0.01\nper_source_burst = 3\n",
    )
    .await;
    let addr = env.gw.client_addr;
    let hello = |i: usize| {
        let mut a = harness::agent(&env.pki, addr, Some(harness::source_ip(500 + i))).unwrap();
        async move {
            match a.hello().await {
                Ok(_) => true,
                Err(AgentError::Status(s)) if s.status == Status::Overloaded => false,
                Err(e) => panic!("hello failed otherwise: {e}"),
            }
        }
    };
    // Four known sources, one HELLO each (two tokens left each).
    for i in 0..4 {
        assert!(hello(i).await, "known source {i}");
    }
    // Twenty new sources: together they get the overflow bucket's burst.
    let mut admitted = 0;
    for i in 4..24 {
        admitted += usize::from(hello(i).await);
    }
    assert_eq!(admitted, 3, "the overflow bucket admits its burst, no more");
    let overflow = env
        .gw
        .metric("jvpn_gateway_rate_limit_overflow_total", &[])
        .await
        .unwrap();
    assert_eq!(overflow, 20.0);
    // Known sources are unaffected: each still has its own two tokens.
    for i in 0..4 {
        assert!(hello(i).await, "known source {i}, second HELLO");
        assert!(hello(i).await, "known source {i}, third HELLO");
    }
}

/// Slowloris on the client port: connections that never send a preamble
/// are closed at `preamble_timeout_ms`, and an agent connecting meanwhile
/// gets its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed_and_agents_still_connect() {
    let env = common::start("[timeouts]\npreamble_timeout_ms = 500\n").await;
    let addr = env.gw.client_addr;
    let mut idle = Vec::new();
    for i in 0..300 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(std::net::SocketAddr::new(
            harness::source_ip(2_000 + i % 30),
            0,
        ))
        .unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        // A few bytes of a preamble, then nothing.
        s.write_all(b"JVPN").await.unwrap();
        idle.push(s);
    }
    let mut a = harness::agent(&env.pki, addr, Some(harness::source_ip(7))).unwrap();
    let mut t = common::hello(&mut a).await;
    t.echo(b"through the slowloris").await.unwrap();
    for s in &mut idle {
        assert!(
            closed_by_server(s, Duration::from_secs(5)).await,
            "an idle client connection outlived the preamble timeout"
        );
    }
    common::wait_rejected(&env, "preamble_timeout", 300.0).await;
}

/// Issue 18 M1: an authenticated agent that stops reading while the
/// gateway writes to it (here: the echoes of its own data) must not pin the
/// gateway's task, descriptor and connection slot for ever: a write that
/// cannot finish within the session's heartbeat timeout ends the transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_is_let_go_after_the_heartbeat_timeout() {
    use jvpn_proto::pb::session::{Data, frame::Kind};
    let env = common::start("[policy]\nheartbeat_timeout_ms = 1000\n").await;
    let addr = env.gw.client_addr;
    let mut agent = harness::agent(&env.pki, addr, Some(harness::source_ip(9))).unwrap();
    let mut t = common::hello(&mut agent).await;
    let open = || async {
        env.gw
            .metric("jvpn_gateway_connections_open", &[])
            .await
            .unwrap()
    };
    assert_eq!(open().await, 1.0);
    // Data until the pipes are full both ways: the echoes are never read.
    let payload = bytes::Bytes::from(vec![7u8; 16 * 1024]);
    for seq in 1.. {
        let d = Kind::Data(Data {
            seq,
            payload: payload.clone(),
        });
        match tokio::time::timeout(Duration::from_millis(500), t.send(d)).await {
            Ok(Ok(())) => assert!(seq < 100_000, "the gateway never pushed back"),
            _ => break,
        }
    }
    // The gateway is now blocked writing to us; it must let go.
    eventually(
        Duration::from_secs(10),
        "the gateway closed the stuck connection",
        || async { open().await == 0.0 },
    )
    .await
    .unwrap();
    drop(t);
}

/// An event path whose directory is missing: the gateway serves anyway
/// (`check` refuses it), drops and counts the events, and its warning says
/// which path (issue 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sink_that_cannot_be_opened_is_named_in_the_warning() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("events.jsonl");
    let env = common::start_with(GatewayOptions {
        events_path: Some(missing.display().to_string()),
        ..Default::default()
    })
    .await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    drop(common::hello(&mut a).await);
    some_events_dropped(&env).await;
    let log = env.gw.log();
    let warning = log
        .lines()
        .find(|l| l.contains("event sink cannot be opened"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains(&missing.display().to_string()),
        "{warning}"
    );
}

/// An agent that ends its session because the gateway broke the channel's
/// rules says so (`Terminate{protocol_error}`): the gateway records that
/// reason, not a normal close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ending_its_session_for_a_protocol_error_is_not_counted_as_a_close() {
    use jvpn_proto::pb::session::{Terminate, frame::Kind};
    let env = common::start("").await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = common::hello(&mut a).await;
    t.send(Kind::Terminate(Terminate {
        reason: jvpn_proto::ReasonCode::ProtocolError as i32,
    }))
    .await
    .unwrap();
    let ended = |reason: &'static str| {
        let env = &env;
        async move {
            env.gw
                .metric(
                    "jvpn_gateway_state_transitions_total",
                    &[("to", "terminated"), ("reason", reason)],
                )
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(5), "the session ended", || async {
        ended("protocol_error").await + ended("agent_closed").await >= 1.0
    })
    .await
    .unwrap();
    assert_eq!(ended("protocol_error").await, 1.0);
    assert_eq!(ended("agent_closed").await, 0.0);
}
