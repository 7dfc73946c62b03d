//! `jvpn-loadtest bench-takeover` as docs/benchmarks.md shows it, with
//! fewer sessions (the 300-session runs are benchmarks): the store's CAS
//! latency is measured and every session of the killed owner comes back on
//! a taker, and RESUMEs are counted on one gateway without and with the
//! store. This checks that the benchmark works, not its numbers.

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_takeover_measures_cas_latency_and_every_takeover() {
    let r = common::loadtest_json(
        [
            "bench-takeover",
            "--sessions",
            "30",
            "--gateways",
            "2",
            "--cas-writes",
            "50",
            "--resume-seconds",
            "1",
            "--resume-concurrency",
            "8",
        ],
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(r["cas_writes"], 50, "{r}");
    let (p50, p99) = (
        r["cas_p50_ms"].as_f64().unwrap(),
        r["cas_p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p99 >= p50, "{r}");
    let victims = r["victims"].as_u64().unwrap();
    assert!(victims > 0, "{r}");
    assert_eq!(r["taken_over"].as_u64().unwrap(), victims, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    // RESUMEs on one gateway without the store, then with it: both ran,
    // the store's etcd did work for the second only, and the ratio is theirs.
    let rates = r["resume_rates"].as_array().unwrap();
    assert_eq!(rates.len(), 2, "{r}");
    assert_eq!(
        (rates[0]["store"].as_str(), rates[1]["store"].as_str()),
        (Some("memory"), Some("etcd"))
    );
    for x in rates {
        assert!(x["resumes"].as_u64().unwrap() > 0, "{r}");
        assert!(x["resumes_per_core_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    // etcd works for the store's RESUMEs, and only idles beside the others.
    let etcd = |i: usize| rates[i]["etcd_cpu_us_per_resume"].as_f64().unwrap();
    assert!(etcd(1) > 0.0, "{r}");
    assert!(etcd(0) < etcd(1) / 2.0, "{r}");
    let ratio = r["store_vs_memory_resumes_per_core"].as_f64().unwrap();
    let want = rates[1]["resumes_per_core_s"].as_f64().unwrap()
        / rates[0]["resumes_per_core_s"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-9, "{r}");
    let t = &r["takeover_ms"];
    assert!(t["p50"].as_u64().unwrap() > 0, "{r}");
    assert!(
        t["max"].as_u64().unwrap() >= t["p99"].as_u64().unwrap(),
        "{r}"
    );
}
