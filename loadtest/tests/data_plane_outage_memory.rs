//! What a session holds while its transport is gone (issue 15: "at the
//! window it stops reading from its sources"): 16 streams download as fast
//! as they can, then the path to the agent stalls. The gateway must stop
//! reading from the destinations once the channel's window and HTTP/2's
//! small per-stream queues in front of it are full, instead of reading on
//! into HTTP/2's default 400 KiB per stream (up to the connection window,
//! four channel windows). Measured exactly, in bytes: what the gateway read
//! from the destinations minus what the applications got. Then the
//! transport is cut, the agent resumes, and every stream goes on
//! byte-exactly.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::harness::eventually;
use jvpn_proto::stream::Target;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WINDOW: u64 = 1 << 20;
const STREAMS: usize = 16;
const CHUNK: usize = 16 * 1024;

/// The bytes every destination connection sends, without end.
fn source() -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(15)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transport_holds_the_window_not_every_streams_queue_too() {
    let env = common::start(&format!(
        "{}[egress]\nwindow_bytes = {WINDOW}\n",
        jvpn_loadtest::streamload::LOOPBACK_EGRESS
    ))
    .await;
    // The destination: each connection sends the source's bytes forever.
    let sent = Arc::new(AtomicU64::new(0));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = Target::new("127.0.0.1", l.local_addr().unwrap().port()).unwrap();
    {
        let sent = sent.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut rng = source();
                    let mut b = vec![0u8; CHUNK];
                    loop {
                        rng.fill(&mut b[..]);
                        if c.write_all(&b).await.is_err() {
                            return;
                        }
                        sent.fetch_add(CHUNK as u64, Ordering::Relaxed);
                    }
                });
            }
        });
    }
    let proxy = FaultProxy::start(env.gw.client_addr).await.unwrap();
    let a = common::streaming_agent(&env.pki, vec![proxy.addr]);
    // Readers that check every byte and count what they got.
    let got: Vec<Arc<AtomicU64>> = (0..STREAMS).map(|_| Arc::default()).collect();
    let mut readers = Vec::new();
    for g in &got {
        let mut s = a.tunnel.connect(&dest).await.unwrap();
        let g = g.clone();
        readers.push(tokio::spawn(async move {
            // The source's bytes, made a chunk at a time as the sender
            // makes them (the generator is consumed in whole words).
            let mut want = source();
            let (mut b, mut w) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
            let mut at = CHUNK;
            loop {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "a stream ended");
                for &x in &b[..n] {
                    if at == CHUNK {
                        want.fill(&mut w[..]);
                        at = 0;
                    }
                    assert_eq!(x, w[at], "bytes differ");
                    at += 1;
                }
                g.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    let all_past = |bytes: u64| {
        let got = got.clone();
        move || {
            let ok = got.iter().all(|g| g.load(Ordering::Relaxed) >= bytes);
            async move { ok }
        }
    };
    eventually(
        Duration::from_secs(60),
        "every stream to flow",
        all_past(1 << 20),
    )
    .await
    .unwrap();
    // The path stalls: nothing reaches the agent, nothing comes back.
    assert!(proxy.stall_all() >= 1);
    // Until the gateway stops reading from the destinations and the
    // applications have read everything that reached the agent.
    let total = || got.iter().map(|g| g.load(Ordering::Relaxed)).sum::<u64>();
    let mut last = (sent.load(Ordering::Relaxed), total());
    let mut still = 0;
    eventually(
        Duration::from_secs(30),
        "the destinations to be held back",
        || {
            let now = (sent.load(Ordering::Relaxed), total());
            still = if now == last { still + 1 } else { 0 };
            last = now;
            async move { still >= 5 }
        },
    )
    .await
    .unwrap();
    let read = env
        .gw
        .metric(
            "jvpn_gateway_stream_bytes_total",
            &[("direction", "from_destination")],
        )
        .await
        .unwrap() as u64;
    let held = read - total();
    let buffered = env
        .gw
        .metric("jvpn_gateway_channel_buffered_bytes", &[])
        .await
        .unwrap() as u64;
    eprintln!(
        "stalled: the gateway read {} KiB more than the applications got; \
         its channel holds {} KiB",
        held / 1024,
        buffered / 1024
    );
    // What the gateway may hold ahead of the applications: the channel's
    // window (in flight included), and in front of it, per stream, HTTP/2's
    // send queue (a write takes send capacity before it copies) plus the
    // relay's one chunk read and not yet written, and one 16 KiB frame
    // being written.
    let per_stream = (jvpn_runtime::channel_io::H2_SEND_BUF + jvpn_runtime::relay::CHUNK) as u64;
    let bound = WINDOW + STREAMS as u64 * per_stream + 16 * 1024;
    assert!(
        held <= bound,
        "the gateway read {} KiB ahead while the transport stalled (bound {} KiB)",
        held / 1024,
        bound / 1024
    );
    // The transport is cut; the agent resumes and every stream goes on.
    proxy.cut_all();
    let now: u64 = got.iter().map(|g| g.load(Ordering::Relaxed)).max().unwrap();
    eventually(
        Duration::from_secs(60),
        "every stream to go on after the resume",
        all_past(now + (1 << 20)),
    )
    .await
    .unwrap();
    for r in &readers {
        assert!(!r.is_finished(), "a reader failed");
    }
    let r = a.report.lock().unwrap().clone();
    assert!(r.resumes_ok >= 1, "{r:?}");
    assert_eq!(r.rehandshakes, 0, "{r:?}");
    for r in readers {
        r.abort();
    }
    drop(a.cmds);
    a.task.await.unwrap();
}
