//! The gRPC membership service: one bidirectional heartbeat stream per
//! gateway, over mTLS with the membership CA.
//!
//! Identity comes from the client certificate's URI SAN only
//! (`jvpn://<cluster>/gateway/<node_id>`); the advertised address must be an
//! IP SAN of that certificate or on the allow-list; weight is capped. A
//! stream that breaks any rule is refused with `PERMISSION_DENIED` and the
//! refusal is counted by reason.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use jvpn_proto::ids::{Incarnation, NodeId};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::membership_proof::{router_proof, verify_gateway_proof};
use jvpn_proto::pb::membership::membership_server::Membership as MembershipRpc;
use jvpn_proto::pb::membership::{
    HeartbeatReply, HeartbeatRequest, NodeState as PbState, RingParameters,
};
use jvpn_runtime::admission::SourceKey;
use metrics::counter;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::membership::{Heartbeat, HeartbeatVerdict, NodeState};
use crate::metrics as m;
use crate::state::RouterState;

/// What a gateway's membership certificate proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node_id: NodeId,
    pub ips: Vec<IpAddr>,
}

/// Why a heartbeat stream was refused (metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Identity,
    Advertise,
    Weight,
    Malformed,
    /// The gateway's secret proof verifies under none of our keys.
    Secret,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Identity,
        Refusal::Advertise,
        Refusal::Weight,
        Refusal::Malformed,
        Refusal::Secret,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Identity => "identity",
            Refusal::Advertise => "advertise",
            Refusal::Weight => "weight",
            Refusal::Malformed => "malformed",
            Refusal::Secret => "secret",
        }
    }
}

/// Why a gateway's membership certificate names no usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The DER does not parse as X.509.
    #[error("certificate: {0}")]
    Parse(String),
    /// No subjectAltName extension.
    #[error("certificate has no subjectAltName")]
    NoSan,
    /// Two `jvpn://<cluster>/gateway/…` URIs: which node is it?
    #[error("more than one gateway URI SAN")]
    SeveralNodes,
    /// The URI's node id is not a valid id.
    #[error("node id: {0}")]
    NodeId(#[from] jvpn_proto::ids::IdError),
    /// No URI SAN of this cluster.
    #[error("no URI SAN {0}<node_id>")]
    NoNode(String),
}

/// Reads the node identity and IP SANs from a DER certificate. The node id
/// comes from the one URI SAN of the form `jvpn://<cluster>/gateway/<node>`.
pub fn identity_of(der: &[u8], cluster: &str) -> Result<PeerIdentity, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?
        .ok_or(IdentityError::NoSan)?;
    let prefix = format!("jvpn://{cluster}/gateway/");
    let mut node = None;
    let mut ips = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => {
                if let Some(id) = uri.strip_prefix(&prefix) {
                    if node.is_some() {
                        return Err(IdentityError::SeveralNodes);
                    }
                    node = Some(NodeId::new(id)?);
                }
            }
            GeneralName::IPAddress(b) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                    ips.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                    ips.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    let node_id = node.ok_or(IdentityError::NoNode(prefix))?;
    Ok(PeerIdentity { node_id, ips })
}

/// Checks one request against the stream's certificate and our limits.
pub fn check_request(
    req: &HeartbeatRequest,
    peer: &PeerIdentity,
    allow: &[IpAddr],
    max_weight: u32,
) -> Result<Heartbeat, (Refusal, String)> {
    if req.node_id != peer.node_id.as_str() {
        return Err((
            Refusal::Identity,
            format!(
                "node id {:?} is not the certificate's {}",
                req.node_id, peer.node_id
            ),
        ));
    }
    let addr: SocketAddr = req
        .advertise_addr
        .parse()
        .map_err(|_| (Refusal::Malformed, "advertise_addr is not ip:port".into()))?;
    if !peer.ips.contains(&addr.ip()) && !allow.contains(&addr.ip()) {
        return Err((
            Refusal::Advertise,
            format!(
                "advertise address {} is not named by the certificate",
                addr.ip()
            ),
        ));
    }
    if req.weight == 0 || req.weight > max_weight {
        return Err((
            Refusal::Weight,
            format!("weight {} outside 1..={max_weight}", req.weight),
        ));
    }
    let state = match PbState::try_from(req.state) {
        Ok(PbState::Starting) => NodeState::Starting,
        Ok(PbState::Ready) => NodeState::Ready,
        Ok(PbState::Draining) => NodeState::Draining,
        _ => return Err((Refusal::Malformed, "unknown node state".into())),
    };
    Ok(Heartbeat {
        node_id: peer.node_id.clone(),
        incarnation: Incarnation(req.incarnation),
        addr,
        state,
        weight: req.weight,
        lease_ok: req.lease_ok,
        in_view: req.in_view,
        ordered: req.incarnation_ordered,
        leaving: req.leaving,
    })
}

/// Counts and logs a refused stream; the status ends it.
fn refused(r: Refusal, msg: String) -> Status {
    counter!(m::MEMBERSHIP_REFUSED, "reason" => r.as_str()).increment(1);
    warn!(reason = r.as_str(), "heartbeat stream refused: {msg}");
    Status::permission_denied(msg)
}

/// The tonic service.
#[derive(Clone, Debug)]
pub struct Service {
    pub state: Arc<RouterState>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HeartbeatReply, Status>> + Send>>;

#[tonic::async_trait]
impl MembershipRpc for Service {
    type HeartbeatStream = ReplyStream;

    async fn heartbeat(
        &self,
        request: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| refused(Refusal::Identity, "no client certificate".into()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| refused(Refusal::Identity, "no client certificate".into()))?;
        let cluster = &self.state.cfg.raw.cluster.name;
        let peer = identity_of(leaf.as_ref(), cluster)
            .map_err(|e| refused(Refusal::Identity, e.to_string()))?;
        // A certified gateway: keep room for its address (issue 18 M3).
        if let Some(addr) = request.remote_addr() {
            self.state
                .reserve_membership_source(SourceKey::from(addr.ip()));
        }
        Ok(Response::new(Box::pin(HeartbeatStream {
            inbound: request.into_inner(),
            allow: self.state.cfg.raw.membership.advertise_allow.clone(),
            max_weight: self.state.cfg.raw.cluster.max_weight,
            state: self.state.clone(),
            peer,
            current: None,
            agent_silence_ms: 0,
            counters: StreamCounters::new(),
            done: false,
        })))
    }
}

/// One gateway's heartbeat stream, answered as it is read: the replies are
/// produced by the task that sends them (no task or channel of its own per
/// stream, which at 4,000 heartbeats a second was two wake-ups each).
/// Dropped when the stream ends whichever way (the gateway closed it, the
/// connection broke, a refusal), which is when the member hears of it.
struct HeartbeatStream {
    inbound: Streaming<HeartbeatRequest>,
    state: Arc<RouterState>,
    peer: PeerIdentity,
    allow: Vec<IpAddr>,
    max_weight: u32,
    current: Option<Incarnation>,
    /// The last `agent_silence_ms` handed to the state (0: none): the
    /// state hears of it when it changes, not per heartbeat.
    agent_silence_ms: u32,
    counters: StreamCounters,
    done: bool,
}

/// The counters every heartbeat moves, looked up once per stream: a
/// registry lookup hashes the metric's key, per heartbeat that was ~2 % of
/// the router's CPU at 1,000 members.
struct StreamCounters {
    accepted: metrics::Counter,
    views_omitted: metrics::Counter,
    view_deltas: metrics::Counter,
}

impl StreamCounters {
    fn new() -> Self {
        StreamCounters {
            accepted: counter!(m::HEARTBEATS, "verdict" => "accepted"),
            views_omitted: counter!(m::VIEWS_OMITTED),
            view_deltas: counter!(m::VIEW_DELTAS),
        }
    }
}

impl HeartbeatStream {
    fn refuse(&mut self, r: Refusal, msg: String) -> Result<HeartbeatReply, Status> {
        self.done = true;
        Err(refused(r, msg))
    }

    fn answer(&mut self, msg: &HeartbeatRequest) -> Result<HeartbeatReply, Status> {
        let hb = match check_request(msg, &self.peer, &self.allow, self.max_weight) {
            Ok(hb) => hb,
            Err((r, text)) => return self.refuse(r, text),
        };
        if self.current.is_some_and(|i| i != hb.incarnation) {
            return self.refuse(
                Refusal::Malformed,
                "incarnation changed within one stream".into(),
            );
        }
        let state: &RouterState = &self.state;
        // Before anything of it is believed: a gateway with another
        // cluster secret must never become a member (issue 18 M2).
        let Ok(proof_keys) = proof_keys(state, msg) else {
            return self.refuse(
                Refusal::Secret,
                "cluster secret mismatch: the heartbeat's proof verifies under \
                 none of this router's keys"
                    .into(),
            );
        };
        let first = self.current.is_none();
        if first {
            info!(node = %hb.node_id, "heartbeat stream from gateway");
        }
        let verdict = state.on_heartbeat(&hb);
        if first {
            // After the heartbeat, which may have created the member.
            state.on_stream_opened(&hb.node_id, hb.incarnation);
        }
        // Only now: `Drop` closes what was opened, nothing else.
        self.current = Some(hb.incarnation);
        let superseded = verdict == HeartbeatVerdict::Superseded;
        if superseded {
            counter!(m::HEARTBEATS, "verdict" => "superseded").increment(1);
            self.done = true;
        } else {
            self.counters.accepted.increment(1);
            if msg.agent_silence_ms != self.agent_silence_ms {
                self.agent_silence_ms = msg.agent_silence_ms;
                state.set_agent_silence(&hb.node_id, hb.incarnation, msg.agent_silence_ms);
            }
        }
        Ok(reply_for(
            state,
            &self.counters,
            msg.sequence,
            &msg.known_view_id,
            msg.accepts_view_delta,
            superseded,
            proof_keys,
        ))
    }
}

impl Stream for HeartbeatStream {
    type Item = Result<HeartbeatReply, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inbound).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(msg))) => Poll::Ready(Some(self.answer(&msg))),
            Poll::Ready(None | Some(Err(_))) => {
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for HeartbeatStream {
    fn drop(&mut self) {
        if let Some(inc) = self.current {
            debug!(node = %self.peer.node_id, "heartbeat stream closed");
            self.state.on_stream_closed(&self.peer.node_id, inc);
        }
    }
}

/// The key a gateway's secret proof verifies under: `Ok(None)` for a gateway
/// one version older (no proof), unless proofs are required; `Err` for none
/// of ours (another secret).
fn proof_keys<'a>(
    state: &'a RouterState,
    req: &HeartbeatRequest,
) -> Result<Option<&'a ClusterKeys>, ()> {
    if req.secret_proof.is_empty() {
        return if state.cfg.raw.membership.require_secret_proof {
            Err(())
        } else {
            Ok(None)
        };
    }
    let verifies = |k: &ClusterKeys| {
        verify_gateway_proof(
            k,
            &req.node_id,
            req.incarnation,
            req.sequence,
            &req.secret_proof,
        )
    };
    std::iter::once(state.keys())
        .chain(state.previous_keys())
        .find(|k| verifies(k))
        .map(Some)
        .ok_or(())
}

/// The reply to heartbeat `sequence`. The view's members travel only when
/// the gateway does not already hold this view (`known_view_id`): a steady
/// cluster's replies stay the same size whatever its membership.
fn reply_for(
    state: &RouterState,
    counters: &StreamCounters,
    sequence: u64,
    known_view_id: &[u8],
    accepts_delta: bool,
    superseded: bool,
    proof_keys: Option<&ClusterKeys>,
) -> HeartbeatReply {
    let router_id = state.cfg.router_id.to_string();
    // Borrowed, not copied: at 1,000 members a copy per reply was a fifth
    // of the router's CPU. A gateway holding a recent view gets what
    // changed (a delta), not the whole view: after a change, 1,000
    // gateways each fetching 1,000 members was the cluster's N².
    let (view_id, omit, members, removed, base, vnodes_per_weight) = state.with_view(|view| {
        let view_id = view.id().0.to_vec();
        let omit = !known_view_id.is_empty() && known_view_id == view_id.as_slice();
        let delta = (!omit && accepts_delta && !known_view_id.is_empty() && !view.is_empty())
            .then(|| state.view_delta(known_view_id, view))
            .flatten();
        let (members, removed, base) = match delta {
            _ if omit => (Vec::new(), Vec::new(), Vec::new()),
            // Not when it is no smaller than the view (a gateway that held
            // the view of a cluster still starting).
            Some(d) if d.added.len() + d.removed.len() < view.members().len() => {
                (d.added.clone(), d.removed.clone(), known_view_id.to_vec())
            }
            _ => (
                jvpn_proto::ring::members_to_reply(view),
                Vec::new(),
                Vec::new(),
            ),
        };
        (
            view_id,
            omit,
            members,
            removed,
            base,
            view.params().vnodes_per_weight,
        )
    });
    if omit {
        counters.views_omitted.increment(1);
    } else if !base.is_empty() {
        counters.view_deltas.increment(1);
    }
    HeartbeatReply {
        sequence,
        secret_proof: proof_keys
            .map(|k| router_proof(k, &router_id, sequence, &view_id))
            .unwrap_or_default(),
        view_id,
        members,
        members_omitted: omit,
        delta_base_view_id: base,
        members_removed: removed,
        router_listeners: if omit {
            Vec::new()
        } else {
            state.listeners().to_vec()
        },
        ring: Some(RingParameters {
            vnodes_per_weight,
            key_id: u32::from(state.keys().key_id()),
        }),
        lease_duration_ms: state.cfg.raw.membership.lease_timeout_ms,
        superseded,
        router_id,
    }
}
