//! What goes in and out of the engine: requests from the shell, the answers
//! it returns, and the events and actions it queues.

use std::sync::Arc;

use jvpn_proto::crypto::{ChannelBinding, PROOF_LEN, ResumeKey};
use jvpn_proto::pb::session::Reject;
use jvpn_proto::{Incarnation, Mono, NodeId, ReasonCode, SessionId};

use super::fsm::State;
use super::policy::Policy;

/// The shell's handle for one client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportId(pub u64);

/// Owner epoch of sessions in the sticky topology: ownership never moves.
pub const STICKY_OWNER_EPOCH: u64 = 1;

/// One state transition of one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub at: Mono,
    pub session_id: SessionId,
    pub from: State,
    pub to: State,
    pub reason: ReasonCode,
    /// The version after this transition.
    pub state_version: u64,
    /// The owner epoch the session has on this gateway (1 unless taken
    /// over in topology 3): with node and incarnation, who holds it.
    pub owner_epoch: u64,
}

/// What the engine reports for observability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// Exactly one per transition.
    StateChange(StateChange),
    /// An authenticated RESUME refused without a transition (replay, stale binding).
    ResumeRefused {
        at: Mono,
        session_id: SessionId,
        reason: ReasonCode,
    },
}

/// Work for the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `Terminate{reason}` on `transport` (if it is still open) and close it.
    CloseTransport {
        session_id: SessionId,
        transport: TransportId,
        reason: ReasonCode,
    },
}

/// A refused HELLO or RESUME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The exact reason, for metrics and debug logs.
    pub reason: ReasonCode,
    /// Milliseconds after which a retry may succeed (0: no hint).
    pub retry_after_ms: u64,
    /// Disclosed only to authenticated requesters.
    pub current_binding_epoch: Option<u64>,
    /// Time left before the session ends without a transport; disclosed only
    /// to authenticated requesters.
    pub transport_lost_deadline_ms: Option<u64>,
}

impl Rejection {
    /// A refusal that discloses nothing beyond its (wire) reason.
    pub fn quiet(reason: ReasonCode) -> Self {
        Self {
            reason,
            retry_after_ms: 0,
            current_binding_epoch: None,
            transport_lost_deadline_ms: None,
        }
    }

    /// The `Reject` frame the requester gets.
    pub fn to_frame(&self) -> Reject {
        Reject {
            reason: self.wire_reason() as i32,
            retry_after_ms: self.retry_after_ms,
            current_binding_epoch: self.current_binding_epoch.unwrap_or(0),
            transport_lost_deadline_ms: self.transport_lost_deadline_ms.unwrap_or(0),
        }
    }

    /// What goes into the `Reject` frame: pre-authentication failures are all
    /// `unknown_session`.
    pub fn wire_reason(&self) -> ReasonCode {
        self.reason.on_wire_before_auth()
    }
}

/// A new session's identity and credentials.
#[derive(Clone, Debug)]
pub struct HelloRequest {
    pub transport: TransportId,
    /// Who authenticated (certificate subject or token name).
    pub principal: Arc<str>,
    /// The credential's expiry; the session ends no later.
    pub credential_expiry: Option<Mono>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloAccepted {
    pub session_id: SessionId,
    pub state_version: u64,
    pub binding_epoch: u64,
    /// The policy the session runs under (tell the agent this one).
    pub policy: Arc<Policy>,
}

/// A parsed `Resume` frame.
#[derive(Clone, Copy, Debug)]
pub struct ResumeRequest<'a> {
    pub session_id: SessionId,
    pub counter: u64,
    pub binding_epoch: u64,
    pub proof: &'a [u8],
}

impl<'a> ResumeRequest<'a> {
    /// The engine's view of a `Resume` frame; `None` when its session id
    /// is not 16 bytes (answered as `unknown_session`).
    pub fn from_wire(r: &'a jvpn_proto::pb::session::Resume) -> Option<Self> {
        Some(Self {
            session_id: SessionId::from_slice(&r.session_id).ok()?,
            counter: r.counter,
            binding_epoch: r.binding_epoch,
            proof: &r.proof,
        })
    }
}

/// A session claimed from the shared store (topology 3), as the claim
/// wrote it: the binding and owner epochs already bumped.
#[derive(Clone, Debug)]
pub struct Takeover<'a> {
    pub session_id: SessionId,
    /// The connection whose RESUME asked for it (its proof verified).
    pub conn: Conn<'a>,
    /// That RESUME's counter (recorded in the fresh replay window).
    pub counter: u64,
    /// The key the agent proved with: the `server_proof` is made with it.
    pub used_key: &'a ResumeKey,
    pub principal: Arc<str>,
    pub end_of_life: Mono,
    pub owner_epoch: u64,
    pub binding_epoch: u64,
    pub state_version: u64,
}

/// The connection a RESUME arrived on.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    pub transport: TransportId,
    /// RFC 9266 `EXPORTER-Channel-Binding` of this connection.
    pub binding: &'a ChannelBinding,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeAccepted {
    pub state_version: u64,
    pub binding_epoch: u64,
    pub owner_epoch: u64,
    pub server_proof: [u8; PROOF_LEN],
    /// The transport this RESUME replaced, if the session was still ATTACHED.
    pub replaced: Option<TransportId>,
}

impl HelloAccepted {
    /// The `HelloOk` that tells the agent, with the routing token the shell sealed.
    pub fn to_wire(
        &self,
        node_id: &NodeId,
        incarnation: Incarnation,
        resume_token: Vec<u8>,
        token_key_id: u32,
    ) -> jvpn_proto::pb::session::HelloOk {
        jvpn_proto::pb::session::HelloOk {
            keepalive_ms: 0,
            session_id: self.session_id.as_bytes().to_vec(),
            node_id: node_id.to_string(),
            incarnation: incarnation.0,
            state_version: self.state_version,
            binding_epoch: self.binding_epoch,
            resume_token,
            policy: Some(self.policy.to_wire()),
            token_key_id,
            // The shell sets the window when the agent asked for a channel.
            channel_window: 0,
            // The shell sets it when the session is in a shared store.
            migratable: false,
            // The shell knows how the connection came.
            via_router: None,
            // The shell says so when the session has a channel.
            channel_finish: false,
        }
    }
}

impl ResumeAccepted {
    /// The `ResumeOk` that tells the agent, with a fresh routing token.
    pub fn to_wire(
        &self,
        node_id: &NodeId,
        incarnation: Incarnation,
        resume_token: Vec<u8>,
        token_key_id: u32,
    ) -> jvpn_proto::pb::session::ResumeOk {
        jvpn_proto::pb::session::ResumeOk {
            keepalive_ms: 0,
            node_id: node_id.to_string(),
            incarnation: incarnation.0,
            owner_epoch: self.owner_epoch,
            state_version: self.state_version,
            binding_epoch: self.binding_epoch,
            resume_token,
            server_proof: self.server_proof.to_vec(),
            token_key_id,
            received: None,
            channel_window: 0,
        }
    }
}
