//! `jvpn-loadtest soak`, briefly: sessions created, resumed and terminated
//! on one gateway leave its descriptors, session table and sessions gauge
//! exactly where they were, and its RSS within 10 %. The million-session run
//! is a documented command (docs/benchmarks.md).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_returns_the_gateway_to_its_baseline() {
    let out = common::loadtest(
        [
            "soak",
            "--sessions",
            "3000",
            "--warmup",
            "500",
            "--concurrency",
            "16",
        ],
        Duration::from_secs(300),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no report ({e}): {stderr}"));
    assert!(out.status.success(), "{r}\n{stderr}");
    assert_eq!(r["violations"], serde_json::json!([]), "{r}");
    assert_eq!(r["failed_cycles"], 0, "{r}");
    let (b, a) = (&r["baseline"], &r["after"]);
    for k in ["fds", "table", "sessions_gauge"] {
        assert_eq!(a[k], b[k], "{k}: {r}");
    }
    assert_eq!(a["table"], 0);
    // The baseline was read with sessions created: the gateway really ran.
    assert!(b["rss_kib"].as_u64().unwrap() > r["at_start"]["rss_kib"].as_u64().unwrap() / 2);
    assert!(r["cycles_per_s"].as_f64().unwrap() > 0.0);
}
