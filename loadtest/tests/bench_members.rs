//! `jvpn-loadtest bench-members` as docs/benchmarks.md shows it, with N
//! small enough for CI (the 1,000-member runs are benchmarks): every figure
//! is measured, a steady view travels without its members, both deaths
//! are detected. This checks that the benchmark works, not its numbers.

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_members_measures_a_steady_view_and_both_deaths() {
    let stdout = common::loadtest_ok(
        [
            "bench-members",
            "--members",
            "40",
            "--routers",
            "2",
            "--duration-s",
            "2",
        ],
        Duration::from_secs(300),
    )
    .await;
    let json = &stdout[stdout.find('{').expect("a JSON report")..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{json}");
    let r = &runs[0];
    assert_eq!(r["members"], 40, "{r}");
    assert_eq!(r["routers"], 2, "{r}");
    for key in ["router_cpu_pct", "router_rss_mib", "replies_per_s"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    // 40 members × 2 routers × 4 replies a second, give or take.
    assert!(r["replies_per_s"].as_f64().unwrap() > 200.0, "{r}");
    assert!(r["bytes_per_reply"].as_f64().unwrap() <= 128.0, "{r}");
    assert!(r["omitted_fraction"].as_f64().unwrap() > 0.9, "{r}");
    for key in ["kill_detect_ms", "silence_detect_ms"] {
        let ms = r[key].as_u64().unwrap();
        assert!(ms > 0 && ms < 10_000, "{key}: {r}");
    }
}
