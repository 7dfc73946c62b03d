//! Network namespaces for partition tests (as root): the test moves its own
//! thread into a fresh namespace (the hub, where routers, agents and the
//! test run), and each gateway gets a namespace of its own joined to the hub
//! by a veth pair. iptables rules inside a gateway's namespace then cut one
//! port of one gateway, as a real partition would, without touching the
//! host's network.
//!
//! Addresses: gateway `i` (1-based) is `10.77.i.2`, the hub's end of its
//! link `10.77.i.1`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

/// Runs `program args` to completion; its stdout, or an error naming the
/// command with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {program} (.ci/run installs it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into a new, empty network namespace with its
/// loopback up. Threads and processes it starts afterwards (a runtime built
/// on it, the cluster's processes) live there too; the rest of the test
/// binary does not.
pub fn enter_private_namespace() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) needs root")?;
    run("ip", &["link", "set", "lo", "up"]).map(drop)
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A gateway's namespace and its link to the hub. Deleted on drop.
#[derive(Debug)]
pub struct GatewayNet {
    /// The namespace's name (`ip netns exec <name>`).
    pub name: String,
    /// The gateway's address inside its namespace.
    pub ip: Ipv4Addr,
    /// The hub's end of the link: what the gateway connects to, and the
    /// source address routers connect from.
    pub hub_ip: Ipv4Addr,
}

impl GatewayNet {
    /// Creates namespace number `index` (1..=250) from the hub (the calling
    /// thread's namespace).
    pub fn create(index: u8) -> Result<Self> {
        if !(1..=250).contains(&index) {
            bail!("gateway namespace index {index} outside 1..=250");
        }
        let name = format!(
            "jvpn-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let net = Self {
            name,
            ip: Ipv4Addr::new(10, 77, index, 2),
            hub_ip: Ipv4Addr::new(10, 77, index, 1),
        };
        let hub_if = format!("vg{index}");
        let (hub_cidr, gw_cidr) = (format!("{}/24", net.hub_ip), format!("{}/24", net.ip));
        run(
            "ip",
            &[
                "link", "add", &hub_if, "type", "veth", "peer", "name", "eth0", "netns", &net.name,
            ],
        )?;
        run("ip", &["addr", "add", &hub_cidr, "dev", &hub_if])?;
        run("ip", &["link", "set", &hub_if, "up"])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &gw_cidr, "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            net.exec("ip", &args)?;
        }
        Ok(net)
    }

    /// Runs `program args` inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all).map(drop)
    }

    /// Silently drops every packet this gateway sends to TCP `port` (its
    /// membership connections to routers listening there).
    pub fn drop_outgoing_to(&self, port: u16) -> Result<()> {
        let port = port.to_string();
        self.exec(
            "iptables",
            &["-A", "OUTPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"],
        )
    }

    /// Silently drops every packet that arrives for this gateway's TCP
    /// `port` (its client port: routers' connects and spliced traffic).
    pub fn drop_incoming_to(&self, port: u16) -> Result<()> {
        let port = port.to_string();
        self.exec(
            "iptables",
            &["-A", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"],
        )
    }

    /// Removes every rule: the partition heals.
    pub fn heal(&self) -> Result<()> {
        self.exec("iptables", &["-F"])
    }
}

impl Drop for GatewayNet {
    fn drop(&mut self) {
        // Deleting the namespace also removes the veth pair.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
