//! State shared by every task of one gateway: the engine shards and their
//! connection registries, the token issuer, admission tables, reload, and
//! the per-shard timer and gauge tasks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jvpn_proto::{Incarnation, ReasonCode, SessionId};
use jvpn_runtime::admission::{HandshakeBudget, SourceLimiter, TlsQueue};
use jvpn_runtime::channel_io::SessionChannel;
use jvpn_runtime::wire::lock;
use metrics::{counter, gauge};
use rand::{RngCore, SeedableRng};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::config::ConfigErrors;
use crate::config::Validated;
use crate::engine::policy::{PolicyError, display_all};
use crate::engine::{
    Action, Engine, EngineConfig, EngineEvent, Mono, State, Termination, TransportId,
};
use crate::events::EventSink;
use crate::gate::Gate;
use crate::issuer::{Issuer, NONCE_LEN};
use crate::metrics as m;

/// Messages from the engine side to a connection task.
#[derive(Debug)]
pub(super) enum Control {
    Terminate(ReasonCode),
    GoAway { deadline_ms: u64 },
}

impl Control {
    /// GoAway with the time left until `deadline`.
    pub(super) fn goaway(deadline: Instant) -> Self {
        let left = deadline.saturating_duration_since(Instant::now());
        Self::GoAway {
            deadline_ms: left.as_millis() as u64,
        }
    }
}

pub(super) struct Shard {
    pub(super) engine: Mutex<Engine>,
    pub(super) conns: Mutex<HashMap<TransportId, mpsc::UnboundedSender<Control>>>,
    /// The data-plane channels of this shard's sessions that have one.
    pub(super) channels: Mutex<HashMap<SessionId, SessionChannel>>,
    pub(super) wake: Notify,
}

/// Why a gateway could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener's address could not be read.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    /// The TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The policy does not validate.
    #[error("policy: {}", display_all(.0))]
    Policy(Vec<PolicyError>),
    /// The heartbeat thread could not be started.
    #[error("membership thread: {0}")]
    Membership(#[source] std::io::Error),
    /// The new incarnation could not be recorded in `state_dir`.
    #[error(transparent)]
    Incarnation(#[from] crate::incarnation::IncarnationError),
    /// `[store]` could not make an etcd client (an unusable endpoint or
    /// certificate that `check` could not see).
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Why a SIGHUP reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file no longer validates.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Keys that only a restart may change differ.
    #[error("{} cannot change without a restart", .0.join(", "))]
    RestartOnly(Vec<&'static str>),
    /// Same key id, different secret: routers could not tell the two apart.
    #[error(
        "cluster.secret_file: the secret changed but its key id did not; a rotation needs a new key id"
    )]
    SecretWithoutNewKeyId,
    /// A new key id with the same secret is no rotation (issue 18 M2).
    #[error(
        "cluster.secret_file: the key id changed but the secret did not; a rotation needs a new secret"
    )]
    KeyIdWithoutNewSecret,
    /// The new certificates or keys were refused.
    #[error("tls: {0}")]
    Tls(rustls::Error),
    /// The new `[policy]` is invalid.
    #[error("policy: {}", display_all(.0))]
    Policy(Vec<PolicyError>),
}

/// State shared by every task of one gateway.
pub(super) struct Shared {
    /// The configuration at start; restart-only keys are read from here.
    pub(super) cfg: Validated,
    /// The admin token in force (a reload replaces it).
    pub(super) admin_token: jvpn_runtime::admin::LiveToken,
    /// Reloadable (SIGHUP): the TLS configuration and the connection cap
    /// (the other limits live in their limiters).
    pub(super) acceptor: ArcSwap<TlsAcceptor>,
    /// Resumption tickets: one ticketer for the process's life (its keys
    /// are this incarnation's), kept across certificate reloads.
    pub(super) tickets: Arc<crate::tickets::Tickets>,
    pub(super) max_connections: AtomicUsize,
    /// Seals routing tokens; swapped when a reload rotates the cluster secret.
    pub(super) issuer: ArcSwap<Issuer>,
    pub(super) incarnation: Incarnation,
    /// The pre-TLS rules (who is a router, who this node is).
    pub(super) gate: Gate,
    pub(super) shards: Vec<Shard>,
    pub(super) next_transport: AtomicU64,
    pub(super) next_hello_shard: AtomicUsize,
    pub(super) origin: Instant,
    pub(super) sources: Mutex<SourceLimiter>,
    pub(super) budget: Mutex<HandshakeBudget>,
    pub(super) tls_slots: Semaphore,
    pub(super) tls_queue: Mutex<TlsQueue>,
    pub(super) open_conns: AtomicUsize,
    pub(super) draining: AtomicBool,
    /// The drain's deadline, once its GoAways go out: a transport attached
    /// after that is told GoAway too.
    pub(super) goaway_deadline: std::sync::OnceLock<Instant>,
    pub(super) events: EventSink,
    pub(super) token_hashes: Vec<blake3::Hash>,
    /// Where streams may go (reloadable; applies to streams opened after).
    pub(super) egress: ArcSwap<crate::egress::EgressPolicy>,
    /// Per-principal byte-rate buckets (`egress.principal_bytes_per_s`).
    pub(super) buckets: super::streams::PerPrincipal<crate::egress::Bucket>,
    /// Streams open per principal (`egress.max_streams_per_principal`).
    pub(super) principal_streams: super::streams::PerPrincipal<std::sync::atomic::AtomicUsize>,
    /// Name lookups of streams running at once (`streams::RESOLVING`).
    pub(super) resolving: Arc<tokio::sync::Semaphore>,
    /// Name lookups running at once per principal
    /// (`streams::RESOLVING_PER_PRINCIPAL`).
    pub(super) principal_resolving: super::streams::PerPrincipal<Semaphore>,
    /// Streams open in the whole gateway (`egress.max_streams`).
    pub(super) streams_open: Arc<std::sync::atomic::AtomicUsize>,
    /// Leases and views; `None` without membership (single node, static PROXY).
    pub(super) cluster: Option<Arc<crate::membership::Cluster>>,
    /// This gateway's listeners as bound (a configured port 0 is not the
    /// port agents could reach): protected from streams like the cluster's.
    pub(super) bound: std::sync::OnceLock<[std::net::SocketAddr; 2]>,
    /// `POST /drain` on the admin port.
    pub(super) drain: jvpn_runtime::admin::DrainTrigger,
    /// Topology 3: the shared store, set once at start when `[store]`
    /// names etcd.
    pub(super) store: std::sync::OnceLock<Arc<super::stored::Stored>>,
}

impl Shared {
    /// Applies a validated configuration read again from disk (SIGHUP):
    /// `[policy]` for sessions created from now on, `[admission]` limits and
    /// `[tls]` certificates. Anything else must be unchanged; otherwise
    /// nothing is applied.
    pub(super) fn reload(&self, new: &Validated) -> Result<(), ReloadError> {
        let fixed = crate::config::restart_only_changes(&self.cfg.raw, &new.raw);
        if !fixed.is_empty() {
            return Err(ReloadError::RestartOnly(fixed));
        }
        // The same key id must mean the same secret: compare what it derives.
        let next = Issuer::new(&new.secret.derive(), &self.cfg.node_id, self.incarnation);
        let current = self.issuer.load();
        let rotate = next.key_id() != current.key_id();
        if !rotate && next.tag() != current.tag() {
            return Err(ReloadError::SecretWithoutNewKeyId);
        }
        if rotate && next.tag() == current.tag() {
            return Err(ReloadError::KeyIdWithoutNewSecret);
        }
        let tokenless = !new.dev_tokens.is_empty();
        let tls = crate::tls::server_config(&new.tls, tokenless, Some(self.tickets.clone()))
            .map_err(ReloadError::Tls)?;
        for i in 0..self.shards.len() {
            self.with_engine(i, |e| e.set_policy(new.raw.policy.clone()))
                .map_err(ReloadError::Policy)?;
        }
        if let Some(c) = &self.cluster {
            c.set_agent_silence(
                new.raw.policy.heartbeat_timeout(),
                new.raw.policy.session_max_lifetime(),
            );
        }
        self.tickets.set_limits(
            new.raw.policy.transport_lost_ttl(),
            new.raw.policy.session_max_lifetime(),
        );
        // A resumed handshake does not verify the client certificate
        // again: after a reload (perhaps of the agent CA), no ticket from
        // before it is honoured (dropped before the new configuration is
        // in), and handshakes still running under the old configuration
        // get none (marked once it is in).
        self.tickets.forget_keys();
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
        self.egress.store(new.egress.clone());
        gauge!(m::STREAMS_LIMIT).set(new.egress.max_streams as f64);
        self.acceptor
            .store(Arc::new(TlsAcceptor::from(Arc::new(tls))));
        self.tickets.reloaded();
        if let Some(stored) = self.store.get() {
            stored.reload_keys(
                new.secret.derive(),
                new.previous_secret.as_ref().map(|p| p.derive()),
                crate::config::record_seal(&new.raw.store),
            );
        }
        if rotate {
            // New tokens under the new key; tokens already issued stay
            // valid while routers hold the old key as their previous one.
            info!(
                key_id = new.secret.key_id(),
                "routing tokens now sealed under a new cluster key"
            );
            self.issuer.store(Arc::new(next));
            if let Some(c) = &self.cluster {
                c.rotate_secret_keys(new.secret.derive());
            }
        }
        self.admin_token.set(new.admin_token.clone());
        Ok(())
    }

    pub(super) fn now(&self) -> Mono {
        Mono::between(self.origin, Instant::now())
    }

    pub(super) fn instant(&self, t: Mono) -> Instant {
        self.origin + Duration::from_nanos(t.as_nanos())
    }

    /// Runs `f` on one shard's engine, then dispatches what it produced.
    pub(super) fn with_engine<R>(&self, shard: usize, f: impl FnOnce(&mut Engine) -> R) -> R {
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
                if c.to == State::Terminated {
                    self.ended(shard, &c.session_id, c.reason.as_str());
                }
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

    /// What a session's end releases outside the engine: every stream of
    /// it ends, explicitly, with `why` (streams that ended at the agent
    /// finish first when the agent closed the session), and its store
    /// record goes.
    pub(super) fn ended(&self, shard: usize, sid: &SessionId, why: &str) {
        if why == ReasonCode::AgentClosed.as_str() {
            super::streams::finish(self, shard, sid);
        } else {
            super::streams::close(self, shard, sid, why);
        }
        if let Some(st) = self.store.get() {
            st.ended(sid);
        }
    }

    pub(super) fn register(
        &self,
        shard: usize,
        t: TransportId,
        tx: mpsc::UnboundedSender<Control>,
    ) {
        lock(&self.shards[shard].conns).insert(t, tx);
    }

    pub(super) fn deregister(&self, shard: usize, t: TransportId) {
        lock(&self.shards[shard].conns).remove(&t);
    }

    /// A session accepted on connection `t` that must not go on (its
    /// store write failed, its lease went before the answer): it ends
    /// with `why`, and the connection leaves the shard. The caller says
    /// so on the wire.
    pub(super) fn abandon(&self, shard: usize, sid: &SessionId, t: TransportId, why: Termination) {
        self.with_engine(shard, |e| e.terminate(self.now(), sid, why));
        self.deregister(shard, t);
    }

    /// The answer to `sid` could not be written on connection `t`: that
    /// transport is lost (the session waits for the next one).
    pub(super) fn answer_lost(&self, shard: usize, sid: &SessionId, t: TransportId) {
        self.with_engine(shard, |e| e.transport_closed(self.now(), sid, t));
        self.deregister(shard, t);
    }

    pub(super) fn counts(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        for s in &self.shards {
            let e = lock(&s.engine);
            for st in State::ALL {
                out[st.index()] += e.count(st);
            }
        }
        out
    }

    /// Sessions per live state (terminated sessions are removed).
    pub(super) fn live_counts(&self) -> Vec<(&'static str, u64)> {
        let c = self.counts();
        State::ALL
            .iter()
            .filter(|s| s.is_live())
            .map(|s| (s.as_str(), c[s.index()]))
            .collect()
    }

    pub(super) fn token_ok(&self, auth: &[u8]) -> bool {
        // blake3::Hash compares in constant time.
        let h = blake3::hash(auth);
        !auth.is_empty() && self.token_hashes.contains(&h)
    }

    /// A fresh token for `sid` and the key id it is sealed under.
    pub(super) fn seal_token(&self, sid: SessionId) -> (Vec<u8>, u32) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        self.issuer.load().seal(sid, nonce)
    }
}

pub(super) fn build(cfg: Validated) -> Result<Arc<Shared>, ServeError> {
    let incarnation = crate::incarnation::start(cfg.raw.state_dir.as_deref())?;
    let tokenless = !cfg.dev_tokens.is_empty();
    let tickets = Arc::new(crate::tickets::Tickets::new(
        cfg.raw.policy.transport_lost_ttl(),
        cfg.raw.policy.session_max_lifetime(),
    ));
    let tls = crate::tls::server_config(&cfg.tls, tokenless, Some(tickets.clone()))?;
    gauge!(m::STREAMS_LIMIT).set(cfg.egress.max_streams as f64);
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
        .map_err(ServeError::Policy)?;
        engine.set_shard(i, n);
        shards.push(Shard {
            engine: Mutex::new(engine),
            conns: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
    }
    let a = &cfg.raw.admission;
    let start = Mono::ZERO;
    let origin = Instant::now();
    let host_origin = jvpn_runtime::process::host_monotonic_ns();
    let shared = Shared {
        admin_token: jvpn_runtime::admin::LiveToken::new(cfg.admin_token.clone()),
        acceptor: ArcSwap::from_pointee(TlsAcceptor::from(Arc::new(tls))),
        tickets,
        max_connections: AtomicUsize::new(cfg.raw.admission.max_connections),
        issuer: ArcSwap::from_pointee(Issuer::new(&cfg.secret.derive(), &cfg.node_id, incarnation)),
        incarnation,
        gate: Gate {
            node_id: cfg.node_id.clone(),
            incarnation,
            routers: cfg.raw.cluster.routers.clone(),
            direct_clients: cfg.raw.cluster.direct_clients,
        },
        shards,
        next_transport: AtomicU64::new(1),
        next_hello_shard: AtomicUsize::new(0),
        origin,
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
        goaway_deadline: std::sync::OnceLock::new(),
        events: EventSink::start(
            &cfg.raw.events,
            cfg.syslog.clone(),
            cfg.node_id.clone(),
            incarnation,
            host_origin,
        ),
        token_hashes: cfg.dev_tokens.iter().map(|t| blake3::hash(t)).collect(),
        egress: ArcSwap::new(cfg.egress.clone()),
        buckets: super::streams::PerPrincipal::default(),
        principal_streams: super::streams::PerPrincipal::default(),
        resolving: Arc::new(tokio::sync::Semaphore::new(super::streams::RESOLVING)),
        principal_resolving: super::streams::PerPrincipal::default(),
        streams_open: Arc::default(),
        bound: std::sync::OnceLock::new(),
        cluster: cfg.membership.as_ref().map(|_| {
            let c = crate::membership::Cluster::new(
                cfg.node_id.clone(),
                incarnation,
                &cfg.raw.cluster.membership_endpoints,
                Duration::from_millis(cfg.raw.cluster.lease_timeout_ms),
                Duration::from_millis(cfg.raw.cluster.unleased_exit_ms),
                cfg.secret.derive(),
                origin,
            );
            c.set_agent_silence(
                cfg.raw.policy.heartbeat_timeout(),
                cfg.raw.policy.session_max_lifetime(),
            );
            c
        }),
        drain: jvpn_runtime::admin::DrainTrigger::default(),
        store: std::sync::OnceLock::new(),
        cfg,
    };
    let shared = Arc::new(shared);
    // A ticket is good while its session lives: the engine says so. Weak:
    // the ticketer lives inside `shared`.
    let weak = Arc::downgrade(&shared);
    shared.tickets.set_liveness(move |sid| {
        weak.upgrade().is_some_and(|s| {
            let shard = &s.shards[crate::engine::shard_of(sid, s.shards.len())];
            lock(&shard.engine)
                .session(sid)
                .is_some_and(|x| x.state() != crate::engine::State::Terminated)
        })
    });
    Ok(shared)
}

/// Timers that need not be exact (keep-alives, the engines' deadlines)
/// are rounded up to the next multiple of this, the same instants for the
/// whole process: what falls due in one step is done in one wake-up, and
/// the router reads the keep-alives of one step in one. With a wake-up per
/// keep-alive, those wake-ups were most of an idle session's cost.
pub(super) const TIMER_STEP: Duration = Duration::from_millis(50);

pub(super) fn aligned(t: Instant) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let step = TIMER_STEP.as_nanos();
    let up = t
        .saturating_duration_since(origin)
        .as_nanos()
        .div_ceil(step)
        * step;
    origin + Duration::from_nanos(u64::try_from(up).unwrap_or(u64::MAX))
}

pub(super) async fn timer_loop(shared: Arc<Shared>, shard: usize, mut stop: watch::Receiver<bool>) {
    loop {
        let next = lock(&shared.shards[shard].engine).poll_timeout();
        let sleep = match next {
            // Up to a step late: a session's deadlines are seconds long.
            Some(t) => tokio::time::sleep_until(aligned(shared.instant(t)).into()),
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

pub(super) async fn gauge_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let mut total = 0;
        for (state, n) in shared.live_counts() {
            gauge!(m::SESSIONS, "state" => state).set(n as f64);
            total += n;
        }
        let buffered: u64 = shared
            .shards
            .iter()
            .map(|s| {
                lock(&s.channels)
                    .values()
                    .map(SessionChannel::buffered)
                    .sum::<u64>()
            })
            .sum();
        gauge!(m::CHANNEL_BUFFERED).set(buffered as f64);
        // Ticket keys are erased on time even when no handshake comes.
        shared.tickets.roll(std::time::Instant::now());
        if let Some(c) = &shared.cluster {
            c.set_sessions(total);
            c.export_lease_gauges(shared.now());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}
