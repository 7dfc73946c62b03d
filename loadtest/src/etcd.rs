//! A real etcd cluster on loopback for topology 3's tests and runs: N
//! members of Debian's `etcd` (3.4), mTLS on the client and peer ports
//! under a CA of their own, data directories on tmpfs (`/dev/shm`: etcd
//! 3.4 cannot skip fsync). Members can be killed and started again.
//!
//! etcd cannot take port 0 once `--initial-cluster` names its peers, so
//! the ports are picked by binding port 0 and releasing it; a member that
//! then fails to bind is started again on fresh ports (bounded). A killed
//! member's ports are held by the harness until it is started again: a
//! restart cannot move them (its peers know its URLs), so another cluster
//! drawing them meanwhile would fail the test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use jvpn_gateway::pki::{self, EtcdPki};
use jvpn_gateway::store::{EtcdConfig, EtcdStore, EtcdTls};
use tokio::process::{Child, Command};

/// The etcd binary (Debian `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";

/// One member's addresses and process.
#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The ports of a killed member, bound until its restart.
    held: Vec<TcpListener>,
}

/// A running etcd cluster; killed (and its data removed) when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Client ports listen on every address (reached from namespaces).
    listen_all: bool,
    pki: EtcdPki,
    token: String,
    _dir: tempfile::TempDir,
    _data: tempfile::TempDir,
}

/// A loopback port free a moment ago, for etcd, which cannot take port 0.
/// Drawn below the kernel's ephemeral range, so the port-0 binds and
/// outgoing connections of every other process in a test run never land
/// on it between this check and etcd's bind; two etcd clusters drawing the
/// same port are caught by [`EtcdCluster::start`], which starts again.
pub fn free_port() -> Result<SocketAddr> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    for _ in 0..200 {
        let port = rand::Rng::random_range(&mut rand::rng(), from..to);
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok(l.local_addr()?);
        }
    }
    bail!("no free loopback port in {from}..{to}")
}

/// Attempts at starting a cluster whose ports another one took meanwhile.
const START_ATTEMPTS: usize = 3;

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers a read.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_reachable(n, &[]).await
    }

    /// [`Self::start`] with client ports on every address and member
    /// certificates naming `ips` too: for gateways in network namespaces,
    /// which reach the members at their hub address ([`crate::netns`]).
    pub async fn start_reachable(n: usize, ips: &[IpAddr]) -> Result<Self> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(n, ips).await {
                Ok(c) => return Ok(c),
                // Only a port taken between the draw and etcd's bind is
                // worth a new draw; anything else is the test's failure.
                Err(e) if e.to_string().contains("address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    async fn start_once(n: usize, ips: &[IpAddr]) -> Result<Self> {
        if !Path::new(ETCD).is_file() {
            bail!("{ETCD} not found: install Debian's etcd-server (.ci/run does)");
        }
        let dir = tempfile::tempdir()?;
        let shm = Path::new("/dev/shm");
        let data = if shm.is_dir() {
            tempfile::tempdir_in(shm)?
        } else {
            tempfile::tempdir()?
        };
        let pki = pki::mint_etcd_for(dir.path(), crate::harness::CLUSTER, n, ips)?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: free_port()?,
                peer: free_port()?,
                data: data.path().join(format!("m{i}")),
                child: None,
                log: dir.path().join(format!("etcd-m{i}.log")),
                held: Vec::new(),
            });
        }
        let token = format!("jvpn-test-{}", rand::random::<u64>());
        let mut c = Self {
            members,
            listen_all: !ips.is_empty(),
            pki,
            token,
            _dir: dir,
            _data: data,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_ready(Duration::from_secs(30)).await?;
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=https://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial = self.initial_cluster();
        let (cert, key) = self.pki.members[i].clone();
        let ca = self.pki.ca.clone();
        let token = self.token.clone();
        let m = &mut self.members[i];
        m.held.clear();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let client = format!("https://{}", m.client);
        let listen = if self.listen_all {
            format!("https://0.0.0.0:{}", m.client.port())
        } else {
            client.clone()
        };
        let peer = format!("https://{}", m.peer);
        let child = Command::new(ETCD)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-client-cert-auth")
            // A lost leader is replaced within 0.5–1 s: well inside the
            // gateways' lease deadline (2 s TTL, 300 ms margin, renewals
            // every TTL / 5), as docs/operations.md sizes it.
            .args(["--heartbeat-interval", "30", "--election-timeout", "300"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {ETCD}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// Client endpoints of the members (every member, running or not).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://{}", m.client))
            .collect()
    }

    /// A store configuration for this cluster with the gateways' client
    /// certificate.
    pub fn store_config(&self, prefix: &str, timeout: Duration) -> Result<EtcdConfig> {
        Ok(EtcdConfig {
            endpoints: self.endpoints(),
            prefix: prefix.to_owned(),
            tls: Some(self.client_tls()?),
            request_timeout: timeout,
        })
    }

    /// Where the members keep their data (tmpfs when there is one).
    pub fn data_dir(&self) -> &Path {
        self._data.path()
    }

    /// The certificate files (CA, members, the gateways' client pair).
    pub fn files(&self) -> &EtcdPki {
        &self.pki
    }

    /// A gateway's `[store]` table for this cluster.
    pub fn gateway_toml(&self) -> String {
        self.gateway_toml_via(&Ipv4Addr::LOCALHOST.to_string())
    }

    /// [`Self::gateway_toml`] reaching the members at `host` (their client
    /// ports): for a gateway in a namespace, its hub address.
    pub fn gateway_toml_via(&self, host: &str) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("\"https://{host}:{}\"", m.client.port()))
            .collect();
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [{}]\nca_file = \"{}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            eps.join(", "),
            self.pki.ca.display(),
            self.pki.client.0.display(),
            self.pki.client.1.display()
        )
    }

    /// The gateways' mTLS material for this cluster.
    pub fn client_tls(&self) -> Result<EtcdTls> {
        Ok(EtcdTls {
            ca_pem: std::fs::read(&self.pki.ca)?,
            cert_pem: std::fs::read(&self.pki.client.0)?,
            key_pem: std::fs::read(&self.pki.client.1)?,
        })
    }

    /// Kills member `i` (SIGKILL); its data stays, so [`Self::restart`]
    /// brings it back as the same member.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        if let Some(mut c) = m.child.take() {
            c.kill().await?;
            // The process is gone (waited for), so its listeners are
            // closed and the ports bind; std sets SO_REUSEADDR, so the
            // killed member's closing connections do not stand in the way.
            for addr in [m.client, m.peer] {
                m.held.push(
                    TcpListener::bind(addr)
                        .with_context(|| format!("holding killed etcd member {i}'s {addr}"))?,
                );
            }
        }
        Ok(())
    }

    /// Sends `sig` to member `i` (SIGSTOP/SIGCONT to pause it).
    pub fn signal(&self, i: usize, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.members[i]
            .child
            .as_ref()
            .and_then(Child::id)
            .with_context(|| format!("etcd member {i} is not running"))?;
        crate::harness::signal_pid(nix::unistd::Pid::from_raw(pid as i32), sig)
    }

    /// The running members' process ids (for CPU accounting).
    pub fn pids(&self) -> Vec<nix::unistd::Pid> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref()?.id())
            .map(|p| nix::unistd::Pid::from_raw(p as i32))
            .collect()
    }

    /// Writes `value` at `key` as it is, past every check of the store
    /// (etcd's JSON API, with curl): damaged or foreign records for tests.
    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let body = format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", b64(key), b64(value));
        let pki = &self.pki;
        let out = std::process::Command::new("curl")
            .arg("-sSf")
            .arg("--cacert")
            .arg(&pki.ca)
            .arg("--cert")
            .arg(&pki.client.0)
            .arg("--key")
            .arg(&pki.client.1)
            .arg(format!("{}/v3/kv/put", self.endpoints()[0]))
            .arg("-d")
            .arg(body)
            .output()?;
        if !out.status.success() {
            bail!("etcd put: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Whether member `i` has a process (killed members have none).
    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// The members' client ports (to cut a gateway off them).
    pub fn client_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.client.port()).collect()
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)
    }

    /// Member `i`'s log so far (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// Waits until a linearizable read succeeds through every running member.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let tls = self.client_tls()?;
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let store = EtcdStore::new(&EtcdConfig {
                endpoints: vec![format!("https://{}", m.client)],
                prefix: "/jvpn-ready".into(),
                tls: Some(tls.clone()),
                request_timeout: Duration::from_millis(500),
            })?;
            let probe = jvpn_proto::SessionId::from_bytes([0; 16]);
            let ok = crate::harness::eventually(within, "an etcd member to answer", || {
                let store = store.clone();
                // A member that could not bind has exited: stop waiting.
                let gave_up = self.log(i).contains("address already in use");
                async move { gave_up || store.load(&probe).await.is_ok() }
            })
            .await;
            let log = self.log(i);
            if ok.is_err() || log.contains("address already in use") {
                let e = ok
                    .err()
                    .map_or_else(|| "etcd failed".to_owned(), |e| e.to_string());
                bail!("{e}; etcd member {i} log:\n{log}");
            }
        }
        Ok(())
    }
}
