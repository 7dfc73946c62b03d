//! The data plane of one session (DESIGN §12, design note 36): the
//! resumable channel the session's transports carry, an HTTP/2 server over
//! it, and for every `CONNECT host:port` a TCP connection to the
//! destination under the egress policy ([`crate::egress`]).
//!
//! The channel outlives transports: the session loop feeds it frames and
//! sends what it hands out; when the session ends, [`close`] resets every
//! stream with the reason (an explicit end, never a clean EOF).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use jvpn_proto::SessionId;
use jvpn_proto::channel::ChannelConfig;
use jvpn_proto::stream::{Host, REFUSAL_HEADER, Refusal, Target};
use jvpn_runtime::channel_io::{ChannelStream, Ending, SessionChannel};
use jvpn_runtime::h2_stream::H2Stream;
use jvpn_runtime::relay::{Way, relay};
use jvpn_runtime::wire::lock;
use metrics::{counter, gauge, histogram};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::debug;

use super::state::Shared;
use super::stored::Fence;
use crate::egress::{Bucket, EgressPolicy};
use crate::events::{StreamEvent, StreamWhat};
use crate::metrics as m;

/// Opens the channel of a new session and starts its HTTP/2 server.
pub(super) fn open(
    shared: &Arc<Shared>,
    shard: usize,
    sid: SessionId,
    principal: Arc<str>,
    fence: Option<Fence>,
) -> (SessionChannel, u64) {
    let policy = shared.egress.load_full();
    let (ch, io) = SessionChannel::new(ChannelConfig::with_window(policy.window_bytes));
    lock(&shared.shards[shard].channels).insert(sid, ch.clone());
    let ctx = Arc::new(SessionCtx {
        channel: ch.clone(),
        principal,
        fence,
        sid,
        open: Arc::new(AtomicUsize::new(0)),
        next: AtomicU64::new(0),
        resolving: Arc::new(Semaphore::new(RESOLVING_PER_SESSION)),
    });
    let window = policy.window_bytes;
    tokio::spawn(serve(shared.clone(), ctx, io, policy));
    (ch, window)
}

/// The session `sid` ended: its channel (if any) is closed and every
/// stream reset with `why`.
pub(super) fn close(shared: &Shared, shard: usize, sid: &SessionId, why: &str) {
    let ch = lock(&shared.shards[shard].channels).remove(sid);
    if let Some(ch) = ch {
        // If the agent's HTTP/2 had said goodbye (its `GOAWAY`, once its
        // last stream ended) and the session then ended another way (its
        // `Terminate` lost), streams it had ended still deliver.
        ch.end(why);
    }
}

/// How long a stream delivering what it got after its agent ended the
/// session ([`finish`]) may move nothing before it is reset.
pub(super) const FINISH_IDLE: Duration = Duration::from_secs(30);

/// The agent ended session `sid` once every stream had ended at its end
/// and every byte had reached this side: streams that ended cleanly there
/// finish here (what they got still goes to their destinations, for as
/// long as it moves: [`FINISH_IDLE`]); any other stream is reset, as on
/// [`close`].
pub(super) fn finish(shared: &Shared, shard: usize, sid: &SessionId) {
    let ch = lock(&shared.shards[shard].channels).remove(sid);
    if let Some(ch) = ch {
        ch.finish();
    }
}

/// What every stream of one session shares.
struct SessionCtx {
    /// The session's channel: its streams end when it closes.
    channel: SessionChannel,
    /// The name egress rules match.
    principal: Arc<str>,
    /// Topology 3: the owner lease the session was recorded under; no byte
    /// goes to a destination once it stopped serving.
    fence: Option<Fence>,
    sid: SessionId,
    /// Streams open now (the session's limit).
    open: Arc<AtomicUsize>,
    /// The last stream number given (events number streams 1, 2, …).
    next: AtomicU64,
    /// Its name lookups running at once ([`RESOLVING_PER_SESSION`]).
    resolving: Arc<Semaphore>,
}

/// One open stream, counted against its session's limit and the
/// gateway's, and in the gauge.
struct Open([Arc<AtomicUsize>; 3]);

impl Open {
    /// Every slot or none: `(count, its max)` of the session, its
    /// principal and the gateway, in that order (the narrowest first, so
    /// that a session at its own limit takes nothing from the others).
    fn try_new(limits: [(&Arc<AtomicUsize>, usize); 3]) -> Option<Self> {
        for (i, (count, max)) in limits.iter().enumerate() {
            if !take(count, *max) {
                for (taken, _) in &limits[..i] {
                    taken.fetch_sub(1, Ordering::AcqRel);
                }
                return None;
            }
        }
        gauge!(m::STREAMS_OPEN).increment(1.0);
        Some(Self(limits.map(|(c, _)| c.clone())))
    }
}

/// One more of `count` if it stays within `max`.
fn take(count: &AtomicUsize, max: usize) -> bool {
    let mut n = count.load(Ordering::Relaxed);
    loop {
        if n >= max {
            return false;
        }
        match count.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
        gauge!(m::STREAMS_OPEN).decrement(1.0);
    }
}

/// The session's HTTP/2 server; ends when the channel closes.
async fn serve(
    shared: Arc<Shared>,
    ctx: Arc<SessionCtx>,
    mut io: ChannelStream,
    policy: Arc<EgressPolicy>,
) {
    // Nothing is allocated for HTTP/2 until the agent opens its first
    // stream (its connection preface arrives): an idle session with the
    // data plane on costs its channel, not an HTTP/2 connection.
    io.readable().await;
    // Above any stream limit a reload can set, so that the limit in force
    // answers with a refusal (`too_many_streams`) instead of HTTP/2
    // queueing the request.
    let concurrent = (crate::egress::MAX_STREAMS_CEILING + 16) as u32;
    let accept = async {
        // HTTP/2's windows from the channel's, as the agent sets them.
        let mut conn = jvpn_runtime::h2_stream::server_builder(policy.window_bytes)
            .max_concurrent_streams(concurrent)
            // CONNECTs given up while the transport was down arrive with
            // their resets after the RESUME, all before the first accept:
            // h2's default allowance (20) ended the session past it.
            .max_pending_accept_reset_streams(concurrent as usize)
            .handshake::<_, Bytes>(io)
            .await?;
        // Accepting drives the connection: every stream's bytes move
        // while this loop waits for the next request.
        while let Some(next) = conn.accept().await {
            let (req, respond) = next?;
            let (shared, ctx) = (shared.clone(), ctx.clone());
            tokio::spawn(async move { connect(&shared, &ctx, req, respond).await });
        }
        Ok::<(), h2::Error>(())
    };
    // Boxed: the waiting task above stays small; the HTTP/2 machinery's
    // state is allocated only now.
    let r = Box::pin(accept).await;
    if let Err(e) = &r {
        debug!(error = %e, "session streams ended");
    }
    // The channel closed (the session ended) or HTTP/2 broke under a live
    // session: then its streams cannot go on, and the session must not
    // linger with a channel nobody reads. End it, explicitly. HTTP/2 that
    // the agent ended cleanly (its `GOAWAY` once a draining session had no
    // stream left) broke nothing: streams it had ended still deliver what
    // they got, and the agent ends the session once this side holds every
    // byte it sent.
    if r.is_err() && !closed_already(&shared, &ctx.sid) {
        counter!(m::CHANNEL_ERRORS).increment(1);
        let shard = crate::engine::shard_of(&ctx.sid, shared.shards.len());
        let now = shared.now();
        shared.with_engine(shard, |e| {
            e.terminate(now, &ctx.sid, crate::engine::Termination::ChannelBroken)
        });
    }
}

/// Is the session's channel gone (closed and removed when it ended)?
fn closed_already(shared: &Shared, sid: &SessionId) -> bool {
    let shard = crate::engine::shard_of(sid, shared.shards.len());
    !lock(&shared.shards[shard].channels).contains_key(sid)
}

fn refuse(r: Refusal) -> Response<()> {
    counter!(m::STREAMS_REFUSED, "reason" => r.as_str()).increment(1);
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    res.headers_mut()
        .insert(REFUSAL_HEADER, http::HeaderValue::from_static(r.as_str()));
    res
}

/// One `CONNECT`: check, resolve, check again, connect, answer, then
/// splice until both directions ended.
async fn connect(
    shared: &Arc<Shared>,
    ctx: &Arc<SessionCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if let Some(refusal) = open_and_splice(shared, ctx, req, &mut respond).await {
        // Refused before the stream opened: the answer ends it.
        let _ = respond.send_response(refusal, true);
    }
}

/// [`connect`]'s work; a refusal to answer with, or `None` once the
/// stream was answered (or the agent gave up on it).
async fn open_and_splice(
    shared: &Arc<Shared>,
    ctx: &Arc<SessionCtx>,
    req: Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
) -> Option<Response<()>> {
    let stream = ctx.next.fetch_add(1, Ordering::Relaxed) + 1;
    let asked = req
        .uri()
        .authority()
        .map_or_else(String::new, |a| a.as_str().to_owned());
    let event = |what: StreamWhat| {
        shared.events.emit_stream(&StreamEvent {
            at: shared.now(),
            session_id: &ctx.sid,
            stream,
            destination: &asked,
            what,
        });
    };
    let refused = |r: Refusal| {
        event(StreamWhat::Refused { reason: r.as_str() });
        Some(refuse(r))
    };
    // Ended before a byte moved: counted and written like any end.
    let ended_empty = |how: &'static str| {
        counter!(m::STREAMS_ENDED, "how" => how).increment(1);
        event(StreamWhat::Closed {
            how,
            to_destination: 0,
            from_destination: 0,
        });
    };
    if req.method() != Method::CONNECT {
        return refused(Refusal::BadTarget);
    }
    let Ok(target) = Target::parse_authority(&asked) else {
        return refused(Refusal::BadTarget);
    };
    // The policy in force when the stream opens (SIGHUP applies to new ones).
    let policy = shared.egress.load_full();
    let own = policy.limits(&ctx.principal);
    // The table is full of principals with streams open: fail closed.
    let Some(mine) = shared
        .principal_streams
        .get(&ctx.principal, AtomicUsize::default)
    else {
        return refused(Refusal::Failed);
    };
    let Some(slot) = Open::try_new([
        (&ctx.open, policy.max_streams_per_session),
        (&mine, own.max_streams),
        (&shared.streams_open, policy.max_streams),
    ]) else {
        return refused(Refusal::TooManyStreams);
    };
    drop(mine);
    let limit = match own.rate {
        None => None,
        Some((_, burst)) => match bucket_for(shared, &ctx.principal, burst) {
            Some(b) => Some(Limit {
                bucket: b,
                egress: &shared.egress,
                principal: &ctx.principal,
            }),
            // The table is full of principals with streams open: fail closed.
            None => return refused(Refusal::Failed),
        },
    };
    let started = Instant::now();
    let members = shared.cluster.as_ref().map(|c| c.listeners());
    let cluster = [
        members.as_deref().map_or(&[][..], Vec::as_slice),
        shared.bound.get().map_or(&[][..], |b| &b[..]),
    ];
    let cluster = &cluster[..];
    // A name's lookup also counts against its principal's share.
    let principal_lookups = match &target.host {
        Host::Ip(_) => None,
        Host::Name(_) => match shared
            .principal_resolving
            .get(&ctx.principal, || Semaphore::new(RESOLVING_PER_PRINCIPAL))
        {
            Some(s) => Some(s),
            // The table is full of principals with lookups running: fail closed.
            None => return refused(Refusal::Failed),
        },
    };
    let limits = principal_lookups
        .as_ref()
        .map(|p| [&ctx.resolving, p, &shared.resolving]);
    // Topology 3: a session fenced since its CONNECT was read opens no
    // connection to its destination (a taker may serve it now) unless it
    // moves to the next lease first.
    let fenced = || async {
        match ctx.fence.as_ref().filter(|f| !f.holds()) {
            Some(f) => !f.clone().regained().await,
            None => false,
        }
    };
    if fenced().await {
        return refused(Refusal::Failed);
    }
    let dialed = tokio::select! {
        // Looked at first: a CONNECT that arrived already reset (its
        // application gave up while the transport was down, and the reset
        // was queued behind it) dials nothing.
        biased;
        // The agent reset the stream (its application left), or the
        // session's HTTP/2 connection ended: stop dialing and give the
        // slots back.
        gone = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            let how = match gone {
                Ok(_) => m::STREAM_ENDINGS[2],
                Err(_) => m::STREAM_ENDINGS[1],
            };
            ended_empty(how);
            return None;
        }
        d = dial(&policy, &ctx.principal, &target, cluster, limits) => d,
    };
    // The principal's lookup share is for the dial only.
    drop(principal_lookups);
    let dest = match dialed {
        Ok(s) if fenced().await => {
            jvpn_runtime::relay::reset(s);
            return refused(Refusal::Failed);
        }
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    histogram!(m::EGRESS_CONNECT_SECONDS).record(started.elapsed().as_secs_f64());
    counter!(m::STREAMS_OPENED).increment(1);
    event(StreamWhat::Opened);
    let _slot = slot;
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            // The agent reset the stream as it opened: so is the
            // destination's connection.
            debug!(error = %e, "stream gone before its answer");
            jvpn_runtime::relay::reset(dest);
            ended_empty(m::STREAM_ENDINGS[1]);
            return None;
        }
    };
    let io = Fenced::new(H2Stream::new(send, req.into_body()), ctx.fence.clone());
    let gone = carrier_gone(&ctx.channel, io.progress.clone());
    let (how, to_destination, from_destination) = splice(io, dest, limit.as_ref(), gone).await;
    shared.events.emit_stream(&StreamEvent {
        at: shared.now(),
        session_id: &ctx.sid,
        stream,
        destination: &asked,
        what: StreamWhat::Closed {
            how,
            to_destination,
            from_destination,
        },
    });
    None
}

/// When a stream's relay must stop, whatever it waits for: its session's
/// channel closed; or the agent finished the session, and the stream had
/// not sent its end (so it had not ended at the agent, which would have
/// waited for it), or it had and then moved nothing for [`FINISH_IDLE`].
async fn carrier_gone(channel: &SessionChannel, progress: Arc<Progress>) {
    let ending = channel.ending();
    let gone = channel.gone();
    if ending.await == Ending::Finished && progress.sent_end.load(Ordering::Acquire) {
        tokio::pin!(gone);
        loop {
            let before = progress.read.load(Ordering::Relaxed);
            tokio::select! {
                () = &mut gone => return,
                () = tokio::time::sleep(FINISH_IDLE) => {}
            }
            if progress.read.load(Ordering::Relaxed) == before {
                return;
            }
        }
    }
}

/// What a stream did, for [`carrier_gone`].
#[derive(Debug, Default)]
struct Progress {
    /// This side's end was sent (the destination's half-close went on).
    sent_end: AtomicBool,
    /// Bytes read from the stream (on their way to the destination).
    read: AtomicU64,
}

/// A principal's byte rate, shared by all its streams.
struct Limit<'a> {
    bucket: Arc<Bucket>,
    /// The policy in force: a reload changes the rate and depth of the
    /// principal's open streams too (they share its bucket, so one rate).
    egress: &'a arc_swap::ArcSwap<crate::egress::EgressPolicy>,
    principal: &'a str,
}

impl Limit<'_> {
    /// How long to wait before moving `n` bytes.
    fn wait(&self, n: usize) -> Duration {
        match self.egress.load().limits(self.principal).rate {
            Some((rate, burst)) => self.bucket.take(n as u64, rate, burst, Instant::now()),
            // A reload took the principal's rate away.
            None => Duration::ZERO,
        }
    }
}

/// Principals with an entry in a per-principal table at once; past it,
/// entries of principals with no stream open are dropped, and if none can
/// be, new streams are refused.
const MAX_PRINCIPALS: usize = 65_536;

/// A value per principal, shared by its open streams (each holds a clone).
/// Bounded by [`MAX_PRINCIPALS`]: fails closed when that many principals
/// have streams open.
pub(super) struct PerPrincipal<T>(Mutex<HashMap<Arc<str>, Arc<T>>>);

impl<T> Default for PerPrincipal<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T> PerPrincipal<T> {
    /// `principal`'s value, made by `new` if it has none; `None` when the
    /// table is full of principals whose values are in use.
    pub(super) fn get(&self, principal: &Arc<str>, new: impl FnOnce() -> T) -> Option<Arc<T>> {
        let mut t = lock(&self.0);
        if let Some(v) = t.get(principal) {
            return Some(v.clone());
        }
        if t.len() >= MAX_PRINCIPALS {
            t.retain(|_, v| Arc::strong_count(v) > 1);
            if t.len() >= MAX_PRINCIPALS {
                return None;
            }
        }
        let v = Arc::new(new());
        t.insert(principal.clone(), v.clone());
        Some(v)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

fn bucket_for(shared: &Shared, principal: &Arc<str>, burst: u64) -> Option<Arc<Bucket>> {
    shared.buckets.get(principal, || Bucket::new(burst))
}

/// Name lookups running at once in a gateway. A lookup holds a blocking
/// thread until the system resolver answers, whether or not its stream
/// still waits (a timeout cannot cancel it); without a bound, names whose
/// servers never answer would take every blocking thread, and with them
/// every name-based stream and the event file writer.
pub(super) const RESOLVING: usize = 64;
/// Name lookups running at once for one session: one session cannot take
/// all of [`RESOLVING`]. Beyond it, a lookup waits (within the connect
/// timeout), as a browser's many parallel connections do.
const RESOLVING_PER_SESSION: usize = 16;
/// Name lookups running at once for one principal (all its sessions on
/// this gateway): half of [`RESOLVING`], so one principal's names that
/// never resolve leave the other half to everyone else.
pub(super) const RESOLVING_PER_PRINCIPAL: usize = RESOLVING / 2;

/// A blocking lookup: the system resolver, or a test's.
type Lookup = fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

fn system_lookup(name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    Ok((name, port).to_socket_addrs()?.collect())
}

/// Resolves `name` by `deadline`. The lookup holds a permit of each of
/// `limits` (session, principal, gateway: the narrowest first, so one at
/// its own limit does not sit on the wider ones) until it returns, not
/// until it is given up.
async fn resolve(
    name: &str,
    port: u16,
    deadline: tokio::time::Instant,
    limits: [&Arc<Semaphore>; 3],
    lookup: Lookup,
) -> Result<Vec<SocketAddr>, Refusal> {
    let permits = async {
        let mut held = Vec::with_capacity(limits.len());
        for l in limits {
            held.push(l.clone().acquire_owned().await.ok()?);
        }
        Some(held)
    };
    let Ok(Some(permits)) = tokio::time::timeout_at(deadline, permits).await else {
        return Err(Refusal::TimedOut);
    };
    let name = name.to_owned();
    let job = tokio::task::spawn_blocking(move || {
        let _held = permits;
        lookup(&name, port)
    });
    match tokio::time::timeout_at(deadline, job).await {
        Ok(Ok(Ok(addrs))) => Ok(addrs),
        Ok(_) => Err(Refusal::NameNotResolved),
        Err(_) => Err(Refusal::TimedOut),
    }
}

/// Resolves `target` (a name at this gateway), keeps the addresses the
/// policy allows (`cluster`: the cluster's listeners membership knows of),
/// and connects to the first that answers within the connect timeout
/// ([`connect_first`]).
async fn dial(
    policy: &EgressPolicy,
    principal: &str,
    target: &Target,
    cluster: &[&[SocketAddr]],
    lookups: Option<[&Arc<Semaphore>; 3]>,
) -> Result<TcpStream, Refusal> {
    // One deadline for resolution and connect together, as documented.
    let deadline = tokio::time::Instant::now() + policy.limits(principal).connect_timeout;
    let addrs: Vec<SocketAddr> = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => {
            let limits = lookups.ok_or(Refusal::Failed)?;
            resolve(name, target.port, deadline, limits, system_lookup).await?
        }
    };
    if addrs.is_empty() {
        return Err(Refusal::NameNotResolved);
    }
    let allowed = permitted(policy, principal, addrs, cluster)?;
    let s = connect_first(allowed, deadline, CONNECT_STAGGER).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// How long one address has to answer before the next is tried beside
/// it (RFC 8305's connection attempt delay).
const CONNECT_STAGGER: Duration = Duration::from_millis(250);

/// Attempts one stream may have in flight: each holds a socket, and the
/// stream limits count one per stream.
const CONNECT_RACING: usize = 2;

/// Connects to the first of `addrs` that answers by `deadline`. Each
/// address gets `stagger` alone; then the next one races it, so one that
/// drops SYNs (a black-holed IPv6 route listed first) costs `stagger`,
/// not the whole deadline; a refusal starts the next at once. At most
/// [`CONNECT_RACING`] attempts at a time: a third gives up the oldest.
async fn connect_first(
    addrs: Vec<SocketAddr>,
    deadline: tokio::time::Instant,
    stagger: Duration,
) -> Result<TcpStream, Refusal> {
    let mut waiting = addrs.into_iter();
    let mut racing = tokio::task::JoinSet::new();
    let mut live: std::collections::VecDeque<tokio::task::AbortHandle> = Default::default();
    let mut last = Refusal::Failed;
    let mut next_at = tokio::time::Instant::now();
    loop {
        if live.is_empty() || tokio::time::Instant::now() >= next_at {
            match waiting.next() {
                Some(a) => {
                    if live.len() >= CONNECT_RACING
                        && let Some(oldest) = live.pop_front()
                    {
                        oldest.abort();
                    }
                    live.push_back(racing.spawn(TcpStream::connect(a)));
                    next_at = tokio::time::Instant::now() + stagger;
                    continue;
                }
                None if live.is_empty() => return Err(last),
                None => next_at = deadline,
            }
        }
        tokio::select! {
            done = racing.join_next_with_id() => match done {
                Some(Ok((_, Ok(s)))) => return Ok(s),
                Some(Ok((id, Err(e)))) => {
                    live.retain(|h| h.id() != id);
                    last = refusal_of(&e);
                    next_at = tokio::time::Instant::now();
                }
                // Given up (aborted) above, or a task that panicked.
                Some(Err(e)) => live.retain(|h| h.id() != e.id()),
                None => live.clear(),
            },
            () = tokio::time::sleep_until(next_at.min(deadline)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Refusal::TimedOut);
                }
            }
        }
    }
}

/// The addresses `principal` may reach, checked after resolution (a name
/// cannot reach what its address could not).
fn permitted(
    policy: &EgressPolicy,
    principal: &str,
    addrs: Vec<SocketAddr>,
    cluster: &[&[SocketAddr]],
) -> Result<Vec<SocketAddr>, Refusal> {
    let mut allowed = Vec::with_capacity(addrs.len());
    let mut first_denial = None;
    for a in addrs {
        match policy.check_with(principal, a, cluster) {
            Ok(()) => allowed.push(a),
            Err(d) => {
                first_denial.get_or_insert(d);
            }
        }
    }
    match first_denial {
        Some(d) if allowed.is_empty() => {
            counter!(m::EGRESS_DENIED, "rule" => d.as_str()).increment(1);
            Err(Refusal::NotAllowed)
        }
        _ => Ok(allowed),
    }
}

fn refusal_of(e: &std::io::Error) -> Refusal {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Refusal::ConnectionRefused,
        K::NetworkUnreachable => Refusal::NetworkUnreachable,
        K::HostUnreachable => Refusal::HostUnreachable,
        K::TimedOut => Refusal::TimedOut,
        // This host's firewall said no: a refusal by policy, as SOCKS has it.
        K::PermissionDenied => Refusal::NotAllowed,
        _ => Refusal::Failed,
    }
}

/// Joins the stream and the destination until both directions ended,
/// counting bytes as they move and holding the principal's byte rate. A
/// stream ended by an error (the session's channel closed) resets the
/// destination's connection instead of closing it cleanly. Returns how it
/// ended and the bytes each way.
async fn splice(
    stream: Fenced<H2Stream>,
    dest: TcpStream,
    limit: Option<&Limit<'_>>,
    gone: impl std::future::Future<Output = ()>,
) -> (&'static str, u64, u64) {
    let moved = |way: Way, n: usize| {
        let direction = match way {
            Way::ToTcp => m::STREAM_DIRECTIONS[0],
            Way::FromTcp => m::STREAM_DIRECTIONS[1],
        };
        counter!(m::STREAM_BYTES, "direction" => direction).increment(n as u64);
        limit.map_or(Duration::ZERO, |l| l.wait(n))
    };
    let r = relay(dest, stream, &[], &moved, gone).await;
    let how = m::STREAM_ENDINGS[usize::from(r.reset)];
    counter!(m::STREAMS_ENDED, "how" => how).increment(1);
    (how, r.to_tcp, r.from_tcp)
}

/// A stream whose reads wait while its session's owner lease does not
/// serve, and fail (a reset) if the session ends for it: what comes out of
/// it goes to the destination, so after the fence not one more chunk does
/// unless the session moved to the next lease first.
struct Fenced<S> {
    inner: S,
    fence: Option<Fence>,
    progress: Arc<Progress>,
    /// The wait for the session to move, while one is under way.
    waiting: Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>>,
}

impl<S> Fenced<S> {
    fn new(inner: S, fence: Option<Fence>) -> Self {
        Self {
            inner,
            fence,
            progress: Arc::default(),
            waiting: None,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Fenced<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(f) = this.fence.as_ref().filter(|f| !f.holds()) {
            let wait = this
                .waiting
                .get_or_insert_with(|| Box::pin(f.clone().regained()));
            match wait.as_mut().poll(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(moved) => {
                    this.waiting = None;
                    if !moved {
                        return std::task::Poll::Ready(Err(
                            std::io::ErrorKind::ConnectionReset.into()
                        ));
                    }
                }
            }
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.progress.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Fenced<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        if matches!(r, std::task::Poll::Ready(Ok(()))) {
            self.progress.sent_end.store(true, Ordering::Release);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the agent finished the session, a stream that had sent its
    /// end lives while bytes move towards its destination and ends once
    /// they stop for [`FINISH_IDLE`] (a slow destination is not cut at a
    /// fixed grace); one that had not sent its end ends at once.
    #[tokio::test(start_paused = true)]
    async fn a_finishing_stream_lives_while_it_moves() {
        let (ch, _io) = SessionChannel::new(ChannelConfig::default());
        let ended = Arc::new(Progress::default());
        ended.sent_end.store(true, Ordering::Release);
        let open = Arc::new(Progress::default());
        let watch = |p: &Arc<Progress>| {
            let (ch, p) = (ch.clone(), p.clone());
            tokio::spawn(async move { carrier_gone(&ch, p).await })
        };
        let (ended_gone, open_gone) = (watch(&ended), watch(&open));
        tokio::time::sleep(FINISH_IDLE * 4).await;
        assert!(
            !ended_gone.is_finished() && !open_gone.is_finished(),
            "before the finish"
        );
        ch.finish();
        tokio::time::timeout(Duration::from_millis(1), open_gone)
            .await
            .expect("a stream that had not ended lives on")
            .unwrap();
        // Bytes move for four idle bounds: it lives.
        for _ in 0..12 {
            ended.read.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(FINISH_IDLE / 3).await;
        }
        assert!(!ended_gone.is_finished(), "cut while it moved");
        tokio::time::timeout(FINISH_IDLE * 2, ended_gone)
            .await
            .expect("a stream that stopped moving lives on")
            .unwrap();
    }

    /// A listener whose accept queue is full: the kernel drops further
    /// SYNs, as a black-holed route does, so a connect to it hangs.
    async fn black_hole() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let mut filled = Vec::new();
        // Fill the queue until a connect no longer completes at once.
        while let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            filled.push(c);
            assert!(filled.len() < 64, "the accept queue never filled");
        }
        (l, filled, addr)
    }

    /// A first address that drops SYNs (an IPv6 route black-holed, listed
    /// first) costs the stagger, not the whole connect timeout: the next
    /// address answers. It used to wait out the deadline and refuse the
    /// stream `timed_out`.
    #[tokio::test]
    async fn a_silent_first_address_does_not_hide_the_next() {
        let (_hole, _filled, silent) = black_hole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let s = connect_first(vec![silent, good_addr], deadline, CONNECT_STAGGER)
            .await
            .expect("the second address answers");
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        // Three silent ones first: two race at most, the oldest is given
        // up for the next, and the good one is still reached.
        let s = connect_first(
            vec![silent, silent, silent, good_addr],
            deadline,
            CONNECT_STAGGER,
        )
        .await
        .expect("the fourth address answers");
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        // Only silent addresses: the deadline, as a timeout.
        let short = tokio::time::Instant::now() + Duration::from_millis(600);
        let r = connect_first(vec![silent, silent], short, CONNECT_STAGGER).await;
        assert_eq!(r.err(), Some(Refusal::TimedOut));
        // A refusal moves on at once and is what is said if all refuse.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let r = connect_first(vec![closed], deadline, CONNECT_STAGGER).await;
        assert_eq!(r.err(), Some(Refusal::ConnectionRefused));
    }

    /// A denial is counted once per refused stream, by the reason of its
    /// first address; a stream that reaches one of its addresses is no
    /// denial (a name with a loopback and a public address is allowed).
    #[test]
    fn a_denial_counts_refused_streams_not_addresses() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let policy = EgressPolicy::new(&crate::egress::EgressConfig::default(), &[], &[]).unwrap();
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        metrics::with_local_recorder(&rec, || {
            let mixed = vec![addr("127.0.0.1:80"), addr("192.0.2.1:80")];
            assert_eq!(
                permitted(&policy, "p", mixed, &[]),
                Ok(vec![addr("192.0.2.1:80")])
            );
            let denied = vec![
                addr("127.0.0.1:80"),
                addr("[::1]:80"),
                addr("169.254.169.254:80"),
            ];
            assert_eq!(
                permitted(&policy, "p", denied, &[]),
                Err(Refusal::NotAllowed)
            );
        });
        let counts: Vec<(String, u64)> = snap
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) if k.key().name() == m::EGRESS_DENIED => {
                    let rule = k.key().labels().next().map(|l| l.value().to_owned());
                    Some((rule.unwrap_or_default(), n))
                }
                _ => None,
            })
            .collect();
        assert_eq!(counts, [("loopback".to_owned(), 1)]);
    }

    /// A connect that this host's own firewall refuses (`EPERM`, `EACCES`)
    /// is a refusal by policy, not a failure of the destination.
    #[test]
    fn a_local_firewall_refusal_reads_as_not_allowed() {
        use std::io::{Error, ErrorKind};
        for errno in [
            nix::errno::Errno::EPERM as i32,
            nix::errno::Errno::EACCES as i32,
        ] {
            let e = Error::from_raw_os_error(errno);
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert_eq!(refusal_of(&e), Refusal::NotAllowed, "errno {errno}");
        }
        assert_eq!(
            refusal_of(&Error::from(ErrorKind::ConnectionRefused)),
            Refusal::ConnectionRefused
        );
    }

    /// A stream takes a slot of its session, its principal and the gateway,
    /// or none: a refusal by any of them gives back what it took.
    #[test]
    fn a_stream_counts_against_all_three_limits_or_none() {
        let (session, principal, gateway) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let open = |limits: [usize; 3]| {
            Open::try_new([
                (&session, limits[0]),
                (&principal, limits[1]),
                (&gateway, limits[2]),
            ])
        };
        let first = open([4, 2, 4]).unwrap();
        let _second = open([4, 2, 4]).unwrap();
        // The principal is at its limit: refused, and the session's slot
        // it took first is given back.
        assert!(open([4, 2, 4]).is_none());
        assert_eq!(session.load(Ordering::Relaxed), 2);
        // The gateway is at its limit (the last one checked).
        assert!(open([4, 4, 2]).is_none());
        assert_eq!(
            [&session, &principal, &gateway].map(|c| c.load(Ordering::Relaxed)),
            [2, 2, 2]
        );
        drop(first);
        assert_eq!(
            [&session, &principal, &gateway].map(|c| c.load(Ordering::Relaxed)),
            [1, 1, 1]
        );
    }

    /// Each principal has its own entry, shared by its streams; entries in
    /// use are never dropped, so a table full of them fails closed.
    #[test]
    fn the_per_principal_table_is_shared_bounded_and_fails_closed() {
        let t = PerPrincipal::<AtomicUsize>::default();
        let (a, b): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let a1 = t.get(&a, AtomicUsize::default).unwrap();
        let a2 = t.get(&a, AtomicUsize::default).unwrap();
        assert!(Arc::ptr_eq(&a1, &a2));
        let b1 = t.get(&b, AtomicUsize::default).unwrap();
        assert!(!Arc::ptr_eq(&a1, &b1));
        // Fill the table with principals whose entries are held.
        let held: Vec<_> = (2..MAX_PRINCIPALS)
            .map(|i| {
                t.get(&Arc::from(format!("p{i}")), AtomicUsize::default)
                    .unwrap()
            })
            .collect();
        assert_eq!(t.len(), MAX_PRINCIPALS);
        assert!(t.get(&Arc::from("carol"), AtomicUsize::default).is_none());
        // Once a principal's streams are gone its entry may go.
        drop((a1, a2));
        assert!(t.get(&Arc::from("carol"), AtomicUsize::default).is_some());
        assert!(t.len() <= MAX_PRINCIPALS);
        drop(held);
    }

    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);
    /// Per session (the name's first label): running now, and the most.
    static PER_SESSION: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

    fn session_of(name: &str) -> usize {
        name.split('.').next().unwrap().parse().unwrap()
    }

    fn per_session(name: &str, delta: isize) {
        let mut t = PER_SESSION.lock().unwrap();
        let (now, most) = &mut t[session_of(name)];
        *now = now.checked_add_signed(delta).unwrap();
        *most = (*most).max(*now);
    }

    /// A name server that never answers: each lookup holds its thread.
    fn stuck(name: &str, _: u16) -> std::io::Result<Vec<SocketAddr>> {
        let n = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(n, Ordering::SeqCst);
        per_session(name, 1);
        std::thread::sleep(Duration::from_millis(300));
        per_session(name, -1);
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        Err(std::io::Error::other("no answer"))
    }

    /// 20 sessions each asking for 20 names whose servers never answer:
    /// lookups given up on still run, and at no time more than the
    /// gateway's limit of them (nor one session's more than its own).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_that_never_answer_hold_at_most_the_limits() {
        let gateway = Arc::new(Semaphore::new(RESOLVING));
        let principal = Arc::new(Semaphore::new(RESOLVING));
        *PER_SESSION.lock().unwrap() = vec![(0, 0); 20];
        let mut all = Vec::new();
        for i in 0..20 {
            let session = Arc::new(Semaphore::new(RESOLVING_PER_SESSION));
            for _ in 0..20 {
                let (session, principal, gateway) =
                    (session.clone(), principal.clone(), gateway.clone());
                all.push(tokio::spawn(async move {
                    let by = tokio::time::Instant::now() + Duration::from_millis(50);
                    let name = format!("{i}.invalid");
                    resolve(&name, 443, by, [&session, &principal, &gateway], stuck).await
                }));
            }
        }
        for t in all {
            assert_eq!(t.await.unwrap(), Err(Refusal::TimedOut));
        }
        // Every lookup that started has ended; the most at once:
        while RUNNING.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let most = MOST.load(Ordering::SeqCst);
        assert!(most > 0 && most <= RESOLVING, "{most} lookups at once");
        let per: Vec<usize> = PER_SESSION.lock().unwrap().iter().map(|p| p.1).collect();
        assert!(
            per.iter().all(|m| *m <= RESOLVING_PER_SESSION),
            "most at once per session: {per:?}"
        );
    }

    /// One principal's sessions whose names never resolve cannot take
    /// every lookup of the gateway: another principal's name still
    /// resolves at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_principal_cannot_hold_every_lookup() {
        static STUCK: AtomicUsize = AtomicUsize::new(0);
        fn stuck(_: &str, _: u16) -> std::io::Result<Vec<SocketAddr>> {
            STUCK.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(500));
            STUCK.fetch_sub(1, Ordering::SeqCst);
            Err(std::io::Error::other("no answer"))
        }
        fn answers(_: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            Ok(vec![SocketAddr::from(([192, 0, 2, 1], port))])
        }
        let gateway = Arc::new(Semaphore::new(RESOLVING));
        let table = PerPrincipal::<Semaphore>::default();
        let share = || Semaphore::new(RESOLVING_PER_PRINCIPAL);
        let hog = table.get(&Arc::from("hog"), share).unwrap();
        let mut all = Vec::new();
        // Four sessions of one principal, each at its own limit.
        for _ in 0..4 {
            let session = Arc::new(Semaphore::new(RESOLVING_PER_SESSION));
            for _ in 0..RESOLVING_PER_SESSION {
                let (session, hog, gateway) = (session.clone(), hog.clone(), gateway.clone());
                all.push(tokio::spawn(async move {
                    let by = tokio::time::Instant::now() + Duration::from_secs(2);
                    resolve("x.invalid", 443, by, [&session, &hog, &gateway], stuck).await
                }));
            }
        }
        while STUCK.load(Ordering::SeqCst) < RESOLVING_PER_PRINCIPAL.min(RESOLVING) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let most = STUCK.load(Ordering::SeqCst);
        assert!(
            most <= RESOLVING_PER_PRINCIPAL,
            "{most} lookups of one principal"
        );
        let other = table.get(&Arc::from("other"), share).unwrap();
        let session = Arc::new(Semaphore::new(RESOLVING_PER_SESSION));
        let by = tokio::time::Instant::now() + Duration::from_millis(200);
        let r = resolve("y.example", 443, by, [&session, &other, &gateway], answers).await;
        assert_eq!(r, Ok(vec![SocketAddr::from(([192, 0, 2, 1], 443))]));
        for t in all {
            let _ = t.await.unwrap();
        }
    }
}
