//! The README's commands (and deploy/README.md's, last test), run as
//! written (issue 19): every shell block is
//! run by bash in a network namespace of its own (the README uses the
//! default ports: 7443, 9443, 1080, 9090), in an empty directory, within a
//! time bound. What differs from a reader's machine, and only that:
//!
//! - `cargo build --release` is already done: `target/release/jvpn-*` and
//!   `cargo run --release -p jvpn-loadtest --` are this test build's
//!   programs (the same code, debug profile);
//! - a command that runs until stopped (`gateway run &`, `agent connect`,
//!   the local cluster, Prometheus "in another shell") is stopped with
//!   SIGTERM after a few seconds, and must then exit cleanly;
//! - two blocks are run elsewhere, said here: `cargo test --workspace` is
//!   this very run, and the fuzzing command is `proto/tests/cargo_fuzz.rs`.
//!
//! A block this test does not know fails it: a new README command needs a
//! way to be run here.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The README's fenced blocks, each as its lines.
fn blocks(readme: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    for l in readme.lines() {
        if l.starts_with("```") {
            match cur.take() {
                Some(b) => out.push(b),
                None => cur = Some(Vec::new()),
            }
        } else if let Some(b) = cur.as_mut() {
            b.push(l.to_owned());
        }
    }
    out
}

/// Wrappers named like the real binaries, for `target/release/...`.
fn bin_dir(work: &Path) -> PathBuf {
    let loadtest = env!("CARGO_BIN_EXE_jvpn-loadtest");
    let release = work.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    for (name, role) in [
        ("jvpn-gateway", "gateway"),
        ("jvpn-router", "router"),
        ("jvpn-agent", "agent"),
        ("jvpn-loadtest", ""),
    ] {
        let p = release.join(name);
        std::fs::write(&p, format!("#!/bin/sh\nexec {loadtest} {role} \"$@\"\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    release
}

/// The block as a script for this test: substitutions above, nothing else.
fn script(block: &[String], stop_after_s: u64) -> String {
    let mut s = String::from(
        "set -eu\nip link set lo up\n\
         trap 'rc=$?; for j in $(jobs -p); do kill -TERM \"$j\" 2>/dev/null || true; \
         if ! wait \"$j\"; then echo \"a background command exited non-zero after SIGTERM\" >&2; rc=1; fi; done; exit $rc' EXIT\n",
    );
    let n = block.len();
    let mut i = 0;
    while i < n {
        let line = block[i].replace(
            "cargo run --release -p jvpn-loadtest --",
            "target/release/jvpn-loadtest",
        );
        let cmd = line.split('#').next().unwrap_or("").trim_end().to_owned();
        if cmd.trim() == "cargo build --release" {
            s.push_str(": already built\n");
        } else if cmd.contains(" cluster")
            && (cmd.starts_with("target/release/jvpn-loadtest") || cmd.starts_with("jvpn-loadtest"))
        {
            // Stays up: in the background, until its files are written.
            s.push_str(&format!(
                "{cmd} > cluster.out &\nfor i in $(seq 300); do grep -q JVPN_CLUSTER_READY cluster.out && break; sleep 0.2; done\ngrep -q JVPN_CLUSTER_READY cluster.out\n"
            ));
        } else if cmd.starts_with("prometheus ") {
            // "In another shell": up, scraping every target, then stopped.
            s.push_str(&format!(
                "{cmd} 2> prometheus.log &\n\
                 for i in $(seq 150); do\n\
                   up=$(curl -s 'http://127.0.0.1:9090/api/v1/query?query=sum(up)' | sed -n 's/.*\"value\":\\[[^,]*,\"\\([0-9]*\\)\".*/\\1/p')\n\
                   [ \"$up\" = 5 ] && break; sleep 0.2; done\n\
                 echo \"prometheus targets up: $up\"\n[ \"$up\" = 5 ]\n"
            ));
        } else if cmd.ends_with('\\') {
            // A command over several lines: joined, then run.
            let mut full = cmd.trim_end_matches('\\').to_owned();
            while i + 1 < n && block[i].trim_end().ends_with('\\') {
                i += 1;
                full.push(' ');
                full.push_str(block[i].trim_end().trim_end_matches('\\').trim());
            }
            if full.contains("jvpn-agent connect") {
                s.push_str(&format!(
                    "timeout --preserve-status -s TERM {stop_after_s} {full}\n"
                ));
            } else {
                s.push_str(&full);
                s.push('\n');
            }
        } else {
            s.push_str(&line);
            s.push('\n');
        }
        i += 1;
    }
    s
}

/// Runs `script` with bash in a new network namespace, in `work`.
async fn run(script: &str, work: &Path, within: Duration) -> std::process::Output {
    std::fs::write(work.join("block.sh"), script).unwrap();
    let child = tokio::process::Command::new("unshare")
        .args(["-n", "bash", "block.sh"])
        .current_dir(work)
        .env(
            "PATH",
            format!(
                "{}:{}",
                work.join("target/release").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(within, child)
        .await
        .unwrap_or_else(|_| panic!("the block did not finish within {within:?}:\n{script}"))
        .unwrap()
}

/// Runs one block as [`script`] writes it, in `work`; it must succeed.
/// Its standard output and error.
async fn run_block(block: &[String], work: &Path, within: Duration) -> (String, String) {
    let s = script(block, 8);
    let out = run(&s, work, within).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{}\n--- ran as\n{s}\n--- exit {:?}\n{stdout}\n{stderr}",
        block.join("\n"),
        out.status
    );
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut ran = Vec::new();
    for block in blocks(&readme) {
        let text = block.join("\n");
        if text.contains("──") {
            continue; // the architecture drawing
        }
        if text.trim() == "cargo test --workspace" {
            ran.push("cargo test --workspace (this run)");
            continue;
        }
        if text.contains("cargo fuzz run") {
            ran.push("cargo fuzz run (proto/tests/cargo_fuzz.rs)");
            continue;
        }
        let known = ["demo", " cluster", "jvpn-gateway pki init"];
        assert!(
            known.iter().any(|k| text.contains(k)),
            "a README block this test cannot run yet:\n{text}"
        );
        let work = tempfile::tempdir().unwrap();
        bin_dir(work.path());
        let (stdout, stderr) = run_block(&block, work.path(), Duration::from_secs(420)).await;
        // What a reader would look for.
        if text.contains("-- demo") {
            assert!(stdout.contains("summary"), "{stdout}");
            ran.push("demo");
        } else if text.contains(" cluster") {
            assert!(stdout.contains("prometheus targets up: 5"), "{stdout}");
            ran.push("cluster + prometheus");
        } else {
            for want in [
                "handshake: attached to g1",
                "reattached in",
                "\"ended\": \"agent_closed\"",
            ] {
                assert!(stdout.contains(want), "{want} missing:\n{stdout}\n{stderr}");
            }
            ran.push("gateway and agent by hand");
        }
    }
    assert_eq!(ran.len(), 5, "{ran:?}");
}

/// deploy/README.md's commands, in order in one directory (the checks use
/// the PKI the first block writes), with `deploy/` there as in a checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deploy_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("deploy/README.md")).unwrap();
    let work = tempfile::tempdir().unwrap();
    bin_dir(work.path());
    std::os::unix::fs::symlink(root.join("deploy"), work.path().join("deploy")).unwrap();
    let mut ran = Vec::new();
    for block in blocks(&readme) {
        let text = block.join("\n");
        let known = ["pki init", " check --config", " cluster"];
        assert!(
            known.iter().any(|k| text.contains(k)),
            "a deploy/README.md block this test cannot run yet:\n{text}"
        );
        let (stdout, _) = run_block(&block, work.path(), Duration::from_secs(300)).await;
        if text.contains(" cluster") {
            assert!(stdout.contains("prometheus targets up: 5"), "{stdout}");
        }
        ran.push(block[0].clone());
    }
    assert_eq!(ran.len(), 3, "{ran:?}");
}
