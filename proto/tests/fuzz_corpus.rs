//! Replays the kept fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! entry points the fuzz targets use, so every input a fuzzer once found
//! interesting stays a regression test.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= 10, "{target}: corpus has only {n} inputs");
}

#[test]
fn preamble_corpus() {
    replay("preamble", jvpn_proto::fuzzing::preamble);
}

#[test]
fn token_corpus() {
    replay("token", jvpn_proto::fuzzing::token);
}

#[test]
fn proxy_corpus() {
    replay("proxy", jvpn_proto::fuzzing::proxy);
}

#[test]
fn frame_corpus() {
    replay("frame", jvpn_proto::fuzzing::frame);
}
