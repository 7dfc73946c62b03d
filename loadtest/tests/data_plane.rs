//! The data plane end to end (issue 15), real gateway process, real TLS:
//! application bytes through the session to a destination and back,
//! byte-exact while the transports under the session are cut again and
//! again; refusals by the egress policy; real `curl` through the agent's
//! SOCKS5 and HTTP CONNECT front door.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jvpn_agent::streams::{StreamError, Tunnel};
use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::harness::{self, eventually};
use jvpn_loadtest::streamload::{front_door, pattern};
use jvpn_proto::stream::{Refusal, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Loopback destinations are protected unless a rule names them.
const LOOPBACK_ALLOWED: &str = jvpn_loadtest::streamload::LOOPBACK_EGRESS;

async fn echo_server() -> SocketAddr {
    jvpn_loadtest::streamload::echo_destination().await.unwrap()
}

/// A minimal HTTP/1.1 server: every GET gets `body`.
async fn http_server(body: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let h = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(h.as_bytes()).await;
                let _ = c.write_all(&body).await;
                let _ = c.shutdown().await;
            });
        }
    });
    addr
}

/// Runs curl with `args`, failing on HTTP errors, the body into `file`.
async fn curl_to_file(file: &std::path::Path, args: &[String]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "60",
            "-o",
        ])
        .arg(file)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn run_agent(env: &common::Env, server: SocketAddr) -> common::Streaming {
    common::streaming_agent(&env.pki, vec![server])
}

/// Writes `data` into a stream to the echo server and reads it all back.
async fn through_echo(tunnel: &Tunnel, echo: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = tunnel.connect(&common::target(echo)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_stay_byte_exact_while_transports_are_cut() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[policy]\nswitch_cooldown_ms = 100\nmax_switches_per_min = 600\n"
    ))
    .await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    let echo = echo_server().await;
    let a = run_agent(&env, proxy.addr);
    const STREAMS: u64 = 4;
    const LEN: usize = 8 << 20;
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let tunnel = a.tunnel.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(s, LEN);
            let back = through_echo(&tunnel, echo, data.clone()).await;
            assert_eq!(
                back.len(),
                data.len(),
                "stream {s}: bytes lost or duplicated"
            );
            assert!(back == data, "stream {s}: bytes differ");
        }));
    }
    // Cut the session's transport again and again while the streams run,
    // each time after the agent reattached and moved bytes again.
    let mut cuts = 0;
    while !tasks.iter().all(|t| t.is_finished()) && cuts < 10 {
        let before = env
            .gw
            .metric(
                "jvpn_gateway_stream_bytes_total",
                &[("direction", "to_destination")],
            )
            .await
            .unwrap();
        eventually(Duration::from_secs(20), "bytes move again", || async {
            let now = env
                .gw
                .metric(
                    "jvpn_gateway_stream_bytes_total",
                    &[("direction", "to_destination")],
                )
                .await
                .unwrap_or(0.0);
            now > before || tasks.iter().all(|t| t.is_finished())
        })
        .await
        .unwrap();
        cuts += proxy.cut_all();
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("{cuts} transports cut during the transfer");
    assert!(cuts >= 5, "only {cuts} transports cut during the transfer");
    let hellos = env
        .gw
        .metric("jvpn_gateway_hellos_total", &[("result", "ok")])
        .await
        .unwrap();
    assert_eq!(hellos, 1.0, "no re-handshake");
    // The streams may end before the agent is back from the last cut (CI
    // saw 4 resumes done and the fifth under way): wait for it.
    let resumes = || a.report.lock().unwrap().resumes_ok;
    let back = eventually(Duration::from_secs(20), "five resumes", || async {
        resumes() >= 5
    })
    .await;
    let r = a.report.lock().unwrap().clone();
    assert!(back.is_ok(), "{r:?}");
    let resent = env
        .gw
        .metric("jvpn_gateway_channel_resent_bytes_total", &[])
        .await
        .unwrap();
    eprintln!("gateway resent {resent} bytes after resumes");
    // Cuts in the middle of a bulk echo find bytes in flight: the resend
    // path ran (0 would mean the cuts proved nothing about it).
    assert!(resent > 0.0, "no byte resent after {cuts} cuts");
    assert_eq!(r.rehandshakes, 0, "{r:?}");
    assert_eq!(
        a.tunnel
            .counters()
            .reset
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(a.cmds);
    a.task.await.unwrap();
}

/// Frames both ways prove the path alive, so a busy session sends no
/// keep-alive pings (issue 17 item 2); an idle one does (when its gateway
/// sends no keep-alives: turned off here, `keepalives.rs` covers them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_both_ways_stands_in_for_pings() {
    const INTERVAL: Duration = Duration::from_millis(50);
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[policy]\nheartbeat_interval_ms = {}\nkeepalive_interval_ms = 0\n",
        INTERVAL.as_millis()
    ))
    .await;
    let echo = echo_server().await;
    let a = run_agent(&env, env.gw.client_addr);
    let pings = || a.report.lock().unwrap().pings_sent;
    // Attached, and idle: pings go out.
    let p0 = pings();
    eventually(Duration::from_secs(10), "idle pings", || async {
        pings() >= p0 + 3
    })
    .await
    .unwrap();
    // Busy: echoes keep bytes moving both ways for at least 10 intervals
    // (the data is made before, outside the measured window).
    let data = pattern(7, 16 << 20);
    let before = pings();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < INTERVAL * 10 {
        let back = through_echo(&a.tunnel, echo, data.clone()).await;
        assert!(back == data, "bytes differ");
    }
    let busy = t0.elapsed();
    let during = pings() - before;
    let ticks = (busy.as_millis() / INTERVAL.as_millis()) as u64;
    eprintln!("{ticks} keep-alive ticks in {busy:?} of traffic, {during} pings");
    // Without the rule every tick pinged.
    assert!(during * 4 <= ticks, "{during} pings in {ticks} ticks");
    drop(a.cmds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_policy_refuses_with_a_reason_and_counts_it() {
    // Only 127.0.0.2 is allowed (but not its port 9): 127.0.0.1 stays
    // protected loopback, and 127.0.0.3 is denied by a rule of its own.
    let env = common::start(
        "[[egress.rules]]\naction = \"deny\"\ncidrs = [\"127.0.0.3/32\"]\n\
         [[egress.rules]]\naction = \"deny\"\ncidrs = [\"127.0.0.2/32\"]\nports = [\"9\"]\n\
         [[egress.rules]]\naction = \"allow\"\ncidrs = [\"127.0.0.2/32\"]\nports = [\"1-65535\"]\n\
         [egress]\nmax_streams_per_session = 1\n",
    )
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let echo = echo_server().await;
    match a_connect(&a.tunnel, &echo.ip().to_string(), echo.port()).await {
        Err(StreamError::Refused(Refusal::NotAllowed)) => {}
        other => panic!("127.0.0.1: expected not_allowed, got {other:?}"),
    }
    // A name that resolves to a protected address is refused the same way.
    match a_connect(&a.tunnel, "localhost", echo.port()).await {
        Err(StreamError::Refused(Refusal::NotAllowed)) => {}
        other => panic!("localhost: expected not_allowed, got {other:?}"),
    }
    // Nothing listens on 127.0.0.2:1: refused by the destination.
    match a_connect(&a.tunnel, "127.0.0.2", 1).await {
        Err(StreamError::Refused(Refusal::ConnectionRefused)) => {}
        other => panic!("expected connection_refused, got {other:?}"),
    }
    // Through the SOCKS front door, as an application sees them: a denied
    // CIDR, a denied port and protected loopback answer 2 ("not allowed by
    // ruleset"), a closed port 5 ("connection refused").
    let (door_addr, _door) = front_door(&a.tunnel).unwrap();
    for (to, code) in [
        (SocketAddr::from(([127, 0, 0, 3], echo.port())), 2),
        (SocketAddr::from(([127, 0, 0, 2], 9)), 2),
        (SocketAddr::from(([127, 0, 0, 2], 1)), 5),
        (echo, 2),
    ] {
        match jvpn_loadtest::socks::connect(door_addr, to).await {
            Err(jvpn_loadtest::socks::SocksError::Refused(c)) => assert_eq!(c, code, "{to}"),
            other => panic!("{to}: expected SOCKS reply {code}, got {other:?}"),
        }
    }
    // A name (resolved at the gateway) to a protected address: 2 as well.
    let mut c = TcpStream::connect(door_addr).await.unwrap();
    let mut req = b"\x05\x01\x00\x05\x01\x00\x03\x09localhost".to_vec();
    req.extend_from_slice(&echo.port().to_be_bytes());
    c.write_all(&req).await.unwrap();
    let mut answer = [0u8; 4];
    c.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, [5, 0, 5, 2], "localhost through SOCKS5");
    let denied = env
        .gw
        .metric("jvpn_gateway_egress_denied_total", &[("rule", "loopback")])
        .await
        .unwrap();
    // One per refused stream (127.0.0.1 and localhost, each directly and
    // through SOCKS), not one per address a name resolved to.
    assert_eq!(denied, 4.0, "loopback denials counted");
    let by_rule = env
        .gw
        .metric("jvpn_gateway_egress_denied_total", &[("rule", "rule")])
        .await
        .unwrap();
    assert_eq!(by_rule, 2.0, "the CIDR and the port denial, by rule");
    let not_allowed = env
        .gw
        .metric(
            "jvpn_gateway_streams_refused_total",
            &[("reason", "not_allowed")],
        )
        .await
        .unwrap();
    // Loopback twice directly and twice through SOCKS, the rule twice.
    assert_eq!(not_allowed, 6.0);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// Replaces `from` with `to` in the gateway's config file, sends SIGHUP and
/// waits until the gateway counted a successful reload more.
async fn reload_replacing(env: &common::Env, from: &str, to: &str) {
    let count = || async {
        env.gw
            .metric("jvpn_gateway_config_reloads_total", &[])
            .await
            .unwrap_or(0.0)
    };
    // Read for sure: a failed scrape taken for 0 would let any reload pass.
    let before = env
        .gw
        .metric("jvpn_gateway_config_reloads_total", &[])
        .await
        .unwrap();
    let cfg = std::fs::read_to_string(&env.gw.config_path).unwrap();
    let changed = cfg.replace(from, to);
    assert_ne!(cfg, changed, "{from:?} is in the file");
    std::fs::write(&env.gw.config_path, changed).unwrap();
    env.gw.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually(Duration::from_secs(10), "the reload applied", || async {
        count().await > before
    })
    .await
    .unwrap();
}

async fn a_connect(
    tunnel: &Tunnel,
    host: &str,
    port: u16,
) -> Result<jvpn_agent::streams::Stream, StreamError> {
    tunnel.connect(&Target::new(host, port).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_through_socks5_and_http_connect() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    let body = pattern(42, 3 << 20);
    let web = http_server(body.clone()).await;
    let (door_addr, _door) = front_door(&a.tunnel).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        (
            "socks5",
            vec![
                "--socks5-hostname".to_owned(),
                door_addr.to_string(),
                // The name is resolved at the gateway.
                format!("http://localhost:{}/file", web.port()),
            ],
        ),
        (
            "connect",
            vec![
                "--proxytunnel".to_owned(),
                "--proxy".to_owned(),
                format!("http://{door_addr}"),
                format!("http://127.0.0.1:{}/file", web.port()),
            ],
        ),
    ] {
        let out_file = dir.path().join(name);
        let out = curl_to_file(&out_file, &args).await;
        assert!(
            out.status.success(),
            "curl via {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(&out_file).unwrap();
        assert!(
            got == body,
            "curl via {name}: body differs ({} bytes)",
            got.len()
        );
    }
    // A destination the policy refuses: curl reports the SOCKS refusal.
    let out = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "30",
            "--socks5-hostname",
        ])
        .arg(door_addr.to_string())
        .arg(format!("http://169.254.169.254:{}/", web.port()))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // SOCKS5 reply 2: "connection not allowed by ruleset".
    assert!(err.contains("(2)"), "curl said: {err}");
    let _ = TcpStream::connect(door_addr).await;
    drop(a.cmds);
    a.task.await.unwrap();
}

/// Malformed requests on the agent's front door get the protocol's own
/// error answer and a closed connection, and touch nothing else: the same
/// front door then carries a good stream, and the session never
/// re-handshaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_front_door_requests_close_only_their_connection() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    let (door_addr, _door) = front_door(&a.tunnel).unwrap();
    // (bytes sent, exact answer expected before the close)
    let cases: [(&[u8], &[u8]); 5] = [
        // SOCKS5, BIND (command 2): "command not supported".
        (
            b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // SOCKS5, address type 9: "address type not supported".
        (
            b"\x05\x01\x00\x05\x01\x00\x09\x00",
            b"\x05\x00\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
        // SOCKS5 offering only username/password: no acceptable method.
        (b"\x05\x01\x02", b"\x05\xff"),
        // HTTP, not CONNECT.
        (
            b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n",
            b"HTTP/1.1 405",
        ),
        // HTTP CONNECT without a port.
        (b"CONNECT example.org HTTP/1.1\r\n\r\n", b"HTTP/1.1 400"),
    ];
    for (sent, want) in cases {
        let mut c = TcpStream::connect(door_addr).await.unwrap();
        c.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .expect("the front door closes a malformed request")
            .unwrap();
        assert!(
            got.starts_with(want),
            "{sent:?}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // A head over 8 KiB: 431.
    let mut c = TcpStream::connect(door_addr).await.unwrap();
    let mut huge = b"CONNECT example.org:443 HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.resize(9 * 1024, b'a');
    c.write_all(&huge).await.unwrap();
    let mut got = Vec::new();
    // The door closes with the rest of the head unread, which may end the
    // connection with a reset after its answer: the answer is what counts.
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("the front door closes an oversized head");
    assert!(
        got.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // Each was counted, and as nothing else.
    let counters = a.tunnel.counters();
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n(&counters.bad_requests), 6);
    assert_eq!((n(&counters.refused), n(&counters.reset)), (0, 0));
    // The same front door and session still carry a good stream.
    let echo = echo_server().await;
    let mut c = jvpn_loadtest::socks::connect(door_addr, echo)
        .await
        .unwrap();
    c.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    drop(c);
    drop(a.cmds);
    let r = a.task.await.unwrap();
    assert_eq!(r.rehandshakes, 0, "{r:?}");
    assert_eq!(r.sessions_established, 1, "{r:?}");
}

/// `HelloOk.channel_finish` (design note 69) is said to an agent that
/// asked for a channel, and only to it: an agent reads its absence (an
/// older gateway) as "end a draining session at once".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_says_it_finishes_channels_it_opened() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let mut with = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _tunnel = with.tunnel();
    drop(common::hello(&mut with).await);
    assert!(with.session.as_ref().unwrap().channel_finish);
    let mut without = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    drop(common::hello(&mut without).await);
    assert!(!without.session.as_ref().unwrap().channel_finish);
}

/// Bad channel input from an agent (a gap, an ack for bytes never sent, a
/// resume offset never sent) ends that session with `protocol_error`,
/// counted; another session's streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_channel_ends_only_its_own_session() {
    use jvpn_agent::AgentError;
    use jvpn_proto::ReasonCode;
    use jvpn_proto::pb::session::{Ack, Data, frame::Kind};
    let env = common::start(LOOPBACK_ALLOWED).await;
    let echo = echo_server().await;
    let good = run_agent(&env, env.gw.client_addr);
    assert_eq!(
        through_echo(&good.tunnel, echo, pattern(1, 100_000)).await,
        pattern(1, 100_000)
    );
    let bad_frames = [
        Kind::Data(Data {
            seq: 1_000,
            payload: vec![1u8; 10].into(),
        }),
        Kind::Ack(Ack { seq: 1 << 20 }),
    ];
    for (i, frame) in bad_frames.into_iter().enumerate() {
        let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
        let _tunnel = a.tunnel();
        let mut t = common::hello(&mut a).await;
        t.send(frame).await.unwrap();
        loop {
            match t.recv().await {
                Err(AgentError::Terminated(ReasonCode::ProtocolError)) => break,
                Ok(_) => continue,
                other => panic!("bad frame {i}: expected protocol_error, got {other:?}"),
            }
        }
    }
    // A RESUME claiming bytes the gateway never sent.
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _tunnel = a.tunnel();
    drop(common::hello(&mut a).await);
    let mut t = a.open_resume().await.unwrap();
    let mut r = a.build_resume(&t).unwrap();
    r.received = Some(1 << 30);
    t.send(Kind::Resume(r)).await.unwrap();
    loop {
        match t.recv().await {
            Err(AgentError::Terminated(ReasonCode::ProtocolError)) => break,
            // The session ended: it must not be said to have resumed.
            Ok(Kind::ResumeOk(_)) => panic!("a ResumeOk for a session whose channel broke"),
            Ok(_) => continue,
            other => panic!("resume: expected protocol_error, got {other:?}"),
        }
    }
    for (result, want) in [("ok", 0.0), ("protocol_error", 1.0)] {
        let n = env
            .gw
            .metric("jvpn_gateway_resumes_total", &[("result", result)])
            .await
            .unwrap();
        assert_eq!(n, want, "resumes {result}");
    }
    let broken = env
        .gw
        .metric("jvpn_gateway_channel_protocol_errors_total", &[])
        .await
        .unwrap();
    assert_eq!(broken, 3.0);
    // The good session never noticed.
    assert_eq!(
        through_echo(&good.tunnel, echo, pattern(2, 100_000)).await,
        pattern(2, 100_000)
    );
    let r = good.report.lock().unwrap().clone();
    assert_eq!((r.rehandshakes, r.resumes_ok), (0, 0), "{r:?}");
    drop(good.cmds);
    good.task.await.unwrap();
}

/// The CLI as a user runs it: `jvpn-agent connect --socks 127.0.0.1:0
/// --forward 127.0.0.1:0=HOST:PORT` as its own process; curl through the
/// proxy port and a plain TCP client through the forward. A non-loopback
/// bind is refused unless asked for explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_cli_serves_socks_and_forwards() {
    use tokio::io::AsyncBufReadExt;
    let env = common::start(LOOPBACK_ALLOWED).await;
    let body = pattern(7, 1 << 20);
    let web = http_server(body.clone()).await;
    let echo = echo_server().await;
    let bin = env!("CARGO_BIN_EXE_jvpn-loadtest");
    let base = |extra: &[String]| {
        let mut c = tokio::process::Command::new(bin);
        c.arg("agent")
            .arg("connect")
            .arg("--server")
            .arg(env.gw.client_addr.to_string())
            .arg("--ca")
            .arg(env.pki.layout.client_ca())
            .arg("--token-file")
            .arg(env.pki.layout.dev_token())
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    // Refused: a front door on every address, without the flag.
    let out = base(&["--socks".into(), "0.0.0.0:0".into()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-non-loopback"), "{err}");

    let mut agent = base(&[
        "--socks".into(),
        "127.0.0.1:0".into(),
        "--forward".into(),
        format!("127.0.0.1:0={echo}"),
    ])
    .spawn()
    .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let (mut socks, mut forward) = (None, None);
    while socks.is_none() || forward.is_none() {
        let line = lines.next_line().await.unwrap().expect("agent output");
        if let Some(a) = line.strip_prefix("socks5 and http connect on ") {
            socks = Some(a.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix("forward ") {
            forward = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    let (socks, forward) = (socks.unwrap(), forward.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    let out = curl_to_file(
        &file,
        &[
            "--socks5-hostname".to_owned(),
            socks.clone(),
            format!("http://127.0.0.1:{}/", web.port()),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&file).unwrap() == body);
    // The forward: bytes in, the same bytes back (the echo destination).
    let mut c = TcpStream::connect(&forward).await.unwrap();
    let data = pattern(8, 300_000);
    let (mut r, mut w) = c.split();
    let (_, back) = tokio::join!(
        async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        }
    );
    assert!(back == data, "forward: {} bytes back", back.len());
    agent.kill().await.unwrap();
}

/// A page with its own resources, served by a tiny HTTP server that logs
/// each path it is asked for.
async fn site() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                // Keep-alive: several requests may come on one connection.
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    seen.lock().unwrap().push(path.clone());
                    let (ctype, body): (&str, &[u8]) = match path.as_str() {
                        "/" => (
                            "text/html",
                            b"<html><head><link rel=stylesheet href=/style.css>\
                              <script src=/app.js></script></head>\
                              <body><img src=/pixel.svg><p id=p>static</p></body></html>",
                        ),
                        "/style.css" => ("text/css", b"p { color: teal }"),
                        "/app.js" => (
                            "application/javascript",
                            b"addEventListener('DOMContentLoaded', () => \
                              { document.getElementById('p').textContent = 'ran-through-jvpn'; });",
                        ),
                        "/pixel.svg" => (
                            "image/svg+xml",
                            b"<svg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/>",
                        ),
                        _ => ("text/plain", b"not here"),
                    };
                    let h = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if c.write_all(h.as_bytes()).await.is_err() || c.write_all(body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

/// A real browser through the SOCKS front door: headless Chromium loads a
/// page and its stylesheet, script and image through the session; the
/// script's effect is in the DOM and every resource was fetched through
/// the gateway's streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_with_its_resources_through_socks() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    let (web, log) = site().await;
    let (door_addr, _door) = front_door(&a.tunnel).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let out = common::chromium(
        &[
            "--no-first-run".to_owned(),
            // Loopback is never proxied unless this says otherwise.
            "--proxy-bypass-list=<-loopback>".to_owned(),
            "--virtual-time-budget=5000".to_owned(),
            "--dump-dom".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--proxy-server=socks5://{door_addr}"),
            format!("http://127.0.0.1:{}/", web.port()),
        ],
        Duration::from_secs(90),
    )
    .await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("ran-through-jvpn"),
        "the page's script did not run: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = log.lock().unwrap().clone();
    for p in ["/", "/style.css", "/app.js", "/pixel.svg"] {
        assert!(seen.iter().any(|s| s == p), "{p} not fetched: {seen:?}");
    }
    let streams = env
        .gw
        .metric("jvpn_gateway_streams_opened_total", &[])
        .await
        .unwrap();
    assert!(streams >= 1.0, "no stream went through the gateway");
    drop(a.cmds);
    a.task.await.unwrap();
}

/// `egress.max_streams_per_session` holds (the next stream is refused
/// `too_many_streams` until one closes), and a SIGHUP reload of the egress
/// rules applies to the streams opened after it while open ones go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limits_hold_and_a_reload_applies_to_new_streams() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[egress]\nmax_streams_per_session = 2\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let echo = echo_server().await;
    let host = echo.ip().to_string();
    let mut one = a_connect(&a.tunnel, &host, echo.port()).await.unwrap();
    let two = a_connect(&a.tunnel, &host, echo.port()).await.unwrap();
    match a_connect(&a.tunnel, &host, echo.port()).await {
        Err(StreamError::Refused(Refusal::TooManyStreams)) => {}
        other => panic!("third stream: expected too_many_streams, got {other:?}"),
    }
    drop(two);
    // The slot frees when the gateway sees the stream end.
    eventually(Duration::from_secs(10), "a slot is free again", || async {
        env.gw
            .metric("jvpn_gateway_streams_open", &[])
            .await
            .unwrap_or(2.0)
            < 2.0
    })
    .await
    .unwrap();
    let three = a_connect(&a.tunnel, &host, echo.port()).await.unwrap();
    drop(three);
    // Reload without the loopback rule: new streams are refused, the open
    // one still carries bytes.
    reload_replacing(&env, LOOPBACK_ALLOWED, "").await;
    match a_connect(&a.tunnel, &host, echo.port()).await {
        Err(StreamError::Refused(Refusal::NotAllowed)) => {}
        other => panic!("after the reload: expected not_allowed, got {other:?}"),
    }
    one.write_all(b"still open").await.unwrap();
    let mut back = [0u8; 10];
    one.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still open");
    drop(a.cmds);
    a.task.await.unwrap();
}

/// `egress.max_streams` bounds the whole gateway's egress sockets, whatever
/// the sessions: many sessions of one credential, each within its own
/// limit, cannot run the gateway out of descriptors. Another session's
/// stream is refused `too_many_streams` while the gateway is full, and
/// goes through once a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_stream_limit_holds_across_sessions() {
    limit_across_sessions("max_streams", 2, 2).await;
}

/// A principal's stream limit spans its sessions: two sessions of one
/// credential share it, each well within its own session limit, and a
/// slot freed in one session serves the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principals_stream_limit_holds_across_its_sessions() {
    limit_across_sessions("max_streams_per_principal", 3, 2).await;
}

/// A principal named in `[[egress.limits]]` has that entry's stream limit
/// instead of `[egress]`'s: the development token's principal may open
/// three streams where every other principal may open one, and its fourth
/// is refused `too_many_streams`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principals_own_limits_replace_the_egress_values() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[egress]\nmax_streams_per_principal = 1\n\n\
         [[egress.limits]]\nprincipals = [\"dev-token\"]\nmax_streams = 3\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let echo = echo_server().await;
    let host = echo.ip().to_string();
    let mut open = Vec::new();
    for i in 0..3 {
        let s = a_connect(&a.tunnel, &host, echo.port())
            .await
            .unwrap_or_else(|e| panic!("stream {}: {e}", i + 1));
        open.push(s);
    }
    match a_connect(&a.tunnel, &host, echo.port()).await {
        Err(StreamError::Refused(Refusal::TooManyStreams)) => {}
        other => panic!("fourth stream: expected too_many_streams, got {other:?}"),
    }
    drop(open);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// A principal's `[[egress.limits]]` byte rate, lowered by a reload,
/// holds for the stream it already has open: the principal's streams share
/// one bucket, and a stream that kept the rate it opened with would keep
/// moving (and filling that bucket) at the old one. Lower bound only: a
/// loaded machine can be slower, never faster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowers_the_rate_of_a_principals_open_streams() {
    const FAST: &str = "bytes_per_s = 1073741824";
    const RATE: u64 = 2 << 20;
    const BURST: u64 = 256 << 10;
    const TOTAL: usize = 6 << 20;
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[[egress.limits]]\nprincipals = [\"dev-token\"]\n{FAST}\n\
         burst_bytes = {BURST}\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    // Sends TOTAL bytes once asked (one byte).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut ask = [0u8; 1];
        c.read_exact(&mut ask).await.unwrap();
        c.write_all(&pattern(5, TOTAL)).await.unwrap();
        c.shutdown().await.unwrap();
    });
    let mut s = a_connect(&a.tunnel, "127.0.0.1", port).await.unwrap();
    reload_replacing(&env, FAST, &format!("bytes_per_s = {RATE}")).await;
    let started = std::time::Instant::now();
    s.write_all(b"?").await.unwrap();
    let mut got = Vec::with_capacity(TOTAL);
    s.read_to_end(&mut got).await.unwrap();
    let took = started.elapsed().as_secs_f64();
    assert!(got == pattern(5, TOTAL), "bytes differ");
    // At most the bucket's depth moves at once, the rest at RATE.
    let least = (TOTAL as u64 - BURST) as f64 / RATE as f64;
    eprintln!("{TOTAL} bytes after the reload in {took:.3} s (at the new rate: {least:.3} s)");
    assert!(
        took >= least * 0.9,
        "{took:.3} s: faster than the reloaded rate allows ({least:.3} s)"
    );
    drop(a.cmds);
    a.task.await.unwrap();
}

/// `[egress] key = limit` over two sessions of one credential: session a
/// opens `in_a` streams and b the rest up to the limit; the next stream is
/// refused `too_many_streams` in either session (and counted), and a slot
/// freed in a serves b.
async fn limit_across_sessions(key: &str, limit: usize, in_a: usize) {
    let env = common::start(&format!("{LOOPBACK_ALLOWED}[egress]\n{key} = {limit}\n")).await;
    let (a, b) = (
        run_agent(&env, env.gw.client_addr),
        run_agent(&env, env.gw.client_addr),
    );
    let echo = echo_server().await;
    let host = echo.ip().to_string();
    let mut open = Vec::new();
    for i in 0..limit {
        let t = if i < in_a { &a.tunnel } else { &b.tunnel };
        open.push(a_connect(t, &host, echo.port()).await.unwrap());
    }
    for t in [&a.tunnel, &b.tunnel] {
        match a_connect(t, &host, echo.port()).await {
            Err(StreamError::Refused(Refusal::TooManyStreams)) => {}
            other => panic!("{key}: expected too_many_streams, got {other:?}"),
        }
    }
    assert_eq!(
        env.gw
            .metric(
                "jvpn_gateway_streams_refused_total",
                &[("reason", "too_many_streams")]
            )
            .await
            .unwrap(),
        2.0
    );
    drop(open.remove(0));
    eventually(Duration::from_secs(10), "a slot is free again", || async {
        a_connect(&b.tunnel, &host, echo.port()).await.is_ok()
    })
    .await
    .unwrap();
    for x in [a, b] {
        drop(x.cmds);
        x.task.await.unwrap();
    }
}

/// The gateway-wide limit's default, half the open-file limit, is taken
/// from the raised limit: started with a soft limit of 1,024 (a shell's
/// default), the gateway raises it before reading its configuration, so
/// the limit is not 512. (Failed first: the default was computed from the
/// limit before the raise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stream_limit_follows_the_raised_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard > 2048,
        "this test needs a hard open-file limit above 2,048"
    );
    let pki = harness::TestPki::new(&["g1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launcher = common::launcher().with_soft_nofile(1024);
    let opts = harness::GatewayOptions::default();
    let gw = harness::LocalGateway::start(&launcher, &pki, dir.path(), &opts)
        .await
        .unwrap();
    let limit = gw.metric("jvpn_gateway_streams_limit", &[]).await.unwrap();
    // The process may raise its hard limit too (as root): at least half
    // of this one's.
    assert!(limit as u64 >= hard / 2, "limit {limit}, hard {hard}");
}

/// A reload that raises `egress.max_streams_per_session` applies to the
/// sessions already open too: HTTP/2's own stream cap, fixed when a
/// session's HTTP/2 starts, must not stay at the old limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_stream_limit_applies_to_open_sessions() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[egress]\nmax_streams_per_session = 2\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let echo = echo_server().await;
    let first = a.tunnel.connect(&common::target(echo)).await.unwrap();
    reload_replacing(
        &env,
        "max_streams_per_session = 2",
        "max_streams_per_session = 64",
    )
    .await;
    // 40 streams open at once on the same session.
    let mut open = vec![first];
    for i in 0..39 {
        let s = tokio::time::timeout(
            Duration::from_secs(10),
            a.tunnel.connect(&common::target(echo)),
        )
        .await
        .unwrap_or_else(|_| panic!("stream {}: no answer", i + 2));
        open.push(s.unwrap_or_else(|e| panic!("stream {}: {e}", i + 2)));
    }
    for (i, s) in open.iter_mut().enumerate() {
        let msg = format!("stream {i:02}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    drop(open);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// `egress.principal_bytes_per_s`: a principal's streams together move at
/// most that many bytes per second after the burst (measured within 5 %
/// above, and not far below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principals_byte_rate_holds() {
    byte_rate_holds(1).await;
}

/// The same with 32 streams at once, measured when half the bytes have
/// arrived (the time to the end hides bytes moved early: the last stream
/// sleeps the debt off before its end). Each stream moved one chunk
/// before paying for it, so 32 streams ran 32 chunks ahead of the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principals_byte_rate_holds_across_many_streams() {
    byte_rate_holds(32).await;
}

async fn byte_rate_holds(streams: usize) {
    const RATE: u64 = 2 << 20;
    const BURST: u64 = 256 << 10;
    const TOTAL: usize = 6 << 20;
    let each = TOTAL / streams;
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[egress]\nprincipal_bytes_per_s = {RATE}\nprincipal_burst_bytes = {BURST}\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                c.write_all(&pattern(3, each)).await.unwrap();
                c.shutdown().await.unwrap();
            });
        }
    });
    // From the first connect: bytes move as soon as a stream is open.
    let started = std::time::Instant::now();
    let mut open = Vec::new();
    for _ in 0..streams {
        open.push(a_connect(&a.tunnel, "127.0.0.1", port).await.unwrap());
    }
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let half = Arc::new(tokio::sync::OnceCell::new());
    let readers: Vec<_> = open
        .into_iter()
        .map(|mut s| {
            let (arrived, half) = (arrived.clone(), half.clone());
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(each);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let sum = arrived.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                    if sum >= TOTAL / 2 {
                        let _ = half.set(started.elapsed().as_secs_f64());
                    }
                }
                assert!(got == pattern(3, each));
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    let at_half = *half.get().unwrap();
    let rate = (TOTAL as u64 - BURST) as f64 / took;
    let ratio = rate / RATE as f64;
    let half_ratio = (TOTAL as u64 / 2 - BURST) as f64 / at_half / RATE as f64;
    eprintln!(
        "{streams} streams, {TOTAL} bytes in {took:.3} s: {ratio:.3} of the limit to the end, \
         {half_ratio:.3} to the half ({at_half:.3} s)"
    );
    assert!(ratio <= 1.05, "faster than the limit: {ratio:.3}");
    assert!(
        half_ratio <= 1.05,
        "faster than the limit by the half: {half_ratio:.3}"
    );
    // A limiter that throttles far below its rate is broken too; the bound
    // is loose because a loaded machine (CI, parallel tests) is slower
    // than the limit on its own.
    assert!(ratio >= 0.6, "far slower than the limit: {ratio:.3}");
    drop(a.cmds);
    a.task.await.unwrap();
}

/// Streams whose readers stopped (a browser's paused downloads) must not
/// freeze the session's other streams: HTTP/2's connection window at the
/// agent holds many stalled streams' windows, not a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_readers_do_not_freeze_the_sessions_other_streams() {
    // Twice what the four-window connection window of old could hold.
    const STALLED: usize = 16;
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    // A destination that sends without end to readers that never read.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                while c.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(a.tunnel.connect(&common::target(flood)).await.unwrap());
    }
    // Wait until the stalled streams' windows are full: the gateway read
    // most of a stream window (half the channel's) for each of them. The
    // four-window connection window of old stopped them all at 5 MiB.
    eventually(
        Duration::from_secs(30),
        "the stalled streams filled their windows",
        || async {
            env.gw
                .metric(
                    "jvpn_gateway_stream_bytes_total",
                    &[("direction", "from_destination")],
                )
                .await
                .unwrap_or(0.0)
                >= (STALLED * (448 << 10)) as f64
        },
    )
    .await
    .unwrap();
    // Another stream of the same session still moves 8 MiB both ways.
    let echo = echo_server().await;
    let data = pattern(11, 8 << 20);
    let back = tokio::time::timeout(
        Duration::from_secs(60),
        through_echo(&a.tunnel, echo, data.clone()),
    )
    .await
    .expect("the other stream froze behind the stalled ones");
    assert!(back == data);
    drop(stalled);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// Stream events in the gateway's event stream: `StreamOpened`,
/// `StreamRefused` and `StreamClosed` with the bytes each way; the
/// destination only when the operator turned `events.audit_destinations`
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_carry_the_destination_only_when_audited() {
    for audit in [false, true] {
        let env = common::start_with(harness::GatewayOptions {
            extra_toml: LOOPBACK_ALLOWED.into(),
            env: vec![(
                "JVPN_GATEWAY__EVENTS__AUDIT_DESTINATIONS".into(),
                audit.to_string(),
            )],
            ..Default::default()
        })
        .await;
        let a = run_agent(&env, env.gw.client_addr);
        let echo = echo_server().await;
        let back = through_echo(&a.tunnel, echo, b"0123456789".to_vec()).await;
        assert_eq!(back, b"0123456789");
        // Refused: link-local is protected.
        assert!(a_connect(&a.tunnel, "169.254.169.254", 80).await.is_err());
        let path = env.gw.events_path.clone();
        let events = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| {
                    v["event_type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("Stream"))
                })
                .collect::<Vec<_>>()
        };
        eventually(Duration::from_secs(10), "stream events written", || {
            let n = events().len();
            async move { n >= 3 }
        })
        .await
        .unwrap();
        let ev = events();
        let of = |t: &str| {
            let all: Vec<&serde_json::Value> = ev.iter().filter(|v| v["event_type"] == t).collect();
            assert_eq!(all.len(), 1, "one {t}: {ev:?}");
            all[0].clone()
        };
        // (Closed and Refused may be written in either order.)
        assert_eq!(of("StreamOpened")["stream"], 1);
        let closed = of("StreamClosed");
        assert_eq!(closed["stream"], 1, "{closed}");
        assert_eq!(closed["bytes_to_destination"], 10, "{closed}");
        assert_eq!(closed["bytes_from_destination"], 10, "{closed}");
        assert_eq!(closed["how"], "closed", "{closed}");
        let refused = of("StreamRefused");
        assert_eq!(refused["reason"], "not_allowed", "{refused}");
        assert_eq!(ev.len(), 3, "{ev:?}");
        for v in &ev {
            let text = v.to_string();
            if audit {
                assert!(v["destination"].is_string(), "audited: {v}");
            } else {
                assert!(v.get("destination").is_none(), "not audited: {v}");
                assert!(!text.contains("169.254"), "{v}");
            }
        }
        drop(a.cmds);
        a.task.await.unwrap();
    }
}

/// A stream the agent resets while the gateway is still dialing its
/// destination (the application gave up) ends with a `StreamClosed` event
/// (`how`: `cancelled`, no bytes) and is counted: every `CONNECT` the
/// gateway takes ends in exactly one of refused, closed, reset or
/// cancelled. It used to leave no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_abandoned_while_dialing_is_counted_and_leaves_an_event() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[egress]\nconnect_timeout_ms = 30000\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    // Backlog 0 and one queued connection: every later SYN is dropped, so
    // the gateway's dial waits (up to its 30 s timeout).
    let silent = tokio::net::TcpSocket::new_v4().unwrap();
    silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = silent.listen(0).unwrap();
    let silent_at = silent.local_addr().unwrap();
    let _queued = TcpStream::connect(silent_at).await.unwrap();
    let dialing = a_connect(&a.tunnel, "127.0.0.1", silent_at.port());
    // The application gives up on the CONNECT (dropping it resets the
    // stream) while the gateway still dials.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), dialing)
            .await
            .is_err(),
        "the silent destination answered"
    );
    let path = env.gw.events_path.clone();
    let closed = || {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event_type"] == "StreamClosed")
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "a StreamClosed event", || {
        let n = closed().len();
        async move { n >= 1 }
    })
    .await
    .unwrap();
    let ev = closed();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["how"], "cancelled", "{}", ev[0]);
    assert_eq!(ev[0]["bytes_to_destination"], 0, "{}", ev[0]);
    let cancelled = env
        .gw
        .metric("jvpn_gateway_streams_ended_total", &[("how", "cancelled")])
        .await;
    assert_eq!(cancelled.unwrap(), 1.0);
    let opened = env
        .gw
        .metric("jvpn_gateway_streams_opened_total", &[])
        .await;
    assert_eq!(opened.unwrap(), 0.0, "never opened");
    drop(a.cmds);
    a.task.await.unwrap();
}

/// CONNECTs whose applications gave up while the transport was down: each
/// request and its reset were queued in the session's channel, and reach
/// the gateway together after the RESUME. The gateway dials none of them;
/// it raced the dial against the reset and, on loopback, often connected
/// to the destination first (a connection nobody wanted any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_abandoned_while_the_transport_was_down_are_never_dialed() {
    // More than h2's default allowance of resets before accept (20), past
    // which it ended the whole session (`ENHANCE_YOUR_CALM`).
    const N: usize = 48;
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[policy]\nswitch_cooldown_ms = 100\nmax_switches_per_min = 600\n"
    ))
    .await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    // The destination hands over every connection it accepts.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = common::target(l.local_addr().unwrap());
    let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let _ = tx.send(c);
        }
    });
    let a = run_agent(&env, proxy.addr);
    // The session and its HTTP/2 are up.
    drop(a.tunnel.connect(&dest).await.unwrap());
    drop(accepted.recv().await.unwrap());
    let resumed = a.report.lock().unwrap().resumes_ok;
    assert_eq!(proxy.stall_all(), 1);
    // Each CONNECT is written into the channel on its first poll (the
    // session's HTTP/2 is up), then given up: its reset follows it.
    for _ in 0..N {
        let mut open = Box::pin(a.tunnel.connect(&dest));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(open.as_mut().poll(&mut cx).is_pending());
    }
    proxy.cut_all();
    eventually(Duration::from_secs(20), "the agent resumed", || {
        let r = a.report.lock().unwrap().resumes_ok;
        async move { r > resumed }
    })
    .await
    .unwrap();
    // A stream after them: once it is through, the gateway has read every
    // frame before it.
    let mut s = a.tunnel.connect(&dest).await.unwrap();
    s.write_all(b"last").await.unwrap();
    let cancelled = || async {
        env.gw
            .metric("jvpn_gateway_streams_ended_total", &[("how", "cancelled")])
            .await
            .unwrap_or(0.0)
    };
    let all = eventually(
        Duration::from_secs(20),
        "every abandoned CONNECT cancelled",
        || async { cancelled().await >= N as f64 },
    )
    .await;
    assert!(
        all.is_ok(),
        "{} of {N} cancelled; the agent: {:?}",
        cancelled().await,
        a.report.lock().unwrap().clone()
    );
    let mut c = accepted.recv().await.unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await.unwrap();
    let mut dialed = 0;
    while &b != b"last" {
        // An abandoned CONNECT's connection (it never carries bytes).
        dialed += 1;
        c = accepted.recv().await.unwrap();
        let n = c.read(&mut b).await.unwrap_or(0);
        if n == 0 {
            continue;
        }
        c.read_exact(&mut b[n..]).await.unwrap();
    }
    assert_eq!(dialed, 0, "{dialed} abandoned CONNECTs were dialed");
    assert_eq!(cancelled().await, N as f64);
    drop(s);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// The refusals a destination causes, as the application sees them, in a
/// network namespace of the test's own (only `lo`, plus an `unreachable`
/// route): no route → SOCKS 3 "network unreachable"; an unreachable route
/// → 4 "host unreachable"; a destination that never answers the SYN (a
/// listener whose accept queue is full drops it) → 6 "TTL expired", the
/// SOCKS code for a timeout, and 504 through HTTP CONNECT, after
/// `egress.connect_timeout_ms`; a name nothing resolves →
/// `name_not_resolved`. Each counted by reason.
#[test]
fn unreachable_and_silent_destinations_are_refused_with_their_reason() {
    let _serial = NAMESPACE.lock().unwrap_or_else(|e| e.into_inner());
    jvpn_loadtest::netns::enter_private_namespace().unwrap();
    let route = std::process::Command::new("ip")
        .args(["route", "add", "unreachable", "198.51.100.0/24"])
        .status()
        .unwrap();
    assert!(route.success(), "ip route add: {route}");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let env = common::start(&format!(
                "{LOOPBACK_ALLOWED}[[egress.rules]]\naction = \"allow\"\n\
                 cidrs = [\"192.0.2.0/24\", \"198.51.100.0/24\"]\n\
                 [egress]\nconnect_timeout_ms = 300\n"
            ))
            .await;
            let a = run_agent(&env, env.gw.client_addr);
            let (door, _door) = front_door(&a.tunnel).unwrap();
            // Backlog 0: the first connection fills the accept queue, and
            // the kernel drops every SYN after it.
            let silent = tokio::net::TcpSocket::new_v4().unwrap();
            silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let silent = silent.listen(0).unwrap();
            let silent_at = silent.local_addr().unwrap();
            let _queued = TcpStream::connect(silent_at).await.unwrap();
            for (to, code) in [
                (SocketAddr::from(([192, 0, 2, 1], 80)), 3),
                (SocketAddr::from(([198, 51, 100, 1], 80)), 4),
                (silent_at, 6),
            ] {
                match jvpn_loadtest::socks::connect(door, to).await {
                    Err(jvpn_loadtest::socks::SocksError::Refused(c)) => {
                        assert_eq!(c, code, "{to}")
                    }
                    other => panic!("{to}: expected SOCKS reply {code}, got {other:?}"),
                }
            }
            // A name that does not resolve (nothing answers DNS in here).
            match a_connect(&a.tunnel, "no-such-name.invalid", 80).await {
                Err(StreamError::Refused(Refusal::NameNotResolved)) => {}
                other => panic!("expected name_not_resolved, got {other:?}"),
            }
            // The same silence through HTTP CONNECT: 504 and the reason.
            let mut c = TcpStream::connect(door).await.unwrap();
            let ask = format!("CONNECT {silent_at} HTTP/1.1\r\nHost: {silent_at}\r\n\r\n");
            c.write_all(ask.as_bytes()).await.unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
            assert!(answer.contains("timed_out"), "{answer}");
            for (reason, want) in [
                ("network_unreachable", 1.0),
                ("host_unreachable", 1.0),
                ("timed_out", 2.0),
                ("name_not_resolved", 1.0),
            ] {
                let got = env
                    .gw
                    .metric("jvpn_gateway_streams_refused_total", &[("reason", reason)])
                    .await
                    .unwrap();
                assert_eq!(got, want, "{reason}");
            }
            // A principal's own connect timeout ([[egress.limits]]) is the
            // one its streams wait: a minute for everyone, 400 ms for it.
            reload_replacing(
                &env,
                "[egress]\nconnect_timeout_ms = 300\n",
                "[egress]\nconnect_timeout_ms = 60000\n\n[[egress.limits]]\n\
                 principals = [\"dev-token\"]\nconnect_timeout_ms = 400\n",
            )
            .await;
            let quick = tokio::time::timeout(
                Duration::from_secs(10),
                jvpn_loadtest::socks::connect(door, silent_at),
            )
            .await
            .expect("the principal's 400 ms, not the minute of [egress]");
            match quick {
                Err(jvpn_loadtest::socks::SocksError::Refused(6)) => {}
                other => panic!("expected SOCKS reply 6, got {other:?}"),
            }
            drop(a.cmds);
            a.task.await.unwrap();
        });
}

/// Tests that move their thread into a network namespace run one at a time.
static NAMESPACE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A reset at either end crosses the tunnel as a reset, never as a clean
/// end: a destination that resets after 100 KiB must not look like a
/// complete 100 KiB download to the application, and an application that
/// resets after 1 MiB must not look like a complete upload to the
/// destination (RFC 9113 §8.5: RST_STREAM(CONNECT_ERROR)). Before, both
/// ends saw a clean EOF: the multiplexer ended a failed stream with
/// END_STREAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_at_either_end_reaches_the_other_as_a_reset() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    let (door, _door) = front_door(&a.tunnel).unwrap();
    let resets = |s: &TcpStream| {
        // SO_LINGER 0: closing sends RST, not FIN.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
    };

    // Download: the destination sends 100 KiB, then resets.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        c.write_all(&vec![1u8; 100 << 10]).await.unwrap();
        // Let the bytes leave before the reset discards what is unsent.
        c.flush().await.unwrap();
        let mut b = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await;
        resets(&c);
    });
    let mut app = jvpn_loadtest::socks::connect(door, dest).await.unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), app.read_to_end(&mut got))
        .await
        .expect("the download hung");
    server.await.unwrap();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a destination's reset reached the application as {r:?} after {} bytes",
        got.len()
    );

    // Upload: the application sends 1 MiB, then resets.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got).await;
        (r.map(|_| ()), got.len())
    });
    let mut app = jvpn_loadtest::socks::connect(door, dest).await.unwrap();
    app.write_all(&vec![2u8; 1 << 20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    resets(&app);
    drop(app);
    let (r, n) = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the upload hung")
        .unwrap();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "an application's reset reached the destination as {r:?} after {n} bytes"
    );
    drop(a.cmds);
    a.task.await.unwrap();
}

/// A stream through a front door whose application sent a request and
/// half-closed, while the destination keeps its side open and says
/// nothing (a long poll). Returns once the request arrived: the
/// application's socket, the destination's, and the front door's task.
async fn long_poll(tunnel: &Tunnel) -> (TcpStream, TcpStream, tokio::task::JoinHandle<()>) {
    let (door, door_task) = front_door(tunnel).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        let _ = got_tx.send((got, c));
    });
    let mut app = jvpn_loadtest::socks::connect(door, dest).await.unwrap();
    app.write_all(b"GET /poll").await.unwrap();
    app.shutdown().await.unwrap();
    let (got, held) = got_rx.await.unwrap();
    assert_eq!(got, b"GET /poll");
    (app, held, door_task)
}

/// The gateway's open streams (-1 if it does not answer).
async fn streams_open(env: &common::Env) -> f64 {
    env.gw
        .metric("jvpn_gateway_streams_open", &[])
        .await
        .unwrap_or(-1.0)
}

/// The destination's connection was reset, not left open: its writes
/// fail (the first may still be taken by the kernel).
async fn assert_was_reset(mut held: TcpStream) {
    let mut wrote = Ok(());
    for _ in 0..10 {
        wrote = held.write_all(b"late").await;
        if wrote.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(wrote.is_err(), "the destination's connection is still open");
}

/// A stream whose agent side already ended (the application half-closed)
/// and whose destination is quiet (a long poll) ends when its session
/// does: the destination is reset at once and the stream's slot is given
/// back. Before, nothing watched the session while only the destination's
/// side was open: the stream outlived its session by up to five minutes
/// (the half-closed idle bound), holding its slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_stream_ends_with_its_session() {
    let env = common::start(&format!(
        "{LOOPBACK_ALLOWED}[policy]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 800\n\
         transport_lost_ttl_ms = 1000\nsession_max_lifetime_ms = 3000\n"
    ))
    .await;
    let a = run_agent(&env, env.gw.client_addr);
    let (mut app, held, _door) = long_poll(&a.tunnel).await;
    let open = || streams_open(&env);
    assert_eq!(open().await, 1.0);
    // The session's lifetime (3 s) ends it; its stream goes with it.
    eventually(
        Duration::from_secs(8),
        "the stream's slot given back",
        || async { open().await == 0.0 },
    )
    .await
    .unwrap();
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), app.read(&mut b))
        .await
        .expect("the application was never told");
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert_was_reset(held).await;
    drop(a.cmds);
    let _ = a.task.await;
}

/// The same when the agent closes the session (`agent_closed`): a stream
/// that had not ended at the agent (here its destination's side is still
/// open) is reset at once. Streams that had ended there get a grace to
/// deliver what they hold (design note 69); this one must not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_stream_ends_at_once_when_the_agent_closes() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    let (app, held, _door) = long_poll(&a.tunnel).await;
    let open = || streams_open(&env);
    assert_eq!(open().await, 1.0);
    drop(a.cmds);
    a.task.await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the stream's slot given back",
        || async { open().await == 0.0 },
    )
    .await
    .unwrap();
    assert_was_reset(held).await;
    drop(app);
}

/// A stream's reader and writer in two tasks (the library API allows it):
/// the writer waits for send credit while the reader reads the
/// destination's last bytes and its half-close. The writer must still be
/// woken when credit comes. Before, reading the end registered the
/// reader's waker where h2 keeps the writer's, and the write hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waiting_for_credit_is_woken_after_the_reader_saw_the_end() {
    let env = common::start(LOOPBACK_ALLOWED).await;
    let a = run_agent(&env, env.gw.client_addr);
    const UP: usize = 32 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        // Not reading until told: the agent's writer runs out of credit.
        let _ = stalled_rx.await;
        c.write_all(b"hi").await.unwrap();
        c.shutdown().await.unwrap();
        let mut n = 0;
        let mut b = vec![0u8; 64 << 10];
        loop {
            match c.read(&mut b).await.unwrap() {
                0 => break n,
                k => n += k,
            }
        }
    });
    let s = a.tunnel.connect(&common::target(dest)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![5u8; 64 << 10];
        for _ in 0..UP / chunk.len() {
            w.write_all(&chunk).await.unwrap();
            progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        w.shutdown().await.unwrap();
    });
    // The writer stops moving: out of credit.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        assert!(now < UP, "everything fit in the buffers: no credit wait");
        if now == last {
            break;
        }
        last = now;
    }
    let _ = stalled_tx.send(());
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hi");
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer was never woken")
        .unwrap();
    assert_eq!(server.await.unwrap(), UP);
    drop(a.cmds);
    a.task.await.unwrap();
}

/// A slow link (a mobile edge: 20 KB/s each way): a 60 KiB `Data` frame
/// takes three seconds to arrive, longer than the silence limit, and the
/// gateway's keep-alives cannot come between its bytes. The bytes of a
/// frame still arriving prove the path as well as a whole frame: the
/// download completes on its first transport. The agent used to count
/// whole frames only, gave the transport up in the middle of each large
/// frame, resumed, was sent the same frame again, and never got past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_carries_a_download_on_one_transport() {
    const LEN: usize = 200 * 1024;
    let env = common::start(LOOPBACK_ALLOWED).await;
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    proxy.set_mode(jvpn_loadtest::faultproxy::Mode::Throttle(20_000));
    let data = pattern(7, LEN);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    {
        let data = data.clone();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            c.write_all(&data).await.unwrap();
            c.shutdown().await.unwrap();
        });
    }
    let a = run_agent(&env, proxy.addr);
    let mut s = a.tunnel.connect(&common::target(dest)).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("the download did not finish")
        .unwrap();
    assert!(got == data, "{} bytes, not the {LEN} sent", got.len());
    let r = a.report.lock().unwrap().clone();
    assert_eq!(r.resumes_ok + r.rehandshakes, 0, "{:?}", r.timeline);
    drop(s);
    drop(a.cmds);
    a.task.await.unwrap();
}
