//! The listeners: a proxy port that speaks SOCKS5 and HTTP `CONNECT` (told
//! apart by the first byte: SOCKS5 starts with 5, HTTP with a letter) and
//! fixed forwards (`--forward LOCAL=HOST:PORT`, like `ssh -L`). Each
//! accepted connection becomes one stream through the session.
//!
//! A stream that ends with an error (its session ended, its channel broke)
//! resets the application's connection (RST), so no application mistakes
//! a cut transfer for a complete one.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use jvpn_proto::stream::{Refusal, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{http_connect, socks5};
use crate::streams::{Stream, StreamError, Tunnel};

/// Why a listen address was refused.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: not a loopback address; pass --allow-non-loopback to serve other hosts")]
pub struct NotLoopback {
    pub addr: SocketAddr,
}

/// Front doors listen on loopback unless the operator says otherwise: an
/// open proxy on a LAN would let anyone there use the session.
pub fn check_bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<(), NotLoopback> {
    if addr.ip().is_loopback() || allow_non_loopback {
        Ok(())
    } else {
        Err(NotLoopback { addr })
    }
}

/// How long a client may take to send its request (the SOCKS5 greeting and
/// request, or the HTTP `CONNECT` head): a connection that sends nothing
/// is closed, so idle ones cannot pile up.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one front door serves at once, at most; more wait in the
/// listen queue until one ends.
const MAX_CONNECTIONS: usize = 4096;

/// A door's bound within `open_files`: an eighth of them (a few doors
/// must leave room for the session's transports), at least 16.
fn door_limit(open_files: u64) -> usize {
    usize::try_from(open_files / 8)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS)
}

/// Serves SOCKS5 and HTTP `CONNECT` on `listener` until the task is dropped.
pub async fn serve_proxy(listener: TcpListener, tunnel: Tunnel) {
    let max = door_limit(jvpn_runtime::process::open_file_limit());
    serve_proxy_with(listener, tunnel, max).await;
}

async fn serve_proxy_with(listener: TcpListener, tunnel: Tunnel, max: usize) {
    accept_loop(listener, max, move |c| {
        let tunnel = tunnel.clone();
        async move {
            let _ = proxy_conn(c, &tunnel).await;
        }
    })
    .await;
}

/// Serves a fixed forward: every connection on `listener` becomes a stream
/// to `target`.
pub async fn serve_forward(listener: TcpListener, tunnel: Tunnel, target: Target) {
    let max = door_limit(jvpn_runtime::process::open_file_limit());
    accept_loop(listener, max, move |c| {
        let (tunnel, target) = (tunnel.clone(), target.clone());
        async move {
            match open_watching(&c, &tunnel, &target, Eof::HalfClose).await {
                Some(Ok(s)) => splice(c, s, &tunnel, BytesMut::new()).await,
                // Nothing to answer in a raw forward: the application sees a reset.
                Some(Err(_)) => jvpn_runtime::relay::reset(c),
                None => {}
            }
        }
    })
    .await;
}

/// Accepts while fewer than `max` connections are served, each in a task
/// of its own.
async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (c, _) = jvpn_runtime::wire::accept(&listener).await;
        let _ = c.set_nodelay(true);
        let work = serve(c);
        tokio::spawn(async move {
            let _slot = slot;
            work.await;
        });
    }
}

/// Reads more of the request by `by`; an EOF before it is complete, or
/// the deadline, is an error.
async fn read_more(c: &mut TcpStream, buf: &mut BytesMut, by: Instant) -> io::Result<()> {
    match tokio::time::timeout_at(by, c.read_buf(buf)).await {
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
        Ok(Ok(0)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(r) => r.map(drop),
    }
}

async fn proxy_conn(mut c: TcpStream, tunnel: &Tunnel) -> io::Result<()> {
    let by = Instant::now() + HEAD_TIMEOUT;
    let mut buf = BytesMut::with_capacity(1024);
    read_more(&mut c, &mut buf, by).await?;
    if buf[0] == 5 {
        socks(c, buf, tunnel, by).await
    } else {
        http(c, buf, tunnel, by).await
    }
}

async fn socks(
    mut c: TcpStream,
    mut buf: BytesMut,
    tunnel: &Tunnel,
    by: Instant,
) -> io::Result<()> {
    loop {
        match socks5::parse_greeting(&buf) {
            Ok(Some(n)) => {
                buf.advance(n);
                break;
            }
            Ok(None) => read_more(&mut c, &mut buf, by).await?,
            Err(e) => return bad_request(c, tunnel, e.reply()).await,
        }
    }
    c.write_all(&socks5::METHOD_REPLY).await?;
    let target = loop {
        match socks5::parse_request(&buf) {
            Ok(Some((t, n))) => {
                buf.advance(n);
                break t;
            }
            Ok(None) => read_more(&mut c, &mut buf, by).await?,
            Err(e) => return bad_request(c, tunnel, e.reply()).await,
        }
    };
    match open_watching(&c, tunnel, &target, Eof::before_answer(&buf)).await {
        Some(Ok(s)) => {
            c.write_all(&socks5::success()).await?;
            splice(c, s, tunnel, buf).await;
            Ok(())
        }
        Some(Err(e)) => {
            let code = socks5::refusal_code(refusal_of(&e));
            answer_and_close(c, Some(socks5::reply(code))).await
        }
        None => Ok(()),
    }
}

async fn http(mut c: TcpStream, mut buf: BytesMut, tunnel: &Tunnel, by: Instant) -> io::Result<()> {
    let (target, n) = loop {
        match http_connect::parse(&buf) {
            Ok(Some(x)) => break x,
            Ok(None) => read_more(&mut c, &mut buf, by).await?,
            Err(e) => return bad_request(c, tunnel, Some(e.response())).await,
        }
    };
    buf.advance(n);
    match open_watching(&c, tunnel, &target, Eof::before_answer(&buf)).await {
        Some(Ok(s)) => {
            c.write_all(&http_connect::established()).await?;
            splice(c, s, tunnel, buf).await;
            Ok(())
        }
        Some(Err(e)) => answer_and_close(c, Some(http_connect::refused(refusal_of(&e)))).await,
        None => Ok(()),
    }
}

/// What an end of the application's sending (FIN) means while its stream
/// waits to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Eof {
    /// A raw forward: the application may have sent all it has; the FIN
    /// travels once the stream opens.
    HalfClose,
    /// A SOCKS5 or HTTP `CONNECT` client before its answer, with nothing
    /// sent behind its request: it closed (a timeout, Ctrl-C). Clients of
    /// either protocol read the answer before they end their side.
    GaveUp,
}

impl Eof {
    /// For a SOCKS5 or HTTP `CONNECT` client: a client that sent bytes
    /// behind its request (`early`) and then a FIN half-closed; one that
    /// sent nothing more gave up.
    fn before_answer(early: &[u8]) -> Self {
        if early.is_empty() {
            Eof::GaveUp
        } else {
            Eof::HalfClose
        }
    }
}

/// Opens a stream to `target` (which may wait up to [`Tunnel::WAIT`] for a
/// session) while watching the application's connection: if it resets,
/// fails, or (`Eof::GaveUp`) closes, the stream is given up (`None`; a
/// CONNECT already sent is cancelled), so a request its application
/// abandoned (and may be retrying elsewhere) never reaches its destination
/// later. Bytes the application sends meanwhile stay in the kernel (TCP
/// holds it back, as the stream would) and end the watch: what follows
/// them cannot be seen without taking them.
async fn open_watching(
    c: &TcpStream,
    tunnel: &Tunnel,
    target: &Target,
    eof: Eof,
) -> Option<Result<Stream, StreamError>> {
    let open = tunnel.connect(target);
    tokio::pin!(open);
    let mut watching = true;
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            biased;
            r = &mut open => return Some(r),
            r = c.peek(&mut probe), if watching => match r {
                Ok(0) if eof == Eof::GaveUp => return None,
                Ok(_) => watching = false,
                Err(_) => return None,
            },
        }
    }
}

/// What the application is told when a stream could not be opened.
fn refusal_of(e: &StreamError) -> Refusal {
    match e {
        StreamError::Refused(r) => *r,
        // No session to carry it: the network is, for now, unreachable.
        StreamError::NoSession(_) | StreamError::SessionEnded(_) | StreamError::Stopped => {
            Refusal::NetworkUnreachable
        }
    }
}

/// A request the door will not serve: counted, answered, closed.
async fn bad_request(c: TcpStream, tunnel: &Tunnel, reply: Option<Vec<u8>>) -> io::Result<()> {
    tunnel.count_bad_request();
    answer_and_close(c, reply).await
}

async fn answer_and_close(mut c: TcpStream, reply: Option<Vec<u8>>) -> io::Result<()> {
    if let Some(r) = reply {
        c.write_all(&r).await?;
    }
    c.shutdown().await
}

/// Joins the application's connection and its stream until both
/// directions ended (half-closes travel); the first error resets the
/// application's connection (it sees RST) and is counted.
/// The relay also ends (a reset) when the stream's session does, while it
/// waits only on the application.
async fn splice(c: TcpStream, s: Stream, tunnel: &Tunnel, early: BytesMut) {
    let gone = s.session_gone();
    let r = jvpn_runtime::relay::relay(c, s, &early, &|_, _| std::time::Duration::ZERO, gone).await;
    if r.reset {
        tunnel.count_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::DataPlane;
    use crate::streams::tests::gateway_for;

    /// A SOCKS5 greeting (no authentication).
    const GREETING: [u8; 3] = [5, 1, 0];

    /// A SOCKS5 CONNECT to example:80.
    fn socks_connect() -> Vec<u8> {
        let mut r = vec![5, 1, 0, 3, 7];
        r.extend_from_slice(b"example");
        r.extend_from_slice(&80u16.to_be_bytes());
        r
    }

    /// Everything the first stream the gateway got carried, up to its end
    /// (within 10 s).
    async fn first_body(
        requests: &mut tokio::sync::mpsc::UnboundedReceiver<h2::RecvStream>,
    ) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut body = requests.recv().await.unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            got
        })
        .await
        .expect("no stream, or its end never came")
    }

    /// An application that gives up (resets or closes its connection)
    /// while its stream waits for a session is forgotten: its CONNECT never
    /// reaches the gateway once a session comes (it may be retrying
    /// elsewhere: its request would arrive twice). The door serves one
    /// connection at a time here, so the second client is served only once
    /// the first one's task ended; the door used to hold it until the
    /// session came and then send the abandoned CONNECT first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_its_application_abandoned_is_never_sent() {
        for reset in [true, false] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            // No session yet (the agent is handshaking): streams wait.
            let (mut d, tunnel) = DataPlane::new();
            tokio::spawn(serve_proxy_with(l, tunnel, 1));
            let mut a = TcpStream::connect(addr).await.unwrap();
            a.write_all(&GREETING).await.unwrap();
            let mut method = [0u8; 2];
            a.read_exact(&mut method).await.unwrap();
            a.write_all(&socks_connect()).await.unwrap();
            if reset {
                jvpn_runtime::relay::reset(a);
            } else {
                drop(a);
            }
            let mut b = TcpStream::connect(addr).await.unwrap();
            b.write_all(&GREETING).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut method))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "reset {reset}: the second client was not served: the door \
                         still waits to open the stream of the first, which left"
                    )
                })
                .unwrap();
            d.start(1 << 20);
            let mut requests = gateway_for(&d);
            b.write_all(&socks_connect()).await.unwrap();
            let mut ok = vec![0u8; socks5::success().len()];
            b.read_exact(&mut ok).await.unwrap();
            assert_eq!(ok, socks5::success());
            b.write_all(b"B").await.unwrap();
            let mut first = requests.recv().await.unwrap();
            let got = first.data().await.unwrap().unwrap();
            assert_eq!(
                &got[..],
                b"B",
                "reset {reset}: the abandoned CONNECT came first"
            );
            assert!(
                requests.try_recv().is_err(),
                "reset {reset}: a second CONNECT"
            );
        }
    }

    /// A SOCKS client that sent bytes behind its request and then ended
    /// its sending has not given up: it half-closed. Its bytes and its FIN
    /// travel once the stream opens, and it gets its answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socks_client_that_sent_early_bytes_and_half_closed_is_served() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut d, tunnel) = DataPlane::new();
        tokio::spawn(serve_proxy(l, tunnel));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&GREETING).await.unwrap();
        let mut method = [0u8; 2];
        c.read_exact(&mut method).await.unwrap();
        let mut ask = socks_connect();
        ask.extend_from_slice(b"early");
        c.write_all(&ask).await.unwrap();
        c.shutdown().await.unwrap();
        d.start(1 << 20);
        let mut requests = gateway_for(&d);
        let got = first_body(&mut requests).await;
        assert_eq!(got, b"early");
        let mut ok = vec![0u8; socks5::success().len()];
        c.read_exact(&mut ok).await.unwrap();
        assert_eq!(ok, socks5::success());
    }

    /// A raw forward's application that ends its sending (FIN) while its
    /// stream waits for a session has not given up: its bytes, if any, and
    /// its half-close reach the destination once the stream opens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forward_half_closed_while_waiting_travels_once_the_stream_opens() {
        for early in [&b""[..], b"early bytes"] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (mut d, tunnel) = DataPlane::new();
            let target = Target::new("example", 80).unwrap();
            tokio::spawn(serve_forward(l, tunnel, target));
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(early).await.unwrap();
            c.shutdown().await.unwrap();
            d.start(1 << 20);
            let mut requests = gateway_for(&d);
            let got = first_body(&mut requests).await;
            assert_eq!(got, early);
        }
    }

    #[test]
    fn a_door_takes_an_eighth_of_the_open_files_within_its_bounds() {
        assert_eq!(door_limit(1024), 128);
        assert_eq!(door_limit(20_000), 2500);
        assert_eq!(door_limit(1 << 20), MAX_CONNECTIONS);
        assert_eq!(door_limit(64), 16);
    }

    /// A client that connects and never sends its request is closed after
    /// the head timeout (time paused: the timeout passes at once), so idle
    /// connections cannot pile up until the agent runs out of descriptors.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_is_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_plane, tunnel) = DataPlane::new();
        tokio::spawn(serve_proxy(l, tunnel));
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(60), c.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "still open after 60 s: {r:?}"
        );
    }

    /// Past the connection limit, clients wait in the listen queue and are
    /// served as slots free (here when the two idle ones are closed).
    #[tokio::test(start_paused = true)]
    async fn connections_past_the_limit_wait_for_a_slot() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_plane, tunnel) = DataPlane::new();
        tokio::spawn(serve_proxy_with(l, tunnel, 2));
        let _idle = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[5, 1, 0]).await.unwrap();
        let mut reply = [0u8; 2];
        let held = tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut reply)).await;
        assert!(held.is_err(), "served past the limit: {held:?}");
        tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, socks5::METHOD_REPLY);
    }
}
