//! The agent's side of the data plane (DESIGN §12, design note 36): the
//! session's resumable channel, an HTTP/2 client over it, and [`Tunnel`],
//! the handle applications (and the front doors) open streams with.
//!
//! A session's channel lives as long as the session: transports come and
//! go under it (the keep-alive loop feeds it frames and sends what it hands
//! out; a RESUME continues it from the gateway's offset). When the session
//! ends (a re-handshake), its channel is closed with the reason and every
//! stream over it fails with `ConnectionReset`; streams opened after that
//! go over the next session's channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use jvpn_proto::channel::ChannelConfig;
use jvpn_proto::stream::{REFUSAL_HEADER, Refusal, Target};
use jvpn_runtime::channel_io::{Generation, SessionChannel};
use jvpn_runtime::h2_stream::H2Stream;
use tokio::sync::watch;

/// A stream through the session: bytes to and from its destination. Ends
/// with `ConnectionReset` (never a clean EOF) if its session ends first or
/// the destination's connection was reset; dropped before it ended both
/// ways, it resets the destination's.
#[derive(Debug)]
pub struct Stream {
    io: H2Stream,
    /// The session's channel the stream runs over.
    channel: SessionChannel,
    _open: OpenStream,
}

impl Stream {
    /// Resolves once the stream's session ended (the stream then cannot
    /// go on): for a relay waiting only on its application's side.
    pub fn session_gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.channel.gone()
    }
}

/// Counts a stream as open while it lives: in its session's count from
/// its request on (a draining session lasts while it has streams, and a
/// CONNECT waiting for its answer is one), and in the agent's counters
/// once the gateway accepted it.
#[derive(Debug)]
struct OpenStream {
    session: Arc<AtomicU64>,
    agent: Option<Arc<StreamCounters>>,
}

impl OpenStream {
    fn on(session: Arc<AtomicU64>) -> Self {
        session.fetch_add(1, Ordering::Relaxed);
        Self {
            session,
            agent: None,
        }
    }

    fn accepted(mut self, agent: &Arc<StreamCounters>) -> Self {
        agent.opened.fetch_add(1, Ordering::Relaxed);
        agent.open.fetch_add(1, Ordering::Relaxed);
        self.agent = Some(agent.clone());
        self
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.session.fetch_sub(1, Ordering::Relaxed);
        if let Some(a) = &self.agent {
            a.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Every failure of a stream means it is gone (its session ended, its
/// channel broke): the application sees one kind, `ConnectionReset`, as a
/// TCP application would, with the cause kept in the message.
fn as_reset<T>(p: std::task::Poll<std::io::Result<T>>) -> std::task::Poll<std::io::Result<T>> {
    p.map(|r| {
        r.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                e
            } else {
                std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
            }
        })
    })
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        as_reset(std::pin::Pin::new(&mut self.io).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        as_reset(std::pin::Pin::new(&mut self.io).poll_write(cx, buf))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        as_reset(std::pin::Pin::new(&mut self.io).poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        as_reset(std::pin::Pin::new(&mut self.io).poll_shutdown(cx))
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The gateway refused it (policy, resolution, connect).
    #[error("refused by the gateway: {}", .0.as_str())]
    Refused(Refusal),
    /// No session carried streams within the wait (establishing, or the
    /// gateway has no data plane).
    #[error("no session to carry the stream within {0:?}")]
    NoSession(Duration),
    /// The session ended while the stream was being opened.
    #[error("session ended: {0}")]
    SessionEnded(String),
    /// The agent has stopped.
    #[error("the agent stopped")]
    Stopped,
}

/// The HTTP/2 connection of the current session, for opening streams.
#[derive(Clone, Debug)]
struct Link {
    send: SendRequest<Bytes>,
    channel: SessionChannel,
    /// Streams open over this session.
    open: Arc<AtomicU64>,
}

/// Where new streams go: the current session's link once its HTTP/2 is
/// up, unless a hand-over is making the next session (`held`: new streams
/// wait for that one, also when this session's HTTP/2 comes up meanwhile).
#[derive(Clone, Debug, Default)]
struct Slot {
    link: Option<Link>,
    held: bool,
}

/// Opens streams through whatever session the agent currently has.
/// Cheap to clone; usable from any task.
#[derive(Clone, Debug)]
pub struct Tunnel {
    link: watch::Receiver<Slot>,
    counters: Arc<StreamCounters>,
    want: Arc<Want>,
}

/// Streams were asked for: sessions start their HTTP/2 connection (until
/// then an idle session costs only its channel, at both ends).
#[derive(Debug, Default)]
struct Want {
    wanted: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

/// Stream counters of one agent (no identifiers).
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub opened: AtomicU64,
    /// Streams open now (dropped ones are not).
    pub open: AtomicU64,
    pub refused: AtomicU64,
    /// Streams that ended with a reset (session gone, channel broken).
    pub reset: AtomicU64,
    /// Front-door requests answered with an error before any stream:
    /// malformed, or asking for what the door does not do (SOCKS5 BIND, a
    /// method other than `CONNECT`, no acceptable SOCKS5 method).
    pub bad_requests: AtomicU64,
}

impl Tunnel {
    /// How long [`Tunnel::connect`] waits for a session that carries streams.
    pub const WAIT: Duration = Duration::from_secs(30);

    /// Opens a stream to `target`: resolved and checked at the gateway.
    pub async fn connect(&self, target: &Target) -> Result<Stream, StreamError> {
        if !self.want.wanted.swap(true, Ordering::AcqRel) {
            self.want.notify.notify_waiters();
        }
        let mut link_rx = self.link.clone();
        let link = tokio::time::timeout(Self::WAIT, async {
            loop {
                let ready = {
                    let slot = link_rx.borrow_and_update();
                    slot.link.clone().filter(|_| !slot.held)
                };
                if let Some(l) = ready {
                    return Ok(l);
                }
                if link_rx.changed().await.is_err() {
                    return Err(StreamError::Stopped);
                }
            }
        })
        .await
        .map_err(|_| StreamError::NoSession(Self::WAIT))??;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| StreamError::SessionEnded(e.to_string()))?;
        let Link {
            send,
            channel,
            open,
        } = link;
        let using = OpenStream::on(open);
        let ended = |e: h2::Error| StreamError::SessionEnded(e.to_string());
        let mut send = send.ready().await.map_err(ended)?;
        let (answer, up) = send.send_request(req, false).map_err(ended)?;
        let res = answer.await.map_err(ended)?;
        if res.status() != StatusCode::OK {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let name = res
                .headers()
                .get(REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok());
            return Err(StreamError::Refused(Refusal::from_response(
                res.status().as_u16(),
                name,
            )));
        }
        Ok(Stream {
            io: H2Stream::new(up, res.into_body()),
            channel,
            _open: using.accepted(&self.counters),
        })
    }

    /// This agent's stream counters.
    pub fn counters(&self) -> &StreamCounters {
        &self.counters
    }

    /// Counts a stream that ended with a reset (front doors call this).
    pub fn count_reset(&self) {
        self.counters.reset.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a front-door request answered with an error.
    pub fn count_bad_request(&self) {
        self.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        // The agent stopped: its streams end explicitly, not by hanging.
        self.close("agent stopped");
    }
}

/// Channel frames are gathered up to this many bytes per write.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;

/// The agent's data-plane state: the current session's channel, and where
/// the tunnel finds its HTTP/2 connection.
#[derive(Debug)]
pub(crate) struct DataPlane {
    /// The current session's channel and the current transport's generation.
    pub(crate) channel: Option<(SessionChannel, Generation)>,
    /// Bumped with every new channel and every close, so the loop
    /// re-subscribes and a late handshake never publishes a dead session.
    pub(crate) epoch: Arc<AtomicU64>,
    link: watch::Sender<Slot>,
    /// Streams open over the current session.
    open: Arc<AtomicU64>,
    want: Arc<Want>,
}

impl DataPlane {
    pub(crate) fn new() -> (Self, Tunnel) {
        let (tx, rx) = watch::channel(Slot::default());
        let counters = Arc::new(StreamCounters::default());
        let want = Arc::new(Want::default());
        (
            Self {
                channel: None,
                epoch: Arc::new(AtomicU64::new(0)),
                link: tx,
                open: Arc::new(AtomicU64::new(0)),
                want: want.clone(),
            },
            Tunnel {
                link: rx,
                counters,
                want,
            },
        )
    }

    /// Frames the channel has for the current transport, encoded, up to
    /// [`WRITE_BATCH`] bytes; `true` if more are waiting.
    pub(crate) fn outgoing(&self, out: &mut bytes::BytesMut) -> bool {
        let Some((ch, g)) = &self.channel else {
            return false;
        };
        while let Some(k) = ch.next_frame(*g, false) {
            // Frames the channel makes are always encodable.
            let _ = jvpn_proto::frame::encode(k, out);
            if out.len() >= WRITE_BATCH {
                return true;
            }
        }
        false
    }

    /// A `Data` or `Ack` from the gateway, into the channel.
    pub(crate) fn on_frame(
        &self,
        k: jvpn_proto::pb::session::frame::Kind,
    ) -> Result<(), jvpn_proto::channel::ChannelError> {
        use jvpn_proto::pb::session::frame::Kind;
        let Some((ch, g)) = &self.channel else {
            return Ok(());
        };
        match k {
            Kind::Data(d) => ch.on_data(*g, d),
            Kind::Ack(a) => ch.on_ack(*g, a),
            _ => Ok(()),
        }
    }

    /// Streams open over the current session.
    pub(crate) fn open_streams(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The session's streams have all ended: its HTTP/2 connection may
    /// finish (its last request handle goes), writing what it still holds
    /// into the channel.
    pub(crate) fn let_finish(&mut self) {
        self.link.send_modify(|s| s.link = None);
    }

    /// Every byte the session's streams sent has reached the gateway
    /// (after [`Self::let_finish`], once HTTP/2 wrote its last).
    pub(crate) fn delivered(&self) -> bool {
        self.channel.as_ref().is_none_or(|(ch, _)| ch.delivered())
    }

    /// The current session is leaving: nothing new goes over it, and the
    /// tunnel waits for the next session.
    fn retire(&mut self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // A session's task still waiting for the first stream ends.
        self.want.notify.notify_waiters();
        self.link.send_replace(Slot::default());
    }

    /// The session ended (or is being replaced): its streams are reset with
    /// `why`; new streams wait for the next session.
    pub(crate) fn close(&mut self, why: &str) {
        self.retire();
        self.open = Arc::new(AtomicU64::new(0));
        if let Some((ch, _)) = self.channel.take() {
            ch.close(why);
        }
    }

    /// New streams wait for the next session instead of going over this
    /// one (a hand-over is making it); [`DataPlane::release_new_streams`]
    /// undoes this if there is no next session after all.
    pub(crate) fn hold_new_streams(&mut self) {
        self.link.send_modify(|s| s.held = true);
    }

    pub(crate) fn release_new_streams(&mut self) {
        self.link.send_modify(|s| s.held = false);
    }

    /// Moves the current session's channel and its open streams to a data
    /// plane of their own (no tunnel opens streams there); this one waits
    /// for the next session.
    pub(crate) fn split_off(&mut self) -> (DataPlane, Tunnel) {
        let (mut d, t) = DataPlane::new();
        d.channel = self.channel.take();
        d.open = std::mem::replace(&mut self.open, Arc::new(AtomicU64::new(0)));
        // HTTP/2 ends when its last request handle goes: the draining
        // session keeps one while its streams last.
        let link = self.link.send_replace(Slot::default()).link;
        d.link.send_replace(Slot { link, held: true });
        self.retire();
        (d, t)
    }

    /// A new session with a channel of `window` bytes: start its HTTP/2
    /// client; the tunnel uses it once the handshake is done.
    pub(crate) fn start(&mut self, window: u64) {
        self.close("session replaced");
        let (ch, io) = SessionChannel::new(ChannelConfig::with_window(window));
        let mine = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let first = ch.first();
        let task_ch = ch.clone();
        self.channel = Some((ch, first));
        let link = self.link.clone();
        let open = self.open.clone();
        let live = self.epoch.clone();
        let want = self.want.clone();
        tokio::spawn(async move {
            // HTTP/2 starts with the first stream asked for.
            loop {
                let woken = want.notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if live.load(Ordering::Acquire) != mine {
                    return;
                }
                if want.wanted.load(Ordering::Acquire) {
                    break;
                }
                woken.await;
            }
            let Ok((send, conn)) = jvpn_runtime::h2_stream::client_builder(window)
                .handshake::<_, Bytes>(io)
                .await
            else {
                return;
            };
            // Publish unless the session ended meanwhile (checked under the
            // watch's lock, which `close` needs too).
            link.send_if_modified(|s| {
                let current = live.load(Ordering::Acquire) == mine;
                if current {
                    s.link = Some(Link {
                        send,
                        channel: task_ch.clone(),
                        open,
                    });
                }
                current
            });
            let ended = conn.await;
            // HTTP/2 ended: the session's streams cannot go on; its
            // keep-alive loop (or the draining session's) sees the closed
            // channel. A replaced session's channel is closed already. One
            // that finished after its last stream (a draining session let
            // it) wrote its last into the channel, which stays until the
            // gateway has every byte.
            if ended.is_err() || !task_ch.write_shut() {
                task_ch.close("the session's HTTP/2 connection ended");
            }
            link.send_if_modified(|s| {
                let current = live.load(Ordering::Acquire) == mine;
                if current {
                    s.link = None;
                }
                current
            });
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jvpn_proto::pb::session::frame::Kind;

    /// Moves frames between two channels until the test ends (what the
    /// transports do between agent and gateway).
    pub(crate) async fn pump(a: (SessionChannel, Generation), b: (SessionChannel, Generation)) {
        let (mut wa, mut wb) = (a.0.wakeups(), b.0.wakeups());
        loop {
            for (from, to) in [(&a, &b), (&b, &a)] {
                while let Some(k) = from.0.next_frame(from.1, true) {
                    let r = match k {
                        Kind::Data(d) => to.0.on_data(to.1, d),
                        Kind::Ack(x) => to.0.on_ack(to.1, x),
                        _ => Ok(()),
                    };
                    r.unwrap();
                }
            }
            tokio::select! {
                () = wa.changed() => {}
                () = wb.changed() => {}
            }
        }
    }

    /// The gateway end of `d`'s current session (`start`ed): answers every
    /// CONNECT `200` and hands over its request body.
    pub(crate) fn gateway_for(
        d: &DataPlane,
    ) -> tokio::sync::mpsc::UnboundedReceiver<h2::RecvStream> {
        let agent = d.channel.clone().unwrap();
        let (gw, io) = SessionChannel::new(ChannelConfig::with_window(1 << 20));
        let first = gw.first();
        tokio::spawn(pump(agent, (gw, first)));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = jvpn_runtime::h2_stream::server_builder(1 << 20)
                .handshake::<_, Bytes>(io)
                .await
                .unwrap();
            let mut answered = Vec::new();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                // A request its agent cancelled meanwhile gets no answer.
                if let Ok(s) = respond.send_response(http::Response::new(()), false) {
                    answered.push(s);
                    let _ = tx.send(req.into_body());
                }
            }
        });
        rx
    }

    /// A CONNECT waiting for the gateway's answer already uses its session:
    /// at a GoAway the agent must keep the session until the answer, not
    /// replace it at once and fail the CONNECT with "session replaced".
    #[tokio::test]
    async fn a_connect_waiting_for_its_answer_counts_as_open() {
        let (mut d, tunnel) = DataPlane::new();
        d.start(1 << 20);
        let agent = d.channel.clone().unwrap();
        let (gw, io) = SessionChannel::new(ChannelConfig::with_window(1 << 20));
        let first = gw.first();
        let pumping = tokio::spawn(pump(agent, (gw, first)));
        let (asked, got_asked) = tokio::sync::oneshot::channel();
        let gateway = tokio::spawn(async move {
            let mut conn = jvpn_runtime::h2_stream::server_builder(1 << 20)
                .handshake::<_, Bytes>(io)
                .await
                .unwrap();
            let (_req, respond) = conn.accept().await.unwrap().unwrap();
            let _ = asked.send(());
            // The answer never comes (a slow dial); the connection runs.
            let _respond = respond;
            while conn.accept().await.is_some() {}
        });
        let target = Target::new("example", 80).unwrap();
        let connect = tokio::spawn(async move { tunnel.connect(&target).await.map(drop) });
        got_asked.await.unwrap();
        assert_eq!(d.open_streams(), 1, "the CONNECT in flight");
        // Given up (the application left): the session is free again.
        connect.abort();
        let _ = connect.await;
        assert_eq!(d.open_streams(), 0);
        gateway.abort();
        pumping.abort();
    }
}
