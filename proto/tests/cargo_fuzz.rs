//! Runs every cargo-fuzz target in `fuzz/` for a short, bounded time
//! (coverage-guided libFuzzer, the kept corpus as seeds). A crash fails the
//! test and names the input, which then belongs in `fuzz/corpus/<target>/`
//! as a regression case. cargo-fuzz is installed by `.ci/run`; the stable
//! toolchain runs it with `RUSTC_BOOTSTRAP=1`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Fuzzing time per target.
const SECONDS_PER_TARGET: u32 = 10;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn cargo_fuzz(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO"))
        .arg("fuzz")
        .args(args)
        .current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .output()
        .unwrap_or_else(|e| panic!("cargo fuzz could not run ({e}); .ci/run installs it"))
}

fn targets(dir: &Path) -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(dir.join("fuzz_targets"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "rs").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    t.sort();
    t
}

#[test]
fn every_fuzz_target_runs_clean_for_a_bounded_time() {
    let dir = fuzz_dir();
    let targets = targets(&dir);
    assert_eq!(
        targets,
        [
            "channel",
            "config",
            "frame",
            "heartbeat",
            "http_connect",
            "preamble",
            "proxy",
            "socks5",
            "store_record",
            "token"
        ],
        "a target was added or removed: keep this list, the corpora and docs/security.md in step"
    );
    let build = cargo_fuzz(&dir, &["build", "-O"]);
    assert!(
        build.status.success(),
        "cargo fuzz build failed (is cargo-fuzz installed? .ci/run installs it):\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let scratch = tempfile::tempdir().unwrap();
    for t in &targets {
        // New inputs go to a scratch corpus; the kept one is only read.
        let new = scratch.path().join(t);
        std::fs::create_dir_all(&new).unwrap();
        let seeds = dir.join("corpus").join(t);
        let artifacts = format!("-artifact_prefix={}/", scratch.path().display());
        let time = format!("-max_total_time={SECONDS_PER_TARGET}");
        let out = cargo_fuzz(
            &dir,
            &[
                "run",
                "-O",
                t,
                new.to_str().unwrap(),
                seeds.to_str().unwrap(),
                "--",
                &time,
                "-timeout=5",
                "-rss_limit_mb=2048",
                &artifacts,
            ],
        );
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .find_map(|l| {
                l.strip_prefix("Done ")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let kept = scratch.keep();
            panic!(
                "fuzz target {t} failed; the crashing input is kept under {}:\n{}",
                kept.display(),
                tail.join("\n")
            );
        }
        assert!(
            runs > 1_000,
            "{t}: only {runs} executions in {SECONDS_PER_TARGET} s"
        );
        eprintln!("fuzz {t}: {runs} executions in {SECONDS_PER_TARGET} s, no crash");
    }
}
