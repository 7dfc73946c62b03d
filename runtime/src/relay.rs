//! A stream's two ends joined: a TCP connection (the application's at the
//! agent, the destination's at the gateway) and the multiplexed stream
//! that carries it through the session.
//!
//! Bytes are copied both ways until both directions ended; a half-close
//! travels (EOF on one side shuts the other side's writer down), and once
//! one direction ended the other may go quiet for [`HALF_CLOSED_IDLE`] at
//! most (a peer that never closes its side cannot hold the stream for the
//! session's life). The first
//! error ends both directions and resets the TCP connection (RST, not a
//! clean FIN): a stream whose session died must never look like one that
//! ended, to the application or to the destination.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Once one direction ended, how long the other may move nothing before
/// the stream ends.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(300);

/// One copy's read size. Allocated per direction while the stream lives.
pub const CHUNK: usize = 16 * 1024;

/// Which way a chunk moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// From the multiplexed stream out to the TCP connection.
    ToTcp,
    /// From the TCP connection into the multiplexed stream.
    FromTcp,
}

/// How a relay ended, and the bytes that moved each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// An error ended it and the TCP connection was reset.
    pub reset: bool,
    pub to_tcp: u64,
    pub from_tcp: u64,
}

/// Relays between `tcp` and `stream` (see the module). `early` goes into
/// the stream first (bytes an application sent right behind its request).
/// `moved` is told of every chunk before it is written and answers how
/// long to wait before writing it (a byte-rate limit; zero for none). Once `gone` resolves (the stream's carrier, its session, ended)
/// the relay ends as on an error, whatever it was waiting for.
pub async fn relay<S>(
    tcp: TcpStream,
    stream: S,
    early: &[u8],
    moved: &(dyn Fn(Way, usize) -> Duration + Sync),
    gone: impl std::future::Future<Output = ()>,
) -> Relayed
where
    S: AsyncRead + AsyncWrite,
{
    let (mut sr, mut sw) = tokio::io::split(stream);
    // Armed until the relay ends cleanly: however else the socket closes
    // (this future dropped, the process leaving) it resets, never a FIN
    // that would pass a cut stream off as whole.
    // Borrowed halves: an owned write half sends a FIN when dropped.
    reset_on_close(&tcp, true);
    let mut tcp = tcp;
    let (mut tr, mut tw) = tcp.split();
    let (mut to_tcp, mut from_tcp) = (0, 0);
    // Set when a direction ended cleanly: the other then has
    // HALF_CLOSED_IDLE between bytes.
    let ended = watch::Sender::new(false);
    let up = async {
        if !early.is_empty() {
            sw.write_all(early).await?;
        }
        copy(&mut tr, &mut sw, Way::FromTcp, &mut from_tcp, moved, &ended).await
    };
    let down = copy(&mut sr, &mut tw, Way::ToTcp, &mut to_tcp, moved, &ended);
    let reset = tokio::select! {
        // A relay that ended cleanly stays clean even if its carrier went
        // at the same moment.
        biased;
        r = async { tokio::try_join!(up, down) } => r.is_err(),
        () = gone => true,
    };
    if !reset {
        reset_on_close(&tcp, false);
    }
    Relayed {
        reset,
        to_tcp,
        from_tcp,
    }
}

/// Closes `tcp` with a reset (RST), not a clean FIN: its peer must not
/// take what it got for the whole.
pub fn reset(tcp: TcpStream) {
    reset_on_close(&tcp, true);
}

/// Whether closing `tcp` from now on sends a reset (SO_LINGER 0) or a FIN
/// after what was written. (The deprecation is about a linger > 0
/// blocking on drop; 0 never does.)
pub fn reset_on_close(tcp: &TcpStream, reset: bool) {
    #[allow(deprecated)]
    let _ = tcp.set_linger(reset.then_some(Duration::ZERO));
}

/// Copies until EOF, then shuts the writer down (a half-close travels) and
/// says so in `ended`. Once the other direction ended, this one fails if
/// it moves nothing for [`HALF_CLOSED_IDLE`].
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    way: Way,
    count: &mut u64,
    moved: &(dyn Fn(Way, usize) -> Duration + Sync),
    ended: &watch::Sender<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut other = ended.subscribe();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            n = r.read(&mut buf) => n?,
            () = quiet(&mut other) => return Err(io::ErrorKind::TimedOut.into()),
        };
        if n == 0 {
            w.shutdown().await?;
            ended.send_replace(true);
            return Ok(());
        }
        // Paid for before it moves: paying after let every stream sharing
        // a rate move one chunk ahead of it (32 streams, 32 chunks).
        let wait = moved(way, n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        tokio::select! {
            biased;
            r = w.write_all(&buf[..n]) => r?,
            () = quiet(&mut other) => return Err(io::ErrorKind::TimedOut.into()),
        }
        *count += n as u64;
    }
}

/// Resolves [`HALF_CLOSED_IDLE`] after the other direction ended (never
/// before it did).
async fn quiet(other: &mut watch::Receiver<bool>) {
    if other.wait_for(|e| *e).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(HALF_CLOSED_IDLE).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Both ways byte-exact, half-closes travel, early bytes first, every
    /// chunk reported with its direction.
    #[tokio::test]
    async fn bytes_and_half_closes_go_through_and_are_counted() {
        let (tcp, mut app) = pair().await;
        let (stream, mut far) = tokio::io::duplex(64 * 1024);
        let seen = [AtomicU64::new(0), AtomicU64::new(0)];
        let moved = |w: Way, n: usize| {
            seen[usize::from(w == Way::ToTcp)].fetch_add(n as u64, Ordering::Relaxed);
            Duration::ZERO
        };
        let relay = relay(tcp, stream, b"early ", &moved, std::future::pending());
        let ends = async {
            app.write_all(b"up").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"early up");
            far.write_all(b"down").await.unwrap();
            far.shutdown().await.unwrap();
            let mut back = Vec::new();
            app.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"down");
        };
        let (r, ()) = tokio::join!(relay, ends);
        assert_eq!(
            r,
            Relayed {
                reset: false,
                to_tcp: 4,
                from_tcp: 2
            }
        );
        // The early bytes are not the TCP side's.
        assert_eq!(seen[0].load(Ordering::Relaxed), 2);
        assert_eq!(seen[1].load(Ordering::Relaxed), 4);
    }

    /// A failing stream resets the TCP connection: its peer reads an error,
    /// not a clean end.
    #[tokio::test]
    async fn an_error_resets_the_tcp_side() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &[u8],
            ) -> std::task::Poll<io::Result<usize>> {
                std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let (tcp, mut app) = pair().await;
        let r = relay(
            tcp,
            Broken,
            b"",
            &|_, _| Duration::ZERO,
            std::future::pending(),
        )
        .await;
        assert!(r.reset);
        let mut b = [0u8; 1];
        let e = app.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    /// The carrier went (`gone`) while the relay waited only on the TCP
    /// side (the stream's side had ended): the relay ends at once, with a
    /// reset the TCP peer sees.
    #[tokio::test]
    async fn the_carrier_going_ends_a_relay_that_waits_on_tcp() {
        let (tcp, mut app) = pair().await;
        let (stream, mut far) = tokio::io::duplex(64 * 1024);
        let (went, gone) = tokio::sync::oneshot::channel::<()>();
        let relay = relay(tcp, stream, b"", &|_, _| Duration::ZERO, async {
            let _ = gone.await;
        });
        let ends = async {
            far.shutdown().await.unwrap();
            let mut b = [0u8; 1];
            assert_eq!(app.read(&mut b).await.unwrap(), 0, "the half-close");
            went.send(()).unwrap();
            (app, far)
        };
        let (r, (mut app, _far)) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(relay, ends) })
                .await
                .expect("the relay outlived its carrier");
        assert!(r.reset);
        let mut wrote = Ok(());
        for _ in 0..10 {
            wrote = app.write_all(b"late").await;
            if wrote.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(wrote.is_err(), "the TCP side was not reset");
    }

    /// A relay that stops without ending (its task dropped, its process
    /// leaving) resets the TCP side: a clean FIN would pass what got through
    /// off as the whole.
    #[tokio::test]
    async fn a_relay_dropped_midway_resets_the_tcp_side() {
        let (tcp, mut app) = pair().await;
        let (stream, mut far) = tokio::io::duplex(64 * 1024);
        let relay = relay(
            tcp,
            stream,
            b"",
            &|_, _| Duration::ZERO,
            std::future::pending(),
        );
        let cut = async {
            far.write_all(b"part").await.unwrap();
            let mut b = [0u8; 4];
            app.read_exact(&mut b).await.unwrap();
        };
        tokio::select! {
            _ = relay => panic!("the relay ended by itself"),
            () = cut => {}
        }
        let mut b = [0u8; 1];
        let r = app.read(&mut b).await;
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "a cut stream read as a clean end"
        );
    }

    /// One side half-closed and the other then moves nothing: the stream
    /// ends (a reset) after the idle bound instead of holding its slot and
    /// sockets for the session's life. Bytes moving keep it open: two
    /// writes, each less than the bound after the one before but together
    /// more than it after the half-close, both arrive, and the reset comes
    /// no sooner than the bound after the last.
    #[tokio::test(start_paused = true)]
    async fn a_half_closed_stream_that_goes_quiet_ends() {
        let (tcp, mut app) = pair().await;
        let (stream, mut far) = tokio::io::duplex(64 * 1024);
        let relay = async {
            let r = relay(
                tcp,
                stream,
                b"",
                &|_, _| Duration::ZERO,
                std::future::pending(),
            )
            .await;
            (r, tokio::time::Instant::now())
        };
        let ends = async {
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            let mut last = tokio::time::Instant::now();
            for _ in 0..2 {
                tokio::time::sleep(HALF_CLOSED_IDLE * 5 / 6).await;
                far.write_all(b"late").await.unwrap();
                let mut b = [0u8; 4];
                app.read_exact(&mut b).await.unwrap();
                last = tokio::time::Instant::now();
            }
            // Then nothing more: the far end stays open and silent.
            (far, last)
        };
        let ((r, ended), (_far, last)) =
            tokio::time::timeout(HALF_CLOSED_IDLE * 4, async { tokio::join!(relay, ends) })
                .await
                .expect("the quiet half-closed stream never ended");
        assert!(r.reset, "{r:?}");
        assert_eq!(r.to_tcp, 8);
        assert!(ended >= last + HALF_CLOSED_IDLE, "ended too soon");
    }
}
