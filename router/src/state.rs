//! The router's shared state: the membership rules behind a mutex, the ring
//! published by atomic swap (readers never block on a membership change),
//! owner tags, admission tables, and the death signals that close spliced
//! connections when their gateway stops being alive.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use jvpn_proto::Mono;
use jvpn_proto::ids::{Incarnation, NodeId, SessionId, ViewId};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::ring::{Member, Ring, RingParams, View};
use jvpn_proto::token::{TOKEN_LEN, TokenKey, TokenKeyring};
use jvpn_runtime::admission::{Bucket, SourceKey, SourceLimiter, Verdict};
pub(crate) use jvpn_runtime::wire::lock;
use metrics::{counter, gauge, histogram};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Validated;
use crate::membership::{
    Heartbeat, HeartbeatVerdict, MemberStatus, Membership, NotForgotten, Routes,
};
use crate::metrics as m;
pub use crate::routing::ResumeRoute;
use crate::routing::{OwnerTags, route_token, takeover_route};

/// A gateway chosen for a HELLO.
#[derive(Clone, Debug)]
pub struct Placement {
    pub ring: Arc<Ring>,
    pub member: Member,
}

/// Per-source open connections with a hard capacity; unknown sources share
/// one overflow slot count when the table is full (fail closed).
#[derive(Debug)]
struct Concurrency {
    /// The `table` label of the overflow counter.
    name: &'static str,
    max_per_source: u32,
    capacity: usize,
    table: HashMap<SourceKey, u32>,
    overflow: u32,
    /// Sources that get a table entry even when it is full (issue 18 M3):
    /// configured ones (never forgotten) and those that proved to be
    /// gateways, with when they last did (at most [`RESERVED_LEARNED`]).
    reserved: HashMap<SourceKey, Option<Mono>>,
}

/// Learned reserved sources kept at most; the oldest is forgotten first.
const RESERVED_LEARNED: usize = 1_024;

/// Which slot a connection holds, to give it back.
#[derive(Clone, Copy, Debug)]
pub enum Slot {
    Source(SourceKey),
    Overflow,
}

impl Concurrency {
    fn new(name: &'static str, max_per_source: u32, capacity: usize) -> Self {
        Self {
            name,
            max_per_source,
            capacity,
            table: HashMap::new(),
            overflow: 0,
            reserved: HashMap::new(),
        }
    }

    /// `key` always gets an entry: `at = None` configured, else learned at `at`.
    fn reserve(&mut self, key: SourceKey, at: Option<Mono>) {
        match self.reserved.get_mut(&key) {
            Some(Some(t)) => *t = at.map_or(*t, |a| a.max(*t)),
            Some(None) => {}
            None => {
                let learned = self.reserved.values().filter(|v| v.is_some()).count();
                if at.is_some() && learned >= RESERVED_LEARNED {
                    let oldest = self
                        .reserved
                        .iter()
                        .filter_map(|(k, v)| v.map(|t| (t, *k)))
                        .min_by_key(|(t, _)| *t);
                    if let Some((_, k)) = oldest {
                        self.reserved.remove(&k);
                    }
                }
                self.reserved.insert(key, at);
            }
        }
    }

    fn acquire(&mut self, key: SourceKey) -> Option<Slot> {
        if let Some(n) = self.table.get_mut(&key) {
            if *n >= self.max_per_source {
                return None;
            }
            *n += 1;
            return Some(Slot::Source(key));
        }
        if self.table.len() < self.capacity || self.reserved.contains_key(&key) {
            self.table.insert(key, 1);
            return Some(Slot::Source(key));
        }
        counter!(m::OVERFLOW_BUCKET, "table" => self.name).increment(1);
        if self.overflow >= self.max_per_source {
            return None;
        }
        self.overflow += 1;
        Some(Slot::Overflow)
    }

    fn release(&mut self, slot: Slot) {
        match slot {
            Slot::Overflow => self.overflow = self.overflow.saturating_sub(1),
            Slot::Source(key) => {
                if let Some(n) = self.table.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.table.remove(&key);
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct Admission {
    rate: SourceLimiter,
    conc: Concurrency,
    per_gateway: PerGateway,
}

/// `[hello, resume]` buckets per gateway.
#[derive(Debug, Default)]
struct PerGateway(HashMap<NodeId, [Bucket; 2]>);

impl PerGateway {
    /// Past this many gateways, buckets that refilled are dropped before a
    /// new one is added: a full bucket is what a new one would be, and
    /// node ids come and go over a router's life.
    const PRUNE_AT: usize = 1024;

    /// One HELLO (`resume = false`) or RESUME to `node` at `[hello, resume]`
    /// per second.
    fn take(
        &mut self,
        node: &NodeId,
        resume: bool,
        rates: [f64; 2],
        now: Mono,
    ) -> Result<(), Duration> {
        let rate = rates[usize::from(resume)];
        if self.0.len() >= Self::PRUNE_AT && !self.0.contains_key(node) {
            self.0.retain(|_, b| {
                !(b[0].is_refilled(rates[0], rates[0], now)
                    && b[1].is_refilled(rates[1], rates[1], now))
            });
        }
        let buckets = self
            .0
            .entry(node.clone())
            .or_insert_with(|| [Bucket::full(rates[0], now), Bucket::full(rates[1], now)]);
        buckets[usize::from(resume)].take(rate, rate, now)
    }
}

/// Everything the router's tasks share.
pub struct RouterState {
    pub cfg: Validated,
    /// The admin token in force (a reload replaces it).
    pub admin_token: jvpn_runtime::admin::LiveToken,
    origin: Instant,
    keys: ClusterKeys,
    previous_keys: Option<ClusterKeys>,
    tokens: TokenKeyring,
    params: RingParams,
    /// The view with no member (nothing placeable), built once.
    empty_view: View,
    membership: Mutex<Membership>,
    ring: ArcSwapOption<Ring>,
    /// The member set the last tick found placeable, for `build_views`.
    want_view: watch::Sender<Vec<Member>>,
    /// The views before the current one (newest last), so that a gateway
    /// holding one of them gets a delta instead of the whole view, and
    /// deltas already computed for the current view (cleared with it).
    past_views: Mutex<PastViews>,
    /// `(key id, owner tag)` → member incarnation, under every key we hold:
    /// changed under the mutex (heartbeats of new incarnations, ticks),
    /// read by RESUME routing from `tag_view` without a lock.
    tags: Mutex<OwnerTags>,
    tag_view: ArcSwap<OwnerTags>,
    /// What HELLO placement and RESUME routing read of the membership,
    /// published after every change (events, and ticks with deaths or a
    /// router-wide change; no lock per connection).
    routes: ArcSwap<Routes>,
    deaths: Mutex<HashMap<(NodeId, Incarnation), watch::Sender<bool>>>,
    /// Per member, how long its agents may be silent (its heartbeats'
    /// `agent_silence_ms`): changed when a member reports a new value,
    /// read without a lock by every splice to it (design note 53).
    agent_silences: ArcSwap<HashMap<(NodeId, Incarnation), Duration>>,
    /// Extra ticks asked for (deaths falling due between steps), in order.
    early_ticks: Mutex<std::collections::VecDeque<Instant>>,
    early_tick_added: tokio::sync::Notify,
    /// What the last tick found, to skip what only a change needs.
    last_status: Mutex<LastStatus>,
    admission: Mutex<Admission>,
    /// Open membership-port connections per source (before TLS).
    membership_conns: Mutex<Concurrency>,
    /// Splices per routing token (replays aimed at one owner).
    token_uses: Mutex<crate::replay::TokenUses>,
    /// `[admission]` as last (re)loaded.
    limits: ArcSwap<crate::config::AdmissionSection>,
    pub active: AtomicUsize,
    /// Connections past the cap that may still be answered (see
    /// [`status_room`]).
    status_room: AtomicUsize,
    /// This router's listening addresses, as bound (told to gateways with
    /// every view, for their egress policy).
    listeners: ArcSwap<Vec<String>>,
    draining: AtomicBool,
    ring_changes: AtomicU64,
}

/// An extra tick comes this long after the death it is for falls due
/// (verdicts are strictly after).
const EARLY_TICK_SLACK: Duration = Duration::from_millis(2);

/// Deaths falling due this close together share one extra tick (at most
/// five extra ticks per 50 ms step).
const EARLY_TICK_SHARED: Duration = Duration::from_millis(10);

/// Adds `at` to the ordered queue of extra ticks unless one within
/// [`EARLY_TICK_SHARED`] is there already; true if added. In order even
/// when asked out of order (a close recorded late by a preempted thread).
fn queue_early_tick(q: &mut std::collections::VecDeque<Instant>, at: Instant) -> bool {
    let near = |t: &Instant| {
        t.saturating_duration_since(at) < EARLY_TICK_SHARED
            && at.saturating_duration_since(*t) < EARLY_TICK_SHARED
    };
    let i = q.partition_point(|t| *t < at);
    if q.get(i).is_some_and(near) || i.checked_sub(1).and_then(|j| q.get(j)).is_some_and(near) {
        return false;
    }
    q.insert(i, at);
    true
}

/// The statuses a tick last published, and the alive incarnations among
/// them (death signals are checked against it).
#[derive(Default)]
struct LastStatus {
    /// None before the first tick (which then writes every gauge, at 0
    /// for a router without members).
    status: Option<Vec<MemberStatus>>,
    alive: HashSet<(NodeId, Incarnation)>,
}

/// Recent views and the deltas from them to the current one.
#[derive(Default)]
struct PastViews {
    views: std::collections::VecDeque<Arc<Ring>>,
    /// (base, to) → the delta, newest last (bounded).
    deltas: Vec<((ViewId, ViewId), Arc<ViewDelta>)>,
}

/// Views a router keeps for deltas: gateways lag a change by a heartbeat
/// or two, so a few are plenty; older ones get the whole view.
const PAST_VIEWS: usize = 8;

impl PastViews {
    fn push(&mut self, ring: Arc<Ring>) {
        if self.views.len() >= PAST_VIEWS {
            self.views.pop_front();
        }
        self.views.push_back(ring);
    }
}

/// What changed from a past view to the current one, as replies carry it.
#[derive(Debug)]
pub struct ViewDelta {
    pub added: Vec<jvpn_proto::pb::membership::ViewMember>,
    pub removed: Vec<jvpn_proto::pb::membership::ViewMember>,
}

impl std::fmt::Debug for RouterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterState")
            .field("router_id", &self.cfg.router_id)
            .finish()
    }
}

impl RouterState {
    pub fn new(cfg: Validated) -> Arc<Self> {
        let keys = cfg.secret.derive();
        let previous_keys = cfg.previous_secret.as_ref().map(|s| s.derive());
        let tokens = TokenKeyring::new(
            TokenKey::new(&keys),
            previous_keys.as_ref().map(TokenKey::new),
        );
        let a = &cfg.raw.admission;
        let admission = Admission {
            rate: SourceLimiter::new(
                a.per_source_rate_per_s,
                a.per_source_burst,
                a.source_table_capacity,
                Mono::ZERO,
            ),
            conc: Concurrency::new(
                "concurrency",
                a.per_source_max_connections,
                concurrency_capacity(a),
            ),
            per_gateway: PerGateway::default(),
        };
        let mc = &cfg.raw.membership;
        let mut membership_conns =
            Concurrency::new("membership", mc.max_connections_per_source, mc.max_sources);
        for ip in &mc.reserved_sources {
            membership_conns.reserve(SourceKey::from(*ip), None);
        }
        let params = RingParams {
            vnodes_per_weight: cfg.raw.cluster.vnodes_per_weight,
        };
        let membership = Membership::new(cfg.membership(), Mono::ZERO);
        let membership_routes = membership.routes();
        let empty_view = View::new(Vec::new(), params, &keys)
            .unwrap_or_else(|_| unreachable!("an empty view with validated parameters"));
        let (fitted, room) = within_open_files(a, cfg.raw.splice.mode);
        Arc::new(Self {
            admin_token: jvpn_runtime::admin::LiveToken::new(cfg.admin_token.clone()),
            params,
            empty_view,
            membership: Mutex::new(membership),
            origin: Instant::now(),
            keys,
            previous_keys,
            tokens,
            ring: ArcSwapOption::empty(),
            want_view: watch::channel(Vec::new()).0,
            past_views: Mutex::new(PastViews::default()),
            tags: Mutex::new(OwnerTags::default()),
            tag_view: ArcSwap::from_pointee(OwnerTags::default()),
            // From the start: before the first tick, an unknown owner is
            // `owner_unreachable` (warm-up), never `owner_lost`.
            routes: ArcSwap::from_pointee(membership_routes),
            agent_silences: ArcSwap::from_pointee(HashMap::new()),
            deaths: Mutex::new(HashMap::new()),
            last_status: Mutex::default(),
            early_ticks: Mutex::default(),
            early_tick_added: tokio::sync::Notify::new(),
            admission: Mutex::new(admission),
            membership_conns: Mutex::new(membership_conns),
            token_uses: Mutex::new(crate::replay::TokenUses::default()),
            limits: ArcSwap::from_pointee(fitted),
            active: AtomicUsize::new(0),
            status_room: AtomicUsize::new(room),
            listeners: ArcSwap::from_pointee(Vec::new()),
            draining: AtomicBool::new(false),
            ring_changes: AtomicU64::new(0),
            cfg,
        })
    }

    /// Now on this router's monotonic clock: read here, passed to the
    /// membership rules, which read no clock.
    pub fn now(&self) -> Mono {
        Mono::between(self.origin, Instant::now())
    }

    /// The previous cluster key during a secret rotation.
    pub fn previous_keys(&self) -> Option<&ClusterKeys> {
        self.previous_keys.as_ref()
    }

    pub fn keys(&self) -> &ClusterKeys {
        &self.keys
    }

    pub fn params(&self) -> RingParams {
        self.params
    }

    pub fn ring(&self) -> Option<Arc<Ring>> {
        self.ring.load_full()
    }

    pub fn is_unhealthy(&self) -> bool {
        lock(&self.membership).is_unhealthy()
    }

    /// Records the addresses this router listens on.
    pub fn set_listeners(&self, addrs: &[std::net::SocketAddr]) {
        self.listeners
            .store(Arc::new(addrs.iter().map(ToString::to_string).collect()));
    }

    /// The addresses this router listens on, as bound.
    pub fn listeners(&self) -> Arc<Vec<String>> {
        self.listeners.load_full()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    // ---- membership -------------------------------------------------------

    /// Applies `event` to the membership and publishes the routing
    /// snapshot again if `node`'s entry changed.
    fn membership_event<T>(
        &self,
        node: &NodeId,
        event: impl FnOnce(&mut Membership, Mono) -> T,
    ) -> T {
        let now = self.now();
        let mut mship = lock(&self.membership);
        let before = mship.route_entry_of(node);
        let out = event(&mut mship, now);
        if mship.route_entry_of(node) != before {
            self.routes.store(Arc::new(mship.routes()));
        }
        out
    }

    pub fn on_heartbeat(&self, hb: &Heartbeat) -> HeartbeatVerdict {
        let verdict = self.membership_event(&hb.node_id, |m, now| m.on_heartbeat(now, hb));
        // Owner tags cost a keyed hash each: computed once per incarnation,
        // not per heartbeat (whenever they are not known: a tick may have
        // dropped those of an incarnation that joined while it ran).
        if verdict == HeartbeatVerdict::Accepted
            && !self.tag_view.load().knows(&hb.node_id, hb.incarnation)
        {
            let keys = std::iter::once(&self.keys).chain(self.previous_keys.as_ref());
            let mut tags = lock(&self.tags);
            tags.learn(keys, &hb.node_id, hb.incarnation);
            self.tag_view.store(Arc::new(tags.clone()));
        }
        verdict
    }

    /// An operator forgets a gateway that is gone for good
    /// (`POST /members/<node_id>/forget`; see [`Membership::forget`]).
    pub fn forget(&self, node: &NodeId) -> Result<Incarnation, NotForgotten> {
        let r = self.membership_event(node, |m, now| m.forget(now, node));
        if let Ok(inc) = r {
            warn!(node = %node, incarnation = %inc, "gateway forgotten at an operator's request");
            // Its series go at an extra tick now, not at the next step
            // (the ticker's: two ticks at once could publish out of order).
            self.tick_at(Instant::now());
        }
        r
    }

    pub fn on_stream_opened(&self, node: &NodeId, incarnation: Incarnation) {
        self.membership_event(node, |m, _| m.on_stream_opened(node, incarnation));
    }

    pub fn on_stream_closed(&self, node: &NodeId, incarnation: Incarnation) {
        let due = self.membership_event(node, |m, now| m.on_stream_closed(now, node, incarnation));
        if let Some(due) = due {
            self.tick_at(self.origin + due.saturating_since(Mono::ZERO) + EARLY_TICK_SLACK);
        }
    }

    /// Asks the ticker for an extra tick at `at`: a death due between two
    /// 50 ms steps is then declared when due, not up to a step later.
    /// Deadlines within [`EARLY_TICK_SHARED`] of one already asked for
    /// share its tick, so a mass disconnect costs at most a few extra
    /// ticks per step, not one per member.
    fn tick_at(&self, at: Instant) {
        if queue_early_tick(&mut lock(&self.early_ticks), at) {
            self.early_tick_added.notify_one();
        }
    }

    /// The earliest extra tick asked for, if any.
    pub fn next_early_tick(&self) -> Option<Instant> {
        lock(&self.early_ticks).front().copied()
    }

    /// Resolves when an extra tick was asked for.
    pub async fn early_tick_added(&self) {
        self.early_tick_added.notified().await;
    }

    /// Forgets the extra ticks a tick at `now` served.
    pub fn early_ticks_served(&self, now: Instant) {
        let mut q = lock(&self.early_ticks);
        while q.front().is_some_and(|t| *t <= now) {
            q.pop_front();
        }
    }

    pub fn on_connect(&self, node: &NodeId, incarnation: Incarnation, ok: bool) {
        self.membership_event(node, |m, now| m.on_connect(now, node, incarnation, ok));
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        lock(&self.membership).status(self.now())
    }

    /// Members that died unreachable and must be probed before they return.
    pub fn probes_due(&self) -> Vec<(NodeId, Incarnation, std::net::SocketAddr)> {
        lock(&self.membership).probes_due(self.now())
    }

    fn is_placeable(&self, node: &NodeId, incarnation: Incarnation) -> bool {
        self.routes
            .load()
            .is_placeable(self.now(), node, incarnation)
    }

    /// One 50 ms step: death verdicts, ring rebuild on a view change, and
    /// closing the connections of members that stopped being alive.
    pub fn tick(&self) {
        let now = self.now();
        let (died, placeable, status, unhealthy, tombstones) = {
            let mut mship = lock(&self.membership);
            let died = mship.tick(now);
            // Time-driven changes (deaths, self-suspicion, warm-up's end)
            // reach routing here; events publish their own. Rebuilding the
            // snapshot every 50 ms regardless cost a thousand inserts a
            // tick at 1,000 members.
            if mship.tick_publishes(&died, &self.routes.load()) {
                self.routes.store(Arc::new(mship.routes()));
            }
            let status = mship.status(now);
            // Forget tags of incarnations nobody routes to any more, under
            // the membership lock: an incarnation that joins meanwhile is
            // then either in this list or learned after it.
            let mut tags = lock(&self.tags);
            let silences = self.agent_silences.load().len();
            if tags.len() > status.len() || silences > status.len() {
                let current: HashSet<(NodeId, Incarnation)> = status
                    .iter()
                    .map(|s| (s.node_id.clone(), s.incarnation))
                    .collect();
                if tags.retain(&current) {
                    self.tag_view.store(Arc::new(tags.clone()));
                }
                if silences > status.len() {
                    self.agent_silences.rcu(|m| {
                        let mut m = HashMap::clone(m);
                        m.retain(|k, _| current.contains(k));
                        m
                    });
                }
            }
            drop(tags);
            (
                died,
                mship.placeable_members(now),
                status,
                mship.is_unhealthy(),
                mship.tombstone_count(),
            )
        };
        for (node, inc) in &died {
            counter!(m::MEMBER_DEATHS).increment(1);
            warn!(node = %node, incarnation = %inc, "gateway is no longer alive");
        }
        // The ring is built off the tick (see `build_views`): at 1,000
        // members a build takes tens of ms, which would delay the next
        // tick's death verdicts and count as the router's own lateness.
        self.want_view.send_if_modified(|w| {
            let changed = *w != placeable;
            if changed {
                *w = placeable;
            }
            changed
        });
        // What follows depends on the statuses only: skipped while they
        // stay the same (the steady state), except for death signals
        // registered since, which are checked against the last alive set.
        let mut last = lock(&self.last_status);
        if last.status.as_ref() != Some(&status) {
            last.alive = status
                .iter()
                .filter(|s| s.alive)
                .map(|s| (s.node_id.clone(), s.incarnation))
                .collect();
            let n_place = status.iter().filter(|s| s.placeable).count();
            gauge!(m::MEMBERS, "state" => "known").set(status.len() as f64);
            gauge!(m::MEMBERS, "state" => "alive").set(last.alive.len() as f64);
            gauge!(m::MEMBERS, "state" => "placeable").set(n_place as f64);
            last.status = Some(status);
        }
        {
            let mut deaths = lock(&self.deaths);
            deaths.retain(|k, tx| {
                if last.alive.contains(k) {
                    return true;
                }
                tx.send_replace(true);
                false
            });
        }
        drop(last);
        gauge!(m::UNHEALTHY).set(if unhealthy { 1.0 } else { 0.0 });
        gauge!(m::TOMBSTONES).set(tombstones as f64);
        gauge!(m::CONNECTIONS_OPEN).set(self.active.load(Ordering::Relaxed) as f64);
    }

    /// The per-gateway gauges as of the last tick, one line per node id
    /// this router knows (see [`m::render_member_gauges`]).
    pub fn member_gauges(&self) -> String {
        let last = lock(&self.last_status);
        let Some(status) = last.status.as_ref() else {
            return String::new();
        };
        let mut per_node: Vec<(String, bool, bool)> = Vec::with_capacity(status.len());
        // Sorted by node id: one line per node id.
        for s in status {
            match per_node.last_mut() {
                Some(l) if l.0 == s.node_id.as_str() => {
                    l.1 |= s.alive;
                    l.2 |= s.placeable;
                }
                _ => per_node.push((s.node_id.to_string(), s.alive, s.placeable)),
            }
        }
        drop(last);
        m::render_member_gauges(&per_node)
    }

    /// Builds and publishes the ring of every member set the tick asks for
    /// (the latest one when several came during a build); runs until
    /// aborted.
    pub async fn build_views(self: Arc<Self>) {
        let mut want = self.want_view.subscribe();
        while want.changed().await.is_ok() {
            let members = want.borrow_and_update().clone();
            let state = self.clone();
            let _ = tokio::task::spawn_blocking(move || state.publish_view(members)).await;
        }
    }

    fn publish_view(&self, placeable: Vec<Member>) {
        let current = self.ring.load();
        let same = match current.as_ref() {
            Some(r) => r.view().members() == placeable.as_slice(),
            None => placeable.is_empty(),
        };
        if same {
            return;
        }
        if let Some(old) = current.as_ref() {
            lock(&self.past_views).push(old.clone());
        }
        if placeable.is_empty() {
            self.ring.store(None);
        } else {
            let t0 = std::time::Instant::now();
            match View::new(placeable, self.params, &self.keys) {
                Ok(view) => {
                    self.ring.store(Some(Arc::new(Ring::new(view, &self.keys))));
                    histogram!(m::RING_BUILD_SECONDS).record(t0.elapsed().as_secs_f64());
                }
                Err(e) => {
                    // Weights and ids were validated on admission; keep the old ring.
                    warn!(error = %e, "invalid view; keeping the previous ring");
                    return;
                }
            }
        }
        self.ring_changes.fetch_add(1, Ordering::Relaxed);
        counter!(m::RING_CHANGES).increment(1);
        let members = self
            .ring
            .load()
            .as_ref()
            .map_or(0, |r| r.view().members().len());
        gauge!(m::RING_MEMBERS).set(members as f64);
        info!(members, "ring changed");
    }

    pub fn ring_changes(&self) -> u64 {
        self.ring_changes.load(Ordering::Relaxed)
    }

    /// The view as heartbeat replies carry it (empty when nothing is placeable).
    pub fn view(&self) -> View {
        match self.ring.load().as_ref() {
            Some(r) => r.view().clone(),
            None => self.empty_view.clone(),
        }
    }

    /// The current view, borrowed: `f` runs with it, nothing is copied
    /// (per heartbeat reply; [`RouterState::view`] copies every member).
    pub fn with_view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        match self.ring.load().as_ref() {
            Some(r) => f(r.view()),
            None => f(&self.empty_view),
        }
    }

    /// The members added to and removed from the view whose id is `base`
    /// to make `current`, if `base` is a recent view: computed once per
    /// pair, shared by every reply that needs it.
    pub fn view_delta(&self, base: &[u8], current: &View) -> Option<Arc<ViewDelta>> {
        let mut past = lock(&self.past_views);
        let to = current.id();
        if let Some(d) = past
            .deltas
            .iter()
            .find(|((b, t), _)| *t == to && b.0.as_slice() == base)
        {
            return Some(d.1.clone());
        }
        let old = past
            .views
            .iter()
            .rev()
            .find(|r| r.view().id().0.as_slice() == base)?
            .clone();
        // A linear merge of two sorted lists (under 0.1 ms at 1,000).
        let (added, removed) = jvpn_proto::ring::view_delta(old.view(), current);
        let d = Arc::new(ViewDelta { added, removed });
        if past.deltas.len() >= 2 * PAST_VIEWS {
            past.deltas.remove(0);
        }
        past.deltas.push(((old.view().id(), to), d.clone()));
        Some(d)
    }

    /// The current view's id, without copying the view (per RESUME).
    pub fn view_id(&self) -> ViewId {
        match self.ring.load().as_ref() {
            Some(r) => r.view().id(),
            None => self.empty_view.id(),
        }
    }

    /// Records what a member's heartbeats say of its agents' silence
    /// (0: nothing; an older gateway).
    pub fn set_agent_silence(&self, node: &NodeId, incarnation: Incarnation, ms: u32) {
        let key = (node.clone(), incarnation);
        self.agent_silences.rcu(|m| {
            let mut m = HashMap::clone(m);
            if ms == 0 {
                m.remove(&key);
            } else {
                m.insert(key.clone(), Duration::from_millis(u64::from(ms)));
            }
            m
        });
    }

    /// How long bytes spliced towards an agent of this member may stay
    /// unacknowledged before the splice is given up, if it said.
    pub fn agent_silence(&self, node: &NodeId, incarnation: Incarnation) -> Option<Duration> {
        self.agent_silences
            .load()
            .get(&(node.clone(), incarnation))
            .copied()
    }

    /// Signal that resolves when `(node, incarnation)` stops being alive.
    pub fn death_signal(&self, node: &NodeId, incarnation: Incarnation) -> watch::Receiver<bool> {
        lock(&self.deaths)
            .entry((node.clone(), incarnation))
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    // ---- routing ----------------------------------------------------------

    /// A member to send a HELLO to (`routing::place_hello`): the owner of a
    /// fresh random key among the members that hold a view containing
    /// themselves and may take HELLOs. `None`: nothing can take a HELLO.
    pub fn place_hello(&self) -> Option<Placement> {
        self.place(None)
    }

    /// The single retry after `failed` could not be reached: placed the
    /// same way on the current ring, on any member but that one.
    pub fn place_retry(&self, failed: &Placement) -> Option<Placement> {
        self.place(Some(&failed.member.node_id))
    }

    fn place(&self, not: Option<&NodeId>) -> Option<Placement> {
        let ring = self.ring.load_full()?;
        let now = self.now();
        let routes = self.routes.load();
        let mut rng = rand::rng();
        let draw = || {
            let mut key = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rng, &mut key);
            SessionId::from_bytes(key)
        };
        let i = crate::routing::place_hello(&ring, draw, |m| {
            Some(&m.node_id) != not && routes.hello_ready(now, &m.node_id, m.incarnation)
        })?;
        let member = ring.view().members()[i].clone();
        Some(Placement { ring, member })
    }

    /// Whether a chosen member would still be chosen (it may have turned
    /// draining, died or left the view during the connect to it).
    pub fn still_placeable(&self, p: &Placement) -> bool {
        let (node, inc) = (&p.member.node_id, p.member.incarnation);
        self.routes.load().hello_ready(self.now(), node, inc)
    }

    /// Counts a HELLO spliced to a member that stopped being placeable
    /// after its last check (must stay 0 in every test).
    pub fn check_placeable(&self, p: &Placement) {
        if !self.is_placeable(&p.member.node_id, p.member.incarnation) {
            counter!(m::ROUTED_TO_UNPLACEABLE).increment(1);
        }
    }

    pub fn route_resume(&self, key_id: u8, token: &[u8; TOKEN_LEN]) -> ResumeRoute {
        let now = self.now();
        let routed = route_token(
            &self.tokens,
            |key_id, tag| self.tag_view.load().owner(key_id, tag),
            |owner| self.routes.load().route(now, owner),
            key_id,
            token,
        );
        if routed.route == ResumeRoute::Lost
            && self.cfg.raw.cluster.takeover
            && let Some(sid) = &routed.session_id
        {
            let Some(ring) = self.ring.load_full() else {
                // No ring yet (a router that just started): ask again.
                return ResumeRoute::Unreachable;
            };
            let routes = self.routes.load();
            return takeover_route(&ring, sid, |n, i| routes.hello_ready(now, n, i));
        }
        if let (ResumeRoute::Splice { node, .. }, Some(sid)) = (&routed.route, &routed.session_id)
            && let Some(ring) = self.ring.load().as_ref()
            && ring.owner(sid).is_some_and(|m| m.node_id != *node)
        {
            // Kept on its owner across a ring change: expected after
            // a scale-out, visible to operators.
            counter!(m::RESUMES_OFF_SHARD).increment(1);
        }
        routed.route
    }

    // ---- admission ----------------------------------------------------------

    /// Router-wide connection cap in force.
    pub fn max_connections(&self) -> usize {
        self.limits.load().max_connections
    }

    /// Connections past the cap that may still wait for their answer.
    pub fn status_room(&self) -> usize {
        self.status_room.load(Ordering::Relaxed)
    }

    /// A reload's `[admission]`: known sources keep their buckets and slots.
    pub fn reconfigure_admission(&self, a: &crate::config::AdmissionSection) {
        let mut adm = lock(&self.admission);
        adm.rate.reconfigure(
            a.per_source_rate_per_s,
            a.per_source_burst,
            a.source_table_capacity,
        );
        adm.conc.max_per_source = a.per_source_max_connections;
        adm.conc.capacity = concurrency_capacity(a);
        let (fitted, room) = within_open_files(a, self.cfg.raw.splice.mode);
        self.status_room.store(room, Ordering::Relaxed);
        self.limits.store(Arc::new(fitted));
    }

    /// Per-source rate and concurrency at accept. `Err(retry)` refuses.
    pub fn admit(&self, source: SourceKey) -> Result<Slot, Duration> {
        let now = self.now();
        let mut a = lock(&self.admission);
        let v = a.rate.check(source, now);
        if v.overflow() {
            counter!(m::OVERFLOW_BUCKET, "table" => "rate").increment(1);
        }
        match v {
            Verdict::Limit(d) | Verdict::LimitOverflow(d) => Err(d),
            _ => a.conc.acquire(source).ok_or(Duration::from_millis(500)),
        }
    }

    pub fn release(&self, slot: Slot) {
        lock(&self.admission).conc.release(slot);
    }

    /// A membership-port connection from `source`, before its TLS handshake;
    /// `None` refuses it (per-source cap, or the table and overflow full).
    pub fn admit_membership(&self, source: SourceKey) -> Option<Slot> {
        lock(&self.membership_conns).acquire(source)
    }

    pub fn release_membership(&self, slot: Slot) {
        lock(&self.membership_conns).release(slot);
    }

    /// `source` opened an authenticated heartbeat stream: from now on it
    /// gets a membership connection even when strangers filled the table.
    pub fn reserve_membership_source(&self, source: SourceKey) {
        let now = self.now();
        lock(&self.membership_conns).reserve(source, Some(now));
    }

    /// May this routing token (one that opened) be spliced once more for
    /// this client address?
    pub fn token_budget(
        &self,
        token: &[u8],
        source: std::net::IpAddr,
    ) -> Result<(), crate::replay::TokenRefusal> {
        let now = self.now();
        // The same grouping as admission (IPv6 per /64).
        // A family tag keeps an IPv4 address and an IPv6 prefix apart.
        let mut key = [0u8; 9];
        match SourceKey::from(source) {
            SourceKey::V4(a) => key[1..5].copy_from_slice(&a.to_le_bytes()),
            SourceKey::V6(prefix) => {
                key[0] = 6;
                key[1..].copy_from_slice(&prefix.to_le_bytes());
            }
        }
        lock(&self.token_uses).check(token, &key, now)
    }

    /// The per-gateway HELLO (`resume = false`) or RESUME budget.
    pub fn gateway_budget(&self, node: &NodeId, resume: bool) -> Result<(), Duration> {
        let now = self.now();
        let a = self.limits.load();
        let rates = [a.hello_per_gateway_per_s, a.resume_per_gateway_per_s];
        lock(&self.admission)
            .per_gateway
            .take(node, resume, rates, now)
    }
}

/// Descriptors one spliced connection may hold: the client's and the
/// gateway's sockets, and in pipe mode a pipe (two ends) per direction
/// while bytes flow.
fn descriptors_per_connection(mode: crate::splice::Mode) -> u64 {
    match mode {
        crate::splice::Mode::Copy => 2,
        crate::splice::Mode::Pipe => 6,
    }
}

/// The connections an open-file limit of `open_files` can hold in `mode`,
/// after a reserve for everything else (listeners, heartbeat streams from
/// every gateway, the admin port, logs, the runtime's own).
pub fn connections_within(open_files: u64, mode: crate::splice::Mode) -> usize {
    let n = open_files.saturating_sub(reserve(open_files)) / descriptors_per_connection(mode);
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// Descriptors kept out of the connection budget.
fn reserve(open_files: u64) -> u64 {
    256 + open_files / 16
}

/// How many connections past a cap of `max` may wait for their
/// `overloaded` answer to be read (up to 250 ms each, a descriptor each):
/// what the limit has left beyond the admitted connections and three
/// quarters of the reserve, so a flood past the cap cannot take the
/// descriptors heartbeat streams and the admin port need. Past it they
/// get the answer without the wait.
pub fn status_room(open_files: u64, max: usize, mode: crate::splice::Mode) -> usize {
    let admitted = u64::try_from(max)
        .unwrap_or(u64::MAX)
        .saturating_mul(descriptors_per_connection(mode));
    let left = open_files
        .saturating_sub(admitted)
        .saturating_sub(reserve(open_files) * 3 / 4);
    usize::try_from(left).unwrap_or(usize::MAX)
}

/// `a` with `max_connections` lowered to what the process's open-file
/// limit holds: past it accepts fail (EMFILE) and clients would wait in
/// the listen backlog with no answer, where under the cap they are
/// answered `overloaded` at once. Warns when it lowers the cap, naming the
/// key (at start, and at each reload that asks for more). Also returns
/// the [`status_room`] past that cap (64 if the limit cannot be read).
fn within_open_files(
    a: &crate::config::AdmissionSection,
    mode: crate::splice::Mode,
) -> (crate::config::AdmissionSection, usize) {
    use nix::sys::resource::{Resource, getrlimit};
    let mut fitted = a.clone();
    let mut room = 64;
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        fitted.max_connections = a.max_connections.min(connections_within(soft, mode));
        room = status_room(soft, fitted.max_connections, mode);
    }
    if fitted.max_connections < a.max_connections {
        warn!(
            configured = a.max_connections,
            admitted = fitted.max_connections,
            "admission.max_connections is more than the open-file limit can hold; \
             raise the limit (LimitNOFILE) to admit more"
        );
    }
    metrics::gauge!(crate::metrics::MAX_CONNECTIONS).set(fitted.max_connections as f64);
    (fitted, room)
}

/// Sources the table of open connections per source holds. An entry lives
/// while its source has a connection open, so `max_connections` bounds the
/// table anyway: smaller, it would send every source past it to the
/// overflow pool long before the router is full.
fn concurrency_capacity(a: &crate::config::AdmissionSection) -> usize {
    a.source_table_capacity.max(a.max_connections)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap an open-file limit allows: two descriptors a connection
    /// (six in pipe mode) after the reserve; a limit too small for one
    /// still admits one (and accepts then fail, as before).
    #[test]
    fn the_open_file_limit_bounds_the_connections() {
        use crate::splice::Mode;
        assert_eq!(connections_within(512, Mode::Copy), 112);
        assert_eq!(connections_within(512, Mode::Pipe), 37);
        assert_eq!(connections_within(20_000, Mode::Copy), 9_247);
        assert!(connections_within(1_048_576, Mode::Copy) > 100_000);
        assert_eq!(connections_within(100, Mode::Copy), 1);
        // Past the cap: answered with a wait while three quarters of the
        // reserve stay free.
        assert_eq!(status_room(512, 112, Mode::Copy), 72);
        assert_eq!(status_room(1_048_576, 100_000, Mode::Copy), 799_232);
    }

    fn key(i: u32) -> SourceKey {
        SourceKey::V4(i)
    }

    /// Extra ticks: near deadlines share one, the queue stays ordered
    /// whatever order they come in, far ones each get their own.
    #[test]
    fn early_ticks_are_shared_and_ordered() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut q = std::collections::VecDeque::new();
        assert!(queue_early_tick(&mut q, ms(100)));
        assert!(!queue_early_tick(&mut q, ms(105)), "within 10 ms: shared");
        assert!(!queue_early_tick(&mut q, ms(95)), "also before it");
        assert!(queue_early_tick(&mut q, ms(130)));
        assert!(
            queue_early_tick(&mut q, ms(60)),
            "late and earlier: its own"
        );
        assert!(queue_early_tick(&mut q, ms(115)), "between, far from both");
        assert_eq!(q, [ms(60), ms(100), ms(115), ms(130)]);
        // A thousand closes over half a second: at most one tick per 10 ms.
        let mut q = std::collections::VecDeque::new();
        let added = (0..1000u64)
            .filter(|i| queue_early_tick(&mut q, t0 + Duration::from_micros(i * 500)))
            .count();
        assert!(added <= 51, "{added} extra ticks");
    }

    /// Gateways come and go over a router's life (new node ids at each
    /// scale-out): the per-gateway buckets of those gone must not pile up.
    #[test]
    fn per_gateway_buckets_do_not_pile_up() {
        let mut p = PerGateway::default();
        let rates = [100.0, 200.0];
        let node = |i: usize| NodeId::new(&format!("g{i}")).unwrap();
        for i in 0..10_000 {
            // One HELLO each, a second apart: each bucket refilled long
            // before the next gateway is seen.
            let now = Mono::from_millis(i as u64 * 1000);
            assert!(p.take(&node(i), false, rates, now).is_ok());
        }
        assert!(p.0.len() <= PerGateway::PRUNE_AT, "{} buckets", p.0.len());
        // A bucket in use keeps its debt through a prune.
        let mut p = PerGateway::default();
        let now = Mono::from_millis(0);
        for _ in 0..100 {
            let _ = p.take(&node(0), false, rates, now);
        }
        assert!(p.take(&node(0), false, rates, now).is_err());
        for i in 1..=PerGateway::PRUNE_AT + 1 {
            let _ = p.take(&node(i), false, rates, now);
        }
        assert!(
            p.take(&node(0), false, rates, now).is_err(),
            "debt forgotten"
        );
    }

    #[test]
    fn concurrency_table_fails_closed_when_full() {
        let mut c = Concurrency::new("test", 2, 2);
        // Known sources keep their own limit.
        let a1 = c.acquire(key(1)).unwrap();
        let _a2 = c.acquire(key(1)).unwrap();
        assert!(c.acquire(key(1)).is_none(), "per-source cap");
        let _b = c.acquire(key(2)).unwrap();
        // Table full: unknown sources share one overflow allowance, then are refused.
        assert!(matches!(c.acquire(key(3)), Some(Slot::Overflow)));
        assert!(matches!(c.acquire(key(4)), Some(Slot::Overflow)));
        assert!(
            c.acquire(key(5)).is_none(),
            "overflow exhausted: refuse, never admit"
        );
        // Known sources are unaffected by the overflow being used up.
        c.release(a1);
        assert!(matches!(c.acquire(key(1)), Some(Slot::Source(_))));
        // Releasing the last slot of a source frees its table entry.
        c.release(Slot::Source(key(2)));
        assert!(!c.table.contains_key(&key(2)));
        assert!(matches!(c.acquire(key(6)), Some(Slot::Source(_))));
    }

    /// Issue 18 M3: strangers filling the membership port's source table
    /// cannot keep a known gateway out.
    #[test]
    fn reserved_sources_get_in_when_strangers_filled_the_table() {
        let mut c = Concurrency::new("test", 2, 2);
        c.reserve(key(100), None);
        c.reserve(key(101), Some(Mono::from_millis(5)));
        let _s1 = c.acquire(key(1)).unwrap();
        let _s2 = c.acquire(key(2)).unwrap();
        let _o1 = c.acquire(key(3)).unwrap();
        let _o2 = c.acquire(key(4)).unwrap();
        assert!(c.acquire(key(5)).is_none(), "strangers: full");
        for k in [100, 101] {
            assert!(matches!(c.acquire(key(k)), Some(Slot::Source(_))), "{k}");
            assert!(c.acquire(key(k)).is_some());
            assert!(c.acquire(key(k)).is_none(), "still the per-source cap");
        }
        // Learned reservations are bounded; configured ones are never dropped.
        for i in 0..(RESERVED_LEARNED as u32 + 10) {
            c.reserve(key(10_000 + i), Some(Mono::from_millis(10 + u64::from(i))));
        }
        assert_eq!(c.reserved.len(), RESERVED_LEARNED + 1);
        assert!(c.reserved.contains_key(&key(100)));
        assert!(
            !c.reserved.contains_key(&key(101)),
            "the oldest learned one went"
        );
    }
}
