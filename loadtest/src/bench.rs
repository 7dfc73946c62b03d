//! `jvpn-loadtest bench-gateway`: what one gateway core sustains, side by side
//! with bare rustls in the same run.
//!
//! The server under test is pinned to CPU 0 and the load generator to CPU 1
//! (this machine has two cores). Measured, in order:
//!
//! 1. bare rustls: TCP + 64-byte preamble + TLS 1.3 + one frame each way;
//! 2. full gateway HELLOs (the same, plus auth, session creation, exporter,
//!    token) per second;
//! 3. RESUMEs per second on one core, with p50/p99 latency from the client;
//! 4. RSS per attached and per detached session at `--sessions` sessions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use jvpn_proto::frame;
use jvpn_proto::pb::session::{HelloOk, frame::Kind};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::{self, GatewayOptions, Launcher, LocalGateway, TestPki};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub duration: Duration,
    pub concurrency: usize,
    pub sessions: usize,
    /// Handshake measurements with client certificates instead of the
    /// development token.
    pub agent_certs: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// Completed per wall-clock second (bounded by the one-core load generator).
    pub bare_rustls_handshakes_per_s: f64,
    pub bare_rustls_resumed_per_s: f64,
    pub gateway_hellos_per_s: f64,
    /// RESUMEs resuming TLS from a ticket (the default since issue 17).
    pub gateway_resumes_per_s: f64,
    /// RESUMEs with a full TLS handshake each (resumption turned off).
    pub gateway_full_resumes_per_s: f64,
    /// Completed per second of server CPU time: what one server core sustains.
    pub bare_rustls_handshakes_per_core_s: f64,
    pub bare_rustls_resumed_per_core_s: f64,
    pub gateway_hellos_per_core_s: f64,
    pub gateway_resumes_per_core_s: f64,
    pub gateway_full_resumes_per_core_s: f64,
    /// `gateway_hellos_per_core_s / bare_rustls_handshakes_per_core_s`.
    pub hello_vs_bare_ratio: f64,
    /// `gateway_resumes_per_core_s / gateway_hellos_per_core_s` (goal ≥ 2).
    pub resume_vs_hello_ratio: f64,
    /// `gateway_resumes_per_core_s / bare_rustls_resumed_per_core_s` (goal
    /// ≥ 0.8).
    pub resume_vs_bare_resumed_ratio: f64,
    /// Share of the timed RESUMEs that resumed TLS (from the gateway's
    /// counters: a check that the rows measure what they say).
    pub resumed_fraction: f64,
    /// At saturation (`concurrency` clients): mostly queueing.
    pub resume_latency_us_p50: u64,
    pub resume_latency_us_p99: u64,
    /// One client at a time: the latency of a RESUME itself.
    pub resume_latency_unloaded_us_p50: u64,
    pub resume_latency_unloaded_us_p99: u64,
    pub sessions_measured: usize,
    pub rss_per_attached_session_bytes: f64,
    /// The same with the data plane on (a channel, no stream open).
    pub rss_per_attached_session_with_channel_bytes: f64,
    /// The same after one stream went through each session and ended:
    /// what a session that used the data plane keeps while idle (its
    /// HTTP/2 connection, started by that stream, stays).
    pub rss_per_attached_session_after_a_stream_bytes: f64,
    pub rss_per_detached_session_bytes: f64,
    pub pinned: bool,
    /// The agents of the handshake measurements presented client
    /// certificates.
    pub agent_certs: bool,
}

pub(crate) fn bench_toml() -> &'static str {
    // Admission, anti-flap and liveness timers out of the way: this measures
    // capacity (idle benchmark transports send no pings, but for the memory
    // figure after a stream, whose agents run as the binary does).
    "[admission]\nper_source_rate_per_s = 1000000.0\nper_source_burst = 1000000\n\
     handshakes_per_s = 10000000.0\nmax_tls_handshakes_in_flight = 1024\n\
     [policy]\nswitch_cooldown_ms = 1\nmax_switches_per_min = 1000\n\
     heartbeat_timeout_ms = 600000\ntransport_lost_ttl_ms = 1200000\n"
}

/// Pins every thread of this process to `cpu` (threads started later
/// inherit it). Affinity is per thread: pinning only the caller left the
/// runtime's other workers free to run on the server's core.
pub(crate) fn pin_self(cpu: usize) -> bool {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_err() {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    let mut all = true;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        all &= nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set).is_ok();
    }
    all
}

/// User + system CPU seconds consumed so far by `pid`.
pub(crate) fn cpu_seconds(pid: nix::unistd::Pid) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .context("utime")?
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .context("stime")?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok(ticks / hz as f64)
}

pub fn rss_bytes(pid: nix::unistd::Pid) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Raises this process's open-file limit (see the gateway's `raise_nofile`).
pub fn raise_nofile() -> u64 {
    jvpn_runtime::process::raise_nofile()
}

/// Runs `f` from `concurrency` tasks until `duration` passes; returns completions/s.
pub(crate) async fn rate<F, Fut>(
    concurrency: usize,
    duration: Duration,
    f: F,
) -> Result<(f64, Histogram<u64>, u64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let f = Arc::new(f);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (f, stop, done, errors) = (f.clone(), stop.clone(), done.clone(), errors.clone());
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!("3 sig figs"));
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match f(i).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut f = first_error
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        f.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            h
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await?)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        let first = first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        eprintln!(
            "note: {errs} failed attempts (not counted); first: {}",
            first.unwrap_or_default()
        );
    }
    let done = done.load(Ordering::Relaxed);
    Ok((done as f64 / elapsed, hist, done))
}

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepts connections like a gateway's front door (64-byte preamble, then
/// TLS 1.3 with the gateway's own configuration, client-certificate request
/// included) and hands each TLS stream to `per_conn` on its own task.
async fn serve_tls<F, Fut>(
    cert: &Path,
    key: &Path,
    agent_ca: Option<&Path>,
    listener: TcpListener,
    per_conn: F,
) -> Result<()>
where
    F: Fn(ServerTls) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let material = jvpn_gateway::tls::load_material(&jvpn_gateway::config::TlsConfig {
        cert_file: cert.into(),
        key_file: key.into(),
        agent_ca_file: agent_ca.map(Into::into),
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Tickets like a gateway's (one per connection, single use).
    let tickets = jvpn_gateway::tickets::Tickets::new(
        Duration::from_secs(900),
        Duration::from_secs(8 * 3600),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(jvpn_gateway::tls::server_config(
        &material,
        true,
        Some(Arc::new(tickets)),
    )?));
    loop {
        let (mut s, _) = listener.accept().await?;
        // As the gateway does: a reply right behind the ticket must not
        // wait for a delayed ACK.
        let _ = s.set_nodelay(true);
        let (acceptor, per_conn) = (acceptor.clone(), per_conn.clone());
        tokio::spawn(async move {
            let mut pre = [0u8; 64];
            if s.read_exact(&mut pre).await.is_err() {
                return;
            }
            if let Ok(tls) = acceptor.accept(s).await {
                per_conn(tls).await;
            }
        });
    }
}

/// A target that does nothing but keep TLS sessions: answers `Hello` with a
/// synthetic `HelloOk`, `Ping` with `Pong`, echoes `Data`. Runs of the load
/// tool against it measure the tool's own latency floor.
pub async fn noop_target(
    cert: &Path,
    key: &Path,
    agent_ca: Option<&Path>,
    listener: TcpListener,
) -> Result<()> {
    use jvpn_proto::pb::session::{Policy, Pong};
    serve_tls(cert, key, agent_ca, listener, |mut tls| async move {
        let mut buf = BytesMut::with_capacity(256);
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let ok = Kind::HelloOk(HelloOk {
            keepalive_ms: 0,
            session_id: id.to_vec(),
            node_id: "noop".into(),
            incarnation: 1,
            state_version: 1,
            binding_epoch: 1,
            resume_token: vec![2; 52],
            policy: Some(Policy {
                heartbeat_interval_ms: 500,
                heartbeat_timeout_ms: 2_000,
                transport_lost_ttl_ms: 15_000,
                session_max_lifetime_ms: 3_600_000,
                max_switches_per_min: 8,
                switch_cooldown_ms: 1_500,
            }),
            token_key_id: 1,
            channel_window: 0,
            migratable: false,
            // Like a gateway that predates the field.
            via_router: None,
            channel_finish: false,
        });
        while let Ok(Some(kind)) = jvpn_runtime::wire::read_frame(&mut tls, &mut buf).await {
            let reply = match kind {
                Kind::Hello(_) => ok.clone(),
                Kind::Ping(p) => Kind::Pong(Pong { seq: p.seq }),
                Kind::Data(d) => Kind::Data(d),
                _ => break,
            };
            let Ok(bytes) = frame::to_bytes(reply) else {
                break;
            };
            if tls.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = tls.shutdown().await;
    })
    .await
}

/// The bare baseline server: preamble, TLS 1.3 with the same configuration
/// as the gateway, and the same frame exchange as a HELLO, with no session logic.
pub async fn bare_tls_server(
    cert: &Path,
    key: &Path,
    agent_ca: Option<&Path>,
    listener: TcpListener,
) -> Result<()> {
    let reply = frame::to_bytes(Kind::HelloOk(HelloOk {
        session_id: vec![1; 16],
        node_id: "bare".into(),
        resume_token: vec![2; 52],
        ..Default::default()
    }))?;
    serve_tls(cert, key, agent_ca, listener, move |mut tls| {
        let reply = reply.clone();
        async move {
            // The same exchange as a gateway HELLO: a frame in, a reply out,
            // the client's closing frame in, then TLS close_notify.
            let mut buf = BytesMut::with_capacity(256);
            let _ = jvpn_runtime::wire::read_frame(&mut tls, &mut buf).await;
            let _ = tls.write_all(&reply).await;
            let _ = tls.flush().await;
            let _ = jvpn_runtime::wire::read_frame(&mut tls, &mut buf).await;
            let _ = tls.shutdown().await;
        }
    })
    .await
}

pub(crate) async fn start_pinned_gateway(
    exe: &Path,
    pki: &TestPki,
    dir: &Path,
    extra: &str,
) -> Result<LocalGateway> {
    let launcher = Launcher::resolve(exe).pinned(0);
    LocalGateway::start(
        &launcher,
        pki,
        dir,
        &GatewayOptions {
            extra_toml: extra.into(),
            ..Default::default()
        },
    )
    .await
}

/// Runs `a` as the agent binary does, sends one byte through a stream to
/// `echo` and back, ends the stream, and returns what keeps the session
/// running (idle from then on).
async fn one_stream_then_idle(
    mut a: jvpn_agent::Agent,
    echo: SocketAddr,
) -> Result<(
    jvpn_agent::streams::Tunnel,
    tokio::sync::mpsc::Sender<jvpn_agent::Command>,
    tokio::task::JoinHandle<jvpn_agent::AgentReport>,
)> {
    let tunnel = a.tunnel();
    let (cmds, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(jvpn_agent::keep_alive(a, rx, None, Arc::default()));
    let target = jvpn_proto::stream::Target::new(&echo.ip().to_string(), echo.port())?;
    let s = tunnel.connect(&target).await?;
    let (mut r, mut w) = tokio::io::split(s);
    w.write_all(b"x").await?;
    w.shutdown().await?;
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    anyhow::ensure!(back == b"x", "the stream's byte did not come back");
    Ok((tunnel, cmds, task))
}

/// One agent's session and its current transport.
pub(crate) type PooledSession =
    tokio::sync::Mutex<(jvpn_agent::Agent, Option<jvpn_agent::Transport>)>;

/// `pool` sessions on `cfg`'s server (from 64 source addresses) and a
/// function that RESUMEs the next one, round-robin, so no session exceeds
/// the anti-flap budget (1000 switches a minute in [`bench_toml`]) during
/// a run; the pool, to change its agents between runs.
pub(crate) async fn resume_pool(cfg: &jvpn_agent::AgentConfig, pool: usize) -> Result<ResumeOne> {
    let mut v = Vec::with_capacity(pool);
    for i in 0..pool {
        let mut c = cfg.clone();
        c.bind_ip = Some(harness::source_ip(i % 64));
        let mut a = jvpn_agent::Agent::new(c)?;
        let t = a.hello().await?;
        v.push(tokio::sync::Mutex::new((a, Some(t))));
    }
    Ok(ResumeOne {
        agents: Arc::new(v),
        next: Arc::new(AtomicU64::new(0)),
    })
}

/// See [`resume_pool`].
#[derive(Clone)]
pub(crate) struct ResumeOne {
    pub agents: Arc<Vec<PooledSession>>,
    next: Arc<AtomicU64>,
}

impl ResumeOne {
    /// The function [`rate`] runs: one RESUME of the next session.
    pub(crate) fn runner(
        &self,
    ) -> impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>
    + Send
    + Sync
    + 'static
    + Clone {
        let (agents, next) = (self.agents.clone(), self.next.clone());
        move |_: usize| {
            let (agents, next) = (agents.clone(), next.clone());
            Box::pin(async move {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % agents.len();
                let mut g = agents[i].lock().await;
                let (a, t) = &mut *g;
                *t = Some(a.resume().await?);
                Ok(())
            })
        }
    }
}

/// One exchange with the bare server: connect with `preamble`, a frame
/// each way, the closing frame.
async fn bare_exchange(
    agent: &jvpn_agent::Agent,
    preamble: &jvpn_proto::preamble::Preamble,
) -> Result<()> {
    let mut t = agent.open(preamble).await?;
    t.ping().await?;
    t.recv().await?;
    t.send(Kind::Terminate(jvpn_proto::pb::session::Terminate {
        reason: jvpn_proto::ReasonCode::AgentClosed as i32,
    }))
    .await?;
    Ok(())
}

pub async fn run(opts: BenchOptions) -> Result<BenchReport> {
    raise_nofile();
    let exe = std::env::current_exe()?;
    let pki = TestPki::new(&["g1"])?;
    let dir = tempfile::tempdir()?;
    // Whoever runs us: pin the load generator to CPU 1 (the server gets CPU 0).
    let mut report = BenchReport {
        pinned: pin_self(1),
        agent_certs: opts.agent_certs,
        ..Default::default()
    };
    // The credential of the handshake measurements.
    let config = |server: SocketAddr| -> Result<jvpn_agent::AgentConfig> {
        let mut cfg = harness::agent_config(&pki, vec![server], None)?;
        if opts.agent_certs {
            cfg.credential = jvpn_agent::AgentConfig::certificate_from_pem(
                &pki.layout.agent_cert(0),
                &pki.layout.agent_key(0),
            )?;
        }
        Ok(cfg)
    };

    // 1. Bare rustls, in a pinned child process (same binary, multi-call).
    let bare_addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut bare = tokio::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(&exe)
        .arg("bare-tls-server")
        .arg("--listen")
        .arg(bare_addr.to_string())
        .arg("--cert")
        .arg(pki.layout.gateway_cert("g1"))
        .arg("--key")
        .arg(pki.layout.gateway_key("g1"))
        .arg("--agent-ca")
        .arg(pki.layout.agent_ca())
        .kill_on_drop(true)
        .spawn()
        .context("taskset (util-linux) is needed to pin the server")?;
    harness::eventually(Duration::from_secs(10), "bare server listening", || async {
        tokio::net::TcpStream::connect(bare_addr).await.is_ok()
    })
    .await?;
    let cfg = Arc::new(config(bare_addr)?);
    let bare_cfg = cfg.clone();
    let bare_pid = nix::unistd::Pid::from_raw(bare.id().context("bare pid")? as i32);
    let cpu0 = cpu_seconds(bare_pid)?;
    let (r, _, n) = rate(opts.concurrency, opts.duration, move |i| {
        let mut cfg = (*cfg).clone();
        cfg.bind_ip = Some(harness::source_ip(i));
        async move {
            let agent = jvpn_agent::Agent::new(cfg)?;
            bare_exchange(&agent, &jvpn_proto::preamble::Preamble::Hello { key_id: 0 }).await
        }
    })
    .await?;
    report.bare_rustls_handshakes_per_s = r;
    report.bare_rustls_handshakes_per_core_s = n as f64 / (cpu_seconds(bare_pid)? - cpu0);
    // 1b. The same exchange resuming TLS: one agent per client slot, each
    // connection offering the ticket of the one before.
    let slots: Arc<Vec<_>> = Arc::new(
        (0..opts.concurrency)
            .map(|i| {
                let mut cfg = (*bare_cfg).clone();
                cfg.bind_ip = Some(harness::source_ip(i));
                jvpn_agent::Agent::new(cfg).map(tokio::sync::Mutex::new)
            })
            .collect::<Result<_, _>>()?,
    );
    let cpu0 = cpu_seconds(bare_pid)?;
    let (r, _, n) = rate(opts.concurrency, opts.duration, move |i| {
        let slots = slots.clone();
        async move {
            let agent = slots[i].lock().await;
            // A RESUME preamble: the agent offers its ticket only there.
            let resume = jvpn_proto::preamble::Preamble::Resume {
                key_id: 0,
                token: [0; jvpn_proto::token::TOKEN_LEN],
            };
            bare_exchange(&agent, &resume).await
        }
    })
    .await?;
    report.bare_rustls_resumed_per_s = r;
    report.bare_rustls_resumed_per_core_s = n as f64 / (cpu_seconds(bare_pid)? - cpu0);
    let _ = bare.kill().await;

    // 2 and 3. HELLO and RESUME rates on a pinned gateway.
    let gw = start_pinned_gateway(&exe, &pki, &dir.path().join("rate"), bench_toml()).await?;
    let cfg = Arc::new(config(gw.client_addr)?);
    let c2 = cfg.clone();
    let gw_pid = gw.pid().context("gateway pid")?;
    let cpu0 = cpu_seconds(gw_pid)?;
    let (r, _, n) = rate(opts.concurrency, opts.duration, move |i| {
        let mut cfg = (*c2).clone();
        cfg.bind_ip = Some(harness::source_ip(i));
        async move {
            let mut agent = jvpn_agent::Agent::new(cfg)?;
            let t = agent.hello().await?;
            // End the session so the table does not grow during the run.
            let mut t = t;
            t.send(Kind::Terminate(jvpn_proto::pb::session::Terminate {
                reason: jvpn_proto::ReasonCode::AgentClosed as i32,
            }))
            .await?;
            Ok(())
        }
    })
    .await?;
    report.gateway_hellos_per_s = r;
    report.gateway_hellos_per_core_s = n as f64 / (cpu_seconds(gw_pid)? - cpu0);
    report.hello_vs_bare_ratio =
        report.gateway_hellos_per_core_s / report.bare_rustls_handshakes_per_core_s.max(1e-9);

    let resume_one = resume_pool(&cfg, 512usize.max(opts.concurrency)).await?;
    let agents = resume_one.agents.clone();
    let resume_one = resume_one.runner();
    let (_, hist, _) = rate(1, opts.duration, resume_one.clone()).await?;
    report.resume_latency_unloaded_us_p50 = hist.value_at_quantile(0.5);
    report.resume_latency_unloaded_us_p99 = hist.value_at_quantile(0.99);
    let handshakes = |kind: &'static str| {
        let admin = gw.admin_addr;
        async move {
            let m = harness::scrape(admin).await?;
            Ok::<_, anyhow::Error>(harness::metric_value(
                &m,
                "jvpn_gateway_tls_handshakes_total",
                &[("kind", kind)],
            ))
        }
    };
    let (full0, resumed0) = (handshakes("full").await?, handshakes("resumed").await?);
    let cpu0 = cpu_seconds(gw_pid)?;
    let (r, hist, n) = rate(opts.concurrency, opts.duration, resume_one.clone()).await?;
    report.gateway_resumes_per_s = r;
    report.gateway_resumes_per_core_s = n as f64 / (cpu_seconds(gw_pid)? - cpu0);
    report.resume_latency_us_p50 = hist.value_at_quantile(0.5);
    report.resume_latency_us_p99 = hist.value_at_quantile(0.99);
    let (full, resumed) = (
        handshakes("full").await? - full0,
        handshakes("resumed").await? - resumed0,
    );
    report.resumed_fraction = resumed / (full + resumed).max(1.0);
    // The same RESUMEs with a full handshake each.
    for a in agents.iter() {
        a.lock().await.0.set_tls_resumption(false)?;
    }
    let cpu0 = cpu_seconds(gw_pid)?;
    let (r, _, n) = rate(opts.concurrency, opts.duration, resume_one).await?;
    report.gateway_full_resumes_per_s = r;
    report.gateway_full_resumes_per_core_s = n as f64 / (cpu_seconds(gw_pid)? - cpu0);
    report.resume_vs_hello_ratio =
        report.gateway_resumes_per_core_s / report.gateway_hellos_per_core_s.max(1e-9);
    report.resume_vs_bare_resumed_ratio =
        report.gateway_resumes_per_core_s / report.bare_rustls_resumed_per_core_s.max(1e-9);
    drop(gw);

    // 4. Memory per attached and per detached session.
    report.sessions_measured = opts.sessions;
    let echo = crate::streamload::echo_destination().await?;
    for sub in ["attached", "detached", "channel", "used"] {
        // `channel`: attached, with the data plane on (a session channel
        // per session at the gateway), no stream open. `used`: the same,
        // after one stream went through each session and ended.
        let attached = sub != "detached";
        let channel = sub == "channel";
        let used = sub == "used";
        let toml = if used {
            format!("{}{}", bench_toml(), crate::streamload::LOOPBACK_EGRESS)
        } else {
            bench_toml().to_owned()
        };
        let gw = start_pinned_gateway(&exe, &pki, &dir.path().join(sub), &toml).await?;
        let pid = gw.pid().context("gateway pid")?;
        let base = rss_bytes(pid)?;
        let mut keep = Vec::with_capacity(if attached { opts.sessions } else { 0 });
        let cfg = harness::agent_config(&pki, vec![gw.client_addr], None)?;
        let mut set = tokio::task::JoinSet::new();
        let per_task = opts.sessions.div_ceil(opts.concurrency);
        for c in 0..opts.concurrency {
            let mut cfg = cfg.clone();
            cfg.bind_ip = Some(harness::source_ip(c));
            set.spawn(async move {
                let mut ts: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
                for _ in 0..per_task {
                    let mut a = jvpn_agent::Agent::new(cfg.clone())?;
                    if used {
                        ts.push(Box::new(one_stream_then_idle(a, echo).await?));
                        continue;
                    }
                    if channel {
                        let _ = a.tunnel();
                    }
                    let t = a.hello().await?;
                    if channel && !a.has_channel() {
                        anyhow::bail!("the gateway granted no channel: nothing measured");
                    }
                    if attached {
                        ts.push(Box::new((t, a)));
                    }
                }
                Ok::<_, anyhow::Error>(ts)
            });
        }
        while let Some(r) = set.join_next().await {
            keep.extend(r??);
        }
        let total = per_task * opts.concurrency;
        harness::eventually(Duration::from_secs(30), "sessions settled", || async {
            let (_, body) = harness::http_get(gw.admin_addr, "/sessions")
                .await
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let live = v["total"].as_u64() == Some(total as u64);
            let attached_now = v["by_state"]["attached"].as_u64().unwrap_or(0);
            live && (attached_now == total as u64) == attached
        })
        .await?;
        if used {
            // Every stream ended at the gateway, then it gave back what the
            // burst freed: a trim counted after the last stream ended (it
            // trims a check after bytes stop, so never before that).
            harness::eventually(Duration::from_secs(60), "streams ended", || async {
                let open = gw.metric("jvpn_gateway_streams_open", &[]).await;
                open.is_ok_and(|n| n == 0.0)
            })
            .await?;
            let trims = || gw.metric("jvpn_gateway_memory_reclaim_duration_seconds_count", &[]);
            let before = trims().await?;
            harness::eventually(Duration::from_secs(60), "heap trimmed", || async {
                trims().await.is_ok_and(|n| n > before)
            })
            .await?;
        }
        let per = (rss_bytes(pid)?.saturating_sub(base)) as f64 / total as f64;
        match sub {
            "attached" => report.rss_per_attached_session_bytes = per,
            "channel" => report.rss_per_attached_session_with_channel_bytes = per,
            "used" => report.rss_per_attached_session_after_a_stream_bytes = per,
            _ => report.rss_per_detached_session_bytes = per,
        }
        drop(keep);
    }
    Ok(report)
}
