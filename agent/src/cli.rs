//! Command line of `jvpn-agent`: `connect` keeps one session alive and prints
//! every transition. Lives in the library so multi-call harnesses can run it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::frontdoor::serve::{check_bind, serve_forward, serve_proxy};
use crate::{Agent, AgentConfig, AgentReport, Command, Credential, keep_alive};
use anyhow::Context;
use clap::{Parser, Subcommand};
use jvpn_proto::stream::Target;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(name = "jvpn-agent", version, about = "Jumping VPN client agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The command line as clap sees it (tests check the docs' commands
/// against it).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open a session and keep it alive; press Enter to force a transport jump.
    Connect {
        /// Gateway (single node) or router addresses, HOST:PORT,
        /// comma-separated; host names are resolved once at start.
        #[arg(long, value_delimiter = ',', required = true)]
        server: Vec<String>,
        /// CA that signed the gateway certificates (client-ca.pem).
        #[arg(long)]
        ca: PathBuf,
        /// TLS name of the gateways (the cluster name).
        #[arg(long, default_value = "jvpn-dev")]
        server_name: String,
        /// Development token file.
        #[arg(long, conflicts_with_all = ["cert", "key"])]
        token_file: Option<PathBuf>,
        /// Client certificate chain (PEM), with --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key of --cert (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Local address to connect from.
        #[arg(long)]
        bind: Option<IpAddr>,
        /// Force a transport jump every N seconds.
        #[arg(long)]
        jump_every_s: Option<u64>,
        /// Stop after this many seconds (whatever the agent is waiting for).
        #[arg(long)]
        duration_s: Option<u64>,
        /// Serve SOCKS5 and HTTP CONNECT here (e.g. 127.0.0.1:1080): each
        /// connection becomes a stream through the session.
        #[arg(long)]
        socks: Option<SocketAddr>,
        /// LOCAL=HOST:PORT: connections to LOCAL become streams to
        /// HOST:PORT (resolved at the gateway). Repeatable.
        #[arg(long = "forward", value_parser = parse_forward)]
        forwards: Vec<(SocketAddr, Target)>,
        /// Let front doors listen on addresses other than loopback (anyone
        /// who can reach them can use the session).
        #[arg(long)]
        allow_non_loopback: bool,
    },
}

fn parse_forward(s: &str) -> Result<(SocketAddr, Target), String> {
    let (local, remote) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LOCAL=HOST:PORT"))?;
    let local: SocketAddr = local
        .parse()
        .map_err(|e| format!("{local:?}: {e} (LOCAL is ip:port)"))?;
    let target = Target::parse_authority(remote).map_err(|e| format!("{remote:?}: {e}"))?;
    Ok((local, target))
}

/// The whole `jvpn-agent` program.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> std::process::ExitCode {
    let cli = Cli::parse_from(args);
    // Each front-door connection is a descriptor, and transports must
    // still open when the doors are full (the doors' bound follows this).
    jvpn_runtime::process::raise_nofile();
    let run = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match run {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jvpn-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cmd::Connect {
        server,
        ca,
        server_name,
        token_file,
        cert,
        key,
        bind,
        jump_every_s,
        duration_s,
        socks,
        forwards,
        allow_non_loopback,
    } = cli.command;
    let credential = match (token_file, cert, key) {
        (Some(f), _, _) => {
            let tok = std::fs::read_to_string(&f)
                .with_context(|| format!("--token-file {}", f.display()))?;
            Credential::Token(zeroize::Zeroizing::new(tok.trim().as_bytes().to_vec()))
        }
        (None, Some(c), Some(k)) => {
            for (flag, path) in [("--cert", &c), ("--key", &k)] {
                readable(flag, path)?;
            }
            AgentConfig::certificate_from_pem(&c, &k)?
        }
        _ => anyhow::bail!("give --token-file, or --cert and --key"),
    };
    readable("--ca", &ca)?;
    let roots =
        AgentConfig::roots_from_pem(&ca).with_context(|| format!("--ca {}", ca.display()))?;
    // Resolution waits no longer than the run may last.
    let resolving = Duration::from_secs(duration_s.unwrap_or(30).clamp(1, 30));
    let servers = tokio::time::timeout(resolving, resolve(&server))
        .await
        .map_err(|_| anyhow::anyhow!("--server: names not resolved within {resolving:?}"))??;
    let cfg = AgentConfig {
        servers,
        server_name,
        roots: Arc::new(roots),
        credential,
        bind_ip: bind,
        connect_timeout: Duration::from_secs(5),
    };
    let mut agent = Agent::new(cfg)?;
    let mut doors = Vec::new();
    if socks.is_some() || !forwards.is_empty() {
        let tunnel = agent.tunnel();
        if let Some(addr) = socks {
            check_bind(addr, allow_non_loopback)?;
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("--socks {addr}"))?;
            println!("socks5 and http connect on {}", l.local_addr()?);
            doors.push(tokio::spawn(serve_proxy(l, tunnel.clone())));
        }
        for (addr, target) in forwards {
            check_bind(addr, allow_non_loopback)?;
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("--forward {addr}"))?;
            println!("forward {} -> {target}", l.local_addr()?);
            doors.push(tokio::spawn(serve_forward(l, tunnel.clone(), target)));
        }
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (line_tx, mut line_rx) = mpsc::unbounded_channel();
    let report = Arc::new(Mutex::new(AgentReport::default()));
    tokio::spawn(async move {
        while let Some(line) = line_rx.recv().await {
            println!("{line}");
        }
    });
    if let Some(s) = jump_every_s {
        let tx = cmd_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(s.max(1))).await;
                if tx.send(Command::Jump).await.is_err() {
                    return;
                }
            }
        });
    }
    {
        let tx = cmd_tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let _ = tx.blocking_send(Command::Jump);
                line.clear();
            }
        });
    }
    // The agent process's heap is its own: free pages go back after bursts.
    let _reclaim = jvpn_runtime::memory::reclaim_after_bursts(|_| {});
    let run = tokio::spawn(keep_alive(agent, cmd_rx, Some(line_tx), report.clone()));
    let stop = stop_requested(duration_s);
    tokio::pin!(run, stop);
    let mut stopped = false;
    let final_report = tokio::select! {
        r = &mut run => r?,
        why = &mut stop => {
            stopped = true;
            println!("stopping: {why}");
            // Close ends the session with Terminate when attached; while the
            // agent waits (handshake retries, reattach) it cannot, and the
            // report is taken as it stands.
            // Bounded: a full command queue (jumps piling up while the
            // agent waits) must not keep it from stopping.
            let _ = tokio::time::timeout(STOP_GRACE / 4, cmd_tx.send(Command::Close)).await;
            match tokio::time::timeout(STOP_GRACE, &mut run).await {
                Ok(r) => r?,
                Err(_) => {
                    run.abort();
                    report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
                }
            }
        }
    };
    drop(cmd_tx);
    for d in doors {
        d.abort();
    }
    println!("{}", serde_json::to_string_pretty(&final_report)?);
    if final_report.sessions_established == 0 {
        anyhow::bail!(
            "never connected: {}",
            final_report
                .ended
                .as_deref()
                .unwrap_or("no handshake completed")
        );
    }
    if !stopped {
        // Nobody asked it to stop: a supervisor must see a failure.
        anyhow::bail!(
            "the agent stopped on its own: {}",
            final_report
                .ended
                .as_deref()
                .unwrap_or("no reason recorded")
        );
    }
    Ok(())
}

/// How long a stopping agent may take to end its session.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Resolves when the agent should stop: `--duration-s` elapsed, or SIGINT
/// or SIGTERM arrived. Says which.
async fn stop_requested(duration_s: Option<u64>) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let deadline = async {
        match duration_s {
            Some(d) => tokio::time::sleep(Duration::from_secs(d)).await,
            None => std::future::pending().await,
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        deadline.await;
        return "duration elapsed";
    };
    tokio::select! {
        () = deadline => "duration elapsed",
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Fails naming `flag` when `path` cannot be read.
fn readable(flag: &str, path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .with_context(|| format!("{flag} {}", path.display()))
}

/// Every address of every `--server` (HOST:PORT), in order, once each.
async fn resolve(servers: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for s in servers {
        let addrs = tokio::net::lookup_host(s.as_str())
            .await
            .with_context(|| format!("--server {s}: expected HOST:PORT that resolves"))?;
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "--server: no address");
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_and_subcommand_has_help() {
        let cmd = <super::Cli as clap::CommandFactory>::command();
        jvpn_runtime::process::assert_every_flag_has_help(&cmd);
    }
}
