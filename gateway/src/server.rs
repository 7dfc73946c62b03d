//! The async shell around the session engine: client listener, admission,
//! TLS, frames, timers and drain.
//!
//! # Layout
//!
//! - [`serve`]: takes bound listeners and a shutdown future (tests bind
//!   port 0), runs until shutdown, then drains.
//! - Sessions are split over `2 × cores` engine shards by session id; each
//!   shard is a mutex held for microseconds, never across an await, plus a
//!   timer task. There is no lock shared by all sessions on the data path.
//! - One task per client connection: preamble → admission → TLS → first
//!   frame → HELLO or RESUME through the engine → frame loop (Ping/Pong,
//!   echo of `Data`, in-session RESUME, `Terminate`).
//! - Engine outputs are dispatched after the shard lock is released: events
//!   to the sink and metrics, `CloseTransport` to the connection's task.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use jvpn_proto::crypto::{CHANNEL_BINDING_LABEL, ChannelBinding, RESUME_KEY_LABEL, ResumeKey};
use jvpn_proto::frame::{self, FrameError};
use jvpn_proto::pb::session::{GoAway, HelloOk, Pong, Reject, ResumeOk, Terminate, frame::Kind};
use jvpn_proto::preamble::{PREAMBLE_LEN, Preamble, Status, StatusReply};
use jvpn_proto::ring::owner_tag;
use jvpn_proto::token::{TokenContents, TokenKey};
use jvpn_proto::{Incarnation, OwnerTag, ReasonCode, SessionId};
use metrics::{counter, gauge, histogram};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{
    HandshakeBudget, HandshakeKind, SourceKey, SourceLimiter, TlsQueue, Verdict,
};
use crate::config::Validated;
use crate::engine::{
    Action, Conn, Engine, EngineConfig, EngineEvent, HelloRequest, Mono, Rejection, ResumeRequest,
    State, Termination, TransportId, shard_of,
};
use crate::events::EventSink;
use crate::metrics::{self as m, ConnReject};

/// Messages from the engine side to a connection task.
#[derive(Debug)]
enum Control {
    Terminate(ReasonCode),
    GoAway { deadline_ms: u64 },
}

struct Shard {
    engine: Mutex<Engine>,
    conns: Mutex<HashMap<TransportId, mpsc::UnboundedSender<Control>>>,
    wake: Notify,
}

/// The routing-token key and this incarnation's owner tag under it.
struct Issuer {
    key: TokenKey,
    tag: OwnerTag,
}

impl Issuer {
    fn new(
        secret: &jvpn_proto::keys::ClusterSecret,
        node: &jvpn_proto::NodeId,
        inc: Incarnation,
    ) -> Self {
        let keys = secret.derive();
        Self {
            key: TokenKey::new(&keys),
            tag: owner_tag(&keys, node, inc),
        }
    }
}

/// State shared by every task of one gateway.
struct Shared {
    /// The configuration at start; restart-only keys are read from here.
    cfg: Validated,
    /// Reloadable (SIGHUP): the TLS configuration and the connection cap
    /// (the other limits live in their limiters).
    acceptor: ArcSwap<TlsAcceptor>,
    max_connections: AtomicUsize,
    /// Seals routing tokens; swapped when a reload rotates the cluster secret.
    issuer: ArcSwap<Issuer>,
    incarnation: Incarnation,
    shards: Vec<Shard>,
    next_transport: AtomicU64,
    next_hello_shard: AtomicUsize,
    origin: Instant,
    sources: Mutex<SourceLimiter>,
    budget: Mutex<HandshakeBudget>,
    tls_slots: Semaphore,
    tls_queue: Mutex<TlsQueue>,
    open_conns: AtomicUsize,
    draining: AtomicBool,
    events: EventSink,
    token_hashes: Vec<blake3::Hash>,
    /// Leases and views; `None` without membership (single node, static PROXY).
    cluster: Option<Arc<crate::membership::Cluster>>,
    /// `POST /drain` on the admin port.
    drain: crate::admin::DrainTrigger,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Applies a validated configuration read again from disk (SIGHUP):
    /// `[policy]` for sessions created from now on, `[admission]` limits and
    /// `[tls]` certificates. Anything else must be unchanged; otherwise
    /// nothing is applied.
    fn reload(&self, new: &Validated) -> Result<(), String> {
        let fixed = crate::config::restart_only_changes(&self.cfg.raw, &new.raw);
        if !fixed.is_empty() {
            return Err(format!(
                "{} cannot change without a restart",
                fixed.join(", ")
            ));
        }
        // The same key id must mean the same secret: compare what it derives.
        let next = Issuer::new(&new.secret, &self.cfg.node_id, self.incarnation);
        let current = self.issuer.load();
        let rotate = next.key.key_id() != current.key.key_id();
        if !rotate && next.tag != current.tag {
            return Err(
                "cluster.secret_file: the secret changed but its key id did not; \
                        a rotation needs a new key id"
                    .into(),
            );
        }
        let tokenless = !new.dev_tokens.is_empty();
        let tls =
            crate::tls::server_config(&new.tls, tokenless).map_err(|e| format!("tls: {e}"))?;
        for i in 0..self.shards.len() {
            self.with_engine(i, |e| e.set_policy(new.raw.policy.clone()))
                .map_err(|e| format!("policy: {e:?}"))?;
        }
        let a = &new.raw.admission;
        let now = self.now();
        lock(&self.sources).reconfigure(
            a.per_source_rate_per_s,
            a.per_source_burst,
            a.source_table_capacity,
        );
        *lock(&self.budget) = HandshakeBudget::new(a.handshakes_per_s, a.resume_share, now);
        lock(&self.tls_queue)
            .reconfigure(a.tls_queue_max, Duration::from_millis(a.tls_queue_wait_ms));
        self.max_connections
            .store(a.max_connections, Ordering::Relaxed);
        self.acceptor
            .store(Arc::new(TlsAcceptor::from(Arc::new(tls))));
        if rotate {
            // New tokens under the new key; tokens already issued stay
            // valid while routers hold the old key as their previous one.
            info!(
                key_id = new.secret.key_id(),
                "routing tokens now sealed under a new cluster key"
            );
            self.issuer.store(Arc::new(next));
        }
        Ok(())
    }

    fn now(&self) -> Mono {
        Mono::from_nanos(u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn instant(&self, t: Mono) -> Instant {
        self.origin + Duration::from_nanos(t.as_nanos())
    }

    /// Runs `f` on one shard's engine, then dispatches what it produced.
    fn with_engine<R>(&self, shard: usize, f: impl FnOnce(&mut Engine) -> R) -> R {
        let s = &self.shards[shard];
        let mut actions = Vec::new();
        let mut events = Vec::new();
        let r = {
            let mut e = lock(&s.engine);
            let r = f(&mut e);
            while let Some(a) = e.poll_action() {
                actions.push(a);
            }
            while let Some(ev) = e.poll_event() {
                events.push(ev);
            }
            r
        };
        for ev in &events {
            if let EngineEvent::StateChange(c) = ev {
                counter!(m::TRANSITIONS, "from" => c.from.as_str(), "to" => c.to.as_str(),
                    "reason" => c.reason.as_str())
                .increment(1);
            }
            self.events.emit(ev);
        }
        if !actions.is_empty() {
            let conns = lock(&s.conns);
            for Action::CloseTransport {
                transport, reason, ..
            } in actions
            {
                if let Some(tx) = conns.get(&transport) {
                    let _ = tx.send(Control::Terminate(reason));
                }
            }
        }
        s.wake.notify_one();
        r
    }

    fn register(&self, shard: usize, t: TransportId, tx: mpsc::UnboundedSender<Control>) {
        lock(&self.shards[shard].conns).insert(t, tx);
    }

    fn deregister(&self, shard: usize, t: TransportId) {
        lock(&self.shards[shard].conns).remove(&t);
    }

    fn counts(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        for s in &self.shards {
            let e = lock(&s.engine);
            for st in State::ALL {
                out[st.index()] += e.count(st);
            }
        }
        out
    }

    fn token_ok(&self, auth: &[u8]) -> bool {
        // blake3::Hash compares in constant time.
        let h = blake3::hash(auth);
        !auth.is_empty() && self.token_hashes.contains(&h)
    }

    /// A fresh token for `sid` and the key id it is sealed under.
    fn seal_token(&self, sid: SessionId) -> (Vec<u8>, u32) {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let issuer = self.issuer.load();
        let token = issuer.key.seal(
            nonce,
            &TokenContents {
                session_id: sid,
                owner_tag: issuer.tag,
            },
        );
        (token.to_vec(), u32::from(issuer.key.key_id()))
    }
}

/// What the admin endpoints need from a running gateway.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle")
            .field("node_id", &self.shared.cfg.node_id)
            .finish()
    }
}

impl GatewayHandle {
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    pub fn admin_token(&self) -> Option<&crate::admin::AdminToken> {
        self.shared.cfg.admin_token.as_ref()
    }

    pub fn drain_trigger(&self) -> &crate::admin::DrainTrigger {
        &self.shared.drain
    }

    /// One session as the engine holds it (operators, behind the admin
    /// token); `None` when the id is malformed or unknown. No keys.
    pub fn session_info(&self, id_hex: &str) -> Option<serde_json::Value> {
        let bytes: [u8; 16] = hex::decode(id_hex).ok()?.try_into().ok()?;
        let id = SessionId::from_bytes(bytes);
        let now = self.shared.now();
        let shard = crate::engine::shard_of(&id, self.shared.shards.len());
        self.shared.with_engine(shard, |e| {
            let s = e.session(&id)?;
            let ms = |t: Mono| t.saturating_since(now).as_millis() as u64;
            Some(serde_json::json!({
                "state": s.state().as_str(),
                "state_version": s.state_version(),
                "binding_epoch": s.binding_epoch(),
                "attached": s.transport().is_some(),
                "transport_lost_ttl_left_ms": s.transport_lost_deadline().map(ms),
                "lifetime_left_ms": ms(s.end_of_life()),
                "switches_last_60s": s.switches_in_window(now),
                "heartbeat_interval_ms": s.policy().heartbeat_interval_ms,
            }))
        })
    }

    /// Sessions per state (TERMINATED is always 0: terminated sessions are removed).
    pub fn session_counts(&self) -> Vec<(&'static str, u64)> {
        let c = self.shared.counts();
        State::ALL
            .iter()
            .filter(|s| s.is_live())
            .map(|s| (s.as_str(), c[s.index()]))
            .collect()
    }
}

/// How [`serve`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested and the drain completed.
    Drained,
    /// A router said a newer incarnation of this node id exists: every
    /// session was terminated with `superseded` (the process exits 75).
    Superseded,
}

/// Runs a gateway on already-bound listeners until `shutdown` resolves, then
/// drains (GoAway spread over the first half of `drain_timeout_ms`,
/// `Terminate{draining}` near its end) and returns.
pub async fn serve(
    cfg: Validated,
    client: TcpListener,
    admin: TcpListener,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<Exit> {
    let advertise = match cfg.raw.cluster.advertise_addr {
        Some(a) => a,
        None => client.local_addr()?,
    };
    let shared = build(cfg)?;
    let mut superseded = None;
    if let (Some(cluster), Some(files)) = (&shared.cluster, &shared.cfg.membership) {
        let c = &shared.cfg.raw.cluster;
        crate::membership::spawn(
            cluster.clone(),
            crate::membership::HeartbeatSettings {
                cert_pem: files.cert_pem.clone(),
                key_pem: files.key_pem.to_vec(),
                ca_pem: files.ca_pem.clone(),
                server_name: format!("router.{}", c.name),
                advertise_addr: advertise,
                weight: c.weight,
                interval: Duration::from_millis(c.heartbeat_interval_ms),
                keys: shared.cfg.secret.derive(),
            },
        )?;
        superseded = Some(cluster.superseded());
    }
    let handle = GatewayHandle {
        shared: shared.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    for i in 0..shared.shards.len() {
        tokio::spawn(timer_loop(shared.clone(), i, stop_rx.clone()));
    }
    tokio::spawn(crate::admin::serve(admin, handle.clone(), prometheus));
    if let Some(path) = shared.cfg.source.clone() {
        let target = shared.clone();
        tokio::spawn(crate::cli::reload_on_hangup(
            path,
            move |p| {
                crate::config::load(p)
                    .map_err(|e| e.to_string())
                    .and_then(|new| target.reload(&new))
            },
            [m::CONFIG_RELOADS, m::CONFIG_RELOAD_FAILURES],
        ));
    }
    tokio::spawn(gauge_loop(handle.clone(), stop_rx.clone()));
    info!(node = %shared.cfg.node_id, incarnation = %shared.incarnation, "gateway serving");

    // Accept on a worker thread: connection tasks then start on the same
    // worker instead of being handed over from the `block_on` thread.
    let (accept_stop, mut accept_stopped) = watch::channel(false);
    let acc = shared.clone();
    let accept_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                r = client.accept() => {
                    if !accept(&acc, r) {
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                _ = accept_stopped.changed() => return,
            }
        }
    });
    if let Some(c) = &shared.cluster {
        c.set_state(crate::membership::LocalState::Ready);
    }
    let trigger = shared.drain.clone();
    let shutdown = async move { trigger.or(shutdown).await };
    let was_superseded = match superseded.as_mut() {
        Some(rx) => tokio::select! {
            () = shutdown => false,
            r = rx.wait_for(|s| *s) => r.is_ok(),
        },
        None => {
            shutdown.await;
            false
        }
    };
    if was_superseded {
        // Another process serves this node id now: our sessions are not ours
        // to keep. End them explicitly and leave at once.
        shared.draining.store(true, Ordering::Relaxed);
        let _ = accept_stop.send(true);
        let _ = accept_task.await;
        let now = shared.now();
        for i in 0..shared.shards.len() {
            shared.with_engine(i, |e| e.terminate_all(now, Termination::Superseded));
        }
        let grace_end = Instant::now() + Duration::from_millis(500);
        while shared.open_conns.load(Ordering::Relaxed) > 0 && Instant::now() < grace_end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop_tx.send(true);
        shared.events.flush(Duration::from_secs(1)).await;
        warn!("superseded by a newer incarnation of this node id; exiting");
        return Ok(Exit::Superseded);
    }

    // Drain.
    shared.draining.store(true, Ordering::Relaxed);
    gauge!(m::DRAINING).set(1.0);
    let drain = Duration::from_millis(shared.cfg.raw.timeouts.drain_timeout_ms);
    let started = Instant::now();
    let terminate_at = started + drain.mul_f64(0.9);
    info!(drain_ms = drain.as_millis() as u64, "draining");
    if let Some(c) = &shared.cluster {
        // GoAway only once every router stopped placing HELLOs here, so the
        // re-handshakes it triggers cannot land on this node again.
        c.set_state(crate::membership::LocalState::Draining);
        let ack_deadline = Instant::now() + (drain / 4).min(Duration::from_secs(5));
        while !c.draining_acknowledged() && Instant::now() < ack_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let spread = (terminate_at.saturating_duration_since(Instant::now())).min(drain / 2);
    spread_goaway(&shared, spread, terminate_at);
    loop {
        let live: u64 = shared.counts().iter().sum();
        if live == 0 {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(terminate_at.into()) => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let _ = accept_stop.send(true);
    let _ = accept_task.await;
    let now = shared.now();
    for i in 0..shared.shards.len() {
        shared.with_engine(i, |e| e.terminate_all(now, Termination::Drain));
    }
    // Give connection tasks a moment to write their Terminate frames.
    let grace_end = (started + drain).min(Instant::now() + Duration::from_secs(1));
    while shared.open_conns.load(Ordering::Relaxed) > 0 && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    shared.events.flush(Duration::from_secs(2)).await;
    info!("drained");
    Ok(Exit::Drained)
}

fn build(cfg: Validated) -> anyhow::Result<Arc<Shared>> {
    let incarnation = Incarnation(rand::rng().next_u64());
    let tokenless = !cfg.dev_tokens.is_empty();
    let tls = crate::tls::server_config(&cfg.tls, tokenless)?;
    let n = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut shards = Vec::with_capacity(n);
    for i in 0..n {
        let mut engine = Engine::new(
            EngineConfig {
                node_id: cfg.node_id.clone(),
                incarnation,
                policy: cfg.raw.policy.clone(),
            },
            Box::new(rand::rngs::StdRng::from_os_rng()),
        )
        .map_err(|e| anyhow::anyhow!("policy: {e:?}"))?;
        engine.set_shard(i, n);
        shards.push(Shard {
            engine: Mutex::new(engine),
            conns: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
    }
    let a = &cfg.raw.admission;
    let start = Mono::ZERO;
    let shared = Shared {
        acceptor: ArcSwap::from_pointee(TlsAcceptor::from(Arc::new(tls))),
        max_connections: AtomicUsize::new(cfg.raw.admission.max_connections),
        issuer: ArcSwap::from_pointee(Issuer::new(&cfg.secret, &cfg.node_id, incarnation)),
        incarnation,
        shards,
        next_transport: AtomicU64::new(1),
        next_hello_shard: AtomicUsize::new(0),
        origin: Instant::now(),
        sources: Mutex::new(SourceLimiter::new(
            a.per_source_rate_per_s,
            a.per_source_burst,
            a.source_table_capacity,
            start,
        )),
        budget: Mutex::new(HandshakeBudget::new(
            a.handshakes_per_s,
            a.resume_share,
            start,
        )),
        tls_slots: Semaphore::new(cfg.max_tls_handshakes_in_flight),
        tls_queue: Mutex::new(TlsQueue::new(
            a.tls_queue_max,
            Duration::from_millis(a.tls_queue_wait_ms),
            start,
        )),
        open_conns: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        events: EventSink::start(&cfg.raw.events, cfg.node_id.clone(), incarnation),
        token_hashes: cfg.dev_tokens.iter().map(|t| blake3::hash(t)).collect(),
        cluster: cfg.membership.as_ref().map(|_| {
            crate::membership::Cluster::new(
                cfg.node_id.clone(),
                incarnation,
                &cfg.raw.cluster.membership_endpoints,
                Duration::from_millis(cfg.raw.cluster.lease_timeout_ms),
            )
        }),
        drain: crate::admin::DrainTrigger::default(),
        cfg,
    };
    Ok(Arc::new(shared))
}

use rand::SeedableRng;

/// Spawns the connection's task; false if accepting failed.
fn accept(shared: &Arc<Shared>, r: std::io::Result<(TcpStream, SocketAddr)>) -> bool {
    match r {
        Ok((stream, peer)) => {
            counter!(m::CONNECTIONS_ACCEPTED).increment(1);
            let shared = shared.clone();
            // The span never carries the client address at info level.
            let span = info_span!("conn");
            tokio::spawn(
                async move {
                    let _guard = OpenConn::new(&shared);
                    if let Err(why) = handle_conn(&shared, stream, peer).await {
                        counter!(m::CONNECTIONS_REJECTED, "reason" => why.as_str()).increment(1);
                        debug!(%peer, reason = why.as_str(), "connection refused");
                    }
                }
                .instrument(span),
            );
            true
        }
        Err(e) => {
            warn!(error = %e, "accept failed");
            false
        }
    }
}

struct OpenConn<'a>(&'a Shared);

impl<'a> OpenConn<'a> {
    fn new(s: &'a Shared) -> Self {
        let n = s.open_conns.fetch_add(1, Ordering::Relaxed) + 1;
        gauge!(m::CONNECTIONS_OPEN).set(n as f64);
        Self(s)
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        let n = self
            .0
            .open_conns
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        gauge!(m::CONNECTIONS_OPEN).set(n as f64);
    }
}

/// Answers with the 8-byte pre-TLS status reply and closes the write side.
pub async fn send_status(stream: &mut TcpStream, status: Status, retry: Duration) {
    let reply = StatusReply {
        status,
        retry_after_ms: u16::try_from(retry.as_millis()).unwrap_or(u16::MAX),
    };
    let _ = stream.write_all(&reply.encode()).await;
    let _ = stream.shutdown().await;
    // Lingering close: closing with unread input (the agent sends its
    // ClientHello right after the preamble) makes the kernel answer with a
    // RST, which can destroy the reply before the agent reads it. Read and
    // discard until the agent closes, briefly and boundedly.
    let mut sink = [0u8; 2048];
    let mut left = STATUS_LINGER_BYTES;
    let _ = tokio::time::timeout(STATUS_LINGER, async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// How long and how much a refused connection is read after its status reply.
const STATUS_LINGER: Duration = Duration::from_millis(250);
const STATUS_LINGER_BYTES: usize = 16 * 1024;

/// Everything before the engine; returns why the connection ended early.
async fn handle_conn(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ConnReject> {
    let _ = stream.set_nodelay(true);
    let cfg = &shared.cfg.raw;
    if shared.open_conns.load(Ordering::Relaxed) > shared.max_connections.load(Ordering::Relaxed) {
        send_status(&mut stream, Status::Overloaded, Duration::from_millis(500)).await;
        return Err(ConnReject::Overloaded);
    }
    let t = Duration::from_millis(cfg.timeouts.preamble_timeout_ms);
    let deadline = tokio::time::Instant::now() + t;
    let cluster = !cfg.cluster.routers.is_empty();
    let from_router = cfg.cluster.routers.contains(&peer.ip());
    // The address limits and logs use: the PROXY source for routers.
    let mut source = peer;
    let mut intended = None;
    let mut router_id = None;
    if from_router {
        match read_proxy(&mut stream, deadline).await {
            Ok(Some(h)) if h.is_local() => {
                counter!(m::HEALTH_CHECKS).increment(1);
                return Ok(());
            }
            Ok(Some(h)) => {
                source = h.source().unwrap_or(peer);
                intended = h.intended_owner;
                router_id = h.router_id;
            }
            Ok(None) => {
                send_status(&mut stream, Status::BadPreamble, Duration::ZERO).await;
                return Err(ConnReject::ProxyRequired);
            }
            Err(why) => return Err(why),
        }
    }
    let verdict = lock(&shared.sources).check(SourceKey::from(source.ip()), shared.now());
    if verdict.overflow() {
        counter!(m::OVERFLOW_BUCKET).increment(1);
    }
    if let Verdict::Limit(d) | Verdict::LimitOverflow(d) = verdict {
        counter!(m::RATE_LIMITED, "stage" => "source").increment(1);
        send_status(&mut stream, Status::Overloaded, d).await;
        return Err(ConnReject::RateLimited);
    }

    let mut pre = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut pre)).await {
        Err(_) => return Err(ConnReject::PreambleTimeout),
        Ok(Err(_)) => return Err(ConnReject::BadPreamble),
        Ok(Ok(_)) => {}
    }
    if pre.starts_with(jvpn_proto::proxy::SIGNATURE) {
        // PROXY is accepted only from configured routers.
        send_status(&mut stream, Status::BadPreamble, Duration::ZERO).await;
        return Err(ConnReject::ProxyForbidden);
    }
    if cluster && !from_router && !cfg.cluster.direct_clients {
        send_status(&mut stream, Status::NoGateway, Duration::ZERO).await;
        return Err(ConnReject::DirectForbidden);
    }
    if let Some((node, inc)) = &intended
        && (*node != shared.cfg.node_id || *inc != shared.incarnation)
    {
        // The router aimed at another life of this node: its sessions are gone.
        send_status(&mut stream, Status::OwnerLost, Duration::ZERO).await;
        return Err(ConnReject::OwnerLost);
    }
    let preamble = match Preamble::decode(&pre) {
        Ok(p) => p,
        Err(e) => {
            send_status(&mut stream, e.status(), Duration::ZERO).await;
            return Err(ConnReject::BadPreamble);
        }
    };
    let kind = match preamble {
        Preamble::Hello { .. } => HandshakeKind::Hello,
        Preamble::Resume { .. } => HandshakeKind::Resume,
    };
    let budget = lock(&shared.budget).take(kind, shared.now());
    if let Err(d) = budget {
        counter!(m::RATE_LIMITED, "stage" => "handshake_budget").increment(1);
        send_status(&mut stream, Status::Overloaded, d).await;
        return Err(ConnReject::Overloaded);
    }
    let Some(permit) = tls_slot(shared).await else {
        let hint = lock(&shared.tls_queue).hint();
        send_status(&mut stream, Status::Overloaded, hint).await;
        return Err(ConnReject::Overloaded);
    };
    let accepted_at = Instant::now();
    gauge!(m::TLS_IN_FLIGHT).increment(1.0);
    let t = Duration::from_millis(cfg.timeouts.tls_handshake_timeout_ms);
    let acceptor = shared.acceptor.load_full();
    let tls = tokio::time::timeout(t, acceptor.accept(stream)).await;
    gauge!(m::TLS_IN_FLIGHT).decrement(1.0);
    drop(permit);
    lock(&shared.tls_queue).completed(shared.now());
    let mut tls = match tls {
        Err(_) => return Err(ConnReject::TlsTimeout),
        Ok(Err(_)) => return Err(ConnReject::TlsFailed),
        Ok(Ok(s)) => s,
    };
    if tls.get_ref().1.alpn_protocol() != Some(jvpn_proto::ALPN) {
        return Err(ConnReject::AlpnMismatch);
    }

    let mut buf = BytesMut::with_capacity(256);
    let t = Duration::from_millis(cfg.timeouts.first_frame_timeout_ms);
    let first = match tokio::time::timeout(t, read_frame(&mut tls, &mut buf)).await {
        Err(_) => return Err(ConnReject::FirstFrameTimeout),
        Ok(Ok(Some(k))) => k,
        Ok(Ok(None)) => return Err(ConnReject::ProtocolError),
        Ok(Err(e)) => {
            let _ = send_terminate(&mut tls, e.reason()).await;
            return Err(match e {
                FrameError::TooLarge(_) => ConnReject::FrameTooLarge,
                _ => ConnReject::ProtocolError,
            });
        }
    };
    match (kind, first) {
        (HandshakeKind::Hello, Kind::Hello(h)) => {
            do_hello(shared, tls, buf, h, accepted_at, router_id.as_deref()).await
        }
        (HandshakeKind::Resume, Kind::Resume(r)) => {
            do_resume(shared, tls, buf, r, accepted_at).await
        }
        _ => {
            let _ = send_reject(&mut tls, ReasonCode::ProtocolError, 0, 0).await;
            Err(ConnReject::ProtocolError)
        }
    }
}

/// A TLS handshake slot: at once if one is free, else through the bounded
/// waiting room ([`TlsQueue`]); `None` means refuse with `overloaded`.
async fn tls_slot(shared: &Shared) -> Option<tokio::sync::SemaphorePermit<'_>> {
    if let Ok(p) = shared.tls_slots.try_acquire() {
        return Some(p);
    }
    let wait = {
        let mut q = lock(&shared.tls_queue);
        if q.enter(shared.now()).is_err() {
            counter!(m::RATE_LIMITED, "stage" => "tls_queue_full").increment(1);
            return None;
        }
        q.max_wait()
    };
    gauge!(m::TLS_QUEUE_WAITING).increment(1.0);
    let slot = tokio::time::timeout(wait, shared.tls_slots.acquire()).await;
    lock(&shared.tls_queue).leave();
    gauge!(m::TLS_QUEUE_WAITING).decrement(1.0);
    match slot {
        Ok(Ok(p)) => Some(p),
        _ => {
            counter!(m::RATE_LIMITED, "stage" => "tls_queue_wait").increment(1);
            None
        }
    }
}

/// Reads a PROXY v2 header (at most 512 bytes) before `deadline`.
/// `Ok(None)`: the bytes are not a PROXY header.
async fn read_proxy(
    stream: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<jvpn_proto::proxy::ProxyHeader>, ConnReject> {
    use jvpn_proto::proxy::{Decoded, ProxyError, ProxyHeader};
    let mut buf = vec![0u8; 16];
    let mut have = 0;
    loop {
        let want = buf.len();
        match tokio::time::timeout_at(deadline, stream.read_exact(&mut buf[have..want])).await {
            Err(_) => return Err(ConnReject::PreambleTimeout),
            Ok(Err(_)) => return Err(ConnReject::BadProxy),
            Ok(Ok(_)) => have = want,
        }
        match ProxyHeader::decode(&buf[..have]) {
            Ok(Decoded::Done(h, _)) => return Ok(Some(h)),
            Ok(Decoded::NeedMore(n)) => buf.resize(n, 0),
            Err(ProxyError::Signature) => return Ok(None),
            Err(_) => return Err(ConnReject::BadProxy),
        }
    }
}

type Tls = TlsStream<TcpStream>;

/// When the agent's certificate expires, on the engine's clock: a session
/// never outlives its credential. The certificate was verified moments ago,
/// so a parse failure here is unexpected and leaves only the policy lifetime.
fn cert_expiry(der: &[u8], now: Mono) -> Option<Mono> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    // Wall-clock time is needed to read an X.509 date; it is used once, here.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let left = u64::try_from(not_after)
        .ok()?
        .saturating_sub(wall.as_secs());
    Some(now + Duration::from_secs(left))
}

fn export(tls: &Tls, label: &[u8], ctx: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // Exporters exist once the handshake completed, which it has here.
    let _ = tls
        .get_ref()
        .1
        .export_keying_material(&mut out, label, Some(ctx));
    out
}

fn channel_binding(tls: &Tls) -> ChannelBinding {
    export(tls, CHANNEL_BINDING_LABEL, &[])
}

async fn do_hello(
    shared: &Arc<Shared>,
    mut tls: Tls,
    buf: BytesMut,
    hello: jvpn_proto::pb::session::Hello,
    accepted_at: Instant,
    router_id: Option<&str>,
) -> Result<(), ConnReject> {
    let refuse = |r: ReasonCode| counter!(m::HELLOS, "result" => r.as_str()).increment(1);
    if hello.protocol_version != jvpn_proto::PROTOCOL_VERSION {
        refuse(ReasonCode::ProtocolError);
        let _ = send_reject(&mut tls, ReasonCode::ProtocolError, 0, 0).await;
        return Err(ConnReject::ProtocolError);
    }
    let now = shared.now();
    let (principal, credential_expiry): (Arc<str>, Option<Mono>) =
        match tls.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => (
                Arc::from(format!(
                    "cert:{}",
                    &blake3::hash(leaf.as_ref()).to_hex()[..16]
                )),
                cert_expiry(leaf.as_ref(), now),
            ),
            _ if shared.token_ok(&hello.auth) => (Arc::from("dev-token"), None),
            _ => {
                refuse(ReasonCode::AuthFailed);
                let _ = send_reject(&mut tls, ReasonCode::AuthFailed, 0, 0).await;
                return Err(ConnReject::AuthFailed);
            }
        };
    if shared.draining.load(Ordering::Relaxed) {
        refuse(ReasonCode::Draining);
        let _ = send_reject(&mut tls, ReasonCode::Draining, 0, 0).await;
        return Err(ConnReject::Draining);
    }
    // Fencing: mint only under a valid lease with the forwarding router
    // (a direct HELLO needs leases with a majority of routers).
    let lease_ok = |c: &crate::membership::Cluster| match router_id {
        Some(r) => c.lease_with(r),
        None => c.has_majority_lease(),
    };
    let placement = match &shared.cluster {
        None => None,
        Some(c) => {
            let ring = match router_id {
                Some(r) => c.hello_ring(r),
                None => c.majority_ring(),
            };
            if ring.is_none() {
                refuse(ReasonCode::NotInCluster);
                let _ = send_reject(&mut tls, ReasonCode::NotInCluster, 250, 0).await;
                return Err(ConnReject::NoLease);
            }
            ring
        }
    };
    let n = shared.shards.len();
    let shard = shared.next_hello_shard.fetch_add(1, Ordering::Relaxed) % n;
    let transport = TransportId(shared.next_transport.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::unbounded_channel();
    shared.register(shard, transport, tx);
    let r = shared.with_engine(shard, |e| {
        e.set_placement(placement);
        e.hello(
            now,
            HelloRequest {
                transport,
                principal,
                credential_expiry,
            },
            |ctx| ResumeKey::new(export(&tls, RESUME_KEY_LABEL, ctx)),
        )
    });
    let acc = match r {
        Ok(acc) => acc,
        Err(rej) => {
            shared.deregister(shard, transport);
            refuse(rej.reason);
            let _ = send_rejection(&mut tls, &rej).await;
            return Ok(());
        }
    };
    let (resume_token, token_key_id) = shared.seal_token(acc.session_id);
    let ok = HelloOk {
        session_id: acc.session_id.as_bytes().to_vec(),
        node_id: shared.cfg.node_id.to_string(),
        incarnation: shared.incarnation.0,
        state_version: acc.state_version,
        binding_epoch: acc.binding_epoch,
        resume_token,
        policy: Some(acc.policy.to_wire()),
        token_key_id,
    };
    if let Some(c) = &shared.cluster
        && !lease_ok(c)
    {
        // The lease lapsed while minting: this HelloOk must not be written.
        shared.with_engine(shard, |e| {
            e.terminate(shared.now(), &acc.session_id, Termination::LeaseLost)
        });
        shared.deregister(shard, transport);
        refuse(ReasonCode::NotInCluster);
        let _ = send_reject(&mut tls, ReasonCode::NotInCluster, 250, 0).await;
        return Err(ConnReject::NoLease);
    }
    if write_frame(&mut tls, Kind::HelloOk(ok)).await.is_err() {
        shared.with_engine(shard, |e| {
            e.transport_closed(shared.now(), &acc.session_id, transport)
        });
        shared.deregister(shard, transport);
        return Ok(());
    }
    counter!(m::HELLOS, "result" => "ok").increment(1);
    histogram!(m::HELLO_SECONDS).record(accepted_at.elapsed().as_secs_f64());
    session_loop(shared, shard, acc.session_id, transport, tls, buf, rx).await;
    Ok(())
}

async fn do_resume(
    shared: &Arc<Shared>,
    mut tls: Tls,
    mut buf: BytesMut,
    mut resume: jvpn_proto::pb::session::Resume,
    accepted_at: Instant,
) -> Result<(), ConnReject> {
    let transport = TransportId(shared.next_transport.fetch_add(1, Ordering::Relaxed));
    let binding = channel_binding(&tls);
    let (tx, rx) = mpsc::unbounded_channel();
    // A client may retry on the same connection (e.g. after stale_binding);
    // each attempt carries a fresh counter and is bound to this connection.
    for _attempt in 0..4 {
        match resume_once(shared, &tls, &binding, transport, &resume, Some(&tx)) {
            Ok((sid, shard, ok, _)) => {
                if write_frame(&mut tls, Kind::ResumeOk(ok)).await.is_err() {
                    shared
                        .with_engine(shard, |e| e.transport_closed(shared.now(), &sid, transport));
                    shared.deregister(shard, transport);
                    return Ok(());
                }
                histogram!(m::RESUME_SECONDS).record(accepted_at.elapsed().as_secs_f64());
                session_loop(shared, shard, sid, transport, tls, buf, rx).await;
                return Ok(());
            }
            Err(rej) => {
                if send_rejection(&mut tls, &rej).await.is_err() {
                    return Ok(());
                }
            }
        }
        let t = Duration::from_millis(shared.cfg.raw.timeouts.first_frame_timeout_ms);
        match tokio::time::timeout(t, read_frame(&mut tls, &mut buf)).await {
            Ok(Ok(Some(Kind::Resume(r)))) => resume = r,
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// One RESUME through the engine; on success the transport is registered.
fn resume_once(
    shared: &Arc<Shared>,
    tls: &Tls,
    binding: &ChannelBinding,
    transport: TransportId,
    r: &jvpn_proto::pb::session::Resume,
    register: Option<&mpsc::UnboundedSender<Control>>,
) -> Result<(SessionId, usize, ResumeOk, Option<TransportId>), Rejection> {
    // Label values are static strings: no allocation per RESUME.
    let count = |reason: &'static str| counter!(m::RESUMES, "result" => reason).increment(1);
    let Ok(sid) = SessionId::from_slice(&r.session_id) else {
        count(ReasonCode::UnknownSession.as_str());
        return Err(Rejection {
            reason: ReasonCode::UnknownSession,
            retry_after_ms: 0,
            current_binding_epoch: None,
        });
    };
    let shard = shard_of(&sid, shared.shards.len());
    if let Some(tx) = register {
        shared.register(shard, transport, tx.clone());
    }
    let now = shared.now();
    let req = ResumeRequest {
        session_id: sid,
        counter: r.counter,
        binding_epoch: r.binding_epoch,
        proof: &r.proof,
    };
    let res = shared.with_engine(shard, |e| {
        e.resume(now, &req, Conn { transport, binding }, |ctx| {
            ResumeKey::new(export(tls, RESUME_KEY_LABEL, ctx))
        })
    });
    match res {
        Ok(acc) => {
            count("ok");
            let (resume_token, token_key_id) = shared.seal_token(sid);
            Ok((
                sid,
                shard,
                ResumeOk {
                    node_id: shared.cfg.node_id.to_string(),
                    incarnation: shared.incarnation.0,
                    owner_epoch: acc.owner_epoch,
                    state_version: acc.state_version,
                    binding_epoch: acc.binding_epoch,
                    resume_token,
                    server_proof: acc.server_proof.to_vec(),
                    token_key_id,
                },
                acc.replaced,
            ))
        }
        Err(rej) => {
            if register.is_some() {
                shared.deregister(shard, transport);
            }
            count(rej.reason.as_str());
            Err(rej)
        }
    }
}

/// The attached connection: answer pings, echo data, watch for control.
async fn session_loop(
    shared: &Arc<Shared>,
    shard: usize,
    sid: SessionId,
    transport: TransportId,
    mut tls: Tls,
    mut buf: BytesMut,
    mut rx: mpsc::UnboundedReceiver<Control>,
) {
    let binding = channel_binding(&tls);
    let interval_ms = shared
        .with_engine(shard, |e| {
            e.session(&sid).map(|s| s.policy().heartbeat_interval_ms)
        })
        .unwrap_or(shared.cfg.raw.policy.heartbeat_interval_ms);
    let report_every = Duration::from_millis(interval_ms / 2);
    let mut last_report = Instant::now();
    // `Some(reason)`: the transport failed and the engine must hear about it.
    let end = loop {
        let read = tokio::select! {
            biased;
            ctl = rx.recv() => match ctl {
                Some(Control::Terminate(reason)) => {
                    let _ = send_terminate(&mut tls, reason).await;
                    break None; // the engine already unbound this transport
                }
                Some(Control::GoAway { deadline_ms }) => {
                    let g = GoAway { reason: ReasonCode::Draining as i32, deadline_ms };
                    if write_frame(&mut tls, Kind::GoAway(g)).await.is_err() {
                        break Some(ReasonCode::TransportDead);
                    }
                    continue;
                }
                None => break None,
            },
            r = read_frame(&mut tls, &mut buf) => r,
        };
        let kind = match read {
            Ok(Some(k)) => k,
            Ok(None) => break Some(ReasonCode::TransportDead),
            Err(e) => {
                let reason = e.reason();
                let _ = send_terminate(&mut tls, reason).await;
                counter!(m::CONNECTIONS_REJECTED, "reason" => reason.as_str()).increment(1);
                break Some(reason);
            }
        };
        counter!(m::FRAMES_RECEIVED).increment(1);
        if last_report.elapsed() >= report_every {
            last_report = Instant::now();
            let now = shared.now();
            if !shared.with_engine(shard, |e| e.activity(now, &sid, transport)) {
                break None; // no longer this session's binding
            }
        }
        let reply = match kind {
            Kind::Ping(p) => Kind::Pong(Pong { seq: p.seq }),
            Kind::Data(d) => {
                // The default egress is an echo service.
                let n = d.payload.len() as u64;
                counter!(m::DATA_BYTES, "direction" => "in").increment(n);
                counter!(m::DATA_BYTES, "direction" => "out").increment(n);
                Kind::Data(d)
            }
            Kind::Ack(_) | Kind::Pong(_) => continue,
            Kind::Terminate(_) => {
                let now = shared.now();
                shared.with_engine(shard, |e| e.terminate(now, &sid, Termination::AgentClosed));
                break None;
            }
            Kind::Resume(r) => {
                // A RESUME on the attached connection itself (a replay, or an
                // agent retrying): validated like any other.
                match resume_once(shared, &tls, &binding, transport, &r, None) {
                    Ok((_, _, ok, replaced)) => {
                        if replaced == Some(transport) {
                            // The engine "replaced" this transport by itself.
                            let _ = rx.try_recv();
                        }
                        Kind::ResumeOk(ok)
                    }
                    Err(rej) => Kind::Reject(reject_frame(&rej)),
                }
            }
            _ => {
                let _ = send_terminate(&mut tls, ReasonCode::ProtocolError).await;
                break Some(ReasonCode::ProtocolError);
            }
        };
        if write_frame(&mut tls, reply).await.is_err() {
            break Some(ReasonCode::TransportDead);
        }
    };
    if end.is_some() {
        let now = shared.now();
        shared.with_engine(shard, |e| e.transport_closed(now, &sid, transport));
    }
    shared.deregister(shard, transport);
    let _ = tls.shutdown().await;
}

fn reject_frame(rej: &Rejection) -> Reject {
    Reject {
        reason: rej.wire_reason() as i32,
        retry_after_ms: rej.retry_after_ms,
        current_binding_epoch: rej.current_binding_epoch.unwrap_or(0),
    }
}

async fn send_rejection<W: AsyncWrite + Unpin>(w: &mut W, rej: &Rejection) -> std::io::Result<()> {
    write_frame(w, Kind::Reject(reject_frame(rej))).await
}

async fn send_reject<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: ReasonCode,
    retry_after_ms: u64,
    epoch: u64,
) -> std::io::Result<()> {
    let r = Reject {
        reason: reason as i32,
        retry_after_ms,
        current_binding_epoch: epoch,
    };
    write_frame(w, Kind::Reject(r)).await
}

async fn send_terminate<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: ReasonCode,
) -> std::io::Result<()> {
    write_frame(
        w,
        Kind::Terminate(Terminate {
            reason: reason as i32,
        }),
    )
    .await
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: Kind) -> std::io::Result<()> {
    let bytes = frame::to_bytes(kind).map_err(std::io::Error::other)?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream. Cancel-safe: a
/// partial frame stays in `buf`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Kind>, FrameError> {
    loop {
        if let Some(k) = frame::decode(buf)? {
            return Ok(Some(k));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

fn spread_goaway(shared: &Arc<Shared>, over: Duration, terminate_at: Instant) {
    let mut all = Vec::new();
    for s in &shared.shards {
        all.extend(lock(&s.conns).values().cloned());
    }
    let n = all.len().max(1) as u32;
    for (i, tx) in all.into_iter().enumerate() {
        let delay = over * i as u32 / n;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let left = terminate_at.saturating_duration_since(Instant::now());
            let _ = tx.send(Control::GoAway {
                deadline_ms: left.as_millis() as u64,
            });
        });
    }
}

async fn timer_loop(shared: Arc<Shared>, shard: usize, mut stop: watch::Receiver<bool>) {
    loop {
        let next = lock(&shared.shards[shard].engine).poll_timeout();
        let sleep = match next {
            Some(t) => tokio::time::sleep_until(shared.instant(t).into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            () = sleep => {
                let now = shared.now();
                shared.with_engine(shard, |e| e.handle_timeout(now));
            }
            () = shared.shards[shard].wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

async fn gauge_loop(handle: GatewayHandle, mut stop: watch::Receiver<bool>) {
    loop {
        let mut total = 0;
        for (state, n) in handle.session_counts() {
            gauge!(m::SESSIONS, "state" => state).set(n as f64);
            total += n;
        }
        if let Some(c) = &handle.shared.cluster {
            c.set_sessions(total);
            c.export_lease_gauges();
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_expiry_bounds_the_session_on_the_engine_clock() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
        let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
        params.not_after = in_an_hour.into();
        let cert = params.self_signed(&key).unwrap();
        let now = Mono::from_millis(5_000);
        let exp = cert_expiry(cert.der(), now).unwrap();
        let left = exp.saturating_since(now).as_secs();
        assert!((3590..=3600).contains(&left), "{left}");
        assert_eq!(cert_expiry(b"not a certificate", now), None);
    }
}
