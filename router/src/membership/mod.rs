//! The router's view of the gateways (DESIGN §4), as sans-IO logic.
//!
//! The async shell feeds it heartbeats, stream closures, connect results and
//! a 50 ms tick, all stamped with `now`; it answers which members are alive,
//! which are placeable (they form the ring), and how a RESUME for a given
//! owner must be answered. It never reads a clock.
//!
//! Per `(node_id, incarnation)`:
//! - **alive**: a heartbeat within `failure_timeout`, its stream not closed
//!   for longer than `2 × interval`, and not unreachable for
//!   `3 × failure_timeout`;
//! - **placeable**: alive, READY, `lease_ok`, two heartbeats at least
//!   `interval / 2` apart since it became alive (rise), not held down, and
//!   fewer than 3 failed connects within 1 s;
//! - a newer incarnation of a node id supersedes the older one at once; the
//!   older one is tombstoned and told `superseded`;
//! - a node that died and came back is held down for
//!   `min(2 s × 2^(flaps − 1), 60 s)`;
//! - self-suspicion: when the tick runs more than `failure_timeout / 4` late,
//!   no death verdicts for one `failure_timeout`; when more than half of the
//!   members would die at once, the router marks itself unhealthy instead;
//! - warm-up: for `failure_timeout + 2 × interval` after start, plus a
//!   gateway's heartbeat connect timeout and longest back-off (1.5 s),
//!   owners not heard of yet are `owner_unreachable`, never `owner_lost`
//!   (one whose stream carried three heartbeats and then closed is lost
//!   as at any other time);
//! - forgetting: a dead member that no longer heartbeats is forgotten
//!   `forget_left_after` after its death when its heartbeats said it was
//!   leaving (taken out for good), `forget_failed_after` otherwise (it
//!   crashed, or drained for a restart: it may come back). A
//!   RESUME for a forgotten owner is answered as for any dead one past its
//!   grace: `owner_lost`. An operator may forget such a member at once
//!   ([`Membership::forget`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use jvpn_proto::{Incarnation, Mono, NodeId};

/// Tombstones kept per node id: the newest superseded incarnations.
pub const TOMBSTONES_PER_NODE: usize = 16;

/// Membership timing (DESIGN §10 defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    pub interval: Duration,
    pub failure_timeout: Duration,
    /// After a death by silence alone, RESUMEs for the member are answered
    /// `Unreachable` (retry) this long before `Lost` (issue 18 A2).
    pub silence_grace: Duration,
    /// The mass-death guard (more than half would die at once) holds the
    /// verdicts this long at most; then they are accepted (issue 18 M5).
    pub mass_death_hold: Duration,
    pub hold_down_base: Duration,
    pub hold_down_max: Duration,
    /// A node stable this long forgets its flaps.
    pub flap_memory: Duration,
    pub connect_failures_to_unplace: usize,
    pub connect_failure_window: Duration,
    /// A member that died leaving is forgotten this long after.
    pub forget_left_after: Duration,
    /// Any other dead, silent member is forgotten this long after its death.
    pub forget_failed_after: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            failure_timeout: Duration::from_millis(1000),
            silence_grace: Duration::from_millis(3000),
            mass_death_hold: Duration::from_secs(10),
            hold_down_base: Duration::from_secs(2),
            hold_down_max: Duration::from_secs(60),
            flap_memory: Duration::from_secs(300),
            connect_failures_to_unplace: 3,
            connect_failure_window: Duration::from_secs(1),
            forget_left_after: Duration::from_secs(1),
            forget_failed_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a gateway says about itself in a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Starting,
    Ready,
    Draining,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    pub addr: SocketAddr,
    pub state: NodeState,
    pub weight: u32,
    pub lease_ok: bool,
    /// The gateway holds a view from this router that contains it.
    pub in_view: bool,
    /// `incarnation` is ordered: larger is newer (older gateways: arrival order).
    pub ordered: bool,
    /// Taken out for good: forget it soon after it dies.
    pub leaving: bool,
}

/// The answer to one heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatVerdict {
    Accepted,
    /// This incarnation was replaced by a newer one: the gateway must exit.
    Superseded,
}

/// How a RESUME for an owner is routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerRoute {
    /// Splice to this address.
    Alive(SocketAddr),
    /// Final: the owner is gone; the agent re-handshakes.
    Lost,
    /// Transient: warm-up, self-suspicion or unhealthy router; retry.
    Unreachable,
}

#[derive(Clone, Debug)]
struct Member {
    incarnation: Incarnation,
    /// The incarnation is ordered (see [`Heartbeat::ordered`]).
    ordered: bool,
    addr: SocketAddr,
    state: NodeState,
    weight: u32,
    lease_ok: bool,
    in_view: bool,
    last_heartbeat: Mono,
    /// Heartbeats since (re)becoming alive, for the rise rule.
    rise_first: Mono,
    rise_count: u32,
    stream_closed_at: Option<Mono>,
    /// Heartbeat streams of this incarnation now open.
    open_streams: u32,
    connect_failures: VecDeque<Mono>,
    unreachable_since: Option<Mono>,
    held_until: Mono,
    dead: bool,
    /// Died unreachable: heartbeats alone do not bring it back, a connect
    /// to its client address must succeed first (the router probes it).
    needs_probe: bool,
    last_probe: Mono,
    /// Died of silence alone (no closed stream, no failed connects): a
    /// pause is as likely as a crash, so RESUMEs for it are answered
    /// `Unreachable` until `silence_grace` after this time.
    silent_death_at: Option<Mono>,
    /// When it was last declared dead (kept while dead).
    died_at: Option<Mono>,
    /// Its heartbeats said it is leaving for good.
    leaving: bool,
    /// Heartbeats since its newest stream opened (that stream's first
    /// not counted).
    stream_heartbeats: u32,
    /// Its last stream closed after carrying at least three heartbeats:
    /// the gateway had two replies on it, so its back-off is back at its
    /// shortest, a flap reopens before the fast death, and a death from it
    /// is certain.
    closed_settled: bool,
    /// Dead of such a closed stream: certainly gone, even for a router
    /// still warming up.
    certain_death: bool,
}

impl Member {
    /// No heartbeat for longer than `timeout`.
    fn silent(&self, now: Mono, timeout: Duration) -> bool {
        now.saturating_since(self.last_heartbeat) > (timeout)
    }

    /// Dead, without a heartbeat stream, and not heartbeating: not heard
    /// since its death, or silent for `timeout` now (one that died for its
    /// client port heartbeats on after its death, and may stop later). One
    /// with a stream open may speak again as itself.
    fn gone(&self, now: Mono, timeout: Duration) -> bool {
        self.dead
            && self.open_streams == 0
            && (self.died_at.is_some_and(|d| self.last_heartbeat < d) || self.silent(now, timeout))
    }
}

/// Why an operator's forget was refused ([`Membership::forget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotForgotten {
    #[error("no such gateway")]
    Unknown,
    #[error("the gateway is alive")]
    Alive,
    #[error("the gateway's heartbeat stream is still open or its heartbeats still arrive")]
    StillHeard,
}

#[derive(Clone, Debug, Default)]
struct FlapRecord {
    flaps: u32,
    last_flap: Mono,
}

/// A member's externally visible status (for `/ring` and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    pub addr: SocketAddr,
    pub weight: u32,
    pub alive: bool,
    pub placeable: bool,
    /// Placeable and holding a view that contains it: HELLOs may go there.
    pub hello_ready: bool,
}

/// Everything one router knows about the gateways.
#[derive(Debug)]
pub struct Membership {
    cfg: MembershipConfig,
    started: Mono,
    members: BTreeMap<NodeId, Member>,
    tombstones: HashMap<(NodeId, Incarnation), Mono>,
    flaps: HashMap<NodeId, FlapRecord>,
    last_tick: Option<Mono>,
    suspicious_until: Mono,
    unhealthy: bool,
    /// When the mass-death guard last started holding verdicts.
    unhealthy_since: Option<Mono>,
}

/// The mass-death guard judges deaths due within one tick step together.
const GUARD_STEP: Duration = Duration::from_millis(50);

impl Membership {
    pub fn new(cfg: MembershipConfig, now: Mono) -> Self {
        Self {
            cfg,
            started: now,
            members: BTreeMap::new(),
            tombstones: HashMap::new(),
            flaps: HashMap::new(),
            last_tick: None,
            suspicious_until: Mono::ZERO,
            unhealthy: false,
            unhealthy_since: None,
        }
    }

    /// True while the router distrusts its own timing or its own view.
    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy
    }

    /// Tombstones held (all nodes).
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    pub fn on_heartbeat(&mut self, now: Mono, hb: &Heartbeat) -> HeartbeatVerdict {
        if self
            .tombstones
            .contains_key(&(hb.node_id.clone(), hb.incarnation))
        {
            return HeartbeatVerdict::Superseded;
        }
        if let Some(m) = self.members.get(&hb.node_id)
            && m.incarnation != hb.incarnation
        {
            // Against a live newer one only: a dead member (even a newer
            // one) must not lock its node id out, e.g. a replacement whose
            // host clock is behind.
            if m.ordered && hb.ordered && hb.incarnation < m.incarnation && !m.dead {
                // An older process of this node id (it was paused, or this
                // router restarted and heard the new one first): it lost.
                return HeartbeatVerdict::Superseded;
            }
            // A newer incarnation supersedes the old one at once (between
            // unordered incarnations, newer means later to arrive), and the
            // old one is tombstoned.
            let old = m.incarnation;
            self.tombstones.insert((hb.node_id.clone(), old), now);
            self.trim_tombstones(&hb.node_id);
            self.members.remove(&hb.node_id);
            self.record_flap(&hb.node_id, now);
        }
        let hold = self.hold_down(&hb.node_id);
        let m = self
            .members
            .entry(hb.node_id.clone())
            .or_insert_with(|| Member {
                incarnation: hb.incarnation,
                ordered: hb.ordered,
                addr: hb.addr,
                state: hb.state,
                weight: hb.weight,
                lease_ok: hb.lease_ok,
                in_view: hb.in_view,
                last_heartbeat: now,
                rise_first: now,
                rise_count: 0,
                stream_closed_at: None,
                open_streams: 0,
                connect_failures: VecDeque::new(),
                unreachable_since: None,
                held_until: now + (hold),
                dead: false,
                needs_probe: false,
                last_probe: Mono::ZERO,
                silent_death_at: None,
                died_at: None,
                leaving: false,
                stream_heartbeats: 0,
                closed_settled: false,
                certain_death: false,
            });
        if m.dead && !m.needs_probe {
            revive(m, &mut self.flaps, &hb.node_id, &self.cfg, now);
        }
        if now.saturating_since(m.rise_first) >= (self.cfg.interval / 2) || m.rise_count == 0 {
            m.rise_count += 1;
        }
        m.addr = hb.addr;
        m.state = hb.state;
        m.weight = hb.weight;
        m.lease_ok = hb.lease_ok;
        m.in_view = hb.in_view;
        m.leaving = hb.leaving;
        m.last_heartbeat = now;
        m.stream_closed_at = None;
        m.stream_heartbeats = m.stream_heartbeats.saturating_add(1);
        HeartbeatVerdict::Accepted
    }

    /// Keeps the newest [`TOMBSTONES_PER_NODE`] tombstones of `node`: a
    /// gateway cycling incarnations cannot grow the map with its reconnect
    /// rate (issue 18 L4). Supersessions are rare, so a scan is fine.
    fn trim_tombstones(&mut self, node: &NodeId) {
        let mut mine: Vec<(Mono, Incarnation)> = self
            .tombstones
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|((_, i), t)| (*t, *i))
            .collect();
        if mine.len() <= TOMBSTONES_PER_NODE {
            return;
        }
        mine.sort();
        for (_, inc) in &mine[..mine.len() - TOMBSTONES_PER_NODE] {
            self.tombstones.remove(&(node.clone(), *inc));
        }
    }

    fn hold_down(&self, node: &NodeId) -> Duration {
        match self.flaps.get(node) {
            Some(r) if r.flaps > 0 => hold_down_for(&self.cfg, r.flaps),
            _ => Duration::ZERO,
        }
    }

    fn record_flap(&mut self, node: &NodeId, now: Mono) {
        let r = self.flaps.entry(node.clone()).or_default();
        r.flaps += 1;
        r.last_flap = now;
    }

    /// A heartbeat stream of the member opened (after its first heartbeat).
    pub fn on_stream_opened(&mut self, node: &NodeId, incarnation: Incarnation) {
        if let Some(m) = self.members.get_mut(node)
            && m.incarnation == incarnation
        {
            m.open_streams += 1;
            m.stream_heartbeats = 0;
        }
    }

    /// A heartbeat stream of the member closed: fast death once none is
    /// open (a reconnect briefly has two, and the old one closes late).
    /// Returns when that death falls due, if it now may (the shell ticks
    /// then rather than at its next 50 ms step).
    pub fn on_stream_closed(
        &mut self,
        now: Mono,
        node: &NodeId,
        incarnation: Incarnation,
    ) -> Option<Mono> {
        let after = self.fast_death_after();
        let m = self.members.get_mut(node)?;
        if m.incarnation != incarnation {
            return None;
        }
        m.open_streams = m.open_streams.saturating_sub(1);
        if m.open_streams > 0 {
            return None;
        }
        let closed = *m.stream_closed_at.get_or_insert(now);
        m.closed_settled = m.stream_heartbeats >= 2;
        // A closed stream is not ambiguous: the process is gone.
        m.silent_death_at = None;
        (!m.dead).then_some(closed + after)
    }

    /// How long after its last stream closed a member dies (unless a
    /// stream reopens): two heartbeat intervals, room for a reconnect.
    pub fn fast_death_after(&self) -> Duration {
        2 * self.cfg.interval
    }

    /// A data-plane connect (or a reachability probe) to the member failed
    /// or succeeded.
    pub fn on_connect(&mut self, now: Mono, node: &NodeId, incarnation: Incarnation, ok: bool) {
        let Some(m) = self.members.get_mut(node) else {
            return;
        };
        if m.incarnation != incarnation {
            return;
        }
        if ok {
            m.connect_failures.clear();
            m.unreachable_since = None;
            if m.dead && m.needs_probe && !m.silent(now, self.cfg.failure_timeout) {
                revive(m, &mut self.flaps, node, &self.cfg, now);
            }
        } else {
            m.connect_failures.push_back(now);
            m.unreachable_since.get_or_insert(now);
        }
        let window = self.cfg.connect_failure_window;
        while m
            .connect_failures
            .front()
            .is_some_and(|t| now.saturating_since(*t) > window)
        {
            m.connect_failures.pop_front();
        }
    }

    fn unreachable_too_long(&self, m: &Member, now: Mono) -> bool {
        m.unreachable_since
            .is_some_and(|t| now.saturating_since(t) > (3 * self.cfg.failure_timeout))
    }

    fn would_die(&self, m: &Member, now: Mono) -> bool {
        let silent = m.silent(now, self.cfg.failure_timeout);
        let closed = m
            .stream_closed_at
            .is_some_and(|t| now.saturating_since(t) > self.fast_death_after());
        silent || closed || self.unreachable_too_long(m, now)
    }

    /// Members due for a probe of their client address (at most one per
    /// heartbeat interval each): those that died unreachable and still
    /// heartbeat, and live ones with a failed connect not yet followed by
    /// a good one (the probes are the evidence the unreachability verdict
    /// needs: without them, one lost SYN to a gateway that gets no other
    /// connect for `3 × failure_timeout` would kill it). The shell
    /// connects and reports the result through [`Self::on_connect`].
    pub fn probes_due(&mut self, now: Mono) -> Vec<(NodeId, Incarnation, SocketAddr)> {
        let (every, fresh) = (self.cfg.interval, self.cfg.failure_timeout);
        let mut due = Vec::new();
        for (n, m) in &mut self.members {
            let dead_unreachable = m.dead && m.needs_probe && !m.silent(now, fresh);
            let failing = !m.dead && m.unreachable_since.is_some();
            if (dead_unreachable || failing) && now.saturating_since(m.last_probe) >= every {
                m.last_probe = now;
                due.push((n.clone(), m.incarnation, m.addr));
            }
        }
        due
    }

    /// Runs death verdicts. Call at least every 50 ms (and whenever a
    /// closed stream's death falls due); returns the members that died.
    pub fn tick(&mut self, now: Mono) -> Vec<(NodeId, Incarnation)> {
        if let Some(last) = self.last_tick
            && now.saturating_since(last)
                > (Duration::from_millis(50) + self.cfg.failure_timeout / 4)
        {
            // Our own clock or scheduler stalled: trust nothing for a while.
            self.suspicious_until = now + (self.cfg.failure_timeout);
        }
        self.last_tick = Some(now);
        let memory = self.cfg.flap_memory;
        self.flaps
            .retain(|_, r| now.saturating_since(r.last_flap) < memory);
        let tomb_ttl = 60 * self.cfg.failure_timeout;
        self.tombstones
            .retain(|_, t| now.saturating_since(*t) < tomb_ttl);
        if now < self.suspicious_until {
            return Vec::new();
        }
        let live = self.members.values().filter(|m| !m.dead).count();
        // Each dying member, whether unreachability is (one) cause, and
        // whether silence is the only one.
        let dying: Vec<(NodeId, bool, bool)> = self
            .members
            .iter()
            .filter(|(_, m)| !m.dead && self.would_die(m, now))
            .map(|(n, m)| {
                let unreachable = self.unreachable_too_long(m, now);
                let silent_only = !unreachable && m.stream_closed_at.is_none();
                (n.clone(), unreachable, silent_only)
            })
            .collect();
        // The guard judges a whole step: deaths due within the next 50 ms
        // count too, so that extra ticks (one per closed stream's due time)
        // cannot split a mass death into small batches that each pass.
        let soon = now + GUARD_STEP;
        let (dying_soon, unplanned) = self
            .members
            .values()
            .filter(|m| !m.dead && self.would_die(m, soon))
            .fold((0, 0), |(all, unplanned), m| {
                (
                    all + 1,
                    unplanned + usize::from(m.state != NodeState::Draining),
                )
            });
        // Members that said they drain are expected to go (a scale-in, a
        // rolling restart): their deaths alone never trip the guard, but
        // beside another's they count.
        if live >= 2 && unplanned > 0 && dying_soon * 2 > live {
            // More than half would die at once: more likely our fault, for
            // a while. Past `mass_death_hold` it is what it looks like.
            let since = *self.unhealthy_since.get_or_insert(now);
            if now.saturating_since(since) <= self.cfg.mass_death_hold {
                self.unhealthy = true;
                return Vec::new();
            }
        }
        self.unhealthy = false;
        self.unhealthy_since = None;
        let mut died = Vec::new();
        for (n, unreachable, silent_only) in dying {
            if let Some(m) = self.members.get_mut(&n) {
                m.dead = true;
                m.died_at = Some(now);
                m.silent_death_at = silent_only.then_some(now);
                m.certain_death = !unreachable && !silent_only && m.closed_settled;
                // Heartbeats still arriving prove nothing about the client
                // port: only a successful connect brings it back.
                m.needs_probe = unreachable;
                died.push((n, m.incarnation));
            }
        }
        self.forget_departed(now);
        died
    }

    /// Drops the dead members nobody will hear from again (see the
    /// module): without it every gateway ever decommissioned would stay
    /// known, and reported not alive, until the router restarts. One that
    /// still heartbeats (dead only for its client port) is kept.
    fn forget_departed(&mut self, now: Mono) {
        let cfg = &self.cfg;
        let mut forgot = Vec::new();
        self.members.retain(|n, m| {
            let Some(died) = m.died_at.filter(|_| m.dead) else {
                return true;
            };
            let mut after = if m.leaving {
                cfg.forget_left_after
            } else {
                cfg.forget_failed_after
            };
            if m.silent_death_at.is_some() {
                // Its RESUMEs are answered "retry" until the grace ends.
                after = after.max(cfg.silence_grace);
            }
            let gone = m.gone(now, cfg.failure_timeout) && now.saturating_since(died) >= after;
            if gone {
                forgot.push(n.clone());
            }
            !gone
        });
        // Coming back is a flap, as it would have been unforgotten: the
        // hold-down still applies (within `flap_memory`).
        for n in forgot {
            self.record_flap(&n, now);
        }
    }

    /// An operator's forget (a gateway known to be gone for good that did
    /// not say so: its host died): what [`Self::tick`] does after
    /// `forget_failed_after`, now. Only a member nothing says is still
    /// there qualifies. A return is held down like any flap.
    pub fn forget(&mut self, now: Mono, node: &NodeId) -> Result<Incarnation, NotForgotten> {
        let m = self.members.get(node).ok_or(NotForgotten::Unknown)?;
        if !m.dead {
            return Err(NotForgotten::Alive);
        }
        if !m.gone(now, self.cfg.failure_timeout) {
            return Err(NotForgotten::StillHeard);
        }
        let incarnation = m.incarnation;
        self.members.remove(node);
        self.record_flap(node, now);
        Ok(incarnation)
    }

    fn alive(&self, m: &Member) -> bool {
        !m.dead
    }

    fn placeable(&self, m: &Member, now: Mono) -> bool {
        let recent_failures = m.connect_failures.len() >= self.cfg.connect_failures_to_unplace;
        self.alive(m)
            && m.state == NodeState::Ready
            && m.lease_ok
            && m.rise_count >= 2
            && now >= m.held_until
            && !recent_failures
    }

    /// Every known member with its status, sorted by node id.
    pub fn status(&self, now: Mono) -> Vec<MemberStatus> {
        self.members
            .iter()
            .map(|(n, m)| MemberStatus {
                node_id: n.clone(),
                incarnation: m.incarnation,
                addr: m.addr,
                weight: m.weight,
                alive: self.alive(m),
                placeable: self.placeable(m, now),
                hello_ready: self.placeable(m, now) && m.in_view,
            })
            .collect()
    }

    /// Whether this incarnation is placeable now.
    pub fn is_placeable(&self, now: Mono, node: &NodeId, incarnation: Incarnation) -> bool {
        self.members
            .get(node)
            .is_some_and(|m| m.incarnation == incarnation && self.placeable(m, now))
    }

    /// Whether a HELLO may be placed on this incarnation now.
    pub fn hello_ready(&self, now: Mono, node: &NodeId, incarnation: Incarnation) -> bool {
        self.members
            .get(node)
            .is_some_and(|m| m.incarnation == incarnation && m.in_view && self.placeable(m, now))
    }

    /// The members that form the ring now.
    pub fn placeable_members(&self, now: Mono) -> Vec<jvpn_proto::ring::Member> {
        self.members
            .iter()
            .filter(|(_, m)| self.placeable(m, now))
            .map(|(n, m)| jvpn_proto::ring::Member {
                node_id: n.clone(),
                incarnation: m.incarnation,
                addr: m.addr,
                weight: m.weight,
            })
            .collect()
    }

    /// How to answer a RESUME whose token names `(node, incarnation)`;
    /// `None` for the owner means the tag matched no known incarnation.
    /// (The rules themselves; [`Routes`] is the copy connections read, and
    /// a test holds the two to the same answers.)
    pub fn route(&self, now: Mono, owner: Option<(&NodeId, Incarnation)>) -> OwnerRoute {
        if let Some((node, inc)) = owner
            && let Some(m) = self.members.get(node)
            && m.incarnation == inc
            && self.alive(m)
        {
            return OwnerRoute::Alive(m.addr);
        }
        if let Some((node, inc)) = owner
            && let Some(m) = self.members.get(node)
            && m.incarnation == inc
            && m.silent_death_at
                .is_some_and(|t| now.saturating_since(t) <= self.cfg.silence_grace)
        {
            // Silent, maybe paused: not certainly gone yet (issue 18 A2).
            return OwnerRoute::Unreachable;
        }
        let seen_dead = owner.is_some_and(|(node, inc)| {
            self.members
                .get(node)
                .is_some_and(|m| m.incarnation == inc && m.certain_death)
        });
        if (self.warming_up(now) && !seen_dead) || now < self.suspicious_until || self.unhealthy {
            OwnerRoute::Unreachable
        } else {
            OwnerRoute::Lost
        }
    }

    fn warming_up(&self, now: Mono) -> bool {
        now < self.route_globals().warm_until
    }

    /// What routing needs of one member (see [`Routes`]).
    fn route_entry(&self, m: &Member) -> RouteEntry {
        let recent_failures = m.connect_failures.len() >= self.cfg.connect_failures_to_unplace;
        RouteEntry {
            incarnation: m.incarnation,
            addr: m.addr,
            alive: self.alive(m),
            placeable_unless_held: self.alive(m)
                && m.state == NodeState::Ready
                && m.lease_ok
                && m.rise_count >= 2
                && !recent_failures,
            held_until: m.held_until,
            in_view: m.in_view,
            silent_death_at: m.silent_death_at,
            certain_death: m.dead && m.certain_death,
        }
    }

    fn route_globals(&self) -> RouteGlobals {
        RouteGlobals {
            warm_until: self.started + warm_up(&self.cfg),
            suspicious_until: self.suspicious_until,
            unhealthy: self.unhealthy,
            silence_grace: self.cfg.silence_grace,
        }
    }

    /// What `node`'s routing entry is now (`None`: unknown); the shell
    /// compares it before and after an event to know whether [`Routes`]
    /// must be published again.
    pub fn route_entry_of(&self, node: &NodeId) -> Option<RouteEntry> {
        self.members.get(node).map(|m| self.route_entry(m))
    }

    /// Whether a tick that found `died` must publish the routing snapshot
    /// again: someone died, or a router-wide rule (self-suspicion, the
    /// mass-death guard) changed. Members' own changes are published with
    /// the event that made them.
    pub fn tick_publishes(&self, died: &[(NodeId, Incarnation)], published: &Routes) -> bool {
        !died.is_empty()
            || published.globals != self.route_globals()
            || published.members.len() != self.members.len()
    }

    /// A copy of everything connection routing reads, so that HELLO
    /// placement and RESUME routing take no lock (issue 14).
    pub fn routes(&self) -> Routes {
        Routes {
            members: self
                .members
                .iter()
                .map(|(n, m)| (n.clone(), self.route_entry(m)))
                .collect(),
            globals: self.route_globals(),
        }
    }
}

/// How long after its start a router answers unknown owners
/// `owner_unreachable`: a live gateway's next heartbeat may come a
/// failure timeout and two intervals late, and before it, a gateway whose
/// connect met a router host still booting (no answer to its SYN) waits
/// out its connect timeout and one back-off before it tries again.
fn warm_up(cfg: &MembershipConfig) -> Duration {
    cfg.failure_timeout
        + 2 * cfg.interval
        + jvpn_proto::HEARTBEAT_CONNECT_TIMEOUT
        + jvpn_proto::HEARTBEAT_BACKOFF_MAX
}

/// One member as routing sees it. Time-dependent rules keep their times
/// (hold-down end, silent death) and are evaluated when read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub incarnation: Incarnation,
    pub addr: SocketAddr,
    alive: bool,
    /// Placeable once `held_until` has passed.
    placeable_unless_held: bool,
    held_until: Mono,
    in_view: bool,
    silent_death_at: Option<Mono>,
    /// Dead of a closed stream after settling (see `Member::certain_death`).
    certain_death: bool,
}

impl RouteEntry {
    fn placeable(&self, now: Mono) -> bool {
        self.placeable_unless_held && now >= self.held_until
    }
}

/// The router-wide inputs of a RESUME's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RouteGlobals {
    warm_until: Mono,
    suspicious_until: Mono,
    unhealthy: bool,
    silence_grace: Duration,
}

impl RouteGlobals {
    /// How to answer a RESUME for an owner whose token names incarnation
    /// `inc`, given that node's entry (if known).
    fn route(&self, now: Mono, inc: Option<Incarnation>, entry: Option<&RouteEntry>) -> OwnerRoute {
        let mine = entry.filter(|e| Some(e.incarnation) == inc);
        if let Some(e) = &mine {
            if e.alive {
                return OwnerRoute::Alive(e.addr);
            }
            if e.silent_death_at
                .is_some_and(|t| now.saturating_since(t) <= self.silence_grace)
            {
                // Silent, maybe paused: not certainly gone yet (issue 18 A2).
                return OwnerRoute::Unreachable;
            }
        }
        // The warm-up is for owners not heard of yet: one seen to die
        // (its stream closed) is certainly gone.
        let warming = now < self.warm_until && !mine.is_some_and(|e| e.certain_death);
        if warming || now < self.suspicious_until || self.unhealthy {
            OwnerRoute::Unreachable
        } else {
            OwnerRoute::Lost
        }
    }
}

/// A snapshot of the membership for connection routing, published by the
/// shell after every change (see [`Membership::tick_publishes`]); read
/// without a lock.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    members: HashMap<NodeId, RouteEntry>,
    globals: RouteGlobals,
}

impl Routes {
    /// How to answer a RESUME whose token names `owner` (see
    /// [`Membership::route`]).
    pub fn route(&self, now: Mono, owner: Option<(&NodeId, Incarnation)>) -> OwnerRoute {
        let entry = owner.and_then(|(n, _)| self.members.get(n));
        self.globals.route(now, owner.map(|(_, i)| i), entry)
    }

    /// Whether a HELLO may be placed on this incarnation now.
    pub fn hello_ready(&self, now: Mono, node: &NodeId, incarnation: Incarnation) -> bool {
        self.members
            .get(node)
            .is_some_and(|e| e.incarnation == incarnation && e.in_view && e.placeable(now))
    }

    /// Whether this incarnation is placeable now.
    pub fn is_placeable(&self, now: Mono, node: &NodeId, incarnation: Incarnation) -> bool {
        self.members
            .get(node)
            .is_some_and(|e| e.incarnation == incarnation && e.placeable(now))
    }
}

/// Back from the dead: a flap, held down before it is placeable, and
/// reachability proven again from scratch.
fn revive(
    m: &mut Member,
    flaps: &mut HashMap<NodeId, FlapRecord>,
    node: &NodeId,
    cfg: &MembershipConfig,
    now: Mono,
) {
    m.dead = false;
    m.died_at = None;
    m.certain_death = false;
    m.needs_probe = false;
    m.silent_death_at = None;
    m.rise_first = now;
    m.rise_count = 0;
    m.unreachable_since = None;
    m.connect_failures.clear();
    let r = flaps.entry(node.clone()).or_default();
    r.flaps += 1;
    r.last_flap = now;
    m.held_until = now + (hold_down_for(cfg, r.flaps));
}

fn hold_down_for(cfg: &MembershipConfig, flaps: u32) -> Duration {
    let exp = flaps.saturating_sub(1).min(16);
    cfg.hold_down_base
        .checked_mul(2u32.pow(exp))
        .unwrap_or(Duration::MAX)
        .min(cfg.hold_down_max)
}

#[cfg(test)]
mod tests;
