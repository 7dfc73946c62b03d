//! Session churn soak on one gateway: every cycle creates a session (HELLO),
//! loses its transport and RESUMEs it, then ends it (`Terminate`). After a
//! warm-up the gateway's RSS, descriptors and session table are read; after
//! the run (and once the table has drained) they must be back: RSS within
//! 10 % of the warmed-up baseline, descriptors and table exactly, and the
//! sessions gauge equal to the table. Server on CPU 0, load on CPU 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jvpn_agent::{Agent, AgentConfig};
use jvpn_proto::ReasonCode;
use jvpn_proto::pb::session::{Terminate, frame::Kind};
use serde::Serialize;

use crate::bench::{bench_toml, pin_self, raise_nofile, rss_bytes, start_pinned_gateway};
use crate::harness::{LocalGateway, TestPki, agent_config, http_get};

#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Cycles (sessions created, resumed and terminated) after the warm-up.
    pub sessions: u64,
    pub warmup: u64,
    pub concurrency: usize,
}

/// What the gateway looked like at one moment.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kib: u64,
    pub fds: u64,
    pub table: u64,
    pub sessions_gauge: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakReport {
    pub pinned: bool,
    pub sessions: u64,
    pub failed_cycles: u64,
    pub seconds: f64,
    pub cycles_per_s: f64,
    pub at_start: Footprint,
    pub baseline: Footprint,
    /// The highest RSS seen while churning.
    pub peak_rss_kib: u64,
    pub after: Footprint,
    pub rss_growth_pct: f64,
    /// Every check that failed; empty when the soak passed.
    pub violations: Vec<String>,
}

fn fd_count(gw: &LocalGateway) -> Result<u64> {
    let pid = gw.pid().context("gateway exited")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

async fn footprint(gw: &LocalGateway) -> Result<Footprint> {
    let (code, body) = http_get(gw.admin_addr, "/sessions").await?;
    if code != 200 {
        bail!("/sessions answered {code}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let gauge = gw.metric("jvpn_gateway_sessions", &[]).await?;
    Ok(Footprint {
        rss_kib: rss_bytes(gw.pid().context("gateway exited")?)? / 1024,
        fds: fd_count(gw)?,
        table: v["total"].as_u64().context("no total in /sessions")?,
        sessions_gauge: gauge as u64,
    })
}

/// One create → lose transport → resume → terminate cycle.
async fn cycle(cfg: &AgentConfig) -> Result<()> {
    let mut a = Agent::new(cfg.clone())?;
    let first = a.hello().await?;
    drop(first);
    let mut t = a.resume().await?;
    t.send(Kind::Terminate(Terminate {
        reason: ReasonCode::AgentClosed as i32,
    }))
    .await?;
    Ok(())
}

async fn churn(
    cfg: &AgentConfig,
    cycles: u64,
    concurrency: usize,
    gw: &LocalGateway,
    peak_rss: &AtomicU64,
) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (cfg, next, failed) = (cfg.clone(), next.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < cycles {
                if cycle(&cfg).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let pid = gw.pid().context("gateway exited")?;
    let mut last_report = Instant::now();
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(b) = rss_bytes(pid) {
            peak_rss.fetch_max(b / 1024, Ordering::Relaxed);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "soak: {} / {cycles} cycles, {} failed",
                next.load(Ordering::Relaxed).min(cycles),
                failed.load(Ordering::Relaxed)
            );
        }
    }
    for t in tasks {
        t.await?;
    }
    Ok(failed.load(Ordering::Relaxed))
}

/// Waits until the gateway's table holds `want` sessions again (and, given
/// `fds`, its descriptor count is back too); the footprint then, or the
/// last one seen if that never happens within a minute.
async fn drained(gw: &LocalGateway, want: u64, fds: Option<u64>) -> Result<Footprint> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let f = footprint(gw).await?;
        // The gauge is refreshed every 250 ms: wait for it to catch up too.
        let settled = f.table == want && f.sessions_gauge == f.table;
        if (settled && fds.is_none_or(|n| f.fds == n)) || Instant::now() > deadline {
            return Ok(f);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(opts: SoakOptions) -> Result<SoakReport> {
    raise_nofile();
    let exe = std::env::current_exe()?;
    let pki = TestPki::new(&["g1"])?;
    let dir = tempfile::tempdir()?;
    let mut report = SoakReport {
        pinned: pin_self(1),
        sessions: opts.sessions,
        ..Default::default()
    };
    let gw = start_pinned_gateway(&exe, &pki, dir.path(), bench_toml()).await?;
    let cfg = agent_config(&pki, vec![gw.client_addr], None)?;
    report.at_start = footprint(&gw).await?;
    let peak = AtomicU64::new(0);
    let warm_failed = churn(&cfg, opts.warmup, opts.concurrency, &gw, &peak).await?;
    report.baseline = drained(&gw, report.at_start.table, None).await?;

    let started = Instant::now();
    report.failed_cycles =
        warm_failed + churn(&cfg, opts.sessions, opts.concurrency, &gw, &peak).await?;
    report.seconds = started.elapsed().as_secs_f64();
    report.cycles_per_s = opts.sessions as f64 / report.seconds.max(1e-9);
    report.after = drained(&gw, report.baseline.table, Some(report.baseline.fds)).await?;
    report.peak_rss_kib = peak.load(Ordering::Relaxed);

    let (b, a) = (&report.baseline, &report.after);
    report.rss_growth_pct = (a.rss_kib as f64 / b.rss_kib.max(1) as f64 - 1.0) * 100.0;
    let mut v = Vec::new();
    if report.rss_growth_pct > 10.0 {
        v.push(format!(
            "RSS grew {:.1} % ({} → {} KiB)",
            report.rss_growth_pct, b.rss_kib, a.rss_kib
        ));
    }
    if a.fds != b.fds {
        v.push(format!("descriptors {} → {}", b.fds, a.fds));
    }
    if a.table != b.table {
        v.push(format!("session table {} → {}", b.table, a.table));
    }
    if a.sessions_gauge != a.table {
        v.push(format!(
            "sessions gauge {} but table {}",
            a.sessions_gauge, a.table
        ));
    }
    if report.failed_cycles > 0 {
        v.push(format!("{} cycles failed", report.failed_cycles));
    }
    report.violations = v;
    Ok(report)
}
