//! Fencing: a gateway mints sessions only under a valid lease with the
//! router that forwarded the HELLO. A router that stops answering (paused)
//! costs its gateways their leases within `lease_timeout`; when it resumes,
//! its own stall makes it suspect itself instead of declaring everyone dead.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::cluster::ClusterOptions;
use jvpn_loadtest::harness::eventually;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_needs_a_live_lease_with_the_forwarding_router() {
    let c = common::cluster(ClusterOptions::default()).await;
    let g1 = c.gateway("g1").unwrap();
    let r1 = common::as_router("r1", g1.client_addr).await;
    assert_eq!(
        common::hello_via(&c, &r1).await.unwrap(),
        "g1",
        "control: lease valid"
    );
    // A router id the gateway holds no lease with.
    let r9 = common::as_router("r9", g1.client_addr).await;
    assert!(common::not_in_cluster(common::hello_via(&c, &r9).await));

    // Pause the router: heartbeats go unanswered, the lease lapses.
    let router = &c.routers[0];
    router.signal(Signal::SIGSTOP).unwrap();
    let paused_at = std::time::Instant::now();
    eventually(
        Duration::from_secs(3),
        "g1's lease with r1 lapsed",
        || async {
            g1.metric("jvpn_gateway_lease_valid", &[("router", "r1")])
                .await
                .unwrap()
                == 0.0
        },
    )
    .await
    .unwrap();
    assert!(common::not_in_cluster(common::hello_via(&c, &r1).await));
    assert_eq!(
        g1.metric("jvpn_gateway_hellos_total", &[("result", "not_in_cluster")])
            .await
            .unwrap(),
        2.0
    );

    // The router wakes up after a stall of twice its failure_timeout (the
    // pause length is the stimulus, not a synchronisation): it suspects
    // itself (and every member looking dead at once trips the mass-death
    // guard as well), kills nobody, and leases come back.
    let pause = Duration::from_secs(2);
    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed())).await;
    router.signal(Signal::SIGCONT).unwrap();
    eventually(Duration::from_secs(5), "lease back", || async {
        g1.metric("jvpn_gateway_lease_valid", &[("router", "r1")])
            .await
            .unwrap()
            == 1.0
    })
    .await
    .unwrap();
    // HELLOs through r1 work again. Fencing refuses one whenever the lease
    // lapses, even for a moment (a starved CPU delays an acknowledgement),
    // and agents retry `common::not_in_cluster`: so does this check.
    eventually(
        Duration::from_secs(5),
        "a HELLO through r1 succeeds",
        || async { matches!(common::hello_via(&c, &r1).await.as_deref(), Ok("g1")) },
    )
    .await
    .unwrap();
    let all: Vec<String> = (0..3).map(jvpn_loadtest::cluster::node_name).collect();
    c.wait_placeable(&all, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        router
            .metric("jvpn_router_member_deaths_total", &[])
            .await
            .unwrap(),
        0.0,
        "a stalled router must not declare its gateways dead"
    );
}
