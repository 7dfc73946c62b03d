//! TLS 1.3 resumption for RESUME (issue 17): reattaches resume TLS from a
//! ticket of the owner, each ticket is presented once (visible on the wire:
//! every RESUME's ClientHello carries another PSK identity), a ticket
//! presented twice or to another gateway gets a full handshake, never a
//! resumed session (visible on the wire too: no `pre_shared_key` in the
//! ServerHello), and a HELLO never resumes.

#![allow(clippy::unwrap_used)]

mod common;

use jvpn_loadtest::harness;
use jvpn_proto::preamble::PREAMBLE_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A relay in front of the gateway that hands over the preamble and the
/// first TLS record (the ClientHello) of every connection.
async fn hello_capturing_relay(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(Vec<u8>, Vec<u8>)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; PREAMBLE_LEN + 5];
                if c.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([
                    head[PREAMBLE_LEN + 3],
                    head[PREAMBLE_LEN + 4],
                ]));
                let mut record = vec![0u8; len];
                if c.read_exact(&mut record).await.is_err() {
                    return;
                }
                let mut u = TcpStream::connect(upstream).await.unwrap();
                u.write_all(&head).await.unwrap();
                u.write_all(&record).await.unwrap();
                let mut hello = head.split_off(PREAMBLE_LEN);
                hello.extend_from_slice(&record);
                let _ = tx.send((head, hello));
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
        }
    });
    (addr, rx)
}

/// The extensions of a handshake record holding a ClientHello (`0x01`) or
/// a ServerHello (`0x02`): (type, body) each.
fn extensions(record: &[u8], msg: u8) -> Vec<(u16, Vec<u8>)> {
    let u16_at = |b: &[u8], i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
    assert_eq!(record[0], 0x16, "a handshake record");
    let b = &record[5..];
    assert_eq!(b[0], msg, "handshake message type");
    // type, length, legacy version, random; then the session id.
    let mut i = 4 + 2 + 32;
    i += 1 + usize::from(b[i]);
    if msg == 0x01 {
        i += 2 + u16_at(b, i); // cipher suites
        i += 1 + usize::from(b[i]); // compression methods
    } else {
        i += 2 + 1; // the cipher suite, the compression method
    }
    let end = i + 2 + u16_at(b, i);
    i += 2;
    let mut out = Vec::new();
    while i < end {
        let (ty, len) = (u16_at(b, i) as u16, u16_at(b, i + 2));
        out.push((ty, b[i + 4..i + 4 + len].to_vec()));
        i += 4 + len;
    }
    out
}

fn extension_types(record: &[u8], msg: u8) -> Vec<u16> {
    extensions(record, msg)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// The PSK identities (tickets) a ClientHello record offers.
fn psk_identities(record: &[u8]) -> Vec<Vec<u8>> {
    let u16_at = |b: &[u8], i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let mut out = Vec::new();
    for (_, body) in extensions(record, 0x01)
        .into_iter()
        .filter(|(t, _)| *t == 41)
    {
        let end = 2 + u16_at(&body, 0);
        let mut i = 2;
        while i < end {
            let len = u16_at(&body, i);
            out.push(body[i + 2..i + 2 + len].to_vec());
            i += 2 + len + 4; // identity, obfuscated age
        }
    }
    out
}

const POLICY: &str = "[policy]\nswitch_cooldown_ms = 300\nmax_switches_per_min = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattaches_resume_tls_with_a_fresh_ticket_each_time() {
    // The most verbose logs: rustls prints tickets at trace.
    let env = common::start_with(harness::GatewayOptions {
        extra_toml: POLICY.into(),
        env: vec![("RUST_LOG".into(), "trace".into())],
        ..Default::default()
    })
    .await;
    let (relay, mut hellos) = hello_capturing_relay(env.gw.client_addr).await;
    let mut a = harness::agent(&env.pki, relay, None).unwrap();
    let t = common::hello(&mut a).await;
    assert!(!t.resumed_tls(), "a HELLO runs a full handshake");
    assert!(
        psk_identities(&hellos.recv().await.unwrap().1).is_empty(),
        "and offers no ticket"
    );
    drop(t);
    let mut seen = Vec::new();
    for i in 0..3 {
        let mut t = common::resume(&mut a).await.unwrap();
        assert!(t.resumed_tls(), "RESUME {i} resumed TLS");
        t.echo(b"x").await.unwrap();
        let ids = psk_identities(&hellos.recv().await.unwrap().1);
        assert_eq!(ids.len(), 1, "RESUME {i} offers one ticket");
        assert!(
            !seen.contains(&ids[0]),
            "RESUME {i} presents a ticket never seen before"
        );
        seen.push(ids[0].clone());
    }
    let m = env.gw.metrics().await.unwrap();
    let tls =
        |k: &str| harness::metric_value(&m, "jvpn_gateway_tls_handshakes_total", &[("kind", k)]);
    assert_eq!((tls("full"), tls("resumed")), (1.0, 3.0));
    // Tickets are secrets: none reaches the log, in any encoding.
    let log = std::fs::read(env.gw.log_path()).unwrap();
    let text = String::from_utf8_lossy(&log);
    for id in &seen {
        assert!(
            !text.contains(&hex::encode(id)),
            "a ticket in the log (hex)"
        );
        assert!(
            !log.windows(id.len()).any(|w| w == id.as_slice()),
            "a ticket in the log"
        );
    }
}

/// Sends `client_hello` (preamble and ClientHello record, as captured) on
/// a new connection to `to`; whether the server's answer accepts a PSK (a
/// resumption): its ServerHello carries `pre_shared_key`.
async fn server_accepts_psk(to: std::net::SocketAddr, client_hello: &[u8]) -> bool {
    let mut c = TcpStream::connect(to).await.unwrap();
    c.write_all(client_hello).await.unwrap();
    let mut head = [0u8; 5];
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x16, "a handshake record, not an alert");
    let mut record = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
    c.read_exact(&mut record).await.unwrap();
    let mut whole = head.to_vec();
    whole.extend_from_slice(&record);
    extension_types(&whole, 0x02).contains(&41)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_replayed_or_taken_elsewhere_gets_a_full_handshake() {
    let env = common::start(POLICY).await;
    let (relay, mut hellos) = hello_capturing_relay(env.gw.client_addr).await;
    let mut a = harness::agent(&env.pki, relay, None).unwrap();
    let _t = common::hello(&mut a).await;
    hellos.recv().await.unwrap();
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(t.resumed_tls());
    t.echo(b"x").await.unwrap();
    let (preamble, record) = hellos.recv().await.unwrap();
    assert_eq!(psk_identities(&record).len(), 1);
    let mut captured = preamble;
    captured.extend_from_slice(&record);

    // The same bytes again, as an eavesdropper would send them.
    assert!(
        !server_accepts_psk(env.gw.client_addr, &captured).await,
        "a ticket used once is not accepted again"
    );
    let refused = |gw: &harness::LocalGateway, r: &'static str| {
        let gw = gw.admin_addr;
        async move {
            let m = harness::scrape(gw).await.unwrap();
            harness::metric_value(
                &m,
                "jvpn_gateway_tls_tickets_refused_total",
                &[("reason", r)],
            )
        }
    };
    assert_eq!(refused(&env.gw, "reused").await, 1.0);
    // The session is untouched by it.
    t.echo(b"y").await.unwrap();

    // Another gateway process (same PKI, same name): its keys are its own.
    let dir = tempfile::tempdir().unwrap();
    let other = harness::LocalGateway::start(
        &common::launcher(),
        &env.pki,
        dir.path(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(
        !server_accepts_psk(other.client_addr, &captured).await,
        "a ticket of another gateway"
    );
    assert_eq!(refused(&other, "unknown").await, 1.0);
    assert_eq!(refused(&other, "reused").await, 0.0);
}

/// Rolling upgrades: an agent that does not resume (one version older, or
/// resumption turned off) still reattaches, with full handshakes; a
/// gateway that sends no tickets is covered by the fake gateways of
/// `agent_behaviour.rs` and `data_plane_bad_gateway.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_resume_still_reattaches() {
    let env = common::start(POLICY).await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    a.set_tls_resumption(false).unwrap();
    let _t = common::hello(&mut a).await;
    for _ in 0..2 {
        let mut t = common::resume(&mut a).await.unwrap();
        assert!(!t.resumed_tls());
        t.echo(b"x").await.unwrap();
    }
    let m = env.gw.metrics().await.unwrap();
    let tls =
        |k: &str| harness::metric_value(&m, "jvpn_gateway_tls_handshakes_total", &[("kind", k)]);
    assert_eq!((tls("full"), tls("resumed")), (3.0, 0.0));
}

/// Keeps the first ticket it gets and offers it once, on any connection.
#[derive(Debug, Default)]
struct OneTicket(std::sync::Mutex<Option<rustls::client::Tls13ClientSessionValue>>);

impl rustls::client::ClientSessionStore for OneTicket {
    fn set_kx_hint(&self, _: rustls_pki_types::ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &rustls_pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: rustls_pki_types::ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(
        &self,
        _: &rustls_pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &rustls_pki_types::ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: rustls_pki_types::ServerName<'static>,
        v: rustls::client::Tls13ClientSessionValue,
    ) {
        self.0.lock().unwrap().get_or_insert(v);
    }
    fn take_tls13_ticket(
        &self,
        _: &rustls_pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.0.lock().unwrap().take()
    }
}

/// A client configuration that keeps one ticket (rustls offers a ticket
/// only with the configuration that got it).
fn one_ticket_client(env: &common::Env) -> std::sync::Arc<rustls::ClientConfig> {
    let roots = jvpn_agent::AgentConfig::roots_from_pem(&env.pki.layout.client_ca()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![jvpn_proto::ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::store(std::sync::Arc::new(OneTicket::default()));
    std::sync::Arc::new(cfg)
}

/// A HELLO (preamble, TLS with `cfg`, the frame); whether TLS resumed, and
/// the answer.
async fn raw_hello(
    env: &common::Env,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> (bool, Option<jvpn_proto::pb::session::frame::Kind>) {
    use jvpn_proto::pb::session::Hello;
    use jvpn_proto::pb::session::frame::Kind;
    let mut tcp = TcpStream::connect(env.gw.client_addr).await.unwrap();
    let preamble = jvpn_proto::preamble::Preamble::Hello { key_id: 0 };
    tcp.write_all(&preamble.encode()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(harness::CLUSTER).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let hello = Kind::Hello(Hello {
        keepalive: false,
        protocol_version: jvpn_proto::PROTOCOL_VERSION,
        auth: env.pki.dev_token().unwrap().into_bytes(),
        channel: false,
        migration: false,
    });
    jvpn_runtime::wire::write_frame(&mut tls, hello)
        .await
        .unwrap();
    let mut buf = bytes::BytesMut::new();
    let answer = jvpn_runtime::wire::read_frame(&mut tls, &mut buf)
        .await
        .ok()
        .flatten();
    (resumed, answer)
}

/// A new session is made over a full handshake only: a HELLO over a
/// resumed connection (its principal would come from the ticket, not from
/// a verification now) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_over_a_resumed_connection_is_refused() {
    use jvpn_proto::pb::session::frame::Kind;
    let env = common::start("").await;
    let cfg = one_ticket_client(&env);
    let (resumed, answer) = raw_hello(&env, cfg.clone()).await;
    assert!(!resumed);
    assert!(matches!(answer, Some(Kind::HelloOk(_))), "{answer:?}");
    let (resumed, answer) = raw_hello(&env, cfg).await;
    assert!(resumed, "the second connection resumed TLS");
    match answer {
        Some(Kind::Reject(r)) => {
            assert_eq!(r.reason, jvpn_proto::ReasonCode::AuthFailed as i32);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    assert_eq!(
        env.gw
            .metric("jvpn_gateway_hellos_total", &[("result", "auth_failed")])
            .await
            .unwrap(),
        1.0
    );
}

/// A resumed handshake does not check the client's certificate again, so a
/// reload (perhaps of the agent CA) makes every earlier ticket worthless:
/// the next reattach runs a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_retires_every_earlier_ticket() {
    let env = common::start(POLICY).await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let _t = common::hello(&mut a).await;
    env.gw.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    harness::eventually(
        std::time::Duration::from_secs(5),
        "gateway reloaded",
        || async {
            env.gw
                .metric("jvpn_gateway_config_reloads_total", &[])
                .await
                .unwrap()
                == 1.0
        },
    )
    .await
    .unwrap();
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(!t.resumed_tls(), "the ticket from before the reload");
    t.echo(b"x").await.unwrap();
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(t.resumed_tls(), "a ticket from after it");
    t.echo(b"y").await.unwrap();
    assert_eq!(
        env.gw
            .metric(
                "jvpn_gateway_tls_tickets_refused_total",
                &[("reason", "unknown")]
            )
            .await
            .unwrap(),
        1.0
    );
}

/// A NAT reset hits transports of every age, most of them long-lived: the
/// ticket issued with a connection still resumes when that connection has
/// been up longer than `transport_lost_ttl`, for as long as its session
/// lives; once the session has ended, it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_resumes_while_its_session_lives_however_old_its_connection() {
    let env = common::start(
        "[policy]\ntransport_lost_ttl_ms = 2500\nswitch_cooldown_ms = 300\nmax_switches_per_min = 3\n",
    )
    .await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = common::hello(&mut a).await;
    // Up for longer than transport_lost_ttl (2.5 s), kept alive by pings.
    let up = std::time::Instant::now();
    while up.elapsed() < std::time::Duration::from_millis(3_500) {
        t.ping().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    drop(t);
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(
        t.resumed_tls(),
        "the ticket of a connection older than transport_lost_ttl resumes"
    );
    t.echo(b"x").await.unwrap();

    // The session ends (the agent closes it): the ticket this last
    // connection got must not resume anything any more.
    t.send(jvpn_proto::pb::session::frame::Kind::Terminate(
        jvpn_proto::pb::session::Terminate {
            reason: jvpn_proto::ReasonCode::AgentClosed as i32,
        },
    ))
    .await
    .unwrap();
    harness::eventually(
        std::time::Duration::from_secs(5),
        "the session ended",
        || async {
            env.gw
                .metric("jvpn_gateway_sessions", &[("state", "attached")])
                .await
                .unwrap()
                == 0.0
        },
    )
    .await
    .unwrap();
    drop(t);
    let r = common::resume(&mut a).await;
    assert!(r.is_err(), "the session is gone");
    // Refused as expired, or as unknown once the gateway has forgotten the
    // ended session's tickets and the key that sealed them.
    let m = env.gw.metrics().await.unwrap();
    let refused = |r: &str| {
        harness::metric_value(
            &m,
            "jvpn_gateway_tls_tickets_refused_total",
            &[("reason", r)],
        )
    };
    assert_eq!(
        refused("expired") + refused("unknown"),
        1.0,
        "the ended session's ticket was refused"
    );
    assert_eq!(
        env.gw
            .metric("jvpn_gateway_tls_handshakes_total", &[("kind", "resumed")])
            .await
            .unwrap(),
        1.0
    );
}

/// In a storm, a RESUME refused before TLS (`overloaded`) has already sent
/// its ticket in the ClientHello, unread by the gateway; the agent's retry
/// must still resume, with the spare ticket its connection received (a
/// gateway sends two per connection, each still used once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_refusal_before_tls_still_resumes() {
    // One open connection at most: a RESUME while the first transport is
    // up is refused before TLS.
    let env = common::start(
        "[policy]\nswitch_cooldown_ms = 300\nmax_switches_per_min = 3\n\
         [admission]\nmax_connections = 1\n",
    )
    .await;
    let (relay, mut hellos) = hello_capturing_relay(env.gw.client_addr).await;
    let mut a = harness::agent(&env.pki, relay, None).unwrap();
    let t = common::hello(&mut a).await;
    hellos.recv().await.unwrap();
    tokio::time::sleep(a.switch_allowed_in()).await;
    match a.resume().await {
        Err(jvpn_agent::AgentError::Status(s)) => {
            assert_eq!(s.status, jvpn_proto::preamble::Status::Overloaded)
        }
        other => panic!("expected a refusal before TLS, got {other:?}"),
    }
    let refused = psk_identities(&hellos.recv().await.unwrap().1);
    assert_eq!(refused.len(), 1, "the refused RESUME offered a ticket");
    drop(t);
    harness::eventually(
        std::time::Duration::from_secs(5),
        "the first transport closed",
        || async {
            env.gw
                .metric("jvpn_gateway_connections_open", &[])
                .await
                .unwrap()
                == 0.0
        },
    )
    .await
    .unwrap();
    let mut t = common::resume(&mut a).await.unwrap();
    assert!(t.resumed_tls(), "the retry resumed TLS");
    t.echo(b"x").await.unwrap();
    let retried = psk_identities(&hellos.recv().await.unwrap().1);
    assert_eq!(retried.len(), 1);
    assert_ne!(retried, refused, "with another ticket");
}
