//! Topology 3's takeover end to end (issue 16): a real etcd cluster of 3
//! members, one router with `[cluster] takeover`, three gateways with
//! `[store]`, agents through the router. When a gateway is SIGKILLed, the
//! router sends each of its sessions' RESUMEs to the session's owner on
//! the new ring, which claims the record once etcd ended the dead owner's
//! lease (never before: `owner_alive` until then), and the agent carries
//! on with the same session at a higher owner epoch, without a HELLO.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jvpn_agent::{Agent, AgentError};
use jvpn_loadtest::cluster::{ClusterOptions, LocalCluster};
use jvpn_loadtest::etcd::EtcdCluster;
use jvpn_proto::SessionId;
use jvpn_proto::client::Exporter;
use jvpn_proto::preamble::Status;
use jvpn_proto::store_record::open_record_key;
use nix::sys::signal::Signal;

const SESSIONS: usize = 24;

async fn takeover_cluster(c: &EtcdCluster) -> LocalCluster {
    common::cluster(ClusterOptions {
        gateways: 3,
        routers: 1,
        spare_gateways: 0,
        gateway_extra_toml: c.gateway_toml(),
        router_env: vec![("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into())],
        ..ClusterOptions::default()
    })
    .await
}

/// RESUME until attached or refused for good: retries what a real agent
/// retries (the taker's `owner_unreachable` while the old lease lives,
/// overload, a connect to a dying owner).
async fn resume_until_attached(
    agent: &mut Agent,
    within: Duration,
) -> Result<jvpn_agent::Transport, AgentError> {
    let deadline = Instant::now() + within;
    loop {
        let e = match agent.resume().await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let retry = match &e {
            AgentError::Status(s) => matches!(
                s.status,
                Status::Overloaded | Status::OwnerUnreachable | Status::NoGateway
            ),
            AgentError::Rejected { reason, .. } => matches!(
                reason,
                jvpn_proto::ReasonCode::OwnerUnreachable | jvpn_proto::ReasonCode::StoreUnavailable
            ),
            AgentError::Connect(..) | AgentError::Tls(_) => true,
            _ => false,
        };
        if !retry || Instant::now() > deadline {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_sessions_are_taken_over_at_a_higher_epoch_without_a_handshake() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd).await;
    let keys = c.pki.cluster_keys().unwrap();
    let store = jvpn_gateway::store::EtcdStore::new(
        &etcd
            .store_config(
                &format!("/jvpn/{}", jvpn_loadtest::harness::CLUSTER),
                Duration::from_secs(3),
            )
            .unwrap(),
    )
    .unwrap();
    let router = c.routers[0].client_addr;
    let mut agents = Vec::new();
    for _ in 0..SESSIONS {
        let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
        let t = common::hello(&mut a).await;
        assert!(a.session.as_ref().unwrap().migratable, "HelloOk.migratable");
        agents.push((a, Some(t)));
    }
    let owner_of = |a: &Agent| a.session.as_ref().unwrap().node_id.clone();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (a, _) in &agents {
        *per_node.entry(owner_of(a)).or_default() += 1;
    }
    // The gateway with the most sessions dies.
    let victim = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(n, _)| n.clone())
        .unwrap();
    let before: Vec<(SessionId, String, u64)> = agents
        .iter()
        .map(|(a, _)| {
            let s = a.session.as_ref().unwrap();
            (s.id, s.node_id.clone(), s.incarnation)
        })
        .collect();
    c.gateway(&victim).unwrap().signal(Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    for (_, t) in &mut agents {
        drop(t.take());
    }
    c.wait_not_alive(&victim, Duration::from_secs(5))
        .await
        .unwrap();

    let mut takeover_ms = Vec::new();
    for (i, (a, t)) in agents.iter_mut().enumerate() {
        let (sid, node, inc) = &before[i];
        let mut tr = match resume_until_attached(a, Duration::from_secs(15)).await {
            Ok(tr) => tr,
            Err(e) => panic!("session {i} on {node}: {e}\n{}", c.logs()),
        };
        let s = a.session.clone().unwrap();
        assert_eq!(s.id, *sid, "the same session, no HELLO");
        if node == &victim {
            takeover_ms.push(killed_at.elapsed().as_millis() as u64);
            assert_ne!(&s.node_id, node, "carried on by a taker");
            assert_eq!(s.owner_epoch, 2, "one takeover: owner epoch + 1");
            let m = a.take_migration().expect("counted as a migration");
            assert!(m.from.starts_with(&format!("{victim}/")), "{m:?}");
            // The store names the taker, at the epoch the agent was told,
            // and the key in it is the one the agent now holds (its next
            // proof verifies under it).
            let rec = store.load(sid).await.unwrap().unwrap().record;
            assert_eq!(
                (
                    rec.owner_node.as_str(),
                    rec.owner_incarnation,
                    rec.owner_epoch
                ),
                (s.node_id.as_str(), s.incarnation, 2)
            );
            assert_eq!(rec.binding_epoch, s.binding_epoch);
            let key = open_record_key([&keys], sid, &rec).unwrap();
            let key = jvpn_proto::crypto::ResumeKey::new(*key);
            let r = a.build_resume(&tr).unwrap();
            let proof: [u8; 32] = r.proof.as_slice().try_into().unwrap();
            assert!(key.verify_resume_proof(
                sid,
                r.counter,
                r.binding_epoch,
                &tr.channel_binding().unwrap(),
                &proof
            ));
        } else {
            assert_eq!((&s.node_id, s.incarnation, s.owner_epoch), (node, *inc, 1));
            assert!(a.take_migration().is_none());
        }
        tr.echo(b"still here").await.unwrap();
        *t = Some(tr);
    }
    let victims = before.iter().filter(|(_, n, _)| *n == victim).count();
    assert_eq!(takeover_ms.len(), victims);
    assert!(victims > 0);
    // Lease TTL 2 s: every takeover within TTL + a generous margin for a
    // 2-core machine running etcd ×3, 3 gateways and a router (the
    // benchmark, not this test, measures the distribution).
    assert!(
        takeover_ms.iter().all(|ms| *ms < 2_000 + 6_000),
        "{takeover_ms:?}"
    );
    let mut claims = 0.0;
    for (n, g) in &c.gateways {
        if *n != victim {
            claims += g
                .metric("jvpn_gateway_store_claims_total", &[("result", "ok")])
                .await
                .unwrap();
        }
    }
    assert_eq!(claims, victims as f64, "one claim per taken-over session");
    assert!(
        c.router_metric("jvpn_router_takeovers_routed_total", &[])
            .await
            .unwrap()
            >= victims as f64
    );
}
