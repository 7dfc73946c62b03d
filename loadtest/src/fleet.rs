//! Many agents, each running the real keep-alive loop in its own task and
//! from its own loopback source address, observed through their reports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use jvpn_agent::streams::Tunnel;
use jvpn_agent::{Agent, AgentReport, Command, keep_alive};
use tokio::sync::{mpsc, oneshot};

use crate::harness::{self, TestPki};

/// One running agent.
#[derive(Debug)]
pub struct Running {
    pub tx: mpsc::Sender<Command>,
    /// Opens streams through this agent's session (agents with a data plane).
    pub tunnel: Option<Tunnel>,
    pub report: Arc<Mutex<AgentReport>>,
    pub task: tokio::task::JoinHandle<AgentReport>,
}

impl Running {
    pub fn snapshot(&self) -> AgentReport {
        self.report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A group of agents started together.
#[derive(Debug, Default)]
pub struct Fleet {
    pub agents: Vec<Running>,
}

impl Fleet {
    /// Starts `n` agents against `servers`, sources `source_ip(first_source..)`.
    pub fn start(
        pki: &TestPki,
        servers: &[SocketAddr],
        n: usize,
        first_source: usize,
    ) -> Result<Self> {
        Self::start_inner(pki, servers, n, first_source, false)
    }

    /// [`Fleet::start`] with each agent's data plane on (its sessions carry
    /// streams; echo is for agents without).
    pub fn start_with_tunnels(
        pki: &TestPki,
        servers: &[SocketAddr],
        n: usize,
        first_source: usize,
    ) -> Result<Self> {
        Self::start_inner(pki, servers, n, first_source, true)
    }

    fn start_inner(
        pki: &TestPki,
        servers: &[SocketAddr],
        n: usize,
        first_source: usize,
        tunnels: bool,
    ) -> Result<Self> {
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            let cfg = harness::agent_config(
                pki,
                servers.to_vec(),
                Some(harness::source_ip(first_source + i)),
            )?;
            let mut agent = Agent::new(cfg)?;
            // Spread agents over the routers (first choice; they fail over).
            for _ in 0..((first_source + i) % servers.len().max(1)) {
                agent.rotate_server();
            }
            let tunnel = tunnels.then(|| agent.tunnel());
            let (tx, rx) = mpsc::channel(8);
            let report = Arc::new(Mutex::new(AgentReport::default()));
            let task = tokio::spawn(keep_alive(agent, rx, None, report.clone()));
            agents.push(Running {
                tx,
                tunnel,
                report,
                task,
            });
        }
        Ok(Self { agents })
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The tunnels of agents with a data plane.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.agents
            .iter()
            .filter_map(|a| a.tunnel.clone())
            .collect()
    }

    pub fn snapshots(&self) -> Vec<AgentReport> {
        self.agents.iter().map(Running::snapshot).collect()
    }

    /// Waits until every agent established its first session.
    pub async fn wait_established(&self, within: Duration) -> Result<()> {
        harness::eventually(within, "every agent established a session", || {
            let done = self
                .agents
                .iter()
                .all(|a| a.snapshot().sessions_established > 0);
            async move { done }
        })
        .await
    }

    /// Waits until every agent's last attach is older than `cooldown`, so a
    /// transport loss from now on is retried at once (agents pace RESUMEs by
    /// the policy's switch cooldown).
    pub async fn wait_switch_allowed(&self, cooldown: Duration) -> Result<()> {
        harness::eventually(
            cooldown * 4 + Duration::from_secs(5),
            "switch cooldowns over",
            || {
                let quiet = self.agents.iter().all(|a| {
                    a.snapshot()
                        .attached_at
                        .is_some_and(|t| t.elapsed() >= cooldown)
                });
                async move { quiet }
            },
        )
        .await
    }

    /// Sessions per owning gateway, now.
    pub fn by_node(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.snapshots() {
            *out.entry(r.node_id).or_default() += 1;
        }
        out
    }

    pub fn resumes_ok(&self) -> u64 {
        self.snapshots().iter().map(|r| r.resumes_ok).sum()
    }

    pub fn rehandshakes(&self) -> u64 {
        self.snapshots().iter().map(|r| r.rehandshakes).sum()
    }

    /// Every agent drops its transport at once and must resume, each one
    /// itself (a total could be met by some resuming twice while others
    /// never come back). Waits for switch cooldowns first.
    pub async fn jump_all(&self, within: Duration) -> Result<()> {
        self.wait_switch_allowed(Duration::from_millis(1_600))
            .await?;
        self.jump_all_now(within).await
    }

    /// [`Fleet::jump_all`] without waiting for cooldowns (agents pace
    /// themselves; used when transports are being cut meanwhile).
    pub async fn jump_all_now(&self, within: Duration) -> Result<()> {
        let before = self.resume_counts();
        self.each(|| Command::Jump).await;
        self.wait_each_resumed(&before, within, "every session resumed")
            .await
    }

    /// Each agent's successful RESUMEs so far (for [`Fleet::wait_each_resumed`]).
    pub fn resume_counts(&self) -> Vec<u64> {
        self.snapshots().iter().map(|r| r.resumes_ok).collect()
    }

    /// Waits until every agent resumed at least once since `before` (from
    /// [`Fleet::resume_counts`]).
    pub async fn wait_each_resumed(
        &self,
        before: &[u64],
        within: Duration,
        what: &str,
    ) -> Result<()> {
        harness::eventually(within, what, || {
            let done = self
                .agents
                .iter()
                .zip(before)
                .all(|(a, b)| a.snapshot().resumes_ok > *b);
            async move { done }
        })
        .await
    }

    /// Sends one command to every agent.
    pub async fn each(&self, mut cmd: impl FnMut() -> Command) {
        for a in &self.agents {
            let _ = a.tx.send(cmd()).await;
        }
    }

    /// One echo through every agent: `(ok, failed)`.
    pub async fn echo_all(&self, tag: &str) -> (u64, u64) {
        let mut ok = 0;
        let mut failed = 0;
        for (i, a) in self.agents.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let sent =
                a.tx.send(Command::Echo(format!("{tag}-{i}").into_bytes(), tx))
                    .await
                    .is_ok();
            match (
                sent,
                tokio::time::timeout(Duration::from_secs(10), rx).await,
            ) {
                (true, Ok(Ok(Ok(_)))) => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    }

    /// Closes every session (`Terminate{agent_closed}`) and returns the final reports.
    pub async fn close(self) -> Vec<AgentReport> {
        let mut out = Vec::with_capacity(self.agents.len());
        for a in &self.agents {
            let _ = a.tx.send(Command::Close).await;
        }
        for a in self.agents {
            match a.task.await {
                Ok(r) => out.push(r),
                Err(_) => out.push(AgentReport {
                    ended: Some("agent_task_failed".into()),
                    ..AgentReport::default()
                }),
            }
        }
        out
    }
}
