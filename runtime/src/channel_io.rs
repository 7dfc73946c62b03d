//! The resumable session channel ([`jvpn_proto::channel`]) as an async byte
//! stream, for a multiplexer (HTTP/2) that must see one connection that
//! never breaks while the transports under it come and go.
//!
//! Two faces share one [`Channel`]:
//! - [`ChannelStream`] (`AsyncRead + AsyncWrite`) for the multiplexer. A
//!   write takes what the window allows and is pending when it is full
//!   (backpressure reaches the multiplexer, and through its flow control
//!   the application); a read takes received bytes and counts them
//!   consumed, which is what acknowledgements report.
//! - [`SessionChannel`] for whichever transport currently carries the
//!   session: it takes arriving `Data`/`Ack` frames, hands out the frames to
//!   send, and after a RESUME resends from the peer's offset.
//!
//! When the session ends, [`SessionChannel::close`] fails every pending
//! read and write with `ConnectionReset`: streams end explicitly, never as
//! a clean EOF that could pass for a complete transfer.
//!
//! One transport at a time: every call from the transport side names the
//! [`Generation`] it was given ([`SessionChannel::first`] for the HELLO
//! transport, [`SessionChannel::resume_from`] for each later one). Calls
//! from an older generation are ignored: an old writer still running gets
//! no frames (they would be lost), an old reader's frames change nothing
//! (a stale ack would otherwise be a range error that ends the channel).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use jvpn_proto::Mono;
use jvpn_proto::channel::{Channel, ChannelConfig, ChannelError};
use jvpn_proto::pb::session::{Ack, Data, frame::Kind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::wire::lock;

/// HTTP/2's initial (stream, connection) flow-control windows over a
/// channel of `window` bytes, for a receiver that lets `stalled` streams'
/// readers stop before the session's other streams wait: a stream may have
/// half the channel window in flight, so a stream whose reader stopped
/// holds at most half a window at the receiver; the connection window is
/// `stalled` stream windows, since HTTP/2 gives connection credit back only
/// as a stream's reader takes its bytes (a connection window equal to the
/// stream window froze every other stream behind one stopped reader).
///
/// Both at most HTTP/2's largest window (2³¹ − 1; h2 panics past it): a
/// peer announcing a huge channel window gets that, not a dead session.
pub fn h2_windows(window: u64, stalled: u64) -> (u32, u32) {
    const MAX: u64 = (1 << 31) - 1;
    let stream = (window / 2).clamp(64 * 1024, MAX) as u32;
    // Never more than four windows or 32 MiB, whichever is larger: a
    // policy's large window buys fewer stopped readers, not gigabytes.
    let cap = window.saturating_mul(4).max(32 << 20);
    let conn = u64::from(stream)
        .saturating_mul(stalled)
        .min(cap)
        .clamp(u64::from(stream), MAX) as u32;
    (stream, conn)
}

/// Stopped readers the agent holds before other streams wait: its
/// applications' (a browser's paused downloads), held in its own memory
/// (32 MiB at the default window when all of them stopped; fewer with a
/// larger window, the connection window being at most 32 MiB or four
/// channel windows).
pub const AGENT_STALLED_STREAMS: u64 = 64;

/// Stopped readers the gateway holds (destinations that stopped taking an
/// upload): eight, four channel windows, since the gateway's memory is
/// every session's.
pub const GATEWAY_STALLED_STREAMS: u64 = 8;

/// Bytes HTTP/2 may queue per stream before they reach the channel (h2's
/// default is 400 KiB). The channel's own buffer, a window, is what rides
/// out a transport change; h2's queue in front of it only needs to keep the
/// channel fed, and on a busy session each stream's queue adds to the
/// session's memory.
pub const H2_SEND_BUF: usize = 64 * 1024;

/// What [`SessionChannel::resume_from`] did.
#[derive(Clone, Copy, Debug)]
pub struct Resumed {
    /// The new transport's generation.
    pub generation: Generation,
    /// Bytes that go out again (in flight on the lost transport).
    pub resent: u64,
}

/// Which transport a transport-side call comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation(u64);

#[derive(Debug)]
struct Inner {
    ch: Channel,
    /// The current transport's generation.
    generation: u64,
    /// Received, not yet read by the multiplexer.
    inbox: Inbox,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// Why the session's channel ended; every read and write fails after.
    closed: Option<String>,
    /// The peer ended the session after its last bytes
    /// ([`SessionChannel::finish`]): what came is read, then EOF.
    finished: bool,
    /// The multiplexer shut its writing side down: all it will ever send
    /// is in the channel.
    write_shut: bool,
}

impl Inner {
    /// No frame moves any more (closed, or finished by the peer).
    fn still(&self) -> bool {
        self.closed.is_some() || self.finished
    }
}

/// Received bytes in order: pieces as they came (no copy), then a tail of
/// small pieces copied together. A peer sending many tiny `Data` frames
/// would otherwise make the receiver hold one entry per frame, each
/// keeping alive the buffer it was decoded from: tens of times the window.
#[derive(Debug, Default)]
struct Inbox {
    pieces: VecDeque<Bytes>,
    tail: BytesMut,
}

impl Inbox {
    /// Pieces below this are copied into the tail.
    const COPY_BELOW: usize = 16 * 1024;

    /// `part`: `b` is a slice of a larger payload (a resend overlapping
    /// what arrived), copied too: it would keep the whole frame alive.
    fn push(&mut self, b: Bytes, part: bool) {
        if part || b.len() < Self::COPY_BELOW {
            self.tail.extend_from_slice(&b);
            return;
        }
        if !self.tail.is_empty() {
            self.pieces.push_back(self.tail.split().freeze());
        }
        self.pieces.push_back(b);
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.tail.is_empty()
    }

    /// Moves as much as fits into `buf`; returns how much.
    fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut n = 0;
        while buf.remaining() > 0 {
            let front: &mut dyn Buf = match self.pieces.front_mut() {
                Some(f) => f,
                None if !self.tail.is_empty() => &mut self.tail,
                None => break,
            };
            let take = front.remaining().min(buf.remaining());
            buf.put_slice(&front.chunk()[..take]);
            front.advance(take);
            if self.pieces.front().is_some_and(Bytes::is_empty) {
                self.pieces.pop_front();
            }
            n += take;
        }
        if self.tail.is_empty() && self.tail.capacity() > 0 {
            // Read out: an idle session holds no buffer.
            self.tail = BytesMut::new();
        }
        n
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.pieces.len() + usize::from(!self.tail.is_empty())
    }
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Bumped whenever a frame may be ready to send. A watch, not a
    /// `Notify`: every writer sees every bump, so a stale transport's
    /// writer still waiting can never swallow the current one's wakeup.
    outgoing: watch::Sender<()>,
    /// How far the channel has ended (see [`SessionChannel::gone`]).
    end: watch::Sender<End>,
    origin: Instant,
}

impl Shared {
    fn now(&self) -> Mono {
        Mono::between(self.origin, Instant::now())
    }

    fn wake_writers(&self) {
        self.outgoing.send_replace(());
    }
}

/// How a channel ended (see [`SessionChannel::ending`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Closed,
    Finished,
}

/// How far a channel has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Open,
    /// [`SessionChannel::finish`]: streams the peer ended finish here.
    Finishing,
    /// [`SessionChannel::close`]: every stream fails.
    Closed,
}

/// A transport writer's subscription to "a frame may be ready". Take it
/// before the first [`SessionChannel::next_frame`]: a bump after that is
/// never missed.
#[derive(Debug)]
pub struct Wakeups(watch::Receiver<()>);

impl Wakeups {
    /// Resolves at the next bump since the last call (or since
    /// subscribing); never, once the channel is gone.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The transport side of a session's channel. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SessionChannel {
    shared: Arc<Shared>,
}

/// The multiplexer side: one byte stream per direction.
#[derive(Debug)]
pub struct ChannelStream {
    shared: Arc<Shared>,
}

impl SessionChannel {
    /// A fresh channel (both offsets 0) and the stream over it.
    pub fn new(cfg: ChannelConfig) -> (Self, ChannelStream) {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                ch: Channel::new(cfg),
                generation: 0,
                inbox: Inbox::default(),
                read_waker: None,
                write_waker: None,
                closed: None,
                finished: false,
                write_shut: false,
            }),
            outgoing: watch::Sender::new(()),
            end: watch::Sender::new(End::Open),
            origin: Instant::now(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            ChannelStream { shared },
        )
    }

    /// The offset to report in a RESUME / ResumeOk: everything received.
    pub fn received(&self) -> u64 {
        lock(&self.shared.inner).ch.received()
    }

    /// The generation of the first transport (the one the session was
    /// established on).
    pub fn first(&self) -> Generation {
        Generation(0)
    }

    /// A new transport carries the session and the peer holds everything
    /// below `peer_received`: resend from there, and acknowledge again.
    /// Returns the new transport's generation (older ones are ignored
    /// from now on) and how many bytes go out again.
    pub fn resume_from(&self, peer_received: u64) -> Result<Resumed, ChannelError> {
        let mut g = lock(&self.shared.inner);
        let resent = g.ch.resume_from(peer_received)?;
        g.generation += 1;
        let next = Generation(g.generation);
        drop(g);
        self.shared.wake_writers();
        Ok(Resumed {
            generation: next,
            resent,
        })
    }

    /// A `Data` frame arrived on the current transport (ignored once the
    /// channel is closed).
    pub fn on_data(&self, from: Generation, d: Data) -> Result<(), ChannelError> {
        let mut g = lock(&self.shared.inner);
        if g.still() || from.0 != g.generation {
            return Ok(());
        }
        let whole = d.payload.len();
        let fresh = g.ch.on_data(d.seq, d.payload)?;
        crate::memory::note_moved(fresh.len());
        let waker = if fresh.is_empty() {
            None
        } else {
            let part = fresh.len() < whole;
            g.inbox.push(fresh, part);
            g.read_waker.take()
        };
        drop(g);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// An `Ack` frame arrived: window space for the writer.
    pub fn on_ack(&self, from: Generation, a: Ack) -> Result<(), ChannelError> {
        let mut g = lock(&self.shared.inner);
        if g.still() || from.0 != g.generation {
            return Ok(());
        }
        g.ch.on_ack(a.seq)?;
        let waker = if g.ch.space() > 0 {
            g.write_waker.take()
        } else {
            None
        };
        drop(g);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// The next frame to send on the current transport, if any: an `Ack`
    /// when one is due (`force_ack`: whatever is new, e.g. with a Pong),
    /// else the next `Data`.
    pub fn next_frame(&self, to: Generation, force_ack: bool) -> Option<Kind> {
        let now = self.shared.now();
        let mut g = lock(&self.shared.inner);
        if g.still() || to.0 != g.generation {
            return None;
        }
        if let Some(seq) = g.ch.ack_due(now, force_ack) {
            return Some(Kind::Ack(Ack { seq }));
        }
        let (seq, payload) = g.ch.next_data()?;
        crate::memory::note_moved(payload.len());
        Some(Kind::Data(Data { seq, payload }))
    }

    /// A subscription that resolves when a frame may be ready: new bytes
    /// to send, or an acknowledgement due (by bytes; by time, see
    /// [`Self::ack_at`]), or the channel closed or resumed.
    pub fn wakeups(&self) -> Wakeups {
        Wakeups(self.shared.outgoing.subscribe())
    }

    /// Whether `g` is still the transport carrying the session (a writer
    /// of an older one should end).
    pub fn is_current(&self, g: Generation) -> bool {
        lock(&self.shared.inner).generation == g.0
    }

    /// When an acknowledgement falls due by time alone.
    pub fn ack_at(&self) -> Option<Instant> {
        let g = lock(&self.shared.inner);
        g.ch.ack_deadline()
            .map(|t| self.shared.origin + t.saturating_since(Mono::ZERO))
    }

    /// Bytes held for the peer (unacknowledged).
    pub fn buffered(&self) -> u64 {
        lock(&self.shared.inner).ch.buffered()
    }

    /// The session ended (or its channel broke): every stream over it
    /// fails with `ConnectionReset` carrying `why`, nothing more is sent or
    /// taken in, and both buffers are freed.
    pub fn close(&self, why: &str) {
        let mut g = lock(&self.shared.inner);
        if g.closed.is_none() {
            g.closed = Some(why.to_owned());
        }
        g.inbox = Inbox::default();
        self.ended(g, End::Closed);
    }

    /// Frees the outgoing buffer, wakes whoever waits on the channel, and
    /// says how it ended.
    fn ended(&self, mut g: std::sync::MutexGuard<'_, Inner>, end: End) {
        let cfg = *g.ch.config();
        g.ch = Channel::new(cfg);
        let wakers = [g.read_waker.take(), g.write_waker.take()];
        drop(g);
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
        // A transport waiting for frames learns there are none.
        self.shared.wake_writers();
        self.shared.end.send_replace(end);
    }

    /// The peer ended the session after its last bytes (the agent closed
    /// it once each of its streams had ended and the gateway held every
    /// byte): what arrived is still read, then reads end (EOF), so streams
    /// that ended at the peer finish delivering; nothing more goes out
    /// (writes are taken and dropped) and the outgoing buffer is freed.
    /// [`Self::close`] ends whatever is left.
    pub fn finish(&self) {
        let mut g = lock(&self.shared.inner);
        if g.still() {
            return;
        }
        g.finished = true;
        self.ended(g, End::Finishing);
    }

    /// The session ended for `why`: [`Self::finish`] if this side's
    /// multiplexer ended cleanly before (the peer's said goodbye, so only
    /// streams it had ended are left, delivering), else [`Self::close`].
    pub fn end(&self, why: &str) {
        if self.write_shut() {
            self.finish();
        } else {
            self.close(why);
        }
    }

    /// Resolves once the channel closed. For a stream's relay that is only
    /// waiting on its TCP side (the stream's own side ended): it learns
    /// here that the stream cannot go on, instead of at its next write.
    pub fn gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shared.end.subscribe();
        async move {
            // The sender lives as long as the channel's last handle: gone.
            let _ = rx.wait_for(|e| *e == End::Closed).await;
        }
    }

    /// Resolves once the channel ended, saying how: closed (every stream
    /// fails), or finished by the peer ([`Self::finish`]: a stream the
    /// peer had ended may still deliver what it holds).
    pub fn ending(&self) -> impl std::future::Future<Output = Ending> + Send + 'static {
        let mut rx = self.shared.end.subscribe();
        async move {
            match rx.wait_for(|e| *e != End::Open).await.map(|e| *e) {
                Ok(End::Finishing) => Ending::Finished,
                _ => Ending::Closed,
            }
        }
    }

    /// Everything the multiplexer wrote is acknowledged by the peer, and
    /// it shut its writing side down (or never wrote): nothing of this
    /// side's is on its way any more.
    pub fn delivered(&self) -> bool {
        let g = lock(&self.shared.inner);
        g.closed.is_none() && g.ch.buffered() == 0 && (g.write_shut || g.ch.end() == 0)
    }

    /// The multiplexer shut its writing side down.
    pub fn write_shut(&self) -> bool {
        lock(&self.shared.inner).write_shut
    }

    /// Why the channel was closed, if it was.
    pub fn closed(&self) -> Option<String> {
        lock(&self.shared.inner).closed.clone()
    }
}

fn reset(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, why.to_owned())
}

impl ChannelStream {
    /// Resolves once bytes arrived or the channel closed: a multiplexer
    /// can wait for its peer before allocating anything (idle sessions
    /// then cost only the channel).
    pub async fn readable(&mut self) {
        std::future::poll_fn(|cx| {
            let mut g = lock(&self.shared.inner);
            if g.still() || !g.inbox.is_empty() {
                Poll::Ready(())
            } else {
                g.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let now = self.shared.now();
        let mut g = lock(&self.shared.inner);
        if let Some(why) = &g.closed {
            return Poll::Ready(Err(reset(why)));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = g.inbox.read_into(buf);
        if g.finished {
            // What came is read out; then the end (EOF).
            return Poll::Ready(Ok(()));
        }
        if n == 0 {
            g.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let armed = g.ch.ack_deadline().is_some();
        g.ch.consume(n, now);
        // The writer needs to hear of it only when an ack is now due by
        // bytes, or when the first unacknowledged byte starts the ack
        // timer it must arm; every other read would be a wake-up for
        // nothing (most of a bulk transfer's reads).
        let wake = !armed || g.ch.ack_due_by_bytes();
        drop(g);
        if wake {
            self.shared.wake_writers();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut g = lock(&self.shared.inner);
        if let Some(why) = &g.closed {
            return Poll::Ready(Err(reset(why)));
        }
        if g.finished {
            // The peer has gone: nothing reaches it any more.
            return Poll::Ready(Ok(buf.len()));
        }
        // A writer that still has unsent bytes is not waiting: it takes
        // these with them. Only the first bytes after it ran dry wake it.
        let was_dry = g.ch.sent() == g.ch.end();
        let n = g.ch.write(buf);
        if n == 0 && !buf.is_empty() {
            g.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(g);
        if was_dry {
            self.shared.wake_writers();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the channel; the transport side sends them.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The multiplexer's connection ends with the session, not here; it
        // only says that it has written its last.
        lock(&self.shared.inner).write_shut = true;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
impl SessionChannel {
    /// Pieces the multiplexer has not read yet.
    fn inbox_entries(&self) -> usize {
        lock(&self.shared.inner).inbox.entries()
    }

    /// Bytes waiting in the copied tail.
    fn inbox_copied(&self) -> usize {
        lock(&self.shared.inner).inbox.tail.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_windows_stay_within_what_http2_allows() {
        assert_eq!(h2_windows(1 << 20, 8), (512 << 10, 4 << 20));
        assert_eq!(h2_windows(1 << 20, 64), (512 << 10, 32 << 20));
        assert_eq!(h2_windows(0, 8), (64 << 10, 512 << 10));
        assert_eq!(h2_windows(0, 0), (64 << 10, 64 << 10));
        // A window of 1 GiB (a newer or broken gateway) used to give a
        // connection window past 2^31 - 1, which h2 asserts on.
        let max = (1 << 31) - 1;
        assert_eq!(h2_windows(1 << 30, 8), (512 << 20, max));
        // A 64 MiB window: not 64 × 32 MiB, four windows.
        assert_eq!(h2_windows(64 << 20, 64), (32 << 20, 256 << 20));
        assert_eq!(h2_windows(u64::MAX, 64), (max, max));
    }
    use jvpn_proto::pb::session::Data;
    use tokio::io::AsyncReadExt;

    /// Each received piece as a slice of a buffer of its own (at least
    /// 16 KiB), as a frame decoded from a TLS read buffer is.
    fn piece(seq: u64, len: usize, fill: u8) -> Data {
        let mut b = vec![0u8; len.max(16 * 1024)];
        b[..len].fill(fill);
        Data {
            seq,
            payload: Bytes::from(b).slice(..len),
        }
    }

    /// A peer sending a window's worth of 1-byte `Data` frames to a reader
    /// that does not read must not make the receiver keep one buffer per
    /// frame (each pinning what it was read with): small pieces are copied
    /// together, large ones kept as they came; the bytes read back are the
    /// same, in order, also when reads and arrivals interleave.
    #[tokio::test]
    async fn tiny_data_frames_are_held_together_not_one_by_one() {
        let (ch, mut stream) = SessionChannel::new(ChannelConfig::default());
        let g = ch.first();
        let mut want = Vec::new();
        let mut seq = 0;
        let mut send = |from: u32, to: u32, want: &mut Vec<u8>| {
            for i in from..to {
                let len = if i % 5_000 == 4_999 { 20_000 } else { 1 };
                ch.on_data(g, piece(seq, len, i as u8)).unwrap();
                want.extend(std::iter::repeat_n(i as u8, len));
                seq += len as u64;
            }
        };
        send(0, 20_000, &mut want);
        // Four runs of small pieces, each copied into one, and the four
        // large pieces between them.
        assert_eq!(ch.inbox_entries(), 8);
        // Half read, then more arrives behind a partly read tail.
        let mut got = vec![0u8; want.len() / 2];
        stream.read_exact(&mut got).await.unwrap();
        send(20_000, 22_000, &mut want);
        let mut rest = vec![0u8; want.len() - got.len()];
        stream.read_exact(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert!(got == want, "bytes differ");
        assert_eq!(ch.inbox_entries(), 0);
    }

    /// A resend that overlaps what arrived leaves a slice of its frame:
    /// copied, not kept with the whole frame behind it.
    #[tokio::test]
    async fn the_new_part_of_a_resend_is_copied() {
        let (ch, mut stream) = SessionChannel::new(ChannelConfig::default());
        let g = ch.first();
        ch.on_data(g, piece(0, 20_000, 1)).unwrap();
        let mut resend = vec![1u8; 40_000];
        resend[20_000..].fill(2);
        ch.on_data(
            g,
            Data {
                seq: 0,
                payload: Bytes::from(resend),
            },
        )
        .unwrap();
        // The first frame as it came, the resend's new half copied.
        assert_eq!(ch.inbox_entries(), 2);
        assert_eq!(ch.inbox_copied(), 20_000);
        let mut got = vec![0u8; 40_000];
        stream.read_exact(&mut got).await.unwrap();
        assert!(got[..20_000].iter().all(|b| *b == 1) && got[20_000..].iter().all(|b| *b == 2));
    }

    /// Polls `f` once: has it finished?
    fn ready<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx).is_ready()
    }

    /// Finished by the peer: what arrived is read, then EOF; writes are
    /// taken and go nowhere; no frame goes out; streams learn it is a
    /// finish, and are told the channel is gone only at `close`.
    #[tokio::test]
    async fn a_finished_channel_reads_out_then_ends() {
        use tokio::io::AsyncWriteExt;
        let (ch, mut stream) = SessionChannel::new(ChannelConfig::default());
        let g = ch.first();
        ch.on_data(g, piece(0, 5, 7)).unwrap();
        let mut ending = Box::pin(ch.ending());
        let mut gone = Box::pin(ch.gone());
        assert!(!ready(&mut ending));
        ch.finish();
        assert_eq!(ending.await, Ending::Finished);
        assert!(ch.next_frame(g, true).is_none(), "a frame after the finish");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![7u8; 5]);
        stream.write_all(b"nobody reads this").await.unwrap();
        assert!(ch.next_frame(g, true).is_none());
        assert!(!ready(&mut gone));
        ch.close("ended");
        assert!(ready(&mut gone));
        assert_eq!(ch.ending().await, Ending::Closed);
    }

    /// A session that ends with its multiplexer done (it shut its side
    /// down cleanly) finishes instead of closing.
    #[tokio::test]
    async fn an_end_after_a_clean_shutdown_is_a_finish() {
        use tokio::io::AsyncWriteExt;
        let (ch, mut stream) = SessionChannel::new(ChannelConfig::default());
        let (other, _s) = SessionChannel::new(ChannelConfig::default());
        stream.shutdown().await.unwrap();
        ch.end("ended");
        other.end("ended");
        assert_eq!(ch.ending().await, Ending::Finished);
        assert_eq!(other.ending().await, Ending::Closed);
    }

    /// What the multiplexer wrote is delivered once the peer acknowledged
    /// all of it and the multiplexer shut its side down; never after a
    /// close.
    #[tokio::test]
    async fn delivered_means_acknowledged_and_shut_down() {
        use jvpn_proto::pb::session::Ack;
        use tokio::io::AsyncWriteExt;
        let (ch, mut stream) = SessionChannel::new(ChannelConfig::default());
        let g = ch.first();
        assert!(ch.delivered(), "nothing written, nothing owed");
        stream.write_all(b"hello").await.unwrap();
        assert!(!ch.delivered());
        assert!(matches!(ch.next_frame(g, false), Some(Kind::Data(_))));
        ch.on_ack(g, Ack { seq: 5 }).unwrap();
        assert!(!ch.delivered(), "the writer may still write");
        stream.shutdown().await.unwrap();
        assert!(ch.write_shut() && ch.delivered());
        ch.close("ended");
        assert!(!ch.delivered());
    }
}
