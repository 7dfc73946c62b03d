//! Command line of `jvpn-gateway`: `run`, `check`, `pki init`, `events timeline`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jvpn_runtime::process::{
    CheckArgs, RunArgs, announce_ready, check_config, run_service, shutdown_signal,
};

use crate::{config, metrics, pki, server};

#[derive(Debug, Parser)]
#[command(name = "jvpn-gateway", version, about = "Jumping VPN gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve clients until SIGTERM, then drain.
    Run(RunArgs),
    /// Validate a configuration (files included) without binding anything.
    Check(CheckArgs),
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Read event files.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// One session's life, or every session in a time window, across the
    /// event files of several gateways, in one clock-skew-safe order.
    Timeline {
        /// Event files (`events.path` of each gateway), in any order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A session id, or its first 8+ hex digits.
        #[arg(long)]
        session: Option<String>,
        /// Window start: `2026-12-04T17:00:00Z` (UTC) or ms since the epoch.
        #[arg(long)]
        from: Option<String>,
        /// Window end, as --from.
        #[arg(long)]
        to: Option<String>,
        /// Also write a self-contained HTML page here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write CAs, certificates, keys (0600) and a cluster secret into DIR.
    Init {
        /// Directory to write the PKI into (created).
        #[arg(long)]
        out: PathBuf,
        /// Cluster name: the TLS name agents check on every gateway.
        #[arg(long, default_value = "jvpn-dev")]
        cluster: String,
        /// Gateway node ids, comma-separated: one certificate each.
        #[arg(long, value_delimiter = ',', default_value = "g1")]
        nodes: Vec<String>,
        /// Router ids, comma-separated: one membership certificate each.
        #[arg(long, value_delimiter = ',', default_value = "r1")]
        routers: Vec<String>,
        /// Agent client certificates to issue (agents/agent-N.pem).
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Also an etcd CA with this many member certificates (loopback
        /// SANs) and a gateway client certificate, under etcd/ (topology 3
        /// on one host; 0: none).
        #[arg(long, default_value_t = 0)]
        etcd_members: usize,
    },
}

/// The whole `jvpn-gateway` program, for the binary and for multi-call harnesses.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Check(a) => check_config(&a.config, config::load_for_check),
        Command::Pki {
            command:
                PkiCommand::Init {
                    out,
                    cluster,
                    nodes,
                    routers,
                    agents,
                    etcd_members,
                },
        } => {
            let written = pki::init(&pki::PkiSpec {
                out: out.clone(),
                cluster: cluster.clone(),
                nodes,
                routers,
                agents,
            })
            .and_then(|_| match etcd_members {
                0 => Ok(()),
                n => pki::mint_etcd(&out, &cluster, n).map(|_| ()),
            });
            match written {
                Ok(()) => {
                    println!("development PKI written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pki init: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Events {
            command:
                EventsCommand::Timeline {
                    files,
                    session,
                    from,
                    to,
                    html,
                },
        } => match timeline(
            &files,
            session,
            from.as_deref(),
            to.as_deref(),
            html.as_deref(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("events timeline: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(a) => run_service(&a.config, a.log_format, config::load, |cfg| async move {
            Ok(match run(cfg).await? {
                server::Exit::Drained => ExitCode::SUCCESS,
                server::Exit::Superseded => ExitCode::from(EXIT_SUPERSEDED),
            })
        }),
    }
}

/// `events timeline`: reads, merges, selects, prints (and writes HTML).
fn timeline(
    files: &[PathBuf],
    session: Option<String>,
    from: Option<&str>,
    to: Option<&str>,
    html: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use crate::timeline as tl;
    use anyhow::Context;
    let time = |flag: &str, v: Option<&str>| -> anyhow::Result<Option<u64>> {
        v.map(|s| {
            tl::parse_time(s).with_context(|| {
                format!(
                    "{flag} {s}: expected YYYY-MM-DDTHH:MM:SS[.fff]Z (UTC) or ms since the epoch"
                )
            })
        })
        .transpose()
    };
    let filter = tl::Filter {
        session,
        from_ns: time("--from", from)?,
        to_ns: time("--to", to)?,
    };
    let mut parsed = tl::Parsed::default();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
        tl::parse(&text, &mut parsed);
    }
    let (merged, order) = tl::merge(parsed.events);
    let lives = tl::lives(&merged, &filter)?;
    print!("{}", tl::render_text(&lives, order, parsed.skipped));
    if let Some(path) = html {
        std::fs::write(path, tl::render_html(&lives, order, parsed.skipped))
            .with_context(|| format!("--html {}", path.display()))?;
    }
    Ok(())
}

/// Exit status of a gateway superseded by a newer incarnation of its node id
/// (sysexits EX_TEMPFAIL; systemd units keep it from restarting in a loop).
pub const EXIT_SUPERSEDED: u8 = 75;

async fn run(cfg: config::Validated) -> anyhow::Result<server::Exit> {
    // Held until the process exits.
    let _lock = match &cfg.raw.state_dir {
        Some(dir) => Some(lock_state_dir(dir)?),
        None => None,
    };
    let prom = metrics::install()?;
    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{key} {addr}: {e}"))
    };
    let client = bind("client_addr", cfg.raw.client_addr).await?;
    let admin = bind("admin_addr", cfg.raw.admin_addr).await?;
    let shutdown = shutdown_signal();
    announce_ready(&format!(
        "client={} admin={}",
        client.local_addr()?,
        admin.local_addr()?
    ));
    Ok(server::serve(cfg, client, admin, Some(prom), shutdown).await?)
}

/// Takes the exclusive lock on `dir/lock` (creating both), writing our pid.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            locked.set_len(0)?;
            locked.rewind()?;
            writeln!(locked, "{}", std::process::id())?;
            Ok(locked)
        }
        Err((mut file, _)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "state_dir {} is locked by another gateway (pid {}): refusing to run twice",
                dir.display(),
                holder.trim()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_and_subcommand_has_help() {
        let cmd = <super::Cli as clap::CommandFactory>::command();
        jvpn_runtime::process::assert_every_flag_has_help(&cmd);
    }
}
