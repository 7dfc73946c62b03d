//! Command line of `jvpn-gateway`: `run`, `check`, `pki init`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::{config, metrics, pki, server};

#[derive(Debug, Parser)]
#[command(name = "jvpn-gateway", version, about = "Jumping VPN gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `run --config FILE [--log-format …]`, shared by every service binary.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `check --config FILE`, shared by every service binary.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub config: PathBuf,
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
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write CAs, certificates, keys (0600) and a cluster secret into DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "jvpn-dev")]
        cluster: String,
        #[arg(long, value_delimiter = ',', default_value = "g1")]
        nodes: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "r1")]
        routers: Vec<String>,
        #[arg(long, default_value_t = 2)]
        agents: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs go to stderr; ANSI colours only on a terminal.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Human => b.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// sysexits EX_USAGE: the configuration is wrong.
pub const EXIT_CONFIG: u8 = 64;

/// The whole `jvpn-gateway` program, for the binary and for multi-call harnesses.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Check(a) => check_config(&a.config, config::load),
        Command::Pki {
            command:
                PkiCommand::Init {
                    out,
                    cluster,
                    nodes,
                    routers,
                    agents,
                },
        } => {
            match pki::init(&pki::PkiSpec {
                out: out.clone(),
                cluster,
                nodes,
                routers,
                agents,
            }) {
                Ok(_) => {
                    println!("development PKI written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pki init: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(a) => run_service(&a.config, a.log_format, config::load, |cfg| async move {
            Ok(match run(cfg).await? {
                server::Exit::Drained => ExitCode::SUCCESS,
                server::Exit::Superseded => ExitCode::from(EXIT_SUPERSEDED),
            })
        }),
    }
}

/// `check --config PATH`: 0 and `ok`, or 64 after naming every bad key.
pub fn check_config<T>(
    path: &std::path::Path,
    load: impl FnOnce(&std::path::Path) -> Result<T, config::ConfigErrors>,
) -> ExitCode {
    match load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!("{}: invalid configuration", path.display());
            for p in errs.0 {
                eprintln!("  {p}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `run --config PATH`: tracing, then the configuration (64 when bad, every
/// key logged), then `serve` on a multi-threaded runtime.
pub fn run_service<T, F>(
    path: &std::path::Path,
    log_format: LogFormat,
    load: impl FnOnce(&std::path::Path) -> Result<T, config::ConfigErrors>,
    serve: impl FnOnce(T) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    init_tracing(log_format);
    let cfg = match load(path) {
        Ok(c) => c,
        Err(errs) => {
            for p in errs.0 {
                tracing::error!(key = %p.key, "{}", p.problem);
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a gateway superseded by a newer incarnation of its node id
/// (sysexits EX_TEMPFAIL; systemd units keep it from restarting in a loop).
pub const EXIT_SUPERSEDED: u8 = 75;

async fn run(cfg: config::Validated) -> anyhow::Result<server::Exit> {
    raise_nofile();
    // Held until the process exits.
    let _lock = match &cfg.raw.state_dir {
        Some(dir) => Some(lock_state_dir(dir)?),
        None => None,
    };
    let prom = metrics::install()?;
    let client = tokio::net::TcpListener::bind(cfg.raw.client_addr).await?;
    let admin = tokio::net::TcpListener::bind(cfg.raw.admin_addr).await?;
    let shutdown = shutdown_signal();
    announce_ready(&format!(
        "client={} admin={}",
        client.local_addr()?,
        admin.local_addr()?
    ));
    server::serve(cfg, client, admin, Some(prom), shutdown).await
}

/// Every listener is bound: one line on stdout for harnesses (ports may have
/// been 0) and `READY=1` to systemd when started by a `Type=notify` unit.
pub fn announce_ready(addrs: &str) {
    println!("JVPN_READY {addrs}");
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// On every SIGHUP, `apply(path)` re-reads and applies the configuration;
/// a refusal leaves the running one as it was. Counted in `[applied,
/// refused]`. Shared by every service binary.
pub async fn reload_on_hangup(
    path: std::path::PathBuf,
    apply: impl Fn(&std::path::Path) -> Result<(), String>,
    counters: [&'static str; 2],
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reloads are unavailable");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match apply(&path) {
            Ok(()) => {
                ::metrics::counter!(counters[0]).increment(1);
                tracing::info!("configuration reloaded");
            }
            Err(why) => {
                ::metrics::counter!(counters[1]).increment(1);
                tracing::error!(%why, "reload refused; the running configuration is unchanged");
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT, telling systemd the service is stopping.
/// The handlers are installed when this is called, not when it is first
/// polled: call it before announcing readiness, or a SIGTERM sent right
/// after `READY=1` would kill the process undrained (default action).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending::<()>().await,
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
}

/// Every connection is a file descriptor: use as many as allowed (raising
/// the hard limit too when privileged), and say when that is not possible.
/// Returns the soft limit in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 262_144;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if hard < WANT && setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_ok() {
        return WANT;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::warn!(soft, hard, "could not raise the open-file limit");
        return soft;
    }
    hard.max(soft)
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
