//! `jvpn-loadtest bench-router`: the router next to the reference in one run.
//!
//! One gateway (pinned to CPU 0) is reached three ways: **direct**, through
//! **jvpn-router**, and through **HAProxy** (Debian package, TCP mode,
//! `send-proxy-v2`, `balance hash req.payload(8,16)` + `hash-type
//! consistent`). HAProxy cannot read routing tokens, so the comparison uses
//! HELLO-type connections and data only. Proxies and the load generator share
//! CPU 1 (this machine has two cores).
//!
//! Measured per path: new sessions per second (TCP + preamble + TLS 1.3 +
//! HELLO), bulk echo throughput, and the round trip of a small echo. Then:
//! bulk throughput of the router with several splice buffer sizes, router
//! memory per idle spliced connection, and how fast a router notices a
//! SIGKILLed and a SIGSTOPped gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use jvpn_agent::Agent;
use jvpn_proto::pb::session::{Data, Terminate, frame::Kind};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::bench::{bench_toml, cpu_seconds, pin_self, raise_nofile, rate, rss_bytes};
use crate::cluster::{LocalRouter, RouterOptions, gateway_cluster_toml, members_where};
use crate::demo::{Percentiles, percentiles};
use crate::harness::{self, GatewayOptions, Launcher, LocalGateway, Role, TestPki};

#[derive(Clone, Debug)]
pub struct RouterBenchOptions {
    pub duration: Duration,
    pub concurrency: usize,
    /// Idle spliced connections for the memory measurement.
    pub idle_connections: usize,
    /// Kill and pause trials for the detection-time distribution.
    pub trials: usize,
    /// Splice variants compared for bulk throughput, as `mode:bytes`
    /// (`copy:65536`, `pipe:65536`); the first one serves the comparisons.
    pub splice_variants: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PathResult {
    pub path: String,
    pub hellos_per_s: f64,
    /// CPU time the proxy spent per HELLO connection (0 for direct).
    pub proxy_cpu_us_per_hello: f64,
    pub bulk_mib_per_s: f64,
    /// CPU time the proxy spent per MiB echoed (both directions spliced).
    pub proxy_cpu_us_per_mib: f64,
    pub echo_rtt_us_p50: u64,
    pub echo_rtt_us_p99: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RouterBenchReport {
    pub paths: Vec<PathResult>,
    pub router_vs_direct_bulk: f64,
    pub router_vs_haproxy_bulk: f64,
    pub router_vs_haproxy_hellos: f64,
    pub router_added_echo_us_p50: i64,
    pub haproxy_added_echo_us_p50: i64,
    /// `(variant, MiB/s, router CPU µs per MiB)` through the router.
    pub splice_variants: Vec<(String, f64, f64)>,
    pub idle_connections: usize,
    pub router_rss_per_idle_connection_bytes: f64,
    /// Kernel socket memory (`/proc/net/sockstat` TCP mem) per spliced
    /// connection, all four sockets on this host included.
    pub kernel_socket_bytes_per_connection: f64,
    pub detection_sigkill_ms: Percentiles,
    pub detection_sigstop_ms: Percentiles,
    pub pinned: bool,
}

/// Frame payload and window of the bulk test.
const BULK_FRAME: usize = 16 * 1024;
const BULK_WINDOW: usize = 8;

fn router_admission() -> &'static str {
    "[admission]\nper_source_rate_per_s = 1000000.0\nper_source_burst = 1000000\n\
     per_source_max_connections = 1000000\nhello_per_gateway_per_s = 10000000.0\n\
     resume_per_gateway_per_s = 10000000.0\n"
}

/// A running HAProxy in front of `backend`.
struct Haproxy {
    child: tokio::process::Child,
    addr: SocketAddr,
}

async fn start_haproxy(dir: &std::path::Path, backend: SocketAddr) -> Result<Haproxy> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cfg = format!(
        "global\n  maxconn 9000\n  nbthread 1\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend fe\n  bind {addr}\n  tcp-request inspect-delay 1s\n  \
         tcp-request content accept if {{ req.len ge 32 }}\n  default_backend gws\n\
         backend gws\n  balance hash req.payload(8,16)\n  hash-type consistent\n  \
         server g1 {backend} send-proxy-v2\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let child = tokio::process::Command::new("taskset")
        .args(["-c", "1", "haproxy", "-db", "-f"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(std::fs::File::create(
            dir.join("haproxy.log"),
        )?))
        .kill_on_drop(true)
        .spawn()
        .context("haproxy (Debian package haproxy) is needed for the comparison")?;
    harness::eventually(Duration::from_secs(10), "haproxy listening", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await?;
    Ok(Haproxy { child, addr })
}

fn terminate() -> Kind {
    Kind::Terminate(Terminate {
        reason: jvpn_proto::ReasonCode::AgentClosed as i32,
    })
}

async fn hellos_per_s(
    pki: &TestPki,
    target: SocketAddr,
    opts: &RouterBenchOptions,
    proxy_pid: Option<nix::unistd::Pid>,
) -> Result<(f64, f64)> {
    let cfg = Arc::new(harness::agent_config(pki, vec![target], None)?);
    let cpu0 = proxy_pid.map(cpu_seconds).transpose()?;
    let (r, _, n) = rate(opts.concurrency, opts.duration, move |i| {
        let mut cfg = (*cfg).clone();
        cfg.bind_ip = Some(harness::source_ip(i));
        async move {
            let mut agent = Agent::new(cfg)?;
            let mut t = agent.hello().await?;
            t.send(terminate()).await?;
            Ok(())
        }
    })
    .await?;
    let cpu_us = match (proxy_pid, cpu0) {
        (Some(pid), Some(c0)) => (cpu_seconds(pid)? - c0) * 1e6 / n.max(1) as f64,
        _ => 0.0,
    };
    Ok((r, cpu_us))
}

async fn echo_rtt(pki: &TestPki, target: SocketAddr, duration: Duration) -> Result<(u64, u64)> {
    let cfg = harness::agent_config(pki, vec![target], Some(harness::source_ip(900)))?;
    let mut agent = Agent::new(cfg)?;
    let t = Arc::new(tokio::sync::Mutex::new(agent.hello().await?));
    let payload = Arc::new(vec![7u8; 64]);
    let (_, hist, _) = rate(1, duration, move |_| {
        let (t, payload) = (t.clone(), payload.clone());
        async move {
            t.lock().await.echo(&payload).await?;
            Ok(())
        }
    })
    .await?;
    Ok((hist.value_at_quantile(0.5), hist.value_at_quantile(0.99)))
}

/// Echo throughput with `streams` sessions, each keeping a window of
/// 16 KiB frames in flight. Counts payload bytes echoed back.
async fn bulk(
    pki: &TestPki,
    target: SocketAddr,
    duration: Duration,
    streams: usize,
) -> Result<f64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    for s in 0..streams {
        let cfg = harness::agent_config(pki, vec![target], Some(harness::source_ip(800 + s)))?;
        let bytes = bytes.clone();
        set.spawn(async move {
            let mut agent = Agent::new(cfg)?;
            let mut t = agent.hello().await?;
            let payload = Bytes::from(vec![0x5au8; BULK_FRAME]);
            let mut seq = 1_000_000u64;
            while Instant::now() < deadline {
                for _ in 0..BULK_WINDOW {
                    seq += 1;
                    t.send(Kind::Data(Data {
                        seq,
                        payload: payload.clone(),
                    }))
                    .await?;
                }
                let mut got = 0;
                while got < BULK_WINDOW {
                    if let Kind::Data(d) = t.recv().await? {
                        bytes.fetch_add(d.payload.len() as u64, Ordering::Relaxed);
                        got += 1;
                    }
                }
            }
            t.send(terminate()).await?;
            Ok::<_, anyhow::Error>(())
        });
    }
    let started = Instant::now();
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64())
}

/// `TCP: … mem N` from /proc/net/sockstat, in bytes.
fn sockstat_tcp_mem() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line")?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            let pages: u64 = it.next().context("mem value")?.parse()?;
            return Ok(pages * 4096);
        }
    }
    bail!("no mem in {line}")
}

async fn detection_trials(
    launcher: &Launcher,
    pki: &TestPki,
    dir: &std::path::Path,
    router: &LocalRouter,
    trials: usize,
    sig: Signal,
) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(trials);
    for i in 0..trials {
        let node = "g2";
        let opts = GatewayOptions {
            node_id: node.into(),
            cluster_toml: gateway_cluster_toml(pki, node, &[router.membership_addr]),
            ..Default::default()
        };
        let sub = dir.join(format!("{sig:?}-{i}"));
        let gw = LocalGateway::start(launcher, pki, &sub, &opts).await?;
        harness::eventually(Duration::from_secs(10), "g2 alive", || async {
            router
                .ring()
                .await
                .is_ok_and(|r| members_where(&r, "alive").contains(node))
        })
        .await?;
        // Let the stream settle into its steady rhythm.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let t0 = Instant::now();
        gw.signal(sig)?;
        loop {
            let ring = router.ring().await?;
            if !members_where(&ring, "alive").contains(node) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{node} never declared dead after {sig:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        out.push(t0.elapsed().as_millis() as u64);
        let _ = gw.signal(Signal::SIGKILL);
    }
    Ok(out)
}

pub async fn run(opts: RouterBenchOptions) -> Result<RouterBenchReport> {
    raise_nofile();
    let mut report = RouterBenchReport {
        pinned: pin_self(1),
        ..Default::default()
    };
    let exe = std::env::current_exe()?;
    let routers: Vec<String> = (0..opts.splice_variants.len().max(1))
        .map(|i| format!("r{}", i + 1))
        .collect();
    let router_refs: Vec<&str> = routers.iter().map(String::as_str).collect();
    let pki = TestPki::with_routers(&["g1", "g2"], &router_refs)?;
    let dir = tempfile::tempdir()?;
    let router_launcher = Launcher::resolve_as(&exe, Role::Router).pinned(1);
    let gw_launcher = Launcher::resolve_as(&exe, Role::Gateway);

    // Routers first (one per splice buffer size), then the pinned gateway.
    let mut rs = Vec::new();
    for (id, variant) in routers.iter().zip(&opts.splice_variants) {
        let (mode, size) = variant
            .split_once(':')
            .with_context(|| format!("splice variant {variant:?} is not mode:bytes"))?;
        let ro = RouterOptions {
            router_id: id.clone(),
            extra_toml: format!(
                "{}[splice]\nmode = \"{mode}\"\nbuffer_bytes = {size}\n",
                router_admission()
            ),
            ..Default::default()
        };
        rs.push(LocalRouter::start(&router_launcher, &pki, dir.path(), &ro).await?);
    }
    let endpoints: Vec<SocketAddr> = rs.iter().map(|r| r.membership_addr).collect();
    let gw = LocalGateway::start(
        &gw_launcher.clone().pinned(0),
        &pki,
        &dir.path().join("g1"),
        &GatewayOptions {
            node_id: "g1".into(),
            extra_toml: bench_toml().into(),
            cluster_toml: format!(
                "{}\ndirect_clients = true",
                gateway_cluster_toml(&pki, "g1", &endpoints)
            ),
            ..Default::default()
        },
    )
    .await?;
    for r in &rs {
        harness::eventually(Duration::from_secs(15), "g1 placeable", || async {
            r.ring()
                .await
                .is_ok_and(|ring| members_where(&ring, "hello_ready").contains("g1"))
        })
        .await?;
    }
    let router = &rs[0];
    let router_pid = router.pid().context("router pid")?;
    let ha = start_haproxy(dir.path(), gw.client_addr).await?;
    let ha_pid = nix::unistd::Pid::from_raw(ha.child.id().context("haproxy pid")? as i32);

    let streams = 4;
    for (name, target, pid) in [
        ("direct", gw.client_addr, None),
        ("jvpn-router", router.client_addr, Some(router_pid)),
        ("haproxy", ha.addr, Some(ha_pid)),
    ] {
        let (hellos, cpu) = hellos_per_s(&pki, target, &opts, pid).await?;
        let (p50, p99) = echo_rtt(&pki, target, opts.duration).await?;
        let cpu0 = pid.map(cpu_seconds).transpose()?;
        let started = Instant::now();
        let mib = bulk(&pki, target, opts.duration, streams).await?;
        let moved = mib * started.elapsed().as_secs_f64();
        let cpu_per_mib = match (pid, cpu0) {
            (Some(p), Some(c0)) => (cpu_seconds(p)? - c0) * 1e6 / moved.max(1e-9),
            _ => 0.0,
        };
        report.paths.push(PathResult {
            path: name.into(),
            hellos_per_s: hellos,
            proxy_cpu_us_per_hello: cpu,
            bulk_mib_per_s: mib,
            proxy_cpu_us_per_mib: cpu_per_mib,
            echo_rtt_us_p50: p50,
            echo_rtt_us_p99: p99,
        });
    }
    let (d, r, h) = (&report.paths[0], &report.paths[1], &report.paths[2]);
    report.router_vs_direct_bulk = r.bulk_mib_per_s / d.bulk_mib_per_s.max(1e-9);
    report.router_vs_haproxy_bulk = r.bulk_mib_per_s / h.bulk_mib_per_s.max(1e-9);
    report.router_vs_haproxy_hellos = r.hellos_per_s / h.hellos_per_s.max(1e-9);
    report.router_added_echo_us_p50 = r.echo_rtt_us_p50 as i64 - d.echo_rtt_us_p50 as i64;
    report.haproxy_added_echo_us_p50 = h.echo_rtt_us_p50 as i64 - d.echo_rtt_us_p50 as i64;
    drop(ha);

    for (r, variant) in rs.iter().zip(&opts.splice_variants) {
        let pid = r.pid().context("router pid")?;
        let cpu0 = cpu_seconds(pid)?;
        let started = Instant::now();
        let mib = bulk(&pki, r.client_addr, opts.duration, streams).await?;
        let moved = mib * started.elapsed().as_secs_f64();
        let cpu = (cpu_seconds(pid)? - cpu0) * 1e6 / moved.max(1e-9);
        report.splice_variants.push((variant.clone(), mib, cpu));
    }

    // Memory per idle spliced connection.
    let base_rss = rss_bytes(router_pid)?;
    let base_sock = sockstat_tcp_mem()?;
    let cfg = harness::agent_config(&pki, vec![router.client_addr], None)?;
    let mut set = tokio::task::JoinSet::new();
    let per_task = opts.idle_connections.div_ceil(opts.concurrency);
    for c in 0..opts.concurrency {
        let cfg = cfg.clone();
        set.spawn(async move {
            let mut held = Vec::with_capacity(per_task);
            for k in 0..per_task {
                let mut cfg = cfg.clone();
                cfg.bind_ip = Some(harness::source_ip(1000 + c * per_task + k));
                let mut a = Agent::new(cfg)?;
                held.push(a.hello().await?);
            }
            Ok::<_, anyhow::Error>(held)
        });
    }
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        held.extend(r??);
    }
    let n = held.len();
    harness::eventually(
        Duration::from_secs(30),
        "router sees every connection",
        || async {
            router
                .metric("jvpn_router_connections_open", &[])
                .await
                .is_ok_and(|v| v as usize >= n)
        },
    )
    .await?;
    report.idle_connections = n;
    report.router_rss_per_idle_connection_bytes =
        rss_bytes(router_pid)?.saturating_sub(base_rss) as f64 / n as f64;
    report.kernel_socket_bytes_per_connection =
        sockstat_tcp_mem()?.saturating_sub(base_sock) as f64 / n as f64;
    drop(held);

    // Detection: SIGKILL (stream closes) and SIGSTOP (silence).
    let det = dir.path().join("detect");
    let kill = detection_trials(
        &gw_launcher,
        &pki,
        &det,
        router,
        opts.trials,
        Signal::SIGKILL,
    )
    .await?;
    let stop = detection_trials(
        &gw_launcher,
        &pki,
        &det,
        router,
        opts.trials,
        Signal::SIGSTOP,
    )
    .await?;
    report.detection_sigkill_ms = percentiles(kill);
    report.detection_sigstop_ms = percentiles(stop);
    drop(gw);
    Ok(report)
}
