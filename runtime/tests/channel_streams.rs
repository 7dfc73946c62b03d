//! HTTP/2 CONNECT streams over the resumable channel, with the transport
//! under it killed again and again mid-transfer: every stream's bytes
//! arrive exactly (hash compared both ways), and no stream notices a jump.
//! The transports here are in-memory pipes carrying the real frame codec;
//! the offsets a RESUME / ResumeOk would carry are exchanged directly.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::Empty;
use hyper::server::conn::http2 as server_h2;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jvpn_proto::channel::ChannelConfig;
use jvpn_proto::frame;
use jvpn_proto::pb::session::frame::Kind;
use jvpn_runtime::channel_io::{ChannelStream, Generation, SessionChannel};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// One transport's life on one side: send what the channel has, feed it
/// what arrives, until the transport breaks or `budget` frames arrived.
/// Returns its end of the transport, still open, so that the other side's
/// pump can go on reading what was in flight (a late, stale transport).
async fn pump(
    ch: SessionChannel,
    generation: Generation,
    io: DuplexStream,
    budget: u64,
    frames_in: Arc<AtomicU64>,
) -> DuplexStream {
    let (mut rd, mut wr) = tokio::io::split(io);
    let reader = {
        let ch = ch.clone();
        let rd = &mut rd;
        async move {
            let mut buf = BytesMut::new();
            let mut seen = 0;
            loop {
                while let Some(f) = frame::decode(&mut buf).unwrap() {
                    match f {
                        Kind::Data(d) => ch.on_data(generation, d).unwrap(),
                        Kind::Ack(a) => ch.on_ack(generation, a).unwrap(),
                        other => panic!("unexpected {other:?}"),
                    }
                    frames_in.fetch_add(1, Ordering::Relaxed);
                    seen += 1;
                    if seen >= budget {
                        return;
                    }
                }
                if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        }
    };
    let wr_ref = &mut wr;
    let writer = async move {
        let wr = wr_ref;
        let mut wake = ch.wakeups();
        loop {
            let mut out = BytesMut::new();
            while let Some(k) = ch.next_frame(generation, false) {
                frame::encode(k, &mut out).unwrap();
                if out.len() > 64 * 1024 {
                    break;
                }
            }
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                continue;
            }
            let ack_at = ch.ack_at();
            tokio::select! {
                () = wake.changed() => {}
                () = async {
                    match ack_at {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    };
    // Whichever ends first ends this transport's pump.
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
    rd.unsplit(wr)
}

/// Connects the two channels over transport after transport; each lives
/// until one side has read a random number of frames. Then the next
/// transport resumes at once, while the other side's old pump may still be
/// running (as a real transport task notices its death late): its calls
/// carry the old generation and change nothing.
async fn jumping_link(a: SessionChannel, b: SessionChannel, seed: u64, jumps: Arc<AtomicU64>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let frames = Arc::new(AtomicU64::new(0));
    let mut gens = (a.first(), b.first());
    // Ends of old transports kept open a while, so their other pumps still
    // deliver frames that were in flight after the next transport resumed.
    let mut lingering = std::collections::VecDeque::new();
    loop {
        let (x, y) = tokio::io::duplex(rng.random_range(1_000..200_000));
        let (ba, bb) = (rng.random_range(1..60), rng.random_range(1..60));
        let mut pa = tokio::spawn(pump(a.clone(), gens.0, x, ba, frames.clone()));
        let mut pb = tokio::spawn(pump(b.clone(), gens.1, y, bb, frames.clone()));
        // The first pump to finish ends the transport for this side; the
        // other one runs on, detached, with the old generation.
        let end = tokio::select! {
            e = &mut pa => e,
            e = &mut pb => e,
        };
        lingering.push_back(end.unwrap());
        if lingering.len() > 3 {
            lingering.pop_front();
        }
        // The RESUME exchange: each side tells what it received.
        let (ra, rb) = (a.received(), b.received());
        gens = (
            a.resume_from(rb).unwrap().generation,
            b.resume_from(ra).unwrap().generation,
        );
        jumps.fetch_add(1, Ordering::Relaxed);
    }
}

/// The gateway's part: every CONNECT is answered 200 and echoes its bytes.
async fn serve(io: ChannelStream) {
    let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
        assert_eq!(req.method(), Method::CONNECT);
        tokio::spawn(async move {
            let up = hyper::upgrade::on(req).await.unwrap();
            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        Ok::<_, hyper::Error>(Response::new(Empty::<Bytes>::new()))
    });
    server_h2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
        .unwrap();
}

fn pattern(stream: u64, len: usize) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_streams_survive_transport_jumps_byte_exactly() {
    let cfg = ChannelConfig::with_window(256 * 1024);
    let (agent, agent_io) = SessionChannel::new(cfg);
    let (gateway, gateway_io) = SessionChannel::new(cfg);
    let jumps = Arc::new(AtomicU64::new(0));
    let link = tokio::spawn(jumping_link(
        agent.clone(),
        gateway.clone(),
        7,
        jumps.clone(),
    ));
    let server = tokio::spawn(serve(gateway_io));

    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(agent_io))
            .await
            .unwrap();
    tokio::spawn(conn);

    const STREAMS: u64 = 8;
    const LEN: usize = 2 << 20;
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("dest-{s}.example:443"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let up = hyper::upgrade::on(res).await.unwrap();
            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
            let data = pattern(s, LEN);
            let expect = blake3::hash(&data);
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::with_capacity(LEN);
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), LEN, "stream {s}: bytes lost or duplicated");
            assert_eq!(blake3::hash(&back), expect, "stream {s}: bytes differ");
        }));
    }
    // A lost byte would stall a stream for ever: fail instead of hanging.
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(60), t)
            .await
            .expect("a stream stalled: bytes lost across a jump")
            .unwrap();
    }
    let jumped = jumps.load(Ordering::Relaxed);
    assert!(jumped >= 10, "only {jumped} transport jumps");
    link.abort();
    server.abort();
}

#[tokio::test]
async fn a_closed_session_resets_its_streams() {
    let (ch, mut io) = SessionChannel::new(ChannelConfig::default());
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 8];
        io.read(&mut b).await
    });
    tokio::task::yield_now().await;
    ch.close("owner_lost");
    let e = reader.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(e.to_string().contains("owner_lost"));
}

/// A stream through HTTP/2 over a channel that closes (owner lost) ends in
/// an error the application sees, never in a clean end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_stream_over_a_closed_session_ends_in_an_error() {
    let cfg = ChannelConfig::default();
    let (agent, agent_io) = SessionChannel::new(cfg);
    let (gateway, gateway_io) = SessionChannel::new(cfg);
    let link = tokio::spawn(jumping_link(
        agent.clone(),
        gateway.clone(),
        3,
        Arc::default(),
    ));
    let server = tokio::spawn(serve(gateway_io));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(agent_io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("dest.example:443")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    let up = hyper::upgrade::on(res).await.unwrap();
    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
    w.write_all(b"half a transfer").await.unwrap();
    let mut got = [0u8; 15];
    r.read_exact(&mut got).await.unwrap();
    agent.close("owner_lost");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(30), r.read_to_end(&mut rest))
        .await
        .expect("the stream noticed the closed session");
    assert!(end.is_err(), "a clean EOF after {} more bytes", rest.len());
    link.abort();
    server.abort();
}

/// The channel wakes its transport writer only when the writer had run dry
/// or an ack falls due (not on every write and read). Bytes written while
/// the writer still has unsent ones need no wake-up: the writer takes them
/// in the same drain. Every write after a drain, and the first read (which
/// starts the ack timer), must still wake it.
#[tokio::test]
async fn the_writer_is_woken_when_it_must_be_and_loses_nothing() {
    use std::time::Duration;
    let mut cfg = ChannelConfig::with_window(1 << 20);
    cfg.max_payload = 4;
    let (ch, mut io) = SessionChannel::new(cfg);
    let g = ch.first();
    let mut wake = ch.wakeups();
    io.write_all(b"abcdefgh").await.unwrap();
    assert!(woken(&mut wake).await, "the first bytes wake the writer");
    // The writer takes one frame, then more bytes arrive mid-drain.
    let mut sent = Vec::new();
    let Some(Kind::Data(d)) = ch.next_frame(g, false) else {
        panic!("a Data frame")
    };
    sent.extend_from_slice(&d.payload);
    io.write_all(b"ijkl").await.unwrap();
    // Its drain goes on until nothing is left, and takes them too.
    while let Some(k) = ch.next_frame(g, false) {
        if let Kind::Data(d) = k {
            sent.extend_from_slice(&d.payload);
        }
    }
    assert_eq!(sent, b"abcdefghijkl");
    // Dry now: the next write must wake it again.
    let _ = woken(&mut wake).await;
    io.write_all(b"m").await.unwrap();
    assert!(woken(&mut wake).await, "a write after a drain wakes");

    // The read side: the first byte consumed starts the ack timer, which
    // the writer must learn about.
    let _ = woken(&mut wake).await;
    ch.on_data(
        g,
        jvpn_proto::pb::session::Data {
            seq: 0,
            payload: Bytes::from_static(b"xy"),
        },
    )
    .unwrap();
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.unwrap();
    assert!(woken(&mut wake).await, "the first read arms the ack timer");
    assert!(ch.ack_at().is_some());
    // An ack due by time goes out when the writer's timer fires.
    // (1 ms past it: the channel's clock counts whole milliseconds.)
    tokio::time::sleep_until((ch.ack_at().unwrap() + Duration::from_millis(1)).into()).await;
    assert!(matches!(ch.next_frame(g, false), Some(Kind::Ack(a)) if a.seq == 1));

    /// Whether a wake-up is pending (a pending one resolves at once).
    async fn woken(w: &mut jvpn_runtime::channel_io::Wakeups) -> bool {
        tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .is_ok()
    }
}
