fn main() -> std::process::ExitCode {
    jvpn_router::cli::main_with(std::env::args_os())
}
