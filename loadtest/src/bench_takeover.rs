//! `jvpn-loadtest bench-takeover`: topology 3 measured (issue 16). A real
//! etcd cluster of 3 members on loopback (data on tmpfs), one router with
//! takeover, gateways with `[store]`; then
//!
//! 1. the store's compare-and-set latency: sequential binding updates of
//!    one record through the gateway's etcd client;
//! 2. takeover: N sessions through the router, the gateway holding the
//!    most of them SIGKILLed, every agent RESUMEs at once (each retrying as
//!    the real agent does), and each one's time from the kill until it is
//!    attached again is recorded, with how it came back (taken over at a
//!    higher owner epoch, or not);
//! 3. RESUMEs per gateway core: one gateway pinned to CPU 0 (the load on
//!    CPU 1), without a store and then with `[store]` on this etcd, the
//!    same pool of sessions resumed round-robin for the same time; per
//!    core-second of the gateway process, and etcd's CPU per RESUME.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jvpn_agent::{Agent, AgentError, Transport};
use jvpn_gateway::store::EtcdStore;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::preamble::Status;
use jvpn_proto::{ReasonCode, SessionId};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::cluster::{ClusterOptions, LocalCluster, launchers};
use crate::demo::{Percentiles, percentiles};
use crate::etcd::EtcdCluster;
use crate::harness::{self, CLUSTER};

#[derive(Clone, Debug)]
pub struct TakeoverBenchOptions {
    pub sessions: usize,
    pub gateways: usize,
    /// Sequential compare-and-set writes timed.
    pub cas_writes: usize,
    /// Each RESUME-rate run (0: not measured).
    pub resume_duration: Duration,
    pub resume_concurrency: usize,
}

/// RESUMEs on one pinned gateway, with or without the store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResumeRate {
    pub store: &'static str,
    pub resumes: u64,
    pub resumes_per_s: f64,
    /// Per CPU-second of the gateway process: what one core sustains.
    pub resumes_per_core_s: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    /// CPU of the 3 etcd members per RESUME (without the store: what
    /// etcd used idling beside them).
    pub etcd_cpu_us_per_resume: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TakeoverBenchReport {
    pub cas_writes: usize,
    /// One compare-and-set binding update, ms (µs resolution).
    pub cas_p50_ms: f64,
    pub cas_p99_ms: f64,
    pub sessions: usize,
    pub gateways: usize,
    /// Sessions the killed gateway owned.
    pub victims: usize,
    /// Of those, back at a higher owner epoch on another gateway, same
    /// session, no HELLO.
    pub taken_over: usize,
    /// Of those, not back within the deadline, or refused for good.
    pub failed: usize,
    /// SIGKILL → attached again, per victim.
    pub takeover_ms: Percentiles,
    /// The owner lease TTL of the gateways (the floor of a takeover).
    pub lease_ttl_ms: u64,
    /// Without the store, then with it (empty: not measured).
    pub resume_rates: Vec<ResumeRate>,
    /// `resumes_per_core_s` with the store / without (goal ≥ 0.7).
    pub store_vs_memory_resumes_per_core: Option<f64>,
    /// The gateway was pinned to CPU 0 and the load generator to CPU 1.
    pub pinned: bool,
}

/// RESUME until attached or refused for good: retries what the real agent
/// retries (the taker's `owner_unreachable` while the old lease lives,
/// `store_unavailable`, overload, a connect to a dying owner).
pub async fn resume_until_attached(
    agent: &mut Agent,
    within: Duration,
) -> Result<Transport, AgentError> {
    let deadline = Instant::now() + within;
    loop {
        let e = match agent.resume().await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let retry = match &e {
            AgentError::Status(s) => matches!(
                s.status,
                Status::Overloaded | Status::OwnerUnreachable | Status::NoGateway
            ),
            AgentError::Rejected { reason, .. } => matches!(
                reason,
                ReasonCode::OwnerUnreachable | ReasonCode::StoreUnavailable
            ),
            AgentError::Connect(..) | AgentError::Tls(_) => true,
            _ => false,
        };
        if !retry || Instant::now() > deadline {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Gateways with `[store]` on `etcd` behind `routers` routers with
/// takeover on (egress to loopback allowed), plus `router_env`.
pub async fn takeover_cluster(
    etcd: &EtcdCluster,
    gateway: crate::harness::Launcher,
    router: crate::harness::Launcher,
    gateways: usize,
    mut router_env: Vec<(String, String)>,
) -> Result<LocalCluster> {
    router_env.push(("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into()));
    LocalCluster::start(
        gateway,
        router,
        ClusterOptions {
            gateways,
            routers: 1,
            spare_gateways: 0,
            gateway_extra_toml: format!(
                "{}{}",
                crate::streamload::LOOPBACK_EGRESS,
                etcd.gateway_toml()
            ),
            router_env,
            ..ClusterOptions::default()
        },
    )
    .await
}

/// The gateways' store, as a test or benchmark reads it.
pub fn store_of(etcd: &EtcdCluster) -> Result<EtcdStore> {
    let prefix = format!("/jvpn/{CLUSTER}");
    Ok(EtcdStore::new(
        &etcd.store_config(&prefix, Duration::from_secs(3))?,
    )?)
}

fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Compare-and-set binding updates of one record, one after another, as
/// a gateway writes them at each RESUME (record revision, writer's lease).
async fn cas_latency(store: &EtcdStore, writes: usize) -> Result<(f64, f64)> {
    let node = jvpn_proto::NodeId::new("bench")?;
    let (lease, _) = store.grant(Duration::from_secs(60)).await?;
    store
        .register_owner(&node, jvpn_proto::Incarnation(1), lease)
        .await?;
    let sid = SessionId::from_bytes(rand::random());
    let mut rec = SessionRecord {
        owner_node: node.to_string(),
        owner_incarnation: 1,
        owner_epoch: 1,
        state_version: 1,
        binding_epoch: 1,
        wrapped_key: vec![0; 60],
        owner_lease: lease,
        ..SessionRecord::default()
    };
    let mut rev = store.create(&sid, &rec).await?;
    let mut took = Vec::with_capacity(writes);
    for _ in 0..writes {
        rec.binding_epoch += 1;
        rec.state_version += 1;
        let t = Instant::now();
        rev = store.update(&sid, rev, &rec).await?;
        took.push(t.elapsed());
    }
    store.delete(&sid, rev).await?;
    store.revoke(lease).await?;
    took.sort_unstable();
    let at = |q: f64| ms(took[((took.len() - 1) as f64 * q).round() as usize]);
    Ok((at(0.5), at(0.99)))
}

/// RESUMEs per second and per gateway core-second on one gateway pinned
/// to CPU 0, without a store and then with `[store]` on `etcd`.
async fn resume_rates(
    etcd: &EtcdCluster,
    duration: Duration,
    concurrency: usize,
) -> Result<Vec<ResumeRate>> {
    use crate::bench::{bench_toml, cpu_seconds, rate, resume_pool, start_pinned_gateway};
    let exe = std::env::current_exe()?;
    let pki = crate::harness::TestPki::new(&["g1"])?;
    let dir = tempfile::tempdir()?;
    let mut out = Vec::new();
    for store in ["memory", "etcd"] {
        let mut toml = bench_toml().to_owned();
        if store == "etcd" {
            toml.push_str(&etcd.gateway_toml());
        }
        let gw = start_pinned_gateway(&exe, &pki, &dir.path().join(store), &toml).await?;
        let cfg = harness::agent_config(&pki, vec![gw.client_addr], None)?;
        // A store-backed gateway takes HELLOs once it holds its lease.
        harness::eventually(Duration::from_secs(10), "a first HELLO", || {
            let cfg = cfg.clone();
            async move {
                match jvpn_agent::Agent::new(cfg) {
                    Ok(mut a) => a.hello().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await?;
        let pool = resume_pool(&cfg, 512usize.max(concurrency)).await?;
        let gw_pid = gw.pid().context("gateway pid")?;
        let etcd_cpu = || -> Result<f64> {
            let mut s = 0.0;
            for p in etcd.pids() {
                s += cpu_seconds(p)?;
            }
            Ok(s)
        };
        let (cpu0, etcd0) = (cpu_seconds(gw_pid)?, etcd_cpu()?);
        let (r, hist, n) = rate(concurrency, duration, pool.runner()).await?;
        let cpu = cpu_seconds(gw_pid)? - cpu0;
        let etcd_used = etcd_cpu()? - etcd0;
        out.push(ResumeRate {
            store,
            resumes: n,
            resumes_per_s: r,
            resumes_per_core_s: n as f64 / cpu.max(1e-9),
            latency_us_p50: hist.value_at_quantile(0.5),
            latency_us_p99: hist.value_at_quantile(0.99),
            // Measured for both rows: the memory row's is etcd idling.
            etcd_cpu_us_per_resume: etcd_used * 1e6 / (n.max(1) as f64),
        });
    }
    Ok(out)
}

pub async fn run(opts: TakeoverBenchOptions) -> Result<TakeoverBenchReport> {
    if opts.gateways < 2 {
        bail!("--gateways must be at least 2 (one dies, one takes over)");
    }
    let _ = crate::bench::raise_nofile();
    let etcd = EtcdCluster::start(3).await?;
    let store = store_of(&etcd)?;
    let (cas_p50_ms, cas_p99_ms) = cas_latency(&store, opts.cas_writes.max(1)).await?;

    let exe = std::env::current_exe()?;
    let (gl, rl) = launchers(&exe);
    let c = takeover_cluster(&etcd, gl, rl, opts.gateways, vec![]).await?;
    let router = c.routers[0].client_addr;
    let mut agents: Vec<Agent> = Vec::with_capacity(opts.sessions);
    for _ in 0..opts.sessions {
        let mut a = harness::agent(&c.pki, router, None)?;
        loop {
            match a.hello().await {
                Ok(t) => break drop(t),
                // The router's per-source admission paces one host's
                // HELLOs: wait as told.
                Err(AgentError::Status(s)) if s.status == Status::Overloaded => {
                    let ms = u64::from(s.retry_after_ms).max(10);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(e).context("HELLO"),
            }
        }
        agents.push(a);
    }
    let owner_of = |a: &Agent| a.session.as_ref().map(|s| s.node_id.clone());
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for a in &agents {
        *per_node.entry(owner_of(a).unwrap_or_default()).or_default() += 1;
    }
    let victim = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(n, _)| n.clone())
        .context("no sessions")?;
    let victims: Vec<Agent> = agents
        .into_iter()
        .filter(|a| owner_of(a).as_deref() == Some(victim.as_str()))
        .collect();
    c.gateway(&victim)?.signal(Signal::SIGKILL)?;
    let killed = Instant::now();
    let mut tasks = Vec::new();
    for mut a in victims {
        tasks.push(tokio::spawn(async move {
            let before = a.session.clone();
            let r = resume_until_attached(&mut a, Duration::from_secs(30)).await;
            let took = killed.elapsed();
            let moved = r.is_ok()
                && match (before, a.session.as_ref()) {
                    (Some(b), Some(s)) => {
                        // The same session, one owner epoch up, elsewhere.
                        s.id == b.id && s.owner_epoch == b.owner_epoch + 1 && s.node_id != b.node_id
                    }
                    _ => false,
                };
            (moved, took)
        }));
    }
    let n = tasks.len();
    let mut times = Vec::new();
    let mut taken_over = 0;
    for t in tasks {
        let (moved, took) = t.await?;
        if moved {
            taken_over += 1;
            times.push(took.as_millis() as u64);
        }
    }
    drop(c);
    // Last: pinning this process (the load generator, on CPU 1) would pin
    // every process it starts after it too.
    let pinned = crate::bench::pin_self(1);
    let resume_rates = if opts.resume_duration.is_zero() {
        Vec::new()
    } else {
        resume_rates(&etcd, opts.resume_duration, opts.resume_concurrency.max(1)).await?
    };
    let store_vs_memory_resumes_per_core = match resume_rates.as_slice() {
        [m, e] => Some(e.resumes_per_core_s / m.resumes_per_core_s.max(1e-9)),
        _ => None,
    };
    Ok(TakeoverBenchReport {
        cas_writes: opts.cas_writes.max(1),
        cas_p50_ms,
        cas_p99_ms,
        sessions: opts.sessions,
        gateways: opts.gateways,
        victims: n,
        taken_over,
        failed: n - taken_over,
        takeover_ms: percentiles(times),
        // The gateways run `[store]` with its default lease.
        lease_ttl_ms: jvpn_gateway::config::StoreConfig::default().lease_ttl_ms,
        resume_rates,
        store_vs_memory_resumes_per_core,
        pinned,
    })
}
