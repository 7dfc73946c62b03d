//! Replays the kept fuzz corpora of the front-door parsers
//! (`fuzz/corpus/{socks5,http_connect}/`) through the fuzz targets' entry
//! points, so inputs a fuzzer once found interesting stay regression tests.

#![allow(clippy::unwrap_used)]

use jvpn_proto::fuzzing::replay_corpus as replay;

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
