//! Replays the kept fuzz corpora of the front-door parsers
//! (`fuzz/corpus/{socks5,http_connect}/`) through the fuzz targets' entry
//! points, so inputs a fuzzer once found interesting stay regression tests.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

fn replay(target: &str, f: fn(&[u8]), min_inputs: usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        f(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= min_inputs, "{target}: corpus has only {n} inputs");
}

#[test]
fn socks5_corpus() {
    replay("socks5", jvpn_agent::frontdoor::fuzzing::socks5, 10);
}

#[test]
fn http_connect_corpus() {
    replay(
        "http_connect",
        jvpn_agent::frontdoor::fuzzing::http_connect,
        10,
    );
}
