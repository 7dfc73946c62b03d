//! Deterministic harness for the session engine: a virtual clock, simulated
//! TLS connections (`jvpn_proto::testkit::SimConn`, named by the transport
//! id) and an agent that is the real client session
//! (`jvpn_proto::client::ClientSession`) plus its current transport.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, EngineEvent, HelloRequest, Mono, Policy, Rejection, ResumeAccepted,
    ResumeRequest, Session, StateChange, TransportId,
};
use jvpn_proto::client::ClientSession;
use jvpn_proto::crypto::{ChannelBinding, ResumeKey};
use jvpn_proto::pb::session::Resume;
use jvpn_proto::testkit::SimConn;
use jvpn_proto::token::TOKEN_LEN;
use jvpn_proto::{Incarnation, NodeId, SessionId};
use rand::SeedableRng;

/// The simulated connection of transport `t`.
pub fn conn(t: TransportId) -> SimConn {
    SimConn(t.0)
}

/// What the gateway's exporter closure gives the engine on transport `t`.
pub fn exporter(t: TransportId, ctx: &[u8]) -> ResumeKey {
    conn(t).resume_key(ctx)
}

pub fn binding(t: TransportId) -> ChannelBinding {
    conn(t).binding()
}

pub fn fast_policy() -> Policy {
    Policy {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 400,
        volatile_to_degraded_ms: 800,
        transport_lost_ttl_ms: 1_000,
        session_max_lifetime_ms: 60_000,
        max_switches_per_min: 5,
        switch_cooldown_ms: 200,
        replay_window: 128,
        keepalive_interval_ms: None,
    }
}

pub struct Sim {
    pub engine: Engine,
    pub node: NodeId,
    pub incarnation: Incarnation,
    pub now: Mono,
    next_transport: u64,
    /// Every event drained so far.
    pub log: Vec<EngineEvent>,
}

impl Sim {
    pub fn new(policy: Policy) -> Self {
        Self::with_node("g1", policy, 1)
    }

    pub fn with_node(node: &str, policy: Policy, seed: u64) -> Self {
        let node = NodeId::new(node).unwrap();
        let engine = Engine::new(
            EngineConfig {
                node_id: node.clone(),
                incarnation: Incarnation(seed),
                policy,
            },
            Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        )
        .unwrap();
        Self {
            engine,
            node,
            incarnation: Incarnation(seed),
            now: Mono::from_millis(1_000),
            next_transport: 1,
            log: Vec::new(),
        }
    }

    pub fn transport(&mut self) -> TransportId {
        self.next_transport += 1;
        TransportId(self.next_transport)
    }

    pub fn advance(&mut self, ms: u64) {
        self.now = self.now + Duration::from_millis(ms);
        self.engine.handle_timeout(self.now);
        self.drain();
    }

    /// Advances in small steps, firing timers as a real shell would.
    pub fn run_for(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.advance(10);
        }
    }

    pub fn drain(&mut self) -> Vec<EngineEvent> {
        let mut new = Vec::new();
        while let Some(e) = self.engine.poll_event() {
            new.push(e);
        }
        while self.engine.poll_action().is_some() {}
        self.log.extend(new.iter().cloned());
        new
    }

    pub fn changes(&self, id: SessionId) -> Vec<StateChange> {
        self.log
            .iter()
            .filter_map(|e| match e {
                EngineEvent::StateChange(c) if c.session_id == id => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn session(&self, id: SessionId) -> Option<Session> {
        self.engine.session(&id).cloned()
    }

    pub fn connect(&mut self) -> Agent {
        let t = self.transport();
        let acc = self
            .engine
            .hello(
                self.now,
                HelloRequest {
                    transport: t,
                    principal: Arc::from("agent-1"),
                    credential_expiry: None,
                },
                |ctx| exporter(t, ctx),
            )
            .unwrap();
        self.drain();
        let ok = acc.to_wire(&self.node, self.incarnation, vec![0; TOKEN_LEN], 0);
        Agent {
            session: ClientSession::from_hello_ok(ok, &conn(t)).unwrap(),
            transport: t,
        }
    }
}

/// The agent's side of a session: the real client session and the
/// transport it is attached on. Derefs to the session (`a.id`,
/// `a.binding_epoch`, `a.counter()`).
#[derive(Clone, Debug)]
pub struct Agent {
    pub session: ClientSession,
    pub transport: TransportId,
}

impl std::ops::Deref for Agent {
    type Target = ClientSession;
    fn deref(&self) -> &ClientSession {
        &self.session
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut ClientSession {
        &mut self.session
    }
}

/// A RESUME as built by the agent, ready to send (or to capture and replay).
#[derive(Clone)]
pub struct Wire {
    pub id: SessionId,
    pub counter: u64,
    pub epoch: u64,
    pub proof: [u8; 32],
    pub transport: TransportId,
}

impl Agent {
    /// Builds a RESUME for a new connection `t` (the counter advances).
    pub fn build(&mut self, t: TransportId) -> Wire {
        let r = self.session.build_resume(&conn(t)).unwrap();
        Wire {
            id: self.session.id,
            counter: r.counter,
            epoch: r.binding_epoch,
            proof: r.proof.as_slice().try_into().unwrap(),
            transport: t,
        }
    }

    /// Sends a RESUME on a fresh transport and applies the outcome as the real agent does.
    pub fn resume(&mut self, sim: &mut Sim) -> Result<ResumeAccepted, Rejection> {
        let t = sim.transport();
        let w = self.build(t);
        let r = send(sim, &w);
        self.apply(sim, &w, &r);
        r
    }

    /// The client session applies the reply as the real agent does: the
    /// owner and server proof must verify, then the key rotates; a
    /// `stale_binding` reject hands over the current epoch.
    pub fn apply(&mut self, sim: &Sim, w: &Wire, r: &Result<ResumeAccepted, Rejection>) {
        match r {
            Ok(acc) => {
                let sent = Resume {
                    keepalive: false,
                    session_id: w.id.as_bytes().to_vec(),
                    counter: w.counter,
                    binding_epoch: w.epoch,
                    proof: w.proof.to_vec(),
                    received: None,
                };
                let ok = acc.to_wire(&sim.node, sim.incarnation, vec![0; TOKEN_LEN], 0);
                self.session
                    .apply_resume_ok(&sent, &ok, &conn(w.transport))
                    .expect("server proof must verify");
                self.transport = w.transport;
            }
            Err(rej) => {
                self.session.apply_reject(&rej.to_frame());
            }
        }
    }
}

pub fn send(sim: &mut Sim, w: &Wire) -> Result<ResumeAccepted, Rejection> {
    send_on(sim, w, w.transport)
}

/// Sends a captured RESUME on connection `t` (possibly not the one it was built for).
pub fn send_on(sim: &mut Sim, w: &Wire, t: TransportId) -> Result<ResumeAccepted, Rejection> {
    let r = resume_on(sim, w, t);
    sim.drain();
    r
}

/// [`send_on`] leaving the engine's events and actions to the caller.
pub fn resume_on(sim: &mut Sim, w: &Wire, t: TransportId) -> Result<ResumeAccepted, Rejection> {
    let b = binding(t);
    sim.engine.resume(
        sim.now,
        &ResumeRequest {
            session_id: w.id,
            counter: w.counter,
            binding_epoch: w.epoch,
            proof: &w.proof,
        },
        Conn {
            transport: t,
            binding: &b,
        },
        |ctx| exporter(t, ctx),
    )
}
