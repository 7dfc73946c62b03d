//! `jvpn-loadtest`: demo, and (multi-call) the gateway program itself, so a
//! fresh checkout needs only `cargo run -p jvpn-loadtest -- demo`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "jvpn-loadtest",
    version,
    about = "Jumping VPN load tool and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local deployment, run agents through transport jumps, print a summary.
    Demo {
        /// Print the summary as JSON only.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 20)]
        agents: usize,
    },
    /// Run the gateway program (same as the `jvpn-gateway` binary).
    #[command(disable_help_flag = true)]
    Gateway {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Gateway { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("jvpn-gateway")).chain(args);
            jvpn_gateway::cli::main_with(argv)
        }
        Cmd::Demo { json, agents } => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(jvpn_loadtest::demo::run(jvpn_loadtest::demo::DemoOptions {
                agents,
                json,
            })) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("demo: an invariant failed (see summary)");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
