//! Deterministic simulation of a cluster over the real sans-IO cores: two
//! routers (`membership::Membership` and the RESUME routing decision
//! `routing::route_token`), three gateways (`engine::Engine` behind the
//! pre-TLS `gate::Gate`) and agents (`client::ClientSession`, the agent's
//! own session), on a virtual clock, with crashes, pauses, partitions of the
//! heartbeat links and of the client ports, and dropped heartbeats drawn
//! from a seed.
//!
//! Checked on every seed:
//! * one owner per session id: no id is live on two gateway lives;
//! * no silent migration: a RESUME is only ever accepted by the life of the
//!   node that created the session (routers route by the token's owner, a
//!   gateway refuses an intended owner that is not itself, and the client
//!   session refuses a `ResumeOk` from another owner);
//! * every orphaned session is signalled: an agent whose owner is gone gets
//!   `owner_lost` (then re-handshakes) within a bound, and once the faults
//!   stop every agent is attached to a live owner that holds its session.
//!
//! A failing seed is printed; `JVPN_SIM_SEED=<n> cargo test -p jvpn-loadtest
//! --test simulation` replays exactly that one.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, HelloRequest, Mono, Policy, ResumeRequest, TransportId,
};
use jvpn_gateway::gate::Gate;
use jvpn_gateway::issuer::{Issuer, NONCE_LEN};
use jvpn_gateway::metrics::ConnReject;
use jvpn_proto::client::ClientSession;
use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::preamble::Preamble;
use jvpn_proto::testkit::SimConn;
use jvpn_proto::token::{TokenKey, TokenKeyring};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use jvpn_router::membership::{
    Heartbeat, HeartbeatVerdict, Membership, MembershipConfig, NodeState,
};
use jvpn_router::routing::{OwnerTags, ResumeRoute, route_token};
use jvpn_runtime::admission::HandshakeBudget;
use jvpn_runtime::wire::lock;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STEP_MS: u64 = 10;
const FAULTY_UNTIL_MS: u64 = 14_000;
const END_MS: u64 = 24_000;
const GATEWAYS: usize = 3;
const ROUTERS: usize = 2;
const AGENTS: usize = 12;
/// How long an orphaned agent may go without being told (failure timeout,
/// warm-up and self-suspicion windows, retries): generous, never infinite.
const SIGNAL_BOUND_MS: u64 = 6_000;

/// One life of a gateway process.
struct Life {
    incarnation: Incarnation,
    engine: Engine,
    /// The gateway's pre-TLS rules: the intended-owner check.
    gate: Gate,
    budget: HandshakeBudget,
    /// Seals routing tokens naming this life, as the gateway does.
    issuer: Issuer,
}

/// One router: the membership rules and the owner tags it learned.
struct Router {
    membership: Mutex<Membership>,
    tags: Mutex<OwnerTags>,
}

impl Router {
    fn m(&self) -> MutexGuard<'_, Membership> {
        lock(&self.membership)
    }
}

struct Gateway {
    node: NodeId,
    life: Option<Life>,
    paused_until: u64,
    restart_at: u64,
    /// Heartbeat link to each router is cut until this time.
    cut_until: [u64; ROUTERS],
    /// Each router's connects to the client port fail until this time.
    client_cut_until: [u64; ROUTERS],
}

struct Session {
    client: ClientSession,
    /// The transport and when its gateway was last heard from.
    transport: Option<TransportId>,
    last_heard: u64,
}

impl Session {
    fn node(&self) -> NodeId {
        NodeId::new(&self.client.node_id).unwrap()
    }
    fn incarnation(&self) -> Incarnation {
        Incarnation(self.client.incarnation)
    }
}

struct Agent {
    session: Option<Session>,
    next_jump: u64,
    /// Since when this agent has had no transport (for the signal bound).
    orphaned_since: Option<u64>,
    retry_at: u64,
    next_router: usize,
    asked_another: bool,
}

struct World {
    rng: ChaCha8Rng,
    now: u64,
    keys: ClusterKeys,
    tokens: TokenKeyring,
    routers: Vec<Router>,
    gateways: Vec<Gateway>,
    agents: Vec<Agent>,
    next_conn: u64,
    /// Every session id ever minted, with the life that minted it.
    minted: BTreeMap<SessionId, (NodeId, Incarnation)>,
    owner_lost: u64,
    resumes: u64,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let secret: ClusterSecret = format!("1:{}", "42".repeat(32)).parse().unwrap();
        let keys = secret.derive();
        let tokens = TokenKeyring::new(TokenKey::new(&keys), None);
        let routers = (0..ROUTERS)
            .map(|_| Router {
                membership: Mutex::new(Membership::new(MembershipConfig::default(), Mono::ZERO)),
                tags: Mutex::new(OwnerTags::default()),
            })
            .collect();
        let mut gateways: Vec<Gateway> = (0..GATEWAYS)
            .map(|i| Gateway {
                node: NodeId::new(&format!("g{}", i + 1)).unwrap(),
                life: None,
                paused_until: 0,
                restart_at: 0,
                cut_until: [0; ROUTERS],
                client_cut_until: [0; ROUTERS],
            })
            .collect();
        for g in &mut gateways {
            g.life = Some(new_life(&g.node, 0, &mut rng, &keys));
        }
        let agents = (0..AGENTS)
            .map(|i| Agent {
                session: None,
                next_jump: 2_000 + rng.random_range(0..3_000),
                orphaned_since: Some(0),
                retry_at: 1_500 + i as u64 * 10,
                next_router: i % ROUTERS,
                asked_another: false,
            })
            .collect();
        Self {
            rng,
            now: 0,
            keys,
            tokens,
            routers,
            gateways,
            agents,
            next_conn: 1,
            minted: BTreeMap::new(),
            owner_lost: 0,
            resumes: 0,
        }
    }

    fn mono(&self) -> Mono {
        Mono::from_millis(self.now)
    }

    fn running(&self, g: usize) -> bool {
        self.gateways[g].life.is_some() && self.now >= self.gateways[g].paused_until
    }

    /// Would router `r`'s TCP connect to `g`'s client port succeed? (A
    /// paused process still completes handshakes in its kernel.)
    fn reachable(&self, g: usize, r: usize, inc: Incarnation) -> bool {
        self.gateways[g]
            .life
            .as_ref()
            .is_some_and(|l| l.incarnation == inc)
            && self.now >= self.gateways[g].client_cut_until[r]
    }

    fn gateway_of(&self, node: &NodeId) -> usize {
        self.gateways.iter().position(|g| g.node == *node).unwrap()
    }

    /// Faults, only before `FAULTY_UNTIL_MS`.
    fn inject(&mut self) {
        if self.now >= FAULTY_UNTIL_MS {
            return;
        }
        let g = self.rng.random_range(0..GATEWAYS);
        let roll = self.rng.random_range(0..10_000);
        if roll < 4 && self.gateways[g].life.is_some() {
            // SIGKILL: the streams close, the process restarts later.
            let life = self.gateways[g].life.take().unwrap();
            let now = self.mono();
            for r in &self.routers {
                r.m()
                    .on_stream_closed(now, &self.gateways[g].node, life.incarnation);
            }
            self.gateways[g].restart_at = self.now + self.rng.random_range(500..3_000);
        } else if roll < 8 {
            // SIGSTOP, silent.
            self.gateways[g].paused_until = self.now + self.rng.random_range(500..3_000);
        } else if roll < 12 {
            let r = self.rng.random_range(0..ROUTERS);
            self.gateways[g].cut_until[r] = self.now + self.rng.random_range(500..3_000);
        } else if roll < 15 {
            // The client port cut off from one router, heartbeats unaffected:
            // long enough, often, for the unreachable rule to kill.
            let r = self.rng.random_range(0..ROUTERS);
            let until = self.now + self.rng.random_range(500..6_000);
            self.gateways[g].client_cut_until[r] = until.min(FAULTY_UNTIL_MS);
        }
    }

    fn heartbeats(&mut self) {
        for g in 0..GATEWAYS {
            if self.gateways[g].life.is_none() && self.now >= self.gateways[g].restart_at {
                let life = new_life(&self.gateways[g].node, self.now, &mut self.rng, &self.keys);
                self.gateways[g].life = Some(life);
            }
            if !self.now.is_multiple_of(250) || !self.running(g) {
                continue;
            }
            let inc = self.gateways[g].life.as_ref().unwrap().incarnation;
            for r in 0..ROUTERS {
                let dropped = self.now < FAULTY_UNTIL_MS && self.rng.random_bool(0.05);
                if self.now < self.gateways[g].cut_until[r] || dropped {
                    continue;
                }
                let hb = Heartbeat {
                    node_id: self.gateways[g].node.clone(),
                    incarnation: inc,
                    addr: format!("10.0.0.{}:7443", g + 1).parse().unwrap(),
                    state: NodeState::Ready,
                    weight: 1,
                    lease_ok: true,
                    in_view: true,
                    ordered: true,
                    leaving: false,
                };
                let router = &self.routers[r];
                if router.m().on_heartbeat(self.mono(), &hb) == HeartbeatVerdict::Accepted {
                    lock(&router.tags).learn([&self.keys], &hb.node_id, hb.incarnation);
                }
            }
        }
        if self.now.is_multiple_of(50) {
            let now = self.mono();
            for r in 0..ROUTERS {
                self.routers[r].m().tick(now);
                // Members that died unreachable come back only through a probe.
                let due = self.routers[r].m().probes_due(now);
                for (node, inc, _) in due {
                    let ok = self.reachable(self.gateway_of(&node), r, inc);
                    self.routers[r].m().on_connect(now, &node, inc, ok);
                }
                // Tags of incarnations the router no longer knows are forgotten.
                let known: HashSet<(NodeId, Incarnation)> = self.routers[r]
                    .m()
                    .status(now)
                    .into_iter()
                    .map(|s| (s.node_id, s.incarnation))
                    .collect();
                lock(&self.routers[r].tags).retain(&known);
            }
        }
    }

    fn gateway_timers(&mut self) {
        let now = self.mono();
        for g in 0..GATEWAYS {
            if !self.running(g) {
                continue;
            }
            let life = self.gateways[g].life.as_mut().unwrap();
            life.engine.handle_timeout(now);
            while life.engine.poll_action().is_some() {}
            while life.engine.poll_event().is_some() {}
        }
    }

    /// One agent's turn: keep-alive, detect a dead transport, jump, reattach.
    fn agent(&mut self, i: usize) {
        let now = self.now;
        // Keep-alive on the current transport.
        if let Some(s) = &self.agents[i].session
            && let Some(t) = s.transport
        {
            let g = self.gateway_of(&s.node());
            let same_life = self.gateways[g]
                .life
                .as_ref()
                .is_some_and(|l| l.incarnation == s.incarnation());
            if !same_life {
                // The process died: the TCP connection resets at once.
                self.lose_transport(i);
            } else if self.running(g) {
                if now.is_multiple_of(500) {
                    let id = s.client.id;
                    let m = self.mono();
                    let life = self.gateways[g].life.as_mut().unwrap();
                    if life.engine.activity(m, &id, t) {
                        self.agents[i].session.as_mut().unwrap().last_heard = now;
                    } else {
                        // The gateway retired this transport (silence).
                        self.lose_transport(i);
                    }
                }
            } else if now.saturating_sub(s.last_heard) > 2_000 {
                // Paused gateway: silence for heartbeat_timeout.
                self.lose_transport(i);
            }
        }
        let a = &self.agents[i];
        // Transports change (mobile clients) while faults happen; then calm.
        if a.session.as_ref().is_some_and(|s| s.transport.is_some())
            && now >= a.next_jump
            && now < FAULTY_UNTIL_MS
        {
            self.lose_transport(i);
            self.agents[i].next_jump = now + self.rng.random_range(1_600..4_000);
        }
        let a = &self.agents[i];
        if a.session.as_ref().is_none_or(|s| s.transport.is_none()) && now >= a.retry_at {
            self.reattach(i);
        }
    }

    fn lose_transport(&mut self, i: usize) {
        let now = self.now;
        let m = self.mono();
        let a = &mut self.agents[i];
        if let Some(s) = a.session.as_mut()
            && let Some(t) = s.transport.take()
        {
            a.orphaned_since.get_or_insert(now);
            a.asked_another = false;
            let (node, inc, id) = (s.node(), s.incarnation(), s.client.id);
            let g = self.gateways.iter().position(|g| g.node == node).unwrap();
            if let Some(life) = self.gateways[g].life.as_mut()
                && life.incarnation == inc
            {
                life.engine.transport_closed(m, &id, t);
            }
        }
    }

    fn reattach(&mut self, i: usize) {
        let r = self.agents[i].next_router;
        // The router's own decision from the token the agent presents.
        let route = self.agents[i].session.as_ref().map(|s| {
            let Preamble::Resume { key_id, token } = s.client.resume_preamble() else {
                unreachable!("a session's preamble is a RESUME")
            };
            let router = &self.routers[r];
            let now = self.mono();
            route_token(
                &self.tokens,
                |id, tag| lock(&router.tags).owner(id, tag),
                |owner| router.m().route(now, owner),
                key_id,
                &token,
            )
            .route
        });
        match route {
            Some(ResumeRoute::Splice {
                node, incarnation, ..
            }) => self.resume_on_owner(i, node, incarnation),
            Some(ResumeRoute::Unreachable) => self.retry_later(i, 100),
            Some(ResumeRoute::Lost) if !self.agents[i].asked_another => {
                self.agents[i].asked_another = true;
                self.agents[i].next_router = (r + 1) % ROUTERS;
                self.retry_later(i, 10);
            }
            // route_token never decides a takeover (the router's shell
            // does, in topology 3, which this simulation does not model).
            Some(ResumeRoute::Lost | ResumeRoute::BadToken | ResumeRoute::Takeover { .. })
            | None => {
                if route.is_some() {
                    self.owner_lost += 1;
                }
                self.hello(i, r);
            }
        }
    }

    fn retry_later(&mut self, i: usize, ms: u64) {
        let jitter = self.rng.random_range(0..50);
        self.agents[i].retry_at = self.now + ms + jitter;
        self.agents[i].next_router = (self.agents[i].next_router + 1) % ROUTERS;
    }

    /// The router spliced the RESUME towards `node`/`inc` (the token's owner).
    fn resume_on_owner(&mut self, i: usize, node: NodeId, inc: Incarnation) {
        let g = self.gateway_of(&node);
        let r = self.agents[i].next_router;
        let now = self.mono();
        let reached = self.reachable(g, r, inc);
        self.routers[r].m().on_connect(now, &node, inc, reached);
        if !reached && self.gateways[g].life.is_some() {
            // The router's connect failed: owner_unreachable, retry.
            return self.retry_later(i, 100);
        }
        if !self.running(g) {
            // Connect refused (dead) or hanging (paused): try again later.
            return self.retry_later(i, 200);
        }
        let preamble = self.agents[i]
            .session
            .as_ref()
            .unwrap()
            .client
            .resume_preamble()
            .encode();
        let life = self.gateways[g].life.as_mut().unwrap();
        // The gateway's pre-TLS gate, with the owner the router intended.
        let gated = life.gate.preamble(
            true,
            Some(&(node.clone(), inc)),
            &preamble,
            &mut life.budget,
            now,
        );
        match gated {
            Ok(_) => {}
            Err(refusal) if refusal.reject == ConnReject::OwnerLost => {
                // Another life of this node: owner_lost, explicitly.
                self.owner_lost += 1;
                return self.hello(i, self.agents[i].next_router);
            }
            Err(refusal) => panic!("the gate refused a routed RESUME: {refusal:?}"),
        }
        let conn = SimConn(self.next_conn);
        self.next_conn += 1;
        let transport = TransportId(conn.0);
        let sent = self.agents[i]
            .session
            .as_mut()
            .unwrap()
            .client
            .build_resume(&conn)
            .unwrap();
        let req = ResumeRequest::from_wire(&sent).unwrap();
        let id = req.session_id;
        let life = self.gateways[g].life.as_mut().unwrap();
        let r = life.engine.resume(
            now,
            &req,
            Conn {
                transport,
                binding: &conn.binding(),
            },
            |ctx| conn.resume_key(ctx),
        );
        match r {
            Ok(acc) => {
                // No silent migration: only the minting life accepts.
                assert_eq!(
                    self.minted.get(&id),
                    Some(&(node.clone(), life.incarnation)),
                    "a RESUME was accepted by a life that did not mint the session"
                );
                let (token, key_id) = seal(life, id, &mut self.rng);
                let ok = acc.to_wire(&node, life.incarnation, token, key_id);
                let s = self.agents[i].session.as_mut().unwrap();
                // The agent's own checks: owner, server proof, key rotation.
                s.client.apply_resume_ok(&sent, &ok, &conn).unwrap();
                s.transport = Some(transport);
                s.last_heard = self.now;
                self.agents[i].orphaned_since = None;
                self.resumes += 1;
            }
            Err(rej) => {
                let advice = self.agents[i]
                    .session
                    .as_mut()
                    .unwrap()
                    .client
                    .apply_reject(&rej.to_frame());
                if advice.session_gone {
                    // The session is gone (TTL): explicit, re-handshake.
                    self.hello(i, self.agents[i].next_router)
                } else {
                    let wait = (advice.retry_after.as_millis() as u64).clamp(50, 2_000);
                    self.retry_later(i, wait);
                }
            }
        }
    }

    /// An explicit re-handshake through router `r`.
    fn hello(&mut self, i: usize, r: usize) {
        let now = self.mono();
        let placeable = self.routers[r].m().placeable_members(now);
        if placeable.is_empty() {
            return self.retry_later(i, 250);
        }
        let pick = &placeable[self.rng.random_range(0..placeable.len())];
        let g = self.gateway_of(&pick.node_id);
        let reached = self.reachable(g, r, pick.incarnation);
        self.routers[r]
            .m()
            .on_connect(now, &pick.node_id, pick.incarnation, reached);
        let fenced = self.now < self.gateways[g].cut_until[r];
        let matches = self.gateways[g]
            .life
            .as_ref()
            .is_some_and(|l| l.incarnation == pick.incarnation);
        if !self.running(g) || !matches || fenced {
            // Dead, paused, a newer life, or no lease with this router.
            return self.retry_later(i, 250);
        }
        let conn = SimConn(self.next_conn);
        self.next_conn += 1;
        let transport = TransportId(conn.0);
        let node = self.gateways[g].node.clone();
        let life = self.gateways[g].life.as_mut().unwrap();
        let acc = life
            .engine
            .hello(
                now,
                HelloRequest {
                    transport,
                    principal: Arc::from("sim"),
                    credential_expiry: None,
                },
                |ctx| conn.resume_key(ctx),
            )
            .unwrap();
        let owner = (node.clone(), life.incarnation);
        // One owner per session id, ever.
        assert!(
            self.minted.insert(acc.session_id, owner).is_none(),
            "a session id was minted twice"
        );
        let (token, key_id) = seal(life, acc.session_id, &mut self.rng);
        let ok = acc.to_wire(&node, life.incarnation, token, key_id);
        self.agents[i].session = Some(Session {
            client: ClientSession::from_hello_ok(ok, &conn).unwrap(),
            transport: Some(transport),
            last_heard: self.now,
        });
        self.agents[i].orphaned_since = None;
    }

    fn check(&self) {
        // No agent stays unattached without being told for long.
        for (i, a) in self.agents.iter().enumerate() {
            if let Some(since) = a.orphaned_since {
                let bound = if self.now < FAULTY_UNTIL_MS + SIGNAL_BOUND_MS {
                    // During faults, new faults can keep an agent away.
                    u64::MAX
                } else {
                    SIGNAL_BOUND_MS
                };
                assert!(
                    self.now - since.max(FAULTY_UNTIL_MS.min(self.now)) <= bound,
                    "agent {i} left without a transport or a signal since {since} ms"
                );
            }
        }
    }

    fn settle_checks(&self) {
        for (i, a) in self.agents.iter().enumerate() {
            let s = a
                .session
                .as_ref()
                .unwrap_or_else(|| panic!("agent {i} has no session"));
            assert!(
                s.transport.is_some(),
                "agent {i} is not attached at the end"
            );
            let g = self.gateway_of(&s.node());
            let life = self.gateways[g].life.as_ref().unwrap();
            assert_eq!(
                life.incarnation,
                s.incarnation(),
                "agent {i}'s owner is not alive"
            );
            assert!(
                life.engine.session(&s.client.id).is_some(),
                "agent {i}'s owner does not hold its session"
            );
        }
        // Once faults stop, every running gateway is alive again on every
        // router (one that died unreachable came back through a probe).
        for (r, router) in self.routers.iter().enumerate() {
            let alive: Vec<_> = router
                .m()
                .status(self.mono())
                .into_iter()
                .filter(|s| s.alive)
                .map(|s| (s.node_id, s.incarnation))
                .collect();
            for g in &self.gateways {
                let l = g.life.as_ref().unwrap();
                assert!(
                    alive.contains(&(g.node.clone(), l.incarnation)),
                    "{} is not alive on router {r} at the end",
                    g.node
                );
            }
        }
        // Each live session id is held by exactly the life that minted it.
        for g in &self.gateways {
            if let Some(l) = &g.life {
                for a in &self.agents {
                    if let Some(s) = &a.session
                        && l.engine.session(&s.client.id).is_some()
                    {
                        assert_eq!(self.minted[&s.client.id], (g.node.clone(), l.incarnation));
                    }
                }
            }
        }
    }
}

/// A process start at `now_ms`, with an ordered incarnation as real gateways have.
fn new_life(node: &NodeId, now_ms: u64, rng: &mut ChaCha8Rng, keys: &ClusterKeys) -> Life {
    let incarnation = jvpn_gateway::incarnation::next(now_ms, rng.next_u64() as u16, None);
    let engine = Engine::new(
        EngineConfig {
            node_id: node.clone(),
            incarnation,
            policy: Policy::default(),
        },
        Box::new(ChaCha8Rng::seed_from_u64(rng.next_u64())),
    )
    .unwrap();
    Life {
        incarnation,
        engine,
        gate: Gate {
            node_id: node.clone(),
            incarnation,
            routers: vec!["10.0.0.100".parse().unwrap()],
            direct_clients: false,
        },
        budget: HandshakeBudget::new(1e9, 0.5, Mono::ZERO),
        issuer: Issuer::new(keys, node, incarnation),
    }
}

/// A routing token naming `life` as the owner of `id`.
fn seal(life: &Life, id: SessionId, rng: &mut ChaCha8Rng) -> (Vec<u8>, u32) {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    life.issuer.seal(id, nonce)
}

/// Runs one seed to the end; returns (RESUMEs accepted, owner_lost answers).
fn run(seed: u64) -> (u64, u64) {
    let mut w = World::new(seed);
    while w.now <= END_MS {
        w.inject();
        w.heartbeats();
        w.gateway_timers();
        for i in 0..AGENTS {
            w.agent(i);
        }
        w.check();
        w.now += STEP_MS;
    }
    w.settle_checks();
    (w.resumes, w.owner_lost)
}

#[test]
fn a_thousand_seeds_keep_one_owner_and_signal_every_orphan() {
    let seeds: Vec<u64> = match std::env::var("JVPN_SIM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (0..1_000).collect(),
    };
    let (mut resumes, mut lost) = (0, 0);
    for seed in seeds {
        let r = std::panic::catch_unwind(|| run(seed));
        match r {
            Ok((a, b)) => {
                resumes += a;
                lost += b;
            }
            Err(e) => {
                eprintln!("seed {seed} failed; replay it with JVPN_SIM_SEED={seed}");
                std::panic::resume_unwind(e)
            }
        }
    }
    // The faults really happened: sessions resumed, and owners were lost.
    assert!(
        resumes > 0 && lost > 0,
        "resumes {resumes}, owner_lost {lost}"
    );
}

#[test]
fn a_seed_replays_exactly() {
    assert_eq!(run(42), run(42));
}
