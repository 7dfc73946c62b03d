//! A gateway whose wall clock jumps (NTP step, a VM restored from a
//! snapshot) behaves exactly as before: every timer runs on the monotonic
//! clock. The gateway runs under Debian's libfaketime with
//! `DONT_FAKE_MONOTONIC=1`; its wall clock is moved two days forward, then
//! back, while a session keeps its heartbeats and resumes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jvpn_loadtest::harness::{self, GatewayOptions, eventually};

fn libfaketime() -> String {
    let dirs = std::fs::read_dir("/usr/lib").unwrap();
    for d in dirs.flatten() {
        let cand = d.path().join("faketime/libfaketime.so.1");
        if cand.is_file() {
            return cand.display().to_string();
        }
    }
    panic!("libfaketime.so.1 not found: install Debian's faketime package (.ci/run does)");
}

/// Pings on `t` every 250 ms for `total`; every one must be answered.
async fn keep_pinging(t: &mut jvpn_agent::Transport, total: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let end = tokio::time::Instant::now() + total;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        t.ping().await.unwrap();
        loop {
            match t.recv().await.unwrap() {
                jvpn_proto::pb::session::frame::Kind::Pong(_) => break,
                _ => continue,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_jump_changes_nothing_but_event_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let stamp = dir.path().join("faketime");
    std::fs::write(&stamp, "+0\n").unwrap();
    let env = common::start_with(GatewayOptions {
        env: vec![
            ("LD_PRELOAD".into(), libfaketime()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                stamp.display().to_string(),
            ),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
        ..Default::default()
    })
    .await;
    let gw = &env.gw;
    let mut a = harness::agent(&env.pki, gw.client_addr, None).unwrap();
    let mut t = common::hello(&mut a).await;

    for jump in ["+2d", "-2d"] {
        std::fs::write(&stamp, format!("{jump}\n")).unwrap();
        // Longer than heartbeat_timeout (2 s): the session must stay attached.
        keep_pinging(&mut t, Duration::from_secs(3)).await;
        let epoch = a.session.as_ref().unwrap().binding_epoch;
        drop(std::mem::replace(
            &mut t,
            common::resume(&mut a).await.unwrap(),
        ));
        assert_eq!(
            a.session.as_ref().unwrap().binding_epoch,
            epoch + 1,
            "after {jump}"
        );
        let mut fresh = harness::agent(&env.pki, gw.client_addr, None).unwrap();
        common::hello(&mut fresh).await;
    }
    let terminated = gw
        .metric(
            "jvpn_gateway_state_transitions_total",
            &[("to", "terminated")],
        )
        .await
        .unwrap();
    assert_eq!(
        terminated, 0.0,
        "a session ended because the wall clock moved"
    );
    let heartbeat_timeouts = gw
        .metric(
            "jvpn_gateway_state_transitions_total",
            &[("reason", "heartbeat_timeout")],
        )
        .await
        .unwrap();
    assert_eq!(heartbeat_timeouts, 0.0);

    // The clock really moved under the gateway: events written after the
    // forward jump carry timestamps two days ahead (this is what proves the
    // test ran under a shifted clock at all).
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let day_ms = 86_400_000;
    eventually(
        Duration::from_secs(5),
        "events from the shifted clock",
        || async {
            let text = std::fs::read_to_string(&gw.events_path).unwrap_or_default();
            text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["ts_ms"].as_u64())
                    .is_some_and(|ts| ts > now_ms + day_ms)
            })
        },
    )
    .await
    .unwrap();
}
