//! Command line of `jvpn-router`: `run`, `check`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jvpn_runtime::process::{CheckArgs, RunArgs, check_config, run_service, shutdown_signal};

use crate::{config, server};

#[derive(Debug, Parser)]
#[command(name = "jvpn-router", version, about = "Jumping VPN front router")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Route clients until SIGTERM, then let spliced connections finish.
    Run(RunArgs),
    /// Validate a configuration (files included) without binding anything.
    Check(CheckArgs),
}

/// The whole `jvpn-router` program, for the binary and multi-call harnesses.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Check(a) => check_config(&a.config, config::load),
        Command::Run(a) => run_service(&a.config, a.log_format, config::load, |cfg| async move {
            run(cfg).await.map(|()| ExitCode::SUCCESS)
        }),
    }
}

async fn run(cfg: config::Validated) -> anyhow::Result<()> {
    let prom = jvpn_runtime::metrics::install_for("router", crate::metrics::describe)?;
    let bind = |a| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .map_err(|e| anyhow::anyhow!("bind {a}: {e}"))
    };
    let listeners = server::Listeners {
        client: bind(cfg.raw.client_addr).await?,
        membership: bind(cfg.raw.membership_addr).await?,
        admin: bind(cfg.raw.admin_addr).await?,
    };
    // Signal handlers before readiness (see `shutdown_signal`).
    let shutdown = shutdown_signal();
    jvpn_runtime::process::announce_ready(&format!(
        "client={} membership={} admin={}",
        listeners.client.local_addr()?,
        listeners.membership.local_addr()?,
        listeners.admin.local_addr()?
    ));
    Ok(server::serve(cfg, listeners, Some(prom), shutdown).await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_and_subcommand_has_help() {
        let cmd = <super::Cli as clap::CommandFactory>::command();
        jvpn_runtime::process::assert_every_flag_has_help(&cmd);
    }
}
