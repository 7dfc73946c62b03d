//! Deterministic harness for the session engine: a virtual clock, simulated
//! TLS connections (exporter and channel binding derived from the transport
//! id) and an agent that computes proofs exactly as the real one does.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use jvpn_gateway::engine::{
    Conn, Engine, EngineConfig, EngineEvent, HelloRequest, Mono, Policy, Rejection, ResumeAccepted,
    ResumeRequest, Session, StateChange, TransportId,
};
use jvpn_proto::crypto::{ChannelBinding, RESUME_KEY_LABEL, ResumeKey, resume_key_context};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use rand::SeedableRng;

/// What a TLS connection's exporter would give for `label`/`ctx`.
pub fn exporter(t: TransportId, ctx: &[u8]) -> ResumeKey {
    let mut h = blake3::Hasher::new();
    h.update(b"sim-exporter");
    h.update(&t.0.to_be_bytes());
    h.update(RESUME_KEY_LABEL);
    h.update(ctx);
    ResumeKey::new(*h.finalize().as_bytes())
}

pub fn binding(t: TransportId) -> ChannelBinding {
    *blake3::hash(&[b"sim-binding".as_slice(), &t.0.to_be_bytes()].concat()).as_bytes()
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
    }
}

pub struct Sim {
    pub engine: Engine,
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
        let engine = Engine::new(
            EngineConfig {
                node_id: NodeId::new(node).unwrap(),
                incarnation: Incarnation(seed),
                policy,
            },
            Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        )
        .unwrap();
        Self {
            engine,
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
        Agent {
            id: acc.session_id,
            key: exporter(t, &resume_key_context(&acc.session_id, 1)),
            epoch: acc.binding_epoch,
            counter: 0,
            transport: t,
        }
    }
}

/// The agent's side of a session.
#[derive(Clone)]
pub struct Agent {
    pub id: SessionId,
    pub key: ResumeKey,
    pub epoch: u64,
    pub counter: u64,
    pub transport: TransportId,
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
        self.counter += 1;
        let proof = self
            .key
            .resume_proof(&self.id, self.counter, self.epoch, &binding(t));
        Wire {
            id: self.id,
            counter: self.counter,
            epoch: self.epoch,
            proof,
            transport: t,
        }
    }

    /// Sends a RESUME on a fresh transport and applies the outcome as the real agent does.
    pub fn resume(&mut self, sim: &mut Sim) -> Result<ResumeAccepted, Rejection> {
        let t = sim.transport();
        let w = self.build(t);
        let r = send(sim, &w);
        self.apply(&w, &r);
        r
    }

    /// Agent-side handling of the reply: verify the server proof, rotate keys.
    pub fn apply(&mut self, w: &Wire, r: &Result<ResumeAccepted, Rejection>) {
        match r {
            Ok(acc) => {
                assert!(
                    self.key.verify_server_proof(
                        &self.id,
                        w.counter,
                        acc.binding_epoch,
                        &binding(w.transport),
                        &acc.server_proof
                    ),
                    "server proof must verify"
                );
                self.epoch = acc.binding_epoch;
                self.key = exporter(w.transport, &resume_key_context(&self.id, self.epoch));
                self.transport = w.transport;
            }
            Err(rej) => {
                if let Some(e) = rej.current_binding_epoch {
                    self.epoch = e;
                }
            }
        }
    }
}

pub fn send(sim: &mut Sim, w: &Wire) -> Result<ResumeAccepted, Rejection> {
    send_on(sim, w, w.transport)
}

/// Sends a captured RESUME on connection `t` (possibly not the one it was built for).
pub fn send_on(sim: &mut Sim, w: &Wire, t: TransportId) -> Result<ResumeAccepted, Rejection> {
    let b = binding(t);
    let r = sim.engine.resume(
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
    );
    sim.drain();
    r
}
