//! Emulated gateways on the membership plane (issue 14): N members, each
//! with its own node id, membership certificate (minted under the
//! cluster's membership CA), incarnation and client port on loopback, each
//! holding one real mTLS heartbeat stream per router at the real interval,
//! from one process. A member can be killed (its streams drop, as on
//! SIGKILL) or paused (its streams stay open and go silent). It behaves
//! like a gateway where the routers can tell: it names the view it holds
//! (unless emulating a gateway one version older), says whether that view
//! contains it, proves the cluster secret, and answers the routers'
//! reachability probes (its port accepts and closes).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::membership_proof::gateway_proof;
use jvpn_proto::pb::membership::membership_client::MembershipClient;
use jvpn_proto::pb::membership::{HeartbeatReply, HeartbeatRequest, NodeState};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::harness::CLUSTER;

/// How the emulated members talk to the routers.
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// The routers' membership endpoints.
    pub routers: Vec<SocketAddr>,
    pub interval: Duration,
    /// Never name the view held: a gateway one version older, which gets
    /// the members in every reply.
    pub old_format: bool,
}

/// Counters over every member and router.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub replies: AtomicU64,
    /// Encoded size of the replies (protobuf bytes, without gRPC framing).
    pub reply_bytes: AtomicU64,
    /// Replies that left the members out.
    pub omitted: AtomicU64,
    /// Replies that carried a change from the view held, and their bytes.
    pub deltas: AtomicU64,
    pub delta_bytes: AtomicU64,
    /// Streams that failed or were refused (each is retried).
    pub stream_errors: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub replies: u64,
    pub reply_bytes: u64,
    pub omitted: u64,
    pub deltas: u64,
    pub delta_bytes: u64,
    pub stream_errors: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: l(&self.requests),
            replies: l(&self.replies),
            reply_bytes: l(&self.reply_bytes),
            omitted: l(&self.omitted),
            deltas: l(&self.deltas),
            delta_bytes: l(&self.delta_bytes),
            stream_errors: l(&self.stream_errors),
        }
    }
}

/// One emulated member (from its own source address, 127.1.x.y; at most
/// 64,000 members).
struct Member {
    node: String,
    paused: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// N members heartbeating to the routers until dropped.
pub struct Emulator {
    opts: EmulatorOptions,
    ca: Vec<u8>,
    keys: ClusterKeys,
    pki: std::path::PathBuf,
    members: Vec<Member>,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("members", &self.members.len())
            .field("routers", &self.opts.routers)
            .finish()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for m in &self.members {
            for t in &m.tasks {
                t.abort();
            }
        }
    }
}

/// The node id of emulated member `i`.
pub fn member_name(i: usize) -> String {
    format!("m{i:04}")
}

impl Emulator {
    /// Mints certificates for members `0..count` under the PKI in `pki`
    /// (a `jvpn-gateway pki init` tree: its membership CA and secret) and
    /// starts them.
    pub async fn start(pki: &Path, count: usize, opts: EmulatorOptions) -> Result<Self> {
        let layout = jvpn_gateway::pki::PkiLayout {
            dir: pki.to_path_buf(),
        };
        let names: Vec<String> = (0..count).map(member_name).collect();
        jvpn_gateway::pki::mint_members(&layout, CLUSTER, &names)
            .context("minting member certificates")?;
        let ca = std::fs::read(layout.membership_ca())?;
        let keys = crate::harness::cluster_keys_in(&layout)?;
        let mut e = Self {
            opts,
            ca,
            keys,
            pki: pki.to_path_buf(),
            members: Vec::new(),
            stats: Arc::new(Stats::default()),
        };
        for name in names {
            e.add(name).await?;
        }
        Ok(e)
    }

    /// Starts member `node` (its certificate must exist) as a new
    /// incarnation; returns its index.
    pub async fn add(&mut self, node: String) -> Result<usize> {
        let layout = jvpn_gateway::pki::PkiLayout {
            dir: self.pki.clone(),
        };
        let cert = std::fs::read(layout.membership_cert(&node))?;
        let key = std::fs::read(layout.membership_key(&node))?;
        // Its client port: routers probe it (connect, then close).
        let port = TcpListener::bind("127.0.0.1:0").await?;
        let advertise = port.local_addr()?;
        let incarnation = ordered_incarnation();
        let paused = Arc::new(AtomicBool::new(false));
        // A source address of its own, as separate hosts would have
        // (routers count membership connections per source).
        let n = self.members.len();
        let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            1,
            (n / 250) as u8,
            (n % 250) as u8 + 1,
        ));
        let mut tasks = vec![tokio::spawn(async move {
            while let Ok((c, _)) = port.accept().await {
                drop(c);
            }
        })];
        for &router in &self.opts.routers {
            let link = Link {
                node: node.clone(),
                incarnation,
                advertise,
                router,
                source,
                identity: Identity::from_pem(&cert, &key),
                ca: self.ca.clone(),
                keys: self.keys.clone(),
                interval: self.opts.interval,
                old_format: self.opts.old_format,
                paused: paused.clone(),
                stats: self.stats.clone(),
            };
            tasks.push(tokio::spawn(link.run()));
        }
        self.members.push(Member {
            node,
            paused,
            tasks,
        });
        Ok(self.members.len() - 1)
    }

    /// Drops member `i`'s streams and port, as a SIGKILL would.
    pub fn kill(&mut self, i: usize) -> String {
        let m = &mut self.members[i];
        for t in m.tasks.drain(..) {
            t.abort();
        }
        m.node.clone()
    }

    /// Member `i` stops (or resumes) heartbeating; its streams stay open.
    pub fn pause(&self, i: usize, paused: bool) -> String {
        let m = &self.members[i];
        m.paused.store(paused, Ordering::Relaxed);
        m.node.clone()
    }

    /// Mints a certificate for a new member `node` and starts it.
    pub async fn join(&mut self, node: String) -> Result<usize> {
        let layout = jvpn_gateway::pki::PkiLayout {
            dir: self.pki.clone(),
        };
        jvpn_gateway::pki::mint_members(&layout, CLUSTER, std::slice::from_ref(&node))
            .context("minting a member certificate")?;
        self.add(node).await
    }

    /// Whether member `i` is running (not killed).
    pub fn running(&self, i: usize) -> bool {
        !self.members[i].tasks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Above any incarnation a real gateway started earlier recorded, ordered
/// like theirs (Unix ms << 16 | 16 random bits).
fn ordered_incarnation() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms << 16) | u64::from(rand::random::<u16>())
}

/// One member's stream to one router.
struct Link {
    node: String,
    incarnation: u64,
    advertise: SocketAddr,
    router: SocketAddr,
    source: std::net::IpAddr,
    identity: Identity,
    ca: Vec<u8>,
    keys: ClusterKeys,
    interval: Duration,
    old_format: bool,
    paused: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

impl Link {
    /// Heartbeats forever, reconnecting after a failure like a gateway.
    async fn run(self) {
        let mut seq = 0u64;
        loop {
            if self.stream(&mut seq).await.is_err() {
                self.stats.stream_errors.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    async fn stream(&self, seq: &mut u64) -> Result<()> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(format!("router.{CLUSTER}"))
            .identity(self.identity.clone());
        let channel = Endpoint::from_shared(format!("https://{}", self.router))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .local_address(Some(self.source))
            .connect()
            .await?;
        let mut client = MembershipClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = client
            .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // The view held from this router, and whether it contains us.
        let mut held: Option<(Vec<u8>, bool)> = None;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if self.paused.load(Ordering::Relaxed) {
                        continue;
                    }
                    *seq += 1;
                    tx.send(self.request(*seq, held.as_ref())).await?;
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                }
                r = replies.message() => {
                    let Some(reply) = r? else { return Ok(()) };
                    self.on_reply(&reply, &mut held);
                }
            }
        }
    }

    fn request(&self, seq: u64, held: Option<&(Vec<u8>, bool)>) -> HeartbeatRequest {
        HeartbeatRequest {
            node_id: self.node.clone(),
            incarnation: self.incarnation,
            advertise_addr: self.advertise.to_string(),
            state: NodeState::Ready as i32,
            weight: 1,
            sessions: 0,
            lease_ok: held.is_some(),
            build_version: "member-emulator".into(),
            sequence: seq,
            in_view: held.is_some_and(|(_, inside)| *inside),
            incarnation_ordered: true,
            secret_proof: gateway_proof(&self.keys, &self.node, self.incarnation, seq),
            known_view_id: match held {
                Some((id, _)) if !self.old_format => id.clone(),
                _ => Vec::new(),
            },
            accepts_view_delta: !self.old_format,
            agent_silence_ms: 0,
            leaving: false,
        }
    }

    fn on_reply(&self, reply: &HeartbeatReply, held: &mut Option<(Vec<u8>, bool)>) {
        self.stats.replies.fetch_add(1, Ordering::Relaxed);
        let bytes = prost::Message::encoded_len(reply) as u64;
        self.stats.reply_bytes.fetch_add(bytes, Ordering::Relaxed);
        if reply.members_omitted {
            self.stats.omitted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let me = |m: &jvpn_proto::pb::membership::ViewMember| {
            m.node_id == self.node && m.incarnation == self.incarnation
        };
        let added = reply.members.iter().any(me);
        let inside = if reply.delta_base_view_id.is_empty() {
            added
        } else {
            self.stats.deltas.fetch_add(1, Ordering::Relaxed);
            self.stats.delta_bytes.fetch_add(bytes, Ordering::Relaxed);
            match held.as_ref() {
                // What changed from the view held (checked by real
                // gateways, which rebuild it; trusted here).
                Some((id, was)) if *id == reply.delta_base_view_id => {
                    added || (*was && !reply.members_removed.iter().any(me))
                }
                // Crossed a change: keep the view held.
                _ => return,
            }
        };
        *held = Some((reply.view_id.clone(), inside));
    }
}

/// What a churn run saw ([`churn`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnResult {
    pub joins: u64,
    pub leaves: u64,
    /// Deaths the routers counted beyond the members that left, summed
    /// over routers (must be 0).
    pub false_deaths: i64,
    /// Per change: time until every router held the same view id and
    /// counted exactly the expected members alive.
    pub converge_ms: Vec<u64>,
    /// Changes after which the routers had not converged within the
    /// second before the next one.
    pub late: u64,
}

impl ChurnResult {
    /// The `q` quantile (0..=1) of the convergence times.
    pub fn converge_quantile_ms(&self, q: f64) -> u64 {
        let mut v = self.converge_ms.clone();
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// One member joins or leaves every second for `changes` seconds
/// (alternately; a leave drops a random running member's streams, as a
/// SIGKILL would). After each change, waits until every router holds the
/// same view id and counts exactly `others` (members not emulated here)
/// and the running members alive, timing it; deaths are read from each
/// router's `jvpn_router_member_deaths_total` before and after, so a
/// healthy member declared dead even briefly is counted.
pub async fn churn(
    e: &mut Emulator,
    routers: &[crate::cluster::LocalRouter],
    others: &std::collections::BTreeSet<String>,
    changes: u64,
    seed: u64,
) -> Result<ChurnResult> {
    use rand::{Rng, SeedableRng};
    const DEATHS: &str = "jvpn_router_member_deaths_total";
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = ChurnResult::default();
    let mut deaths0 = Vec::new();
    for r in routers {
        deaths0.push(r.metric(DEATHS, &[]).await?);
    }
    let mut next_name = e.len();
    let start = tokio::time::Instant::now();
    for k in 0..changes {
        // The schedule, not a wait for something: one change a second.
        let at = start + Duration::from_secs(k);
        tokio::time::sleep_until(at).await;
        if k % 2 == 0 {
            let mut name = member_name(next_name);
            while e.members.iter().any(|m| m.node == name) {
                next_name += 1;
                name = member_name(next_name);
            }
            next_name += 1;
            e.join(name).await?;
            out.joins += 1;
        } else {
            // Healthy members only: a paused one is dead already.
            let running: Vec<usize> = (0..e.len())
                .filter(|&i| e.running(i) && !e.members[i].paused.load(Ordering::Relaxed))
                .collect();
            let Some(&i) = running.get(rng.random_range(0..running.len().max(1))) else {
                continue;
            };
            e.kill(i);
            out.leaves += 1;
        }
        let changed = tokio::time::Instant::now();
        let mut expected = others.clone();
        expected.extend(
            (0..e.len())
                .filter(|&i| e.running(i) && !e.members[i].paused.load(Ordering::Relaxed))
                .map(|i| e.members[i].node.clone()),
        );
        let deadline = changed + Duration::from_secs(10);
        loop {
            let mut same = true;
            let mut view = None;
            for r in routers {
                let ring = r.ring().await?;
                let id = ring["view_id"].as_str().unwrap_or_default().to_owned();
                same &= crate::cluster::members_where(&ring, "alive") == expected
                    && view.get_or_insert_with(|| id.clone()) == &id;
            }
            if same {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the routers did not converge within 10 s of change {k}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let took = changed.elapsed();
        if took > Duration::from_secs(1) {
            out.late += 1;
        }
        out.converge_ms.push(took.as_millis() as u64);
    }
    for (r, d0) in routers.iter().zip(deaths0) {
        out.false_deaths += (r.metric(DEATHS, &[]).await? - d0) as i64;
    }
    out.false_deaths -= (out.leaves as usize * routers.len()) as i64;
    Ok(out)
}
