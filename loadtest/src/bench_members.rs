//! `jvpn-loadtest bench-members`: what membership costs a router at N
//! members (issue 14). For each N: real routers, N emulated members
//! ([`crate::members`]) joining until every router places all of them,
//! then a steady window measured (router CPU and RSS from `/proc`, reply
//! bytes per second and per reply as the members received them), then one
//! member's streams dropped and another member paused, timed until every
//! router declares it not alive.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bench::{cpu_seconds, raise_nofile, rss_bytes};
use crate::cluster::{LocalRouter, RouterOptions};
use crate::harness::{self, Launcher, Role, TestPki};
use crate::members::{Emulator, EmulatorOptions, member_name};

#[derive(Clone, Debug)]
pub struct MembersBenchOptions {
    pub members: Vec<usize>,
    pub routers: usize,
    pub interval: Duration,
    /// The steady window measured at each N.
    pub duration: Duration,
    /// Members that never name their view (gateways one version older).
    pub old_format: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MembersResult {
    pub members: usize,
    pub routers: usize,
    /// Time until every router placed every member.
    pub join_s: f64,
    /// Router CPU in the steady window, per router, in % of one core.
    pub router_cpu_pct: f64,
    /// Router resident memory after the window, per router.
    pub router_rss_mib: f64,
    /// Heartbeat replies per second, all routers together.
    pub replies_per_s: f64,
    pub reply_bytes_per_s: f64,
    pub bytes_per_reply: f64,
    /// Share of the replies without members.
    pub omitted_fraction: f64,
    /// A member's streams dropped → not alive on every router.
    pub kill_detect_ms: u64,
    /// A member paused (streams open, silent) → not alive on every router.
    pub silence_detect_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MembersBenchReport {
    pub interval_ms: u64,
    pub old_format: bool,
    pub runs: Vec<MembersResult>,
}

pub async fn run(opts: MembersBenchOptions) -> Result<MembersBenchReport> {
    raise_nofile();
    let mut report = MembersBenchReport {
        interval_ms: opts.interval.as_millis() as u64,
        old_format: opts.old_format,
        ..Default::default()
    };
    for &n in &opts.members {
        let r = one(&opts, n)
            .await
            .with_context(|| format!("{n} members"))?;
        eprintln!(
            "bench-members: {n:>5} members, {} routers: join {:.1} s, router CPU {:.1} %, \
             RSS {:.1} MiB, {:.0} replies/s, {:.0} B/s ({:.0} B per reply, {:.0} % without members), \
             SIGKILL → dead {} ms, silence → dead {} ms",
            r.routers,
            r.join_s,
            r.router_cpu_pct,
            r.router_rss_mib,
            r.replies_per_s,
            r.reply_bytes_per_s,
            r.bytes_per_reply,
            r.omitted_fraction * 100.0,
            r.kill_detect_ms,
            r.silence_detect_ms
        );
        report.runs.push(r);
    }
    Ok(report)
}

async fn one(opts: &MembersBenchOptions, n: usize) -> Result<MembersResult> {
    let exe = std::env::current_exe()?;
    let ids: Vec<String> = (1..=opts.routers).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let pki = TestPki::with_routers(&[], &refs)?;
    let dir = tempfile::tempdir()?;
    let launcher = Launcher::resolve_as(&exe, Role::Router);
    // Every member has a source address of its own, like separate hosts:
    // the router's table of membership sources must hold them all.
    let sources = (n + n / 4).max(256);
    let mut routers = Vec::new();
    for id in &ids {
        let ro = RouterOptions {
            router_id: id.clone(),
            env: vec![(
                "JVPN_ROUTER__MEMBERSHIP__MAX_SOURCES".into(),
                sources.to_string(),
            )],
            ..Default::default()
        };
        routers.push(LocalRouter::start(&launcher, &pki, dir.path(), &ro).await?);
    }
    let t0 = Instant::now();
    let eo = EmulatorOptions {
        routers: routers.iter().map(|r| r.membership_addr).collect(),
        interval: opts.interval,
        old_format: opts.old_format,
    };
    let mut e = Emulator::start(&pki.layout.dir, n, eo).await?;
    let all: Vec<String> = (0..n).map(member_name).collect();
    for r in &routers {
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
    let (c0, s0, w0) = (cpu(&pids), e.stats.snapshot(), Instant::now());
    tokio::time::sleep(opts.duration).await;
    let (c1, s1, secs) = (cpu(&pids), e.stats.snapshot(), w0.elapsed().as_secs_f64());
    let rss: u64 = pids.iter().filter_map(|p| rss_bytes(*p).ok()).sum();
    let replies = (s1.replies - s0.replies) as f64;
    let bytes = (s1.reply_bytes - s0.reply_bytes) as f64;
    let mut r = MembersResult {
        members: n,
        routers: opts.routers,
        join_s,
        router_cpu_pct: (c1 - c0) / secs / opts.routers as f64 * 100.0,
        router_rss_mib: rss as f64 / opts.routers as f64 / (1 << 20) as f64,
        replies_per_s: replies / secs,
        reply_bytes_per_s: bytes / secs,
        bytes_per_reply: if replies > 0.0 { bytes / replies } else { 0.0 },
        omitted_fraction: if replies > 0.0 {
            (s1.omitted - s0.omitted) as f64 / replies
        } else {
            0.0
        },
        ..Default::default()
    };
    r.kill_detect_ms = until_dead(&routers, &e.kill(0)).await?;
    r.silence_detect_ms = until_dead(&routers, &e.pause(1, true)).await?;
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
