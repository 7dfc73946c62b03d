//! Shared setup for the end-to-end tests: a PKI, a temp dir and a gateway process.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jvpn_agent::{Agent, AgentError, AgentReport, Transport};
use jvpn_loadtest::cluster::LocalCluster;
use jvpn_loadtest::faultproxy::FaultProxy;
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::{self, GatewayOptions, Launcher, LocalGateway, TestPki, eventually};
use jvpn_proto::ReasonCode;
use jvpn_proto::preamble::Status;
use jvpn_proto::proxy::ProxyHeader;

pub struct Env {
    pub pki: TestPki,
    pub dir: tempfile::TempDir,
    pub gw: LocalGateway,
}

pub fn launcher() -> Launcher {
    Launcher::for_tests(env!("CARGO_BIN_EXE_jvpn-loadtest"))
}

pub async fn start(extra_toml: &str) -> Env {
    start_with(GatewayOptions {
        extra_toml: extra_toml.into(),
        ..Default::default()
    })
    .await
}

pub async fn start_with(opts: GatewayOptions) -> Env {
    let pki = TestPki::new(&["g1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = LocalGateway::start(&launcher(), &pki, dir.path(), &opts)
        .await
        .unwrap();
    Env { pki, dir, gw }
}

/// Retries while the gateway's admission says `overloaded` (storms in
/// tests), or while a gateway in a cluster does not hold the placing
/// router's lease at that instant (`not_in_cluster`: a heartbeat late on a
/// loaded machine), as the agent's own HELLO does.
pub async fn hello(agent: &mut Agent) -> Transport {
    for _ in 0..50 {
        match agent.hello().await {
            Ok(t) => return t,
            Err(AgentError::Status(s)) if s.status == Status::Overloaded => {
                tokio::time::sleep(Duration::from_millis(u64::from(s.retry_after_ms).max(20)))
                    .await;
            }
            Err(AgentError::Rejected {
                reason: ReasonCode::NotInCluster,
                ..
            }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("hello failed: {e}"),
        }
    }
    panic!("hello kept being refused as overloaded or not in the cluster");
}

/// RESUME after waiting for the agent's own pacing, retrying admission refusals.
pub async fn resume(agent: &mut Agent) -> Result<Transport, AgentError> {
    tokio::time::sleep(agent.switch_allowed_in()).await;
    loop {
        match agent.resume().await {
            Err(AgentError::Status(s)) if s.status == Status::Overloaded => {
                tokio::time::sleep(Duration::from_millis(u64::from(s.retry_after_ms).max(20)))
                    .await;
            }
            other => return other,
        }
    }
}

/// Fast timers so TTL tests finish in seconds.
pub const FAST_POLICY: &str = r#"
[policy]
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 600
volatile_to_degraded_ms = 800
transport_lost_ttl_ms = 1500
switch_cooldown_ms = 300
max_switches_per_min = 3
"#;

/// Liveness timers long enough that transports which send no pings stay
/// ATTACHED however slow the machine is (tests that assert on state).
pub const QUIET_TRANSPORTS: &str =
    "[policy]\nheartbeat_timeout_ms = 60000\ntransport_lost_ttl_ms = 120000\n";

/// Waits until the gateway counted exactly `want` rejections for `reason`
/// (the counter moves just after the connection closes).
pub async fn wait_rejected(env: &Env, reason: &str, want: f64) {
    let what = format!("{want} rejections for {reason}");
    jvpn_loadtest::harness::eventually(Duration::from_secs(5), &what, || async {
        rejected(env, reason).await == want
    })
    .await
    .unwrap();
}

/// Connections the gateway closed before a session, for one reason.
pub async fn rejected(env: &Env, reason: &str) -> f64 {
    env.gw
        .metric(
            "jvpn_gateway_connections_rejected_total",
            &[("reason", reason)],
        )
        .await
        .unwrap()
}

/// A local cluster with the real binaries (multi-call fallback).
pub async fn cluster(
    opts: jvpn_loadtest::cluster::ClusterOptions,
) -> jvpn_loadtest::cluster::LocalCluster {
    let bin = env!("CARGO_BIN_EXE_jvpn-loadtest");
    jvpn_loadtest::cluster::LocalCluster::start(
        Launcher::for_tests(bin),
        Launcher::for_tests_as(bin, jvpn_loadtest::harness::Role::Router),
        opts,
    )
    .await
    .unwrap()
}

/// The bearer token of [`cluster_with_router_token`]'s routers.
#[allow(dead_code)]
pub const ROUTER_TOKEN: &str = "router-operator-token-1";

/// [`cluster`] whose routers take operator actions with [`ROUTER_TOKEN`];
/// the directory holding the token file must outlive the cluster.
#[allow(dead_code)]
pub async fn cluster_with_router_token(
    opts: jvpn_loadtest::cluster::ClusterOptions,
) -> (jvpn_loadtest::cluster::LocalCluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ROUTER_TOKEN}\n")).unwrap();
    let mut router_env = opts.router_env.clone();
    router_env.push((
        "JVPN_ROUTER__ADMIN_TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    let c = cluster(jvpn_loadtest::cluster::ClusterOptions { router_env, ..opts }).await;
    (c, dir)
}

/// Runs this crate's `jvpn-loadtest` binary with `args` and returns its
/// output; fails the test if it takes longer than `within`.
pub async fn loadtest<I, S>(args: I, within: Duration) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    tokio::time::timeout(
        within,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_jvpn-loadtest"))
            .args(args)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("jvpn-loadtest did not finish within {within:?}"))
    .unwrap()
}

/// Runs `jvpn-loadtest args`, fails the test (with its output) unless it
/// exits 0 within `within`, and returns its stdout.
/// `jvpn-loadtest args` that must succeed and print a JSON report (after
/// any log lines): the report.
pub async fn loadtest_json<I, S>(args: I, within: Duration) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let stdout = loadtest_ok(args, within).await;
    let json = &stdout[stdout.find('{').expect("a JSON report")..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

pub async fn loadtest_ok<I, S>(args: I, within: Duration) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = loadtest(args, within).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "jvpn-loadtest failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

// ---- clusters: failures, leases, partitions --------------------------------

/// The agents' switch cooldown in these clusters, plus slack.
pub const COOLDOWN: Duration = Duration::from_millis(1_600);

pub fn victims(before: &[AgentReport], node: &str) -> BTreeSet<usize> {
    before
        .iter()
        .enumerate()
        .filter(|(_, r)| r.node_id == node)
        .map(|(i, _)| i)
        .collect()
}

/// Waits until every agent in `who` runs a new session established after `t0`
/// on another node than `node`.
pub async fn wait_moved(fleet: &Fleet, who: &BTreeSet<usize>, node: &str, t0: Instant) {
    eventually(Duration::from_secs(30), "victims re-established", || {
        let snaps = fleet.snapshots();
        let done = who
            .iter()
            .all(|i| snaps[*i].established_at.is_some_and(|t| t > t0) && snaps[*i].node_id != node);
        async move { done }
    })
    .await
    .unwrap();
}

pub fn assert_survivors_untouched(
    before: &[AgentReport],
    after: &[AgentReport],
    who: &BTreeSet<usize>,
) {
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if who.contains(&i) {
            continue;
        }
        assert_eq!(a.node_id, b.node_id, "survivor {i} moved");
        assert_eq!(a.binding_epoch, b.binding_epoch, "survivor {i} rebound");
        assert_eq!(a.rehandshakes, b.rehandshakes, "survivor {i} re-handshaked");
        assert_eq!(a.sessions_established, b.sessions_established);
    }
}

/// `n` agents attached and past their switch cooldown; their reports, and
/// the indexes of those on `victim`.
pub async fn settled_fleet(
    c: &LocalCluster,
    n: usize,
    victim: &str,
) -> (Fleet, Vec<AgentReport>, BTreeSet<usize>) {
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), n, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(60))
        .await
        .unwrap();
    fleet.wait_switch_allowed(COOLDOWN).await.unwrap();
    let before = fleet.snapshots();
    let who = victims(&before, victim);
    assert!(!who.is_empty(), "{victim} holds no session");
    (fleet, before, who)
}

/// A stand-in for router `router_id`: connects from this host's address
/// towards the gateway (a configured router address) and writes a PROXY header naming that router.
pub async fn as_router(router_id: &str, gateway: std::net::SocketAddr) -> FaultProxy {
    let header = ProxyHeader {
        addresses: Some(("10.9.8.7:5555".parse().unwrap(), gateway)),
        router_id: Some(router_id.into()),
        view_id: None,
        intended_owner: None,
        takeover: false,
    }
    .encode()
    .unwrap();
    FaultProxy::with_prefix(gateway, header).await.unwrap()
}

pub async fn hello_via(
    c: &jvpn_loadtest::cluster::LocalCluster,
    p: &FaultProxy,
) -> Result<String, AgentError> {
    let mut a = harness::agent(&c.pki, p.addr, Some("127.0.0.1".parse().unwrap())).unwrap();
    a.hello().await?;
    Ok(a.session.as_ref().unwrap().node_id.clone())
}

pub fn not_in_cluster(r: Result<String, AgentError>) -> bool {
    matches!(
        r,
        Err(AgentError::Rejected {
            reason: ReasonCode::NotInCluster,
            ..
        })
    )
}

/// A cluster of one router and one gateway (`g1`).
pub async fn one_gateway_cluster() -> LocalCluster {
    cluster(jvpn_loadtest::cluster::ClusterOptions {
        gateways: 1,
        ..jvpn_loadtest::cluster::ClusterOptions::default()
    })
    .await
}

/// Closes the fleet after asserting nothing was ever placed on an
/// unplaceable gateway, and checks the agents' invariant counters.
pub async fn close_clean(c: &LocalCluster, fleet: Fleet) -> Vec<AgentReport> {
    assert_eq!(
        c.router_metric("jvpn_router_routed_to_unplaceable_total", &[])
            .await
            .unwrap(),
        0.0
    );
    let reports = fleet.close().await;
    let inv = jvpn_loadtest::invariants::from_agents(&reports);
    assert!(inv.all_zero(), "{inv:?}");
    reports
}

/// New HELLOs through the cluster's routers from one source address, one
/// every `every`, until stopped.
pub struct HelloLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Placed>>,
}

/// One answered HELLO: who answered, when the agent started it (before
/// connecting) and when it read the `HelloOk`.
#[derive(Debug)]
pub struct Placed {
    pub node: String,
    pub incarnation: u64,
    pub sent: Instant,
    pub read: Instant,
}

impl HelloLoad {
    pub fn start(c: &LocalCluster, source: usize, every: Duration) -> Self {
        let cfg = harness::agent_config(&c.pki, c.router_addrs(), Some(harness::source_ip(source)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut placed = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut a = Agent::new(cfg.clone()).unwrap();
                let sent = Instant::now();
                if a.hello().await.is_ok() {
                    let s = a.session.as_ref().unwrap();
                    placed.push(Placed {
                        node: s.node_id.clone(),
                        incarnation: s.incarnation,
                        sent,
                        read: Instant::now(),
                    });
                }
                tokio::time::sleep(every).await;
            }
            placed
        });
        Self { stop, task }
    }

    /// Stops it: which gateway answered each `HelloOk`, and when it was read.
    pub async fn stop(self) -> Vec<(String, Instant)> {
        let placed = self.stop_placed().await;
        placed.into_iter().map(|p| (p.node, p.read)).collect()
    }

    /// [`HelloLoad::stop`], with the incarnation that answered each.
    pub async fn stop_with_incarnations(self) -> Vec<(String, u64, Instant)> {
        let placed = self.stop_placed().await;
        placed
            .into_iter()
            .map(|p| (p.node, p.incarnation, p.read))
            .collect()
    }

    /// Every answered HELLO, with when it was sent and when read.
    pub async fn stop_placed(self) -> Vec<Placed> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// An agent with its data plane on, kept alive in the background.
pub struct Streaming {
    pub tunnel: jvpn_agent::streams::Tunnel,
    pub cmds: tokio::sync::mpsc::Sender<jvpn_agent::Command>,
    pub report: std::sync::Arc<std::sync::Mutex<AgentReport>>,
    pub task: tokio::task::JoinHandle<AgentReport>,
    /// The agent's state lines so far.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Streaming {
    /// Waits until the agent said something containing `what`.
    pub async fn said(&self, what: &str, within: Duration) {
        harness::eventually(within, what, || {
            let seen = self.lines.lock().unwrap().iter().any(|l| l.contains(what));
            async move { seen }
        })
        .await
        .unwrap();
    }
}

/// Starts [`Streaming`] against `servers` (a gateway, or routers).
pub fn streaming_agent(pki: &TestPki, servers: Vec<std::net::SocketAddr>) -> Streaming {
    let cfg = harness::agent_config(pki, servers, None).unwrap();
    let mut agent = Agent::new(cfg).unwrap();
    let tunnel = agent.tunnel();
    let (cmds, rx) = tokio::sync::mpsc::channel(8);
    let report = std::sync::Arc::new(std::sync::Mutex::new(AgentReport::default()));
    // The agent's state lines, in the output of a failed test.
    let (tx, mut rx_lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = std::time::Instant::now();
    let kept = lines.clone();
    tokio::spawn(async move {
        while let Some(l) = rx_lines.recv().await {
            eprintln!("agent {:>6} ms: {l}", start.elapsed().as_millis());
            kept.lock().unwrap().push(l);
        }
    });
    let task = tokio::spawn(jvpn_agent::keep_alive(agent, rx, Some(tx), report.clone()));
    Streaming {
        tunnel,
        cmds,
        report,
        task,
        lines,
    }
}

/// A stream target for a socket address.
pub fn target(a: std::net::SocketAddr) -> jvpn_proto::stream::Target {
    jvpn_proto::stream::Target::new(&a.ip().to_string(), a.port()).unwrap()
}

/// Headless Chromium (Debian's package, installed by `.ci/run`) with the
/// flags every test needs, then `args`; fails the test after `within`.
pub async fn chromium(args: &[String], within: Duration) -> std::process::Output {
    tokio::time::timeout(
        within,
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
            ])
            .args(args)
            .output(),
    )
    .await
    .expect("chromium finished")
    .expect("chromium is installed (.ci/run installs Debian's package)")
}

/// The agent program through the multi-call `jvpn-loadtest agent`: the
/// same `jvpn_agent::cli::main_with` as the `jvpn-agent` binary, and always
/// built for this test run (`cargo test -p jvpn-loadtest` does not rebuild
/// another package's binaries, so a `target/debug/jvpn-agent` can be stale).
pub fn agent_command() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_jvpn-loadtest"));
    c.arg("agent");
    c
}
