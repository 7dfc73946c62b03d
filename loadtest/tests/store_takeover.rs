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
use jvpn_loadtest::bench_takeover::{
    resume_until_attached, takeover_cluster as takeover_cluster_lib,
};
use jvpn_loadtest::cluster::LocalCluster;
use jvpn_loadtest::etcd::EtcdCluster;
use jvpn_loadtest::harness::Launcher;
use jvpn_proto::SessionId;
use jvpn_proto::client::Exporter;
use jvpn_proto::store_record::open_record_key;
use nix::sys::signal::Signal;

const SESSIONS: usize = 24;

async fn takeover_cluster(c: &EtcdCluster, gateways: usize) -> LocalCluster {
    takeover_cluster_with(c, gateways, vec![]).await
}

/// The library's takeover cluster with the binaries this test run built.
async fn takeover_cluster_with(
    c: &EtcdCluster,
    gateways: usize,
    router_env: Vec<(String, String)>,
) -> LocalCluster {
    let bin = env!("CARGO_BIN_EXE_jvpn-loadtest");
    takeover_cluster_lib(
        c,
        Launcher::for_tests(bin),
        Launcher::for_tests_as(bin, jvpn_loadtest::harness::Role::Router),
        gateways,
        router_env,
    )
    .await
    .unwrap()
}

/// Two gateways whose router sends silent deaths to takeover after 1 s of
/// grace instead of 3 s (the pause tests: a SIGSTOPped owner is silent).
/// Runs `f`, pinging `t` every 500 ms meanwhile (a transport the test
/// holds idle must not reach the gateway's heartbeat timeout).
async fn pinging<F: std::future::Future>(t: &mut jvpn_agent::Transport, f: F) -> F::Output {
    tokio::pin!(f);
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            out = &mut f => return out,
            _ = every.tick() => t.ping().await.unwrap(),
        }
    }
}

async fn paused_owner_cluster(etcd: &EtcdCluster) -> LocalCluster {
    let grace = vec![(
        "JVPN_ROUTER__MEMBERSHIP__SILENCE_GRACE_MS".into(),
        "1000".into(),
    )];
    takeover_cluster_with(etcd, 2, grace).await
}

/// SIGKILLs the gateway owning `a`'s session and waits until the router
/// declares it dead; returns its node id.
async fn kill_owner_of(c: &LocalCluster, a: &Agent) -> String {
    let owner = a.session.as_ref().unwrap().node_id.clone();
    c.gateway(&owner).unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive(&owner, Duration::from_secs(5))
        .await
        .unwrap();
    owner
}

/// Another agent holding `a`'s session (the same agent on its next
/// network, or a copy whose answers a test inspects).
fn copy_of(c: &LocalCluster, a: &Agent) -> Agent {
    let mut b = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    b.session = a.session.clone();
    b
}

/// One RESUME on a new connection, answered but not applied: the answer,
/// or `None` when no connection or no answer came.
async fn one_resume(agent: &mut Agent) -> Option<jvpn_proto::pb::session::frame::Kind> {
    let mut t = agent.open_resume().await.ok()?;
    let r = agent.build_resume(&t).unwrap();
    t.send(jvpn_proto::pb::session::frame::Kind::Resume(r))
        .await
        .ok()?;
    t.recv().await.ok()
}

fn store_of(etcd: &EtcdCluster) -> jvpn_gateway::store::EtcdStore {
    jvpn_loadtest::bench_takeover::store_of(etcd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_sessions_are_taken_over_at_a_higher_epoch_without_a_handshake() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 3).await;
    let keys = c.pki.cluster_keys().unwrap();
    let store = store_of(&etcd);
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
    // What the session is, apart from its owner: it must survive the
    // takeover unchanged (principal, credential, lifetime, migration).
    let mut identity = BTreeMap::new();
    for (sid, _, _) in &before {
        let r = store.load(sid).await.unwrap().unwrap().record;
        identity.insert(
            *sid,
            (
                r.principal,
                r.credential,
                r.end_of_life_unix_ms,
                r.agent_migrates,
            ),
        );
    }
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
            let was = &identity[sid];
            assert_eq!(
                (
                    &rec.principal,
                    &rec.credential,
                    rec.end_of_life_unix_ms,
                    rec.agent_migrates
                ),
                (&was.0, &was.1, was.2, was.3),
                "the session's identity and lifetime carried over"
            );
            assert!(!rec.principal.is_empty() && rec.end_of_life_unix_ms > 0);
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

/// The streams of a session lived in its owner's process: when a taker
/// carries the session on, each of them ends with a reset the application
/// sees (never a clean end, never a hang), counted as `taken_over`; the
/// session, its front door (the tunnel) and new streams carry on, with no
/// re-handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_resets_the_dead_owners_streams_and_new_streams_work() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let echo = jvpn_loadtest::streamload::echo_destination().await.unwrap();
    let a = common::streaming_agent(&c.pki, c.router_addrs());
    let mut streams = Vec::new();
    for s in 0..5u8 {
        let mut st = a.tunnel.connect(&common::target(echo)).await.unwrap();
        st.write_all(&[s; 100]).await.unwrap();
        let mut back = [0u8; 100];
        st.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [s; 100]);
        streams.push(st);
    }
    let owner = a.report.lock().unwrap().node_id.clone();
    c.gateway(&owner).unwrap().signal(Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let mut ends = Vec::new();
    for (s, mut st) in streams.into_iter().enumerate() {
        ends.push(tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                if let Err(e) = st.write_all(b"still there?").await {
                    return (s, e.kind());
                }
                match tokio::time::timeout(Duration::from_secs(30), st.read(&mut buf)).await {
                    Ok(Ok(0)) => panic!("stream {s}: a clean end after its owner died"),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return (s, e.kind()),
                    Err(_) => panic!("stream {s}: hung 30 s after its owner died"),
                }
            }
        }));
    }
    for e in ends {
        let (s, kind) = e.await.unwrap();
        assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "stream {s}");
    }
    eprintln!("streams reset {:?} after the kill", killed_at.elapsed());
    // New streams go through the same session, now on the taker.
    let st = a.tunnel.connect(&common::target(echo)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(st);
    w.write_all(b"after the takeover").await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"after the takeover");
    let rep = a.report.lock().unwrap().clone();
    assert_eq!(rep.rehandshakes, 0, "{rep:?}");
    assert_eq!(rep.explicit_migrations, 1, "{rep:?}");
    assert_eq!(rep.silent_migration_attempts, 0, "{rep:?}");
    assert_ne!(rep.node_id, owner);
    assert_eq!(rep.streams_reset.get("taken_over"), Some(&5), "{rep:?}");
}

/// A claim needs the old owner's lease seen gone in etcd: a takeover asked
/// of another gateway while the owner lives (a router's wrong verdict, or
/// a forged TLV from a configured router address) claims nothing, answers
/// `owner_unreachable` (retry), and the session stays with its owner,
/// whose next RESUME works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_claim_while_the_owner_lives() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let store = store_of(&etcd);
    let mut a = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    let t = common::hello(&mut a).await;
    let s = a.session.clone().unwrap();
    let before = store.load(&s.id).await.unwrap().unwrap();
    let other = c
        .gateways
        .iter()
        .find(|(n, _)| *n != s.node_id)
        .map(|(n, g)| (n.clone(), g.client_addr))
        .unwrap();
    // The RESUME, straight to the other gateway, as a router asking it to
    // take the session over.
    let header = jvpn_proto::proxy::ProxyHeader {
        addresses: Some(("10.9.8.7:5555".parse().unwrap(), other.1)),
        router_id: Some("r1".into()),
        view_id: None,
        intended_owner: None,
        takeover: true,
    }
    .encode()
    .unwrap();
    let proxy = jvpn_loadtest::faultproxy::FaultProxy::with_prefix(other.1, header)
        .await
        .unwrap();
    let mut forger = jvpn_loadtest::harness::agent(&c.pki, proxy.addr, None).unwrap();
    forger.session = Some(s.clone());
    for _ in 0..2 {
        // The taker waits up to TTL + 1 s for the owner's lease to go,
        // then refuses: it must have waited, and not much longer.
        let asked = Instant::now();
        match tokio::time::timeout(Duration::from_secs(15), forger.resume()).await {
            Ok(Err(AgentError::Rejected { reason, .. })) => {
                assert_eq!(reason, jvpn_proto::ReasonCode::OwnerUnreachable)
            }
            other => panic!("a claim while the owner lives: {other:?}"),
        }
        assert!(
            asked.elapsed() >= Duration::from_millis(2_500),
            "{:?}",
            asked.elapsed()
        );
    }
    let g = c.gateway(&other.0).unwrap();
    assert_eq!(
        g.metric(
            "jvpn_gateway_store_claims_total",
            &[("result", "owner_alive")]
        )
        .await
        .unwrap(),
        2.0
    );
    assert_eq!(
        g.metric("jvpn_gateway_store_claims_total", &[("result", "ok")])
            .await
            .unwrap(),
        0.0
    );
    // Nothing was written, and the owner still serves the session.
    let after = store.load(&s.id).await.unwrap().unwrap();
    assert_eq!(after.mod_revision, before.mod_revision);
    assert_eq!(after.record, before.record);
    drop(t);
    let mut t = common::resume(&mut a).await.unwrap();
    t.echo(b"still the owner").await.unwrap();
    let now = a.session.clone().unwrap();
    assert_eq!((now.node_id, now.owner_epoch), (s.node_id, 1));
}

/// Fencing: the owner is paused (SIGSTOP) for twice the lease TTL while its
/// session is taken over; frames the agent's old transport sent meanwhile
/// (a ping, data, an in-session RESUME) wait in the paused process's socket.
/// After SIGCONT the old process answers none of them: no `Pong`, no
/// `Data`, no `ResumeOk`; at most a `Terminate` that only retires that
/// transport (`store_unavailable`, or `heartbeat_timeout` when its own
/// timer fires first). The taker keeps serving the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_sends_nothing_for_a_session_taken_over_meanwhile() {
    use jvpn_proto::pb::session::{Data, Ping, frame::Kind};
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = paused_owner_cluster(&etcd).await;
    // The old transport goes straight to the owner (as router r1 would
    // splice it): the real router closes its splices to a gateway it
    // declares dead, and this test needs one that stays open.
    let (owner, gw) = (c.gateways[0].0.clone(), c.gateways[0].1.client_addr);
    let direct = common::as_router("r1", gw).await;
    let mut a = jvpn_loadtest::harness::agent(&c.pki, direct.addr, None).unwrap();
    let mut old = common::hello(&mut a).await;
    old.echo(b"before the pause").await.unwrap();
    assert_eq!(a.session.as_ref().unwrap().node_id, owner);
    let stopped_at = Instant::now();
    c.gateway(&owner).unwrap().signal(Signal::SIGSTOP).unwrap();
    // The same session from a second agent (the agent's next network).
    let mut b = copy_of(&c, &a);
    let mut moved = resume_until_attached(&mut b, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let s = b.session.clone().unwrap();
    assert_ne!(s.node_id, owner);
    assert_eq!(s.owner_epoch, 2);
    // Queued in the paused owner's socket: a ping, data, and a RESUME
    // made with the keys the old transport's agent still holds.
    old.send(Kind::Ping(Ping { seq: 7 })).await.unwrap();
    old.send(Kind::Data(Data {
        seq: 1,
        payload: b"after the takeover".to_vec().into(),
    }))
    .await
    .unwrap();
    let r = a.build_resume(&old).unwrap();
    old.send(Kind::Resume(r)).await.unwrap();
    // Twice the lease TTL (2 s) paused: the scenario, not a wait for a
    // state. The moved transport pings meanwhile, as a real agent does:
    // idle for the policy's heartbeat timeout, the taker would retire it.
    let pause = Duration::from_secs(4);
    let paused = tokio::time::sleep(pause.saturating_sub(stopped_at.elapsed()));
    pinging(&mut moved, paused).await;
    c.gateway(&owner).unwrap().signal(Signal::SIGCONT).unwrap();
    // No answer: at most a `Terminate` that retires the transport without
    // ending the session (the owner's lease is gone, or the transport was
    // silent while paused; the agent resumes elsewhere), or the close.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        match old.recv().await {
            Ok(k) => panic!("the paused owner answered after the takeover: {k:?}"),
            Err(e) => e,
        }
    });
    match pinging(&mut moved, end).await {
        Ok(jvpn_agent::AgentError::Terminated(r)) => assert!(
            matches!(
                r,
                jvpn_proto::ReasonCode::StoreUnavailable | jvpn_proto::ReasonCode::HeartbeatTimeout
            ) && !jvpn_proto::client::ends_session(r),
            "{r:?}"
        ),
        Ok(_) => {}
        Err(_) => panic!("the old transport neither closed nor ended"),
    }
    // The taker still serves the session.
    moved
        .echo(b"on the taker")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", c.logs()));
    let g = c.gateway(&owner).unwrap();
    assert!(
        g.metric("jvpn_gateway_store_leases_lost_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
}

/// Fencing, seen from the destination and the events: a session with a
/// stream to a destination; its owner is paused (SIGSTOP, 2 × TTL) after
/// the stream's first bytes arrived, more stream bytes reach the paused
/// process's socket, the session is taken over meanwhile (the agent's
/// stream is reset, `taken_over`). After SIGCONT the old process writes no
/// byte to the destination (whose connection from it closes: every byte
/// before that close has arrived) and records no acceptance of the
/// session, only its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_sends_no_egress_byte_for_a_session_taken_over_meanwhile() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = paused_owner_cluster(&etcd).await;
    // The destination: counts what arrives, says when its one
    // connection closed.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    {
        let got = got.clone();
        tokio::spawn(async move {
            let (mut s, _) = sink.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                got.fetch_add(n as u64, Ordering::SeqCst);
            }
            let _ = closed_tx.send(());
        });
    }
    // The agent reaches the first gateway straight (as router r1 would
    // splice it), then the router once that path is gone.
    let (owner, gw) = (c.gateways[0].0.clone(), c.gateways[0].1.client_addr);
    let direct = common::as_router("r1", gw).await;
    let a = common::streaming_agent(&c.pki, vec![direct.addr, c.routers[0].client_addr]);
    let mut st = a.tunnel.connect(&common::target(sink_addr)).await.unwrap();
    st.write_all(&[1; 1000]).await.unwrap();
    jvpn_loadtest::harness::eventually(Duration::from_secs(10), "the first bytes", || {
        let got = got.clone();
        async move { got.load(Ordering::SeqCst) == 1000 }
    })
    .await
    .unwrap();
    assert_eq!(a.report.lock().unwrap().node_id, owner);
    let paused_ns = jvpn_runtime::process::host_monotonic_ns();
    let stopped_at = Instant::now();
    c.gateway(&owner).unwrap().signal(Signal::SIGSTOP).unwrap();
    // More stream bytes, into the paused process's socket.
    let up = direct.forwarded_upstream();
    st.write_all(&[2; 5000]).await.unwrap();
    jvpn_loadtest::harness::eventually(
        Duration::from_secs(10),
        "the stream's next bytes at the paused owner's socket",
        || {
            let more = direct.forwarded_upstream() >= up + 5000;
            async move { more }
        },
    )
    .await
    .unwrap();
    // That path is gone: the agent RESUMEs through the router, whose
    // verdict (owner silent) sends it to the taker.
    drop(direct);
    jvpn_loadtest::harness::eventually(Duration::from_secs(20), "the takeover", || {
        let r = a.report.lock().unwrap().clone();
        async move { r.explicit_migrations == 1 }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), st.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Err(ref e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the stream is reset at the agent: {r:?}"
    );
    // Twice the lease TTL (2 s) paused: the scenario, not a wait.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(stopped_at.elapsed())).await;
    c.gateway(&owner).unwrap().signal(Signal::SIGCONT).unwrap();
    tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the old owner closes its connection to the destination")
        .unwrap();
    assert_eq!(
        got.load(Ordering::SeqCst),
        1000,
        "no byte reached the destination from the paused owner after the pause"
    );
    // Its events: the session ends there (explicitly), never attaches again.
    let events = c.gateway(&owner).unwrap().events_path.clone();
    let since_pause = |kind: &'static str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event_type"] == kind)
            .filter(|v| v["host_mono_ns"].as_u64().unwrap_or(0) > paused_ns)
            .collect()
    };
    let after = || since_pause("SessionStateChange");
    jvpn_loadtest::harness::eventually(
        Duration::from_secs(10),
        "the old owner's end event",
        || {
            let done = after().iter().any(|v| v["to"] == "terminated");
            async move { done }
        },
    )
    .await
    .unwrap();
    for v in after() {
        assert_ne!(v["to"], "attached", "{v}");
    }
    // Nor did it tell any agent anything (no HelloOk, no ResumeOk).
    assert_eq!(
        since_pause("SessionAnswered"),
        Vec::<serde_json::Value>::new()
    );
    let rep = a.report.lock().unwrap().clone();
    assert_eq!(rep.rehandshakes, 0, "{rep:?}");
    assert_eq!(rep.streams_reset.get("taken_over"), Some(&1), "{rep:?}");
}

/// The taker's `ResumeOk` is lost: the agent still holds the dead owner's
/// key and binding. Its next RESUME reaches the taker (which has the
/// session now), authenticates with the key it proved with before, learns
/// the current binding (`stale_binding`), and commits on the same
/// connection: the same session, migrated, no re-handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_takeover_resume_ok_is_recovered_without_a_handshake() {
    use jvpn_proto::pb::session::frame::Kind;
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let router = c.routers[0].client_addr;
    let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
    drop(common::hello(&mut a).await);
    let owner = kill_owner_of(&c, &a).await;
    // A copy of the agent takes the session over, and its ResumeOk is
    // never applied (lost on the way).
    let mut lost = copy_of(&c, &a);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "no takeover\n{}", c.logs());
        match one_resume(&mut lost).await {
            Some(Kind::ResumeOk(ok)) => {
                assert_eq!(ok.owner_epoch, 2);
                break;
            }
            Some(Kind::Reject(r)) => {
                assert_eq!(r.reason, jvpn_proto::ReasonCode::OwnerUnreachable as i32);
            }
            None => {}
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One agent in reality: its counter went on with the lost attempt.
    let used = lost.session.as_ref().unwrap().counter();
    a.session.as_mut().unwrap().set_counter(used);
    let held = a.session.clone().unwrap();
    assert_eq!(
        (held.node_id.as_str(), held.owner_epoch, held.binding_epoch),
        (owner.as_str(), 1, 1)
    );
    let mut t = resume_until_attached(&mut a, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let s = a.session.clone().unwrap();
    assert_eq!(s.id, held.id);
    assert_ne!(s.node_id, owner);
    assert_eq!(s.owner_epoch, 2);
    assert_eq!(s.binding_epoch, 3, "the lost binding (2), then this one");
    assert!(a.take_migration().is_some());
    t.echo(b"recovered").await.unwrap();
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(mut bytes) = std::fs::read(&p) {
                // WAL segments are preallocated with zeros: only what was
                // written is worth scanning.
                let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                bytes.truncate(end);
                out.push((p, bytes));
            }
        }
    }
    out
}

/// Keys at rest: after sessions were recorded, moved by RESUMEs and taken
/// over, no resume key any of them ever had appears in etcd's files (WAL,
/// snapshots, the bolt database), while their wrapped forms do (so the
/// scan reads where the records are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resume_key_is_stored_in_the_clear() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let keys = c.pki.cluster_keys().unwrap();
    let store = store_of(&etcd);
    let router = c.routers[0].client_addr;
    let mut seen_keys: Vec<[u8; 32]> = Vec::new();
    let mut wrapped: Vec<Vec<u8>> = Vec::new();
    let mut agents = Vec::new();
    let remember = |rec: &jvpn_proto::pb::store::SessionRecord,
                    sid: &SessionId,
                    seen_keys: &mut Vec<[u8; 32]>,
                    wrapped: &mut Vec<Vec<u8>>| {
        seen_keys.push(*open_record_key([&keys], sid, rec).unwrap());
        wrapped.push(rec.wrapped_key.clone());
    };
    for _ in 0..6 {
        let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
        drop(common::hello(&mut a).await);
        let sid = a.session.as_ref().unwrap().id;
        let rec = store.load(&sid).await.unwrap().unwrap().record;
        remember(&rec, &sid, &mut seen_keys, &mut wrapped);
        drop(common::resume(&mut a).await.unwrap());
        let rec = store.load(&sid).await.unwrap().unwrap().record;
        remember(&rec, &sid, &mut seen_keys, &mut wrapped);
        agents.push(a);
    }
    let owner = agents[0].session.as_ref().unwrap().node_id.clone();
    c.gateway(&owner).unwrap().signal(Signal::SIGKILL).unwrap();
    for a in &mut agents {
        drop(
            resume_until_attached(a, Duration::from_secs(15))
                .await
                .unwrap(),
        );
        let sid = a.session.as_ref().unwrap().id;
        let rec = store.load(&sid).await.unwrap().unwrap().record;
        remember(&rec, &sid, &mut seen_keys, &mut wrapped);
    }
    let files = files_under(etcd.data_dir());
    assert!(!files.is_empty());
    let contains = |hay: &[u8], needle: &[u8]| memchr::memmem::find(hay, needle).is_some();
    for w in &wrapped {
        assert!(
            files.iter().any(|(_, f)| contains(f, w)),
            "a wrapped key is nowhere in etcd's files: the scan misses the records"
        );
    }
    for k in &seen_keys {
        for (p, f) in &files {
            assert!(!contains(f, k), "a raw resume key in {}", p.display());
        }
    }
    eprintln!(
        "{} keys and {} wrapped keys checked in {} files",
        seen_keys.len(),
        wrapped.len(),
        files.len()
    );
}

/// Store faults: with two of three etcd members down, a dead owner's
/// session is not taken over (the taker cannot decide: it says
/// `store_unavailable`, and nothing is claimed); when the members return,
/// the same RESUMEs take it over, at the next owner epoch. (Without a
/// majority the taker's own lease lapses within a TTL, so the refusal
/// usually comes from its fence before any etcd request; the claim's own
/// refusal without a majority is the store test's.) Topology 3 is opt-in
/// per cluster: a gateway without `[store]` beside it keeps resuming its
/// session throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_no_takeover_and_with_it_back_the_session_moves() {
    use jvpn_proto::pb::session::frame::Kind;
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    // A topology-2 cluster beside it (router and gateways, no `[store]`).
    let sticky = common::cluster(jvpn_loadtest::cluster::ClusterOptions {
        gateways: 2,
        ..Default::default()
    })
    .await;
    let sticky_router = sticky.routers[0].client_addr;
    let mut t2 = jvpn_loadtest::harness::agent(&sticky.pki, sticky_router, None).unwrap();
    drop(common::hello(&mut t2).await);
    let t2_session = t2.session.clone().unwrap();
    let router = c.routers[0].client_addr;
    let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
    drop(common::hello(&mut a).await);
    let owner = a.session.as_ref().unwrap().node_id.clone();
    let taker = c
        .gateways
        .iter()
        .find(|(n, _)| *n != owner)
        .map(|(n, _)| n.clone())
        .unwrap();
    etcd.kill(1).await.unwrap();
    etcd.kill(2).await.unwrap();
    assert_eq!(kill_owner_of(&c, &a).await, owner);
    // RESUMEs reach the taker, which cannot decide: store_unavailable, and
    // never a ResumeOk while the store has no majority.
    let mut copy = copy_of(&c, &a);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "no store_unavailable\n{}",
            c.logs()
        );
        match one_resume(&mut copy).await {
            Some(Kind::Reject(r))
                if r.reason == jvpn_proto::ReasonCode::StoreUnavailable as i32 =>
            {
                break;
            }
            Some(Kind::Reject(r)) => {
                assert_eq!(r.reason, jvpn_proto::ReasonCode::OwnerUnreachable as i32);
            }
            Some(other) => panic!("without a majority: {other:?}"),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let g = c.gateway(&taker).unwrap();
    assert_eq!(
        g.metric("jvpn_gateway_store_claims_total", &[("result", "ok")])
            .await
            .unwrap(),
        0.0
    );
    // Meanwhile, topology 2: resumed through its router on its owner, the
    // same session at the same owner epoch; and new sessions are placed.
    let mut tr2 = common::resume(&mut t2).await.unwrap();
    tr2.echo(b"no store, no store fault").await.unwrap();
    let now2 = t2.session.clone().unwrap();
    assert_eq!(
        (now2.id, now2.node_id, now2.owner_epoch),
        (t2_session.id, t2_session.node_id, t2_session.owner_epoch)
    );
    let mut fresh = jvpn_loadtest::harness::agent(&sticky.pki, sticky_router, None).unwrap();
    common::hello(&mut fresh)
        .await
        .echo(b"a new one")
        .await
        .unwrap();
    etcd.restart(1).unwrap();
    etcd.restart(2).unwrap();
    etcd.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut t = resume_until_attached(&mut a, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let s = a.session.clone().unwrap();
    assert_eq!((s.node_id.as_str(), s.owner_epoch), (taker.as_str(), 2));
    t.echo(b"after the store came back").await.unwrap();
    assert_eq!(
        g.metric("jvpn_gateway_store_claims_total", &[("result", "ok")])
            .await
            .unwrap(),
        1.0
    );
}

/// Rolling upgrade: an agent from before takeovers (no `Hello.migration`)
/// gets a session that is not migratable, and when its owner dies no
/// gateway claims it (it would refuse the taker): the taker answers
/// `unknown_session` without writing, and the agent re-handshakes, as
/// before takeovers existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agents_session_is_never_claimed() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let store = store_of(&etcd);
    let mut a = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    a.set_accepts_migration(false);
    drop(common::hello(&mut a).await);
    let s = a.session.clone().unwrap();
    assert!(!s.migratable);
    let before = store.load(&s.id).await.unwrap().unwrap();
    assert!(!before.record.agent_migrates);
    let owner = kill_owner_of(&c, &a).await;
    match resume_until_attached(&mut a, Duration::from_secs(15)).await {
        Err(AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::UnknownSession)
        }
        other => panic!("an older agent's session was carried on: {other:?}"),
    }
    let after = store.load(&s.id).await.unwrap().unwrap();
    assert_eq!(after.mod_revision, before.mod_revision, "nothing claimed");
    let taker = c.gateways.iter().find(|(n, _)| *n != owner).unwrap();
    assert_eq!(
        taker
            .1
            .metric(
                "jvpn_gateway_store_claims_total",
                &[("result", "not_migratable")]
            )
            .await
            .unwrap(),
        1.0
    );
    // Its re-handshake works.
    let mut t = common::hello(&mut a).await;
    t.echo(b"a new session").await.unwrap();
}

/// etcd restarted mid-claim: a gateway dies with its sessions resuming
/// at once; the takers wait for its lease, which is then revoked, and 60
/// ms later (the takers' claims being made: they poll every 100 ms)
/// every etcd member is SIGKILLed, and started again 1.5 s later. However each RESUME ends (taken over, or
/// refused), no session has two owners: the independent checker of the
/// fault schedule over every gateway's events and the agents' answers
/// finds nothing, each agent taken over holds what the store names, and
/// no session is claimed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_mid_claim_gives_no_session_two_owners() {
    use jvpn_loadtest::chaos_store::{Seen, accepted_in, check};
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let mut c = takeover_cluster(&etcd, 3).await;
    let router = c.routers[0].client_addr;
    let mut agents = Vec::new();
    for _ in 0..12 {
        let mut a = jvpn_loadtest::harness::agent(&c.pki, router, None).unwrap();
        drop(common::hello(&mut a).await);
        agents.push(a);
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for a in &agents {
        *per_node
            .entry(a.session.as_ref().unwrap().node_id.clone())
            .or_default() += 1;
    }
    let victim = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(n, _)| n.clone())
        .unwrap();
    let seen_of = |a: &Agent| {
        let s = a.session.as_ref().unwrap();
        Seen {
            session: s.id.to_string(),
            owner: format!("{}/{:016x}", s.node_id, s.incarnation),
            owner_epoch: s.owner_epoch,
        }
    };
    let mut seen: Vec<Seen> = agents.iter().map(seen_of).collect();
    let store = store_of(&etcd);
    let victim_id = jvpn_proto::NodeId::new(&victim).unwrap();
    let (_, victim_lease) = store.owner_leases(&victim_id).await.unwrap()[0];
    c.gateway(&victim).unwrap().signal(Signal::SIGKILL).unwrap();
    let mut tasks = Vec::new();
    for mut a in agents
        .into_iter()
        .filter(|a| a.session.as_ref().unwrap().node_id == victim)
    {
        tasks.push(tokio::spawn(async move {
            let r = resume_until_attached(&mut a, Duration::from_secs(20)).await;
            (a, r.map(drop).map_err(|e| e.to_string()))
        }));
    }
    // The takers wait for the dead owner's lease key (the router sends
    // them the RESUMEs once it declared the owner dead); its lease then
    // ends at once (a revoke), the takers see it within their 100 ms poll
    // and claim, and 60 ms after the revoke the whole store goes.
    c.wait_not_alive(&victim, Duration::from_secs(5))
        .await
        .unwrap();
    store.revoke(victim_lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    for i in 0..3 {
        etcd.kill(i).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..3 {
        etcd.restart(i).unwrap();
    }
    etcd.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut outcomes = Vec::new();
    for t in tasks {
        let (a, r) = t.await.unwrap();
        if r.is_ok() {
            let s = a.session.clone().unwrap();
            seen.push(seen_of(&a));
            // Taken over: the store names the owner the agent holds.
            let rec = store.load(&s.id).await.unwrap().unwrap().record;
            assert_eq!(
                (
                    rec.owner_node.as_str(),
                    rec.owner_incarnation,
                    rec.owner_epoch
                ),
                (s.node_id.as_str(), s.incarnation, s.owner_epoch)
            );
            assert_ne!(s.node_id, victim);
        }
        outcomes.push(r);
    }
    assert!(!outcomes.is_empty());
    // Every process's events, written out by a clean stop of the living.
    let mut events = Vec::new();
    let logs = c.logs();
    for (n, g) in &mut c.gateways {
        if *n != victim {
            g.signal(Signal::SIGTERM).unwrap();
            tokio::time::timeout(Duration::from_secs(30), g.wait())
                .await
                .expect("a clean stop")
                .unwrap();
        }
        events.extend(accepted_in(
            &std::fs::read_to_string(&g.events_path).unwrap_or_default(),
        ));
    }
    let v = check(&events, &seen, &[]);
    assert_eq!(v.violations, Vec::<String>::new(), "{outcomes:?}\n{logs}");
    // The checker judged takeovers, answered and seen by agents.
    let taken = outcomes.iter().filter(|r| r.is_ok()).count();
    assert!(
        taken > 0 && v.takeover_births >= taken,
        "{v:?} {outcomes:?}"
    );
    // Every answer of the living gateways is in their events: their
    // HELLOs and the takeovers (the killed one's last may be lost).
    assert!(v.answered_events >= 12 - outcomes.len() + taken, "{v:?}");
    eprintln!("mid-claim outcomes: {outcomes:?}; {v:?}");
}

/// A record that does not decode (written by something else, or damaged)
/// is no session anyone can take over: the RESUME is answered
/// `unknown_session` and the agent re-handshakes. It used to be answered
/// `store_unavailable` with a retry hint, for as long as the agent kept
/// trying (a TLS handshake and an etcd read each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_decode_is_no_session() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let c = takeover_cluster(&etcd, 2).await;
    let store = store_of(&etcd);
    let mut a = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    drop(common::hello(&mut a).await);
    let sid = a.session.as_ref().unwrap().id;
    assert!(store.load(&sid).await.unwrap().is_some());
    // Overwritten with bytes that are no record.
    etcd.put_raw(&store.session_key(&sid), &[0xff; 3]).unwrap();
    assert!(store.load(&sid).await.is_err(), "the record still decodes");
    kill_owner_of(&c, &a).await;
    match resume_until_attached(&mut a, Duration::from_secs(15)).await {
        Err(AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::UnknownSession)
        }
        other => panic!("expected unknown_session, got {other:?}"),
    }
}

/// Rolling upgrade of topology 3: records as the previous version seals
/// them (`store.record_seal = 1`: only the resume key's place, `seal` 0)
/// are taken over by this version without a handshake. (A record this
/// version seals by default, every field, is `seal` 2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_sealed_as_the_previous_version_seals_it_is_taken_over() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let bin = env!("CARGO_BIN_EXE_jvpn-loadtest");
    let c = LocalCluster::start(
        Launcher::for_tests(bin),
        Launcher::for_tests_as(bin, jvpn_loadtest::harness::Role::Router),
        jvpn_loadtest::cluster::ClusterOptions {
            gateways: 2,
            routers: 1,
            spare_gateways: 0,
            gateway_extra_toml: format!(
                "{}{}record_seal = 1\n",
                jvpn_loadtest::streamload::LOOPBACK_EGRESS,
                etcd.gateway_toml()
            ),
            router_env: vec![("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into())],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let store = store_of(&etcd);
    let mut a = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    drop(common::hello(&mut a).await);
    let sid = a.session.as_ref().unwrap().id;
    let before = store.load(&sid).await.unwrap().unwrap().record;
    assert_eq!(before.seal, 0, "sealed as the previous version seals");
    let owner = kill_owner_of(&c, &a).await;
    let mut t = resume_until_attached(&mut a, Duration::from_secs(15))
        .await
        .unwrap();
    let s = a.session.as_ref().unwrap();
    assert_ne!(s.node_id, owner, "taken over");
    assert_eq!(s.owner_epoch, 2);
    t.echo(b"carried on").await.unwrap();
    let after = store.load(&sid).await.unwrap().unwrap().record;
    assert_eq!((after.owner_epoch, after.principal), (2, before.principal));
}

/// Rotating the cluster secret in topology 3: a gateway that starts with
/// only the new secret (`cluster.previous_secret_file` naming the old one)
/// takes over an idle session whose record was sealed under the old
/// secret, and seals it anew under the new one. Gateways had no previous
/// secret: such a takeover was refused and the agent re-handshook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_sealed_before_a_secret_rotation_is_taken_over_after_it() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let mut c = takeover_cluster(&etcd, 2).await;
    let store = store_of(&etcd);
    let mut a = jvpn_loadtest::harness::agent(&c.pki, c.routers[0].client_addr, None).unwrap();
    drop(common::hello(&mut a).await);
    let sid = a.session.as_ref().unwrap().id;
    let old_id = store.load(&sid).await.unwrap().unwrap().record.key_id;
    // The new secret, the router first (new current, old previous).
    let old = c.pki.layout.secret();
    let new = c.dir.path().join("cluster-next.secret");
    let new_id = (old_id as u8).wrapping_add(1);
    let hex: String = (0..32)
        .map(|i| format!("{:02x}", (i * 5 + 1) as u8))
        .collect();
    std::fs::write(&new, format!("{new_id}:{hex}\n")).unwrap();
    c.opts.router_env = vec![
        ("JVPN_ROUTER__CLUSTER__TAKEOVER".into(), "true".into()),
        (
            "JVPN_ROUTER__CLUSTER__SECRET_FILE".into(),
            new.display().to_string(),
        ),
        (
            "JVPN_ROUTER__CLUSTER__PREVIOUS_SECRET_FILE".into(),
            old.display().to_string(),
        ),
    ];
    c.restart_router(0).await.unwrap();
    // The gateway that does not own the session restarts, knowing the old
    // secret only as previous.
    let owner = a.session.as_ref().unwrap().node_id.clone();
    let other = if owner == "g1" { "g2" } else { "g1" }.to_owned();
    c.gateway(&other).unwrap().signal(Signal::SIGKILL).unwrap();
    c.wait_not_alive(&other, Duration::from_secs(5))
        .await
        .unwrap();
    c.opts.gateway_env = vec![
        (
            "JVPN_GATEWAY__CLUSTER__SECRET_FILE".into(),
            new.display().to_string(),
        ),
        (
            "JVPN_GATEWAY__CLUSTER__PREVIOUS_SECRET_FILE".into(),
            old.display().to_string(),
        ),
    ];
    c.start_gateway(&other).await.unwrap();
    c.wait_placeable(&["g1".to_owned(), "g2".to_owned()], Duration::from_secs(20))
        .await
        .unwrap();
    // The owner dies: the restarted gateway is the only one left.
    kill_owner_of(&c, &a).await;
    let mut t = resume_until_attached(&mut a, Duration::from_secs(15))
        .await
        .unwrap();
    let s = a.session.as_ref().unwrap();
    assert_eq!((&s.node_id, s.owner_epoch), (&other, 2));
    t.echo(b"across the rotation").await.unwrap();
    let rec = store.load(&sid).await.unwrap().unwrap().record;
    assert_eq!(
        rec.key_id,
        u32::from(new_id),
        "sealed anew under the new secret"
    );
}
