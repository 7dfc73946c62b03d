//! Gateway keep-alives (issue 17 item 2, design note 52): an agent that
//! listens for them stops pinging and only checks in; the gateway sends a
//! keep-alive whenever it has sent nothing for `keepalive_interval_ms`,
//! keeps the silent agent's transport on TCP's evidence, and still retires
//! a transport whose agent misses its check-ins. Agents and gateways one
//! version older keep pinging.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use jvpn_loadtest::harness;

/// Transitions of the gateway's sessions into VOLATILE for silence.
async fn silence_retirements(env: &common::Env) -> f64 {
    env.gw
        .metric(
            "jvpn_gateway_state_transitions_total",
            &[("to", "volatile"), ("reason", "heartbeat_timeout")],
        )
        .await
        .unwrap()
}

async fn attached(env: &common::Env) -> f64 {
    env.gw
        .metric("jvpn_gateway_sessions", &[("state", "attached")])
        .await
        .unwrap()
}

/// One message a second per idle session instead of four (a ping and its
/// pong every 500 ms): the session loop of the agent sends no ping between
/// check-ins, and the transport is neither given up by the agent nor
/// retired by the gateway, whose silence limit (1 s here) the agent's
/// silence would otherwise exceed many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_kept_alive_by_the_gateways_keepalives_alone() {
    // Keep-alives every 500 ms (half the timeout); pings would go every
    // 100 ms; a check-in every 5 s.
    let env =
        common::start("[policy]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1000\n").await;
    let a = common::streaming_agent(&env.pki, vec![env.gw.client_addr]);
    let report = || a.report.lock().unwrap().clone();
    harness::eventually(Duration::from_secs(10), "attached", || async {
        report().sessions_established == 1
    })
    .await
    .unwrap();
    let sent = || async {
        env.gw
            .metric("jvpn_gateway_keepalives_sent_total", &[])
            .await
            .unwrap()
    };
    let (k0, p0) = (sent().await, report().pings_sent);
    let watched = std::time::Instant::now();
    // The window under observation: 30 ping intervals, 3 silence limits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = report();
    let keepalives = sent().await - k0;
    // Judged on the window as it really lasted (a loaded machine wakes
    // the test late), with two keep-alives of slack each side.
    let due = watched.elapsed().as_secs_f64() / 0.5;
    assert_eq!(r.pings_sent - p0, 0, "no ping between check-ins: {r:?}");
    assert!(
        (due - 2.0..=due + 2.0).contains(&keepalives),
        "about one keep-alive per 500 ms: {keepalives} in {due:.1} intervals"
    );
    assert_eq!(
        (r.resumes_ok, r.rehandshakes),
        (0, 0),
        "the transport stayed: {r:?}"
    );
    assert_eq!(silence_retirements(&env).await, 0.0);
    assert_eq!(attached(&env).await, 1.0);
    // And the agent checks in (10 keep-alive intervals after its last
    // frame out).
    harness::eventually(Duration::from_secs(8), "a check-in", || async {
        report().pings_sent > p0
    })
    .await
    .unwrap();
    drop(a.cmds);
    a.task.await.unwrap();
}

/// The gateway keeps a silent agent's transport on TCP's evidence only
/// while the agent checks in: one that says nothing at all for 30
/// keep-alive intervals is retired as silent, as before keep-alives (but
/// later: then the heartbeat timeout after its last frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_checks_in_is_retired() {
    // Keep-alives every 200 ms, so a check-in is missed after 6 s.
    let env =
        common::start("[policy]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 400\n").await;
    let mut a = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    a.set_listens_for_keepalives(true);
    let start = Instant::now();
    let t = common::hello(&mut a).await;
    assert_eq!(t.gateway_keepalive(), Some(Duration::from_millis(200)));
    // Ten silence limits: still attached (the transport is alive in TCP).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(silence_retirements(&env).await, 0.0, "kept while silent");
    assert_eq!(attached(&env).await, 1.0);
    harness::eventually(Duration::from_secs(10), "retired as silent", || async {
        silence_retirements(&env).await == 1.0
    })
    .await
    .unwrap();
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(6_000),
        "not before 30 intervals without a check-in: {after:?}"
    );
    drop(t);
}

/// Keep-alives are announced only to an agent that asks (an agent one
/// version older never does, and keeps pinging) and only when the policy
/// has them; an agent whose gateway announces none (one version older, or
/// turned off) pings as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_are_announced_only_when_asked_and_on() {
    let env = common::start("").await;
    let mut old = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let t = common::hello(&mut old).await;
    assert_eq!(t.gateway_keepalive(), None, "not asked");
    let mut new = harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    new.set_listens_for_keepalives(true);
    let t = common::hello(&mut new).await;
    assert_eq!(
        t.gateway_keepalive(),
        Some(Duration::from_millis(1_000)),
        "half the default heartbeat timeout"
    );
    drop(t);
    let mut t = common::resume(&mut new).await.unwrap();
    assert_eq!(t.gateway_keepalive(), Some(Duration::from_millis(1_000)));
    t.ping().await.unwrap();

    let off =
        common::start("[policy]\nheartbeat_interval_ms = 100\nkeepalive_interval_ms = 0\n").await;
    let mut a = harness::agent(&off.pki, off.gw.client_addr, None).unwrap();
    a.set_listens_for_keepalives(true);
    let t = common::hello(&mut a).await;
    assert_eq!(t.gateway_keepalive(), None, "turned off");
    drop(t);
    // The agent's session loop then pings at the heartbeat interval.
    let s = common::streaming_agent(&off.pki, vec![off.gw.client_addr]);
    harness::eventually(Duration::from_secs(10), "pings", || async {
        s.report.lock().unwrap().pings_sent >= 5
    })
    .await
    .unwrap();
    assert_eq!(
        off.gw
            .metric("jvpn_gateway_keepalives_sent_total", &[])
            .await
            .unwrap(),
        0.0
    );
    drop(s.cmds);
}
