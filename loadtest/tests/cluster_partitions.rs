//! Partitions by port, in network namespaces this test creates (as root):
//! the test, its agents and the router run in a private namespace; each
//! gateway in one of its own behind a veth link; iptables inside a
//! gateway's namespace silently drops one of its ports.
//!
//! * membership port cut: the gateway stops being alive, loses its lease and
//!   refuses HELLOs, and its sessions are told `owner_lost` once the silence
//!   grace has passed;
//! * client port cut: unplaceable once 3 connects fail within 1 s, RESUMEs
//!   answered `owner_unreachable`, then `owner_lost` after 3 × failure
//!   timeout unreachable.
//!
//! * a pause (SIGSTOP for 2 × failure timeout, then SIGCONT): nothing
//!   accepted from the paused gateway until it is admitted again, and no
//!   session lost: every one resumes on it once it is back;
//! * a pause past the silence grace: its sessions are told `owner_lost`.
//!
//! After each heal: no session attached on two gateways, nothing routed to
//! an unplaceable gateway, no `HelloOk` from a gateway without a lease.
//! Tests here measure detection times, so they run one at a time.

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster, node_name};
use jvpn_loadtest::harness::eventually;
use jvpn_loadtest::invariants;
use nix::sys::signal::Signal;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `body` on a runtime whose threads (and the processes they start)
/// live in a fresh network namespace.
fn in_private_namespace<F: Future<Output = ()>>(body: impl FnOnce() -> F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    jvpn_loadtest::netns::enter_private_namespace().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body());
}

async fn partitioned_cluster(router_env: Vec<(String, String)>) -> LocalCluster {
    common::cluster(ClusterOptions {
        gateways: 3,
        routers: 1,
        spare_gateways: 0,
        netns: true,
        router_env,
        ..ClusterOptions::default()
    })
    .await
}

fn all_nodes() -> Vec<String> {
    (0..3).map(node_name).collect()
}

async fn gateway_metric(c: &LocalCluster, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.gateway(node).unwrap().metric(name, labels).await.unwrap()
}

async fn hellos_ok(c: &LocalCluster, node: &str) -> f64 {
    gateway_metric(c, node, "jvpn_gateway_hellos_total", &[("result", "ok")]).await
}

/// The checks after a heal: every agent explicit and never migrated, no
/// session attached on two gateways (from their event streams), nothing
/// placed on an unplaceable gateway.
async fn assert_healed_cleanly(c: &mut LocalCluster, fleet: jvpn_loadtest::fleet::Fleet) {
    common::close_clean(c, fleet).await;
    // Every event written before reading: none dropped, and the
    // gateways stopped cleanly (a clean stop writes what is queued).
    for (node, g) in &mut c.gateways {
        let dropped = g
            .metric("jvpn_gateway_events_dropped_total", &[])
            .await
            .unwrap();
        assert_eq!(dropped, 0.0, "{node} dropped events");
        g.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(40), g.wait())
            .await
            .unwrap_or_else(|_| panic!("{node} did not stop"))
            .unwrap();
    }
    let paths: Vec<&Path> = c
        .gateways
        .iter()
        .map(|(_, g)| Path::new(&g.events_path))
        .collect();
    let dual = invariants::dual_active(&paths);
    assert!(dual.events > 0, "no events read");
    assert_eq!(
        dual.violations,
        Some(0),
        "a session was attached on two gateways at once (None: not checked)"
    );
}

#[test]
fn a_gateway_cut_off_the_membership_port_dies_loses_its_lease_and_its_sessions_are_told() {
    in_private_namespace(|| async {
        let mut c = partitioned_cluster(Vec::new()).await;
        let victim = "g2";
        let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;
        let hellos_before = hellos_ok(&c, victim).await;
        let net = &c.nets[victim];
        let router = &c.routers[0];

        let t0 = Instant::now();
        net.drop_outgoing_to(router.membership_addr.port()).unwrap();
        c.wait_not_alive(victim, Duration::from_secs(5))
            .await
            .unwrap();
        let detected = t0.elapsed();
        // Silence: failure_timeout (1 s) after the last heartbeat, plus the
        // 50 ms tick and slack for a loaded 2-core machine.
        assert!(
            detected <= Duration::from_millis(2_000),
            "detected after {detected:?}"
        );
        // The gateway's side: no acknowledged heartbeat, so no lease, so no HELLO.
        eventually(Duration::from_secs(3), "g2's lease to lapse", || async {
            gateway_metric(&c, victim, "jvpn_gateway_lease_valid", &[]).await == 0.0
        })
        .await
        .unwrap();
        let stand_in = common::as_router("r1", c.gateway(victim).unwrap().client_addr).await;
        assert!(common::not_in_cluster(
            common::hello_via(&c, &stand_in).await
        ));
        // Its sessions: cut by the router at death, then told owner_lost.
        common::wait_moved(&fleet, &who, victim, t0).await;
        let after = fleet.snapshots();
        common::assert_survivors_untouched(&before, &after, &who);
        assert_each_told_owner_lost_once(&before, &after, &who);
        assert_eq!(
            hellos_ok(&c, victim).await,
            hellos_before,
            "a HelloOk from a gateway without a lease"
        );
        eprintln!(
            "membership cut: not alive after {} ms; {} sessions moved explicitly",
            detected.as_millis(),
            who.len()
        );

        net.heal().unwrap();
        // Back: a flap, held down, then placeable with a lease again.
        c.wait_placeable(&all_nodes(), Duration::from_secs(15))
            .await
            .unwrap();
        assert_eq!(
            gateway_metric(&c, victim, "jvpn_gateway_lease_valid", &[]).await,
            1.0
        );
        assert_healed_cleanly(&mut c, fleet).await;
    });
}

async fn router_count(c: &LocalCluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.router_metric(name, labels).await.unwrap()
}

#[test]
fn a_gateway_cut_off_its_client_port_is_unplaced_then_unreachable_then_lost() {
    // Connects to a cut-off gateway fail after this (the router's timeout).
    let env = vec![(
        "JVPN_ROUTER__TIMEOUTS__CONNECT_TIMEOUT_MS".to_owned(),
        "250".to_owned(),
    )];
    in_private_namespace(|| async move {
        let mut c = partitioned_cluster(env).await;
        let victim = "g2";
        let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;
        let hellos_before = hellos_ok(&c, victim).await;
        let net = &c.nets[victim];
        let router = &c.routers[0];
        let failures = || router_count(&c, "jvpn_router_gateway_connect_failures_total", &[]);
        assert_eq!(failures().await, 0.0);

        let t0 = Instant::now();
        net.drop_incoming_to(c.gateway(victim).unwrap().client_addr.port())
            .unwrap();
        // Its agents' transports stall; their RESUMEs make the router
        // connect, and fail.
        eventually(Duration::from_secs(15), "3 failed connects", || async {
            failures().await >= 3.0
        })
        .await
        .unwrap();
        let t_failed = Instant::now();
        eventually(
            Duration::from_secs(1),
            "g2 unplaceable within 1 s",
            || async { !router.placeable().await.unwrap().contains(victim) },
        )
        .await
        .unwrap();
        let unplaced = t_failed.elapsed();
        // Still alive (heartbeats arrive): RESUMEs are told to retry.
        eventually(
            Duration::from_secs(3),
            "owner_unreachable answers",
            || async {
                router_count(
                    &c,
                    "jvpn_router_connections_total",
                    &[("result", "owner_unreachable")],
                )
                .await
                    > 0.0
            },
        )
        .await
        .unwrap();
        // Unreachable for 3 × failure_timeout: not alive, sessions lost.
        c.wait_not_alive(victim, Duration::from_secs(6))
            .await
            .unwrap();
        let dead = t0.elapsed();
        common::wait_moved(&fleet, &who, victim, t0).await;
        let after = fleet.snapshots();
        common::assert_survivors_untouched(&before, &after, &who);
        let mut unreachable_seen = 0;
        for i in &who {
            let (b, a) = (&before[*i], &after[*i]);
            let lost = |r: &jvpn_agent::AgentReport| {
                r.rehandshake_reasons
                    .get("owner_lost")
                    .copied()
                    .unwrap_or(0)
            };
            assert_eq!(
                lost(a),
                lost(b) + 1,
                "agent {i}: {:?}",
                a.rehandshake_reasons
            );
            let retried = |r: &jvpn_agent::AgentReport| {
                r.resumes_rejected
                    .get("owner_unreachable")
                    .copied()
                    .unwrap_or(0)
            };
            unreachable_seen += u64::from(retried(a) > retried(b));
        }
        assert!(unreachable_seen > 0, "no agent was told owner_unreachable");
        assert_eq!(hellos_ok(&c, victim).await, hellos_before);
        eprintln!(
            "client port cut: unplaceable {} ms after the 3rd failed connect; not alive {} ms after the cut; \
             {} of {} sessions saw owner_unreachable first",
            unplaced.as_millis(),
            dead.as_millis(),
            unreachable_seen,
            who.len()
        );

        // Dead, yet its heartbeats still arrive: only a probe of the client
        // port may bring it back, and while cut off every probe fails.
        let probes = |result: &'static str| {
            let c = &c;
            async move {
                router_count(
                    c,
                    "jvpn_router_reachability_probes_total",
                    &[("result", result)],
                )
                .await
            }
        };
        eventually(Duration::from_secs(3), "a failed probe", || async {
            probes("failed").await > 0.0
        })
        .await
        .unwrap();
        assert_eq!(probes("ok").await, 0.0);
        assert!(!router.alive().await.unwrap().contains(victim));

        net.heal().unwrap();
        c.wait_placeable(&all_nodes(), Duration::from_secs(20))
            .await
            .unwrap();
        assert!(probes("ok").await >= 1.0, "back without a successful probe");
        assert_healed_cleanly(&mut c, fleet).await;
    });
}

/// Every agent in `who` re-handshook exactly once more, told `owner_lost`.
fn assert_each_told_owner_lost_once(
    before: &[jvpn_agent::AgentReport],
    after: &[jvpn_agent::AgentReport],
    who: &std::collections::BTreeSet<usize>,
) {
    let lost = |r: &jvpn_agent::AgentReport| {
        r.rehandshake_reasons
            .get("owner_lost")
            .copied()
            .unwrap_or(0)
    };
    for i in who {
        assert_eq!(lost(&after[*i]), lost(&before[*i]) + 1, "agent {i}");
    }
}

/// Waits until every agent in `who` resumed once more than in `before`.
async fn wait_each_resumed(
    fleet: &jvpn_loadtest::fleet::Fleet,
    before: &[jvpn_agent::AgentReport],
    who: &std::collections::BTreeSet<usize>,
) {
    eventually(Duration::from_secs(20), "every victim resumed", || {
        let snaps = fleet.snapshots();
        let done = who
            .iter()
            .all(|i| snaps[*i].resumes_ok > before[*i].resumes_ok);
        async move { done }
    })
    .await
    .unwrap();
}

#[test]
fn a_gateway_paused_for_twice_the_failure_timeout_accepts_nothing_stale() {
    in_private_namespace(|| async {
        let mut c = partitioned_cluster(Vec::new()).await;
        let victim = "g3";
        let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;
        let load = common::HelloLoad::start(&c, 500, Duration::from_millis(30));

        let failure_timeout = Duration::from_millis(1_000);
        let t_stop = Instant::now();
        c.gateway(victim).unwrap().signal(Signal::SIGSTOP).unwrap();
        c.wait_not_alive(victim, 2 * failure_timeout).await.unwrap();
        // The pause itself is the fault being tested: it lasts 2 × failure_timeout.
        tokio::time::sleep_until((t_stop + 2 * failure_timeout).into()).await;
        c.gateway(victim).unwrap().signal(Signal::SIGCONT).unwrap();
        let t_cont = Instant::now();

        // A pause shorter than the silence grace costs no session (issue 18
        // A2): each victim resumes on the paused gateway once it is back,
        // and nobody re-handshakes.
        wait_each_resumed(&fleet, &before, &who).await;
        let after = fleet.snapshots();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a.rehandshakes, b.rehandshakes, "agent {i} re-handshaked");
            assert_eq!(a.node_id, b.node_id, "agent {i} moved");
        }
        // Back: its first heartbeat after the pause is a flap, held down 2 s.
        c.wait_placeable(&all_nodes(), Duration::from_secs(15))
            .await
            .unwrap();
        let placed = load.stop_placed().await;
        let readmitted_earliest = t_cont + Duration::from_secs(2);
        // No HELLO started between the pause and the end of the paused
        // gateway's hold-down was answered by it: it had no lease, and the
        // router did not place on it. (A `HelloOk` it wrote just before it
        // froze may be read after t_stop: the start time puts it before.)
        let stale: Vec<_> = placed
            .iter()
            .filter(|p| p.node == victim && p.sent > t_stop && p.sent < readmitted_earliest)
            .collect();
        assert!(stale.is_empty(), "{stale:?} answered by the paused gateway");
        // And nothing started before the pause was answered by it after
        // it woke: the router cut those splices when it declared the death.
        let woke: Vec<_> = placed
            .iter()
            .filter(|p| p.node == victim && p.read > t_cont && p.read < readmitted_earliest)
            .collect();
        assert!(woke.is_empty(), "{woke:?} answered after the pause");
        assert!(
            placed.iter().any(|p| p.read > t_stop && p.read < t_cont),
            "no HELLO was placed during the pause"
        );
        assert_healed_cleanly(&mut c, fleet).await;
    });
}

/// Past the silence grace a paused gateway is certainly gone for the
/// routers: its sessions are told `owner_lost` explicitly and re-handshake
/// elsewhere, within failure timeout + grace + retries (issue 18 A2).
#[test]
fn a_gateway_paused_past_the_grace_loses_its_sessions_explicitly() {
    in_private_namespace(|| async {
        let mut c = partitioned_cluster(Vec::new()).await;
        let victim = "g1";
        let (fleet, before, who) = common::settled_fleet(&c, 60, victim).await;
        let t_stop = Instant::now();
        c.gateway(victim).unwrap().signal(Signal::SIGSTOP).unwrap();
        // Silence death after ~1 s, then 3 s of owner_unreachable, then
        // owner_lost: every victim is elsewhere well before 15 s.
        common::wait_moved(&fleet, &who, victim, t_stop).await;
        let moved_after = t_stop.elapsed();
        let after = fleet.snapshots();
        common::assert_survivors_untouched(&before, &after, &who);
        assert_each_told_owner_lost_once(&before, &after, &who);
        // Death comes failure_timeout after the last heartbeat, which may
        // be one interval older than the SIGSTOP; the grace runs from death.
        assert!(
            moved_after >= Duration::from_millis(750 + 3_000 - 50),
            "told owner_lost after {moved_after:?}, inside the grace"
        );
        c.gateway(victim).unwrap().signal(Signal::SIGCONT).unwrap();
        c.wait_placeable(&all_nodes(), Duration::from_secs(15))
            .await
            .unwrap();
        eprintln!(
            "paused past the grace: {} sessions told owner_lost after {} ms",
            who.len(),
            moved_after.as_millis()
        );
        assert_healed_cleanly(&mut c, fleet).await;
    });
}

/// Design note 53: behind a router, the gateway's socket faces the router,
/// whose TCP stays healthy when the path to an agent dies silently; with
/// keep-alives the agent sends nothing to miss for 10 s at a time. The
/// router bounds how long the keep-alives it splices towards the agent may
/// go unacknowledged by what the gateway's heartbeats say (its policy's
/// heartbeat timeout, 2 s here), so the splice ends and the gateway sees
/// the transport close within seconds, not after 30 missed keep-alive
/// intervals (about 32 s before this change).
#[test]
fn a_silent_path_to_an_agent_behind_a_router_ends_its_transport_at_the_gateway() {
    in_private_namespace(|| async {
        let c = common::cluster(ClusterOptions {
            gateways: 1,
            routers: 1,
            spare_gateways: 0,
            ..ClusterOptions::default()
        })
        .await;
        let node = node_name(0);
        c.wait_placeable(std::slice::from_ref(&node), Duration::from_secs(15))
            .await
            .unwrap();
        let router = c.routers[0].client_addr;
        let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
        a.set_listens_for_keepalives(true);
        let t = common::hello(&mut a).await;
        assert_eq!(t.gateway_keepalive(), Some(Duration::from_secs(1)));
        let attached = || async {
            gateway_metric(&c, &node, "jvpn_gateway_sessions", &[("state", "attached")]).await
        };
        eventually(Duration::from_secs(5), "attached", || async {
            attached().await == 1.0
        })
        .await
        .unwrap();

        // Every packet to or from the router's client port vanishes (the
        // agent's FIN too): only the router can notice, by its keep-alives
        // going unacknowledged.
        let port = router.port().to_string();
        for dir in ["--sport", "--dport"] {
            let out = std::process::Command::new("iptables")
                .args(["-A", "INPUT", "-p", "tcp", dir, &port, "-j", "DROP"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let t0 = Instant::now();
        eventually(Duration::from_secs(12), "the transport to end", || async {
            attached().await == 0.0
        })
        .await
        .unwrap();
        let after = t0.elapsed();
        let dead = gateway_metric(
            &c,
            &node,
            "jvpn_gateway_state_transitions_total",
            &[("to", "volatile"), ("reason", "transport_dead")],
        )
        .await;
        assert_eq!(dead, 1.0, "closed by the router, not retired for silence");
        eprintln!(
            "silent agent path: transport ended after {} ms",
            after.as_millis()
        );
        drop(t);
    });
}
