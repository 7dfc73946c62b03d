//! `jvpn-loadtest bench-members`: what membership costs a router at N
//! members (issue 14). For each N: real routers, N emulated members
//! ([`crate::members`]) joining until every router places all of them,
//! beside one real gateway, then a steady window measured (router and
//! gateway CPU and router RSS from `/proc`, reply bytes per second and per
//! reply as the members received them, the routers' tick time), then
//! members' streams dropped and members paused, each timed until every
//! router declares it not alive, then (optionally) a churn phase: a join
//! or a leave every second, convergence timed, false deaths counted, CPU
//! and ring build times measured.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::{cpu_seconds, raise_nofile, rss_bytes};
use crate::cluster::{ClusterOptions, LocalCluster, LocalRouter, launchers, node_name};
use crate::harness::{self, LocalGateway, metric_value};
use crate::members::{ChurnResult, Emulator, EmulatorOptions, churn, member_name};

#[derive(Clone, Debug)]
pub struct MembersBenchOptions {
    pub members: Vec<usize>,
    pub routers: usize,
    pub interval: Duration,
    /// The steady window measured at each N.
    pub duration: Duration,
    /// Members that never name their view (gateways one version older).
    pub old_format: bool,
    /// Members killed (and as many paused) one after another for the
    /// detection times.
    pub detect_trials: usize,
    /// Changes of the churn phase (one join or leave a second); 0: none.
    pub churn: u64,
    /// Routers on CPU 0, the emulator and the real gateway on CPU 1.
    pub pin: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MembersResult {
    pub members: usize,
    pub routers: usize,
    /// Time until every router placed every member.
    pub join_s: f64,
    /// Router CPU in the steady window, per router, in % of one core.
    pub router_cpu_pct: f64,
    /// The real gateway's CPU in the steady window (it has no sessions:
    /// this is its membership), in % of one core.
    pub gateway_cpu_pct: f64,
    /// Router resident memory after the window, per router.
    pub router_rss_mib: f64,
    /// Heartbeat replies per second, all routers together.
    pub replies_per_s: f64,
    pub reply_bytes_per_s: f64,
    pub bytes_per_reply: f64,
    /// Share of the replies without members.
    pub omitted_fraction: f64,
    /// Mean time of one router membership tick in the steady window.
    pub tick_ms: f64,
    /// Mean time of one ring build at this N (the router's, and the real
    /// gateway's), over the builds of the churn phase (or of the joins
    /// without one).
    pub router_ring_build_ms: f64,
    pub gateway_ring_build_ms: f64,
    /// A member's streams dropped → not alive on every router, per trial.
    pub kill_detect_ms: Vec<u64>,
    /// A member paused (streams open, silent) → not alive on every router.
    pub silence_detect_ms: Vec<u64>,
    /// The churn phase, if any.
    pub churn: Option<ChurnFigures>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnFigures {
    #[serde(flatten)]
    pub run: ChurnResult,
    pub router_cpu_pct: f64,
    pub gateway_cpu_pct: f64,
    /// Membership reply bytes per second per member (what one gateway
    /// receives from all routers) during the churn.
    pub reply_bytes_per_s_per_member: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MembersBenchReport {
    pub interval_ms: u64,
    /// Routers ran on CPU 0, everything else on CPU 1.
    pub pinned: bool,
    pub old_format: bool,
    pub runs: Vec<MembersResult>,
}

fn quantile(v: &[u64], q: f64) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0)
}

pub async fn run(opts: MembersBenchOptions) -> Result<MembersBenchReport> {
    raise_nofile();
    let mut report = MembersBenchReport {
        interval_ms: opts.interval.as_millis() as u64,
        old_format: opts.old_format,
        pinned: opts.pin && crate::bench::pin_self(1),
        ..Default::default()
    };
    for &n in &opts.members {
        let r = one(&opts, n)
            .await
            .with_context(|| format!("{n} members"))?;
        eprintln!(
            "bench-members: {n:>5} members, {} routers: join {:.1} s, router CPU {:.1} %, \
             gateway CPU {:.2} %, RSS {:.1} MiB, {:.0} replies/s, {:.0} B/s ({:.0} B per reply, \
             {:.0} % without members), tick {:.3} ms, ring build {:.1} ms (gateway {:.1} ms), \
             SIGKILL → dead p50 {} / max {} ms, silence → dead p50 {} / max {} ms",
            r.routers,
            r.join_s,
            r.router_cpu_pct,
            r.gateway_cpu_pct,
            r.router_rss_mib,
            r.replies_per_s,
            r.reply_bytes_per_s,
            r.bytes_per_reply,
            r.omitted_fraction * 100.0,
            r.tick_ms,
            r.router_ring_build_ms,
            r.gateway_ring_build_ms,
            quantile(&r.kill_detect_ms, 0.5),
            quantile(&r.kill_detect_ms, 1.0),
            quantile(&r.silence_detect_ms, 0.5),
            quantile(&r.silence_detect_ms, 1.0),
        );
        if let Some(c) = &r.churn {
            eprintln!(
                "bench-members: {n:>5} members, churn of {} joins and {} leaves: converged \
                 p50 {} / p99 {} / max {} ms ({} later than 1 s), {} false deaths, router CPU \
                 {:.1} %, gateway CPU {:.2} %, {:.0} B/s per member",
                c.run.joins,
                c.run.leaves,
                c.run.converge_quantile_ms(0.5),
                c.run.converge_quantile_ms(0.99),
                c.run.converge_quantile_ms(1.0),
                c.run.late,
                c.run.false_deaths,
                c.router_cpu_pct,
                c.gateway_cpu_pct,
                c.reply_bytes_per_s_per_member
            );
        }
        report.runs.push(r);
    }
    Ok(report)
}

/// Sum and count of a histogram (a summary in the exporter's text) over
/// processes' metrics.
fn hist(texts: &[String], name: &str) -> (f64, f64) {
    texts.iter().fold((0.0, 0.0), |(s, c), t| {
        (
            s + metric_value(t, &format!("{name}_sum"), &[]),
            c + metric_value(t, &format!("{name}_count"), &[]),
        )
    })
}

/// Mean of a histogram between two scrapes, in ms (0 without samples).
fn mean_ms(before: (f64, f64), after: (f64, f64)) -> f64 {
    let n = after.1 - before.1;
    if n > 0.0 {
        (after.0 - before.0) / n * 1e3
    } else {
        0.0
    }
}

const TICK: &str = "jvpn_router_tick_duration_seconds";
const ROUTER_BUILD: &str = "jvpn_router_ring_build_duration_seconds";
const GATEWAY_BUILD: &str = "jvpn_gateway_ring_build_duration_seconds";

async fn one(opts: &MembersBenchOptions, n: usize) -> Result<MembersResult> {
    let exe = std::env::current_exe()?;
    let (gl, rl) = launchers(&exe);
    let (gl, rl) = if opts.pin {
        (gl.pinned(1), rl.pinned(0))
    } else {
        (gl, rl)
    };
    // Every member has a source address of its own, like separate hosts:
    // the router's table of membership sources must hold them all.
    let sources = (n + n / 4).max(256);
    // One real gateway beside the emulated members, for its own figures.
    let c = LocalCluster::start(
        gl,
        rl,
        ClusterOptions {
            gateways: 1,
            routers: opts.routers,
            spare_gateways: 0,
            router_env: vec![(
                "JVPN_ROUTER__MEMBERSHIP__MAX_SOURCES".into(),
                sources.to_string(),
            )],
            ..Default::default()
        },
    )
    .await?;
    let routers = &c.routers;
    let gw = c.gateway(&node_name(0))?;
    let gw_pid = gw.pid().context("the gateway has no pid")?;
    let scrape_routers = || async {
        let mut v = Vec::new();
        for r in routers {
            v.push(r.metrics().await.unwrap_or_default());
        }
        v
    };
    let t0 = Instant::now();
    let eo = EmulatorOptions {
        routers: routers.iter().map(|r| r.membership_addr).collect(),
        interval: opts.interval,
        old_format: opts.old_format,
    };
    let mut e = Emulator::start(&c.pki.layout.dir, n, eo).await?;
    let all: Vec<String> = (0..n).map(member_name).collect();
    for r in routers {
        harness::eventually(
            Duration::from_secs(300),
            "every member placeable",
            || async {
                let p = r.placeable().await.unwrap_or_default();
                all.iter().all(|m| p.contains(m))
            },
        )
        .await?;
    }
    let join_s = t0.elapsed().as_secs_f64();
    // Let the last view changes travel before the window.
    tokio::time::sleep(opts.interval * 8).await;
    let pids: Vec<_> = routers.iter().filter_map(LocalRouter::pid).collect();
    let cpu = |pids: &[nix::unistd::Pid]| -> f64 {
        pids.iter().filter_map(|p| cpu_seconds(*p).ok()).sum()
    };
    let (c0, g0, s0, w0) = (
        cpu(&pids),
        cpu(&[gw_pid]),
        e.stats.snapshot(),
        Instant::now(),
    );
    let tick0 = hist(&scrape_routers().await, TICK);
    tokio::time::sleep(opts.duration).await;
    let secs = w0.elapsed().as_secs_f64();
    let (c1, g1, s1) = (cpu(&pids), cpu(&[gw_pid]), e.stats.snapshot());
    let texts = scrape_routers().await;
    let tick1 = hist(&texts, TICK);
    let rss: u64 = pids.iter().filter_map(|p| rss_bytes(*p).ok()).sum();
    let replies = (s1.replies - s0.replies) as f64;
    let bytes = (s1.reply_bytes - s0.reply_bytes) as f64;
    let gw_text = |g: &LocalGateway| {
        let g = g.admin_addr;
        async move { harness::scrape(g).await.unwrap_or_default() }
    };
    let mut r = MembersResult {
        members: n,
        routers: opts.routers,
        join_s,
        router_cpu_pct: (c1 - c0) / secs / opts.routers as f64 * 100.0,
        gateway_cpu_pct: (g1 - g0) / secs * 100.0,
        router_rss_mib: rss as f64 / opts.routers as f64 / (1 << 20) as f64,
        replies_per_s: replies / secs,
        reply_bytes_per_s: bytes / secs,
        bytes_per_reply: if replies > 0.0 { bytes / replies } else { 0.0 },
        omitted_fraction: if replies > 0.0 {
            (s1.omitted - s0.omitted) as f64 / replies
        } else {
            0.0
        },
        tick_ms: mean_ms(tick0, tick1),
        router_ring_build_ms: mean_ms((0.0, 0.0), hist(&texts, ROUTER_BUILD)),
        gateway_ring_build_ms: mean_ms((0.0, 0.0), hist(&[gw_text(gw).await], GATEWAY_BUILD)),
        ..Default::default()
    };
    // Detection: members killed one after another, then as many paused.
    // At most a third of the members each way: the rest stay a cluster.
    let trials = opts.detect_trials.max(1).min(n / 3).max(1);
    for i in 0..trials {
        r.kill_detect_ms
            .push(until_dead(routers, &e.kill(i)).await?);
    }
    for i in trials..2 * trials {
        r.silence_detect_ms
            .push(until_dead(routers, &e.pause(i, true)).await?);
    }
    if opts.churn > 0 {
        let others = [node_name(0)].into_iter().collect();
        let b0 = hist(&scrape_routers().await, ROUTER_BUILD);
        let gb0 = hist(&[gw_text(gw).await], GATEWAY_BUILD);
        let (c0, g0, s0, w0) = (
            cpu(&pids),
            cpu(&[gw_pid]),
            e.stats.snapshot(),
            Instant::now(),
        );
        let run = churn(&mut e, routers, &others, opts.churn, n as u64).await?;
        let secs = w0.elapsed().as_secs_f64();
        let (c1, g1, s1) = (cpu(&pids), cpu(&[gw_pid]), e.stats.snapshot());
        r.router_ring_build_ms = mean_ms(b0, hist(&scrape_routers().await, ROUTER_BUILD));
        r.gateway_ring_build_ms = mean_ms(gb0, hist(&[gw_text(gw).await], GATEWAY_BUILD));
        r.churn = Some(ChurnFigures {
            run,
            router_cpu_pct: (c1 - c0) / secs / opts.routers as f64 * 100.0,
            gateway_cpu_pct: (g1 - g0) / secs * 100.0,
            reply_bytes_per_s_per_member: (s1.reply_bytes - s0.reply_bytes) as f64
                / secs
                / n as f64,
        });
    }
    Ok(r)
}

/// Milliseconds until no router counts `node` alive.
async fn until_dead(routers: &[LocalRouter], node: &str) -> Result<u64> {
    let t0 = Instant::now();
    for r in routers {
        harness::eventually(Duration::from_secs(30), "the member dead", || async {
            !r.alive().await.unwrap_or_default().contains(node)
        })
        .await?;
    }
    Ok(t0.elapsed().as_millis() as u64)
}
