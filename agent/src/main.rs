//! `jvpn-agent`: thin main around [`jvpn_agent::cli::main_with`].

fn main() -> std::process::ExitCode {
    jvpn_agent::cli::main_with(std::env::args_os())
}
