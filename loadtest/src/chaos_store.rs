//! `jvpn-loadtest chaos-store`: topology 3 under a seeded fault schedule
//! (issue 16), judged by a checker that trusts no gateway.
//!
//! One run: a real etcd cluster of 3 members, one router with takeover,
//! gateways with `[store]`, each in a network namespace of its own (so
//! iptables can cut one of them from etcd), and agents that keep
//! resuming, exchanging a frame and jumping to a new transport. Each seed
//! draws two overlapping faults from: SIGKILL a gateway (restarted as a
//! new incarnation), SIGSTOP a gateway, SIGKILL an etcd member
//! (restarted), SIGSTOP an etcd member, cut a gateway from etcd. After
//! each seed everything is healed and the cluster must place on every
//! gateway again.
//!
//! Then [`check`] reads every gateway process's event file (state changes
//! to `attached`, and `SessionAnswered`: what an agent is told, written
//! after every check) and every answer the agents accepted, and reports a
//! violation for:
//! - two owners (node, incarnation) for one session at one owner epoch
//!   (in the engines, in the answers, or in what the agents were told);
//! - an answer at an owner epoch below one already answered for that
//!   session (a stale owner serving after a takeover);
//! - an agent told an owner for (session, epoch) that no answer event
//!   shows;
//! - an agent refusing an answer (another owner than its session's, a
//!   lower epoch, a bad proof): a silent migration attempt.
//!
//! Safety only: how many sessions had to re-handshake is reported, not
//! judged (a fault schedule can end sessions explicitly, by design).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jvpn_agent::{Agent, AgentError};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::bench_takeover::resume_until_attached;
use crate::cluster::{ClusterOptions, HUB_IP, LocalCluster, node_name};
use crate::etcd::EtcdCluster;
use crate::harness::{self, Launcher};

#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub first_seed: u64,
    pub seeds: u64,
    /// Agents (one session each) resuming throughout.
    pub sessions: usize,
    pub gateways: usize,
    /// Keep the cluster's configs, logs and event files here.
    pub keep: Option<std::path::PathBuf>,
}

/// One fault of a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL gateway `i`; healed by starting it again (a new incarnation).
    KillGateway(usize),
    /// SIGSTOP gateway `i`; healed by SIGCONT.
    PauseGateway(usize),
    /// SIGKILL etcd member `i`; healed by starting it on its data.
    KillEtcd(usize),
    /// SIGSTOP etcd member `i`; healed by SIGCONT.
    PauseEtcd(usize),
    /// iptables in gateway `i`'s namespace drops its packets to etcd.
    CutGateway(usize),
}

impl Fault {
    pub fn kind(self) -> &'static str {
        match self {
            Fault::KillGateway(_) => "kill_gateway",
            Fault::PauseGateway(_) => "pause_gateway",
            Fault::KillEtcd(_) => "kill_etcd",
            Fault::PauseEtcd(_) => "pause_etcd",
            Fault::CutGateway(_) => "cut_gateway_from_etcd",
        }
    }

    /// What it acts on: faults on one target never overlap.
    fn target(self) -> (bool, usize) {
        match self {
            Fault::KillGateway(i) | Fault::PauseGateway(i) | Fault::CutGateway(i) => (true, i),
            Fault::KillEtcd(i) | Fault::PauseEtcd(i) => (false, i),
        }
    }
}

/// A fault, when it starts after the seed's start and how long it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    pub start_ms: u64,
    pub hold_ms: u64,
}

/// Faults per seed, overlapping in time.
const FAULTS_PER_SEED: usize = 2;

/// The schedule of `seed`: the same seed always gives the same steps.
/// Holds reach 2.25 × the lease TTL (2 s), so pauses and cuts both
/// shorter and longer than the lease happen.
pub fn schedule(seed: u64, gateways: usize, members: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps: Vec<Step> = Vec::with_capacity(FAULTS_PER_SEED);
    while steps.len() < FAULTS_PER_SEED {
        let g = rng.random_range(0..gateways);
        let m = rng.random_range(0..members);
        let fault = match rng.random_range(0..5) {
            0 => Fault::KillGateway(g),
            1 => Fault::PauseGateway(g),
            2 => Fault::KillEtcd(m),
            3 => Fault::PauseEtcd(m),
            _ => Fault::CutGateway(g),
        };
        if steps.iter().any(|s| s.fault.target() == fault.target()) {
            continue;
        }
        steps.push(Step {
            fault,
            start_ms: rng.random_range(0..1_000),
            hold_ms: rng.random_range(300..4_500),
        });
    }
    steps
}

/// What an agent was told by a `HelloOk` or `ResumeOk` it accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub session: String,
    /// `node/incarnation` (incarnation as the events write it).
    pub owner: String,
    pub owner_epoch: u64,
}

/// What a gateway's event says it did with a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Did {
    /// `birth → attached`: a new owner (a HELLO, or a takeover).
    Born,
    /// `→ attached` from another state (a RESUME), in the engine: the
    /// store may still refuse it, and then nothing is answered.
    Attached,
    /// `SessionAnswered`: the agent is told (every check passed).
    Answered,
}

/// One event of one gateway process about one session's ownership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub session: String,
    /// `node/incarnation`.
    pub owner: String,
    pub owner_epoch: u64,
    pub did: Did,
    /// Host monotonic time: one clock for every process on the machine.
    pub at_ns: u64,
}

/// Parses the ownership events of an event file: state changes to
/// `attached` and answers.
pub fn accepted_in(text: &str) -> Vec<Accepted> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let did = match (v["event_type"].as_str(), v["to"].as_str()) {
            (Some("SessionStateChange"), Some("attached")) if v["from"] == "birth" => Did::Born,
            (Some("SessionStateChange"), Some("attached")) => Did::Attached,
            (Some("SessionAnswered"), _) => Did::Answered,
            _ => continue,
        };
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        out.push(Accepted {
            session: s("session_id"),
            owner: format!("{}/{}", s("node_id"), s("incarnation")),
            owner_epoch: v["owner_epoch"].as_u64().unwrap_or(0),
            did,
            at_ns: v["host_mono_ns"].as_u64().unwrap_or(0),
        });
    }
    out
}

/// The checker's verdict.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// State changes to `attached` read from events.
    pub accepted_events: usize,
    /// `SessionAnswered` events (what agents were told) read.
    pub answered_events: usize,
    /// Births at an owner epoch above 1 (takeovers).
    pub takeover_births: usize,
    /// Answers the agents accepted.
    pub agent_answers: usize,
    /// Agent answers with no answer event for their (session, epoch):
    /// events the SIGKILLed processes had not written yet. Not a violation.
    pub agent_answers_without_event: usize,
    pub violations: Vec<String>,
}

/// `(session, epoch) → owners` over the events `keep` selects.
fn owners_by_epoch(
    events: &[Accepted],
    keep: impl Fn(&Accepted) -> bool,
) -> BTreeMap<(&str, u64), BTreeSet<&str>> {
    let mut owners: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for a in events.iter().filter(|a| keep(a)) {
        owners
            .entry((&a.session, a.owner_epoch))
            .or_default()
            .insert(&a.owner);
    }
    owners
}

/// Checks the invariants over `events` (every gateway process's ownership
/// events), `seen` (every answer agents accepted) and `refused` (answers
/// agents refused, as text):
/// - one owner per (session, epoch), in the engines' acceptances, in the
///   answers, and in what agents were told;
/// - per session, in time, answered epochs never go down: nobody answers
///   at an epoch below one already answered (a stale owner serving after
///   a takeover);
/// - agents were told only what an answer event shows;
/// - no agent refused an answer.
pub fn check(events: &[Accepted], seen: &[Seen], refused: &[String]) -> Verdict {
    let answers: Vec<&Accepted> = events.iter().filter(|a| a.did == Did::Answered).collect();
    let mut v = Verdict {
        accepted_events: events.len() - answers.len(),
        answered_events: answers.len(),
        takeover_births: events
            .iter()
            .filter(|a| a.did == Did::Born && a.owner_epoch > 1)
            .count(),
        agent_answers: seen.len(),
        ..Verdict::default()
    };
    for a in events.iter().filter(|a| a.owner_epoch == 0) {
        v.violations
            .push(format!("session {} without an owner epoch", a.session));
    }
    for ((s, e), o) in owners_by_epoch(events, |a| a.did != Did::Answered) {
        if o.len() > 1 {
            v.violations
                .push(format!("session {s} epoch {e} accepted by {o:?}"));
        }
    }
    let answered = owners_by_epoch(events, |a| a.did == Did::Answered);
    for ((s, e), o) in &answered {
        if o.len() > 1 {
            v.violations
                .push(format!("session {s} epoch {e} answered by {o:?}"));
        }
    }
    // Answers per session in time order: the epoch never goes down.
    let mut by_session: BTreeMap<&str, Vec<&Accepted>> = BTreeMap::new();
    for a in &answers {
        by_session.entry(&a.session).or_default().push(a);
    }
    for (s, mut list) in by_session {
        list.sort_by_key(|a| a.at_ns);
        let mut top: Option<&Accepted> = None;
        for a in list {
            match top {
                Some(t) if a.owner_epoch < t.owner_epoch => v.violations.push(format!(
                    "session {s}: {} answered at epoch {} after {} at epoch {}",
                    a.owner, a.owner_epoch, t.owner, t.owner_epoch
                )),
                Some(t) if a.owner_epoch == t.owner_epoch => {}
                _ => top = Some(a),
            }
        }
    }
    // What agents were told, against itself and against the answers.
    let mut told: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for s in seen {
        told.entry((&s.session, s.owner_epoch))
            .or_default()
            .insert(&s.owner);
    }
    for ((s, e), o) in &told {
        if o.len() > 1 {
            v.violations
                .push(format!("session {s} epoch {e}: agents told {o:?}"));
        }
        match answered.get(&(*s, *e)) {
            None => v.agent_answers_without_event += 1,
            Some(ev) if !o.is_subset(ev) => v.violations.push(format!(
                "session {s} epoch {e}: agents told {o:?}, answers say {ev:?}"
            )),
            Some(_) => {}
        }
    }
    for r in refused {
        v.violations
            .push(format!("an agent refused an answer: {r}"));
    }
    v
}

/// What one run did and what the checker found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChaosReport {
    pub first_seed: u64,
    pub seeds: u64,
    pub sessions: usize,
    pub gateways: usize,
    /// Faults applied, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Gateway processes started again after their SIGKILL.
    pub gateway_restarts: u64,
    /// Gateway processes that exited on their own (then started again).
    pub gateway_exits: u64,
    pub hellos: u64,
    pub resumes: u64,
    /// Answers from a new owner the agents accepted (explicit migrations).
    pub migrations: u64,
    /// Sessions ended explicitly (the agent was told), by reason.
    pub sessions_ended: BTreeMap<String, u64>,
    /// Claims by result, summed over the gateway processes alive at the
    /// end (a killed process's counts died with it).
    pub claims_at_end: BTreeMap<String, u64>,
    /// Events the gateway processes dropped (a full sink queue), each
    /// read just before its SIGKILL or at the end: not 0 would leave the
    /// checker blind to some of what happened. `None` (JSON `null`): some
    /// process's count could not be read (a scrape failed, or it exited
    /// by itself), so nobody knows.
    pub events_dropped: Option<u64>,
    /// Seeds whose faults were applied, healed and recovered from.
    pub seeds_completed: u64,
    /// A seed after which the cluster did not recover (the run stopped
    /// there; the verdict covers everything up to it). `None`: none.
    pub recovery_failure: Option<String>,
    pub verdict: Verdict,
    pub seconds: f64,
    /// Wall time of one seed (faults, heals, recovery): mean and max.
    pub seed_seconds_mean: f64,
    pub seed_seconds_max: f64,
}

impl ChaosReport {
    /// Every seed ran and recovered, and the checker, missing no event,
    /// found nothing.
    pub fn passed(&self) -> bool {
        self.recovery_failure.is_none()
            && self.seeds_completed == self.seeds
            && self.verdict.violations.is_empty()
            // A checker that missed events could not see every violation.
            && self.events_dropped == Some(0)
    }
}

/// What one agent did.
#[derive(Default)]
struct Tally {
    seen: Vec<Seen>,
    refused: Vec<String>,
    hellos: u64,
    resumes: u64,
    migrations: u64,
    ended: BTreeMap<String, u64>,
}

impl Tally {
    fn saw(&mut self, a: &Agent) {
        if let Some(s) = &a.session {
            self.seen.push(Seen {
                session: s.id.to_string(),
                owner: format!("{}/{:016x}", s.node_id, s.incarnation),
                owner_epoch: s.owner_epoch,
            });
        }
    }

    /// Sorts an error: the session ended (counted), an answer refused (a
    /// violation), or a transient failure (retried).
    fn failed(&mut self, a: &mut Agent, e: &AgentError) {
        match e {
            AgentError::OwnerMismatch { .. } | AgentError::Protocol(_) => {
                self.refused.push(e.to_string());
                a.session = None;
            }
            _ if e.session_gone() => {
                let why = match e {
                    AgentError::Rejected { reason, .. } | AgentError::Terminated(reason) => {
                        reason.as_str().to_owned()
                    }
                    other => other.to_string(),
                };
                *self.ended.entry(why).or_default() += 1;
                a.session = None;
            }
            _ => {}
        }
    }
}

/// One agent: HELLO once (and again only after its session ended), then
/// RESUME, one frame, a short hold, a new transport, until `stop`.
async fn drive(mut a: Agent, seed: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let got = if a.session.is_none() {
            tokio::time::timeout(Duration::from_secs(5), a.hello())
                .await
                .map(|r| r.inspect(|_| t.hellos += 1))
        } else {
            tokio::time::timeout(
                Duration::from_secs(8),
                resume_until_attached(&mut a, Duration::from_secs(4)),
            )
            .await
            .map(|r| r.inspect(|_| t.resumes += 1))
        };
        match got {
            Ok(Ok(mut tr)) => {
                if a.take_migration().is_some() {
                    t.migrations += 1;
                }
                t.saw(&a);
                let _ = tokio::time::timeout(Duration::from_secs(1), tr.echo(b"chaos")).await;
                let hold = rng.random_range(50..400);
                tokio::time::sleep(Duration::from_millis(hold)).await;
            }
            Ok(Err(e)) => {
                t.failed(&mut a, &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    t
}

/// Applies (`on`) or heals (`!on`) one fault.
async fn act(c: &mut LocalCluster, etcd: &mut EtcdCluster, f: Fault, on: bool) -> Result<()> {
    match (f, on) {
        (Fault::KillGateway(i), true) => c.gateway(&node_name(i))?.signal(Signal::SIGKILL),
        (Fault::KillGateway(i), false) => c.start_gateway(&node_name(i)).await.map(drop),
        (Fault::PauseGateway(i), _) => {
            c.gateway(&node_name(i))?
                .signal(if on { Signal::SIGSTOP } else { Signal::SIGCONT })
        }
        (Fault::KillEtcd(i), true) => etcd.kill(i).await,
        (Fault::KillEtcd(i), false) => etcd.restart(i),
        (Fault::PauseEtcd(i), _) => {
            etcd.signal(i, if on { Signal::SIGSTOP } else { Signal::SIGCONT })
        }
        (Fault::CutGateway(i), true) => {
            let net = c.nets.get(&node_name(i)).context("no namespace")?;
            for p in etcd.client_ports() {
                net.drop_outgoing_to(p)?;
            }
            Ok(())
        }
        (Fault::CutGateway(i), false) => c.nets.get(&node_name(i)).context("no namespace")?.heal(),
    }
}

/// Runs one seed's schedule: faults applied and healed in time order.
async fn run_seed(
    c: &mut LocalCluster,
    etcd: &mut EtcdCluster,
    steps: &[Step],
    report: &mut ChaosReport,
) -> Result<()> {
    let mut timeline: Vec<(u64, bool, Fault)> = Vec::new();
    for s in steps {
        timeline.push((s.start_ms, true, s.fault));
        timeline.push((s.start_ms + s.hold_ms, false, s.fault));
    }
    timeline.sort_by_key(|(t, _, _)| *t);
    let start = tokio::time::Instant::now();
    for (at, on, f) in timeline {
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        if let (Fault::KillGateway(i), true) = (f, on) {
            // Its count dies with it: read it first.
            let g = c.gateway(&node_name(i))?;
            let n = tokio::time::timeout(Duration::from_secs(2), dropped_events(g)).await;
            count_dropped(report, n.ok().flatten());
        }
        act(c, etcd, f, on)
            .await
            .with_context(|| format!("{} {}", if on { "apply" } else { "heal" }, f.kind()))?;
        if on {
            *report.faults.entry(f.kind()).or_default() += 1;
        } else if matches!(f, Fault::KillGateway(_)) {
            report.gateway_restarts += 1;
        }
    }
    Ok(())
}

/// After a seed: etcd answers through every member, every gateway
/// process runs (one that exited is started again, counted) and the
/// router places on all of them.
async fn recover(c: &mut LocalCluster, etcd: &EtcdCluster, report: &mut ChaosReport) -> Result<()> {
    etcd.wait_ready(Duration::from_secs(30)).await?;
    let nodes: Vec<String> = (0..c.opts.gateways).map(node_name).collect();
    for n in &nodes {
        if c.gateway_mut(n)?.exited()? {
            report.gateway_exits += 1;
            // Its dropped events died with it, unread.
            count_dropped(report, None);
            c.start_gateway(n).await?;
        }
    }
    c.wait_placeable(&nodes, Duration::from_secs(30)).await
}

/// The cluster of a run: gateways in namespaces of their own, reaching
/// etcd at their hub address.
async fn cluster(
    etcd: &EtcdCluster,
    gateway: Launcher,
    router: Launcher,
    opts: &ChaosOptions,
) -> Result<LocalCluster> {
    LocalCluster::start(
        gateway,
        router,
        ClusterOptions {
            gateways: opts.gateways,
            dir: opts.keep.clone(),
            routers: 1,
            spare_gateways: 0,
            // Agents jump every few hundred ms: more RESUMEs, more checks.
            gateway_extra_toml: format!(
                "{}{}[policy]\nswitch_cooldown_ms = 1\nmax_switches_per_min = 1000\n",
                crate::streamload::LOOPBACK_EGRESS,
                etcd.gateway_toml_via(HUB_IP)
            ),
            // Gateways here flap every few seconds, far more than the
            // router's flap hold-down (2 s doubling to 60 s) expects of a
            // production gateway; capped, so each seed starts whole.
            router_env: vec![
                ("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into()),
                (
                    "JVPN_ROUTER__MEMBERSHIP__HOLD_DOWN_BASE_MS".into(),
                    "500".into(),
                ),
                (
                    "JVPN_ROUTER__MEMBERSHIP__HOLD_DOWN_MAX_MS".into(),
                    "2000".into(),
                ),
            ],
            netns: true,
            ..ClusterOptions::default()
        },
    )
    .await
}

/// Hub addresses of the namespaces gateways `0..n` get ([`crate::netns`]).
fn hub_ips(n: usize) -> Result<Vec<std::net::IpAddr>> {
    (1..=n)
        .map(|i| {
            let i = u8::try_from(i).context("too many gateways")?;
            Ok(std::net::IpAddr::from([10, 77, i, 1]))
        })
        .collect()
}

/// Runs the schedule of every seed; the caller must be in a private
/// network namespace ([`crate::netns::enter_private_namespace`]). A seed
/// the cluster does not recover from ends the run with a report that
/// says so ([`ChaosReport::recovery_failure`]); [`ChaosReport::passed`].
pub async fn run(opts: ChaosOptions, gateway: Launcher, router: Launcher) -> Result<ChaosReport> {
    if opts.gateways < 2 {
        bail!("--gateways must be at least 2 (one fails, one takes over)");
    }
    let began = Instant::now();
    let _ = crate::bench::raise_nofile();
    let mut etcd = EtcdCluster::start_reachable(3, &hub_ips(opts.gateways)?).await?;
    let mut c = cluster(&etcd, gateway, router, &opts).await?;
    let router_addr = c.routers[0].client_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::with_capacity(opts.sessions);
    for i in 0..opts.sessions {
        let a = harness::agent(&c.pki, router_addr, None)?;
        let seed = opts
            .first_seed
            .wrapping_mul(1_000_003)
            .wrapping_add(i as u64);
        agents.push(tokio::spawn(drive(a, seed, stop.clone())));
    }
    let mut report = ChaosReport {
        first_seed: opts.first_seed,
        seeds: opts.seeds,
        sessions: opts.sessions,
        gateways: opts.gateways,
        events_dropped: Some(0),
        ..ChaosReport::default()
    };
    let mut failure = None;
    let mut took = Vec::new();
    for seed in opts.first_seed..opts.first_seed + opts.seeds {
        let steps = schedule(seed, opts.gateways, 3);
        let t0 = Instant::now();
        let r = async {
            run_seed(&mut c, &mut etcd, &steps, &mut report).await?;
            recover(&mut c, &etcd, &mut report).await
        }
        .await;
        if let Err(e) = r {
            failure = Some(e.context(format!("seed {seed} ({steps:?})")));
            break;
        }
        took.push(t0.elapsed().as_secs_f64());
        report.seeds_completed += 1;
    }
    report.seed_seconds_mean = took.iter().sum::<f64>() / took.len().max(1) as f64;
    report.seed_seconds_max = took.iter().copied().fold(0.0, f64::max);
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    let mut refused = Vec::new();
    for a in agents {
        let t = a.await?;
        seen.extend(t.seen);
        refused.extend(t.refused);
        report.hellos += t.hellos;
        report.resumes += t.resumes;
        report.migrations += t.migrations;
        for (k, n) in t.ended {
            *report.sessions_ended.entry(k).or_default() += n;
        }
    }
    if let Some(e) = failure {
        // The logs say why; the verdict still covers what ran.
        eprintln!("{:#}\n{}", e, c.logs());
        report.recovery_failure = Some(format!("{e:#}"));
    }
    for i in 0..c.gateways.len() {
        // A process started again later was read before its SIGKILL, or
        // counted unknown when found exited by itself.
        let node = &c.gateways[i].0;
        if c.gateways[i + 1..].iter().any(|(n, _)| n == node) {
            continue;
        }
        let (_, g) = &mut c.gateways[i];
        if g.exited()? {
            // Exited by itself since the last recovery: its count is gone.
            count_dropped(&mut report, None);
            continue;
        }
        let text = g.metrics().await.unwrap_or_default();
        for (result, n) in claims_by_result(&text) {
            *report.claims_at_end.entry(result).or_default() += n;
        }
        count_dropped(&mut report, dropped_events(g).await);
    }
    // A clean stop writes out every event still queued.
    for (_, g) in &mut c.gateways {
        if !g.exited()? {
            g.signal(Signal::SIGTERM)?;
            let _ = tokio::time::timeout(Duration::from_secs(10), g.wait()).await;
        }
    }
    let mut events = Vec::new();
    for (_, g) in &c.gateways {
        events.extend(accepted_in(&read_or_empty(Path::new(&g.events_path))));
    }
    report.verdict = check(&events, &seen, &refused);
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

/// The events a gateway process dropped so far; `None` if not read.
async fn dropped_events(g: &harness::LocalGateway) -> Option<u64> {
    g.metric("jvpn_gateway_events_dropped_total", &[])
        .await
        .ok()
        .map(|n| n as u64)
}

/// Adds one process's dropped events; one unknown makes the sum unknown.
fn count_dropped(report: &mut ChaosReport, n: Option<u64>) {
    report.events_dropped = report.events_dropped.zip(n).map(|(a, b)| a + b);
}

/// `jvpn_gateway_store_claims_total{result="…"} n` samples.
fn claims_by_result(metrics: &str) -> Vec<(String, u64)> {
    let head = "jvpn_gateway_store_claims_total{";
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(head))
        .filter_map(|rest| {
            let (labels, n) = rest.rsplit_once(' ')?;
            let result = labels.split("result=\"").nth(1)?.split('"').next()?;
            Some((result.to_owned(), n.parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn read_or_empty(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(session: &str, owner: &str, epoch: u64, did: Did, at_ns: u64) -> Accepted {
        Accepted {
            session: session.into(),
            owner: owner.into(),
            owner_epoch: epoch,
            did,
            at_ns,
        }
    }

    fn seen(session: &str, owner: &str, epoch: u64) -> Seen {
        Seen {
            session: session.into(),
            owner: owner.into(),
            owner_epoch: epoch,
        }
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        use Did::*;
        let h = [
            ev("s1", "g1/01", 1, Born, 10),
            ev("s1", "g1/01", 1, Answered, 11),
            ev("s1", "g1/01", 1, Attached, 20),
            ev("s1", "g1/01", 1, Answered, 21),
            ev("s1", "g2/01", 2, Born, 30),
            ev("s1", "g2/01", 2, Answered, 31),
            // A stale owner's engine accepting after the takeover, refused
            // by the store and never answered: not judged.
            ev("s1", "g1/01", 1, Attached, 35),
            ev("s1", "g1/02", 3, Born, 40),
            ev("s1", "g1/02", 3, Answered, 41),
        ];
        let v = check(&h, &[seen("s1", "g1/01", 1), seen("s1", "g2/01", 2)], &[]);
        assert_eq!(v.violations, Vec::<String>::new());
        assert_eq!(
            (v.accepted_events, v.answered_events, v.takeover_births),
            (5, 4, 2)
        );
        assert_eq!(v.agent_answers_without_event, 0);
    }

    #[test]
    fn two_owners_at_one_epoch_are_a_violation() {
        use Did::*;
        let h = [
            ev("s1", "g1/01", 1, Born, 10),
            ev("s1", "g2/01", 2, Born, 30),
            ev("s1", "g3/01", 2, Born, 31),
        ];
        let v = check(&h, &[], &[]);
        assert!(
            v.violations
                .iter()
                .any(|m| m.contains("epoch 2 accepted by {\"g2/01\", \"g3/01\"}")),
            "{v:?}"
        );
        let h = [
            ev("s1", "g2/01", 2, Answered, 30),
            ev("s1", "g3/01", 2, Answered, 31),
        ];
        let v = check(&h, &[], &[]);
        assert!(v.violations[0].contains("answered by"), "{v:?}");
    }

    /// The double owner fencing exists to prevent: the old owner answers
    /// at its epoch after the taker answered at the next one.
    #[test]
    fn a_stale_owner_answering_after_a_takeover_is_a_violation() {
        use Did::*;
        let h = [
            ev("s1", "g1/01", 1, Answered, 10),
            ev("s1", "g2/01", 2, Answered, 30),
            ev("s1", "g1/01", 1, Answered, 40),
        ];
        let v = check(&h, &[], &[]);
        assert_eq!(v.violations.len(), 1, "{v:?}");
        assert!(
            v.violations[0].contains("g1/01 answered at epoch 1 after g2/01 at epoch 2"),
            "{v:?}"
        );
        // Before the taker answered, the old owner's answers are fine.
        let v = check(&h[..2], &[], &[]);
        assert!(v.violations.is_empty(), "{v:?}");
    }

    #[test]
    fn agents_told_another_owner_than_the_answers_is_a_violation() {
        let h = [ev("s1", "g1/01", 1, Did::Answered, 10)];
        let v = check(&h, &[seen("s1", "g2/01", 1)], &[]);
        assert_eq!(v.violations.len(), 1, "{v:?}");
        let v = check(&[], &[seen("s1", "g1/01", 2), seen("s1", "g2/01", 2)], &[]);
        assert!(v.violations[0].contains("agents told"), "{v:?}");
        // An answer whose event a SIGKILL lost is counted, not judged.
        let v = check(&[], &[seen("s1", "g1/01", 2)], &[]);
        assert!(v.violations.is_empty());
        assert_eq!(v.agent_answers_without_event, 1);
    }

    #[test]
    fn a_refused_answer_is_a_violation() {
        let v = check(&[], &[], &["ResumeOk from g2/01".into()]);
        assert_eq!(v.violations.len(), 1);
    }

    #[test]
    fn the_event_file_is_read_for_attachments_and_answers_only() {
        let text = concat!(
            r#"{"event_type":"SessionStateChange","session_id":"ab","node_id":"g1","incarnation":"0000000000000001","from":"birth","to":"attached","owner_epoch":2,"host_mono_ns":5}"#,
            "\n",
            r#"{"event_type":"SessionStateChange","session_id":"ab","node_id":"g1","incarnation":"0000000000000001","from":"attached","to":"volatile","owner_epoch":2,"host_mono_ns":6}"#,
            "\n",
            r#"{"event_type":"SessionAnswered","session_id":"ab","node_id":"g1","incarnation":"0000000000000001","answer":"resume_ok","owner_epoch":2,"host_mono_ns":7}"#,
            "\n",
            r#"{"event_type":"ResumeRefused","session_id":"ab"}"#,
            "\nnot json\n"
        );
        assert_eq!(
            accepted_in(text),
            vec![
                ev("ab", "g1/0000000000000001", 2, Did::Born, 5),
                ev("ab", "g1/0000000000000001", 2, Did::Answered, 7)
            ]
        );
    }

    #[test]
    fn a_seed_always_gives_the_same_schedule_of_faults_on_distinct_targets() {
        for seed in 0..200 {
            let s = schedule(seed, 3, 3);
            assert_eq!(s, schedule(seed, 3, 3));
            assert_eq!(s.len(), FAULTS_PER_SEED);
            assert_ne!(s[0].fault.target(), s[1].fault.target());
        }
        let kinds: BTreeSet<&str> = (0..200)
            .flat_map(|seed| schedule(seed, 3, 3))
            .map(|s| s.fault.kind())
            .collect();
        assert_eq!(kinds.len(), 5, "every kind of fault is drawn");
    }
}
