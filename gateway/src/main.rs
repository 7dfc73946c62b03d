//! `jvpn-gateway`: thin main. tracing → config (binds nothing; exit 64 on a
//! bad config) → bind → serve → drain on SIGTERM/SIGINT. The program lives in
//! [`jvpn_gateway::cli::main_with`] so harnesses can run it multi-call.

fn main() -> std::process::ExitCode {
    jvpn_gateway::cli::main_with(std::env::args_os())
}
