//! Session I/O: HELLO and RESUME through the engine, then the attached
//! loop (pings, data, in-session RESUME, control from the engine) and the
//! frames it writes.

use jvpn_runtime::tls::export;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use jvpn_proto::channel::ChannelError;
use jvpn_proto::client::ExportError;
use jvpn_proto::crypto::{
    CHANNEL_BINDING_LABEL, ChannelBinding, RESUME_KEY_LABEL, ResumeKey, resume_key_context,
};
use jvpn_proto::frame;
use jvpn_proto::pb::session::{GoAway, Pong, Reject, ResumeOk, Terminate, frame::Kind};
use jvpn_proto::{ReasonCode, SessionId};
use jvpn_runtime::channel_io::{Generation, SessionChannel};
use jvpn_runtime::wire::{SharedIo, lock, read_frame, write_frame};
use metrics::{counter, histogram};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug};

use super::state::{Control, Shared};
use super::stored::Fence;
use crate::engine::{
    Conn, HelloRequest, Mono, Rejection, ResumeRequest, Takeover, Termination, TransportId,
    shard_of,
};
use crate::gate::{hello_lease_holds, hello_placement};
use crate::metrics::{self as m, ConnReject};

type Tls = TlsStream<TcpStream>;

/// When the agent's certificate expires, on the engine's clock: a session
/// never outlives its credential. The certificate was verified moments ago,
/// so a parse failure here is unexpected and leaves only the policy lifetime.
fn cert_expiry(der: &[u8], now: Mono) -> Option<Mono> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    // Wall-clock time is needed to read an X.509 date; it is used once, here.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let left = u64::try_from(not_after)
        .ok()?
        .saturating_sub(wall.as_secs());
    Some(now + Duration::from_secs(left))
}

/// The subject common name of a certificate, if it has one.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

fn channel_binding(tls: &Tls) -> Result<ChannelBinding, ExportError> {
    export(tls.get_ref().1, CHANNEL_BINDING_LABEL, &[])
}

/// The session key the engine stores. The channel binding of this
/// connection was exported already, so this cannot fail; if it ever did, a
/// random key fails closed (no proof made by the agent would verify).
fn resume_key(tls: &Tls, ctx: &[u8]) -> ResumeKey {
    ResumeKey::new(
        export(tls.get_ref().1, RESUME_KEY_LABEL, ctx).unwrap_or_else(|_| rand::random()),
    )
}

/// `HelloOk.via_router` (design note 66): through jvpn routers, which
/// route every RESUME to its owner; directly; or through a plain proxy
/// (static PROXY mode, no membership), which may send a RESUME to any
/// gateway, so the agent is told nothing and keeps its older rules.
fn reached_through(from_router: bool, membership: bool) -> Option<bool> {
    match (from_router, membership) {
        (false, _) => Some(false),
        (true, true) => Some(true),
        (true, false) => None,
    }
}

/// How a HELLO's connection reached this gateway.
pub(super) struct Via<'a> {
    /// The router its PROXY header named, if any.
    pub router_id: Option<&'a str>,
    /// It came from a configured router (told to the agent: design note 66).
    pub router: bool,
}

pub(super) async fn do_hello(
    shared: &Arc<Shared>,
    mut tls: Tls,
    buf: BytesMut,
    hello: jvpn_proto::pb::session::Hello,
    accepted_at: Instant,
    via: Via<'_>,
) -> Result<(), ConnReject> {
    let router_id = via.router_id;
    let refuse = |r: ReasonCode| {
        debug_assert!(m::HELLO_REFUSALS.contains(&r), "{r:?} has no series at 0");
        counter!(m::HELLOS, "result" => r.as_str()).increment(1);
    };
    if hello.protocol_version != jvpn_proto::PROTOCOL_VERSION {
        refuse(ReasonCode::ProtocolError);
        let _ = send_reject(&mut tls, ReasonCode::ProtocolError, 0, 0).await;
        return Err(ConnReject::ProtocolError);
    }
    let Ok(binding) = channel_binding(&tls) else {
        refuse(ReasonCode::ProtocolError);
        return Err(ConnReject::ProtocolError);
    };
    let now = shared.now();
    // The engine's principal names the exact credential; the egress
    // policy's is the name an operator writes in rules.
    let (principal, egress_principal, credential_expiry): (Arc<str>, Arc<str>, Option<Mono>) =
        match tls.get_ref().1.peer_certificates() {
            Some([leaf, ..]) => {
                let id: Arc<str> = Arc::from(format!(
                    "cert:{}",
                    &blake3::hash(leaf.as_ref()).to_hex()[..16]
                ));
                let name = common_name(leaf.as_ref()).map_or_else(|| id.clone(), Arc::from);
                (id, name, cert_expiry(leaf.as_ref(), now))
            }
            _ if shared.token_ok(&hello.auth) => {
                (Arc::from("dev-token"), Arc::from("dev-token"), None)
            }
            _ => {
                refuse(ReasonCode::AuthFailed);
                let _ = send_reject(&mut tls, ReasonCode::AuthFailed, 0, 0).await;
                return Err(ConnReject::AuthFailed);
            }
        };
    if shared.draining.load(Ordering::Relaxed) {
        refuse(ReasonCode::Draining);
        let _ = send_reject(&mut tls, ReasonCode::Draining, 0, 0).await;
        return Err(ConnReject::Draining);
    }
    // Fencing: mint only under a valid lease with the forwarding router
    // (a direct HELLO needs leases with a majority of routers).
    let cluster = shared.cluster.as_deref();
    let Ok(placement) = hello_placement(cluster, router_id, shared.now()) else {
        refuse(ReasonCode::NotInCluster);
        let _ = send_reject(&mut tls, ReasonCode::NotInCluster, 250, 0).await;
        return Err(ConnReject::NoLease);
    };
    let n = shared.shards.len();
    let shard = shared.next_hello_shard.fetch_add(1, Ordering::Relaxed) % n;
    let transport = TransportId(shared.next_transport.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = mpsc::unbounded_channel();
    shared.register(shard, transport, tx);
    let r = shared.with_engine(shard, |e| {
        e.set_placement(placement);
        e.hello(
            now,
            HelloRequest {
                transport,
                principal: principal.clone(),
                credential_expiry,
            },
            |ctx| resume_key(&tls, ctx),
        )
    });
    let acc = match r {
        Ok(acc) => acc,
        Err(rej) => {
            shared.deregister(shard, transport);
            refuse(rej.reason);
            let _ = send_rejection(&mut tls, &rej).await;
            return Ok(());
        }
    };
    let end_of_life = shared.with_engine(shard, |e| {
        e.session(&acc.session_id).map(|s| s.end_of_life())
    });
    // Topology 3: recorded in the store before anything of the session
    // reaches the agent; a store that cannot decide refuses the HELLO.
    if let Some(st) = shared.store.get() {
        let key = export(
            tls.get_ref().1,
            RESUME_KEY_LABEL,
            &resume_key_context(&acc.session_id, acc.binding_epoch),
        );
        // Absolute: a taker restores the session's lifetime from it.
        let left = end_of_life.map(|t| t.saturating_since(now));
        let who = super::stored::Principal {
            name: &egress_principal,
            credential: &principal,
            migrates: hello.migration,
            end_of_life_unix_ms: left.map_or(0, |d| {
                super::stored::unix_ms_now()
                    .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
        };
        let r = match key {
            Ok(k) => {
                let write = st.on_hello(shared, &acc.session_id, who, acc.binding_epoch, &k);
                holding(shared, shard, &acc.session_id, transport, write).await
            }
            Err(_) => Err(ReasonCode::ProtocolError),
        };
        if let Err(reason) = r {
            shared.abandon(
                shard,
                &acc.session_id,
                transport,
                Termination::StoreUnavailable,
            );
            refuse(reason);
            let _ = send_reject(&mut tls, reason, 250, 0).await;
            return Ok(());
        }
    }
    let (resume_token, token_key_id) = shared.seal_token(acc.session_id);
    let mut ok = acc.to_wire(
        &shared.cfg.node_id,
        shared.incarnation,
        resume_token,
        token_key_id,
    );
    // Recorded in a shared store: a taker may carry it on (topology 3).
    ok.migratable = hello.migration && shared.store.get().is_some();
    ok.via_router = reached_through(via.router, cluster.is_some());
    let keepalive = keepalive(shared, shard, &acc.session_id, hello.keepalive, &tls);
    ok.keepalive_ms = announced(keepalive);
    // An agent that asks for a channel gets one; an older agent echoes.
    let fence = shared.store.get().map(|st| st.fence_of(&acc.session_id));
    let channel = hello.channel.then(|| {
        let (ch, window) =
            super::streams::open(shared, shard, acc.session_id, egress_principal, fence);
        // The window the channel was made with, not a re-read of a policy
        // a reload may have changed meanwhile.
        ok.channel_window = window;
        ok.channel_finish = true;
        let first = ch.first();
        (ch, first)
    });
    if let Some(reason) = gone_meanwhile(shared, shard, &acc.session_id, transport, end_of_life) {
        refuse(reason);
        let _ = send_reject(&mut tls, reason, 250, 0).await;
        return Ok(());
    }
    if !hello_lease_holds(cluster, router_id, shared.now()) {
        // The lease lapsed while minting: this HelloOk must not be written.
        shared.abandon(shard, &acc.session_id, transport, Termination::LeaseLost);
        refuse(ReasonCode::NotInCluster);
        let _ = send_reject(&mut tls, ReasonCode::NotInCluster, 250, 0).await;
        return Err(ConnReject::NoLease);
    }
    shared.events.answered(
        shared.now(),
        &acc.session_id,
        crate::engine::STICKY_OWNER_EPOCH,
        "hello_ok",
    );
    answering(shared, shard, &acc.session_id, transport);
    if write_frame(&mut tls, Kind::HelloOk(ok)).await.is_err() {
        shared.answer_lost(shard, &acc.session_id, transport);
        return Ok(());
    }
    counter!(m::HELLOS, "result" => "ok").increment(1);
    histogram!(m::HELLO_SECONDS).record(accepted_at.elapsed().as_secs_f64());
    let at = Attached {
        shard,
        sid: acc.session_id,
        transport,
        binding,
        channel,
        keepalive,
    };
    spawn_session_loop(shared, at, tls, buf, rx);
    Ok(())
}

pub(super) async fn do_resume(
    shared: &Arc<Shared>,
    mut tls: Tls,
    mut buf: BytesMut,
    mut resume: jvpn_proto::pb::session::Resume,
    accepted_at: Instant,
    takeover: bool,
) -> Result<(), ConnReject> {
    let transport = TransportId(shared.next_transport.fetch_add(1, Ordering::Relaxed));
    let Ok(binding) = channel_binding(&tls) else {
        counter!(m::RESUMES, "result" => ReasonCode::ProtocolError.as_str()).increment(1);
        return Err(ConnReject::ProtocolError);
    };
    // Topology 3: a RESUME the router sent here because its owner died,
    // for a session this gateway does not have: claim it from the store.
    if takeover
        && let Some(st) = shared.store.get()
        && let Some(req) = ResumeRequest::from_wire(&resume)
    {
        let shard = shard_of(&req.session_id, shared.shards.len());
        let here = shared.with_engine(shard, |e| e.session(&req.session_id).is_some());
        if !here {
            let at = TakeoverConn {
                binding,
                transport,
                accepted_at,
            };
            return take_over(shared, st, tls, buf, &resume, at).await;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    // A client may retry on the same connection (e.g. after stale_binding);
    // each attempt carries a fresh counter and is bound to this connection.
    for _attempt in 0..4 {
        match resume_once(shared, &tls, &binding, transport, &resume, Some(&tx)) {
            Ok((sid, shard, mut ok, _)) => {
                // Topology 3: the binding change is in the store before
                // the agent hears of it; if it cannot be, the session ends.
                if let Some(st) = shared.store.get() {
                    let key = export(
                        tls.get_ref().1,
                        RESUME_KEY_LABEL,
                        &resume_key_context(&sid, ok.binding_epoch),
                    )
                    .ok();
                    let write = st.on_resume(&sid, ok.binding_epoch, key);
                    if let Err(reason) = holding(shared, shard, &sid, transport, write).await {
                        shared.abandon(shard, &sid, transport, Termination::StoreUnavailable);
                        counter!(m::RESUMES, "result" => reason.as_str()).increment(1);
                        let _ = send_terminate(&mut tls, reason).await;
                        return Ok(());
                    }
                }
                let Ok(channel) = resume_channel(shared, shard, &sid, resume.received, &mut ok)
                else {
                    // The channel cannot go on byte-exactly: the session
                    // ended, and the agent hears why instead of a ResumeOk.
                    counter!(m::RESUMES, "result" => ReasonCode::ProtocolError.as_str())
                        .increment(1);
                    shared.deregister(shard, transport);
                    let _ = send_terminate(&mut tls, ReasonCode::ProtocolError).await;
                    return Ok(());
                };
                counter!(m::RESUMES, "result" => "ok").increment(1);
                let keepalive = keepalive(shared, shard, &sid, resume.keepalive, &tls);
                ok.keepalive_ms = announced(keepalive);
                if let Some(st) = shared.store.get()
                    && !holding(shared, shard, &sid, transport, st.fence_of(&sid).regained()).await
                {
                    // The lease went between the write and now, and the
                    // session could not move to the next.
                    shared.abandon(shard, &sid, transport, Termination::StoreUnavailable);
                    let _ = send_terminate(&mut tls, ReasonCode::StoreUnavailable).await;
                    return Ok(());
                }
                shared
                    .events
                    .answered(shared.now(), &sid, ok.owner_epoch, "resume_ok");
                answering(shared, shard, &sid, transport);
                if write_frame(&mut tls, Kind::ResumeOk(ok)).await.is_err() {
                    shared.answer_lost(shard, &sid, transport);
                    return Ok(());
                }
                histogram!(m::RESUME_SECONDS).record(accepted_at.elapsed().as_secs_f64());
                let at = Attached {
                    shard,
                    sid,
                    transport,
                    binding,
                    channel,
                    keepalive,
                };
                spawn_session_loop(shared, at, tls, buf, rx);
                return Ok(());
            }
            Err(rej) => {
                if send_rejection(&mut tls, &rej).await.is_err() {
                    return Ok(());
                }
            }
        }
        let t = Duration::from_millis(shared.cfg.raw.timeouts.first_frame_timeout_ms);
        match tokio::time::timeout(t, read_frame(&mut tls, &mut buf)).await {
            Ok(Ok(Some(Kind::Resume(r)))) => resume = r,
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// The answer on `transport` goes out now: the engine's liveness clock
/// for it, started when the HELLO or RESUME committed, starts again, so
/// that what came between (a store write that waited out an etcd leader
/// change) does not retire the transport just after its answer. It only
/// moves later, and only while `transport` is still the binding.
fn answering(shared: &Shared, shard: usize, sid: &SessionId, transport: TransportId) {
    let now = shared.now();
    shared.with_engine(shard, |e| e.activity(now, sid, transport));
}

/// Runs `work` (the store's part of an answer) while `transport`'s
/// liveness clock is kept from running out: its agent is waiting for this
/// side, not silent. A store write can wait out an etcd leader change
/// (up to its patience), longer than a heartbeat timeout.
async fn holding<F: std::future::Future>(
    shared: &Shared,
    shard: usize,
    sid: &SessionId,
    transport: TransportId,
    work: F,
) -> F::Output {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            () = tokio::time::sleep(HOLD_STEP) => answering(shared, shard, sid, transport),
        }
    }
}

/// How often [`holding`] moves the clock: below any heartbeat timeout a
/// policy can set.
const HOLD_STEP: Duration = Duration::from_millis(50);

/// A session accepted on `transport` may have ended (its lifetime or
/// credential ran out, a drain, an operator) while it was recorded or its
/// channel opened: the end's clean-up found neither yet (design note 57).
/// Then both are undone here and the answer must be a refusal, for the
/// reason returned: a `HelloOk` or `ResumeOk` would name a session that
/// no longer exists, and its record would stay in the store for good.
fn gone_meanwhile(
    shared: &Shared,
    shard: usize,
    sid: &SessionId,
    transport: TransportId,
    end_of_life: Option<Mono>,
) -> Option<ReasonCode> {
    if shared.with_engine(shard, |e| e.session(sid).is_some()) {
        return None;
    }
    shared.ended(shard, sid, "session ended");
    shared.deregister(shard, transport);
    Some(if shared.draining.load(Ordering::Relaxed) {
        ReasonCode::Draining
    } else if shared.store.get().is_some_and(|st| !st.serves()) {
        // Fenced: the lease went while the answer was made.
        ReasonCode::StoreUnavailable
    } else if end_of_life.is_none_or(|t| t <= shared.now()) {
        // As for a credential already expired at the handshake.
        ReasonCode::AuthFailed
    } else {
        ReasonCode::InvalidTransition
    })
}

/// The connection a takeover arrived on.
struct TakeoverConn {
    binding: ChannelBinding,
    transport: TransportId,
    accepted_at: Instant,
}

/// Topology 3's takeover on the taker: the claim in the store (which
/// checks the RESUME's proof with the stored key first), then the session
/// installed in the engine at the claimed epochs, a fresh channel if the
/// agent has a data plane (the old one's streams died with their owner),
/// and a `ResumeOk` carrying the higher owner epoch and a server proof
/// under the stored key. A refusal changes nothing here: `unknown_session`
/// when the agent could not prove the session (it re-handshakes),
/// `owner_unreachable` with a retry hint while the old owner's lease is
/// not seen gone, `store_unavailable` when the store cannot decide.
async fn take_over(
    shared: &Arc<Shared>,
    st: &Arc<super::stored::Stored>,
    mut tls: Tls,
    buf: BytesMut,
    resume: &jvpn_proto::pb::session::Resume,
    at: TakeoverConn,
) -> Result<(), ConnReject> {
    let Some(req) = ResumeRequest::from_wire(resume) else {
        return Err(ConnReject::ProtocolError);
    };
    let sid = req.session_id;
    let shard = shard_of(&sid, shared.shards.len());
    async fn refuse(tls: &mut Tls, reason: ReasonCode) {
        counter!(m::RESUMES, "result" => reason.as_str()).increment(1);
        let retry = match reason {
            ReasonCode::OwnerUnreachable | ReasonCode::StoreUnavailable => 250,
            _ => 0,
        };
        let _ = send_reject(tls, reason, retry, 0).await;
    }
    let claimed = st
        .take_over(shared, &req, &at.binding, |epoch| {
            export(
                tls.get_ref().1,
                RESUME_KEY_LABEL,
                &resume_key_context(&sid, epoch),
            )
            .ok()
        })
        .await;
    let claimed = match claimed {
        Ok(c) => c,
        Err(reason) => {
            refuse(&mut tls, reason).await;
            return Ok(());
        }
    };
    let rec = &claimed.record;
    let (tx, rx) = mpsc::unbounded_channel();
    shared.register(shard, at.transport, tx);
    let now = shared.now();
    // The record's absolute end, on this process's clock, read now.
    let left = rec
        .end_of_life_unix_ms
        .saturating_sub(super::stored::unix_ms_now());
    let end_of_life = now + Duration::from_millis(left);
    let adopted = shared.with_engine(shard, |e| {
        e.adopt(
            now,
            Takeover {
                session_id: sid,
                conn: Conn {
                    transport: at.transport,
                    binding: &at.binding,
                },
                counter: req.counter,
                used_key: &claimed.used_key,
                principal: Arc::from(rec.credential.as_str()),
                end_of_life,
                owner_epoch: rec.owner_epoch,
                binding_epoch: rec.binding_epoch,
                state_version: rec.state_version,
            },
            |ctx| resume_key(&tls, ctx),
        )
    });
    let acc = match adopted {
        Ok(acc) => acc,
        Err(rej) => {
            shared.deregister(shard, at.transport);
            refuse(&mut tls, rej.reason).await;
            return Ok(());
        }
    };
    // Fenced like any recorded session from here; a lease lost since the
    // claim ends it before anything is said.
    if !st.adopted(&sid, &claimed) {
        shared.abandon(shard, &sid, at.transport, Termination::StoreUnavailable);
        refuse(&mut tls, ReasonCode::StoreUnavailable).await;
        return Ok(());
    }
    let (resume_token, token_key_id) = shared.seal_token(sid);
    let mut ok = acc.to_wire(
        &shared.cfg.node_id,
        shared.incarnation,
        resume_token,
        token_key_id,
    );
    // The agent's data plane starts over: a fresh channel, offset 0.
    let channel = resume.received.is_some().then(|| {
        let (ch, window) = super::streams::open(
            shared,
            shard,
            sid,
            Arc::from(rec.principal.as_str()),
            shared.store.get().map(|st| st.fence_of(&sid)),
        );
        ok.channel_window = window;
        ok.received = Some(0);
        let first = ch.first();
        (ch, first)
    });
    let keepalive = keepalive(shared, shard, &sid, resume.keepalive, &tls);
    ok.keepalive_ms = announced(keepalive);
    // Ended since the engine adopted it (another thread: a drain, its
    // end of life): the end found neither the record nor the channel.
    if let Some(reason) = gone_meanwhile(shared, shard, &sid, at.transport, Some(end_of_life)) {
        refuse(&mut tls, reason).await;
        return Ok(());
    }
    if !st.fence_of(&sid).holds() {
        shared.abandon(shard, &sid, at.transport, Termination::StoreUnavailable);
        refuse(&mut tls, ReasonCode::StoreUnavailable).await;
        return Ok(());
    }
    shared
        .events
        .answered(shared.now(), &sid, ok.owner_epoch, "resume_ok");
    answering(shared, shard, &sid, at.transport);
    if write_frame(&mut tls, Kind::ResumeOk(ok)).await.is_err() {
        shared.answer_lost(shard, &sid, at.transport);
        return Ok(());
    }
    counter!(m::RESUMES, "result" => "ok").increment(1);
    histogram!(m::RESUME_SECONDS).record(at.accepted_at.elapsed().as_secs_f64());
    debug!("store: session taken over from its dead owner");
    let attached = Attached {
        shard,
        sid,
        transport: at.transport,
        binding: at.binding,
        channel,
        keepalive,
    };
    spawn_session_loop(shared, attached, tls, buf, rx);
    Ok(())
}

/// One RESUME through the engine; on success the transport is registered.
fn resume_once(
    shared: &Arc<Shared>,
    tls: &Tls,
    binding: &ChannelBinding,
    transport: TransportId,
    r: &jvpn_proto::pb::session::Resume,
    register: Option<&mpsc::UnboundedSender<Control>>,
) -> Result<(SessionId, usize, ResumeOk, Option<TransportId>), Rejection> {
    // Label values are static strings: no allocation per RESUME.
    let count = |reason: &'static str| {
        debug_assert!(
            reason == "ok" || m::RESUME_REFUSALS.iter().any(|r| r.as_str() == reason),
            "{reason} has no series at 0"
        );
        counter!(m::RESUMES, "result" => reason).increment(1);
    };
    let Some(req) = ResumeRequest::from_wire(r) else {
        count(ReasonCode::UnknownSession.as_str());
        return Err(Rejection::quiet(ReasonCode::UnknownSession));
    };
    let sid = req.session_id;
    let shard = shard_of(&sid, shared.shards.len());
    if let Some(tx) = register {
        shared.register(shard, transport, tx.clone());
    }
    let now = shared.now();
    let res = shared.with_engine(shard, |e| {
        e.resume(now, &req, Conn { transport, binding }, |ctx| {
            resume_key(tls, ctx)
        })
    });
    match res {
        // Counted `ok` by the caller, once the store (if any) took it.
        Ok(acc) => {
            let (resume_token, token_key_id) = shared.seal_token(sid);
            Ok((
                sid,
                shard,
                acc.to_wire(
                    &shared.cfg.node_id,
                    shared.incarnation,
                    resume_token,
                    token_key_id,
                ),
                acc.replaced,
            ))
        }
        Err(rej) => {
            if register.is_some() {
                shared.deregister(shard, transport);
            }
            count(rej.reason.as_str());
            Err(rej)
        }
    }
}

/// Which session a connection is attached to, and that connection's binding.
/// Gateway keep-alives for a transport whose agent asked for them (design
/// note 52), if the session's policy has them. The agent then only checks
/// in, so this side's evidence of the path is TCP's: a keep-alive left
/// unacknowledged for the heartbeat timeout aborts the connection.
fn keepalive(
    shared: &Shared,
    shard: usize,
    sid: &SessionId,
    asked: bool,
    tls: &Tls,
) -> Option<Duration> {
    if !asked {
        return None;
    }
    let (k, timeout) = shared.with_engine(shard, |e| {
        e.session(sid).map(|s| {
            (
                s.policy().keepalive_interval(),
                s.policy().heartbeat_timeout(),
            )
        })
    })?;
    let k = k?;
    if let Err(e) = socket2::SockRef::from(tls.get_ref().0).set_tcp_user_timeout(Some(timeout)) {
        // Without it a silent agent's dead path would go unnoticed here:
        // the agent keeps pinging instead.
        debug!(error = %e, "TCP_USER_TIMEOUT refused: no keep-alives");
        return None;
    }
    Some(k)
}

/// `keepalive_ms` for `HelloOk` / `ResumeOk`.
fn announced(k: Option<Duration>) -> u64 {
    k.map_or(0, |k| u64::try_from(k.as_millis()).unwrap_or(u64::MAX))
}

struct Attached {
    shard: usize,
    sid: SessionId,
    transport: TransportId,
    binding: ChannelBinding,
    /// The session's data-plane channel and this transport's generation
    /// of it (`None`: the session echoes `Data`, as before channels).
    channel: Option<(SessionChannel, Generation)>,
    /// Gateway keep-alives on this transport (the agent asked, the policy
    /// has them): send one when nothing went out for this long.
    keepalive: Option<Duration>,
}

/// Topology 3: the session's owner lease no longer serves (checked on
/// every frame read and before every write, not only by the fence loop):
/// nothing of the session moves until it is recorded under the next lease
/// (within a TTL); if it cannot be, it ends now, explicitly, and nothing
/// more of it leaves this process.
async fn fenced(shared: &Shared, fence: Option<&Fence>, shard: usize, sid: &SessionId) -> bool {
    let Some(f) = fence.filter(|f| !f.holds()) else {
        return false;
    };
    if f.clone().regained().await {
        return false;
    }
    let now = shared.now();
    shared.with_engine(shard, |e| {
        e.terminate(now, sid, Termination::StoreUnavailable)
    });
    true
}

/// The agent broke the channel's rules: the session ends (its streams
/// could no longer be byte-exact), counted, and nothing else is touched.
fn channel_broken(shared: &Shared, shard: usize, sid: &SessionId, why: &ChannelError) {
    counter!(m::CHANNEL_ERRORS).increment(1);
    debug!(error = %why, "session channel broken");
    let now = shared.now();
    shared.with_engine(shard, |e| e.terminate(now, sid, Termination::ChannelBroken));
}

/// A RESUME was accepted: the session's channel (if it has one) continues
/// on this transport from the offset the agent holds, and the `ResumeOk`
/// says what this side holds. A session with a channel resumed without an
/// offset, or with one out of range, cannot continue byte-exactly: it ends
/// (`Err`). `Ok(None)`: the session has no channel.
fn resume_channel(
    shared: &Shared,
    shard: usize,
    sid: &SessionId,
    agent_received: Option<u64>,
    ok: &mut ResumeOk,
) -> Result<Option<(SessionChannel, Generation)>, ()> {
    let Some(ch) = lock(&shared.shards[shard].channels).get(sid).cloned() else {
        return Ok(None);
    };
    let Some(offset) = agent_received else {
        channel_broken(
            shared,
            shard,
            sid,
            &ChannelError::ResumeOutOfRange {
                offset: 0,
                acked: 0,
                sent: 0,
            },
        );
        return Err(());
    };
    match ch.resume_from(offset) {
        Ok(r) => {
            counter!(m::CHANNEL_RESENT).increment(r.resent);
            // Read after the generation moved: nothing from an older
            // transport is taken in any more, so this is exact.
            ok.received = Some(ch.received());
            Ok(Some((ch, r.generation)))
        }
        Err(e) => {
            channel_broken(shared, shard, sid, &e);
            Err(())
        }
    }
}

/// What ended an attached connection; `Some(reason)`: the transport failed
/// and the engine must hear about it.
type End = Option<ReasonCode>;

/// Hands an attached connection to a task of its own. The connection's
/// first task (TLS handshake, preamble, HELLO/RESUME checks) has a future
/// of several KiB that would otherwise stay allocated for the session's
/// whole life; the attached loop's is a fraction of that, and the TLS
/// stream moves to the heap once (into the shared I/O) instead of being
/// held by every future it passed through.
fn spawn_session_loop(
    shared: &Arc<Shared>,
    at: Attached,
    tls: Tls,
    buf: BytesMut,
    rx: mpsc::UnboundedReceiver<Control>,
) {
    // The ticket this connection's handshake issued is good while the
    // session lives.
    crate::tickets::carries(at.sid);
    // Attached after the drain's GoAways went out: told now (its answer
    // was written; the loop writes controls after it).
    if let Some(&deadline) = shared.goaway_deadline.get()
        && let Some(tx) = lock(&shared.shards[at.shard].conns).get(&at.transport)
    {
        let _ = tx.send(Control::goaway(deadline));
    }
    let shared = shared.clone();
    let open = super::conn::OpenConn::new(shared.clone());
    let io = SharedIo::new(tls);
    tokio::spawn(
        async move {
            let _open = open;
            session_loop(&shared, at, io, buf, rx).await;
        }
        .instrument(tracing::Span::current()),
    );
}

/// The attached connection: a reader and a writer side by side, so a
/// large write never stops this side from reading (and the peer's writes
/// from completing).
async fn session_loop(
    shared: &Arc<Shared>,
    at: Attached,
    mut io: SharedIo<Tls>,
    buf: BytesMut,
    mut rx: mpsc::UnboundedReceiver<Control>,
) {
    let (interval_ms, timeout_ms) = shared
        .with_engine(at.shard, |e| {
            e.session(&at.sid).map(|s| {
                (
                    s.policy().heartbeat_interval_ms,
                    s.policy().heartbeat_timeout_ms,
                )
            })
        })
        .unwrap_or((
            shared.cfg.raw.policy.heartbeat_interval_ms,
            shared.cfg.raw.policy.heartbeat_timeout_ms,
        ));
    // An agent that stops reading must not pin this task: a write that
    // cannot finish within the heartbeat timeout ends the transport.
    let write_limit = Duration::from_millis(timeout_ms);
    let report_every = Duration::from_millis(interval_ms / 2);
    let (mut rd, mut wr) = (io.clone(), io.clone());
    let fence = shared.store.get().map(|st| st.fence_of(&at.sid));
    // Replies the reader asks the writer to send (Pong, ResumeOk, echo).
    // Boxed: the queue's slots are allocated up front, and a `Kind` is
    // large; idle sessions should not pay for 16 of them.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Box<Kind>>(16);
    let heard = Heard::default();
    let mid = MidFrame::default();
    let writer = Writer {
        io: &mut wr,
        mid: &mid,
        limit: write_limit,
    };
    let end = tokio::select! {
        e = read_loop(shared, &at, fence.as_ref(), &mut rd, buf, &reply_tx, report_every, &heard) => e,
        e = write_loop(shared, &at, fence.as_ref(), writer, &mut rx, &mut reply_rx, &heard) => e,
    };
    drop((rd, wr));
    if end.is_some() {
        let now = shared.now();
        shared.with_engine(at.shard, |e| e.transport_closed(now, &at.sid, at.transport));
    }
    shared.deregister(at.shard, at.transport);
    // Both halves are gone: the last words go out on `io` alone.
    last_words(&mut io, end, &mut rx, &mid, write_limit).await;
}

/// The `Terminate` that closes a transport, when there is one to send:
/// the reader's own protocol error, or the engine's ending of the
/// transport while the reader finished first (a broken channel ends the
/// session). Then the stream is shut down.
async fn last_words<W: AsyncWrite + Unpin>(
    io: &mut W,
    end: End,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    mid: &MidFrame,
    write_limit: Duration,
) {
    let reason = match end {
        Some(reason @ (ReasonCode::ProtocolError | ReasonCode::FrameTooLarge)) => {
            counter!(m::CONNECTIONS_REJECTED, "reason" => reason.as_str()).increment(1);
            Some(reason)
        }
        _ => match rx.try_recv() {
            Ok(Control::Terminate(reason)) => Some(reason),
            _ => None,
        },
    };
    if let Some(reason) = reason.filter(|_| !mid.cut()) {
        let _ = within(write_limit, send_terminate(io, reason)).await;
    }
    let _ = tokio::time::timeout(write_limit, io.shutdown()).await;
}

/// Set while a frame is being written, cleared once it is whole. A writer
/// dropped mid-write (the reader ended first, or a write timed out) leaves
/// a frame cut short, and the agent would read any frame written after it
/// as the cut frame's remaining bytes: nothing may follow.
#[derive(Default)]
struct MidFrame(std::sync::atomic::AtomicBool);

impl MidFrame {
    async fn write<T>(
        &self,
        w: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        self.0.store(true, Ordering::Relaxed);
        let r = w.await;
        if r.is_ok() {
            self.0.store(false, Ordering::Relaxed);
        }
        r
    }

    fn cut(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// When the reader last got a frame, for the writer's keep-alives (the
/// two halves run in one task, but the task must be `Send`).
struct Heard {
    origin: Instant,
    ms: std::sync::atomic::AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Heard {
    fn now(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn since(&self) -> Duration {
        let at = self.origin + Duration::from_millis(self.ms.load(Ordering::Relaxed));
        at.elapsed()
    }
}

/// What happens on the connection while attached: frames in.
#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shared: &Arc<Shared>,
    at: &Attached,
    fence: Option<&Fence>,
    rd: &mut SharedIo<Tls>,
    mut buf: BytesMut,
    replies: &mpsc::Sender<Box<Kind>>,
    report_every: Duration,
    heard: &Heard,
) -> End {
    let (shard, sid, transport) = (at.shard, &at.sid, at.transport);
    let mut last_report = Instant::now();
    loop {
        let kind = match read_frame(rd, &mut buf).await {
            Ok(Some(k)) => k,
            Ok(None) => return Some(ReasonCode::TransportDead),
            Err(e) => return Some(e.reason()),
        };
        counter!(m::FRAMES_RECEIVED).increment(1);
        if at.keepalive.is_some() {
            heard.now();
        }
        if fenced(shared, fence, shard, sid).await {
            return None;
        }
        if last_report.elapsed() >= report_every {
            last_report = Instant::now();
            let now = shared.now();
            if !shared.with_engine(shard, |e| e.activity(now, sid, transport)) {
                return None; // no longer this session's binding
            }
        }
        let reply = match kind {
            // A check-in (seq 0) of an agent that listens for keep-alives:
            // they answer it (the agent times silence from any frame). Its
            // other pings are answered: an agent whose silence limit the
            // keep-alives do not fit pings instead.
            Kind::Ping(p) if p.seq == 0 && at.keepalive.is_some() => continue,
            Kind::Ping(p) => Kind::Pong(Pong { seq: p.seq }),
            Kind::Data(d) => match &at.channel {
                Some((ch, g)) => {
                    if let Err(e) = ch.on_data(*g, d) {
                        channel_broken(shared, shard, sid, &e);
                        return None;
                    }
                    continue;
                }
                None => {
                    // A session without a channel: the echo service.
                    let n = d.payload.len() as u64;
                    counter!(m::DATA_BYTES, "direction" => "in").increment(n);
                    counter!(m::DATA_BYTES, "direction" => "out").increment(n);
                    Kind::Data(d)
                }
            },
            Kind::Ack(a) => {
                if let Some((ch, g)) = &at.channel
                    && let Err(e) = ch.on_ack(*g, a)
                {
                    channel_broken(shared, shard, sid, &e);
                    return None;
                }
                continue;
            }
            Kind::Pong(_) => continue,
            Kind::Terminate(t) => {
                // An agent that ends the session because this side broke
                // the channel's rules says so; anything else is a close.
                let why = if t.reason == ReasonCode::ProtocolError as i32 {
                    Termination::ChannelBroken
                } else {
                    Termination::AgentClosed
                };
                let now = shared.now();
                shared.with_engine(shard, |e| e.terminate(now, sid, why));
                return None;
            }
            Kind::Resume(r) if r.session_id.as_slice() != at.sid.as_bytes() => {
                // A connection carries one session: a RESUME for another
                // one on it is a protocol error (and touches nothing else).
                let _ = r;
                return Some(ReasonCode::ProtocolError);
            }
            Kind::Resume(r) => {
                // A RESUME on the attached connection itself (a replay, or an
                // agent retrying): validated like any other. The channel
                // goes on over this same connection, so its offsets stay.
                match rd.with(|tls| resume_once(shared, tls, &at.binding, transport, &r, None)) {
                    Ok((_, _, mut ok, _)) => {
                        // Topology 3: as on a new connection, the binding
                        // change is in the store before the agent hears.
                        if let Some(st) = shared.store.get() {
                            let key = rd.with(|tls| {
                                export(
                                    tls.get_ref().1,
                                    RESUME_KEY_LABEL,
                                    &resume_key_context(sid, ok.binding_epoch),
                                )
                                .ok()
                            });
                            // Boxed: the store's request future is large,
                            // and inline it would sit in every attached
                            // session's loop, store or not, idle or not.
                            let bound = Box::pin(st.on_resume(sid, ok.binding_epoch, key));
                            if let Err(reason) = holding(shared, shard, sid, transport, bound).await
                            {
                                counter!(m::RESUMES, "result" => reason.as_str()).increment(1);
                                let now = shared.now();
                                shared.with_engine(shard, |e| {
                                    e.terminate(now, sid, Termination::StoreUnavailable)
                                });
                                return Some(reason);
                            }
                        }
                        counter!(m::RESUMES, "result" => "ok").increment(1);
                        if let Some((ch, _)) = &at.channel {
                            ok.received = Some(ch.received());
                        }
                        // The connection's keep-alives go on.
                        if r.keepalive {
                            ok.keepalive_ms = announced(at.keepalive);
                        }
                        shared
                            .events
                            .answered(shared.now(), sid, ok.owner_epoch, "resume_ok");
                        Kind::ResumeOk(ok)
                    }
                    Err(rej) => Kind::Reject(rej.to_frame()),
                }
            }
            _ => return Some(ReasonCode::ProtocolError),
        };
        if replies.send(Box::new(reply)).await.is_err() {
            return Some(ReasonCode::TransportDead);
        }
    }
}

/// What happens on the connection while attached: frames out (control from
/// the engine, the reader's replies, the channel's `Data` and `Ack`).
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    shared: &Shared,
    at: &Attached,
    fence: Option<&Fence>,
    mut wr: Writer<'_>,
    rx: &mut mpsc::UnboundedReceiver<Control>,
    replies: &mut mpsc::Receiver<Box<Kind>>,
    heard: &Heard,
) -> End {
    let mut wake = at.channel.as_ref().map(|(ch, _)| ch.wakeups());
    let mut out = BytesMut::new();
    // The HelloOk or ResumeOk has just gone out.
    let mut last_write = Instant::now();
    // Looked up once per transport, not once per keep-alive.
    let keepalives_sent = counter!(m::KEEPALIVES_SENT);
    loop {
        // Controls first, even while the channel has bytes queued: a GoAway
        // must not wait behind a download.
        while let Ok(ctl) = rx.try_recv() {
            if let Err(end) = on_control(shared, at, &mut wr, ctl).await {
                return end;
            }
        }
        // Everything the channel has for this transport, in batches.
        if let Some((ch, g)) = &at.channel {
            if !ch.is_current(*g) {
                // A newer transport carries the session's channel: this
                // one has nothing left to send (and its ack timer would
                // fire in a loop), so it ends; the engine has already
                // moved the session.
                return None;
            }
            while let Some(k) = ch.next_frame(*g, false) {
                if frame::encode(k, &mut out).is_err() {
                    return Some(ReasonCode::ProtocolError);
                }
                if out.len() >= WRITE_BATCH {
                    break;
                }
            }
        }
        if !out.is_empty() {
            if fenced(shared, fence, at.shard, &at.sid).await {
                return None;
            }
            if wr.batch(&out).await.is_err() {
                return Some(ReasonCode::TransportDead);
            }
            last_write = Instant::now();
            out.clear();
            continue;
        }
        // Nothing left to send: an idle session holds no batch buffer.
        if out.capacity() > 0 {
            out = BytesMut::new();
        }
        let ack_at = at.channel.as_ref().and_then(|(ch, _)| ch.ack_at());
        tokio::select! {
            biased;
            ctl = rx.recv() => match ctl {
                Some(ctl) => {
                    if let Err(end) = on_control(shared, at, &mut wr, ctl).await {
                        return end;
                    }
                    last_write = Instant::now();
                }
                None => return None,
            },
            r = replies.recv() => {
                // The reader ended: so does this transport.
                let k = r?;
                if fenced(shared, fence, at.shard, &at.sid).await {
                    return None;
                }
                if wr.frame(*k).await.is_err() {
                    return Some(ReasonCode::TransportDead);
                }
                last_write = Instant::now();
            }
            () = async {
                match wake.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {}
            () = async {
                match ack_at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            k = async {
                match at.keepalive {
                    Some(k) => {
                        tokio::time::sleep_until(super::state::aligned(last_write + k).into()).await;
                        k
                    }
                    None => std::future::pending().await,
                }
            } => {
                if fenced(shared, fence, at.shard, &at.sid).await {
                    return None;
                }
                let ping = Kind::Pong(Pong { seq: 0 });
                if wr.frame(ping).await.is_err() {
                    return Some(ReasonCode::TransportDead);
                }
                last_write = Instant::now();
                keepalives_sent.increment(1);
                // The agent is silent between check-ins. This side's
                // evidence of the path is TCP's (a keep-alive left
                // unacknowledged for the heartbeat timeout aborts the
                // connection), and the check-ins prove the agent is
                // there: without one for KEEPALIVE_SILENCE intervals the
                // engine's silence limit retires the transport.
                if heard.since() < k * jvpn_proto::KEEPALIVE_SILENCE {
                    let now = shared.now();
                    if !shared.with_engine(at.shard, |e| e.activity(now, &at.sid, at.transport)) {
                        return None;
                    }
                }
            }
        }
    }
}

/// Carries out one control from the engine. `Err(end)`: the writer ends
/// with `end` (`None`: the engine already unbound this transport).
async fn on_control(
    shared: &Shared,
    at: &Attached,
    wr: &mut Writer<'_>,
    ctl: Control,
) -> Result<(), End> {
    match ctl {
        // A RESUME on this very connection "replaced" it with itself (the
        // reader's in-session RESUME): it stays.
        Control::Terminate(ReasonCode::TransportReplaced) if bound(shared, at) => Ok(()),
        Control::Terminate(reason) => {
            let _ = wr.frame(terminate(reason)).await;
            Err(None)
        }
        Control::GoAway { deadline_ms } => {
            let g = GoAway {
                reason: ReasonCode::Draining as i32,
                deadline_ms,
            };
            wr.frame(Kind::GoAway(g))
                .await
                .map_err(|_| Some(ReasonCode::TransportDead))
        }
    }
}

/// Is this connection still the transport its session is bound to?
fn bound(shared: &Shared, at: &Attached) -> bool {
    shared.with_engine(at.shard, |e| {
        e.session(&at.sid).and_then(|s| s.transport()) == Some(at.transport)
    })
}

/// The writer half, its deadline, and the record of a frame cut short.
struct Writer<'a> {
    io: &'a mut SharedIo<Tls>,
    mid: &'a MidFrame,
    limit: Duration,
}

impl Writer<'_> {
    async fn frame(&mut self, k: Kind) -> std::io::Result<()> {
        let w = within(self.limit, write_frame(self.io, k));
        self.mid.write(w).await
    }

    async fn batch(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let w = write_with_progress(self.io, bytes, self.limit);
        self.mid.write(w).await
    }
}

/// Channel frames are gathered up to this many bytes per write.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes all of `bytes`, failing only when no progress is made for
/// `limit`: a slow link is not a dead one (a whole batch against one
/// deadline would cut any link below batch / limit bytes per second).
async fn write_with_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = tokio::time::timeout(limit, w.write(bytes))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    within(limit, w.flush()).await
}

/// `write` if it finishes within `limit`; a timeout is an I/O error.
async fn within(
    limit: Duration,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn send_rejection<W: AsyncWrite + Unpin>(w: &mut W, rej: &Rejection) -> std::io::Result<()> {
    write_frame(w, Kind::Reject(rej.to_frame())).await
}

pub(super) async fn send_reject<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: ReasonCode,
    retry_after_ms: u64,
    epoch: u64,
) -> std::io::Result<()> {
    let r = Reject {
        reason: reason as i32,
        retry_after_ms,
        current_binding_epoch: epoch,
        ..Reject::default()
    };
    write_frame(w, Kind::Reject(r)).await
}

pub(super) async fn send_terminate<W: AsyncWrite + Unpin>(
    w: &mut W,
    reason: ReasonCode,
) -> std::io::Result<()> {
    write_frame(w, terminate(reason)).await
}

fn terminate(reason: ReasonCode) -> Kind {
    Kind::Terminate(Terminate {
        reason: reason as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only jvpn routers (a gateway with membership) route each RESUME to
    /// its owner; a plain proxy in front says nothing of the kind.
    #[test]
    fn via_router_is_said_only_when_it_is_known() {
        assert_eq!(reached_through(false, false), Some(false));
        assert_eq!(reached_through(false, true), Some(false));
        assert_eq!(reached_through(true, true), Some(true));
        assert_eq!(reached_through(true, false), None);
    }

    /// Egress rules name principals by the certificate's common name.
    #[test]
    fn the_egress_principal_is_the_subject_common_name() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        let mut bare = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
        bare.distinguished_name = rcgen::DistinguishedName::new();
        let cert = bare.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None);
        assert_eq!(common_name(b"junk"), None);
    }

    #[test]
    fn certificate_expiry_bounds_the_session_on_the_engine_clock() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
        let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
        params.not_after = in_an_hour.into();
        let cert = params.self_signed(&key).unwrap();
        let now = Mono::from_millis(5_000);
        let exp = cert_expiry(cert.der(), now).unwrap();
        let left = exp.saturating_since(now).as_secs();
        assert!((3590..=3600).contains(&left), "{left}");
        assert_eq!(cert_expiry(b"not a certificate", now), None);
    }

    /// A frame cut short (the writer dropped mid-write when the reader
    /// ended first) is followed by nothing: a `Terminate` written after it
    /// would be read by the agent as the rest of the cut frame.
    #[tokio::test]
    async fn no_frame_follows_one_cut_short() {
        use tokio::io::AsyncReadExt;
        let data = jvpn_proto::pb::session::Data {
            seq: 0,
            payload: vec![0xA5; 1000].into(),
        };
        let big = frame::to_bytes(Kind::Data(data)).unwrap();
        let limit = Duration::from_secs(5);
        for cut in [true, false] {
            let (mut a, mut b) = tokio::io::duplex(64);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.map(|_| got)
            });
            let mid = MidFrame::default();
            if cut {
                // Polled once: 64 bytes go into the pipe, then it is dropped.
                tokio::select! {
                    biased;
                    _ = mid.write(write_with_progress(&mut a, &big, limit)) => {
                        panic!("1,000 bytes went into a 64-byte pipe nobody had read yet")
                    }
                    () = std::future::ready(()) => {}
                }
            }
            let (_tx, mut rx) = mpsc::unbounded_channel();
            last_words(
                &mut a,
                Some(ReasonCode::ProtocolError),
                &mut rx,
                &mid,
                limit,
            )
            .await;
            drop(a);
            let got = reader.await.unwrap().unwrap();
            if cut {
                assert_eq!(got, big[..64], "bytes followed a frame cut short");
            } else {
                let mut got = BytesMut::from(&got[..]);
                let k = frame::decode(&mut got).unwrap();
                assert_eq!(k, Some(terminate(ReasonCode::ProtocolError)));
                assert!(got.is_empty());
            }
        }
    }
}
