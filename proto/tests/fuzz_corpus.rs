//! Replays the kept fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! entry points the fuzz targets use, so every input a fuzzer once found
//! interesting stays a regression test.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8]), min_inputs: usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= min_inputs, "{target}: corpus has only {n} inputs");
}

#[test]
fn preamble_corpus() {
    replay("preamble", jvpn_proto::fuzzing::preamble, 10);
}

#[test]
fn token_corpus() {
    // Nothing a fuzzer builds opens, so few inputs add coverage.
    replay("token", jvpn_proto::fuzzing::token, 2);
}

#[test]
fn proxy_corpus() {
    replay("proxy", jvpn_proto::fuzzing::proxy, 10);
}

#[test]
fn frame_corpus() {
    replay("frame", jvpn_proto::fuzzing::frame, 10);
}

#[test]
fn heartbeat_corpus() {
    replay("heartbeat", jvpn_proto::fuzzing::heartbeat, 8);
}

#[test]
fn channel_corpus() {
    replay("channel", jvpn_proto::fuzzing::channel, 10);
}
