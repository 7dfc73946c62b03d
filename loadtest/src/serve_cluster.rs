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
    /// Where `prometheus.yml`, `alerts.yml` and the cluster's PKI go.
    pub dir: PathBuf,
}

/// The scrape configuration for a running cluster's admin ports.
pub fn prometheus_yml(c: &LocalCluster) -> String {
    let quote = |a: std::net::SocketAddr| format!("\"{a}\"");
    let routers: Vec<String> = c.routers.iter().map(|r| quote(r.admin_addr)).collect();
    let gateways: Vec<String> = c
        .gateways
        .iter()
        .map(|(_, g)| quote(g.admin_addr))
        .collect();
    format!(
        "# Written by `jvpn-loadtest cluster` for the processes it started.\n\
         global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n\
         rule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: jvpn-router\n    static_configs:\n      - targets: [{}]\n\
         \x20 - job_name: jvpn-gateway\n    static_configs:\n      - targets: [{}]\n",
        routers.join(", "),
        gateways.join(", ")
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
            ..ClusterOptions::default()
        },
    )
    .await?;
    std::fs::create_dir_all(&opts.dir)?;
    write(&opts.dir, "prometheus.yml", &prometheus_yml(&c))?;
    write(&opts.dir, "alerts.yml", ALERTS)?;
    let pki = opts.dir.join("pki");
    copy_dir(&c.pki.layout.dir, &pki)?;
    let routers: Vec<String> = c.router_addrs().iter().map(ToString::to_string).collect();
    println!(
        "cluster up: {} routers, {} gateways",
        c.routers.len(),
        c.gateways.len()
    );
    for r in &c.routers {
        println!(
            "  router {}  client {}  admin http://{}/ring",
            r.router_id, r.client_addr, r.admin_addr
        );
    }
    for (n, gw) in &c.gateways {
        println!("  gateway {n}  admin http://{}/sessions", gw.admin_addr);
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

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}
