//! Connection admission: accept, the PROXY header from routers, the
//! pre-TLS gate ([`crate::gate`]), the per-source limiter, the handshake
//! budget and a TLS slot; then the TLS handshake and the first frame, which
//! hands the connection to [`super::session`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use jvpn_proto::ReasonCode;
use jvpn_proto::frame::FrameError;
use jvpn_proto::pb::session::frame::Kind;
use jvpn_proto::preamble::{PREAMBLE_LEN, Status};
use jvpn_runtime::admission::{HandshakeKind, SourceKey, Verdict};
use jvpn_runtime::wire::{lock, read_frame, send_status};
use metrics::{counter, gauge};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};

use super::session::{Via, do_hello, do_resume, send_reject, send_terminate};
use super::state::Shared;
use crate::gate::Forwarded;
use crate::metrics::{self as m, ConnReject};

/// Spawns the task that carries one accepted connection.
pub(super) fn spawn(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    counter!(m::CONNECTIONS_ACCEPTED).increment(1);
    let shared = shared.clone();
    // The span never carries the client address at info level.
    let span = info_span!("conn");
    tokio::spawn(
        async move {
            let _guard = OpenConn::new(shared.clone());
            // As this connection: its ticket lives as long as its session.
            let ended = crate::tickets::on_connection(handle_conn(&shared, stream, peer)).await;
            if let Err(why) = ended {
                counter!(m::CONNECTIONS_REJECTED, "reason" => why.as_str()).increment(1);
                debug!(%peer, reason = why.as_str(), "connection refused");
            }
        }
        .instrument(span),
    );
}

/// One open connection, counted for `max_connections` and the gauge while
/// it lives (an attached session's task takes one of its own).
pub(super) struct OpenConn(Arc<Shared>);

impl OpenConn {
    pub(super) fn new(s: Arc<Shared>) -> Self {
        let n = s.open_conns.fetch_add(1, Ordering::Relaxed) + 1;
        gauge!(m::CONNECTIONS_OPEN).set(n as f64);
        Self(s)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        let n = self
            .0
            .open_conns
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        gauge!(m::CONNECTIONS_OPEN).set(n as f64);
    }
}

/// Everything before the engine; returns why the connection ended early.
async fn handle_conn(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ConnReject> {
    let _ = stream.set_nodelay(true);
    let cfg = &shared.cfg.raw;
    if shared.open_conns.load(Ordering::Relaxed) > shared.max_connections.load(Ordering::Relaxed) {
        send_status(&mut stream, Status::Overloaded, Duration::from_millis(500)).await;
        return Err(ConnReject::Overloaded);
    }
    let t = Duration::from_millis(cfg.timeouts.preamble_timeout_ms);
    let deadline = tokio::time::Instant::now() + t;
    let from_router = shared.gate.from_router(peer.ip());
    // The address limits and logs use: the PROXY source for routers.
    let mut source = peer;
    let mut intended = None;
    let mut router_id = None;
    let mut takeover = false;
    if from_router {
        let header = read_proxy(&mut stream, deadline).await?;
        match shared.gate.proxy(header) {
            Ok(Forwarded::HealthCheck) => {
                counter!(m::HEALTH_CHECKS).increment(1);
                return Ok(());
            }
            Ok(Forwarded::Client {
                source: s,
                intended: i,
                router_id: r,
                takeover: t,
            }) => {
                source = s.unwrap_or(peer);
                intended = i;
                router_id = r;
                takeover = t;
            }
            Err(refusal) => {
                send_status(&mut stream, refusal.status, refusal.retry).await;
                return Err(refusal.reject);
            }
        }
    }
    let verdict = lock(&shared.sources).check(SourceKey::from(source.ip()), shared.now());
    if verdict.overflow() {
        counter!(m::OVERFLOW_BUCKET).increment(1);
    }
    if let Verdict::Limit(d) | Verdict::LimitOverflow(d) = verdict {
        counter!(m::RATE_LIMITED, "stage" => "source").increment(1);
        send_status(&mut stream, Status::Overloaded, d).await;
        return Err(ConnReject::RateLimited);
    }

    let mut pre = [0u8; PREAMBLE_LEN];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut pre)).await {
        Err(_) => return Err(ConnReject::PreambleTimeout),
        Ok(Err(_)) => return Err(ConnReject::BadPreamble),
        Ok(Ok(_)) => {}
    }
    let gated = {
        let mut budget = lock(&shared.budget);
        let now = shared.now();
        shared
            .gate
            .preamble(from_router, intended.as_ref(), &pre, &mut budget, now)
    };
    let kind = match gated {
        Ok(admitted) => admitted.kind,
        Err(refusal) => {
            if let Some(stage) = refusal.rate_limit_stage {
                counter!(m::RATE_LIMITED, "stage" => stage).increment(1);
            }
            send_status(&mut stream, refusal.status, refusal.retry).await;
            return Err(refusal.reject);
        }
    };
    let Some(permit) = tls_slot(shared).await else {
        let hint = lock(&shared.tls_queue).hint();
        send_status(&mut stream, Status::Overloaded, hint).await;
        return Err(ConnReject::Overloaded);
    };
    let accepted_at = Instant::now();
    gauge!(m::TLS_IN_FLIGHT).increment(1.0);
    let t = Duration::from_millis(cfg.timeouts.tls_handshake_timeout_ms);
    let acceptor = shared.acceptor.load_full();
    let tls = tokio::time::timeout(t, acceptor.accept(stream)).await;
    gauge!(m::TLS_IN_FLIGHT).decrement(1.0);
    drop(permit);
    lock(&shared.tls_queue).completed(shared.now());
    let mut tls = match tls {
        Err(_) => return Err(ConnReject::TlsTimeout),
        Ok(Err(_)) => return Err(ConnReject::TlsFailed),
        Ok(Ok(s)) => s,
    };
    if tls.get_ref().1.alpn_protocol() != Some(jvpn_proto::ALPN) {
        return Err(ConnReject::AlpnMismatch);
    }
    let tls_kind = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    counter!(m::TLS_HANDSHAKES, "kind" => tls_kind).increment(1);

    let mut buf = BytesMut::with_capacity(256);
    let t = Duration::from_millis(cfg.timeouts.first_frame_timeout_ms);
    let first = match tokio::time::timeout(t, read_frame(&mut tls, &mut buf)).await {
        Err(_) => return Err(ConnReject::FirstFrameTimeout),
        Ok(Ok(Some(k))) => k,
        Ok(Ok(None)) => return Err(ConnReject::ProtocolError),
        Ok(Err(e)) => {
            let _ = send_terminate(&mut tls, e.reason()).await;
            return Err(match e {
                FrameError::TooLarge(_) => ConnReject::FrameTooLarge,
                _ => ConnReject::ProtocolError,
            });
        }
    };
    match (kind, first) {
        // A new session's principal comes from a full handshake: a resumed
        // one would take it from a ticket, unverified since (design note
        // 45). Our agent never resumes a HELLO.
        (HandshakeKind::Hello, Kind::Hello(_)) if tls_kind == "resumed" => {
            counter!(m::HELLOS, "result" => ReasonCode::AuthFailed.as_str()).increment(1);
            let _ = send_reject(&mut tls, ReasonCode::AuthFailed, 0, 0).await;
            Err(ConnReject::AuthFailed)
        }
        (HandshakeKind::Hello, Kind::Hello(h)) => {
            let via = Via {
                router_id: router_id.as_deref(),
                router: from_router,
            };
            do_hello(shared, tls, buf, h, accepted_at, via).await
        }
        (HandshakeKind::Resume, Kind::Resume(r)) => {
            do_resume(shared, tls, buf, r, accepted_at, takeover).await
        }
        _ => {
            let _ = send_reject(&mut tls, ReasonCode::ProtocolError, 0, 0).await;
            Err(ConnReject::ProtocolError)
        }
    }
}

/// A TLS handshake slot: at once if one is free, else through the bounded
/// waiting room ([`TlsQueue`]); `None` means refuse with `overloaded`.
async fn tls_slot(shared: &Shared) -> Option<tokio::sync::SemaphorePermit<'_>> {
    if let Ok(p) = shared.tls_slots.try_acquire() {
        return Some(p);
    }
    let wait = {
        let mut q = lock(&shared.tls_queue);
        if q.enter(shared.now()).is_err() {
            counter!(m::RATE_LIMITED, "stage" => "tls_queue_full").increment(1);
            return None;
        }
        q.max_wait()
    };
    gauge!(m::TLS_QUEUE_WAITING).increment(1.0);
    let slot = tokio::time::timeout(wait, shared.tls_slots.acquire()).await;
    lock(&shared.tls_queue).leave();
    gauge!(m::TLS_QUEUE_WAITING).decrement(1.0);
    match slot {
        Ok(Ok(p)) => Some(p),
        _ => {
            counter!(m::RATE_LIMITED, "stage" => "tls_queue_wait").increment(1);
            None
        }
    }
}

/// Reads a PROXY v2 header (at most 512 bytes) before `deadline`.
/// `Ok(None)`: the bytes are not a PROXY header.
async fn read_proxy(
    stream: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Option<jvpn_proto::proxy::ProxyHeader>, ConnReject> {
    use jvpn_proto::proxy::{Decoded, ProxyError, ProxyHeader};
    let mut buf = vec![0u8; 16];
    let mut have = 0;
    loop {
        let want = buf.len();
        match tokio::time::timeout_at(deadline, stream.read_exact(&mut buf[have..want])).await {
            Err(_) => return Err(ConnReject::PreambleTimeout),
            Ok(Err(_)) => return Err(ConnReject::BadProxy),
            Ok(Ok(_)) => have = want,
        }
        match ProxyHeader::decode(&buf[..have]) {
            Ok(Decoded::Done(h, _)) => return Ok(Some(h)),
            Ok(Decoded::NeedMore(n)) => buf.resize(n, 0),
            Err(ProxyError::Signature) => return Ok(None),
            Err(_) => return Err(ConnReject::BadProxy),
        }
    }
}
