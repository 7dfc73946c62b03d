//! Starts real gateway processes on loopback with ephemeral ports and waits
//! for readiness (never a fixed sleep); builds agents that connect to them.
//!
//! Binary resolution: `$JVPN_GATEWAY_BIN`, else `jvpn-gateway` beside the
//! given executable (what `cargo test --workspace` and `cargo build` produce),
//! else the given executable itself as a multi-call binary
//! (`jvpn-loadtest gateway …`), so `cargo run -p jvpn-loadtest -- demo`
//! works on a fresh checkout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jvpn_agent::{Agent, AgentConfig, Credential};
use jvpn_gateway::pki::{self, PkiLayout, PkiSpec};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Which program a [`Launcher`] starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Router,
}

impl Role {
    fn binary(self) -> &'static str {
        match self {
            Role::Gateway => "jvpn-gateway",
            Role::Router => "jvpn-router",
        }
    }
    fn subcommand(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Router => "router",
        }
    }
    fn env_override(self) -> &'static str {
        match self {
            Role::Gateway => "JVPN_GATEWAY_BIN",
            Role::Router => "JVPN_ROUTER_BIN",
        }
    }
}

/// How to launch a gateway or router program.
#[derive(Clone, Debug)]
pub struct Launcher {
    program: PathBuf,
    prefix: Vec<String>,
}

impl Launcher {
    /// Resolves the gateway binary relative to `exe` (see module docs).
    pub fn resolve(exe: &Path) -> Self {
        Self::resolve_as(exe, Role::Gateway)
    }

    /// Resolves `role`'s binary: `$JVPN_<ROLE>_BIN`, else beside `exe`, else
    /// `exe` itself as a multi-call binary.
    pub fn resolve_as(exe: &Path, role: Role) -> Self {
        if let Some(p) = std::env::var_os(role.env_override()) {
            return Self {
                program: p.into(),
                prefix: vec![],
            };
        }
        let mut dirs = vec![];
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf()); // target/<profile>/deps → target/<profile>
            }
        }
        for d in dirs {
            let cand = d.join(role.binary());
            if cand.is_file() {
                return Self {
                    program: cand,
                    prefix: vec![],
                };
            }
        }
        Self {
            program: exe.to_path_buf(),
            prefix: vec![role.subcommand().into()],
        }
    }

    /// For integration tests of this crate: the real gateway binary if
    /// built, else the multi-call load tool.
    pub fn for_tests(loadtest_bin: &str) -> Self {
        Self::for_tests_as(loadtest_bin, Role::Gateway)
    }

    pub fn for_tests_as(loadtest_bin: &str, role: Role) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(loadtest_bin));
        let found = Self::resolve_as(&exe, role);
        if found.prefix.is_empty() {
            found
        } else {
            Self {
                program: loadtest_bin.into(),
                prefix: vec![role.subcommand().into()],
            }
        }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The same program started with a soft open-file limit of `soft`
    /// (`prlimit`, util-linux), as from a shell that leaves it at 1,024.
    pub fn with_soft_nofile(self, soft: u64) -> Self {
        let mut prefix = vec![
            format!("--nofile={soft}:"),
            self.program.display().to_string(),
        ];
        prefix.extend(self.prefix);
        Self {
            program: "prlimit".into(),
            prefix,
        }
    }

    /// The same program with an open-file limit of `n`, soft and hard, and
    /// without the capability to raise it (`setpriv`, util-linux), as on a
    /// host whose limit is low.
    pub fn with_nofile(self, n: u64) -> Self {
        let mut prefix = vec![
            format!("--nofile={n}:{n}"),
            "setpriv".to_owned(),
            "--bounding-set".to_owned(),
            "-sys_resource".to_owned(),
            self.program.display().to_string(),
        ];
        prefix.extend(self.prefix);
        Self {
            program: "prlimit".into(),
            prefix,
        }
    }

    /// The same program under `taskset -c <cpu>`.
    pub fn pinned(self, cpu: usize) -> Self {
        let mut prefix = vec![
            "-c".to_owned(),
            cpu.to_string(),
            self.program.display().to_string(),
        ];
        prefix.extend(self.prefix);
        Self {
            program: "taskset".into(),
            prefix,
        }
    }

    /// The same program inside network namespace `name` (`ip netns exec`,
    /// which execs it: the child's pid is the program's).
    pub fn in_netns(&self, name: &str) -> Self {
        let mut prefix = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            name.to_owned(),
            self.program.display().to_string(),
        ];
        prefix.extend(self.prefix.iter().cloned());
        Self {
            program: "ip".into(),
            prefix,
        }
    }

    /// Runs `<program> run --config CONFIG`, logging to `log`, and waits for
    /// its `JVPN_READY k=addr …` line. Returns the child and those addresses.
    pub(crate) async fn spawn_ready(
        &self,
        config: &Path,
        log: &Path,
        env: &[(String, String)],
    ) -> Result<(Child, Vec<(String, SocketAddr)>)> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix)
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            ))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.program.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("JVPN_READY ") {
                    return Ok::<_, anyhow::Error>(Some(rest.to_owned()));
                }
            }
            Ok(None)
        })
        .await
        .context("process did not report readiness within 30 s")??;
        let Some(rest) = ready else {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("process exited before readiness:\n{text}");
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut addrs = Vec::new();
        for kv in rest.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                addrs.push((k.to_owned(), v.parse()?));
            }
        }
        Ok((child, addrs))
    }
}

pub(crate) fn addr_of(addrs: &[(String, SocketAddr)], key: &str) -> Result<SocketAddr> {
    addrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, a)| *a)
        .with_context(|| format!("no {key} address reported"))
}

pub(crate) async fn wait_http_ok(admin: SocketAddr, path: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((200, _)) = http_get(admin, path).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{path} not 200 within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn signal_child(child: &Child, sig: Signal) -> Result<()> {
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw)
        .context("process already exited")?;
    signal_pid(pid, sig)
}

/// Sends `sig` to `pid`; a SIGSTOP returns only once every thread of the
/// process has stopped. `kill` alone returns while threads still run (each
/// stops when next scheduled, which on a busy machine is later), and a
/// test pausing a process must know it runs no more code.
pub fn signal_pid(pid: Pid, sig: Signal) -> Result<()> {
    kill(pid, sig)?;
    if sig != Signal::SIGSTOP {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = threads_running(pid);
        if running == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{running} thread(s) of process {pid} still running 5 s after SIGSTOP");
        }
        // A scheduling quantum is milliseconds: poll well below it.
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// How many threads of `pid` are neither stopped nor dead (0 once the
/// process is gone).
fn threads_running(pid: Pid) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
            !matches!(state, Some('T' | 't' | 'Z' | 'X') | None)
        })
        .count()
}

/// The cluster name of every test and demo PKI.
pub const CLUSTER: &str = "jvpn-dev";

/// A development PKI in a directory that lives as long as this value.
#[derive(Debug)]
pub struct TestPki {
    pub layout: PkiLayout,
    _dir: Option<tempfile::TempDir>,
}

impl TestPki {
    /// The cluster keys derived from this PKI's cluster secret.
    pub fn cluster_keys(&self) -> Result<jvpn_proto::keys::ClusterKeys> {
        cluster_keys_in(&self.layout)
    }

    pub fn new(nodes: &[&str]) -> Result<Self> {
        Self::with_routers(nodes, &["r1"])
    }

    pub fn with_routers(nodes: &[&str], routers: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut p = Self::kept_in(&dir.path().join("pki"), nodes, routers)?;
        p._dir = Some(dir);
        Ok(p)
    }

    /// A PKI in `out`, kept: written there if it holds none, used again if
    /// it holds one with every certificate these nodes and routers need.
    pub fn kept_in(out: &Path, nodes: &[&str], routers: &[&str]) -> Result<Self> {
        let layout = PkiLayout {
            dir: out.to_path_buf(),
        };
        if !layout.secret().exists() {
            let layout = pki::init(&PkiSpec {
                out: out.to_path_buf(),
                cluster: CLUSTER.into(),
                nodes: nodes.iter().map(|s| (*s).to_owned()).collect(),
                routers: routers.iter().map(|s| (*s).to_owned()).collect(),
                agents: 2,
            })?;
            return Ok(Self { layout, _dir: None });
        }
        let needed = nodes
            .iter()
            .map(|n| layout.gateway_cert(n))
            .chain(routers.iter().map(|r| layout.router_cert(r)));
        for f in needed {
            if !f.is_file() {
                bail!(
                    "{} holds a PKI without {}: remove it, or choose another directory",
                    out.display(),
                    f.display()
                );
            }
        }
        Self::existing(out)
    }

    /// A PKI written earlier by `jvpn-gateway pki init --out DIR`.
    pub fn existing(dir: &Path) -> Result<Self> {
        let layout = PkiLayout {
            dir: dir.to_path_buf(),
        };
        if !layout.client_ca().is_file() || !layout.dev_token().is_file() {
            bail!(
                "{}: no client-ca.pem and dev-token (write one with jvpn-gateway pki init)",
                dir.display()
            );
        }
        Ok(Self { layout, _dir: None })
    }

    pub fn dev_token(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.layout.dev_token())?
            .trim()
            .to_owned())
    }
}

/// Options for one gateway process.
#[derive(Clone, Debug, Default)]
pub struct GatewayOptions {
    pub node_id: String,
    /// Extra TOML appended to the generated config (e.g. a `[policy]` table).
    pub extra_toml: String,
    /// Event sink path (empty: a file in the gateway's directory).
    pub events_path: Option<String>,
    /// Extra environment (e.g. `JVPN_GATEWAY__CLUSTER__ROUTERS`).
    pub env: Vec<(String, String)>,
    /// Extra keys for the `[cluster]` table (membership endpoints, routers).
    pub cluster_toml: String,
    /// Address to listen on (client and admin ports); default 127.0.0.1.
    pub bind_ip: Option<IpAddr>,
}

/// A running gateway process. Killed on drop.
#[derive(Debug)]
pub struct LocalGateway {
    child: Child,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: PathBuf,
    pub events_path: String,
    pub config_path: PathBuf,
}

/// Writes a gateway config for `opts` into `dir`; returns its path.
pub fn write_config(pki: &TestPki, dir: &Path, opts: &GatewayOptions) -> Result<(PathBuf, String)> {
    let l = &pki.layout;
    let node = if opts.node_id.is_empty() {
        "g1"
    } else {
        &opts.node_id
    };
    let events = opts
        .events_path
        .clone()
        .unwrap_or_else(|| dir.join("events.jsonl").display().to_string());
    let ip = opts.bind_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let text = format!(
        r#"node_id = "{node}"
client_addr = "{ip}:0"
admin_addr = "{ip}:0"

[tls]
cert_file = "{cert}"
key_file = "{key}"
agent_ca_file = "{agent_ca}"

[auth]
dev_tokens = ["{token}"]

[cluster]
secret_file = "{secret}"
{cluster_extra}

[events]
path = "{events}"

{extra}
"#,
        cert = l.gateway_cert(node).display(),
        key = l.gateway_key(node).display(),
        agent_ca = l.agent_ca().display(),
        token = pki.dev_token()?,
        secret = l.secret().display(),
        extra = opts.extra_toml,
        cluster_extra = opts.cluster_toml,
    );
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text)?;
    Ok((path, events))
}

impl LocalGateway {
    /// Starts a gateway and returns once `/readyz` answers 200.
    pub async fn start(
        launcher: &Launcher,
        pki: &TestPki,
        dir: &Path,
        opts: &GatewayOptions,
    ) -> Result<Self> {
        let (config_path, events_path) = write_config(pki, dir, opts)?;
        let (child, addrs) = launcher
            .spawn_ready(&config_path, &dir.join("gateway.log"), &opts.env)
            .await?;
        let gw = Self {
            child,
            client_addr: addr_of(&addrs, "client")?,
            admin_addr: addr_of(&addrs, "admin")?,
            dir: dir.to_path_buf(),
            events_path,
            config_path,
        };
        wait_http_ok(gw.admin_addr, "/readyz", Duration::from_secs(10)).await?;
        Ok(gw)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw)
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal_child(&self.child, sig)
    }

    pub async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait().await?)
    }

    /// Whether the process has exited (reaped if so).
    pub fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    pub async fn metrics(&self) -> Result<String> {
        scrape(self.admin_addr).await
    }

    /// Sum of all samples of a counter or gauge whose labels contain every `label=value` given.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, name, labels))
    }

    /// The gateway's log so far (for test failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("gateway.log")
    }
}

/// Sums the samples of `name` matching `labels` in Prometheus text format.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (head, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let base = head.split('{').next().unwrap_or("");
            base == name
                && labels
                    .iter()
                    .all(|(k, v)| head.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// `/metrics` of an admin port, which must answer 200.
pub async fn scrape(admin: SocketAddr) -> Result<String> {
    let (code, body) = http_get(admin, "/metrics").await?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    Ok(body)
}

/// Minimal HTTP/1.0 GET over loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, None).await
}

/// Minimal HTTP/1.0 request over loopback, with an optional bearer token.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw)).await??;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// The i-th loopback source address (127.0.1.0/24 upwards), so that agents
/// look like distinct sources to per-source limits.
pub fn source_ip(i: usize) -> IpAddr {
    let i = i as u32 + 256;
    IpAddr::V4(Ipv4Addr::new(
        127,
        ((i >> 16) & 0xff) as u8,
        ((i >> 8) & 0xff) as u8,
        (i & 0xff) as u8,
    ))
}

/// An agent configuration for the dev PKI, authenticating with the dev token.
pub fn agent_config(
    pki: &TestPki,
    servers: Vec<SocketAddr>,
    bind: Option<IpAddr>,
) -> Result<AgentConfig> {
    Ok(AgentConfig {
        servers,
        server_name: CLUSTER.into(),
        roots: Arc::new(AgentConfig::roots_from_pem(&pki.layout.client_ca())?),
        credential: Credential::Token(zeroize::Zeroizing::new(pki.dev_token()?.into_bytes())),
        bind_ip: bind,
        connect_timeout: Duration::from_secs(5),
    })
}

pub fn agent(pki: &TestPki, server: SocketAddr, bind: Option<IpAddr>) -> Result<Agent> {
    Ok(Agent::new(agent_config(pki, vec![server], bind)?)?)
}

/// Waits until `f` holds, polling; for conditions observed through metrics
/// or processes (never a fixed sleep).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The cluster keys derived from the cluster secret of a PKI tree.
pub fn cluster_keys_in(
    layout: &jvpn_gateway::pki::PkiLayout,
) -> Result<jvpn_proto::keys::ClusterKeys> {
    let secret = std::fs::read_to_string(layout.secret())?;
    Ok(secret
        .trim()
        .parse::<jvpn_proto::keys::ClusterSecret>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", layout.secret().display()))?
        .derive())
}
