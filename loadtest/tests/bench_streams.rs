//! `jvpn-loadtest bench-streams` as docs/benchmarks.md shows it (smaller
//! transfers): every path is really measured, none is left out, and the
//! ratios against each peer are present. The peers (`sshd`, OpenVPN,
//! wireguard-go) are Debian packages `.ci/run` installs; this checks that
//! the benchmark works, not how fast anything is.

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_streams_measures_every_path_and_peer() {
    let stdout = common::loadtest_ok(
        ["bench-streams", "--bytes", "8388608", "--connects", "5"],
        Duration::from_secs(300),
    )
    .await;
    let json = &stdout[stdout.find("\n{").expect("a JSON report") + 1..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        report["not_measured"],
        serde_json::json!([]),
        "every path must be measured: {json}"
    );
    let paths: Vec<&str> = report["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "direct",
            "jvpn",
            "jvpn-gw",
            "ssh -D",
            "direct-veth",
            "wireguard-go",
            "OpenVPN-TCP"
        ]
    );
    for p in report["paths"].as_array().unwrap() {
        for key in ["one_stream_mib_per_s", "sixteen_streams_mib_per_s"] {
            assert!(p[key].as_f64().unwrap() > 0.0, "{key} of {p}");
        }
        if !p["path"].as_str().unwrap().starts_with("direct") {
            assert!(p["cpu_s_per_gib"].as_f64().unwrap() > 0.0, "CPU of {p}");
        }
    }
    let peers: Vec<&str> = report["jvpn_vs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["peer"].as_str().unwrap())
        .collect();
    assert_eq!(peers, ["ssh -D", "wireguard-go", "OpenVPN-TCP"]);
}
