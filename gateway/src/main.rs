//! `jvpn-gateway`: thin main. tracing → config (binds nothing; exit 64 on a
//! bad config) → bind → serve → drain on SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use jvpn_gateway::cli::{Cli, Command, PkiCommand};
use jvpn_gateway::{config, metrics, pki, server};

/// sysexits EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config: path } => match config::load(&path) {
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
        },
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
        Command::Run {
            config: path,
            log_format,
        } => {
            jvpn_gateway::cli::init_tracing(log_format);
            let cfg = match config::load(&path) {
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
            match rt.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: config::Validated) -> anyhow::Result<()> {
    let prom = metrics::install()?;
    let client = tokio::net::TcpListener::bind(cfg.raw.client_addr).await?;
    let admin = tokio::net::TcpListener::bind(cfg.raw.admin_addr).await?;
    // One line on stdout for harnesses (ports may have been 0).
    println!(
        "JVPN_READY client={} admin={}",
        client.local_addr()?,
        admin.local_addr()?
    );
    server::serve(cfg, client, admin, Some(prom), shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
