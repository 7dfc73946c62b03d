//! The README's quick-start command: the cluster demo runs end to end and
//! reports what the issue asks for, with every invariant at zero.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

/// The summary's counters that are 0 in every demo run.
const MUST_BE_ZERO: [&str; 11] = [
    "forced_rehandshakes",
    "forced_rehandshakes_on_scale_out",
    "rehandshakes_on_router_restart",
    "silent_migrations",
    "dual_active_detected",
    "lost_sessions",
    "echo_failed",
    "stream_bytes_lost",
    "stream_bytes_duplicated",
    "streams_failed",
    "streams_reset_on_live_sessions",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_demo_reports_explicit_failover_and_zero_invariant_violations() {
    let stdout = common::loadtest_ok(
        ["demo", "--json", "--agents", "60"],
        Duration::from_secs(180),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    // 60 agents + 30 newcomers after the scale-out + 8 moving bytes.
    assert_eq!(v["agents"], 98);
    let killed = n("sessions_on_killed_gateway");
    assert!(killed > 0);
    assert_eq!(n("rehandshakes_after_owner_loss"), killed);
    // First sessions plus the explicit re-handshakes.
    assert_eq!(n("sessions_established"), 98 + killed);
    // One jump each (60) + every session after the router restart (90).
    assert!(n("resumes_ok") >= 150, "{}", n("resumes_ok"));
    for k in MUST_BE_ZERO {
        assert_eq!(n(k), 0, "{k}");
    }
    // Bytes moved through sessions across the jump, the scale-out, the
    // router restart and the failover; the killed gateway's streams ended
    // explicitly.
    assert!(n("stream_bytes") > 0);
    assert!(n("data_agents_on_killed_gateway") > 0);
    assert!(n("streams_reset_explicitly") > 0);
    let stall = &v["stall_ms_per_jump"];
    assert!(stall["count"].as_u64().unwrap() > 0, "{stall}");
    let f = &v["failover_ms"];
    assert!(f["count"].as_u64().unwrap() > 0, "{f}");
    assert!(f["p99"].as_u64().unwrap() <= 2_000, "{f}");
    assert_eq!(v["sessions_by_gateway"].as_object().unwrap().len(), 4);
    assert!(n("events_checked") > 100);
}

/// The same demo on topology 3 (`--store etcd`): the killed gateway's
/// sessions are taken over, each an explicit migration at its agent, none
/// re-made, every invariant 0 (the dual-active check counts the killed
/// process as holding nothing after its death, and is made: not null).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_demo_reports_explicit_migrations_and_zero_invariant_violations() {
    let stdout = common::loadtest_ok(
        ["demo", "--store", "etcd", "--json", "--agents", "60"],
        Duration::from_secs(180),
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    assert_eq!(v["topology"], "shared_store_cluster");
    assert_eq!(v["store"], "etcd");
    assert_eq!(v["agents"], 98);
    let killed = n("sessions_on_killed_gateway");
    assert!(killed > 0);
    assert_eq!(n("explicit_migrations"), killed, "{v}");
    assert_eq!(n("rehandshakes_after_owner_loss"), 0);
    // No session was made twice: the first ones are all there are.
    assert_eq!(n("sessions_established"), 98);
    for k in MUST_BE_ZERO {
        assert_eq!(n(k), 0, "{k}: {v}");
    }
    assert!(n("stream_bytes") > 0);
    if n("data_agents_on_killed_gateway") > 0 {
        assert!(n("streams_reset_explicitly") > 0, "{v}");
    }
    assert!(n("events_checked") > 100);
}
