//! `jvpn-loadtest cluster`: a local cluster that stays up for an operator to
//! look at: routers and gateways as real processes on loopback, a
//! Prometheus scrape configuration for their admin ports next to the alert
//! rules of `deploy/prometheus`, and the agent command to point at it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cluster::{ClusterOptions, LocalCluster, launchers};

/// The alert rules shipped in `deploy/prometheus`, embedded so the
/// generated directory works from any checkout.
const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub gateways: usize,
    pub routers: usize,
    /// Where `prometheus.yml`, `alerts.yml`, the cluster's PKI and every
    /// process's config and log go; kept after the cluster stops.
    pub dir: PathBuf,
}

/// The scrape configuration for a running cluster's admin ports; each
/// target's `instance` label is its node name (`r1`, `g2`), as dashboards
/// and alerts show it.
pub fn prometheus_yml(c: &LocalCluster) -> String {
    let target = |a: std::net::SocketAddr, node: &str| {
        format!("      - targets: [\"{a}\"]\n        labels: {{instance: {node}}}\n")
    };
    let routers: String = c
        .routers
        .iter()
        .map(|r| target(r.admin_addr, &r.router_id))
        .collect();
    let gateways: String = c
        .gateways
        .iter()
        .map(|(n, g)| target(g.admin_addr, n))
        .collect();
    format!(
        "# Written by `jvpn-loadtest cluster` for the processes it started.\n\
         global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n\
         rule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: jvpn-router\n    static_configs:\n{routers}\
         \x20 - job_name: jvpn-gateway\n    static_configs:\n{gateways}"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
}

/// Starts the cluster, writes the files, prints how to use it, and keeps it
/// up until SIGTERM or Ctrl-C.
pub async fn run(opts: ServeOptions) -> Result<()> {
    let exe = std::env::current_exe()?;
    let (g, r) = launchers(&exe);
    let c = LocalCluster::start(
        g,
        r,
        ClusterOptions {
            gateways: opts.gateways.max(1),
            routers: opts.routers.max(1),
            dir: Some(opts.dir.clone()),
            ..ClusterOptions::default()
        },
    )
    .await?;
    write(&opts.dir, "prometheus.yml", &prometheus_yml(&c))?;
    write(&opts.dir, "alerts.yml", ALERTS)?;
    let pki = c.pki.layout.dir.clone();
    let routers: Vec<String> = c.router_addrs().iter().map(ToString::to_string).collect();
    println!(
        "cluster up: {} routers, {} gateways",
        c.routers.len(),
        c.gateways.len()
    );
    let pid = |p: Option<nix::unistd::Pid>| p.map_or_else(|| "-".to_owned(), |p| p.to_string());
    for r in &c.routers {
        println!(
            "  router {}  pid {}  client {}  membership {}  admin http://{}/ring  log {}  config {}",
            r.router_id,
            pid(r.pid()),
            r.client_addr,
            r.membership_addr,
            r.admin_addr,
            r.log_path().display(),
            r.config_path.display()
        );
    }
    for (n, gw) in &c.gateways {
        println!(
            "  gateway {n}  pid {}  client {}  admin http://{}/sessions  log {}  config {}  events {}",
            pid(gw.pid()),
            gw.client_addr,
            gw.admin_addr,
            gw.log_path().display(),
            gw.config_path.display(),
            gw.events_path
        );
    }
    println!(
        "prometheus: prometheus --config.file={}/prometheus.yml",
        opts.dir.display()
    );
    println!(
        "agent:      jvpn-agent connect --server {} --ca {}/client-ca.pem --server-name jvpn-dev --token-file {}/dev-token",
        routers.join(","),
        pki.display(),
        pki.display()
    );
    println!("JVPN_CLUSTER_READY dir={}", opts.dir.display());
    jvpn_runtime::process::shutdown_signal().await;
    drop(c);
    Ok(())
}
