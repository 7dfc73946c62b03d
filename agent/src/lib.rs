//! jvpn-agent: the client side of a Jumping VPN session.
//!
//! The session is the anchor; transports come and go. An [`Agent`] holds the
//! session's client state (id, key, binding epoch, counter, routing token)
//! and opens transports to it:
//!
//! - [`Agent::hello`] opens a new session (explicitly, and counted as a
//!   re-handshake when a session existed before);
//! - [`Agent::resume`] reattaches the session over a fresh TCP + TLS
//!   connection, verifies the gateway's `server_proof`, checks that the
//!   answer comes from the node and incarnation that issued the session, and
//!   rotates the key;
//! - [`Transport`] is one attached connection: ping, echo data, read frames.
//!
//! [`keep_alive`] composes these into the loop the CLI and the load tool run:
//! heartbeats, reattach with back-off and jitter bounded by the transport-lost
//! TTL, honouring `retry_after_ms`, and an explicit, reported re-handshake
//! when the gateway answers `unknown_session` or `owner_lost`.
//!
//! # Layout
//!
//! - this file: [`Agent`], [`Transport`], errors and reports. The session
//!   itself (counter, proofs, key rotation, owner check) is the sans-IO
//!   [`ClientSession`] from `jvpn_proto::client`, which the simulations drive too.
//! - [`sniff`]: tells a pre-TLS status reply from a TLS record.
//! - [`run`]: the keep-alive loop.
//! - [`cli`]: the `jvpn-agent` command line.

#![forbid(unsafe_code)]

pub mod cli;
pub mod frontdoor;
pub mod run;
pub mod sniff;
pub mod streams;
pub mod tickets;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use jvpn_proto::ReasonCode;
use jvpn_proto::frame::{self, FrameError};
use jvpn_proto::pb::session::{Hello, Resume, frame::Kind};
use jvpn_proto::preamble::{Preamble, StatusReply};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use run::{AgentReport, Command, keep_alive};
use sniff::Sniff;

/// How the agent proves who it is.
#[derive(Clone)]
pub enum Credential {
    /// A development token (sent inside TLS, in `Hello.auth`).
    Token(zeroize::Zeroizing<Vec<u8>>),
    /// A client certificate from the agent CA.
    Certificate {
        chain: Vec<CertificateDer<'static>>,
        key: Arc<PrivateKeyDer<'static>>,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
            Credential::Certificate { .. } => f.write_str("Certificate(<redacted key>)"),
        }
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Gateways (single node) or routers (cluster), tried in order.
    pub servers: Vec<SocketAddr>,
    /// TLS name the gateway certificates carry (the cluster name).
    pub server_name: String,
    pub roots: Arc<RootCertStore>,
    pub credential: Credential,
    /// Local address to connect from (`None`: the OS chooses).
    pub bind_ip: Option<IpAddr>,
    pub connect_timeout: Duration,
}

impl AgentConfig {
    /// Reads a PEM CA file into a root store.
    pub fn roots_from_pem(path: &Path) -> Result<RootCertStore, AgentError> {
        let mut roots = RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(path).map_err(|e| AgentError::Config(e.to_string()))?
        {
            let cert = cert.map_err(|e| AgentError::Config(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| AgentError::Config(e.to_string()))?;
        }
        Ok(roots)
    }

    /// Reads a client certificate chain and key.
    pub fn certificate_from_pem(cert: &Path, key: &Path) -> Result<Credential, AgentError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| AgentError::Config(format!("{}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| AgentError::Config(format!("{}: {e}", key.display())))?;
        Ok(Credential::Certificate {
            chain,
            key: Arc::new(key),
        })
    }
}

/// Why an operation failed. Each variant says what the agent should do next.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad local configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// TCP connect failed or timed out.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    /// The server answered with a pre-TLS status instead of TLS.
    #[error("server status {:?} (retry after {} ms)", .0.status, .0.retry_after_ms)]
    Status(StatusReply),
    /// TLS failed (certificate, ALPN, protocol).
    #[error("tls: {0}")]
    Tls(io::Error),
    /// The gateway refused the request.
    #[error("rejected: {reason} (retry after {retry_after_ms} ms)")]
    Rejected {
        reason: ReasonCode,
        retry_after_ms: u64,
        current_binding_epoch: u64,
        /// How long the gateway keeps the session without a transport from
        /// now (0: not said).
        transport_lost_deadline_ms: u64,
    },
    /// The gateway ended the transport or the session.
    #[error("terminated: {0}")]
    Terminated(ReasonCode),
    /// The transport closed.
    #[error("transport closed")]
    Closed,
    /// TLS completed but the answer to the HELLO or RESUME did not come in
    /// time (a paused or swamped gateway, a path that died after the
    /// handshake): treated like an overloaded gateway.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The peer broke the protocol (or a security check failed).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An I/O error on an established transport.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// A frame could not be read.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// A `ResumeOk` came from another node or incarnation than the one that
    /// issued the session: a silent migration attempt, refused.
    #[error("ResumeOk from {got}, session belongs to {expected}")]
    OwnerMismatch { expected: String, got: String },
    /// There is no session to resume.
    #[error("no session")]
    NoSession,
    /// The session's channel cannot continue byte-exactly (an offset out
    /// of range, a frame outside the window): the session is given up and
    /// a new one made, explicitly.
    #[error("channel broken: {0}")]
    ChannelBroken(String),
}

impl From<ClientError> for AgentError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::OwnerMismatch { expected, got } => {
                AgentError::OwnerMismatch { expected, got }
            }
            other => AgentError::Protocol(other.to_string()),
        }
    }
}

impl AgentError {
    /// Does this failure mean the session is gone and a new HELLO is needed?
    pub fn session_gone(&self) -> bool {
        match self {
            AgentError::Rejected { reason, .. } | AgentError::Terminated(reason) => {
                jvpn_proto::client::ends_session(*reason)
            }
            AgentError::Status(s) => s.status == jvpn_proto::preamble::Status::OwnerLost,
            // Never continue with an owner the session did not start on.
            AgentError::OwnerMismatch { .. } | AgentError::ChannelBroken(_) => true,
            _ => false,
        }
    }
}

/// The client's half of a session (sans-IO, shared with the simulations).
pub use jvpn_proto::client::{ClientError, ClientSession, ExportError, Exporter};

/// One attached TLS connection.
pub struct Transport {
    tls: TlsStream<Sniff<TcpStream>>,
    buf: BytesMut,
    next_seq: u64,
    pub local_addr: SocketAddr,
    /// The gateway's keep-alive interval on this connection (`HelloOk` /
    /// `ResumeOk`); 0: none, the agent pings.
    keepalive_ms: u64,
    /// When bytes last came, whole frames or not.
    heard: std::time::Instant,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Transport {
    /// Whether this connection resumed TLS from a ticket (no certificates
    /// exchanged) rather than running a full handshake.
    pub fn resumed_tls(&self) -> bool {
        self.tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// How often the gateway sends a keep-alive on this connection when it
    /// has nothing else to send (design note 52); `None`: it does not, and
    /// the agent must ping.
    pub fn gateway_keepalive(&self) -> Option<std::time::Duration> {
        (self.keepalive_ms > 0).then(|| std::time::Duration::from_millis(self.keepalive_ms))
    }

    pub async fn send(&mut self, kind: Kind) -> Result<(), AgentError> {
        let bytes = frame::to_bytes(kind)?;
        self.tls.write_all(&bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// Sends raw bytes (tests: oversize or malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// Next frame; `Terminate` becomes [`AgentError::Terminated`].
    pub async fn recv(&mut self) -> Result<Kind, AgentError> {
        loop {
            if let Some(k) = frame::decode(&mut self.buf)? {
                if let Kind::Terminate(t) = &k {
                    return Err(AgentError::Terminated(reason_of(t.reason)));
                }
                return Ok(k);
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(1024);
            }
            if self.tls.read_buf(&mut self.buf).await? == 0 {
                return Err(AgentError::Closed);
            }
            self.heard = std::time::Instant::now();
        }
    }

    /// When bytes last arrived on this connection, part of a frame or not:
    /// on a slow link a large frame takes longer than the silence limit,
    /// and its bytes prove the path as well as a whole frame does.
    pub fn heard(&self) -> std::time::Instant {
        self.heard
    }

    /// Sends `payload` to the gateway's echo service (sessions without a
    /// channel); the echo comes back as a `Data` frame with the returned
    /// `seq`.
    pub async fn send_echo(&mut self, payload: &[u8]) -> Result<u64, AgentError> {
        self.next_seq += 1;
        let seq = self.next_seq;
        let data = jvpn_proto::pb::session::Data {
            seq,
            payload: payload.to_vec().into(),
        };
        self.send(Kind::Data(data)).await?;
        Ok(seq)
    }

    /// Sends `payload` and waits for the gateway's echo of it, skipping
    /// pongs and other frames (for tests and tools that drive a transport
    /// themselves; the agent's loop keeps reading other frames meanwhile).
    pub async fn echo(&mut self, payload: &[u8]) -> Result<(), AgentError> {
        let seq = self.send_echo(payload).await?;
        loop {
            match self.recv().await? {
                Kind::Data(d) if d.seq == seq => {
                    return if d.payload.as_ref() == payload {
                        Ok(())
                    } else {
                        Err(AgentError::Protocol("echo payload differs".into()))
                    };
                }
                Kind::Reject(r) => return Err(rejected(&r)),
                _ => {}
            }
        }
    }

    /// A check-in to a gateway that sends keep-alives (design note 52): a
    /// `Ping` with `seq` 0, which it does not answer.
    pub async fn check_in(&mut self) -> Result<(), AgentError> {
        self.send(Kind::Ping(jvpn_proto::pb::session::Ping { seq: 0 }))
            .await
    }

    pub async fn ping(&mut self) -> Result<(), AgentError> {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.send(Kind::Ping(jvpn_proto::pb::session::Ping { seq }))
            .await
    }

    /// Closes the TCP connection abruptly (no TLS close_notify): a lost transport.
    pub fn abandon(self) {
        drop(self);
    }
}

impl Exporter for Transport {
    fn export(&self, label: &[u8], ctx: &[u8]) -> Result<[u8; 32], ExportError> {
        jvpn_runtime::tls::export(self.tls.get_ref().1, label, ctx)
    }
}

fn reason_of(v: i32) -> ReasonCode {
    ReasonCode::try_from(v).unwrap_or(ReasonCode::ProtocolError)
}

fn rejected(r: &jvpn_proto::pb::session::Reject) -> AgentError {
    AgentError::Rejected {
        reason: reason_of(r.reason),
        retry_after_ms: r.retry_after_ms,
        current_binding_epoch: r.current_binding_epoch,
        transport_lost_deadline_ms: r.transport_lost_deadline_ms,
    }
}

/// A session just made by HELLO, not yet the agent's.
pub(crate) struct Fresh {
    session: ClientSession,
    /// The configured server that made it.
    server: usize,
    /// The channel window the gateway granted (0: no data plane).
    window: u64,
}

/// The TLS connectors of an agent: HELLO (full handshakes) and RESUME
/// (offers the last ticket once), sharing one ticket store.
fn connectors(cfg: &AgentConfig) -> Result<(TlsConnector, TlsConnector), AgentError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AgentError::Config(e.to_string()))?
        .with_root_certificates(cfg.roots.clone());
    let mut tls = match &cfg.credential {
        Credential::Token(_) => builder.with_no_client_auth(),
        Credential::Certificate { chain, key } => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| AgentError::Config(e.to_string()))?,
    };
    tls.alpn_protocols = vec![jvpn_proto::ALPN.to_vec()];
    tls.enable_early_data = false;
    let store = tickets::TicketStore::default();
    let mut resume_tls = tls.clone();
    tls.resumption = rustls::client::Resumption::store(store.for_hello());
    resume_tls.resumption = rustls::client::Resumption::store(store.for_resume());
    Ok((
        TlsConnector::from(Arc::new(tls)),
        TlsConnector::from(Arc::new(resume_tls)),
    ))
}

/// A client agent: configuration, TLS setup and (once established) its session.
pub struct Agent {
    cfg: AgentConfig,
    /// HELLO: full handshakes only. RESUME: offers the gateway's last
    /// ticket (once). Both keep the tickets they receive.
    connector: TlsConnector,
    resume_connector: TlsConnector,
    pub session: Option<ClientSession>,
    next_server: usize,
    /// The configured server the session was made or last reattached
    /// through: where a RESUME goes first. Given several gateways without
    /// a router, only that one holds the session.
    home: usize,
    /// Committed switches of the current session, for client-side pacing.
    switches: std::collections::VecDeque<Instant>,
    /// The data plane, once [`Agent::tunnel`] asked for one.
    pub(crate) data: Option<(streams::DataPlane, streams::Tunnel)>,
    /// The last takeover the agent accepted, until [`Agent::take_migration`].
    migration: Option<Migration>,
    /// Whether HELLOs say the agent follows a taker (`Hello.migration`).
    accepts_migration: bool,
    /// Whether HELLOs and RESUMEs ask for gateway keep-alives
    /// (`Hello.keepalive`): the session loop ([`run`]) listens for them
    /// and only checks in; a caller that drives a transport by hand keeps
    /// pinging, so the default is off.
    listens_for_keepalives: bool,
}

/// Topology 3: the session moved to a taker after its owner died (an
/// explicit migration: higher owner epoch, proven with the session's key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// `node/incarnation` of the dead owner and of the taker.
    pub from: String,
    pub to: String,
    /// Streams that lived on the dead owner, reset (`taken_over`).
    pub streams_reset: u64,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        if cfg.servers.is_empty() {
            return Err(AgentError::Config("no servers configured".into()));
        }
        let (connector, resume_connector) = connectors(&cfg)?;
        Ok(Self {
            cfg,
            connector,
            resume_connector,
            session: None,
            next_server: 0,
            home: 0,
            switches: std::collections::VecDeque::new(),
            data: None,
            migration: None,
            accepts_migration: true,
            listens_for_keepalives: false,
        })
    }

    /// Turns TLS resumption for RESUME off (every reattach then runs a
    /// full handshake, as before issue 17) or back on; for benchmarks and
    /// for diagnosing a gateway's ticket handling.
    pub fn set_tls_resumption(&mut self, on: bool) -> Result<(), AgentError> {
        let (hello, resume) = connectors(&self.cfg)?;
        self.resume_connector = if on { resume } else { hello.clone() };
        self.connector = hello;
        Ok(())
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Turns the data plane on (sessions from the next HELLO carry a
    /// channel) and returns the handle that opens streams through it.
    pub fn tunnel(&mut self) -> streams::Tunnel {
        self.data
            .get_or_insert_with(streams::DataPlane::new)
            .1
            .clone()
    }

    /// Whether the current session has a channel (the gateway granted the
    /// data plane in its HelloOk / ResumeOk).
    pub fn has_channel(&self) -> bool {
        self.data.as_ref().is_some_and(|(d, _)| d.channel.is_some())
    }

    /// Why the current session's channel was closed while the session
    /// lives (its HTTP/2 connection ended), if it was.
    pub fn channel_broken(&self) -> Option<String> {
        self.data
            .as_ref()
            .and_then(|(d, _)| d.channel.as_ref())
            .and_then(|(ch, _)| ch.closed())
    }

    /// Streams open through the current session now (0 without one).
    pub fn open_streams(&self) -> u64 {
        self.data.as_ref().map_or(0, |(d, _)| d.open_streams())
    }

    /// Its streams have all ended: HTTP/2 may finish (see `DataPlane::let_finish`).
    pub(crate) fn let_streams_finish(&mut self) {
        if let Some((d, _)) = self.data.as_mut() {
            d.let_finish();
        }
    }

    /// Every byte its streams sent has reached the gateway.
    pub(crate) fn streams_delivered(&self) -> bool {
        self.data.as_ref().is_none_or(|(d, _)| d.delivered())
    }

    /// The session ended for `why`: its streams are reset with that reason.
    pub(crate) fn end_streams(&mut self, why: &str) {
        if let Some((d, _)) = self.data.as_mut() {
            d.close(why);
        }
    }

    /// How long to wait before the next switch is within the policy the
    /// gateway announced (cooldown and switches per minute): the agent never
    /// switches faster than the gateway would allow.
    pub fn switch_allowed_in(&self) -> Duration {
        let Some(p) = self.session.as_ref().map(|s| s.policy) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let cooldown = self
            .switches
            .back()
            .map(|t| {
                (*t + Duration::from_millis(p.switch_cooldown_ms)).saturating_duration_since(now)
            })
            .unwrap_or_default();
        let max = p.max_switches_per_min as usize;
        let window = if max > 0 && self.switches.len() >= max {
            let oldest = self.switches[self.switches.len() - max];
            (oldest + Duration::from_secs(60)).saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        cooldown.max(window)
    }

    /// Whether new sessions may be carried on by a taker when their owner
    /// dies (topology 3; on by default). Off, the agent behaves as one
    /// from before takeovers: its sessions end with their owner, and it
    /// re-handshakes. Applies from the next HELLO.
    pub fn set_accepts_migration(&mut self, on: bool) {
        self.accepts_migration = on;
    }

    /// Whether the next HELLOs and RESUMEs ask the gateway for keep-alives
    /// (design note 52). Whoever turns this on must read the transport
    /// (the keep-alives arrive as `Pong` frames) and should ping only to
    /// check in, every 10 × [`Transport::gateway_keepalive`].
    pub fn set_listens_for_keepalives(&mut self, on: bool) {
        self.listens_for_keepalives = on;
    }

    /// The takeover the last RESUME accepted, if it was one (topology 3).
    pub fn take_migration(&mut self) -> Option<Migration> {
        self.migration.take()
    }

    /// Moves on to the next configured server (router fail-over).
    pub fn rotate_server(&mut self) {
        self.next_server = (self.next_server + 1) % self.cfg.servers.len();
    }

    /// Whether the next connection goes to the session's own server.
    pub(crate) fn at_home(&self) -> bool {
        self.next_server == self.home
    }

    /// The next connection goes to the session's own server.
    pub(crate) fn go_home(&mut self) {
        self.next_server = self.home;
    }

    /// Opens TCP (from `bind_ip` if set), sends the preamble, runs TLS and checks ALPN.
    pub async fn open(&self, preamble: &Preamble) -> Result<Transport, AgentError> {
        let addr = self.cfg.servers[self.next_server];
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| AgentError::Connect(addr, e))?;
        if let Some(ip) = self.cfg.bind_ip {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| AgentError::Connect(addr, e))?;
        }
        let mut tcp = tokio::time::timeout(self.cfg.connect_timeout, socket.connect(addr))
            .await
            .map_err(|_| AgentError::Connect(addr, io::ErrorKind::TimedOut.into()))?
            .map_err(|e| AgentError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        let local_addr = tcp.local_addr()?;
        tcp.write_all(&preamble.encode())
            .await
            .map_err(|e| AgentError::Connect(addr, e))?;
        let name = ServerName::try_from(self.cfg.server_name.clone())
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let connector = match preamble {
            Preamble::Resume { .. } => &self.resume_connector,
            _ => &self.connector,
        };
        let tls = tokio::time::timeout(
            self.cfg.connect_timeout,
            connector.connect(name, Sniff::new(tcp)),
        )
        .await
        .map_err(|_| AgentError::Tls(io::ErrorKind::TimedOut.into()))?
        .map_err(|e| match sniff::status_of(&e) {
            Some(s) => AgentError::Status(s),
            None => AgentError::Tls(e),
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(jvpn_proto::ALPN) {
            return Err(AgentError::Protocol(
                "server did not select ALPN jvpn/1".into(),
            ));
        }
        Ok(Transport {
            tls,
            buf: BytesMut::with_capacity(256),
            next_seq: 0,
            local_addr,
            keepalive_ms: 0,
            heard: std::time::Instant::now(),
        })
    }

    /// Opens a new session. Any previous session state is discarded.
    pub async fn hello(&mut self) -> Result<Transport, AgentError> {
        let (t, fresh) = self.hello_only().await?;
        self.adopt(fresh);
        Ok(t)
    }

    /// The next frame of the answer to a request sent at `asked`: within
    /// twice the connect timeout of it (a gateway under a storm answers
    /// late, and giving up wastes what it did), or [`AgentError::NoAnswer`].
    /// A gateway that completed TLS and then says nothing (paused; the path
    /// died after the handshake) would otherwise hold the agent until TCP
    /// gives up.
    async fn answer(&self, t: &mut Transport, asked: Instant) -> Result<Kind, AgentError> {
        let within = self.cfg.connect_timeout * 2;
        match tokio::time::timeout_at((asked + within).into(), t.recv()).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::NoAnswer(within)),
        }
    }

    /// HELLO on a new connection, leaving this agent's session as it is:
    /// the new session is applied with [`Agent::adopt`] (a hand-over makes
    /// the next session while the current one still serves).
    pub(crate) async fn hello_only(&self) -> Result<(Transport, Fresh), AgentError> {
        let mut t = self.open(&Preamble::Hello { key_id: 0 }).await?;
        let auth = match &self.cfg.credential {
            Credential::Token(tok) => tok.to_vec(),
            Credential::Certificate { .. } => Vec::new(),
        };
        t.send(Kind::Hello(Hello {
            keepalive: self.listens_for_keepalives,
            protocol_version: jvpn_proto::PROTOCOL_VERSION,
            auth,
            channel: self.data.is_some(),
            // This agent follows a taker (topology 3), with the checks of
            // `ClientSession::apply_resume_ok`, unless told not to.
            migration: self.accepts_migration,
        }))
        .await?;
        let ok = match self.answer(&mut t, Instant::now()).await? {
            Kind::HelloOk(ok) => ok,
            Kind::Reject(r) => return Err(rejected(&r)),
            other => {
                return Err(AgentError::Protocol(format!(
                    "expected HelloOk, got {other:?}"
                )));
            }
        };
        let window = ok.channel_window;
        t.keepalive_ms = if self.listens_for_keepalives {
            ok.keepalive_ms
        } else {
            0
        };
        let session = ClientSession::from_hello_ok(ok, &t)?;
        let server = self.next_server;
        Ok((
            t,
            Fresh {
                session,
                server,
                window,
            },
        ))
    }

    /// Makes `fresh` this agent's session; the previous session's channel
    /// (if still here) is closed and its streams reset.
    pub(crate) fn adopt(&mut self, fresh: Fresh) {
        self.switches.clear();
        (self.home, self.next_server) = (fresh.server, fresh.server);
        self.session = Some(fresh.session);
        if let Some((d, _)) = self.data.as_mut() {
            if fresh.window > 0 {
                d.start(fresh.window);
            } else {
                // An older gateway: sessions without streams.
                d.close("the gateway has no data plane");
            }
        }
    }

    /// An agent with this one's configuration and no session, for making
    /// a session in the background ([`Agent::hello_only`] asks for a
    /// channel if this agent has a data plane).
    pub(crate) fn fork(&self) -> Agent {
        // Tickets of its own: the new session's gateway is another one, and
        // its ticket must not displace the current session's.
        let (connector, resume_connector) = connectors(&self.cfg)
            .unwrap_or_else(|_| (self.connector.clone(), self.resume_connector.clone()));
        Agent {
            cfg: self.cfg.clone(),
            connector,
            resume_connector,
            session: None,
            next_server: self.next_server,
            home: self.home,
            switches: std::collections::VecDeque::new(),
            data: self.data.as_ref().map(|_| streams::DataPlane::new()),
            migration: None,
            accepts_migration: self.accepts_migration,
            listens_for_keepalives: self.listens_for_keepalives,
        }
    }

    /// Moves the current session (with its channel and open streams) to a
    /// new agent of its own, which keeps it until its streams end; this one
    /// is left without a session and its tunnel opens no stream until the
    /// next one is adopted.
    pub(crate) fn split_off(&mut self) -> Agent {
        // It keeps the tickets of its gateway; this agent then takes the
        // fork's ([`Agent::take_tickets_of`]).
        Agent {
            cfg: self.cfg.clone(),
            connector: self.connector.clone(),
            resume_connector: self.resume_connector.clone(),
            session: self.session.take(),
            next_server: self.next_server,
            home: self.home,
            switches: std::mem::take(&mut self.switches),
            data: self.data.as_mut().map(|(d, _)| d.split_off()),
            migration: self.migration.take(),
            accepts_migration: self.accepts_migration,
            listens_for_keepalives: self.listens_for_keepalives,
        }
    }

    /// Takes over `other`'s TLS connectors and so its tickets (the fork
    /// that made the session this agent adopts).
    pub(crate) fn take_tickets_of(&mut self, other: &Agent) {
        self.connector = other.connector.clone();
        self.resume_connector = other.resume_connector.clone();
    }

    /// Builds the next `Resume` for transport `t` (advancing the counter).
    pub fn build_resume(&mut self, t: &Transport) -> Result<Resume, AgentError> {
        let s = self.session.as_mut().ok_or(AgentError::NoSession)?;
        let mut r = s.build_resume(t)?;
        r.keepalive = self.listens_for_keepalives;
        if let Some((ch, _)) = self.data.as_ref().and_then(|(d, _)| d.channel.as_ref()) {
            r.received = Some(ch.received());
        }
        Ok(r)
    }

    /// Opens a transport for a RESUME (preamble carrying the routing token).
    pub async fn open_resume(&self) -> Result<Transport, AgentError> {
        let s = self.session.as_ref().ok_or(AgentError::NoSession)?;
        self.open(&s.resume_preamble()).await
    }

    /// Reattaches over a fresh connection. A `stale_binding` answer is
    /// retried once on the same connection with the epoch it names.
    pub async fn resume(&mut self) -> Result<Transport, AgentError> {
        let mut t = self.open_resume().await?;
        for _ in 0..2 {
            let r = self.build_resume(&t)?;
            t.send(Kind::Resume(r.clone())).await?;
            match self.await_resume(&mut t, &r).await {
                Err(AgentError::Rejected {
                    reason: ReasonCode::StaleBinding,
                    current_binding_epoch,
                    ..
                }) if current_binding_epoch > 0 => {}
                other => return other.map(|()| t),
            }
        }
        Err(AgentError::Protocol("stale binding twice".into()))
    }

    /// Waits for the answer to `sent` and applies it through the session:
    /// a `Reject` (a named epoch is adopted), or a `ResumeOk` (owner and
    /// server proof checked, key rotated, new token taken).
    pub async fn await_resume(
        &mut self,
        t: &mut Transport,
        sent: &Resume,
    ) -> Result<(), AgentError> {
        let asked = Instant::now();
        let ok = loop {
            match self.answer(t, asked).await? {
                Kind::ResumeOk(ok) => break ok,
                Kind::Reject(r) => {
                    if let Some(s) = self.session.as_mut() {
                        s.apply_reject(&r);
                    }
                    return Err(rejected(&r));
                }
                Kind::Pong(_) | Kind::GoAway(_) => continue,
                other => {
                    return Err(AgentError::Protocol(format!(
                        "expected ResumeOk, got {other:?}"
                    )));
                }
            }
        };
        let streams_open = self.open_streams();
        let s = self.session.as_mut().ok_or(AgentError::NoSession)?;
        let resumed = s.apply_resume_ok(sent, &ok, t)?;
        t.keepalive_ms = if sent.keepalive { ok.keepalive_ms } else { 0 };
        if let jvpn_proto::client::Resumed::Migrated { from, to, .. } = resumed {
            // Topology 3: the owner died and a taker carries the session
            // on. The channel and its streams lived in the dead owner's
            // process: they are reset, explicitly; the session (and the
            // front doors) continue on a fresh channel.
            if let Some((d, _)) = self.data.as_mut() {
                d.close("taken_over");
                if ok.channel_window > 0 {
                    d.start(ok.channel_window);
                }
            }
            self.migration = Some(Migration {
                from,
                to,
                streams_reset: streams_open,
            });
        } else if let Some((ch, g)) = self.data.as_mut().and_then(|(d, _)| d.channel.as_mut()) {
            // The channel continues on this transport from what the
            // gateway holds; without that offset it cannot.
            let resumed = ok
                .received
                .ok_or_else(|| "ResumeOk without the channel offset".to_owned())
                .and_then(|x| ch.resume_from(x).map_err(|e| e.to_string()));
            match resumed {
                Ok(r) => *g = r.generation,
                Err(why) => return Err(AgentError::ChannelBroken(why)),
            }
        }
        // The server that answered holds the session (or leads to it).
        self.home = self.next_server;
        let max = s.policy.max_switches_per_min.max(1) as usize;
        while self.switches.len() >= max {
            self.switches.pop_front();
        }
        self.switches.push_back(std::time::Instant::now());
        Ok(())
    }
}
