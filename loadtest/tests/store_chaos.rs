//! Topology 3 under a seeded fault schedule (issue 16), as
//! `jvpn-loadtest chaos-store` runs it: 50 seeds on one cluster (a real
//! 3-member etcd, one router with takeover, 3 gateways each in a network
//! namespace of its own), two overlapping faults per seed drawn from:
//! gateway SIGKILL (restarted) and SIGSTOP, etcd member SIGKILL
//! (restarted) and SIGSTOP, a gateway cut from etcd by iptables. Agents
//! resume and jump throughout. The checker reads every gateway process's
//! events and every answer the agents accepted: per session, no answer
//! at an owner epoch below one already answered (owner changes only ever
//! raise it), and no two gateways accept or answer one (session, epoch).
//! The checker's own rules are unit-tested with histories that break them
//! (`chaos_store::tests`); 1,000 seeds are a benchmark (docs/benchmarks.md).

mod common;

use std::time::Duration;

use jvpn_loadtest::chaos_store::schedule;

const SEEDS: u64 = 50;

/// Answer events the checker read.
fn v_answers(r: &serde_json::Value) -> u64 {
    r["verdict"]["answered_events"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_seeds_of_faults_never_give_one_session_epoch_two_owners() {
    let r = common::loadtest_json(
        [
            "chaos-store",
            "--seeds",
            &SEEDS.to_string(),
            "--first-seed",
            "1",
        ],
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(r["recovery_failure"], serde_json::Value::Null, "{r:#}");
    assert_eq!(r["seeds_completed"], SEEDS, "{r:#}");
    // Read from every process (before each SIGKILL too), never assumed.
    assert_eq!(r["events_dropped"], 0, "{r:#}");
    assert!(v_answers(&r) > 0, "{r:#}");
    let v = &r["verdict"];
    assert_eq!(v["violations"], serde_json::json!([]), "{r:#}");
    // The run did what the schedule says, and the checker had something
    // to judge: takeovers among the acceptances, answers from agents.
    let mut want = std::collections::BTreeMap::<&str, u64>::new();
    for seed in 1..=SEEDS {
        for s in schedule(seed, 3, 3) {
            *want.entry(s.fault.kind()).or_default() += 1;
        }
    }
    assert_eq!(want.len(), 5, "every kind of fault in the schedule");
    for (kind, n) in want {
        assert_eq!(r["faults"][kind], n, "{kind}: {r:#}");
    }
    assert!(v["takeover_births"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["migrations"].as_u64().unwrap() > 0, "{r:#}");
    assert!(v["agent_answers"].as_u64().unwrap() > 500, "{r:#}");
    // Nearly every answer an agent accepted is matched by the answering
    // gateway's event (a SIGKILL loses at most 100 ms of them).
    let told = v["agent_answers"].as_u64().unwrap();
    assert!(
        v["agent_answers_without_event"].as_u64().unwrap() <= told / 10,
        "{r:#}"
    );
}
