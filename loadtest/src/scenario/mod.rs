//! `jvpn-loadtest run`: load a deployment the way its operators will, and
//! check the session invariants while doing it.
//!
//! Open loop: sessions arrive at a constant `--rate`, each at its intended
//! time; a late start is charged to the handshake latency (no coordinated
//! omission). Echoes are scheduled once a second per session and measured
//! from their intended send time too. Every agent runs the real keep-alive
//! loop from its own loopback source address.
//!
//! Scenarios (this slice): `steady`, `jump`, `storm`, `churn`, `loss`,
//! `failover` and `scale-out` (the last two need `--local-cluster`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use jvpn_agent::{AgentReport, Command};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::cluster::{ClusterOptions, LocalCluster, launchers, node_name};
use crate::fleet::{Fleet, Running};
use crate::harness::{self, TestPki};
use crate::invariants;
use crate::streamload::StreamLoad;
use jvpn_runtime::wire::lock;

mod floods;
mod report;

use floods::{hello_flood, replay_flood};
pub use report::{
    FloodReport, Latency, RunReport, SampleTimeline, ThresholdResult, WindowCpu, check_threshold,
};
use report::{buckets, histogram, latency};

/// What a run does to its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Sessions with heartbeats and echo data.
    Steady,
    /// Each session changes transport every `--jump-every-s`.
    Jump,
    /// Every session loses its transport at the same moment, then resumes.
    Storm,
    /// `storm` while fault proxies keep cutting `--loss-pct` % of the open
    /// connections every second (resumed transports included).
    StormLoss,
    /// A gateway of the local cluster is killed (explicit re-handshakes).
    Failover,
    /// A gateway is added to the local cluster (no re-handshake allowed).
    ScaleOut,
    /// Sessions are closed and new ones created at `--rate` each.
    Churn,
    /// A fault proxy in front of every router cuts `--loss-pct` % of the
    /// open connections every second; sessions resume.
    Loss,
    /// `--flood-rate` HELLOs/s from 3 sources while the sessions arrive
    /// from others.
    HandshakeFlood,
    /// `--flood-rate` replays/s of one captured `Resume` frame over new
    /// connections; every one must be refused and the session unaffected.
    ReplayFlood,
    /// Sessions with a data plane move bytes: `--streams-per-session`
    /// streams each, transfers of `--transfer-bytes` to an echo destination
    /// behind the gateways, compared byte for byte; every session changes
    /// transport every `--jump-every-s` and fault proxies cut `--loss-pct` %
    /// of the open connections every second. Local cluster only.
    Bulk,
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// Spawn routers + gateways locally: `(gateways, routers)`.
    LocalCluster(usize, usize),
    /// An existing deployment: its routers and the PKI directory of
    /// `jvpn-gateway pki init` (client CA and dev token).
    Routers(Vec<SocketAddr>, PathBuf),
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub target: Target,
    pub scenario: Scenario,
    pub sessions: usize,
    /// Session arrivals per second.
    pub rate: f64,
    /// How long the scenario runs once every session arrived.
    pub duration: Duration,
    pub jump_every: Duration,
    pub seed: u64,
    /// `name<value` / `name>value` (e.g. `resume_p99_ms<500`).
    pub thresholds: Vec<String>,
    /// `loss`: share of open connections cut every second, in percent.
    pub loss_pct: f64,
    /// `handshake-flood` / `replay-flood`: attempts per second.
    pub flood_rate: f64,
    /// Local clusters: the gateways' keep-alive interval (the policy's
    /// `heartbeat_interval_ms`, timeout 4 ×); `None` keeps the default.
    pub heartbeat_interval: Option<Duration>,
    /// Echoes per session at this period; `None`: no echoes.
    pub echo_every: Option<Duration>,
    /// `bulk`: streams per session, and the size of each transfer.
    pub streams_per_session: usize,
    pub transfer_bytes: usize,
}

impl RunOptions {
    /// The `[policy]` table local gateways get, if any.
    fn policy_toml(&self) -> String {
        let mut policy = String::new();
        if let Some(hb) = self.heartbeat_interval {
            let hb = hb.as_millis().max(50) as u64;
            policy += &format!(
                "heartbeat_interval_ms = {hb}\nheartbeat_timeout_ms = {}\n",
                hb * 4
            );
        }
        let mut extra = String::new();
        if self.scenario == Scenario::Bulk {
            // A jump a second plus cuts: more switches than the default
            // anti-flap allows (this run measures the data plane, not it).
            policy += "max_switches_per_min = 600\nswitch_cooldown_ms = 100\n";
            extra += crate::streamload::LOOPBACK_EGRESS;
        }
        if !policy.is_empty() {
            extra = format!("\n[policy]\n{policy}{extra}");
        }
        extra
    }
}

/// Echoes every `period` per session, measured from the intended send time.
fn spawn_echoes(
    fleet: &Fleet,
    stop_at: Instant,
    period: Duration,
    hist: Arc<Mutex<Histogram<u64>>>,
    failed: Arc<Mutex<(u64, u64)>>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    fleet
        .agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let tx = a.tx.clone();
            let (hist, failed) = (hist.clone(), failed.clone());
            // Spread sessions over the period, deterministically from the seed.
            let offset = Duration::from_micros(
                (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64)
                    % (period.as_micros() as u64).max(1),
            );
            tokio::spawn(async move {
                let mut next = Instant::now() + offset;
                while next < stop_at {
                    tokio::time::sleep_until(next.into()).await;
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send(Command::Echo(b"jvpn".to_vec(), rtx)).await.is_err() {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), rrx).await {
                        Ok(Ok(Ok(_))) => {
                            let us = next.elapsed().as_micros() as u64;
                            let _ = lock(&hist).record(us.max(1));
                        }
                        // The session ended (churn closes sessions); how it
                        // ended is judged by the invariants, not here.
                        Ok(Err(_)) => return,
                        // The transport died under the echo (cut, jump):
                        // lost with it, the session resumes.
                        Ok(Ok(Err(_))) => lock(&failed).1 += 1,
                        Err(_) => lock(&failed).0 += 1,
                    }
                    next += period;
                }
            })
        })
        .collect()
}

/// Starts sessions at a constant rate: session `i` is due at `start + i/rate`.
/// Returns the fleet and, per session, its intended start.
async fn arrive(
    pki: &TestPki,
    routers: &[SocketAddr],
    opts: &RunOptions,
    watch: &Mutex<Vec<Arc<Mutex<AgentReport>>>>,
) -> Result<(Fleet, Vec<Instant>)> {
    let start = Instant::now();
    let mut fleet = Fleet::default();
    let mut intended = Vec::with_capacity(opts.sessions);
    for i in 0..opts.sessions {
        let due = start + Duration::from_secs_f64(i as f64 / opts.rate.max(1e-3));
        tokio::time::sleep_until(due.into()).await;
        let one = if opts.scenario == Scenario::Bulk {
            Fleet::start_with_tunnels(pki, routers, 1, i)?
        } else {
            Fleet::start(pki, routers, 1, i)?
        };
        lock(watch).extend(one.agents.iter().map(|a| a.report.clone()));
        fleet.agents.extend(one.agents);
        intended.push(due);
    }
    Ok((fleet, intended))
}

fn errors(reports: &[AgentReport]) -> BTreeMap<String, u64> {
    let mut out = invariants::rejected_by_reason(reports);
    for r in reports {
        for (k, v) in &r.rehandshake_reasons {
            *out.entry(format!("rehandshake:{k}")).or_insert(0) += v;
        }
    }
    out
}

/// Stops the local gateways cleanly (a clean stop writes out every event
/// still queued) and scans their event files for dual-active sessions.
/// "Not checked" (`None`) when a gateway dropped events, a file could not
/// be read, or there was nothing to read: a 0 must mean it looked.
async fn dual_active_after_stop(c: &mut LocalCluster) -> Result<(Option<u64>, usize)> {
    let mut dropped = 0.0;
    let mut scraped = true;
    let mut files = Vec::new();
    for (_, g) in &mut c.gateways {
        files.push(PathBuf::from(&g.events_path));
        if g.exited()? {
            continue;
        }
        match g.metrics().await {
            Ok(text) => {
                dropped += harness::metric_value(&text, "jvpn_gateway_events_dropped_total", &[]);
            }
            // Dropped events unknown: the answer cannot be a clean 0.
            Err(_) => scraped = false,
        }
        g.signal(Signal::SIGTERM)?;
    }
    // Signalled together, so they drain at once: the waits overlap.
    for (_, g) in &mut c.gateways {
        let _ = tokio::time::timeout(Duration::from_secs(40), g.wait()).await;
    }
    let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    let found = invariants::dual_active(&paths);
    let looked = scraped && dropped == 0.0 && found.events > 0 && paths.iter().all(|p| p.is_file());
    Ok((found.violations.filter(|_| looked), found.events))
}

/// Runs one scenario and returns its report (thresholds evaluated).
pub async fn run(opts: RunOptions) -> Result<RunReport> {
    // A threshold naming nothing is a usage error before any work.
    for t in &opts.thresholds {
        report::valid_threshold(t)?;
    }
    let limit = crate::bench::raise_nofile();
    // One socket per session here, plus listeners, files and floods.
    let want = opts.sessions as u64 + 512;
    if limit < want {
        eprintln!(
            "note: the open-file limit is {limit} and could not be raised to {want}: \
             sessions beyond it will fail to connect"
        );
    }
    let needs_cluster = matches!(
        opts.scenario,
        Scenario::Failover | Scenario::ScaleOut | Scenario::Bulk
    );
    let mut cluster = None;
    let (pki, routers) = match &opts.target {
        Target::LocalCluster(n, routers) => {
            let exe = std::env::current_exe()?;
            let (g, r) = launchers(&exe);
            let c = LocalCluster::start(
                g,
                r,
                ClusterOptions {
                    gateways: *n,
                    routers: (*routers).max(1),
                    spare_gateways: 1,
                    gateway_extra_toml: opts.policy_toml(),
                    ..ClusterOptions::default()
                },
            )
            .await?;
            let routers = c.router_addrs();
            cluster = Some(c);
            (None, routers)
        }
        Target::Routers(addrs, dir) => {
            if needs_cluster {
                bail!("scenario {:?} needs --local-cluster", opts.scenario);
            }
            if opts.heartbeat_interval.is_some() {
                bail!(
                    "--heartbeat-interval-ms sets local gateways' policy: it needs --local-cluster"
                );
            }
            (Some(TestPki::existing(dir)?), addrs.clone())
        }
    };
    // A handle on the same files, independent of the cluster's lifetime.
    let pki = match (pki, &cluster) {
        (Some(p), _) => p,
        (None, Some(c)) => TestPki::existing(&c.pki.layout.dir)?,
        (None, None) => unreachable!("a target was chosen"),
    };
    let pki = &pki;

    // `loss`: agents reach the routers through fault proxies.
    let mut proxies = Vec::new();
    let bulk_cuts = opts.scenario == Scenario::Bulk && opts.loss_pct > 0.0;
    if matches!(opts.scenario, Scenario::Loss | Scenario::StormLoss) || bulk_cuts {
        for r in &routers {
            proxies.push(crate::faultproxy::FaultProxy::start(*r).await?);
        }
    }
    let entry: Vec<SocketAddr> = if proxies.is_empty() {
        routers.clone()
    } else {
        proxies.iter().map(|p| p.addr).collect()
    };
    let gw_cpu0 = gateway_cpu(cluster.as_ref());
    let gw_rss0 = gateway_rss(cluster.as_ref());
    let flood_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood_task = match opts.scenario {
        Scenario::HandshakeFlood => Some(tokio::spawn(hello_flood(
            TestPki::existing(&pki.layout.dir)?,
            entry.clone(),
            opts.flood_rate,
            flood_stop.clone(),
        ))),
        Scenario::ReplayFlood => Some(tokio::spawn(replay_flood(
            TestPki::existing(&pki.layout.dir)?,
            entry.clone(),
            opts.flood_rate,
            flood_stop.clone(),
        ))),
        _ => None,
    };
    let t0 = Instant::now();
    // The report's start date, for people; every duration uses `t0`.
    let started_at = report::rfc3339_utc(std::time::SystemTime::now());
    let watch = Arc::new(Mutex::new(Vec::new()));
    let progress_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = spawn_progress(watch.clone(), t0, progress_stop.clone());
    let (mut fleet, intended) = arrive(pki, &entry, &opts, &watch).await?;
    let arrived = t0.elapsed();
    fleet
        .wait_established(Duration::from_secs(60) + opts.duration)
        .await?;
    let mut handshake = histogram();
    for (r, due) in fleet.snapshots().iter().zip(&intended) {
        if let Some(at) = r.established_at {
            let _ = handshake.record((at.duration_since(*due).as_micros() as u64).max(1));
        }
    }

    let echo_hist = Arc::new(Mutex::new(histogram()));
    let echo_failed = Arc::new(Mutex::new((0u64, 0u64)));
    let stop_at = Instant::now() + opts.duration;
    let cpu0 = cluster_cpu(cluster.as_ref());
    let echoes = match opts.echo_every {
        Some(period) => spawn_echoes(
            &fleet,
            stop_at,
            period,
            echo_hist.clone(),
            echo_failed.clone(),
            opts.seed,
        ),
        None => Vec::new(),
    };
    let load = (opts.scenario == Scenario::Bulk).then(|| {
        (
            fleet.tunnels(),
            opts.streams_per_session.max(1),
            opts.transfer_bytes.max(1),
        )
    });
    let load = match load {
        Some((tunnels, m, size)) => Some(StreamLoad::start(
            &tunnels,
            m,
            size,
            crate::streamload::echo_destination().await?,
        )?),
        None => None,
    };
    let cut = std::sync::atomic::AtomicU64::new(0);
    let setting = Setting {
        pki,
        entry: &entry,
        proxies: &proxies,
        watch: &watch,
        load: load.as_ref(),
        cut: &cut,
    };
    drive(&opts, &mut fleet, cluster.as_mut(), &setting, stop_at).await?;
    let streams = match load {
        Some(l) => Some(l.stop().await),
        None => None,
    };
    for e in echoes {
        let _ = e.await;
    }
    tokio::time::sleep_until(stop_at.into()).await;
    let cpu = cpu0
        .zip(cluster_cpu(cluster.as_ref()))
        .map(|((t0, c0), (t1, c1))| {
            let s = t1.duration_since(t0).as_secs_f64().max(1e-3);
            let pct = |a: f64, b: f64| (b - a) * 100.0 / s;
            WindowCpu {
                window_s: s,
                routers_pct: pct(c0[0], c1[0]),
                gateways_pct: pct(c0[1], c1[1]),
                tool_pct: pct(c0[2], c1[2]),
            }
        });
    flood_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    progress_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = progress.await;
    let flood = match flood_task {
        Some(t) => {
            let mut f = t.await??;
            if let (Some(c0), Some(c1)) = (gw_cpu0, gateway_cpu(cluster.as_ref())) {
                f.gateway_cpu_us_per_attempt = Some((c1 - c0) * 1e6 / f.attempts.max(1) as f64);
            }
            if let (Some(r0), Some(r1)) = (gw_rss0, gateway_rss(cluster.as_ref())) {
                f.gateway_rss_growth_kib = Some((r1 as i64 - r0 as i64) / 1024);
            }
            Some(f)
        }
        None => None,
    };

    let reports = fleet.close().await;
    let mut inv = invariants::from_agents(&reports);
    let mut events_checked = 0;
    if let Some(c) = cluster.as_mut() {
        let (dual, events) = dual_active_after_stop(c).await?;
        inv.dual_active_detected = dual;
        events_checked = events;
    }
    let mut resume = histogram();
    let mut recovery = histogram();
    let mut recovery_rehandshake = histogram();
    for r in &reports {
        for ms in &r.recovery_ms {
            let _ = recovery.record((ms * 1000).max(1));
        }
        for ms in &r.rehandshake_recovery_ms {
            let _ = recovery_rehandshake.record((ms * 1000).max(1));
        }
        for ms in &r.resume_ms {
            let _ = resume.record((ms * 1000).max(1));
        }
    }
    let (echo_failed, echo_lost) = *lock(&echo_failed);
    let echo_hist = lock(&echo_hist).clone();
    let echo_rtt = latency(&echo_hist);
    let histograms: BTreeMap<String, Vec<(f64, u64)>> = [
        ("handshake", &handshake),
        ("resume", &resume),
        ("echo_rtt", &echo_hist),
        ("recovery", &recovery),
        ("recovery_rehandshake", &recovery_rehandshake),
    ]
    .into_iter()
    .map(|(k, h)| (k.to_owned(), buckets(h)))
    .collect();
    let timeline = reports
        .iter()
        .enumerate()
        .take(8)
        .map(|(i, r)| SampleTimeline {
            session: i,
            events: r
                .timeline
                .iter()
                .map(|(t, what)| {
                    (
                        t.saturating_duration_since(t0).as_secs_f64() * 1000.0,
                        (*what).to_owned(),
                    )
                })
                .collect(),
        })
        .collect();
    let mut report = RunReport {
        schema: "jvpn-loadtest-run/1",
        scenario: format!("{:?}", opts.scenario).to_lowercase(),
        target: match &opts.target {
            Target::LocalCluster(g, r) => {
                let n =
                    |k: usize, what: &str| format!("{k} {what}{}", if k == 1 { "" } else { "s" });
                format!("local cluster: {}, {}", n(*g, "gateway"), n(*r, "router"))
            }
            Target::Routers(list, _) => {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                format!("routers {}", list.join(","))
            }
        },
        started_at,
        verdict: "",
        failures: Vec::new(),
        seed: opts.seed,
        sessions_requested: opts.sessions,
        sessions_established: reports.iter().map(|r| r.sessions_established).sum(),
        rate_requested_per_s: opts.rate,
        rate_achieved_per_s: opts.sessions as f64 / arrived.as_secs_f64().max(1e-9),
        duration_s: t0.elapsed().as_secs_f64(),
        handshake_ms: latency(&handshake),
        resume_ms: latency(&resume),
        echo_rtt_ms: echo_rtt,
        recovery_ms: latency(&recovery),
        resumes_ok: reports.iter().map(|r| r.resumes_ok).sum(),
        resumes_tls_resumed: reports.iter().map(|r| r.resumes_tls_resumed).sum(),
        rehandshakes: reports.iter().map(|r| r.rehandshakes).sum(),
        errors_by_reason: errors(&reports),
        echo_failed,
        echo_lost,
        connections_cut: cut.load(std::sync::atomic::Ordering::Relaxed),
        invariants: inv,
        events_checked,
        dual_active_required: matches!(opts.target, Target::LocalCluster(g, _) if g >= 2),
        flood,
        streams,
        cpu,
        thresholds: Vec::new(),
        histograms,
        timeline,
    };
    for t in &opts.thresholds {
        let r = check_threshold(&report, t)?;
        report.thresholds.push(r);
    }
    report.failures = report.failures();
    report.verdict = if report.failures.is_empty() {
        "pass"
    } else {
        "fail"
    };
    Ok(report)
}

/// Live progress on stderr once a second: a spinner line on a terminal,
/// plain lines otherwise. Stops when `stop` is set.
fn spawn_progress(
    agents: Arc<Mutex<Vec<Arc<Mutex<AgentReport>>>>>,
    started: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let mut last_resumes = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let snaps: Vec<AgentReport> = lock(&agents).iter().map(|r| lock(r).clone()).collect();
            let est: u64 = snaps.iter().map(|r| r.sessions_established).sum();
            let resumes: u64 = snaps.iter().map(|r| r.resumes_ok).sum();
            let rh: u64 = snaps.iter().map(|r| r.rehandshakes).sum();
            let errs = invariants::rejected_by_reason(&snaps);
            let line = format!(
                "{:>5.1}s sessions {est} resumes {resumes} (+{}/s) re-handshakes {rh} errors {errs:?}",
                started.elapsed().as_secs_f64(),
                resumes - last_resumes.min(resumes),
            );
            last_resumes = resumes;
            match &bar {
                Some(b) => b.set_message(line),
                None => eprintln!("{line}"),
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    })
}

/// Total CPU seconds of the local gateways.
/// `f` of every local gateway process, summed (`None` without a local
/// cluster or when one cannot be read).
fn over_gateways<T: std::iter::Sum>(
    c: Option<&LocalCluster>,
    f: impl Fn(nix::unistd::Pid) -> Result<T>,
) -> Option<T> {
    c?.gateways.iter().map(|(_, g)| f(g.pid()?).ok()).sum()
}

/// When, and the CPU seconds the local routers, gateways and this tool
/// have used (`None` without a local cluster or once one has exited).
fn cluster_cpu(c: Option<&LocalCluster>) -> Option<(Instant, [f64; 3])> {
    let routers: Option<f64> = c?
        .routers
        .iter()
        .map(|r| crate::bench::cpu_seconds(r.pid()?).ok())
        .sum();
    let tool = crate::bench::cpu_seconds(nix::unistd::getpid()).ok()?;
    Some((Instant::now(), [routers?, gateway_cpu(c)?, tool]))
}

/// CPU seconds the local gateways have used.
fn gateway_cpu(c: Option<&LocalCluster>) -> Option<f64> {
    over_gateways(c, crate::bench::cpu_seconds)
}

/// Resident memory of every local gateway, summed.
fn gateway_rss(c: Option<&LocalCluster>) -> Option<u64> {
    over_gateways(c, crate::bench::rss_bytes)
}

/// What a scenario may act on besides the fleet.
struct Setting<'a> {
    pki: &'a TestPki,
    entry: &'a [SocketAddr],
    proxies: &'a [crate::faultproxy::FaultProxy],
    /// Reports the progress lines read; sessions started later join it.
    watch: &'a Mutex<Vec<Arc<Mutex<AgentReport>>>>,
    /// `bulk`: the streams moving bytes.
    load: Option<&'a StreamLoad>,
    /// Connections the fault proxies cut (`--loss-pct`).
    cut: &'a std::sync::atomic::AtomicU64,
}

/// Every second until `stop_at`, the fault proxies cut `--loss-pct` % of
/// the connections open through them, chosen by the seeded RNG.
async fn cut_connections(opts: &RunOptions, setting: &Setting<'_>, stop_at: Instant) -> Result<()> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut due = Instant::now();
    while due + Duration::from_secs(1) < stop_at {
        due += Duration::from_secs(1);
        tokio::time::sleep_until(due.into()).await;
        for p in setting.proxies {
            let n = p.cut_fraction(opts.loss_pct / 100.0, &mut rng);
            setting
                .cut
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The scenario's own actions while echoes run.
async fn drive(
    opts: &RunOptions,
    fleet: &mut Fleet,
    cluster: Option<&mut LocalCluster>,
    setting: &Setting<'_>,
    stop_at: Instant,
) -> Result<()> {
    match opts.scenario {
        Scenario::HandshakeFlood | Scenario::ReplayFlood => Ok(()),
        Scenario::Churn => {
            let step = Duration::from_secs_f64(1.0 / opts.rate.max(1e-3));
            let mut due = Instant::now();
            let mut oldest = 0;
            while due + step < stop_at {
                due += step;
                tokio::time::sleep_until(due.into()).await;
                if let Some(a) = fleet.agents.get(oldest) {
                    let _ = a.tx.send(Command::Close).await;
                    oldest += 1;
                }
                let n = fleet.len();
                let one = Fleet::start(setting.pki, setting.entry, 1, n)?;
                lock(setting.watch).extend(one.agents.iter().map(|a| a.report.clone()));
                fleet.agents.extend(one.agents);
            }
            Ok(())
        }
        Scenario::Loss => cut_connections(opts, setting, stop_at).await,
        Scenario::StormLoss => {
            fleet
                .wait_switch_allowed(Duration::from_millis(1_600))
                .await?;
            let storm = fleet.jump_all_now(
                stop_at.saturating_duration_since(Instant::now()) + Duration::from_secs(30),
            );
            // Cuts go on until every session resumed at least once.
            tokio::select! {
                r = storm => r,
                r = cut_connections(opts, setting, Instant::now() + Duration::from_secs(3_600)) => r,
            }
        }
        Scenario::Steady => Ok(()),
        Scenario::Bulk => {
            // Jumps spread evenly, each followed by a probe of how long its
            // session's streams stall; cuts meanwhile.
            let jumps = async {
                let mut probes = Vec::new();
                let n = fleet.len().max(1) as u32;
                let mut due = Instant::now();
                let step = opts.jump_every / n;
                while due + opts.jump_every < stop_at {
                    for (i, a) in fleet.agents.iter().enumerate() {
                        due += step;
                        tokio::time::sleep_until(due.into()).await;
                        let at = Instant::now();
                        let _ = a.tx.send(Command::Jump).await;
                        if let Some(l) = setting.load {
                            probes.push(tokio::spawn(l.probe_stalls(
                                Some(i),
                                at,
                                Duration::from_secs(10),
                            )));
                        }
                    }
                }
                probes
            };
            let probes = if opts.loss_pct > 0.0 {
                let (p, cuts) = tokio::join!(jumps, cut_connections(opts, setting, stop_at));
                cuts?;
                p
            } else {
                jumps.await
            };
            for p in probes {
                let _ = p.await;
            }
            Ok(())
        }
        Scenario::Jump => {
            let n = fleet.len().max(1) as u32;
            let mut due = Instant::now();
            let step = opts.jump_every / n;
            while due + opts.jump_every < stop_at {
                for a in &fleet.agents {
                    due += step;
                    tokio::time::sleep_until(due.into()).await;
                    let _ = a.tx.send(Command::Jump).await;
                }
            }
            Ok(())
        }
        Scenario::Storm => {
            fleet
                .jump_all(
                    stop_at.saturating_duration_since(Instant::now()) + Duration::from_secs(30),
                )
                .await
        }
        Scenario::Failover => {
            let c = cluster.context("failover needs a local cluster")?;
            fleet
                .wait_switch_allowed(Duration::from_millis(1_600))
                .await?;
            let victim = fleet
                .by_node()
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(k, _)| k)
                .context("no sessions")?;
            let on_victim: Vec<&Running> = fleet
                .agents
                .iter()
                .filter(|a| a.snapshot().node_id == victim)
                .collect();
            let killed = Instant::now();
            c.gateway(&victim)?.signal(Signal::SIGKILL)?;
            harness::eventually(Duration::from_secs(30), "victims re-established", || {
                let done = on_victim
                    .iter()
                    .all(|a| a.snapshot().established_at.is_some_and(|t| t > killed));
                async move { done }
            })
            .await
        }
        Scenario::ScaleOut => {
            let c = cluster.context("scale-out needs a local cluster")?;
            let n = c.gateways.len();
            c.start_gateway(&node_name(n)).await?;
            let all: Vec<String> = (0..=n).map(node_name).collect();
            c.wait_placeable(&all, Duration::from_secs(15)).await
        }
    }
}
