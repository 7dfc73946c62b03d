//! The cluster quick-start demo: 1 router + 3 gateways as separate
//! processes, agents attached through the router, then in order: every
//! transport jumps (RESUME), a 4th gateway joins (scale-out), the router is
//! killed and restarted, and one gateway is SIGKILLed so that its sessions
//! re-handshake, explicitly, elsewhere. The summary carries the invariant
//! counters of DESIGN §11; the exit code is non-zero when one fails.
//!
//! With `--store etcd` (topology 3) the gateways record their sessions in a
//! real 3-member etcd on loopback and the router routes a dead owner's
//! RESUMEs for takeover: the killed gateway's sessions carry on at a higher
//! owner epoch on takers, each counted by its agent as an explicit
//! migration, with no re-handshake.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jvpn_agent::AgentReport;
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::cluster::{ClusterOptions, LocalCluster, launchers, node_name};
use crate::demo::{DemoOptions, Percentiles, percentiles};
use crate::etcd::EtcdCluster;
use crate::fleet::Fleet;
use crate::harness;
use crate::invariants::{self, Invariants};
use crate::streamload::{LOOPBACK_EGRESS, StreamLoad, StreamStats, echo_destination};

/// Agents that move bytes through their sessions during the demo, one
/// stream each, transfers of this size back to back.
const DATA_AGENTS: usize = 8;
const TRANSFER: usize = 512 * 1024;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterSummary {
    pub topology: &'static str,
    /// `memory` (topology 2) or `etcd` (topology 3).
    pub store: &'static str,
    pub agents: usize,
    pub sessions_established: u64,
    pub resumes_ok: u64,
    pub resumes_rejected: BTreeMap<String, u64>,
    /// Sessions per gateway after the scale-out, before the kill.
    pub sessions_by_gateway: BTreeMap<String, usize>,
    pub killed_gateway: String,
    pub sessions_on_killed_gateway: u64,
    /// Re-handshakes of sessions whose owner was killed (explicit:
    /// `owner_lost`; with the etcd store, 0: they are taken over).
    pub rehandshakes_after_owner_loss: u64,
    /// Sessions carried on by a new owner at a higher owner epoch, each
    /// told to its agent and counted there (topology 3).
    pub explicit_migrations: u64,
    /// Re-handshakes caused by adding the 4th gateway (must be 0).
    pub forced_rehandshakes_on_scale_out: u64,
    /// Re-handshakes caused by restarting the router (must be 0).
    pub rehandshakes_on_router_restart: u64,
    /// From the SIGKILL to each affected session being established again.
    pub failover_ms: Percentiles,
    pub recovery_ms: Percentiles,
    pub echo_ok: u64,
    pub echo_failed: u64,
    #[serde(flatten)]
    pub invariants: Invariants,
    pub routed_to_unplaceable: f64,
    /// Agents moving application bytes through their sessions all along.
    pub data_agents: usize,
    /// Of those, how many the killed gateway owned.
    pub data_agents_on_killed_gateway: usize,
    /// Streams reset although their session neither ended nor moved (a
    /// jump, the scale-out or the router restart broke them): must be 0.
    pub streams_reset_on_live_sessions: u64,
    #[serde(flatten)]
    pub streams: StreamStats,
    pub events_checked: usize,
    pub duration_ms: u64,
}

fn sum(reports: &[AgentReport], f: impl Fn(&AgentReport) -> u64) -> u64 {
    reports.iter().map(f).sum()
}

fn reason_count(reports: &[AgentReport], reason: &str) -> u64 {
    sum(reports, |r| {
        r.rehandshake_reasons.get(reason).copied().unwrap_or(0)
    })
}

/// Runs the cluster demo; `Ok(false)` when an invariant failed.
pub async fn run(opts: DemoOptions) -> Result<bool> {
    let started = Instant::now();
    let quiet = opts.json;
    let say = move |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let exe = std::env::current_exe()?;
    let (gw_launcher, router_launcher) = launchers(&exe);
    let store = opts.etcd_store;
    // Outlives the cluster (declared first, dropped last).
    let etcd = if store {
        say("Jumping VPN demo: shared-store cluster (agents → router → gateways → etcd), real TLS 1.3".into());
        let e = EtcdCluster::start(3).await.context("starting etcd")?;
        say("  etcd: 3 members on loopback, mTLS, data on tmpfs".into());
        Some(e)
    } else {
        say("Jumping VPN demo: sticky cluster (agents → router → gateways), real TLS 1.3".into());
        None
    };
    let mut cluster_opts = ClusterOptions {
        gateway_extra_toml: LOOPBACK_EGRESS.into(),
        ..ClusterOptions::default()
    };
    if let Some(e) = &etcd {
        cluster_opts.gateway_extra_toml.push_str(&e.gateway_toml());
        cluster_opts
            .router_env
            .push(("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into()));
    }
    let mut c = LocalCluster::start(gw_launcher, router_launcher, cluster_opts)
        .await
        .context("starting the cluster")?;
    say(format!(
        "  router r1 on {} (membership {}, admin {}); gateways g1..g3 joined over mTLS heartbeats",
        c.routers[0].client_addr, c.routers[0].membership_addr, c.routers[0].admin_addr
    ));

    // 1. Attach.
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), opts.agents, 0)?;
    fleet.wait_established(Duration::from_secs(60)).await?;
    say(format!(
        "  {} agents attached through the router: {:?}",
        opts.agents,
        fleet.by_node()
    ));

    // Agents with a data plane: streams to a destination behind the
    // gateways, echoed and compared byte for byte, all along.
    let data =
        Fleet::start_with_tunnels(&c.pki, &c.router_addrs(), DATA_AGENTS, 3 * opts.agents + 64)?;
    data.wait_established(Duration::from_secs(60)).await?;
    let load = StreamLoad::start(&data.tunnels(), 1, TRANSFER, echo_destination().await?)?;
    say(format!(
        "  {DATA_AGENTS} more agents move bytes through their sessions (through each agent's SOCKS5 front door to a local server, checked byte for byte)"
    ));

    // 2. Every transport jumps.
    let jumped_at = Instant::now();
    let (a, b) = tokio::join!(
        fleet.jump_all_now(Duration::from_secs(60)),
        data.jump_all_now(Duration::from_secs(60)),
    );
    a?;
    b?;
    load.probe_stalls(None, jumped_at, Duration::from_secs(10))
        .await;
    say(
        "  every agent changed transport: all sessions resumed on their owner, streams going on"
            .into(),
    );

    // 3. Scale-out.
    let rh_before = fleet.rehandshakes();
    c.start_gateway(&node_name(3)).await?;
    let four: Vec<String> = (0..4).map(node_name).collect();
    c.wait_placeable(&four, Duration::from_secs(15)).await?;
    // Enough that the newcomer is all but certain to get some (with 12 of
    // 4 gateways, none on g4 happened 3 % of the time; with 30, 0.02 %).
    let newcomers = Fleet::start(
        &c.pki,
        &c.router_addrs(),
        (opts.agents / 2).max(16),
        opts.agents,
    )?;
    newcomers.wait_established(Duration::from_secs(60)).await?;
    let scale_out_rehandshakes = fleet.rehandshakes() - rh_before;
    say(format!(
        "  g4 joined: existing sessions re-handshaked: {scale_out_rehandshakes}; {} new sessions: {:?}",
        newcomers.len(),
        newcomers.by_node()
    ));

    // 4. Router restart: every spliced connection breaks; sessions resume.
    let rh_before = fleet.rehandshakes() + newcomers.rehandshakes() + data.rehandshakes();
    let (before, newcomers_before, data_before) = (
        fleet.resume_counts(),
        newcomers.resume_counts(),
        data.resume_counts(),
    );
    c.restart_router(0).await?;
    let total = fleet.len() + newcomers.len() + data.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let what = "every session resumed after the router restart";
    for (f, b) in [
        (&fleet, &before),
        (&newcomers, &newcomers_before),
        (&data, &data_before),
    ] {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        f.wait_each_resumed(b, left, what).await?;
    }
    let router_restart_rehandshakes =
        fleet.rehandshakes() + newcomers.rehandshakes() + data.rehandshakes() - rh_before;
    say(format!(
        "  router restarted on the same ports: {total} sessions resumed, {router_restart_rehandshakes} re-handshakes"
    ));

    // 5. Kill the gateway holding the most sessions, once every agent may
    // switch again (agents pace RESUMEs by the policy's cooldown, which
    // would otherwise count into the failover time).
    let cooldown = Duration::from_millis(1_600);
    fleet.wait_switch_allowed(cooldown).await?;
    newcomers.wait_switch_allowed(cooldown).await?;
    data.wait_switch_allowed(cooldown).await?;
    let mut by_node = fleet.by_node();
    for (k, v) in newcomers.by_node().into_iter().chain(data.by_node()) {
        *by_node.entry(k).or_default() += v;
    }
    // The gateway with the most streaming sessions (then the most
    // sessions), so the demo always shows streams ending explicitly.
    let data_by_node = data.by_node();
    let victim = by_node
        .iter()
        .max_by_key(|(k, n)| (data_by_node.get(*k).copied().unwrap_or(0), **n))
        .map(|(k, _)| k.clone())
        .context("no sessions")?;
    let data_on_victim = data_by_node.get(&victim).copied().unwrap_or(0);
    let all = |f: &Fleet, g: &Fleet| {
        let mut v = f.snapshots();
        v.extend(g.snapshots());
        v.extend(data.snapshots());
        v
    };
    let on_victim: Vec<usize> = all(&fleet, &newcomers)
        .iter()
        .enumerate()
        .filter(|(_, r)| r.node_id == victim)
        .map(|(i, _)| i)
        .collect();
    let owner_lost_before = reason_count(&all(&fleet, &newcomers), "owner_lost");
    let migrations = |snaps: &[AgentReport]| sum(snaps, |r| r.explicit_migrations);
    let migrations_before = migrations(&all(&fleet, &newcomers));
    // Its dropped events die with it: read them first (the check below
    // is blind to what any gateway dropped).
    let victim_dropped = c
        .gateway(&victim)?
        .metric("jvpn_gateway_events_dropped_total", &[])
        .await
        .ok();
    let killed_at = Instant::now();
    c.gateway(&victim)?.signal(Signal::SIGKILL)?;
    let died_ns = jvpn_runtime::process::host_monotonic_ns();
    c.wait_not_alive(&victim, Duration::from_secs(10)).await?;
    let detected_ms = killed_at.elapsed().as_millis();
    // Back on another gateway: a new session (sticky), or the same one
    // taken over (store).
    let back = |r: &AgentReport| {
        let at = if store {
            r.attached_at
        } else {
            r.established_at
        };
        at.filter(|t| *t > killed_at && r.node_id != victim)
    };
    harness::eventually(
        Duration::from_secs(60),
        "every session of the killed gateway back on another gateway",
        || {
            let snaps = all(&fleet, &newcomers);
            let done = on_victim.iter().all(|i| back(&snaps[*i]).is_some());
            async move { done }
        },
    )
    .await?;
    let snaps = all(&fleet, &newcomers);
    let failover: Vec<u64> = on_victim
        .iter()
        .filter_map(|i| back(&snaps[*i]))
        .map(|t| t.duration_since(killed_at).as_millis() as u64)
        .collect();
    let rehandshakes_after_owner_loss = reason_count(&snaps, "owner_lost") - owner_lost_before;
    let explicit_migrations = migrations(&snaps) - migrations_before;
    say(format!(
        "  SIGKILL {victim} ({} sessions): not alive after {detected_ms} ms; {}",
        on_victim.len(),
        if store {
            format!(
                "{explicit_migrations} taken over by other gateways (explicit migrations, same sessions)"
            )
        } else {
            "all re-handshaked elsewhere".to_owned()
        }
    ));
    let (echo_ok_1, echo_failed_1) = fleet.echo_all("after-failover").await;
    let (echo_ok_2, echo_failed_2) = newcomers.echo_all("after-failover").await;
    // Streams go on over the new sessions: wait for a few more transfers.
    let done = load.completed();
    harness::eventually(
        Duration::from_secs(30),
        "streams complete again after the failover",
        || {
            let more = load.completed() >= done + DATA_AGENTS as u64;
            async move { more }
        },
    )
    .await?;
    let streams = load.stop().await;
    let routed_to_unplaceable = c
        .router_metric("jvpn_router_routed_to_unplaceable_total", &[])
        .await?;

    // 6. Wind down: close sessions, drain gateways, stop the router.
    let data_agents = data.len();
    let mut reports = fleet.close().await;
    reports.extend(newcomers.close().await);
    let data_reports = data.close().await;
    // A reset is explicit only where its session ended (or moved to a
    // taker): the streams of every other session must go on.
    let streams_reset_on_live_sessions: u64 = streams
        .resets_by_tunnel
        .iter()
        .zip(&data_reports)
        .filter(|(_, r)| r.rehandshake_reasons.is_empty() && r.explicit_migrations == 0)
        .map(|(n, _)| *n)
        .sum();
    reports.extend(data_reports);
    let mut event_files: Vec<(PathBuf, Option<u64>)> = Vec::new();
    // Whether every event of the live gateways reached its file: a
    // dropped one (or a scrape that failed) leaves the check blind.
    let mut all_written = victim_dropped == Some(0.0);
    for (node, gw) in &mut c.gateways {
        if *node == victim {
            event_files.push((PathBuf::from(&gw.events_path), Some(died_ns)));
            continue;
        }
        event_files.push((PathBuf::from(&gw.events_path), None));
        all_written &= gw
            .metric("jvpn_gateway_events_dropped_total", &[])
            .await
            .is_ok_and(|n| n == 0.0);
        gw.signal(Signal::SIGTERM)?;
        let _ = tokio::time::timeout(Duration::from_secs(40), gw.wait()).await;
    }
    let mut inv = invariants::from_agents(&reports);
    let lives: Vec<(&std::path::Path, Option<u64>)> = event_files
        .iter()
        .map(|(p, died)| (p.as_path(), *died))
        .collect();
    let dual = invariants::dual_active_until(&lives);
    let events_checked = dual.events;
    inv.dual_active_detected = dual.violations.filter(|_| all_written && dual.events > 0);
    let summary = ClusterSummary {
        topology: if store {
            "shared_store_cluster"
        } else {
            "sticky_cluster"
        },
        store: if store { "etcd" } else { "memory" },
        agents: reports.len(),
        sessions_established: sum(&reports, |r| r.sessions_established + r.rehandshakes),
        resumes_ok: sum(&reports, |r| r.resumes_ok),
        resumes_rejected: invariants::rejected_by_reason(&reports),
        sessions_by_gateway: by_node,
        killed_gateway: victim,
        sessions_on_killed_gateway: on_victim.len() as u64,
        rehandshakes_after_owner_loss,
        explicit_migrations,
        forced_rehandshakes_on_scale_out: scale_out_rehandshakes,
        rehandshakes_on_router_restart: router_restart_rehandshakes,
        failover_ms: percentiles(failover),
        recovery_ms: percentiles(reports.iter().flat_map(|r| r.recovery_ms.clone()).collect()),
        echo_ok: echo_ok_1 + echo_ok_2,
        echo_failed: echo_failed_1 + echo_failed_2,
        invariants: inv.clone(),
        routed_to_unplaceable,
        data_agents,
        data_agents_on_killed_gateway: data_on_victim,
        streams_reset_on_live_sessions,
        streams: streams.clone(),
        events_checked,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let f = &summary.failover_ms;
        let r = &summary.recovery_ms;
        println!();
        println!("summary");
        println!(
            "  sessions established          {}",
            summary.sessions_established
        );
        println!("  resumes ok                    {}", summary.resumes_ok);
        crate::demo::print_rejections(
            "  resumes rejected              ",
            &summary.resumes_rejected,
        );
        println!(
            "  sessions by gateway           {:?}",
            summary.sessions_by_gateway
        );
        println!(
            "  sessions on killed gateway    {} ({})",
            summary.sessions_on_killed_gateway, summary.killed_gateway
        );
        println!(
            "  re-handshakes after loss      {} (explicit: owner_lost)",
            summary.rehandshakes_after_owner_loss
        );
        println!(
            "  explicit migrations           {} (taken over at a higher owner epoch)",
            summary.explicit_migrations
        );
        println!(
            "  forced re-handshakes          {} ({} on scale-out, {} on router restart)",
            inv.forced_rehandshakes,
            summary.forced_rehandshakes_on_scale_out,
            summary.rehandshakes_on_router_restart
        );
        println!(
            "  failover ms p50/p99/max       {}/{}/{}",
            f.p50, f.p99, f.max
        );
        println!(
            "  recovery ms p50/p99/max       {}/{}/{}",
            r.p50, r.p99, r.max
        );
        println!(
            "  echo ok / failed              {} / {}",
            summary.echo_ok, summary.echo_failed
        );
        println!("  silent migrations             {}", inv.silent_migrations);
        println!("  dual active detected          {}", inv.dual_active_text());
        println!("  lost sessions                 {}", inv.lost_sessions);
        println!(
            "  routed to unplaceable         {}",
            summary.routed_to_unplaceable
        );
        let s = &summary.streams;
        println!(
            "  stream bytes (exact)          {} ({} transfers)",
            s.stream_bytes, s.streams_completed
        );
        println!(
            "  stream bytes lost / dup       {} / {}",
            s.stream_bytes_lost, s.stream_bytes_duplicated
        );
        println!(
            "  streams reset explicitly      {} ({} streaming sessions on the killed gateway)",
            s.streams_reset_explicitly, summary.data_agents_on_killed_gateway
        );
        println!(
            "  streams reset on live sessions {}",
            summary.streams_reset_on_live_sessions
        );
        println!("  streams failed otherwise      {}", s.streams_failed);
        println!(
            "  stall ms per jump p50/p99     {}/{}",
            s.stall_ms_per_jump.p50, s.stall_ms_per_jump.p99
        );
    }
    // A check that could not look is no pass.
    Ok(inv.all_zero()
        && inv.dual_active_detected.is_some()
        && summary.forced_rehandshakes_on_scale_out == 0
        && summary.rehandshakes_on_router_restart == 0
        && summary.echo_failed == 0
        && summary.routed_to_unplaceable == 0.0
        && if store {
            // Every session of the dead owner carried on, none re-made.
            summary.rehandshakes_after_owner_loss == 0
                && summary.explicit_migrations == summary.sessions_on_killed_gateway
        } else {
            summary.rehandshakes_after_owner_loss == summary.sessions_on_killed_gateway
                && summary.explicit_migrations == 0
        }
        && streams.stream_bytes_lost == 0
        && streams.stream_bytes_duplicated == 0
        && streams.streams_failed == 0
        && streams.stream_bytes > 0
        && summary.streams_reset_on_live_sessions == 0
        && (data_on_victim == 0 || streams.streams_reset_explicitly > 0))
}
