//! The data plane in the sticky cluster (issue 15), real router and
//! gateway processes: streams keep going byte-exactly across a router
//! restart and a scale-out; when the owner dies, every stream of its
//! session ends with a reset the application sees, and new streams work
//! after the explicit re-handshake.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jvpn_agent::streams::Tunnel;
use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster};
use jvpn_loadtest::streamload::pattern;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOOPBACK_ALLOWED: &str = jvpn_loadtest::streamload::LOOPBACK_EGRESS;

async fn echo_server() -> SocketAddr {
    jvpn_loadtest::streamload::echo_destination().await.unwrap()
}

use common::{Streaming as Running, target};

fn run_agent(c: &LocalCluster) -> Running {
    common::streaming_agent(&c.pki, c.router_addrs())
}

/// Streams `len` bytes through the echo server in 64 KiB steps, pausing
/// at `gate` until the caller has done its fault, then the rest; returns
/// what came back.
async fn echo_in_two_halves(
    tunnel: Tunnel,
    echo: SocketAddr,
    seed: u64,
    len: usize,
    halfway: tokio::sync::oneshot::Sender<()>,
    go_on: tokio::sync::watch::Receiver<bool>,
) -> Vec<u8> {
    let s = tunnel.connect(&target(echo)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let data = pattern(seed, len);
    let writer = tokio::spawn(async move {
        let (a, b) = data.split_at(len / 2);
        w.write_all(a).await.unwrap();
        let _ = halfway.send(());
        let mut go_on = go_on;
        go_on.wait_for(|g| *g).await.unwrap();
        w.write_all(b).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

/// Transfers half way through, waiting for the caller's fault.
struct Transfers {
    a: Running,
    go: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u8>>>,
}

const LEN: usize = 4 << 20;

/// Starts `streams` transfers and returns once every one is half way.
async fn half_way(c: &LocalCluster, streams: u64) -> Transfers {
    let echo = echo_server().await;
    let a = run_agent(c);
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let mut halves = Vec::new();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (tx, rx) = tokio::sync::oneshot::channel();
        halves.push(rx);
        tasks.push(tokio::spawn(echo_in_two_halves(
            a.tunnel.clone(),
            echo,
            s,
            LEN,
            tx,
            go_rx.clone(),
        )));
    }
    for h in halves {
        h.await.unwrap();
    }
    Transfers { a, go, tasks }
}

impl Transfers {
    /// Lets the second halves go and checks every byte came back, with no
    /// reset and no re-handshake.
    async fn finish(self) {
        let Transfers { a, go, tasks } = self;
        go.send(true).unwrap();
        for (s, t) in tasks.into_iter().enumerate() {
            let back = t.await.unwrap();
            assert_eq!(back.len(), LEN, "stream {s}: bytes lost or duplicated");
            assert!(back == pattern(s as u64, LEN), "stream {s}: bytes differ");
        }
        let r = a.report.lock().unwrap().clone();
        assert_eq!(r.rehandshakes, 0, "{r:?}");
        drop(a.cmds);
        a.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_router_restart_byte_exactly() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 2,
        gateway_extra_toml: LOOPBACK_ALLOWED.into(),
        ..ClusterOptions::default()
    })
    .await;
    let t = half_way(&c, 4).await;
    c.restart_router(0).await.unwrap();
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_scale_out_byte_exactly() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 2,
        spare_gateways: 1,
        gateway_extra_toml: LOOPBACK_ALLOWED.into(),
        ..ClusterOptions::default()
    })
    .await;
    let t = half_way(&c, 4).await;
    c.start_gateway("g3").await.unwrap();
    let all: Vec<String> = ["g1", "g2", "g3"].map(String::from).to_vec();
    c.wait_placeable(&all, Duration::from_secs(15))
        .await
        .unwrap();
    t.finish().await;
}

/// Owner SIGKILL during 20 transfers: each one ends with an error the
/// application sees (never a clean end), within the router's failure
/// timeout + 1 s; after the agent's explicit re-handshake new streams work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_death_resets_every_stream_and_new_ones_work() {
    let c = common::cluster(ClusterOptions {
        gateways: 2,
        gateway_extra_toml: LOOPBACK_ALLOWED.into(),
        ..ClusterOptions::default()
    })
    .await;
    let echo = echo_server().await;
    let a = run_agent(&c);
    let mut streams = Vec::new();
    for s in 0..20u64 {
        let mut st = a.tunnel.connect(&target(echo)).await.unwrap();
        // Bytes flow before the kill.
        st.write_all(&pattern(s, 1000)).await.unwrap();
        let mut back = vec![0u8; 1000];
        st.read_exact(&mut back).await.unwrap();
        streams.push(st);
    }
    let owner = a.report.lock().unwrap().node_id.clone();
    let killed_at = Instant::now();
    c.gateway(&owner).unwrap().signal(Signal::SIGKILL).unwrap();
    let mut ends = Vec::new();
    for (s, mut st) in streams.into_iter().enumerate() {
        ends.push(tokio::spawn(async move {
            // Keep writing and reading until the stream ends.
            let mut buf = vec![0u8; 4096];
            loop {
                if let Err(e) = st.write_all(b"still there?").await {
                    return (s, e.kind(), Instant::now());
                }
                match tokio::time::timeout(Duration::from_secs(30), st.read(&mut buf)).await {
                    Ok(Ok(0)) => panic!("stream {s}: a clean end after the owner died"),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return (s, e.kind(), Instant::now()),
                    Err(_) => panic!("stream {s}: hung 30 s after the owner died"),
                }
            }
        }));
    }
    // The router's failure timeout (1 s by default) plus one second.
    let bound = Duration::from_secs(2);
    for e in ends {
        let (s, kind, at) = e.await.unwrap();
        let after = at.duration_since(killed_at);
        assert!(after <= bound, "stream {s} ended {after:?} after the kill");
        // A reset, as the application sees it (never a clean end).
        assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "stream {s}");
        eprintln!("stream {s} ended with {kind:?} after {after:?}");
    }
    // New streams go over the new session.
    let st = a.tunnel.connect(&target(echo)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(st);
    w.write_all(b"after the re-handshake").await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"after the re-handshake");
    let rep = a.report.lock().unwrap().clone();
    assert_eq!(rep.rehandshakes, 1, "{rep:?}");
    assert_ne!(rep.node_id, owner);
    // The agent counted the 20 resets, with the session's reason.
    assert_eq!(rep.streams_reset.values().sum::<u64>(), 20, "{rep:?}");
    assert_eq!(
        rep.streams_reset.keys().collect::<Vec<_>>(),
        rep.rehandshake_reasons.keys().collect::<Vec<_>>(),
        "{rep:?}"
    );
    assert_eq!(
        a.tunnel
            .counters()
            .reset
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the tunnel's own counter is for front doors"
    );
    drop(a.cmds);
    a.task.await.unwrap();
}

/// A draining gateway's streams go on until the drain deadline (90 % of
/// `drain_timeout_ms`), not before, then end explicitly; the agent's new
/// streams go over its new session elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateways_streams_last_until_the_deadline() {
    const DRAIN_MS: u64 = 6_000;
    let c = common::cluster(ClusterOptions {
        gateways: 2,
        gateway_extra_toml: format!(
            "{LOOPBACK_ALLOWED}[timeouts]\ndrain_timeout_ms = {DRAIN_MS}\n"
        ),
        ..ClusterOptions::default()
    })
    .await;
    let echo = echo_server().await;
    let a = run_agent(&c);
    let mut st = a.tunnel.connect(&target(echo)).await.unwrap();
    let owner = a.report.lock().unwrap().node_id.clone();
    let sigterm_at = Instant::now();
    c.gateway(&owner).unwrap().signal(Signal::SIGTERM).unwrap();
    // Round trips on the stream until it ends.
    let mut last_ok = sigterm_at;
    let mut buf = [0u8; 8];
    let ended = loop {
        let r = async {
            st.write_all(b"12345678").await?;
            st.read_exact(&mut buf).await.map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(Ok(())) => last_ok = Instant::now(),
            Ok(Err(e)) => break e,
            Err(_) => panic!("the stream hung after {:?}", last_ok - sigterm_at),
        }
        // A round trip every 50 ms is plenty to see when it ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lived = last_ok.duration_since(sigterm_at);
    eprintln!("stream worked for {lived:?} after SIGTERM, then: {ended}");
    assert!(
        lived >= Duration::from_millis(DRAIN_MS * 8 / 10),
        "the stream ended {lived:?} after SIGTERM, before the drain deadline"
    );
    assert!(
        lived <= Duration::from_millis(DRAIN_MS + 2_000),
        "{lived:?}"
    );
    assert_eq!(ended.kind(), std::io::ErrorKind::ConnectionReset, "{ended}");
    // New streams work, over the session the agent moved to.
    let mut st = a.tunnel.connect(&target(echo)).await.unwrap();
    st.write_all(b"12345678").await.unwrap();
    st.read_exact(&mut buf).await.unwrap();
    let r = a.report.lock().unwrap().clone();
    assert_ne!(r.node_id, owner, "{r:?}");
    drop(a.cmds);
    a.task.await.unwrap();
}
