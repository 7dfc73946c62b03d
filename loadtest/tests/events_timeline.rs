//! `jvpn-gateway events timeline` on the event files of a real cluster run
//! with a kill (issue 19, item 9): one session's life across a resume and
//! its owner's SIGKILL, the agent's next session on another gateway, and
//! every session in a time window, as text and as HTML in Chromium.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::{agent_config, eventually, source_ip};
use jvpn_proto::ReasonCode;
use jvpn_proto::pb::session::{Terminate, frame::Kind};
use nix::sys::signal::Signal;

/// Runs `jvpn-gateway events timeline` (multi-call) with `args`.
async fn timeline(args: &[String]) -> (bool, String, String) {
    let mut all = vec!["gateway".to_owned(), "events".into(), "timeline".into()];
    all.extend(args.iter().cloned());
    let out = common::loadtest(all, Duration::from_secs(60)).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_follows_a_session_across_a_resume_and_its_owners_kill() {
    let c = common::cluster(ClusterOptions::default()).await;
    let t_start = jvpn_gateway::timeline::format_time(
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos(),
        )
        .unwrap(),
    );
    // Agent A: a session, a transport jump (resume), then its owner dies.
    let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(1))).unwrap();
    let mut a = jvpn_agent::Agent::new(cfg).unwrap();
    drop(common::hello(&mut a).await);
    let _t = common::resume(&mut a).await.unwrap();
    let first = a.session.as_ref().unwrap();
    let (sid, owner) = (first.id.to_string(), first.node_id.clone());
    // Agent B, on another gateway, ends its session itself.
    let mut b_owner = owner.clone();
    let mut b_sid = String::new();
    for i in 2..40 {
        let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(i))).unwrap();
        let mut b = jvpn_agent::Agent::new(cfg).unwrap();
        let mut t = common::hello(&mut b).await;
        let s = b.session.as_ref().unwrap();
        if s.node_id != owner {
            (b_owner, b_sid) = (s.node_id.clone(), s.id.to_string());
            t.send(Kind::Terminate(Terminate {
                reason: ReasonCode::AgentClosed as i32,
            }))
            .await
            .unwrap();
            break;
        }
    }
    assert_ne!(b_owner, owner, "no session placed off {owner}");
    let gw_b = c.gateway(&b_owner).unwrap();
    eventually(
        Duration::from_secs(5),
        "B's Terminate reached its gateway",
        || async {
            gw_b.metric(
                "jvpn_gateway_state_transitions_total",
                &[("to", "terminated"), ("reason", "agent_closed")],
            )
            .await
            .unwrap()
                >= 1.0
        },
    )
    .await
    .unwrap();

    // Events reach the file in batches at most 100 ms apart: a SIGKILL
    // loses the last batch. Kill once A's resume is on disk.
    let owner_file = c.gateway(&owner).unwrap().events_path.clone();
    eventually(Duration::from_secs(5), "A's events are written", || {
        let f = owner_file.clone();
        async move {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains("reattach_success")
        }
    })
    .await
    .unwrap();
    c.gateway(&owner).unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive(&owner, Duration::from_secs(10))
        .await
        .unwrap();
    // A's next session is made on a gateway still alive.
    drop(common::hello(&mut a).await);
    let second = a.session.as_ref().unwrap();
    let (sid2, owner2) = (second.id.to_string(), second.node_id.clone());
    assert_ne!(owner2, owner);
    // Event files are written in batches at most 100 ms apart.
    let files: Vec<String> = c
        .gateways
        .iter()
        .map(|(_, g)| g.events_path.clone())
        .collect();
    let owner2_file = c.gateway(&owner2).unwrap().events_path.clone();
    eventually(
        Duration::from_secs(5),
        "the new session's events are written",
        || {
            let f = owner2_file.clone();
            let sid2 = sid2.clone();
            async move {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .contains(&sid2)
            }
        },
    )
    .await
    .unwrap();

    // One session, by an 8-digit prefix.
    let mut args = files.clone();
    args.extend(["--session".into(), sid[..8].to_owned()]);
    let (ok, text, err) = timeline(&args).await;
    assert!(ok, "{err}");
    eprintln!("{text}");
    assert!(text.contains(&format!("session {sid}")), "{text}");
    assert!(
        text.contains(
            "one host (one boot id, or stamps that agree on the boot time): merged by its monotonic clock"
        ),
        "{text}"
    );
    for want in [
        "birth → attached",
        "handshake_ok",
        "transport 1 attached",
        "→ recovering",
        "transport 2 attached",
        "reattach_success",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    // Its owner was killed with it live: said so, not left silent.
    let end = text
        .lines()
        .find(|l| l.trim_start().starts_with("end:"))
        .unwrap();
    assert!(
        end.contains(&format!("when {owner}'s events stop")) && end.contains("killed"),
        "{end}"
    );
    // Ordered: every line's time is no earlier than the one before.
    let times: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.ends_with('Z') && w.len() == 24)
        .collect();
    assert!(
        times.len() >= 4 && times.windows(2).all(|w| w[0] <= w[1]),
        "{times:?}"
    );

    // A window from the start: every session of the run, each with its
    // ending (B's terminated explicitly, A's second live elsewhere).
    let html = c.dir.path().join("timeline.html");
    let mut args = files.clone();
    args.extend([
        "--from".into(),
        t_start,
        "--html".into(),
        html.display().to_string(),
    ]);
    let (ok, text, err) = timeline(&args).await;
    assert!(ok, "{err}");
    for s in [&sid, &b_sid, &sid2] {
        assert!(
            text.contains(&format!("session {s}")),
            "{s} missing:\n{text}"
        );
    }
    assert!(
        text.contains(&format!("end: terminated (agent_closed) on {b_owner}")),
        "{text}"
    );
    let dom = common::chromium(
        &[
            "--dump-dom".to_owned(),
            format!("file://{}", html.display()),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert!(dom.status.success());
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.matches("class=\"session\"").count() >= 3, "{dom}");
    assert!(dom.contains("class=\"state attached\""), "{dom}");

    // Bad input is named, not guessed.
    let mut args = files.clone();
    args.extend(["--session".into(), "ffffffffffff".into()]);
    let (ok, _, err) = timeline(&args).await;
    assert!(
        !ok && err.contains("no session id starts with ffffffffffff"),
        "{err}"
    );
    let mut args = files;
    args.extend(["--from".into(), "yesterday".into()]);
    let (ok, _, err) = timeline(&args).await;
    assert!(!ok && err.contains("--from yesterday"), "{err}");
}
