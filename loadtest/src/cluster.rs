//! A local cluster of real processes on loopback: routers first (ephemeral
//! ports), then gateways heartbeating to them over mTLS. Everything the
//! acceptance tests and the demo need: scale-out, restarts, signals, and
//! waiting on what the routers report (never a fixed sleep).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio::process::Child;

use crate::harness::{
    CLUSTER, GatewayOptions, Launcher, LocalGateway, Role, TestPki, addr_of, eventually, http_get,
    metric_value, signal_child, wait_http_ok,
};
use crate::netns::GatewayNet;

/// Options for one router process.
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    pub router_id: String,
    /// Fixed addresses (a restarted router keeps its ports); `None`: port 0.
    pub client_addr: Option<SocketAddr>,
    pub membership_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// TOML appended after the generated tables (new tables only).
    pub extra_toml: String,
    /// `JVPN_ROUTER__…` overrides.
    pub env: Vec<(String, String)>,
}

/// A running router process. Killed on drop.
#[derive(Debug)]
pub struct LocalRouter {
    child: Child,
    pub router_id: String,
    pub client_addr: SocketAddr,
    pub membership_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
}

fn addr_or_any(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string())
}

/// Writes a router config for `opts` into `dir`.
pub fn write_router_config(pki: &TestPki, dir: &Path, opts: &RouterOptions) -> Result<PathBuf> {
    let l = &pki.layout;
    let r = &opts.router_id;
    let text = format!(
        r#"router_id = "{r}"
client_addr = "{client}"
membership_addr = "{membership}"
admin_addr = "{admin}"

[cluster]
name = "{CLUSTER}"
secret_file = "{secret}"

[membership]
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{ca}"

{extra}
"#,
        client = addr_or_any(opts.client_addr),
        membership = addr_or_any(opts.membership_addr),
        admin = addr_or_any(opts.admin_addr),
        secret = l.secret().display(),
        cert = l.router_cert(r).display(),
        key = l.router_key(r).display(),
        ca = l.membership_ca().display(),
        extra = opts.extra_toml,
    );
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{r}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

impl LocalRouter {
    /// Starts a router and returns once `/healthz` answers.
    pub async fn start(
        launcher: &Launcher,
        pki: &TestPki,
        dir: &Path,
        opts: &RouterOptions,
    ) -> Result<Self> {
        let config_path = write_router_config(pki, dir, opts)?;
        let log = dir.join(format!("{}.log", opts.router_id));
        let (child, addrs) = launcher.spawn_ready(&config_path, &log, &opts.env).await?;
        let r = Self {
            child,
            router_id: opts.router_id.clone(),
            client_addr: addr_of(&addrs, "client")?,
            membership_addr: addr_of(&addrs, "membership")?,
            admin_addr: addr_of(&addrs, "admin")?,
            dir: dir.to_path_buf(),
            config_path,
        };
        wait_http_ok(r.admin_addr, "/healthz", Duration::from_secs(10)).await?;
        Ok(r)
    }

    /// Options that restart this router on the same ports.
    pub fn same_ports(&self) -> RouterOptions {
        RouterOptions {
            router_id: self.router_id.clone(),
            client_addr: Some(self.client_addr),
            membership_addr: Some(self.membership_addr),
            admin_addr: Some(self.admin_addr),
            ..RouterOptions::default()
        }
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal_child(&self.child, sig)
    }

    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw)
    }

    pub async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.child.wait().await?)
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// `/ring` as JSON.
    pub async fn ring(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.admin_addr, "/ring").await?;
        if code != 200 {
            bail!("/ring answered {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Node ids this router currently places sessions on.
    pub async fn placeable(&self) -> Result<BTreeSet<String>> {
        Ok(members_where(&self.ring().await?, "placeable"))
    }

    /// Node ids this router considers alive.
    pub async fn alive(&self) -> Result<BTreeSet<String>> {
        Ok(members_where(&self.ring().await?, "alive"))
    }

    pub async fn view_id(&self) -> Result<String> {
        Ok(self.ring().await?["view_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn metrics(&self) -> Result<String> {
        crate::harness::scrape(self.admin_addr).await
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, name, labels))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.router_id))
    }
}

/// Node ids whose `/ring` entry has `flag` true.
pub fn members_where(ring: &serde_json::Value, flag: &str) -> BTreeSet<String> {
    ring["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m[flag].as_bool() == Some(true))
                .filter_map(|m| m["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The `[cluster]` keys that put gateway `node` behind routers whose
/// membership endpoints are `endpoints` (routers connect from 127.0.0.1).
pub fn gateway_cluster_toml(pki: &TestPki, node: &str, endpoints: &[SocketAddr]) -> String {
    gateway_cluster_toml_from(pki, node, IpAddr::V4(Ipv4Addr::LOCALHOST), endpoints)
}

/// [`gateway_cluster_toml`] with routers connecting from `router_ip`.
pub fn gateway_cluster_toml_from(
    pki: &TestPki,
    node: &str,
    router_ip: IpAddr,
    endpoints: &[SocketAddr],
) -> String {
    let l = &pki.layout;
    let endpoints: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"name = "{CLUSTER}"
routers = ["{router_ip}"]
membership_endpoints = [{endpoints}]
membership_cert_file = "{cert}"
membership_key_file = "{key}"
membership_ca_file = "{ca}""#,
        endpoints = endpoints.join(", "),
        cert = l.membership_cert(node).display(),
        key = l.membership_key(node).display(),
        ca = l.membership_ca().display(),
    )
}

/// Placeholder in [`ClusterOptions::gateway_extra_toml`]: where a gateway
/// reaches services of the caller's namespace (etcd, an egress target).
pub const HUB_IP: &str = "{hub_ip}";

/// Shape of a local cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub gateways: usize,
    pub routers: usize,
    /// Node ids with certificates but not started (for scale-out and restarts).
    pub spare_gateways: usize,
    /// Appended to every gateway config (e.g. a `[policy]` table);
    /// [`HUB_IP`] in it becomes the address the gateway reaches the
    /// caller's namespace at (loopback without `netns`).
    pub gateway_extra_toml: String,
    pub gateway_env: Vec<(String, String)>,
    pub router_env: Vec<(String, String)>,
    /// Each gateway in a network namespace of its own, linked to the
    /// caller's (see [`crate::netns`]; the caller must have entered a private
    /// namespace first). Routers then listen for heartbeats on every address.
    pub netns: bool,
    /// Keep configs and logs here (created if missing) instead of a
    /// temporary directory removed with the cluster.
    pub dir: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            gateways: 3,
            routers: 1,
            spare_gateways: 1,
            gateway_extra_toml: String::new(),
            gateway_env: Vec::new(),
            router_env: Vec::new(),
            netns: false,
            dir: None,
        }
    }
}

/// Where a cluster's configs and logs go: a temporary directory removed
/// with the cluster, or one the caller keeps ([`ClusterOptions::dir`]).
#[derive(Debug)]
pub enum ClusterDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl ClusterDir {
    pub fn path(&self) -> &Path {
        match self {
            ClusterDir::Temp(t) => t.path(),
            ClusterDir::Kept(p) => p,
        }
    }
}

/// Routers and gateways as separate processes, in one directory.
#[derive(Debug)]
pub struct LocalCluster {
    pub pki: TestPki,
    pub gateway_launcher: Launcher,
    pub router_launcher: Launcher,
    pub dir: ClusterDir,
    pub opts: ClusterOptions,
    pub routers: Vec<LocalRouter>,
    /// Gateways by start order; a killed one stays here, exited.
    pub gateways: Vec<(String, LocalGateway)>,
    starts: usize,
    /// Each node's network namespace (with `netns`); dropped after the
    /// processes in them.
    pub nets: BTreeMap<String, GatewayNet>,
}

/// Node id of the i-th gateway (0-based): `g1`, `g2`, ….
pub fn node_name(i: usize) -> String {
    format!("g{}", i + 1)
}

impl LocalCluster {
    /// Starts routers, then gateways, and waits until every router places
    /// sessions on every gateway.
    pub async fn start(
        gateway_launcher: Launcher,
        router_launcher: Launcher,
        opts: ClusterOptions,
    ) -> Result<Self> {
        let nodes: Vec<String> = (0..opts.gateways + opts.spare_gateways)
            .map(node_name)
            .collect();
        let routers: Vec<String> = (0..opts.routers).map(|i| format!("r{}", i + 1)).collect();
        let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let router_refs: Vec<&str> = routers.iter().map(String::as_str).collect();
        // A kept directory (absolute: configs name files in it) keeps its
        // PKI too, since the configs there point at it.
        let mut opts = opts;
        if let Some(d) = &opts.dir {
            std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
            opts.dir = Some(d.canonicalize()?);
        }
        let pki = match &opts.dir {
            Some(d) => TestPki::kept_in(&d.join("pki"), &node_refs, &router_refs)?,
            None => TestPki::with_routers(&node_refs, &router_refs)?,
        };
        let _ = crate::bench::raise_nofile();
        let dir = match &opts.dir {
            Some(d) => ClusterDir::Kept(d.clone()),
            None => ClusterDir::Temp(tempfile::tempdir()?),
        };
        let mut c = Self {
            pki,
            gateway_launcher,
            router_launcher,
            dir,
            opts: opts.clone(),
            routers: Vec::new(),
            gateways: Vec::new(),
            starts: 0,
            nets: BTreeMap::new(),
        };
        if opts.netns {
            for (i, n) in nodes.iter().enumerate() {
                let index = u8::try_from(i + 1).context("too many gateways for namespaces")?;
                c.nets.insert(n.clone(), GatewayNet::create(index)?);
            }
        }
        for r in &routers {
            let ro = RouterOptions {
                router_id: r.clone(),
                env: c.router_env(),
                membership_addr: opts
                    .netns
                    .then(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
                ..RouterOptions::default()
            };
            let router = LocalRouter::start(&c.router_launcher, &c.pki, c.dir.path(), &ro).await?;
            c.routers.push(router);
        }
        for n in nodes.iter().take(opts.gateways) {
            c.start_gateway(n).await?;
        }
        c.wait_placeable(&nodes[..opts.gateways], Duration::from_secs(15))
            .await?;
        Ok(c)
    }

    /// The routers' environment: the options', plus (with namespaces) the
    /// gateways' addresses, which their certificates do not name.
    fn router_env(&self) -> Vec<(String, String)> {
        let mut env = self.opts.router_env.clone();
        if !self.nets.is_empty() {
            let ips: Vec<String> = self.nets.values().map(|n| n.ip.to_string()).collect();
            env.push((
                "JVPN_ROUTER__MEMBERSHIP__ADVERTISE_ALLOW".into(),
                ips.join(","),
            ));
        }
        env
    }

    /// The `[cluster]` keys that put a gateway behind this cluster's routers.
    pub fn gateway_cluster_toml(&self, node: &str) -> String {
        match self.nets.get(node) {
            None => {
                let endpoints: Vec<SocketAddr> =
                    self.routers.iter().map(|r| r.membership_addr).collect();
                gateway_cluster_toml(&self.pki, node, &endpoints)
            }
            // Routers are reached (and connect from) the hub's end of the link.
            Some(net) => {
                let endpoints: Vec<SocketAddr> = self
                    .routers
                    .iter()
                    .map(|r| SocketAddr::from((net.hub_ip, r.membership_addr.port())))
                    .collect();
                gateway_cluster_toml_from(&self.pki, node, IpAddr::V4(net.hub_ip), &endpoints)
            }
        }
    }

    /// Starts one more gateway process as `node` (a new incarnation if that
    /// node id ran before). Does not wait for routers to place it.
    pub async fn start_gateway(&mut self, node: &str) -> Result<&LocalGateway> {
        self.starts += 1;
        let dir = self.dir.path().join(format!("{node}-{}", self.starts));
        let opts = GatewayOptions {
            node_id: node.to_owned(),
            extra_toml: self.opts.gateway_extra_toml.replace(
                HUB_IP,
                &self
                    .nets
                    .get(node)
                    .map_or(Ipv4Addr::LOCALHOST, |n| n.hub_ip)
                    .to_string(),
            ),
            events_path: None,
            env: self.opts.gateway_env.clone(),
            cluster_toml: self.gateway_cluster_toml(node),
            bind_ip: self.nets.get(node).map(|n| IpAddr::V4(n.ip)),
        };
        let launcher = match self.nets.get(node) {
            Some(net) => self.gateway_launcher.in_netns(&net.name),
            None => self.gateway_launcher.clone(),
        };
        let gw = LocalGateway::start(&launcher, &self.pki, &dir, &opts).await?;
        self.gateways.push((node.to_owned(), gw));
        let (_, gw) = self.gateways.last().context("just pushed")?;
        Ok(gw)
    }

    /// The newest process of `node`.
    pub fn gateway(&self, node: &str) -> Result<&LocalGateway> {
        self.gateways
            .iter()
            .rev()
            .find(|(n, _)| n == node)
            .map(|(_, g)| g)
            .with_context(|| format!("no gateway {node}"))
    }

    pub fn gateway_mut(&mut self, node: &str) -> Result<&mut LocalGateway> {
        self.gateways
            .iter_mut()
            .rev()
            .find(|(n, _)| n == node)
            .map(|(_, g)| g)
            .with_context(|| format!("no gateway {node}"))
    }

    /// Client addresses of every router, for agents.
    pub fn router_addrs(&self) -> Vec<SocketAddr> {
        self.routers.iter().map(|r| r.client_addr).collect()
    }

    /// Waits until every router places HELLOs on exactly `nodes` (placeable,
    /// and each gateway holds a view that contains it).
    pub async fn wait_placeable(&self, nodes: &[String], within: Duration) -> Result<()> {
        let want: BTreeSet<String> = nodes.iter().cloned().collect();
        for r in &self.routers {
            let what = format!("router {} to place on {want:?}", r.router_id);
            eventually(within, &what, || async {
                r.ring().await.is_ok_and(|ring| {
                    members_where(&ring, "placeable") == want
                        && members_where(&ring, "hello_ready") == want
                })
            })
            .await?;
        }
        Ok(())
    }

    /// Waits until no router considers `node` alive.
    pub async fn wait_not_alive(&self, node: &str, within: Duration) -> Result<()> {
        for r in &self.routers {
            let what = format!("router {} to declare {node} not alive", r.router_id);
            eventually(within, &what, || async {
                r.alive().await.is_ok_and(|a| !a.contains(node))
            })
            .await?;
        }
        Ok(())
    }

    /// Kills router `i` and starts it again on the same ports.
    pub async fn restart_router(&mut self, i: usize) -> Result<()> {
        let mut opts = self.routers[i].same_ports();
        opts.env = self.router_env();
        self.routers[i].kill().await?;
        let r =
            LocalRouter::start(&self.router_launcher, &self.pki, self.dir.path(), &opts).await?;
        self.routers[i] = r;
        Ok(())
    }

    /// Sum of a metric over every router.
    pub async fn router_metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let mut sum = 0.0;
        for r in &self.routers {
            sum += r.metric(name, labels).await?;
        }
        Ok(sum)
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for r in &self.routers {
            out.push_str(&format!("==== router {}\n{}\n", r.router_id, r.log()));
        }
        for (n, g) in &self.gateways {
            out.push_str(&format!("==== gateway {n}\n{}\n", g.log()));
        }
        out
    }
}

/// Launchers for both roles, resolved like [`Launcher::resolve`].
pub fn launchers(exe: &Path) -> (Launcher, Launcher) {
    (
        Launcher::resolve_as(exe, Role::Gateway),
        Launcher::resolve_as(exe, Role::Router),
    )
}
