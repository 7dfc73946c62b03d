//! Events to a SIEM (issue 19, item 10): RFC 5424 over TCP with octet
//! counting (RFC 6587) to a real `rsyslogd` (Debian's, installed by
//! `.ci/run`) started by the test: every event arrives once and its fields
//! parse; a dead collector drops and counts, and never slows a session;
//! TLS to a collector whose certificate is checked.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jvpn_gateway::timeline::format_time;
use jvpn_loadtest::harness::{GatewayOptions, eventually};
use jvpn_proto::ReasonCode;
use jvpn_proto::pb::session::{Terminate, frame::Kind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// `rsyslogd` in the foreground on a port of its choosing, writing each
/// message's fields tab-separated to `out.log`. Killed on drop.
struct Rsyslog {
    _child: tokio::process::Child,
    port: u16,
    out: PathBuf,
}

impl Rsyslog {
    async fn start(dir: &Path) -> Self {
        let out = dir.join("out.log");
        let port_file = dir.join("port");
        let conf = format!(
            r#"global(workDirectory="{dir}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{port}")
template(name="fields" type="list") {{
  property(name="pri") constant(value="\t")
  property(name="timereported" dateFormat="rfc3339") constant(value="\t")
  property(name="hostname") constant(value="\t")
  property(name="app-name") constant(value="\t")
  property(name="procid") constant(value="\t")
  property(name="msgid") constant(value="\t")
  property(name="structured-data") constant(value="\t")
  property(name="msg") constant(value="\n")
}}
*.* action(type="omfile" file="{out}" template="fields")
"#,
            dir = dir.display(),
            port = port_file.display(),
            out = out.display()
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        let program = if Path::new("/usr/sbin/rsyslogd").exists() {
            "/usr/sbin/rsyslogd"
        } else {
            "rsyslogd"
        };
        let child = tokio::process::Command::new(program)
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslog.pid"))
            .kill_on_drop(true)
            .spawn()
            .expect("rsyslogd (Debian package rsyslog, installed by .ci/run)");
        let mut port = 0;
        eventually(Duration::from_secs(10), "rsyslogd listens", || {
            let p = std::fs::read_to_string(&port_file).unwrap_or_default();
            port = p.trim().parse().unwrap_or(0);
            async move { port != 0 }
        })
        .await
        .unwrap();
        Self {
            _child: child,
            port,
            out,
        }
    }

    /// Received messages: tab-separated fields, the MSG last.
    fn messages(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(8, '\t').map(str::to_owned).collect())
            .collect()
    }
}

/// `n` sessions, each made and ended by its agent: two events each.
async fn sessions(env: &common::Env, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
        let t0 = Instant::now();
        let mut t = common::hello(&mut a).await;
        slowest = slowest.max(t0.elapsed());
        t.send(Kind::Terminate(Terminate {
            reason: ReasonCode::AgentClosed as i32,
        }))
        .await
        .unwrap();
    }
    slowest
}

fn event_lines(env: &common::Env) -> Vec<String> {
    std::fs::read_to_string(&env.gw.events_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn metric(env: &common::Env, name: &str) -> f64 {
    env.gw.metric(name, &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_rsyslog_once_and_a_dead_collector_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rs = Rsyslog::start(dir.path()).await;
    let env = common::start_with(GatewayOptions {
        env: vec![
            (
                "JVPN_GATEWAY__EVENTS__SYSLOG_ADDR".into(),
                format!("127.0.0.1:{}", rs.port),
            ),
            ("JVPN_GATEWAY__EVENTS__QUEUE_CAPACITY".into(), "64".into()),
        ],
        ..GatewayOptions::default()
    })
    .await;
    sessions(&env, 20).await;
    // Both sinks have every event: 3 per session (its birth, the HelloOk
    // it was answered, its end).
    eventually(
        Duration::from_secs(10),
        "60 events in the file and at rsyslog",
        || {
            let (file, got) = (event_lines(&env).len(), rs.messages().len());
            async move { file == 60 && got == 60 }
        },
    )
    .await
    .unwrap();
    let pid = env.gw.pid().unwrap().to_string();
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for l in event_lines(&env) {
        *want.entry(l).or_default() += 1;
    }
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for m in rs.messages() {
        let [pri, ts, _host, app, procid, msgid, sd, msg] = m.as_slice() else {
            panic!("fields: {m:?}");
        };
        let v: serde_json::Value = serde_json::from_str(msg).unwrap();
        assert_eq!(pri, "134", "local0.info");
        assert_eq!(
            (app.as_str(), procid.as_str()),
            ("jvpn-gateway", pid.as_str())
        );
        assert_eq!(msgid, v["event_type"].as_str().unwrap());
        assert_eq!(sd, "-");
        // rsyslog writes the timestamp back with its own precision.
        let ms = format_time(v["ts_ms"].as_u64().unwrap() * 1_000_000);
        assert_eq!(ts[..19], ms[..19], "{ts} vs {ms}");
        *got.entry(msg.clone()).or_default() += 1;
    }
    assert_eq!(got, want, "each event once, byte for byte");
    assert_eq!(
        metric(&env, "jvpn_gateway_syslog_events_sent_total").await,
        60.0
    );
    assert_eq!(metric(&env, "jvpn_gateway_syslog_connected").await, 1.0);

    // The collector dies. Sessions go on at full speed; the file still gets
    // every event; the collector's share is dropped and counted.
    drop(rs);
    let slowest = sessions(&env, 150).await;
    assert!(slowest < Duration::from_secs(1), "a HELLO took {slowest:?}");
    eventually(Duration::from_secs(10), "the file has every event", || {
        let n = event_lines(&env).len();
        async move { n == 510 }
    })
    .await
    .unwrap();
    let dropped = metric(&env, "jvpn_gateway_syslog_events_dropped_total").await;
    // 450 events: at most the queue (64) and one batch in hand (at most
    // another 64) wait for a collector; a few went into the dead socket.
    assert!(dropped >= 150.0, "dropped {dropped}");
    assert_eq!(metric(&env, "jvpn_gateway_syslog_connected").await, 0.0);
    assert_eq!(metric(&env, "jvpn_gateway_events_dropped_total").await, 0.0);
}

/// A TLS collector (the test's own, with a certificate from the dev PKI):
/// events arrive framed; a collector whose name does not match gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_a_tls_collector_whose_certificate_checks_out() {
    let pki = jvpn_loadtest::harness::TestPki::new(&["g1"]).unwrap();
    let l = &pki.layout;
    use rustls_pki_types::pem::PemObject as _;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(l.gateway_cert("g1"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(l.gateway_key("g1")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut r = BufReader::new(tls);
                loop {
                    // Octet counting: "LEN SP MSG".
                    let mut len = Vec::new();
                    if r.read_until(b' ', &mut len).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = String::from_utf8_lossy(&len).trim().parse().unwrap();
                    let mut msg = vec![0u8; n];
                    r.read_exact(&mut msg).await.unwrap();
                    let _ = tx.send(String::from_utf8(msg).unwrap());
                }
            });
        }
    });
    let tls_env = |name: &str| {
        vec![
            (
                "JVPN_GATEWAY__EVENTS__SYSLOG_ADDR".to_owned(),
                addr.to_string(),
            ),
            (
                "JVPN_GATEWAY__EVENTS__SYSLOG_TLS_CA_FILE".to_owned(),
                l.client_ca().display().to_string(),
            ),
            (
                "JVPN_GATEWAY__EVENTS__SYSLOG_TLS_SERVER_NAME".to_owned(),
                name.to_owned(),
            ),
        ]
    };
    // The certificate names the cluster (jvpn-dev): accepted.
    let env = common::start_with(GatewayOptions {
        env: tls_env("jvpn-dev"),
        ..GatewayOptions::default()
    })
    .await;
    sessions(&env, 3).await;
    let mut got = Vec::new();
    while got.len() < 9 {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("9 events over TLS")
            .unwrap();
        got.push(m);
    }
    assert!(
        got[0].starts_with("<134>1 ") && got[0].contains(" jvpn-gateway "),
        "{}",
        got[0]
    );
    drop(env);
    // A name the certificate does not carry: the handshake fails and
    // nothing is sent; sessions are unaffected.
    let env = common::start_with(GatewayOptions {
        env: tls_env("collector.example"),
        ..GatewayOptions::default()
    })
    .await;
    sessions(&env, 3).await;
    // The operator is told why, once, in the log.
    eventually(
        Duration::from_secs(10),
        "a warning naming the failure",
        || {
            let log = env.gw.log();
            async move {
                log.lines().any(|l| {
                    l.contains("syslog collector unreachable") && l.contains("certificate")
                })
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        metric(&env, "jvpn_gateway_syslog_events_sent_total").await,
        0.0
    );
    assert_eq!(metric(&env, "jvpn_gateway_syslog_connected").await, 0.0);
    assert!(
        rx.try_recv().is_err(),
        "nothing arrived from the misnamed collector"
    );
}

/// A drain ends every session (one event each) and the gateway exits: the
/// collector gets those last events too, before the process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_its_last_events_before_the_gateway_exits() {
    let dir = tempfile::tempdir().unwrap();
    let rs = Rsyslog::start(dir.path()).await;
    let mut env = common::start_with(GatewayOptions {
        env: vec![
            (
                "JVPN_GATEWAY__EVENTS__SYSLOG_ADDR".into(),
                format!("127.0.0.1:{}", rs.port),
            ),
            // These agents do not leave on GoAway: the drain ends them.
            (
                "JVPN_GATEWAY__TIMEOUTS__DRAIN_TIMEOUT_MS".into(),
                "1000".into(),
            ),
        ],
        ..GatewayOptions::default()
    })
    .await;
    let mut live = Vec::new();
    for _ in 0..5 {
        let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
        let t = common::hello(&mut a).await;
        live.push((a, t));
    }
    env.gw.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), env.gw.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    // 5 births, 5 answers, 5 terminations by the drain.
    let file = event_lines(&env);
    assert_eq!(file.len(), 15, "{file:#?}");
    eventually(Duration::from_secs(5), "rsyslog has all 15", || {
        let n = rs.messages().len();
        async move { n == 15 }
    })
    .await
    .unwrap();
    drop(live);
}

/// A collector that accepts and never reads (a hung SIEM): the sender's
/// writes stall, it gives the batch up after 5 s (counted), and sessions
/// never wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_sessions_nothing_and_its_events_are_counted() {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                held.lock().unwrap().push(s); // never read
            }
        });
    }
    let env = common::start_with(GatewayOptions {
        env: vec![
            ("JVPN_GATEWAY__EVENTS__SYSLOG_ADDR".into(), addr.to_string()),
            ("JVPN_GATEWAY__EVENTS__QUEUE_CAPACITY".into(), "64".into()),
        ],
        ..GatewayOptions::default()
    })
    .await;
    // 1,800 events, about 600 KiB: more than the sender's bounded kernel
    // buffer (128 KiB, doubled by Linux) and the collector's 2 KiB.
    let slowest = sessions(&env, 600).await;
    assert!(slowest < Duration::from_secs(1), "a HELLO took {slowest:?}");
    // The file has every event, whatever the collector does.
    eventually(Duration::from_secs(10), "the file has every event", || {
        let n = event_lines(&env).len();
        async move { n == 1_800 }
    })
    .await
    .unwrap();
    let r = eventually(
        Duration::from_secs(20),
        "the collector's share dropped and counted",
        || async { metric(&env, "jvpn_gateway_syslog_events_dropped_total").await >= 200.0 },
    )
    .await;
    eprintln!(
        "sent {} dropped {}",
        metric(&env, "jvpn_gateway_syslog_events_sent_total").await,
        metric(&env, "jvpn_gateway_syslog_events_dropped_total").await
    );
    r.unwrap();
    assert!(
        !held.lock().unwrap().is_empty(),
        "the collector was reached"
    );
}
