//! The session engine: every session this gateway owns, and every decision
//! about them, as deterministic sans-IO code.
//!
//! The engine never touches a socket, a TLS object or a clock. The async shell
//! calls it with `now` ([`Mono`]), parsed frames, the connection's channel
//! binding and a closure that evaluates the TLS exporter; it answers with a
//! value (what to send back) and queues side effects to drain afterwards.
//!
//! # Calling order
//!
//! - Inputs: [`Engine::hello`], [`Engine::resume`], [`Engine::adopt`]
//!   (topology 3's takeover), [`Engine::activity`],
//!   [`Engine::transport_closed`], [`Engine::terminate`],
//!   [`Engine::terminate_all`], [`Engine::handle_timeout`].
//! - After any input: drain [`Engine::poll_action`] (transports to close, with
//!   the reason to send in `Terminate`) and [`Engine::poll_event`] (one
//!   `StateChange` per transition, plus refused authenticated RESUMEs), then
//!   re-arm the shell's timer with [`Engine::poll_timeout`].
//!
//! # Layout
//!
//! - [`fsm`]: the transition table (one pure function).
//! - [`policy`]: policy values and validation.
//! - [`replay`]: the RESUME counter window.
//! - `antiflap`: switch rate and cooldown.
//! - `io`: requests, answers, events and actions.
//! - `session`: one session's state and its read-only view.
//!
//! Time is [`Mono`] from `jvpn_proto::time`, passed in by the shell.

mod antiflap;
pub mod fsm;
mod io;
pub mod policy;
pub mod replay;
mod session;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use jvpn_proto::crypto::{ResumeKey, resume_key_context};
use jvpn_proto::ring::Ring;
use jvpn_proto::{Incarnation, NodeId, ReasonCode, SessionId};
use rand::RngCore;

pub use antiflap::{AntiFlap, RECOVERY_FACTOR, SWITCH_WINDOW};
pub use fsm::{Denial, Event, State, Termination};
pub use io::{
    Action, Conn, EngineEvent, HelloAccepted, HelloRequest, Rejection, ResumeAccepted,
    ResumeRequest, STICKY_OWNER_EPOCH, StateChange, Takeover, TransportId,
};
pub use jvpn_proto::time::Mono;
pub use policy::{Policy, PolicyError};
pub use replay::ReplayWindow;
pub use session::Session;

use jvpn_proto::time::ceil_millis;

/// Construction parameters.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: NodeId,
    pub incarnation: Incarnation,
    pub policy: Policy,
}

/// Side effects and counters, kept apart from the session table so a
/// transition can borrow both.
#[derive(Debug, Default)]
struct Outputs {
    events: VecDeque<EngineEvent>,
    actions: VecDeque<Action>,
    by_state: [u64; 6],
}

/// Every session this gateway owns.
pub struct Engine {
    node_id: NodeId,
    incarnation: Incarnation,
    /// The policy new sessions get.
    policy: Arc<Policy>,
    /// `None`: single-node mode, the gateway is its whole ring.
    placement: Option<Arc<Ring>>,
    /// `(index, count)` when the shell splits sessions over several engines:
    /// minted ids satisfy [`shard_of`]`(id, count) == index`.
    shard: (usize, usize),
    sessions: HashMap<SessionId, Session>,
    timers: BinaryHeap<Reverse<(Mono, SessionId)>>,
    out: Outputs,
    rng: Box<dyn RngCore + Send>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node_id", &self.node_id)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Session-id draws allowed per view member before a HELLO gives up.
const MINT_DRAWS_PER_MEMBER: usize = 64;

impl Engine {
    /// Builds an engine; the policy is validated first. `rng` must be a CSPRNG
    /// in production (session ids are bearer-secret-adjacent).
    pub fn new(
        config: EngineConfig,
        rng: Box<dyn RngCore + Send>,
    ) -> Result<Self, Vec<PolicyError>> {
        config.policy.validate()?;
        Ok(Self {
            node_id: config.node_id,
            incarnation: config.incarnation,
            policy: Arc::new(config.policy),
            placement: None,
            shard: (0, 1),
            sessions: HashMap::new(),
            timers: BinaryHeap::new(),
            out: Outputs::default(),
            rng,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy for sessions created from now on (a reload).
    /// Existing sessions keep theirs: their agents were told it in `HelloOk`.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), Vec<PolicyError>> {
        policy.validate()?;
        self.policy = Arc::new(policy);
        Ok(())
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Installs the current cluster view; `None` returns to single-node mode.
    /// Only HELLO minting uses it: existing sessions never move.
    pub fn set_placement(&mut self, ring: Option<Arc<Ring>>) {
        self.placement = ring;
    }

    /// Makes this engine one of `count` shards: it mints only ids that
    /// [`shard_of`] maps to `index`.
    pub fn set_shard(&mut self, index: usize, count: usize) {
        self.shard = (index, count.max(1));
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Live sessions per state (TERMINATED sessions are removed at once).
    pub fn count(&self, state: State) -> u64 {
        self.out.by_state[state.index()]
    }

    pub fn session(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.out.events.pop_front()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run. May be
    /// early (a deadline moved later), never late.
    pub fn poll_timeout(&self) -> Option<Mono> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Creates a session for a completed, authenticated HELLO.
    ///
    /// `export` evaluates the handshake connection's TLS exporter with the
    /// resume-key label and the given context.
    pub fn hello(
        &mut self,
        now: Mono,
        req: HelloRequest,
        export: impl FnOnce(&[u8]) -> ResumeKey,
    ) -> Result<HelloAccepted, Rejection> {
        let mut end_of_life = now + self.policy.session_max_lifetime();
        if let Some(exp) = req.credential_expiry {
            end_of_life = end_of_life.min(exp);
        }
        if end_of_life <= now {
            return Err(Rejection::quiet(ReasonCode::AuthFailed));
        }
        let id = self.mint()?;
        let key = export(&resume_key_context(&id, 1));
        let mut s = self.newborn(now, end_of_life, key, req.principal);
        self.birth(now, id, &mut s, Event::HandshakeDone, req.transport)?;
        let accepted = HelloAccepted {
            session_id: id,
            state_version: s.version,
            binding_epoch: s.epoch,
            policy: s.policy.clone(),
        };
        self.sessions.insert(id, s);
        Ok(accepted)
    }

    /// Topology 3: installs a session this gateway just claimed from its
    /// dead owner in the shared store, attached to the transport whose
    /// RESUME asked for it. The shell has verified that RESUME's proof with
    /// the stored key (`used_key`) and written the claim; this only builds
    /// the session from what the claim wrote and answers as a RESUME would,
    /// with the claimed owner epoch and a server proof under `used_key`.
    /// A session already here is refused (`unknown_session`, nothing
    /// changes): a claim never replaces a live session.
    pub fn adopt(
        &mut self,
        now: Mono,
        t: Takeover<'_>,
        export: impl FnOnce(&[u8]) -> ResumeKey,
    ) -> Result<ResumeAccepted, Rejection> {
        let id = t.session_id;
        if self.sessions.contains_key(&id) || t.end_of_life <= now {
            return Err(Rejection::quiet(ReasonCode::UnknownSession));
        }
        let key = export(&resume_key_context(&id, t.binding_epoch));
        let mut s = self.newborn(now, t.end_of_life, key, t.principal);
        // The step below bumps the version to the claimed one.
        s.version = t.state_version.saturating_sub(1);
        s.epoch = t.binding_epoch;
        s.owner_epoch = t.owner_epoch;
        // As after any RESUME: an agent that missed this `ResumeOk` still
        // holds the key it proved with, and recovers with it
        // (`stale_binding`, then a retry at the current epoch).
        s.fallback = Some(t.used_key.clone());
        s.replay.record(t.counter);
        self.birth(now, id, &mut s, Event::TakenOver, t.conn.transport)?;
        let accepted = ResumeAccepted {
            state_version: s.version,
            binding_epoch: s.epoch,
            owner_epoch: s.owner_epoch,
            server_proof: t
                .used_key
                .server_proof(&id, t.counter, s.epoch, t.conn.binding),
            replaced: None,
        };
        self.sessions.insert(id, s);
        Ok(accepted)
    }

    /// A session in BIRTH under the current policy: binding and owner
    /// epoch 1, no fallback key, an empty replay window.
    fn newborn(
        &self,
        now: Mono,
        end_of_life: Mono,
        key: ResumeKey,
        principal: Arc<str>,
    ) -> Session {
        Session {
            state: State::Birth,
            version: 0,
            epoch: 1,
            owner_epoch: STICKY_OWNER_EPOCH,
            transport: None,
            end_of_life,
            last_rx: now,
            volatile_since: now,
            lost_deadline: None,
            key,
            fallback: None,
            replay: ReplayWindow::new(self.policy.replay_window),
            flap: AntiFlap::default(),
            principal,
            policy: self.policy.clone(),
            scheduled: None,
            refusals: session::RefusalBudget {
                window_start: now,
                count: 0,
            },
        }
    }

    /// A new session leaves BIRTH by `event` (a handshake, or a takeover)
    /// onto `transport`, counted and timed like every session.
    fn birth(
        &mut self,
        now: Mono,
        id: SessionId,
        s: &mut Session,
        event: Event,
        transport: TransportId,
    ) -> Result<(), Rejection> {
        self.out.by_state[State::Birth.index()] += 1;
        step(&mut self.out, &self.policy, now, id, s, event).map_err(Rejection::quiet)?;
        s.transport = Some(transport);
        schedule(&mut self.timers, &self.policy, id, s);
        Ok(())
    }

    /// Draws a fresh id inside this node's own shard of the current view.
    fn mint(&mut self) -> Result<SessionId, Rejection> {
        let not_in_cluster = || Rejection::quiet(ReasonCode::NotInCluster);
        let (ring, draws) = match &self.placement {
            Some(ring) => {
                if !ring.view().contains(&self.node_id, self.incarnation) {
                    return Err(not_in_cluster());
                }
                let n = ring.view().members().len();
                (Some(ring), MINT_DRAWS_PER_MEMBER * n)
            }
            None => (None, MINT_DRAWS_PER_MEMBER),
        };
        let (index, count) = self.shard;
        let draws = draws * count;
        for _ in 0..draws {
            let mut bytes = [0u8; 16];
            self.rng.fill_bytes(&mut bytes);
            let id = SessionId::from_bytes(bytes);
            if shard_of(&id, count) != index {
                continue;
            }
            let mine = ring.is_none_or(|r| r.owner(&id).is_some_and(|m| m.node_id == self.node_id));
            if mine && !self.sessions.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(not_in_cluster())
    }

    /// Validates and, if everything holds, commits a RESUME (DESIGN §2.5).
    ///
    /// Up to and including the proof check a failure changes nothing at all.
    /// `export` evaluates this connection's TLS exporter (resume-key label)
    /// and is called only when the switch commits.
    pub fn resume(
        &mut self,
        now: Mono,
        req: &ResumeRequest<'_>,
        conn: Conn<'_>,
        export: impl FnOnce(&[u8]) -> ResumeKey,
    ) -> Result<ResumeAccepted, Rejection> {
        let id = req.session_id;
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(Rejection::quiet(ReasonCode::UnknownSession));
        };
        if now >= s.end_of_life {
            return Err(Rejection::quiet(ReasonCode::SessionLifetimeExceeded));
        }
        if s.lost_deadline.is_some_and(|d| now >= d) {
            return Err(Rejection::quiet(ReasonCode::TransportTtlExceeded));
        }
        let verify = |k: &ResumeKey| {
            k.verify_resume_proof(&id, req.counter, req.binding_epoch, conn.binding, req.proof)
        };
        let used_current = if verify(&s.key) {
            true
        } else if s.fallback.as_ref().is_some_and(verify) {
            false
        } else {
            return Err(Rejection::quiet(ReasonCode::BadProof));
        };
        // Authenticated from here on: reasons may be disclosed.
        if s.replay.check(req.counter).is_err() {
            return Err(refuse(
                &mut self.out,
                s,
                now,
                id,
                ReasonCode::ReplayDetected,
                None,
            ));
        }
        s.replay.record(req.counter);
        if used_current {
            // The agent holds the newest key: the old one is retired for good.
            s.fallback = None;
        }
        if req.binding_epoch != s.epoch {
            // A request from before the latest binding (a lost ResumeOk, or the
            // loser of a race) must not disturb that binding.
            let epoch = Some(s.epoch);
            return Err(refuse(
                &mut self.out,
                s,
                now,
                id,
                ReasonCode::StaleBinding,
                epoch,
            ));
        }
        let p = &*s.policy.clone();
        // On the connection it is attached on (an agent retrying there):
        // not a switch, so neither anti-flap nor a retirement of it.
        let in_place = s.transport == Some(conn.transport);
        if in_place {
            s.transport = None;
        }
        let replaced = s.transport;
        step(&mut self.out, p, now, id, s, Event::ResumeAuthenticated).map_err(Rejection::quiet)?;
        let governed = s.flap.governs(replaced.is_some());
        let judged = if in_place {
            Ok(())
        } else if governed {
            s.flap.check(now, p)
        } else {
            s.flap.check_recovery(now, p)
        };
        if let Err((denial, wait)) = judged {
            // A refused recovery stays a recovery: its retry is judged by
            // the recovery budget again, never by the (emptier) switch one.
            if governed {
                s.flap.hold();
            }
            step(&mut self.out, p, now, id, s, Event::SwitchDenied(denial))
                .map_err(Rejection::quiet)?;
            // Anti-flap never kills a session inside its TTL: keep it alive
            // until the next allowed switch plus one heartbeat timeout.
            let needed = (now + wait + p.heartbeat_timeout()).min(s.end_of_life);
            if s.lost_deadline.is_none_or(|d| d < needed) {
                s.lost_deadline = Some(needed);
            }
            schedule(&mut self.timers, p, id, s);
            return Err(Rejection {
                reason: denial.reason(),
                retry_after_ms: ceil_millis(wait),
                current_binding_epoch: Some(s.epoch),
                transport_lost_deadline_ms: deadline_in(s, now),
            });
        }
        // Commit.
        s.epoch += 1;
        let new_key = export(&resume_key_context(&id, s.epoch));
        let used_key = if used_current {
            let old = std::mem::replace(&mut s.key, new_key);
            s.fallback = Some(old.clone());
            old
        } else {
            s.key = new_key;
            s.fallback
                .clone()
                .unwrap_or_else(|| unreachable!("verified against fallback"))
        };
        if in_place {
            // Not a switch: nothing counted.
        } else if governed {
            s.flap.record(now, p);
        } else {
            s.flap.record_recovery(now, p);
        }
        step(&mut self.out, p, now, id, s, Event::SwitchAllowed).map_err(Rejection::quiet)?;
        s.transport = Some(conn.transport);
        s.last_rx = now;
        s.lost_deadline = None;
        schedule(&mut self.timers, p, id, s);
        Ok(ResumeAccepted {
            state_version: s.version,
            binding_epoch: s.epoch,
            owner_epoch: s.owner_epoch,
            server_proof: used_key.server_proof(&id, req.counter, s.epoch, conn.binding),
            replaced,
        })
    }

    /// A frame arrived on `transport`: it is alive. Returns false if that
    /// transport is not (or no longer) the session's binding.
    pub fn activity(&mut self, now: Mono, id: &SessionId, transport: TransportId) -> bool {
        match self.sessions.get_mut(id) {
            Some(s) if s.transport == Some(transport) => {
                // Deadlines only move later; the queued timer re-arms when it fires.
                s.last_rx = s.last_rx.max(now);
                true
            }
            _ => false,
        }
    }

    /// The shell saw `transport` close or fail. Ignored unless it is the
    /// session's current binding.
    pub fn transport_closed(&mut self, now: Mono, id: &SessionId, transport: TransportId) -> bool {
        let Some(s) = self.sessions.get_mut(id) else {
            return false;
        };
        if s.transport != Some(transport) {
            return false;
        }
        let p = s.policy.clone();
        let ok = step(&mut self.out, &p, now, *id, s, Event::TransportClosed).is_ok();
        schedule(&mut self.timers, &p, *id, s);
        ok
    }

    /// Ends one session explicitly (operator, drain deadline, superseded).
    pub fn terminate(&mut self, now: Mono, id: &SessionId, why: Termination) -> bool {
        let Some(s) = self.sessions.get_mut(id) else {
            return false;
        };
        let p = s.policy.clone();
        let ok = step(&mut self.out, &p, now, *id, s, Event::Terminate(why)).is_ok();
        if ok {
            self.sessions.remove(id);
            self.compact_timers();
        }
        ok
    }

    /// Timer entries are deleted lazily (an entry whose session is gone is
    /// skipped when it fires), so churn leaves entries behind until their
    /// deadlines: rate × heartbeat timeout of them. Once they outnumber the
    /// live sessions, rebuild the heap from the entries still in force.
    fn compact_timers(&mut self) {
        if self.timers.len() > 2 * self.sessions.len() + 1024 {
            self.timers = self
                .sessions
                .iter()
                .filter_map(|(id, s)| s.scheduled.map(|t| Reverse((t, *id))))
                .collect();
        }
    }

    /// Ends every session (in id order, so runs are reproducible).
    pub fn terminate_all(&mut self, now: Mono, why: Termination) -> usize {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        ids.iter().filter(|id| self.terminate(now, id, why)).count()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Mono) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if s.scheduled != Some(t) {
                continue; // superseded by an earlier entry
            }
            s.scheduled = None;
            let p = &*s.policy.clone();
            loop {
                let event = if now >= s.end_of_life {
                    Event::LifetimeExpired
                } else if s.lost_deadline.is_some_and(|d| now >= d) {
                    Event::TransportTtlExpired
                } else if s.state == State::Attached && now >= s.last_rx + p.heartbeat_timeout() {
                    Event::HeartbeatTimeout
                } else if s.state == State::Volatile
                    && now >= s.volatile_since + p.volatile_to_degraded()
                {
                    Event::VolatileTimeout
                } else {
                    break;
                };
                if step(&mut self.out, p, now, id, s, event).is_err() {
                    break;
                }
            }
            if s.state == State::Terminated {
                self.sessions.remove(&id);
            } else {
                schedule(&mut self.timers, p, id, s);
            }
        }
        self.compact_timers();
    }
}

/// Which of `count` engine shards owns `id` (the shells' lock striping).
pub fn shard_of(id: &SessionId, count: usize) -> usize {
    usize::from(id.as_bytes()[15]) % count.max(1)
}

/// `ResumeRefused` events one session may cause per minute; past it the
/// refusals still happen (and the shell still counts them) but are not
/// written to the event log, which an authenticated agent could otherwise
/// flood (issue 18 L5).
pub const REFUSED_EVENTS_PER_MIN: u32 = 10;

/// Emits a refusal event for an authenticated request that changes no
/// state, at most [`REFUSED_EVENTS_PER_MIN`] per session per minute.
fn refuse(
    out: &mut Outputs,
    s: &mut Session,
    now: Mono,
    id: SessionId,
    reason: ReasonCode,
    epoch: Option<u64>,
) -> Rejection {
    let b = &mut s.refusals;
    if now.saturating_since(b.window_start) >= std::time::Duration::from_secs(60) {
        (b.window_start, b.count) = (now, 0);
    }
    if b.count < REFUSED_EVENTS_PER_MIN {
        b.count += 1;
        out.events.push_back(EngineEvent::ResumeRefused {
            at: now,
            session_id: id,
            reason,
        });
    }
    Rejection {
        reason,
        retry_after_ms: 0,
        current_binding_epoch: epoch,
        transport_lost_deadline_ms: deadline_in(s, now),
    }
}

/// Milliseconds until the session's transport-lost deadline, rounded down so
/// an agent never waits past it; `None` while it has a transport.
fn deadline_in(s: &Session, now: Mono) -> Option<u64> {
    s.lost_deadline
        .map(|d| (d.saturating_since(now).as_millis() as u64).max(1))
}

/// Applies one table transition with all its effects: version, counters,
/// event, transport retirement and transport-loss clock.
fn step(
    out: &mut Outputs,
    p: &Policy,
    now: Mono,
    id: SessionId,
    s: &mut Session,
    event: Event,
) -> Result<(), ReasonCode> {
    let (to, reason) = fsm::transition(s.state, event)?;
    let from = s.state;
    if let Some(transport) = s.transport.take() {
        // Only ATTACHED holds a transport, and every exit from it retires it.
        let why = match event {
            Event::ResumeAuthenticated => Some(ReasonCode::TransportReplaced),
            Event::TransportClosed => None, // already gone
            _ => Some(reason),
        };
        if let Some(reason) = why {
            out.actions.push_back(Action::CloseTransport {
                session_id: id,
                transport,
                reason,
            });
        }
        s.lost_deadline = Some(now + p.transport_lost_ttl());
    }
    if to == State::Volatile {
        s.volatile_since = now;
    }
    s.state = to;
    s.version += 1;
    out.by_state[from.index()] -= 1;
    if to != State::Terminated {
        out.by_state[to.index()] += 1;
    }
    out.events.push_back(EngineEvent::StateChange(StateChange {
        at: now,
        session_id: id,
        from,
        to,
        reason,
        state_version: s.version,
        owner_epoch: s.owner_epoch,
    }));
    Ok(())
}

/// The next time anything can happen to `s` on its own.
fn next_deadline(s: &Session, p: &Policy) -> Mono {
    let mut d = s.end_of_life;
    match s.state {
        State::Attached => d = d.min(s.last_rx + p.heartbeat_timeout()),
        State::Volatile => d = d.min(s.volatile_since + p.volatile_to_degraded()),
        _ => {}
    }
    if let Some(l) = s.lost_deadline {
        d = d.min(l);
    }
    d
}

/// Queues a timer entry if the session's next deadline is earlier than the
/// one already queued (later deadlines are found when the early entry fires).
fn schedule(
    timers: &mut BinaryHeap<Reverse<(Mono, SessionId)>>,
    p: &Policy,
    id: SessionId,
    s: &mut Session,
) {
    let d = next_deadline(s, p);
    if s.scheduled.is_none_or(|t| d < t) {
        timers.push(Reverse((d, id)));
        s.scheduled = Some(d);
    }
}
