//! The quick-start demos. The default one is the cluster
//! ([`crate::demo_cluster`]); `--single-node` runs a real gateway process
//! with a fresh development PKI, real agents over TLS through the fault
//! proxy, three rounds of forced transport jumps (agent-side jump, network
//! cut, half-open stall), echo checks after each, then a drain.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jvpn_agent::Command;
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::faultproxy::FaultProxy;
use crate::fleet::Fleet;
use crate::harness::{GatewayOptions, Launcher, LocalGateway, TestPki};
use crate::invariants::{self, Invariants};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub agents: usize,
    pub json: bool,
    /// The single-node topology instead of the cluster.
    pub single_node: bool,
    /// The cluster with a shared session store on etcd (topology 3).
    pub etcd_store: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples behind the figures: 0 means not measured (the figures then
    /// say nothing, they are not a measured 0).
    pub count: u64,
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

/// The summary's "resumes rejected" line, then why each reason happened.
pub fn print_rejections(label: &str, by_reason: &std::collections::BTreeMap<String, u64>) {
    let total: u64 = by_reason.values().sum();
    if total == 0 {
        println!("{label}0");
        return;
    }
    println!("{label}{total} (expected around the demo's faults; by reason:)");
    for line in crate::invariants::explain_rejections(by_reason) {
        println!("    {line}");
    }
}

pub fn percentiles(mut v: Vec<u64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        count: v.len() as u64,
        p50: at(0.5),
        p99: at(0.99),
        max: *v.last().unwrap_or(&0),
    }
}

/// Runs the demo; `Ok(false)` when an invariant failed.
pub async fn run(opts: DemoOptions) -> Result<bool> {
    if opts.single_node {
        run_single_node(opts).await
    } else {
        crate::demo_cluster::run(opts).await
    }
}

/// The single-node topology: agent → fault proxy → gateway.
async fn run_single_node(opts: DemoOptions) -> Result<bool> {
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

    let fleet = Fleet::start(&pki, &[proxy.addr], opts.agents, 0)?;
    fleet.wait_established(Duration::from_secs(30)).await?;
    say(format!(
        "  {} agents attached, each from its own 127.0.x.y source",
        opts.agents
    ));
    let (mut echo_ok, mut echo_failed) = fleet.echo_all("handshake").await;
    say(format!(
        "  echo after handshake: {echo_ok} ok, {echo_failed} failed"
    ));

    // The policy's cooldown (1500 ms) spaces the jumps; agents pace themselves.
    let rounds: [(&str, u64); 3] = [
        ("agent-side jump", 1),
        ("network cut", 2),
        ("half-open stall", 3),
    ];
    for (name, round) in rounds {
        let before = fleet.resume_counts();
        match round {
            1 => fleet.each(|| Command::Jump).await,
            2 => {
                let n = proxy.cut_all();
                say(format!("  cut {n} connections at the proxy"));
            }
            _ => {
                let n = proxy.stall_all();
                say(format!(
                    "  stalled {n} connections at the proxy (both ends still open)"
                ));
                fleet.each(|| Command::StallAndJump).await;
            }
        }
        fleet
            .wait_each_resumed(&before, Duration::from_secs(30), "every session reattached")
            .await?;
        say(format!(
            "  round {round} ({name}): all {} sessions reattached",
            opts.agents
        ));
        let (o, f) = fleet.echo_all(name).await;
        say(format!("  echo after {name}: {o} ok, {f} failed"));
        echo_ok += o;
        echo_failed += f;
    }

    let reports = fleet.close().await;
    gw.signal(Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(40), gw.wait()).await??;
    let mut inv = invariants::from_agents(&reports);
    let dual = invariants::dual_active(&[std::path::Path::new(&gw.events_path)]);
    let events_checked = dual.events;
    // One gateway process is one incarnation: no session can be attached
    // on two, so the scan could find nothing. Said so, not reported as 0.
    inv.dual_active_detected = None;
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
        print_rejections("  resumes rejected       ", &summary.resumes_rejected);
        println!("  re-handshakes          {}", summary.rehandshakes);
        println!(
            "  echo ok / failed       {} / {}",
            summary.echo_ok, summary.echo_failed
        );
        let r = &summary.recovery_ms;
        println!("  recovery ms p50/p99/max {}/{}/{}", r.p50, r.p99, r.max);
        println!("  silent migrations      {}", inv.silent_migrations);
        println!("  forced re-handshakes   {}", inv.forced_rehandshakes);
        println!("  dual active detected   {}", inv.dual_active_text());
        println!("  lost sessions          {}", inv.lost_sessions);
        println!(
            "  gateway exit code      {:?} (drained on SIGTERM)",
            status.code()
        );
    }
    Ok(inv.all_zero() && summary.echo_failed == 0 && status.success())
}
