//! Rotating the cluster secret under live sessions: routers learn the new
//! key (keeping the old one as previous) by restarting one at a time,
//! gateways switch with SIGHUP, routers finally drop the old key. No
//! session re-handshakes, new sessions keep arriving, and tokens move to
//! the new key id.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster};
use jvpn_loadtest::fleet::Fleet;
use jvpn_loadtest::harness::{agent_config, eventually, source_ip};
use nix::sys::signal::Signal;

/// Every agent of the fleet changes transport once and resumes.
async fn jump_all(fleet: &Fleet) {
    fleet.jump_all(Duration::from_secs(20)).await.unwrap();
}

/// A brand-new session through every router.
async fn new_sessions_work(c: &LocalCluster, from: usize) {
    for (i, r) in c.router_addrs().into_iter().enumerate() {
        let cfg = agent_config(&c.pki, vec![r], Some(source_ip(from + i))).unwrap();
        let mut a = jvpn_agent::Agent::new(cfg).unwrap();
        common::hello(&mut a).await;
    }
}

async fn restart_routers(c: &mut LocalCluster, env: Vec<(String, String)>, fleet: &Fleet) {
    c.opts.router_env = env;
    for i in 0..c.routers.len() {
        c.restart_router(i).await.unwrap();
        let all: Vec<String> = c.gateways.iter().map(|(n, _)| n.clone()).collect();
        c.wait_placeable(&all, Duration::from_secs(15))
            .await
            .unwrap();
        jump_all(fleet).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_secret_rotates_without_a_rehandshake() {
    let mut c = common::cluster(ClusterOptions {
        gateways: 2,
        routers: 2,
        ..ClusterOptions::default()
    })
    .await;
    let fleet = Fleet::start(&c.pki, &c.router_addrs(), 30, 0).unwrap();
    fleet
        .wait_established(Duration::from_secs(30))
        .await
        .unwrap();
    // One agent driven by hand, to read the key id of its tokens.
    let cfg = agent_config(&c.pki, c.router_addrs(), Some(source_ip(200))).unwrap();
    let mut probe = jvpn_agent::Agent::new(cfg).unwrap();
    let mut t = common::hello(&mut probe).await;
    let old_id = probe.session.as_ref().unwrap().token_key_id();

    let old = c.pki.layout.secret();
    let new = c.dir.path().join("cluster-next.secret");
    let new_id = old_id.wrapping_add(1);
    let hex: String = (0..32)
        .map(|i| format!("{:02x}", (i * 7 + 3) as u8))
        .collect();
    std::fs::write(&new, format!("{new_id}:{hex}\n")).unwrap();
    let env = |previous: bool| {
        let mut e = vec![(
            "JVPN_ROUTER__CLUSTER__SECRET_FILE".to_owned(),
            new.display().to_string(),
        )];
        if previous {
            e.push((
                "JVPN_ROUTER__CLUSTER__PREVIOUS_SECRET_FILE".to_owned(),
                old.display().to_string(),
            ));
        }
        e
    };

    // 1. Routers: the new key current, the old one previous.
    restart_routers(&mut c, env(true), &fleet).await;
    new_sessions_work(&c, 300).await;

    // 2. Gateways: SIGHUP with the new secret file.
    for (_, gw) in &c.gateways {
        let text = std::fs::read_to_string(&gw.config_path).unwrap();
        let old_path = old.display().to_string();
        assert!(text.contains(&old_path));
        std::fs::write(
            &gw.config_path,
            text.replace(&old_path, &new.display().to_string()),
        )
        .unwrap();
        gw.signal(Signal::SIGHUP).unwrap();
        eventually(Duration::from_secs(5), "gateway reloaded", || async {
            gw.metric("jvpn_gateway_config_reloads_total", &[])
                .await
                .unwrap()
                == 1.0
        })
        .await
        .unwrap();
    }
    jump_all(&fleet).await;
    new_sessions_work(&c, 310).await;
    tokio::time::sleep(probe.switch_allowed_in()).await;
    drop(std::mem::replace(
        &mut t,
        common::resume(&mut probe).await.unwrap(),
    ));
    assert_eq!(probe.session.as_ref().unwrap().token_key_id(), new_id);

    // 3. Routers drop the old key: every session holds a new-key token now.
    restart_routers(&mut c, env(false), &fleet).await;
    new_sessions_work(&c, 320).await;

    let reports = common::close_clean(&c, fleet).await;
    assert!(
        reports.iter().all(|r| r.rehandshakes == 0),
        "a session re-handshaked"
    );
}
