//! `jvpn-loadtest bench-members` as docs/benchmarks.md shows it, with N
//! small enough for CI (the 1,000-member runs are benchmarks): every figure
//! is measured, a steady view travels without its members, both deaths
//! are detected, the churn phase runs. This checks that the benchmark
//! works, not its numbers.

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_members_measures_a_steady_view_and_both_deaths() {
    let report = common::loadtest_json(
        [
            "bench-members",
            "--members",
            "40",
            "--routers",
            "2",
            "--duration-s",
            "2",
            "--detect-trials",
            "2",
            "--churn-s",
            "4",
        ],
        Duration::from_secs(300),
    )
    .await;
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    let r = &runs[0];
    assert_eq!(r["members"], 40, "{r}");
    assert_eq!(r["routers"], 2, "{r}");
    for key in [
        "router_cpu_pct",
        "router_rss_mib",
        "replies_per_s",
        "tick_ms",
        "router_ring_build_ms",
        "gateway_ring_build_ms",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    // Measured, though it may round to 0 at /proc's 10 ms resolution.
    assert!(r["gateway_cpu_pct"].as_f64().unwrap() >= 0.0, "{r}");
    // 40 members × 2 routers × 4 replies a second, give or take.
    assert!(r["replies_per_s"].as_f64().unwrap() > 200.0, "{r}");
    assert!(r["bytes_per_reply"].as_f64().unwrap() <= 128.0, "{r}");
    assert!(r["omitted_fraction"].as_f64().unwrap() > 0.9, "{r}");
    for key in ["kill_detect_ms", "silence_detect_ms"] {
        let trials = r[key].as_array().unwrap();
        assert_eq!(trials.len(), 2, "{key}: {r}");
        for ms in trials {
            let ms = ms.as_u64().unwrap();
            assert!(ms > 0 && ms < 10_000, "{key}: {r}");
        }
    }
    let churn = &r["churn"];
    assert_eq!(churn["joins"], 2, "{r}");
    assert_eq!(churn["leaves"], 2, "{r}");
    assert_eq!(churn["false_deaths"], 0, "{r}");
    assert_eq!(churn["converge_ms"].as_array().unwrap().len(), 4, "{r}");
    assert!(churn["router_cpu_pct"].as_f64().unwrap() > 0.0, "{r}");
}
