//! Every timer runs on the monotonic clock: wall time may be read only
//! where wall time is the point (event timestamps, certificate dates). A
//! wall-clock jump then cannot expire, extend or reorder anything.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Files allowed to read the wall clock (`SystemTime::now`), each with why
/// and how often.
const ALLOWED: &[(&str, usize, &str)] = &[
    (
        "gateway/src/events.rs",
        1,
        "ts_ms of JSON events (mono_ns orders them)",
    ),
    (
        "gateway/src/server/session.rs",
        2,
        "an agent certificate's notAfter is a wall date, read once per HELLO; and its test",
    ),
    (
        "gateway/src/store/mod.rs",
        1,
        "a store record carries the session's absolute end (a taker in another process restores it), read at HELLO, at a takeover, and by the sweep to find records past their end",
    ),
    (
        "gateway/src/incarnation.rs",
        1,
        "the start time orders incarnations across hosts, once per process start (design note 31)",
    ),
    (
        "loadtest/src/scenario/mod.rs",
        1,
        "a run report's started_at is a wall date for people, once per run",
    ),
    (
        "loadtest/src/members.rs",
        1,
        "emulated members order their incarnations like gateways (start time), once per member start",
    ),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn system_time_only_where_wall_time_is_the_point() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["proto", "runtime", "gateway", "router", "agent", "loadtest"] {
        sources(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 40, "{} source files", files.len());
    let mut offenders = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&f).unwrap();
        let uses = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .filter(|l| l.contains("SystemTime::now"))
            .count();
        let allowed = ALLOWED
            .iter()
            .find(|(p, _, _)| *p == rel)
            .map_or(0, |(_, n, _)| *n);
        if uses > allowed {
            offenders.push(format!("{rel}: {uses} wall-clock reads, {allowed} allowed"));
        }
    }
    assert!(
        offenders.is_empty(),
        "wall-clock time outside logging and event timestamps: {offenders:?}"
    );
}

/// The sans-IO cores take `now` as an argument and read no clock at all:
/// the engine, the pre-TLS gate and issuer, admission, the router's
/// membership and routing rules, the client session and `Mono` itself.
#[test]
fn the_sans_io_cores_read_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    sources(&root.join("gateway/src/engine"), &mut files);
    assert!(files.len() >= 5);
    for f in [
        "gateway/src/gate.rs",
        "gateway/src/issuer.rs",
        "runtime/src/admission.rs",
        "router/src/membership/mod.rs",
        "router/src/routing.rs",
        "proto/src/client.rs",
        "proto/src/time.rs",
    ] {
        files.push(root.join(f));
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // A unit-test module may build fixtures from a real clock; the code
        // may not (only a trailing `#[cfg(test)] mod tests` is exempt).
        let code = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        for needle in ["Instant::now", "SystemTime", "tokio::time"] {
            assert!(
                !code.contains(needle),
                "{} uses {needle}: a sans-IO core must take `now` from its caller",
                f.display()
            );
        }
    }
}
