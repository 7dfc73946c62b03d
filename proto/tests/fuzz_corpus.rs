//! Replays the kept fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! entry points the fuzz targets use, so every input a fuzzer once found
//! interesting stays a regression test.

#![allow(clippy::unwrap_used)]

use jvpn_proto::fuzzing::replay_corpus as replay;

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

#[test]
fn store_record_corpus() {
    replay("store_record", jvpn_proto::fuzzing::store_record, 4);
}
