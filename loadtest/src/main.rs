//! `jvpn-loadtest`: demo, and (multi-call) the gateway program itself, so a
//! fresh checkout needs only `cargo run -p jvpn-loadtest -- demo`.

use std::process::ExitCode;

use clap::Parser;
use jvpn_loadtest::cli::{Cli, Cmd, RunArgs};

fn run_scenario(a: RunArgs) -> ExitCode {
    use jvpn_loadtest::scenario::{RunOptions, Target};
    let target = match (a.local_cluster, a.routers.is_empty(), a.pki) {
        (Some(n), _, _) => Target::LocalCluster(n, a.local_routers),
        (None, false, Some(dir)) => Target::Routers(a.routers, dir),
        _ => Target::LocalCluster(3, a.local_routers),
    };
    let opts = RunOptions {
        target,
        scenario: a.scenario,
        sessions: a.sessions,
        rate: a.rate,
        duration: std::time::Duration::from_secs(a.duration_s),
        jump_every: std::time::Duration::from_secs(a.jump_every_s.max(1)),
        seed: a.seed,
        thresholds: a.threshold,
        loss_pct: a.loss_pct,
        flood_rate: a.flood_rate,
        heartbeat_interval: a
            .heartbeat_interval_ms
            .map(std::time::Duration::from_millis),
        // Sessions with a data plane carry streams, not the echo probe.
        echo_every: (a.echo_interval_ms > 0
            && a.scenario != jvpn_loadtest::scenario::Scenario::Bulk)
            .then(|| std::time::Duration::from_millis(a.echo_interval_ms)),
        streams_per_session: a.streams_per_session,
        transfer_bytes: a.transfer_bytes,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(jvpn_loadtest::scenario::run(opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("run: {e:#}");
            return ExitCode::from(2);
        }
    };
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    let summary = report.summary();
    match a.json.as_deref() {
        // `--json -`: JSON for a pipe on stdout, the summary beside it.
        Some(p) if p == std::path::Path::new("-") => {
            println!("{text}");
            eprint!("{summary}");
        }
        Some(path) => {
            if let Err(e) = std::fs::write(path, &text) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
            print!("{summary}");
        }
        None => print!("{summary}"),
    }
    if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A report with a verdict beyond "it ran".
struct Verdict<R> {
    report: R,
    failed: Option<String>,
}

trait Outcome {
    fn json(&self) -> String;
    fn failed(&self) -> Option<&str> {
        None
    }
}

impl<R: serde::Serialize> Outcome for R {
    fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl<R: serde::Serialize> Outcome for Verdict<R> {
    fn json(&self) -> String {
        self.report.json()
    }
    fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

fn print_json_report<R: Outcome>(
    name: &str,
    run: impl std::future::Future<Output = anyhow::Result<R>>,
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run) {
        Ok(r) => {
            println!("{}", r.json());
            match r.failed() {
                None => ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("{name}: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run(args) => run_scenario(args),
        Cmd::Report { file, html } => {
            let page = std::fs::read_to_string(&file)
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(serde_json::from_str::<serde_json::Value>(&t)?))
                .and_then(|v| jvpn_loadtest::report::render(&v));
            match page.and_then(|p| Ok(std::fs::write(&html, p)?)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("report {}: {e:#}", file.display());
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Agent { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("jvpn-agent")).chain(args);
            jvpn_agent::cli::main_with(argv)
        }
        Cmd::Gateway { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("jvpn-gateway")).chain(args);
            jvpn_gateway::cli::main_with(argv)
        }
        Cmd::Router { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("jvpn-router")).chain(args);
            jvpn_router::cli::main_with(argv)
        }
        Cmd::BenchGateway {
            duration_s,
            concurrency,
            sessions,
            agent_certs,
        } => {
            let opts = jvpn_loadtest::bench::BenchOptions {
                duration: std::time::Duration::from_secs(duration_s),
                concurrency,
                sessions,
                agent_certs,
            };
            match runtime().and_then(|rt| rt.block_on(jvpn_loadtest::bench::run(opts))) {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("bench failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Soak {
            sessions,
            warmup,
            concurrency,
        } => {
            let opts = jvpn_loadtest::soak::SoakOptions {
                sessions,
                warmup,
                concurrency,
            };
            match runtime().and_then(|rt| rt.block_on(jvpn_loadtest::soak::run(opts))) {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    if r.violations.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("soak failed: {}", r.violations.join("; "));
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("soak failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::BareTlsServer {
            listen,
            cert,
            key,
            agent_ca,
            echo,
        } => {
            let r = runtime().and_then(|rt| {
                rt.block_on(async {
                    let l = tokio::net::TcpListener::bind(listen).await?;
                    if echo {
                        jvpn_loadtest::bench::noop_target(&cert, &key, agent_ca.as_deref(), l).await
                    } else {
                        jvpn_loadtest::bench::bare_tls_server(&cert, &key, agent_ca.as_deref(), l)
                            .await
                    }
                })
            });
            if let Err(e) = r {
                eprintln!("bare server: {e:#}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Cmd::BenchRouter {
            duration_s,
            concurrency,
            idle_connections,
            trials,
            splice_variants,
        } => {
            let opts = jvpn_loadtest::bench_router::RouterBenchOptions {
                duration: std::time::Duration::from_secs(duration_s),
                concurrency,
                idle_connections,
                trials,
                splice_variants,
            };
            print_json_report("bench-router", jvpn_loadtest::bench_router::run(opts))
        }
        Cmd::BenchTakeover {
            sessions,
            gateways,
            cas_writes,
            resume_seconds,
            resume_concurrency,
        } => {
            let opts = jvpn_loadtest::bench_takeover::TakeoverBenchOptions {
                sessions,
                gateways,
                cas_writes,
                resume_duration: std::time::Duration::from_secs(resume_seconds),
                resume_concurrency,
            };
            let run = async {
                let r = jvpn_loadtest::bench_takeover::run(opts).await?;
                // The figures are printed either way; the exit code says
                // whether every session was taken over.
                Ok(Verdict {
                    failed: (r.failed > 0).then(|| format!("{} sessions not taken over", r.failed)),
                    report: r,
                })
            };
            print_json_report("bench-takeover", run)
        }
        Cmd::ChaosStore {
            first_seed,
            seeds,
            sessions,
            gateways,
            keep,
        } => {
            // Before the runtime: its threads, and every process they
            // start, live in the new namespace.
            if let Err(e) = jvpn_loadtest::netns::enter_private_namespace() {
                eprintln!("chaos-store: {e:#}");
                return ExitCode::FAILURE;
            }
            let opts = jvpn_loadtest::chaos_store::ChaosOptions {
                first_seed,
                seeds,
                sessions,
                gateways,
                keep,
            };
            let exe = std::env::current_exe().unwrap_or_default();
            let (gl, rl) = jvpn_loadtest::cluster::launchers(&exe);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(jvpn_loadtest::chaos_store::run(opts, gl, rl)) {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    if r.passed() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("chaos-store: a violation, or a seed not recovered from");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("chaos-store: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::BenchMembers {
            members,
            routers,
            interval_ms,
            duration_s,
            old_format,
            detect_trials,
            churn_s,
            pin,
        } => {
            let opts = jvpn_loadtest::bench_members::MembersBenchOptions {
                members,
                routers,
                interval: std::time::Duration::from_millis(interval_ms),
                duration: std::time::Duration::from_secs(duration_s),
                old_format,
                detect_trials,
                churn: churn_s,
                pin,
            };
            print_json_report("bench-members", jvpn_loadtest::bench_members::run(opts))
        }
        Cmd::BenchStreams {
            bytes,
            connects,
            no_ssh,
            no_vpn,
        } => {
            let opts = jvpn_loadtest::bench_streams::StreamBenchOptions {
                bytes,
                connects,
                no_ssh,
                no_vpn,
            };
            print_json_report("bench-streams", jvpn_loadtest::bench_streams::run(opts))
        }
        Cmd::Cluster {
            gateways,
            routers,
            dir,
        } => {
            let opts = jvpn_loadtest::serve_cluster::ServeOptions {
                gateways,
                routers,
                dir,
            };
            match runtime().and_then(|rt| rt.block_on(jvpn_loadtest::serve_cluster::run(opts))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cluster: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Demo {
            json,
            agents,
            single_node,
            store,
        } => {
            if single_node && store == "etcd" {
                eprintln!("demo: --store etcd is a cluster topology; drop --single-node");
                return ExitCode::from(2);
            }
            let agents = agents.unwrap_or(if single_node { 20 } else { 200 });
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(jvpn_loadtest::demo::run(jvpn_loadtest::demo::DemoOptions {
                agents,
                json,
                single_node,
                etcd_store: store == "etcd",
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_and_subcommand_has_help() {
        let cmd = <jvpn_loadtest::cli::Cli as clap::CommandFactory>::command();
        jvpn_runtime::process::assert_every_flag_has_help(&cmd);
    }
}
