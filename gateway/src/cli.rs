//! Command line of `jvpn-gateway`: `run`, `check`, `pki init`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "jvpn-gateway", version, about = "Jumping VPN gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve clients until SIGTERM, then drain.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Validate a configuration (files included) without binding anything.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
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
