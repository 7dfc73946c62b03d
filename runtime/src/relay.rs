//! A stream's two ends joined: a TCP connection (the application's at the
//! agent, the destination's at the gateway) and the multiplexed stream
//! that carries it through the session.
//!
//! Bytes are copied both ways until both directions ended; a half-close
//! travels (EOF on one side shuts the other side's writer down). The first
//! error ends both directions and resets the TCP connection (RST, not a
//! clean FIN): a stream whose session died must never look like one that
//! ended, to the application or to the destination.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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
/// `moved` is told of every chunk after it was written and answers how long
/// to wait before the next read that way (a byte-rate limit; zero for
/// none).
pub async fn relay<S>(
    tcp: TcpStream,
    stream: S,
    early: &[u8],
    moved: &(dyn Fn(Way, usize) -> Duration + Sync),
) -> Relayed
where
    S: AsyncRead + AsyncWrite,
{
    let (mut sr, mut sw) = tokio::io::split(stream);
    let (mut tr, mut tw) = tcp.into_split();
    let (mut to_tcp, mut from_tcp) = (0, 0);
    let up = async {
        if !early.is_empty() {
            sw.write_all(early).await?;
        }
        copy(&mut tr, &mut sw, Way::FromTcp, &mut from_tcp, moved).await
    };
    let down = copy(&mut sr, &mut tw, Way::ToTcp, &mut to_tcp, moved);
    let reset = tokio::try_join!(up, down).is_err();
    if reset && let Ok(t) = tr.reunite(tw) {
        // SO_LINGER 0: a reset. (The deprecation is about a linger > 0
        // blocking on drop; 0 never does.)
        #[allow(deprecated)]
        let _ = t.set_linger(Some(Duration::ZERO));
    }
    Relayed {
        reset,
        to_tcp,
        from_tcp,
    }
}

/// Copies until EOF, then shuts the writer down (a half-close travels).
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    way: Way,
    count: &mut u64,
    moved: &(dyn Fn(Way, usize) -> Duration + Sync),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        *count += n as u64;
        let wait = moved(way, n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
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
        let relay = relay(tcp, stream, b"early ", &moved);
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
        let r = relay(tcp, Broken, b"", &|_, _| Duration::ZERO).await;
        assert!(r.reset);
        let mut b = [0u8; 1];
        let e = app.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
