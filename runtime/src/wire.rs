//! Socket-level helpers every service shares: the pre-TLS status reply with
//! its lingering close, frame read/write over any async stream, an accept
//! loop that backs off on errors, a lock that survives poisoning, and a
//! read that does not wait.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use jvpn_proto::frame::{self, FrameError};
use jvpn_proto::pb::session::frame::Kind;
use jvpn_proto::preamble::{STATUS_LEN, Status, StatusReply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Locks `m`, taking the data even if a holder panicked: every structure
/// behind these mutexes is valid between statements, so poisoning carries no
/// meaning here and must not take the whole process down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `fut` once with the caller's waker: its output if it is ready,
/// `None` if not. The future is then dropped, so only for cancel-safe ones
/// (a socket read, a frame read that keeps its partial bytes).
pub async fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    use std::task::Poll;
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// How long and how much a refused connection is read after its status reply.
const STATUS_LINGER: Duration = Duration::from_millis(250);
const STATUS_LINGER_BYTES: usize = 16 * 1024;

/// A retry hint in whole milliseconds, rounded up: a wait under a
/// millisecond is still a wait (0 would mean "no hint").
fn hint_ms(retry: Duration) -> u16 {
    u16::try_from(retry.as_nanos().div_ceil(1_000_000)).unwrap_or(u16::MAX)
}

/// The 8-byte pre-TLS status reply.
fn reply(status: Status, retry: Duration) -> [u8; STATUS_LEN] {
    StatusReply {
        status,
        retry_after_ms: hint_ms(retry),
    }
    .encode()
}

/// The status reply written without waiting, then the socket dropped: for
/// a router too short of descriptors to hold a socket while its answer is
/// read. Best effort (a fresh socket's send buffer takes 8 bytes; unread
/// input may still turn the close into a reset), but an agent that reads
/// it waits the hint instead of taking a bare close for a failure.
pub fn send_status_now(stream: TcpStream, status: Status, retry: Duration) {
    let _ = stream.try_write(&reply(status, retry));
}

/// Answers with the 8-byte pre-TLS status reply and closes the write side.
pub async fn send_status(stream: &mut TcpStream, status: Status, retry: Duration) {
    let _ = stream.write_all(&reply(status, retry)).await;
    let _ = stream.shutdown().await;
    // Lingering close: closing with unread input (the agent sends its
    // ClientHello right after the preamble) makes the kernel answer with a
    // RST, which can destroy the reply before the agent reads it. Read and
    // discard until the agent closes, briefly and boundedly.
    let mut sink = [0u8; 2048];
    let mut left = STATUS_LINGER_BYTES;
    let _ = tokio::time::timeout(STATUS_LINGER, async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: Kind) -> std::io::Result<()> {
    let bytes = frame::to_bytes(kind).map_err(std::io::Error::other)?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream. Cancel-safe: a
/// partial frame stays in `buf`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Kind>, FrameError> {
    loop {
        if let Some(k) = frame::decode(buf)? {
            return Ok(Some(k));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Pause after a failed accept (EMFILE and friends) instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);

/// Lets a repeated warning through at most once per interval and counts
/// the ones it held back (to log with the next): a condition that repeats
/// per connection or per request (a store refusing writes, a process out
/// of descriptors) is then one line per interval, not thousands a second.
#[derive(Debug)]
pub struct AtMost {
    every_ms: u64,
    /// When one last went through (ms on [`AtMost::now_ms`]'s clock + 1;
    /// 0: never).
    last: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl AtMost {
    pub const fn per(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as u64,
            last: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last one)` when this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Self::now_ms())
    }

    fn now_ms() -> u64 {
        static START: std::sync::LazyLock<std::time::Instant> =
            std::sync::LazyLock::new(std::time::Instant::now);
        START.elapsed().as_millis() as u64
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now_ms + 1 >= last.saturating_add(self.every_ms);
        if due
            && self
                .last
                .compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The next connection on `listener`. Accept errors (out of descriptors)
/// back off for [`ACCEPT_BACKOFF`] instead of spinning.
pub async fn accept(listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(e) => {
                // Out of descriptors, this repeats every backoff.
                static WARN: AtMost = AtMost::per(Duration::from_secs(10));
                if let Some(held) = WARN.allow() {
                    tracing::warn!(error = %e, held, "accept failed");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// [`accept`], or `None` once `stop` changes.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    tokio::select! {
        x = accept(listener) => Some(x),
        _ = stop.changed() => None,
    }
}

/// One stream read and written from two places (a connection's reader and
/// writer), with the stream itself still reachable between polls (e.g. to
/// export TLS keying material), which `tokio::io::split` does not allow.
/// Each poll holds the lock only for that poll.
#[derive(Debug)]
pub struct SharedIo<T>(std::sync::Arc<Mutex<T>>);

impl<T> Clone for SharedIo<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> SharedIo<T> {
    pub fn new(io: T) -> Self {
        Self(std::sync::Arc::new(Mutex::new(io)))
    }

    /// Runs `f` on the stream (between polls).
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut lock(&self.0))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SharedIo<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *lock(&self.0)).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SharedIo<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *lock(&self.0)).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *lock(&self.0)).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *lock(&self.0)).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_hint_under_a_millisecond_is_one_not_none() {
        assert_eq!(hint_ms(Duration::from_micros(150)), 1);
        assert_eq!(hint_ms(Duration::from_micros(1_001)), 2);
        assert_eq!(hint_ms(Duration::from_millis(250)), 250);
        assert_eq!(hint_ms(Duration::ZERO), 0);
        assert_eq!(hint_ms(Duration::from_secs(3_600)), u16::MAX);
    }

    #[test]
    fn a_repeated_warning_goes_through_once_per_interval_with_a_count() {
        let w = AtMost::per(Duration::from_secs(10));
        assert_eq!(w.allow_at(5), Some(0));
        assert_eq!(w.allow_at(6), None);
        assert_eq!(w.allow_at(9_000), None);
        assert_eq!(w.allow_at(10_005), Some(2));
        assert_eq!(w.allow_at(10_006), None);
        assert_eq!(w.allow_at(20_005), Some(1));
    }
}
