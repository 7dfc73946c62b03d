//! Memory per idle attached session, as `jvpn-loadtest bench-gateway`
//! measures it (gateway RSS growth over 1,000 sessions / 1,000), with the
//! data plane on (a session channel each, no stream open) and off.
//!
//! Bound: the data-plane issue's "today's figure + 10 %", where today's
//! figure is 19,771 B, measured before the data plane existed (release
//! build, docs/benchmarks.md). This build is a debug one; its futures are
//! no smaller than release ones, so the bound is no looser here.

mod common;

use std::time::Duration;

const BEFORE_DATA_PLANE: f64 = 19_771.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_with_the_data_plane_costs_at_most_ten_percent_more_than_before() {
    let r = common::loadtest_json(
        [
            "bench-gateway",
            "--duration-s",
            "1",
            "--concurrency",
            "8",
            "--sessions",
            "1000",
        ],
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(r["sessions_measured"], 1000);
    let with = r["rss_per_attached_session_with_channel_bytes"]
        .as_f64()
        .unwrap();
    let without = r["rss_per_attached_session_bytes"].as_f64().unwrap();
    // Reported, not asserted: a session whose HTTP/2 started keeps it
    // (docs/benchmarks.md, "Memory": over the bound, a known miss).
    let used = r["rss_per_attached_session_after_a_stream_bytes"]
        .as_f64()
        .unwrap();
    println!(
        "per idle attached session: {without:.0} B, with the data plane {with:.0} B, \
         after one stream {used:.0} B"
    );
    // RSS really grew: a measurement that saw nothing must not pass.
    assert!(without > 1_000.0 && with > 1_000.0, "{r}");
    assert!(
        with <= BEFORE_DATA_PLANE * 1.10,
        "{with:.0} B per idle session with the data plane, over {:.0} B",
        BEFORE_DATA_PLANE * 1.10
    );
}
