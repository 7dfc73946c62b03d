//! What every service binary does around its server: the `run`/`check`
//! arguments, tracing, exit codes, readiness (stdout line and systemd
//! `READY=1`), SIGTERM/SIGINT, SIGHUP reloads and the open-file limit.
//!
//! A binary's `main` stays thin: parse arguments, then [`check_config`] or
//! [`run_service`] with its own `load` and `serve`.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;

use crate::config::ConfigErrors;

/// `run --config FILE [--log-format …]`, shared by every service binary.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The TOML configuration (docs/configuration.md); environment
    /// overrides apply on top.
    #[arg(long)]
    pub config: PathBuf,
    /// Log lines for people, or one JSON object per line for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `check --config FILE`, shared by every service binary.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The TOML configuration to validate (files it names included).
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs go to stderr; ANSI colours only on a terminal.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let base = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(secrets_stay_out));
    match format {
        LogFormat::Json => base.with(fmt.json()).init(),
        LogFormat::Human => base
            .with(fmt.with_ansi(std::io::stderr().is_terminal()))
            .init(),
    }
}

/// rustls logs handshake messages, resumption tickets included, at debug
/// and trace: those levels of its targets stay off whatever `RUST_LOG`
/// asks for.
fn secrets_stay_out(meta: &tracing::Metadata<'_>) -> bool {
    !meta.target().starts_with("rustls") || *meta.level() <= tracing::Level::INFO
}

/// sysexits EX_USAGE: the configuration is wrong.
pub const EXIT_CONFIG: u8 = 64;

/// `check --config PATH`: 0 and `ok`, or 64 after naming every bad key.
pub fn check_config<T>(
    path: &std::path::Path,
    load: impl FnOnce(&std::path::Path) -> Result<T, ConfigErrors>,
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
    load: impl FnOnce(&std::path::Path) -> Result<T, ConfigErrors>,
    serve: impl FnOnce(T) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    init_tracing(log_format);
    // Before the configuration: defaults derived from the open-file limit
    // (the gateway's `egress.max_streams`) see the raised one.
    raise_nofile();
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
pub async fn reload_on_hangup<E: Display>(
    path: std::path::PathBuf,
    apply: impl Fn(&std::path::Path) -> Result<(), E>,
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
                tracing::error!(why = %why, "reload refused; the running configuration is unchanged");
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

/// The process's soft open-file limit (1024 if it cannot be read).
pub fn open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
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

/// The host's CLOCK_MONOTONIC now, in nanoseconds: one clock shared by every
/// process on the host (a `std::time::Instant` cannot be compared across
/// processes), for stamps that tools order across processes.
pub fn host_monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let ns = i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec());
        u64::try_from(ns).unwrap_or(0)
    })
}

/// Fails (for a unit test) naming what `--help` leaves bare in `cmd`.
pub fn assert_every_flag_has_help(cmd: &clap::Command) {
    let bare = undocumented_flags(cmd);
    assert!(bare.is_empty(), "--help leaves these bare: {bare:?}");
}

/// Every flag, argument and subcommand of `cmd` (recursively) that has no
/// help text, as `"sub command --flag"`: what `--help` would leave bare.
pub fn undocumented_flags(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut out);
    out
}

fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        if a.get_help().is_none() && a.get_long_help().is_none() {
            let name = a
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| a.get_id().to_string());
            out.push(format!("{path} {name}"));
        }
    }
    for sub in cmd.get_subcommands() {
        let p = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() && sub.get_long_about().is_none() {
            out.push(p.clone());
        }
        walk(sub, &p, out);
    }
}
