//! The gateway side of membership (DESIGN §4): one heartbeat stream per
//! configured router, driven from a dedicated thread so a busy runtime can
//! never starve it, and the leases that fence HELLO.
//!
//! Lease with router R: the send time (this process's monotonic clock) of the
//! last heartbeat R acknowledged, plus `lease_timeout`, and never past the end
//! of the stream that carried it. It is shorter than the router's
//! `failure_timeout`, and a router's fast death (after a closed stream) comes
//! after the close this side sees too, so by the time a router may declare
//! this node dead, the node has already stopped minting through that router.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jvpn_proto::Mono;
use jvpn_proto::ids::{Incarnation, NodeId};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::membership_proof::{gateway_proof, verify_router_proof};
use jvpn_proto::pb::membership::membership_client::MembershipClient;
use jvpn_proto::pb::membership::{HeartbeatReply, HeartbeatRequest, NodeState};
use jvpn_proto::ring::Ring;
use metrics::{counter, gauge, histogram};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use jvpn_runtime::config::ConfigProblem;
use jvpn_runtime::wire::lock;

use crate::metrics as m;

/// What this gateway tells routers about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LocalState {
    Starting = 1,
    Ready = 2,
    Draining = 3,
}

/// The membership endpoints given as an address (a name is not resolved
/// here; see docs/operations.md, "Egress").
fn endpoint_addrs(endpoints: &[String]) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter_map(|e| {
            let e = e
                .strip_prefix("http://")
                .or(e.strip_prefix("https://"))
                .unwrap_or(e);
            e.trim_end_matches('/').parse().ok()
        })
        .collect()
}

/// A router's listeners as it reported them, with an unspecified address
/// (bound to every address) taken as the address we reach it at, when the
/// endpoint is an `ip:port`. Unparsable entries are left out.
fn router_listeners(endpoint: &str, reported: &[String]) -> Vec<SocketAddr> {
    let reached = endpoint_addrs(&[endpoint.to_owned()])
        .first()
        .map(SocketAddr::ip);
    let mut out: Vec<SocketAddr> = reported
        .iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .filter_map(|a| match (a.ip().is_unspecified(), reached) {
            (false, _) => Some(a),
            (true, Some(ip)) => Some(SocketAddr::new(ip, a.port())),
            (true, None) => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A heartbeat sent and not yet answered: sequence, when, the state and
/// whether it said leaving.
type Sent = (u64, Instant, NodeState, bool);

/// One router as seen from this gateway.
#[derive(Debug)]
pub struct RouterLink {
    endpoint: String,
    /// The router's id (PROXY TLV 0xE0), learned from its replies.
    router_id: Mutex<Option<String>>,
    /// Lease end on [`Cluster::now`]'s clock, in ns; 0 = no lease.
    lease_until: AtomicU64,
    /// The router's latest view, as a ring to mint ids in.
    ring: Mutex<Option<Arc<Ring>>>,
    /// The router acknowledged a heartbeat that said DRAINING.
    draining_acked: AtomicBool,
    /// The router's own listeners, from its last full reply.
    listeners: Mutex<Vec<SocketAddr>>,
    /// A full reply came on the current stream: until then requests name
    /// no view, so that the router's listeners arrive on every new stream.
    full_seen: AtomicBool,
}

impl RouterLink {
    fn id(&self) -> Option<String> {
        lock(&self.router_id).clone()
    }
}

/// Leases, views and local state shared by the server and the heartbeat thread.
#[derive(Debug)]
pub struct Cluster {
    origin: Instant,
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    links: Vec<Arc<RouterLink>>,
    lease_timeout: Duration,
    /// End of the latest lease any router granted, ns on the lease clock;
    /// 0 = never leased.
    last_lease_end: AtomicU64,
    /// See [`Cluster::abandoned`]; zero: never.
    unleased_exit: Duration,
    state: AtomicU8,
    sessions: AtomicU64,
    superseded: watch::Sender<bool>,
    /// Keys of the current cluster secret, for the membership proofs, and
    /// the previous ones after a rotation (a reply in flight may use them).
    secret_keys: ArcSwap<(ClusterKeys, Option<ClusterKeys>)>,
    /// The cluster's listeners this gateway knows of: every member's client
    /// address in any router's view, and the routers' membership endpoints
    /// (those given as `ip:port`). Egress refuses them (no SSRF into the
    /// cluster) unless a rule names the host.
    listeners: ArcSwap<Vec<SocketAddr>>,
    /// Rings built lately, newest last, so that every router link that
    /// reports the same view shares one ring (bounded: [`RING_CACHE`]).
    rings: Mutex<VecDeque<Arc<Ring>>>,
    /// What routers are told of the agents' silence (see
    /// [`Cluster::set_agent_silence`]).
    agent_silence_ms: AtomicU32,
    /// Told to routers with every heartbeat once set ([`Cluster::leave`]).
    leaving: AtomicBool,
    /// A lower value a reload asked for, and from when it may be told
    /// (sessions keep the policy they were made under); the longest
    /// session lifetime of any policy this process ran.
    agent_silence_lowered: Mutex<(Option<(u32, Instant)>, Duration)>,
}

/// Rings [`Cluster`] keeps for sharing between its router links.
const RING_CACHE: usize = 8;

impl Cluster {
    pub fn new(
        node_id: NodeId,
        incarnation: Incarnation,
        endpoints: &[String],
        lease_timeout: Duration,
        unleased_exit: Duration,
        secret_keys: ClusterKeys,
        origin: Instant,
    ) -> Arc<Self> {
        let links = endpoints
            .iter()
            .map(|e| {
                Arc::new(RouterLink {
                    endpoint: e.clone(),
                    router_id: Mutex::new(None),
                    lease_until: AtomicU64::new(0),
                    ring: Mutex::new(None),
                    draining_acked: AtomicBool::new(false),
                    listeners: Mutex::new(Vec::new()),
                    full_seen: AtomicBool::new(false),
                })
            })
            .collect();
        Arc::new(Self {
            origin,
            node_id,
            incarnation,
            links,
            lease_timeout,
            last_lease_end: AtomicU64::new(0),
            unleased_exit,
            state: AtomicU8::new(LocalState::Starting as u8),
            sessions: AtomicU64::new(0),
            superseded: watch::channel(false).0,
            secret_keys: ArcSwap::from_pointee((secret_keys, None)),
            listeners: ArcSwap::from_pointee(endpoint_addrs(endpoints)),
            rings: Mutex::new(VecDeque::new()),
            agent_silence_ms: AtomicU32::new(0),
            leaving: AtomicBool::new(false),
            agent_silence_lowered: Mutex::new((None, Duration::ZERO)),
        })
    }

    /// How long this gateway's agents may go without a frame (the policy's
    /// `heartbeat_timeout_ms`): sent with every heartbeat, so routers give
    /// up a splice whose agent stopped acknowledging within that time. With
    /// keep-alives the gateway's own socket faces the router, whose TCP
    /// stays healthy when the agent's path dies (design note 53).
    ///
    /// A longer silence is told at once. A shorter one (a reload) only once
    /// the longest session lifetime of any policy so far (`life` is the new
    /// policy's) has passed: sessions made under an old policy keep its
    /// timeout, and a router must not cut their paths sooner than their
    /// agents would give them up.
    pub fn set_agent_silence(&self, silence: Duration, life: Duration) {
        self.set_agent_silence_at(silence, life, Instant::now());
    }

    fn set_agent_silence_at(&self, silence: Duration, life: Duration, now: Instant) {
        let ms = u32::try_from(silence.as_millis()).unwrap_or(u32::MAX);
        let mut l = lock(&self.agent_silence_lowered);
        let (pending, longest) = &mut *l;
        *longest = (*longest).max(life);
        if ms >= self.agent_silence_ms.load(Ordering::Relaxed) {
            self.agent_silence_ms.store(ms, Ordering::Relaxed);
            *pending = None;
        } else {
            *pending = Some((ms, now + *longest));
        }
    }

    /// What the next heartbeat tells of the agents' silence at `now`.
    fn agent_silence_at(&self, now: Instant) -> u32 {
        let mut l = lock(&self.agent_silence_lowered);
        if let Some((ms, from)) = l.0
            && now >= from
        {
            self.agent_silence_ms.store(ms, Ordering::Relaxed);
            l.0 = None;
        }
        self.agent_silence_ms.load(Ordering::Relaxed)
    }

    /// The ring of the view a full reply describes (or, with `base`, a
    /// delta from `base`), checked against its id; built only if no router
    /// link reported that view lately.
    fn ring_for(
        &self,
        reply: &HeartbeatReply,
        base: Option<&jvpn_proto::ring::View>,
        keys: &ClusterKeys,
    ) -> Result<Option<Arc<Ring>>, jvpn_proto::ring::ReplyViewError> {
        let view = match base {
            Some(b) => jvpn_proto::ring::view_from_delta(b, reply, keys)?,
            None => jvpn_proto::ring::view_from_reply(reply, keys)?,
        };
        let Some(view) = view else {
            return Ok(None);
        };
        let mut rings = lock(&self.rings);
        if let Some(r) = rings.iter().find(|r| r.view().id() == view.id()) {
            return Ok(Some(r.clone()));
        }
        counter!(m::RING_BUILDS).increment(1);
        let t0 = std::time::Instant::now();
        let ring = Arc::new(Ring::new(view, keys));
        histogram!(m::RING_BUILD_SECONDS).record(t0.elapsed().as_secs_f64());
        if rings.len() >= RING_CACHE {
            rings.pop_front();
        }
        rings.push_back(ring.clone());
        Ok(Some(ring))
    }

    /// The cluster's listeners this gateway knows of (see the field).
    pub fn listeners(&self) -> Arc<Vec<SocketAddr>> {
        self.listeners.load_full()
    }

    /// A router's view changed: the members' addresses again, from every
    /// router's view (a member may be in one view and not yet in another).
    fn refresh_listeners(&self) {
        let endpoints: Vec<String> = self.links.iter().map(|l| l.endpoint.clone()).collect();
        let mut all = endpoint_addrs(&endpoints);
        for l in &self.links {
            if let Some(r) = lock(&l.ring).as_ref() {
                all.extend(r.view().members().iter().map(|m| m.addr));
            }
            all.extend(lock(&l.listeners).iter().copied());
        }
        all.sort_unstable();
        all.dedup();
        self.listeners.store(Arc::new(all));
    }

    /// A reload rotated the cluster secret: prove with the new keys from now on.
    pub fn rotate_secret_keys(&self, next: ClusterKeys) {
        let current = self.secret_keys.load().0.clone();
        self.secret_keys.store(Arc::new((next, Some(current))));
    }

    /// Has this incarnation, once leased, gone without a lease from any
    /// router for `unleased_exit`? Routers forget superseded incarnations
    /// after a while (tombstones, or a restart), so rejoining could let it
    /// undercut a newer process of its node id: it must exit instead.
    pub fn abandoned(&self, now: Mono) -> bool {
        let end = self.last_lease_end.load(Ordering::Acquire);
        let limit = u64::try_from(self.unleased_exit.as_nanos()).unwrap_or(u64::MAX);
        end != 0 && limit != 0 && now.as_nanos() > end.saturating_add(limit)
    }

    /// [`Cluster::abandoned`], and if so, tells the server to exit (as if
    /// superseded: exit 75, and a supervisor starts a newer incarnation).
    fn exit_if_abandoned(&self) -> Result<(), StreamEnd> {
        if !self.abandoned(self.now()) {
            return Ok(());
        }
        if !*self.superseded.borrow() {
            counter!(m::SUPERSEDED).increment(1);
            warn!(
                unleased_exit_ms = self.unleased_exit.as_millis() as u64,
                "no router has leased this incarnation for longer than cluster.unleased_exit_ms; \
                 exiting instead of rejoining, so it cannot undercut a newer incarnation"
            );
            self.superseded.send_replace(true);
        }
        Err(StreamEnd::Abandoned)
    }

    /// `t` on the clock leases are kept in.
    fn mono(&self, t: Instant) -> Mono {
        Mono::between(self.origin, t)
    }

    /// Now on the clock leases are kept in (the origin the server gave:
    /// the same clock as its engine's). The lease rules below take `now`
    /// and read no clock.
    pub fn now(&self) -> Mono {
        self.mono(Instant::now())
    }

    fn lease_valid(&self, link: &RouterLink, now: Mono) -> bool {
        let until = link.lease_until.load(Ordering::Acquire);
        until != 0 && now.as_nanos() < until
    }

    /// The ring to mint in for a HELLO forwarded by `router_id`, if the lease
    /// with that router is valid now.
    pub fn hello_ring(&self, router_id: &str, now: Mono) -> Option<Arc<Ring>> {
        let link = self
            .links
            .iter()
            .find(|l| l.id().as_deref() == Some(router_id))?;
        if !self.lease_valid(link, now) {
            return None;
        }
        lock(&link.ring).clone()
    }

    /// The lease check repeated right before `HelloOk` is written.
    pub fn lease_with(&self, router_id: &str, now: Mono) -> bool {
        self.links
            .iter()
            .any(|l| l.id().as_deref() == Some(router_id) && self.lease_valid(l, now))
    }

    /// A direct HELLO needs leases with a majority of routers; minted in the
    /// view of the first of them.
    pub fn majority_ring(&self, now: Mono) -> Option<Arc<Ring>> {
        let valid: Vec<&Arc<RouterLink>> = self
            .links
            .iter()
            .filter(|l| self.lease_valid(l, now))
            .collect();
        if valid.len() * 2 <= self.links.len() {
            return None;
        }
        valid.iter().find_map(|l| lock(&l.ring).clone())
    }

    pub fn has_majority_lease(&self, now: Mono) -> bool {
        let valid = self
            .links
            .iter()
            .filter(|l| self.lease_valid(l, now))
            .count();
        valid * 2 > self.links.len()
    }

    pub fn set_state(&self, s: LocalState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// This gateway is taken out for good (it drains and exits next):
    /// routers forget it soon after its death rather than report it not
    /// alive, and page, for a day.
    pub fn leave(&self) {
        if !self.leaving.swap(true, Ordering::AcqRel) {
            // Acknowledgements of DRAINING said nothing of leaving.
            for l in &self.links {
                l.draining_acked.store(false, Ordering::Release);
            }
        }
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    fn state(&self) -> NodeState {
        match self.state.load(Ordering::Acquire) {
            x if x == LocalState::Ready as u8 => NodeState::Ready,
            x if x == LocalState::Draining as u8 => NodeState::Draining,
            _ => NodeState::Starting,
        }
    }

    pub fn set_sessions(&self, n: u64) {
        self.sessions.store(n, Ordering::Relaxed);
    }

    /// True once every router that currently holds a lease acknowledged
    /// DRAINING (a router we cannot reach places nothing on us anyway).
    pub fn draining_acknowledged(&self, now: Mono) -> bool {
        self.links
            .iter()
            .all(|l| l.draining_acked.load(Ordering::Acquire) || !self.lease_valid(l, now))
    }

    /// True once every router this gateway has heard from answered a
    /// heartbeat that said leaving (a router with no lease now may still
    /// hold this gateway, and would report it dead for a day).
    pub fn leave_acknowledged(&self) -> bool {
        self.links
            .iter()
            .all(|l| l.draining_acked.load(Ordering::Acquire) || l.id().is_none())
    }

    /// Publishes one lease gauge per identified router.
    pub fn export_lease_gauges(&self, now: Mono) {
        for l in &self.links {
            if let Some(id) = l.id() {
                let v = if self.lease_valid(l, now) { 1.0 } else { 0.0 };
                gauge!(m::LEASE_VALID, "router" => id).set(v);
            }
        }
    }

    /// Test hook: router link `i` is `router_id`, with `ring`, leased until `until`.
    #[cfg(test)]
    pub(crate) fn grant_for_test(&self, i: usize, router_id: &str, ring: Arc<Ring>, until: Mono) {
        let link = &self.links[i];
        *lock(&link.router_id) = Some(router_id.to_owned());
        *lock(&link.ring) = Some(ring);
        link.lease_until.store(until.as_nanos(), Ordering::Release);
        self.last_lease_end
            .fetch_max(until.as_nanos(), Ordering::AcqRel);
    }

    /// Resolves when a router says this incarnation was superseded.
    pub fn superseded(&self) -> watch::Receiver<bool> {
        self.superseded.subscribe()
    }
}

/// TLS material and parameters for the heartbeat streams.
#[derive(Clone)]
pub struct HeartbeatSettings {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
    /// Where the three came from (certificate, key, CA), read again at
    /// each stream's connect; `None`: only the bytes above.
    pub files: Option<[std::path::PathBuf; 3]>,
    /// The last set read from `files` that made a TLS client.
    pub last_good: Arc<Mutex<Option<PemSet>>>,
    /// The name every router's membership certificate carries (`router.<cluster>`).
    pub server_name: String,
    pub advertise_addr: std::net::SocketAddr,
    pub weight: u32,
    pub interval: Duration,
    pub keys: ClusterKeys,
}

/// A membership certificate, its key and the routers' CA, as PEM.
type PemSet = (Vec<u8>, zeroize::Zeroizing<Vec<u8>>, Vec<u8>);

impl std::fmt::Debug for HeartbeatSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("HeartbeatSettings")
            .field("server_name", &self.server_name)
            .field("advertise_addr", &self.advertise_addr)
            .field("weight", &self.weight)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl HeartbeatSettings {
    /// The membership certificate, key and CA as their files hold them
    /// now: a stream (re)connecting after the operator replaced them (a
    /// rotation before the old certificate expires) presents the new ones,
    /// with no restart. A set that does not make a TLS client (a file
    /// caught half-written, a new certificate beside the old key) leaves
    /// the last set that did, with a warning naming the key.
    fn current(&self) -> PemSet {
        let loaded = || {
            (
                self.cert_pem.clone(),
                zeroize::Zeroizing::new(self.key_pem.clone()),
                self.ca_pem.clone(),
            )
        };
        let Some(paths) = &self.files else {
            return loaded();
        };
        let read = || -> Result<_, ConfigProblem> {
            let file = |key: &str, p: &std::path::PathBuf| {
                std::fs::read(p)
                    .map_err(|e| ConfigProblem::new(key, format!("{}: {e}", p.display())))
            };
            let cert = file("cluster.membership_cert_file", &paths[0])?;
            let key = zeroize::Zeroizing::new(file("cluster.membership_key_file", &paths[1])?);
            let ca = file("cluster.membership_ca_file", &paths[2])?;
            usable(&cert, &key, &ca)?;
            Ok((cert, key, ca))
        };
        let mut good = self
            .last_good
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match read() {
            Ok(set) => {
                *good = Some(set.clone());
                set
            }
            Err(e) => {
                static WARN: jvpn_runtime::wire::AtMost =
                    jvpn_runtime::wire::AtMost::per(Duration::from_secs(60));
                if let Some(held) = WARN.allow() {
                    warn!(key = %e.key, problem = %e.problem, held,
                        "membership files not usable; the last good ones are used");
                }
                good.clone().unwrap_or_else(loaded)
            }
        }
    }
}

/// Whether a membership certificate, key and CA make a TLS client: each
/// parses, and the key is the certificate's.
pub(crate) fn usable(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<(), ConfigProblem> {
    use jvpn_runtime::tls as pem;
    pem::identity(
        cert,
        "cluster.membership_cert_file",
        key,
        "cluster.membership_key_file",
    )?;
    pem::roots_in(ca, "cluster.membership_ca_file")?;
    Ok(())
}

/// Starts the heartbeat thread: one stream per router, reconnecting forever.
pub fn spawn(cluster: Arc<Cluster>, settings: HeartbeatSettings) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("jvpn-heartbeat".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "heartbeat runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                let settings = Arc::new(settings);
                let mut tasks = Vec::new();
                for link in cluster.links.clone() {
                    tasks.push(tokio::spawn(run_link(
                        cluster.clone(),
                        link,
                        settings.clone(),
                    )));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
    Ok(())
}

async fn run_link(cluster: Arc<Cluster>, link: Arc<RouterLink>, s: Arc<HeartbeatSettings>) {
    let mut backoff = Backoff::default();
    loop {
        let mut replies = 0;
        let ended = stream_once(&cluster, &link, &s, &mut replies).await;
        // A lease ends with the stream that granted it: the router may call
        // this node dead 2 intervals after it saw the close, before the
        // lease would run out (issue 18 L1).
        link.lease_until.store(0, Ordering::Release);
        let mut refused = false;
        if let Err(e) = ended {
            debug!(router = %link.endpoint, error = %e, "heartbeat stream ended");
            counter!(m::HEARTBEAT_STREAM_ERRORS).increment(1);
            if e.is_refusal() {
                warn!(router = %link.endpoint, error = %e, "router refused this gateway");
                refused = true;
            }
        }
        if *cluster.superseded.borrow() {
            return;
        }
        link.draining_acked.store(false, Ordering::Release);
        tokio::time::sleep(backoff.after(replies, refused)).await;
    }
}

/// The wait before a heartbeat stream is opened again: doubling from
/// 50 ms to 500 ms (5 s after a refusal).
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::BASE }
    }
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(50);
    const MAX: Duration = jvpn_proto::HEARTBEAT_BACKOFF_MAX;

    /// The wait after a stream that carried `replies` replies. Two or
    /// more: it worked for an interval at least, so the earlier failures
    /// say nothing about this break (one reply and a close, again and
    /// again, still backs off).
    fn after(&mut self, replies: u64, refused: bool) -> Duration {
        if replies >= 2 && !refused {
            self.next = Self::BASE;
        }
        let wait = self.next;
        let max = if refused {
            REFUSED_BACKOFF_MAX
        } else {
            Self::MAX
        };
        self.next = (self.next * 2).min(max);
        wait
    }
}

/// How long a heartbeat stream may take to open, or go without a reply,
/// before it is given up and opened again: far past a lease (750 ms) and
/// a router's death verdicts (about 1 s), so a router that is only slow
/// (a ring build on a saturated host) keeps its stream.
fn patience(interval: Duration) -> Duration {
    (interval * 16).max(Duration::from_secs(4))
}

/// Longest wait between attempts after a refusal (e.g. another secret).
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a heartbeat stream ended (it is opened again after a back-off).
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    /// The endpoint or its TLS settings were refused, or connecting failed.
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The router answered the call or a message with an error.
    #[error("router: {0}")]
    Status(#[from] tonic::Status),
    /// The router closed the stream, or our request queue did.
    #[error("router closed the stream")]
    Closed,
    /// A router says this incarnation was superseded.
    #[error("superseded")]
    Superseded,
    /// Unleased for longer than `cluster.unleased_exit_ms`.
    #[error("unleased too long")]
    Abandoned,
    /// The router's reply proves another cluster secret.
    #[error("cluster secret mismatch")]
    SecretMismatch,
    /// Opening the stream, or the router's replies, took too long.
    #[error("router silent")]
    Silent,
}

impl StreamEnd {
    /// A refusal or a mismatch that retrying soon cannot fix (identity,
    /// secret, configuration): retry slowly, not every 500 ms.
    fn is_refusal(&self) -> bool {
        match self {
            StreamEnd::SecretMismatch => true,
            StreamEnd::Status(s) => s.code() == tonic::Code::PermissionDenied,
            _ => false,
        }
    }
}

impl<T> From<mpsc::error::SendError<T>> for StreamEnd {
    fn from(_: mpsc::error::SendError<T>) -> Self {
        StreamEnd::Closed
    }
}

/// One heartbeat stream, until it ends (it never ends well: `Ok` is
/// never returned); `carried` counts the replies it carried.
async fn stream_once(
    cluster: &Cluster,
    link: &RouterLink,
    s: &HeartbeatSettings,
    carried: &mut u64,
) -> Result<(), StreamEnd> {
    let patience = patience(s.interval);
    let (cert_pem, key_pem, ca_pem) = s.current();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(&cert_pem, &*key_pem))
        .domain_name(s.server_name.clone());
    let endpoint = Endpoint::from_shared(format!("https://{}", link.endpoint))?
        .tls_config(tls)?
        .connect_timeout(jvpn_proto::HEARTBEAT_CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let (tx, rx) = mpsc::channel::<HeartbeatRequest>(4);
    let mut ticker = tokio::time::interval(s.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut sent: VecDeque<Sent> = VecDeque::new();
    link.full_seen.store(false, Ordering::Relaxed);
    cluster.exit_if_abandoned()?;
    // The first request must be queued before the call resolves: tonic
    // waits for response headers, which the router sends on the first message.
    let first = request(cluster, link, s, &mut seq, &mut sent);
    tx.send(first).await?;
    counter!(m::HEARTBEATS_SENT).increment(1);
    // TLS and the response headers have no timeout of their own.
    let open = async {
        let mut client = MembershipClient::new(endpoint.connect().await?);
        let call = client
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?;
        Ok::<_, StreamEnd>(call.into_inner())
    };
    let mut replies = tokio::time::timeout(patience, open)
        .await
        .map_err(|_| StreamEnd::Silent)??;
    ticker.tick().await;
    info!(router = %link.endpoint, "heartbeat stream open");
    let mut last_reply = Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                cluster.exit_if_abandoned()?;
                // A router answers every heartbeat: one that stopped (a
                // stopped process, a path that lost its packets) is left
                // for a new stream.
                if last_reply.elapsed() > patience {
                    return Err(StreamEnd::Silent);
                }
                let req = request(cluster, link, s, &mut seq, &mut sent);
                match tx.try_send(req) {
                    Ok(()) => counter!(m::HEARTBEATS_SENT).increment(1),
                    // Queued requests not taken: the silence above ends it.
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(StreamEnd::Closed),
                }
            }
            msg = replies.message() => {
                let Some(reply) = msg? else {
                    return Err(StreamEnd::Closed);
                };
                last_reply = Instant::now();
                *carried += 1;
                on_reply(cluster, link, s, &mut sent, reply)?;
            }
        }
    }
}

fn request(
    cluster: &Cluster,
    link: &RouterLink,
    s: &HeartbeatSettings,
    seq: &mut u64,
    sent: &mut VecDeque<Sent>,
) -> HeartbeatRequest {
    *seq += 1;
    let state = cluster.state();
    sent.push_back((*seq, Instant::now(), state, cluster.is_leaving()));
    while sent.len() > 32 {
        sent.pop_front();
    }
    // One look at the held view (a guard taken inside the literal below
    // would live to its end).
    let (in_view, mut known_view_id) = match lock(&link.ring).as_ref() {
        Some(r) => (
            r.view().contains(&cluster.node_id, cluster.incarnation),
            r.view().id().0.to_vec(),
        ),
        None => (false, Vec::new()),
    };
    if !link.full_seen.load(Ordering::Relaxed) {
        known_view_id.clear();
    }
    HeartbeatRequest {
        node_id: cluster.node_id.to_string(),
        incarnation: cluster.incarnation.0,
        advertise_addr: s.advertise_addr.to_string(),
        state: state as i32,
        weight: s.weight,
        sessions: cluster.sessions.load(Ordering::Relaxed),
        lease_ok: cluster.lease_valid(link, cluster.now()),
        in_view,
        build_version: env!("CARGO_PKG_VERSION").to_owned(),
        sequence: *seq,
        incarnation_ordered: true,
        known_view_id,
        accepts_view_delta: true,
        agent_silence_ms: cluster.agent_silence_at(Instant::now()),
        leaving: cluster.is_leaving(),
        secret_proof: gateway_proof(
            &cluster.secret_keys.load().0,
            cluster.node_id.as_str(),
            cluster.incarnation.0,
            *seq,
        ),
    }
}

fn on_reply(
    cluster: &Cluster,
    link: &RouterLink,
    s: &HeartbeatSettings,
    sent: &mut VecDeque<Sent>,
    reply: HeartbeatReply,
) -> Result<(), StreamEnd> {
    if !reply.secret_proof.is_empty() {
        let keys = cluster.secret_keys.load();
        let verifies = |k: &ClusterKeys| {
            verify_router_proof(
                k,
                &reply.router_id,
                reply.sequence,
                &reply.view_id,
                &reply.secret_proof,
            )
        };
        if !verifies(&keys.0) && !keys.1.as_ref().is_some_and(verifies) {
            counter!(m::VIEW_MISMATCH).increment(1);
            warn!(router = %link.endpoint, "router reply proves another cluster secret; no lease");
            link.lease_until.store(0, Ordering::Release);
            return Err(StreamEnd::SecretMismatch);
        }
    }
    if reply.superseded {
        counter!(m::SUPERSEDED).increment(1);
        warn!(router = %link.endpoint, "a router says this incarnation was superseded");
        cluster.superseded.send_replace(true);
        return Err(StreamEnd::Superseded);
    }
    cluster.exit_if_abandoned()?;
    let Some(&(_, sent_at, state, leaving)) = sent.iter().find(|s| s.0 == reply.sequence) else {
        // An echo we no longer remember grants nothing.
        return Ok(());
    };
    {
        let mut id = lock(&link.router_id);
        if id.as_deref() != Some(reply.router_id.as_str()) {
            info!(router = %link.endpoint, router_id = %reply.router_id, "router identified");
            *id = Some(reply.router_id.clone());
        }
    }
    if !reply.members_omitted {
        link.full_seen.store(true, Ordering::Relaxed);
        let theirs = router_listeners(&link.endpoint, &reply.router_listeners);
        let changed = {
            let mut l = lock(&link.listeners);
            let changed = *l != theirs;
            *l = theirs;
            changed
        };
        if changed {
            cluster.refresh_listeners();
        }
    }
    // The view this reply stands for: the one this link holds (named
    // without its members, or sent again by a router one version older),
    // or another one, checked and then built or shared.
    let held = lock(&link.ring).clone();
    let holds = |id: &[u8]| {
        held.as_ref()
            .is_some_and(|r| r.view().id().0.as_slice() == id)
    };
    let ring = if reply.members_omitted {
        if !holds(&reply.view_id) {
            // It names a view this link no longer holds (the reply crossed
            // a change): nothing to renew the lease with. The next request
            // names the view held, and its reply brings the members.
            counter!(m::VIEW_UNKNOWN).increment(1);
            return Ok(());
        }
        held
    } else if holds(&reply.view_id)
        && !(reply.members.is_empty() && reply.delta_base_view_id.is_empty())
    {
        // Sent again in full (a router one version older) or as a delta
        // from a view we hold to the one we hold: nothing to build.
        held
    } else {
        let base = if reply.delta_base_view_id.is_empty() {
            None
        } else {
            // A delta applies to the view it names, which must be ours;
            // if the reply crossed a change, the next request names the
            // view held and gets a delta from that one.
            match held
                .as_ref()
                .filter(|r| r.view().id().0.as_slice() == reply.delta_base_view_id)
            {
                Some(r) => Some(r.view()),
                None => {
                    counter!(m::VIEW_UNKNOWN).increment(1);
                    return Ok(());
                }
            }
        };
        match cluster.ring_for(&reply, base, &s.keys) {
            Ok(r) => r,
            Err(why) => {
                // A view we cannot reproduce means a different cluster
                // secret: we must not mint sessions for this router.
                counter!(m::VIEW_MISMATCH).increment(1);
                warn!(router = %link.endpoint, %why, "router view rejected; no lease");
                link.lease_until.store(0, Ordering::Release);
                // Ask for the whole view next, not the same delta again.
                link.full_seen.store(false, Ordering::Relaxed);
                return Ok(());
            }
        }
    };
    let changed = {
        let mut cur = lock(&link.ring);
        let same = match (&*cur, &ring) {
            (Some(a), Some(b)) => a.view().id() == b.view().id(),
            (None, None) => true,
            _ => false,
        };
        if !same {
            *cur = ring;
        }
        !same
    };
    if changed {
        debug!(router = %link.endpoint, "router view changed");
        cluster.refresh_listeners();
    }
    // The shorter of ours and the router's: both sides must agree the lease
    // ends before the router may declare us dead.
    let mut lease = cluster.lease_timeout;
    if reply.lease_duration_ms > 0 {
        lease = lease.min(Duration::from_millis(reply.lease_duration_ms));
    }
    let until = cluster.mono(sent_at + lease);
    link.lease_until
        .fetch_max(until.as_nanos(), Ordering::AcqRel);
    cluster
        .last_lease_end
        .fetch_max(until.as_nanos(), Ordering::AcqRel);
    // A leaving gateway's drain waits for the router to have seen that
    // too: without it the router would keep it for a day.
    if state == NodeState::Draining && (leaving || !cluster.is_leaving()) {
        link.draining_acked.store(true, Ordering::Release);
        // A leave between the check and the store cleared the flags
        // before this set it: this reply is no acknowledgement of it.
        if !leaving && cluster.is_leaving() {
            link.draining_acked.store(false, Ordering::Release);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that worked and broke is opened again at once, whatever
    /// failed before it: the router declares a gateway dead 2 intervals
    /// (500 ms by default) after its stream closed, so a wait stuck at
    /// 500 ms from earlier failures (start-up, router restarts) turned
    /// every later brief break into a death. The wait used to reset only on
    /// an `Ok` that a stream never returns.
    #[test]
    fn a_stream_that_worked_is_reopened_at_once() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..6).map(|_| b.after(0, false)).collect();
        assert_eq!(waits.last(), Some(&Backoff::MAX), "{waits:?}");
        // Hours of heartbeats, then one break.
        assert_eq!(b.after(50_000, false), Backoff::BASE);
        assert_eq!(b.after(0, false), Backoff::BASE * 2, "then doubling again");
        // A stream that closes after its first reply still backs off.
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..6).map(|_| b.after(1, false)).collect();
        assert_eq!(waits.last(), Some(&Backoff::MAX), "{waits:?}");
        // Refusals: up to 5 s, and a refusal is no working stream.
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.after(0, true)).collect();
        assert_eq!(waits.last(), Some(&REFUSED_BACKOFF_MAX), "{waits:?}");
    }

    fn cluster(unleased_exit: Duration) -> Arc<Cluster> {
        Cluster::new(
            NodeId::new("g1").unwrap(),
            Incarnation(1),
            &["a:1".into(), "b:1".into()],
            Duration::from_millis(750),
            unleased_exit,
            jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive(),
            Instant::now(),
        )
    }

    /// Issue 18 A3: once leased, a gateway that no router leased for longer
    /// than `cluster.unleased_exit_ms` is abandoned (it exits, never rejoins).
    #[test]
    fn a_gateway_unleased_for_too_long_is_abandoned() {
        let c = cluster(Duration::from_secs(60));
        let s = Mono::from_millis;
        assert!(!c.abandoned(s(1_000_000)), "never leased: still starting");
        c.last_lease_end
            .fetch_max(s(10_000).as_nanos(), Ordering::AcqRel);
        assert!(!c.abandoned(s(70_000)), "exactly the limit");
        assert!(c.abandoned(s(70_001)));
        // A lease from any router counts.
        c.last_lease_end
            .fetch_max(s(65_000).as_nanos(), Ordering::AcqRel);
        assert!(!c.abandoned(s(70_001)));
        // Zero: never.
        let never = cluster(Duration::ZERO);
        never.last_lease_end.fetch_max(1, Ordering::AcqRel);
        assert!(!never.abandoned(s(u64::MAX / 2_000_000)));
    }

    /// Issue 14: a view is built into a ring once and shared by every link
    /// that reports it, whether the router names it without its members or
    /// (one version older) sends them every time; a reply that names a view
    /// the link no longer holds renews nothing.
    #[test]
    fn a_view_is_built_once_whatever_the_routers_send() {
        use jvpn_proto::ring::{Member, RingParams, View};
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let c = cluster(Duration::ZERO);
        let s = test_settings(&keys);
        let view = |ids: &[&str]| {
            let members = ids
                .iter()
                .enumerate()
                .map(|(i, id)| Member {
                    node_id: NodeId::new(id).unwrap(),
                    incarnation: Incarnation(1),
                    addr: format!("10.0.0.{}:7443", i + 1).parse().unwrap(),
                    weight: 1,
                })
                .collect();
            View::new(members, RingParams::default(), &keys).unwrap()
        };
        let full = |v: &View, sequence: u64| full_reply(v, sequence);
        let omitted = |v: &View, sequence: u64| HeartbeatReply {
            members: Vec::new(),
            members_omitted: true,
            ..full(v, sequence)
        };
        let mut sent: VecDeque<_> = (1..=10)
            .map(|q| (q, Instant::now(), NodeState::Ready, false))
            .collect();
        let (x, y) = (view(&["g1", "g2"]), view(&["g1", "g2", "g3"]));
        let (l0, l1) = (&c.links[0], &c.links[1]);
        let held = |l: &RouterLink| lock(&l.ring).clone().unwrap();
        on_reply(&c, l0, &s, &mut sent, full(&x, 1)).unwrap();
        let rx = held(l0);
        // A router one version older sends the same members again: kept.
        on_reply(&c, l0, &s, &mut sent, full(&x, 2)).unwrap();
        assert!(Arc::ptr_eq(&held(l0), &rx));
        // Another router reports the same view: the same ring.
        on_reply(&c, l1, &s, &mut sent, full(&x, 3)).unwrap();
        assert!(Arc::ptr_eq(&held(l1), &rx));
        // The view named without its members: held, and the lease renewed.
        l0.lease_until.store(0, Ordering::Release);
        on_reply(&c, l0, &s, &mut sent, omitted(&x, 4)).unwrap();
        assert!(Arc::ptr_eq(&held(l0), &rx));
        assert!(l0.lease_until.load(Ordering::Acquire) > 0);
        // A new view: one more ring.
        on_reply(&c, l0, &s, &mut sent, full(&y, 5)).unwrap();
        assert_eq!(held(l0).view().id(), y.id());
        // An omitted reply naming the view l0 no longer holds renews nothing.
        l0.lease_until.store(0, Ordering::Release);
        on_reply(&c, l0, &s, &mut sent, omitted(&x, 6)).unwrap();
        assert_eq!(l0.lease_until.load(Ordering::Acquire), 0);
        assert_eq!(held(l0).view().id(), y.id());
        // Two views, two rings: nothing was built twice.
        assert_eq!(lock(&c.rings).len(), 2);
        // The next request names the view held.
        let mut seq = 10;
        let req = request(&c, l0, &s, &mut seq, &mut sent);
        assert_eq!(req.known_view_id, y.id().0.to_vec());
        assert!(req.in_view);
    }

    /// A router's reply carrying the whole view `v`.
    fn full_reply(v: &jvpn_proto::ring::View, sequence: u64) -> HeartbeatReply {
        HeartbeatReply {
            sequence,
            view_id: v.id().0.to_vec(),
            members: jvpn_proto::ring::members_to_reply(v),
            ring: Some(jvpn_proto::pb::membership::RingParameters {
                vnodes_per_weight: v.params().vnodes_per_weight,
                key_id: 1,
            }),
            lease_duration_ms: 750,
            router_id: "r1".into(),
            ..HeartbeatReply::default()
        }
    }

    /// Heartbeat settings for driving `on_reply` and `request` directly.
    fn test_settings(keys: &ClusterKeys) -> HeartbeatSettings {
        HeartbeatSettings {
            cert_pem: Vec::new(),
            key_pem: Vec::new(),
            ca_pem: Vec::new(),
            files: None,
            last_good: Default::default(),
            server_name: String::new(),
            advertise_addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            interval: Duration::from_millis(250),
            keys: keys.clone(),
        }
    }

    /// Replaced membership files are what the next stream presents (a
    /// rotation needs no restart, as operations.md says); a set caught
    /// mid-replacement (a new certificate beside the old key, an empty
    /// file) leaves the last good one.
    #[test]
    fn each_stream_reads_the_membership_files_again() {
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let dir = tempfile::tempdir().unwrap();
        let paths = ["cert.pem", "key.pem", "ca.pem"].map(|f| dir.path().join(f));
        let mint = || {
            let c = rcgen::generate_simple_self_signed(vec!["g1.test".into()]).unwrap();
            (
                c.cert.pem().into_bytes(),
                c.signing_key.serialize_pem().into_bytes(),
            )
        };
        let (old_cert, old_key) = mint();
        let (new_cert, new_key) = mint();
        let write = |i: usize, b: &[u8]| std::fs::write(&paths[i], b).unwrap();
        write(0, &old_cert);
        write(1, &old_key);
        write(2, &old_cert);
        let s = HeartbeatSettings {
            cert_pem: old_cert.clone(),
            key_pem: old_key.clone(),
            ca_pem: old_cert.clone(),
            files: Some(paths.clone()),
            ..test_settings(&keys)
        };
        write(0, &new_cert);
        write(1, &new_key);
        let (cert, key, ca) = s.current();
        assert_eq!(
            (cert, key.to_vec(), ca),
            (new_cert.clone(), new_key.clone(), old_cert.clone())
        );
        // Half-replaced: the newest certificate beside another key, then
        // an empty key file. The last good set, not the one from start.
        for (i, b) in [(0, old_cert.as_slice()), (1, b"".as_slice())] {
            write(i, b);
            let (cert, key, _) = s.current();
            assert_eq!(
                (cert, key.to_vec()),
                (new_cert.clone(), new_key.clone()),
                "{i}"
            );
        }
    }

    /// A router endpoint that accepts TCP and then says nothing (a load
    /// balancer in front of a dead router, a stopped process whose kernel
    /// still accepts): the stream attempt ends, and is made again, instead
    /// of waiting for ever (tonic's connect timeout covers TCP only).
    #[tokio::test]
    async fn a_router_that_accepts_and_says_nothing_is_given_up_on() {
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let c = Cluster::new(
            NodeId::new("g1").unwrap(),
            Incarnation(1),
            &[addr.to_string()],
            Duration::from_millis(750),
            Duration::ZERO,
            keys.clone(),
            Instant::now(),
        );
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                conns.push(conn);
            }
        });
        let ca = rcgen::generate_simple_self_signed(vec!["router.test".into()]).unwrap();
        let s = HeartbeatSettings {
            cert_pem: ca.cert.pem().into_bytes(),
            key_pem: ca.signing_key.serialize_pem().into_bytes(),
            ca_pem: ca.cert.pem().into_bytes(),
            server_name: "router.test".into(),
            interval: Duration::from_millis(50),
            ..test_settings(&keys)
        };
        let mut carried = 0;
        let ended = tokio::time::timeout(
            patience(s.interval) * 2,
            stream_once(&c, &c.links[0], &s, &mut carried),
        )
        .await;
        assert!(
            matches!(ended, Ok(Err(StreamEnd::Silent))),
            "still waiting, or ended otherwise: {ended:?}"
        );
        held.abort();
    }

    /// A gateway (g1) with its heartbeat settings, and a view of it alone.
    fn this_gateway_alone() -> (Arc<Cluster>, HeartbeatSettings, jvpn_proto::ring::View) {
        use jvpn_proto::ring::{Member, RingParams, View};
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let members = vec![Member {
            node_id: NodeId::new("g1").unwrap(),
            incarnation: Incarnation(1),
            addr: "10.0.0.1:7443".parse().unwrap(),
            weight: 1,
        }];
        let v = View::new(members, RingParams::default(), &keys).unwrap();
        (cluster(Duration::ZERO), test_settings(&keys), v)
    }

    /// A leave that comes after the drain began: routers that acknowledged
    /// DRAINING have not seen it yet, and one that granted no lease has not
    /// either; the final wait needs a reply to a heartbeat that said
    /// leaving from every router this gateway knows (it used to count the
    /// DRAINING acknowledgements, and a router without a lease, as done).
    #[test]
    fn a_leave_after_the_drain_began_waits_for_its_own_acknowledgement() {
        let (c, s, v) = this_gateway_alone();
        let (mut seq, mut sent) = (0, VecDeque::new());
        c.set_state(LocalState::Draining);
        for l in &c.links {
            let r = request(&c, l, &s, &mut seq, &mut sent);
            on_reply(&c, l, &s, &mut sent, full_reply(&v, r.sequence)).unwrap();
        }
        assert!(c.draining_acknowledged(Mono::from_millis(1)));
        c.leave();
        assert!(
            !c.leave_acknowledged(),
            "DRAINING acknowledgements are not a leave's"
        );
        let (l0, l1) = (&c.links[0], &c.links[1]);
        let r = request(&c, l0, &s, &mut seq, &mut sent);
        on_reply(&c, l0, &s, &mut sent, full_reply(&v, r.sequence)).unwrap();
        // l1's router is known but its lease lapsed (a partition, a
        // reconnect): it has not seen the leave.
        l1.lease_until.store(0, Ordering::Release);
        assert!(!c.leave_acknowledged());
        let r = request(&c, l1, &s, &mut seq, &mut sent);
        on_reply(&c, l1, &s, &mut sent, full_reply(&v, r.sequence)).unwrap();
        assert!(c.leave_acknowledged());
    }

    /// Design note 56: once leaving, a drain counts a router as having
    /// seen it only from a reply to a heartbeat that said so (a DRAINING
    /// heartbeat sent before the leave would otherwise end the wait, and
    /// that router would keep this gateway for a day).
    #[test]
    fn a_leave_is_acknowledged_only_by_a_reply_to_a_heartbeat_that_said_it() {
        let (c, s, v) = this_gateway_alone();
        let (mut seq, mut sent) = (0, VecDeque::new());
        let l0 = &c.links[0];
        c.set_state(LocalState::Draining);
        let before = request(&c, l0, &s, &mut seq, &mut sent);
        assert!(!before.leaving);
        c.leave();
        on_reply(&c, l0, &s, &mut sent, full_reply(&v, before.sequence)).unwrap();
        assert!(!l0.draining_acked.load(Ordering::Acquire));
        let after = request(&c, l0, &s, &mut seq, &mut sent);
        assert!(after.leaving);
        on_reply(&c, l0, &s, &mut sent, full_reply(&v, after.sequence)).unwrap();
        assert!(l0.draining_acked.load(Ordering::Acquire));
    }

    /// Design note 53: every heartbeat tells the routers how long this
    /// gateway's agents may be silent, as the policy says now.
    #[test]
    fn heartbeats_carry_the_policys_agent_silence() {
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let c = cluster(Duration::ZERO);
        let s = test_settings(&keys);
        let (mut seq, mut sent) = (0, VecDeque::new());
        let l0 = &c.links[0];
        assert_eq!(request(&c, l0, &s, &mut seq, &mut sent).agent_silence_ms, 0);
        let (ms, day) = (Duration::from_millis, Duration::from_secs(86_400));
        c.set_agent_silence(ms(2_000), day);
        assert_eq!(
            request(&c, l0, &s, &mut seq, &mut sent).agent_silence_ms,
            2_000
        );
        // Longer: at once.
        c.set_agent_silence(ms(7_500), day);
        assert_eq!(
            request(&c, l0, &s, &mut seq, &mut sent).agent_silence_ms,
            7_500
        );
        // Shorter: only once the sessions of the longer one have ended.
        let t0 = Instant::now();
        c.set_agent_silence_at(ms(3_000), day, t0);
        assert_eq!(c.agent_silence_at(t0 + day - ms(1)), 7_500);
        assert_eq!(c.agent_silence_at(t0 + day), 3_000);
        // A longer one meanwhile cancels a pending shorter one.
        c.set_agent_silence_at(ms(1_000), day, t0);
        c.set_agent_silence_at(ms(4_000), day, t0);
        assert_eq!(c.agent_silence_at(t0 + 2 * day), 4_000);
        // The wait is the longest lifetime any policy had, not the new one's.
        c.set_agent_silence_at(ms(1_000), ms(1), t0);
        assert_eq!(c.agent_silence_at(t0 + day - ms(1)), 4_000);
        assert_eq!(c.agent_silence_at(t0 + day), 1_000);
    }

    /// Issue 14: a delta (what changed since the view held) builds the
    /// same ring a full reply would; a delta from a view not held, or one
    /// that does not add up to the view it names, changes nothing and
    /// renews no lease.
    #[test]
    fn a_view_delta_applies_to_the_view_held_and_nothing_else() {
        use jvpn_proto::ring::{Member, RingParams, View};
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let c = cluster(Duration::ZERO);
        let s = test_settings(&keys);
        let member = |id: &str, i: u8| Member {
            node_id: NodeId::new(id).unwrap(),
            incarnation: Incarnation(1),
            addr: format!("10.0.0.{i}:7443").parse().unwrap(),
            weight: 1,
        };
        let view = |m: Vec<Member>| View::new(m, RingParams::default(), &keys).unwrap();
        let reply = |v: &View, sequence: u64| full_reply(v, sequence);
        let delta = |base: &View, v: &View, sequence: u64| {
            let (added, removed) = jvpn_proto::ring::view_delta(base, v);
            HeartbeatReply {
                members: added,
                members_removed: removed,
                delta_base_view_id: base.id().0.to_vec(),
                ..reply(v, sequence)
            }
        };
        let mut sent: VecDeque<_> = (1..=10)
            .map(|q| (q, Instant::now(), NodeState::Ready, false))
            .collect();
        let x = view(vec![member("g1", 1), member("g2", 2), member("g3", 3)]);
        // g3 left, g4 joined, g2 moved.
        let y = view(vec![member("g1", 1), member("g2", 9), member("g4", 4)]);
        let l0 = &c.links[0];
        let held = |l: &RouterLink| lock(&l.ring).clone().unwrap();
        on_reply(&c, l0, &s, &mut sent, reply(&x, 1)).unwrap();
        let d = delta(&x, &y, 2);
        assert!(
            d.members.len() == 2 && d.members_removed.len() == 2,
            "{d:?}"
        );
        on_reply(&c, l0, &s, &mut sent, d).unwrap();
        assert_eq!(*held(l0).view(), y);
        assert!(l0.lease_until.load(Ordering::Acquire) > 0);
        // A delta from a view this link does not hold: nothing changes.
        let z = view(vec![member("g1", 1)]);
        l0.lease_until.store(0, Ordering::Release);
        on_reply(&c, l0, &s, &mut sent, delta(&x, &z, 3)).unwrap();
        assert_eq!(held(l0).view().id(), y.id());
        assert_eq!(l0.lease_until.load(Ordering::Acquire), 0);
        // A delta that does not add up to the view it names (a member
        // left out): refused like a view built under another secret.
        let mut bad = delta(&y, &z, 4);
        bad.members_removed.pop();
        on_reply(&c, l0, &s, &mut sent, bad).unwrap();
        assert_eq!(held(l0).view().id(), y.id());
        assert_eq!(l0.lease_until.load(Ordering::Acquire), 0);
        // The next request asks for the whole view (naming none), so a
        // router whose delta does not add up cannot keep it from a lease.
        let mut seq = 10;
        assert!(
            request(&c, l0, &s, &mut seq, &mut sent)
                .known_view_id
                .is_empty()
        );
        // The good one applies.
        on_reply(&c, l0, &s, &mut sent, delta(&y, &z, 5)).unwrap();
        assert_eq!(*held(l0).view(), z);
        let req = request(&c, l0, &s, &mut seq, &mut sent);
        assert!(req.accepts_view_delta);
        assert_eq!(req.known_view_id, z.id().0.to_vec());
    }

    /// Issue 15: egress protects the cluster's listeners; membership knows
    /// them: the routers' endpoints given as addresses, and every member of
    /// every router's view, refreshed when a view changes.
    #[test]
    fn a_routers_wildcard_listeners_are_taken_at_the_address_we_reach_it() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let reported = [
            "0.0.0.0:443".to_owned(),
            "[::]:9100".to_owned(),
            "10.0.0.9:7100".to_owned(),
            "not an address".to_owned(),
        ];
        assert_eq!(
            router_listeners("http://10.0.0.9:7100/", &reported),
            [
                addr("10.0.0.9:443"),
                addr("10.0.0.9:7100"),
                addr("10.0.0.9:9100")
            ]
        );
        // A name we cannot map a wildcard to: only the explicit ones.
        assert_eq!(
            router_listeners("router.example:7100", &reported),
            [addr("10.0.0.9:7100")]
        );
    }

    #[test]
    fn the_cluster_listeners_are_the_endpoints_and_every_views_members() {
        use jvpn_proto::ring::{Member, RingParams, View};
        let keys = jvpn_proto::keys::ClusterSecret::new(1, [7; 32]).derive();
        let c = Cluster::new(
            NodeId::new("g1").unwrap(),
            Incarnation(1),
            &[
                "10.0.0.8:7100".into(),
                "http://10.0.0.9:7100/".into(),
                "router.example:7100".into(),
            ],
            Duration::from_millis(750),
            Duration::ZERO,
            keys.clone(),
            Instant::now(),
        );
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            *c.listeners(),
            [addr("10.0.0.8:7100"), addr("10.0.0.9:7100")]
        );
        let member = |id: &str, a: &str| Member {
            node_id: NodeId::new(id).unwrap(),
            incarnation: Incarnation(1),
            addr: addr(a),
            weight: 1,
        };
        let ring = |m: Vec<Member>| {
            Arc::new(Ring::new(
                View::new(m, RingParams::default(), &keys).unwrap(),
                &keys,
            ))
        };
        let until = Mono::from_millis(1_000);
        c.grant_for_test(0, "r1", ring(vec![member("g1", "10.0.1.1:7443")]), until);
        c.grant_for_test(1, "r2", ring(vec![member("g2", "10.0.1.2:7443")]), until);
        c.refresh_listeners();
        let all = c.listeners();
        for a in [
            "10.0.0.8:7100",
            "10.0.0.9:7100",
            "10.0.1.1:7443",
            "10.0.1.2:7443",
        ] {
            assert!(all.contains(&addr(a)), "{a} in {all:?}");
        }
        assert_eq!(all.len(), 4);
    }
}
