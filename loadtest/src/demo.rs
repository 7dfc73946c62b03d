//! The quick-start demo: a real gateway process with a fresh development PKI,
//! real agents over TLS through the fault proxy, three rounds of forced
//! transport jumps (agent-side jump, network cut, half-open stall), echo
//! checks after each, then a drain. Prints what happened and a summary.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jvpn_agent::{AgentReport, Command, keep_alive};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::faultproxy::FaultProxy;
use crate::harness::{self, GatewayOptions, Launcher, LocalGateway, TestPki};
use crate::invariants::{self, Invariants};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub agents: usize,
    pub json: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoSummary {
    pub topology: &'static str,
    pub agents: usize,
    pub sessions_established: u64,
    pub resumes_ok: u64,
    pub resumes_rejected: std::collections::BTreeMap<String, u64>,
    pub rehandshakes: u64,
    pub echo_ok: u64,
    pub echo_failed: u64,
    pub recovery_ms: Percentiles,
    #[serde(flatten)]
    pub invariants: Invariants,
    pub gateway_exit_code: Option<i32>,
    /// Gateway state-change events scanned for dual-active bindings.
    pub events_checked: usize,
    pub duration_ms: u64,
}

fn percentiles(mut v: Vec<u64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        max: *v.last().unwrap_or(&0),
    }
}

struct Running {
    tx: mpsc::Sender<Command>,
    report: Arc<Mutex<AgentReport>>,
    task: tokio::task::JoinHandle<AgentReport>,
}

async fn echo_all(agents: &[Running], round: &str, say: &dyn Fn(String)) -> (u64, u64) {
    let mut ok = 0;
    let mut failed = 0;
    for (i, a) in agents.iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        let payload = format!("{round}-{i}").into_bytes();
        let sent = a.tx.send(Command::Echo(payload, tx)).await.is_ok();
        match (
            sent,
            tokio::time::timeout(Duration::from_secs(10), rx).await,
        ) {
            (true, Ok(Ok(Ok(_)))) => ok += 1,
            _ => failed += 1,
        }
    }
    say(format!("  echo after {round}: {ok} ok, {failed} failed"));
    (ok, failed)
}

fn resumes(agents: &[Running]) -> u64 {
    agents
        .iter()
        .map(|a| {
            a.report
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .resumes_ok
        })
        .sum()
}

/// Runs the demo; `Ok(false)` when an invariant failed.
pub async fn run(opts: DemoOptions) -> Result<bool> {
    let started = Instant::now();
    let quiet = opts.json;
    let say = move |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let exe = std::env::current_exe()?;
    let launcher = Launcher::resolve(&exe);
    let pki = TestPki::new(&["g1"])?;
    let dir = tempfile::tempdir()?;
    say("Jumping VPN demo: single-node topology (agent → gateway), real TLS 1.3".into());
    let mut gw = LocalGateway::start(&launcher, &pki, dir.path(), &GatewayOptions::default())
        .await
        .context("starting the gateway")?;
    say(format!(
        "  gateway g1 listening on {} (admin {})",
        gw.client_addr, gw.admin_addr
    ));
    let proxy = FaultProxy::start(gw.client_addr).await?;
    say(format!("  fault proxy on {} in front of it", proxy.addr));

    let mut agents = Vec::new();
    for i in 0..opts.agents {
        let agent = harness::agent(&pki, proxy.addr, Some(harness::source_ip(i)))?;
        let (tx, rx) = mpsc::channel(8);
        let report = Arc::new(Mutex::new(AgentReport::default()));
        let task = tokio::spawn(keep_alive(agent, rx, None, report.clone()));
        agents.push(Running { tx, report, task });
    }
    harness::eventually(Duration::from_secs(20), "all sessions established", || {
        let n = agents
            .iter()
            .filter(|a| {
                a.report
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .sessions_established
                    > 0
            })
            .count();
        async move { n == opts.agents }
    })
    .await?;
    say(format!(
        "  {} agents attached, each from its own 127.0.x.y source",
        opts.agents
    ));
    let (mut echo_ok, mut echo_failed) = echo_all(&agents, "handshake", &say).await;

    // The policy's cooldown (1500 ms) spaces the jumps; agents pace themselves.
    let rounds: [(&str, u64); 3] = [
        ("agent-side jump", 1),
        ("network cut", 2),
        ("half-open stall", 3),
    ];
    for (name, round) in rounds {
        let before = resumes(&agents);
        match round {
            1 => {
                for a in &agents {
                    a.tx.send(Command::Jump).await?;
                }
            }
            2 => {
                let n = proxy.cut_all();
                say(format!("  cut {n} connections at the proxy"));
            }
            _ => {
                let n = proxy.stall_all();
                say(format!(
                    "  stalled {n} connections at the proxy (both ends still open)"
                ));
                for a in &agents {
                    a.tx.send(Command::StallAndJump).await?;
                }
            }
        }
        let want = before + opts.agents as u64;
        harness::eventually(Duration::from_secs(30), "every session reattached", || {
            let n = resumes(&agents);
            async move { n >= want }
        })
        .await?;
        say(format!(
            "  round {round} ({name}): all {} sessions reattached",
            opts.agents
        ));
        let (o, f) = echo_all(&agents, name, &say).await;
        echo_ok += o;
        echo_failed += f;
    }

    let mut reports = Vec::new();
    for a in agents {
        let _ = a.tx.send(Command::Close).await;
        reports.push(a.task.await?);
    }
    gw.signal(Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(40), gw.wait()).await??;
    let mut inv = invariants::from_agents(&reports);
    let (dual, events_checked) = invariants::dual_active(&[std::path::Path::new(&gw.events_path)]);
    inv.dual_active_detected = dual;
    let summary = DemoSummary {
        topology: "single_node",
        agents: opts.agents,
        sessions_established: reports.iter().map(|r| r.sessions_established).sum(),
        resumes_ok: reports.iter().map(|r| r.resumes_ok).sum(),
        resumes_rejected: invariants::rejected_by_reason(&reports),
        rehandshakes: reports.iter().map(|r| r.rehandshakes).sum(),
        echo_ok,
        echo_failed,
        recovery_ms: percentiles(reports.iter().flat_map(|r| r.recovery_ms.clone()).collect()),
        invariants: inv.clone(),
        gateway_exit_code: status.code(),
        events_checked,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!();
        println!("summary");
        println!("  sessions established   {}", summary.sessions_established);
        println!("  resumes ok             {}", summary.resumes_ok);
        println!("  resumes rejected       {:?}", summary.resumes_rejected);
        println!("  re-handshakes          {}", summary.rehandshakes);
        println!(
            "  echo ok / failed       {} / {}",
            summary.echo_ok, summary.echo_failed
        );
        let r = &summary.recovery_ms;
        println!("  recovery ms p50/p99/max {}/{}/{}", r.p50, r.p99, r.max);
        println!("  silent migrations      {}", inv.silent_migrations);
        println!("  forced re-handshakes   {}", inv.forced_rehandshakes);
        println!("  dual active detected   {}", inv.dual_active_detected);
        println!("  lost sessions          {}", inv.lost_sessions);
        println!(
            "  gateway exit code      {:?} (drained on SIGTERM)",
            status.code()
        );
    }
    Ok(inv.all_zero() && summary.echo_failed == 0 && status.success())
}
