//! The shared session store of topology 3 (issue 16) against a real etcd
//! cluster: 3 members of Debian's etcd 3.4 on loopback, mTLS, data on
//! tmpfs, started by each test. What is checked here is the store's own
//! contract (DESIGN.md §9), a gateway process keeping its owner lease, and
//! the owner's session path (records at HELLO and RESUME, the fence).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use jvpn_gateway::store::{
    EtcdConfig, EtcdStore, Keeper, KeeperConfig, LeaseFence, LeaseStatus, Renewal, StoreError,
};
use jvpn_loadtest::etcd::EtcdCluster;
use jvpn_loadtest::harness::eventually;
use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record::{KeyPlace, open_record_key, wrap_key};
use jvpn_proto::{Incarnation, Mono, NodeId, SessionId};
use tokio::sync::watch;

const TIMEOUT: Duration = Duration::from_secs(3);

fn keys() -> ClusterKeys {
    ClusterSecret::new(1, [42; 32]).derive()
}

/// A record owned by `node`'s incarnation under `lease`, at `epoch` and
/// `version`, holding `key`.
fn record(
    (node, inc, lease): (&str, u64, i64),
    (epoch, version): (u64, u64),
    sid: &SessionId,
    key: [u8; 32],
) -> SessionRecord {
    let at = KeyPlace {
        sid,
        owner_epoch: epoch,
        state_version: version,
    };
    SessionRecord {
        owner_node: node.into(),
        owner_incarnation: inc,
        owner_epoch: epoch,
        state_version: version,
        binding_epoch: 1,
        key_id: 1,
        wrapped_key: wrap_key(&keys(), rand::random(), at, &key),
        principal: "agent-0".into(),
        owner_lease: lease,
        ..SessionRecord::default()
    }
}

/// An owner: a lease of `ttl` with its owner key; returns the lease.
async fn owner(store: &EtcdStore, node: &str, inc: u64, ttl: Duration) -> i64 {
    let (lease, _) = store.grant(ttl).await.unwrap();
    store
        .register_owner(&NodeId::new(node).unwrap(), Incarnation(inc), lease)
        .await
        .unwrap();
    lease
}

/// Creates `rec` once the store takes writes (a leader elected). A write
/// that timed out may still have been committed, so "exists" after a
/// timeout is the same record (the caller reads it back).
async fn create_eventually(
    store: &EtcdStore,
    sid: SessionId,
    rec: &SessionRecord,
    within: Duration,
    what: &str,
) -> anyhow::Result<()> {
    eventually(within, what, || {
        let (store, rec) = (store.clone(), rec.clone());
        async move {
            matches!(
                store.create(&sid, &rec).await,
                Ok(_) | Err(StoreError::Exists)
            )
        }
    })
    .await
}

async fn cluster_and_store() -> (EtcdCluster, EtcdStore) {
    let c = EtcdCluster::start(3).await.unwrap();
    let s = EtcdStore::new(&c.store_config("/jvpn/test", TIMEOUT).unwrap()).unwrap();
    (c, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_changes_are_compare_and_set_on_the_records_revision() {
    let (_c, store) = cluster_and_store().await;
    let lease = owner(&store, "gw-a", 7, Duration::from_secs(30)).await;
    let sid = SessionId::from_bytes(rand::random());
    let rec = record(("gw-a", 7, lease), (1, 1), &sid, [1; 32]);
    let r1 = store.create(&sid, &rec).await.unwrap();
    // Another record (its own key nonce) for the same session: refused.
    // The same bytes again would be this very write resent, answered as
    // landed (`a_write_sent_again_after_it_landed_is_answered_as_landed`).
    let other = record(("gw-a", 7, lease), (1, 1), &sid, [1; 32]);
    assert!(matches!(
        store.create(&sid, &other).await,
        Err(StoreError::Exists)
    ));
    let got = store.load(&sid).await.unwrap().unwrap();
    assert_eq!((got.record.clone(), got.mod_revision), (rec.clone(), r1));

    let mut next = rec.clone();
    next.binding_epoch = 2;
    next.state_version = 2;
    let r2 = store.update(&sid, r1, &next).await.unwrap();
    assert!(r2 > r1);
    // A writer that read revision r1 lost the race: nothing of it lands.
    let mut late = rec.clone();
    late.binding_epoch = 9;
    assert!(matches!(
        store.update(&sid, r1, &late).await,
        Err(StoreError::Stale { expected }) if expected == r1
    ));
    let got = store.load(&sid).await.unwrap().unwrap();
    assert_eq!(got.record.binding_epoch, 2);
    assert_eq!(got.mod_revision, r2);
    assert!(
        store
            .load(&SessionId::from_bytes([0; 16]))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_needs_the_old_lease_seen_gone_and_fences_the_old_owner() {
    let (_c, store) = cluster_and_store().await;
    let origin = Instant::now();
    let now = || Mono::between(origin, Instant::now());
    let a = NodeId::new("gw-a").unwrap();
    let (inc_a, inc_b) = (Incarnation(11), Incarnation(22));

    // The owner: a 2 s lease, its owner key, a session record.
    let ttl = Duration::from_secs(2);
    let mut fence = LeaseFence::new(ttl, Duration::from_millis(300));
    let sent = now();
    let (lease, granted) = store.grant(ttl).await.unwrap();
    assert!(matches!(
        fence.granted(now(), sent, granted),
        Renewal::Renewed { .. }
    ));
    store.register_owner(&a, inc_a, lease).await.unwrap();
    let sid = SessionId::from_bytes(rand::random());
    let first = record(("gw-a", inc_a.0, lease), (1, 1), &sid, [1; 32]);
    let r1 = store.create(&sid, &first).await.unwrap();

    // While the owner keeps its lease alive (for longer than the TTL), no
    // claim goes through. The taker holds a lease of its own.
    let lease_b = owner(&store, "gw-b", inc_b.0, Duration::from_secs(30)).await;
    let taken = record(("gw-b", inc_b.0, lease_b), (2, 2), &sid, [2; 32]);
    let alive_until = Instant::now() + ttl + Duration::from_secs(1);
    while Instant::now() < alive_until {
        let sent = now();
        let left = store.keep_alive(lease).await.unwrap();
        assert!(matches!(
            fence.renewed(now(), sent, left),
            Renewal::Renewed { .. }
        ));
        assert!(matches!(
            store.claim(&sid, r1, &first, &taken).await,
            Err(StoreError::OwnerAlive)
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(store.owner_alive(&a, inc_a).await.unwrap());

    // The owner stops renewing (as when it dies): the taker retries until
    // etcd itself says the owner key is gone, never on a clock of its own.
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(15);
    let r2 = loop {
        match store.claim(&sid, r1, &first, &taken).await {
            Ok(rev) => break rev,
            Err(StoreError::OwnerAlive) => {
                assert!(Instant::now() < deadline, "the old lease never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("claim: {e}"),
        }
    };
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "claimed {:?} after the last keep-alive, within a 2 s lease",
        stopped.elapsed()
    );
    let now_rec = store.load(&sid).await.unwrap().unwrap();
    assert_eq!(now_rec.mod_revision, r2);
    assert_eq!(now_rec.record.owner_epoch, 2);
    assert_eq!(now_rec.record.owner_node, "gw-b");
    // The rotated key opens under the new epoch only.
    assert_eq!(
        *open_record_key([&keys()], &sid, &now_rec.record).unwrap(),
        [2; 32]
    );

    // The old owner, back from a pause: its binding write fails at etcd,
    // and its next keep-alive fences it for good.
    let stale = record(("gw-a", inc_a.0, lease), (1, 2), &sid, [1; 32]);
    assert!(matches!(
        store.update(&sid, r1, &stale).await,
        Err(StoreError::Stale { .. })
    ));
    let sent = now();
    assert_eq!(store.keep_alive(lease).await.unwrap(), 0, "lease gone");
    assert_eq!(fence.renewed(now(), sent, 0), Renewal::Fenced);
    assert!(!fence.serving(now()));
    // A second taker that read before the claim loses too.
    assert!(matches!(
        store.claim(&sid, r1, &first, &taken).await,
        Err(StoreError::Stale { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_fences_its_owner_before_the_local_deadline() {
    let (_c, store) = cluster_and_store().await;
    let origin = Instant::now();
    let now = || Mono::between(origin, Instant::now());
    let ttl = Duration::from_secs(10);
    let mut fence = LeaseFence::new(ttl, Duration::from_millis(500));
    let sent = now();
    let (lease, granted) = store.grant(ttl).await.unwrap();
    fence.granted(now(), sent, granted);
    let a = NodeId::new("gw-a").unwrap();
    store
        .register_owner(&a, Incarnation(1), lease)
        .await
        .unwrap();
    let sid = SessionId::from_bytes(rand::random());
    let rec = record(("gw-a", 1, lease), (1, 1), &sid, [1; 32]);
    let r1 = store.create(&sid, &rec).await.unwrap();
    // etcd ends the lease while its owner still renews it (an early revoke,
    // as etcd issues 12528 and 15247 describe).
    store.revoke(lease).await.unwrap();
    assert!(!store.owner_alive(&a, Incarnation(1)).await.unwrap());
    // etcd itself refuses the owner's writes from now on, whatever the
    // owner's clock says: the record is unchanged, and no new one lands.
    let mut next = record(("gw-a", 1, lease), (1, 2), &sid, [2; 32]);
    next.binding_epoch = 2;
    assert!(matches!(
        store.update(&sid, r1, &next).await,
        Err(StoreError::LeaseGone)
    ));
    assert_eq!(store.load(&sid).await.unwrap().unwrap().mod_revision, r1);
    let other = SessionId::from_bytes(rand::random());
    assert!(matches!(
        store
            .create(&other, &record(("gw-a", 1, lease), (1, 1), &other, [1; 32]))
            .await,
        Err(StoreError::LeaseGone)
    ));
    assert!(store.load(&other).await.unwrap().is_none());
    let sent = now();
    let left = store.keep_alive(lease).await.unwrap();
    assert_eq!(left, 0);
    assert_eq!(fence.renewed(now(), sent, left), Renewal::Fenced);
    assert!(
        !fence.serving(now()),
        "fenced at once, 9 s before the local deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_needs_a_majority_fails_closed_without_one_and_comes_back() {
    let (mut c, store) = cluster_and_store().await;
    let lease = owner(&store, "gw-a", 1, Duration::from_secs(5)).await;
    // One member of three down: a majority still decides, once it has a
    // leader (if the killed member led, until then every write fails
    // closed).
    c.kill(0).await.unwrap();
    // Its ports stay the harness's while it is down (a restart cannot move
    // them: its peers know its URLs), so nothing else can take them.
    let port = c.client_ports()[0];
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_err(),
        "a killed member's port {port} was free for anyone"
    );
    let sid = SessionId::from_bytes(rand::random());
    let rec = record(("gw-a", 1, lease), (1, 1), &sid, [1; 32]);
    let t = Instant::now();
    create_eventually(
        &store,
        sid,
        &rec,
        Duration::from_secs(15),
        "a write with 2 of 3 members",
    )
    .await
    .unwrap();
    eprintln!("first write with one member down after {:?}", t.elapsed());
    assert_eq!(store.load(&sid).await.unwrap().unwrap().record, rec);
    store.keep_alive(lease).await.unwrap();
    // Two of three down: no majority. Every operation fails, explicitly and
    // within its bound (no claim, no `ResumeOk` can follow).
    c.kill(1).await.unwrap();
    let other = SessionId::from_bytes(rand::random());
    let t = Instant::now();
    let r = store
        .create(&other, &record(("gw-a", 1, lease), (1, 1), &other, [1; 32]))
        .await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(
        t.elapsed() < TIMEOUT + Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    // A keep-alive needs no consensus: a leader left alone still renews
    // until its quorum check makes it step down (about an election
    // timeout). Then renewals fail too.
    eventually(Duration::from_secs(10), "keep-alives to fail", || {
        let store = store.clone();
        async move {
            matches!(
                store.keep_alive(lease).await,
                Err(StoreError::Unavailable(_))
            )
        }
    })
    .await
    .unwrap();
    // Members back: the same client serves again (its channel reconnects;
    // keep-alive streams are per call, so none is left dead), and the
    // record written with a majority is there.
    c.restart(0).unwrap();
    c.restart(1).unwrap();
    eventually(Duration::from_secs(30), "the store to answer again", || {
        let store = store.clone();
        async move { store.load(&sid).await.is_ok_and(|r| r.is_some()) }
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "a keep-alive to go through",
        || {
            let store = store.clone();
            async move { store.keep_alive(lease).await.is_ok_and(|t| t > 0) }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_stores_certificate_is_refused() {
    let (c, _store) = cluster_and_store().await;
    // No client certificate: etcd's client port requires one.
    let mut cfg = c.store_config("/jvpn/test", TIMEOUT).unwrap();
    if let Some(t) = cfg.tls.as_mut() {
        let other = EtcdCluster::start(1).await.unwrap();
        let foreign = other.client_tls().unwrap();
        t.cert_pem = foreign.cert_pem;
        t.key_pem = foreign.key_pem;
    }
    let foreign = EtcdStore::new(&cfg).unwrap();
    let sid = SessionId::from_bytes([7; 16]);
    assert!(matches!(
        foreign.load(&sid).await,
        Err(StoreError::Unavailable(_))
    ));
    // Plain TCP to a TLS port.
    let plain = EtcdStore::new(&EtcdConfig {
        endpoints: c
            .endpoints()
            .iter()
            .map(|e| e.replace("https://", "http://"))
            .collect(),
        tls: None,
        ..cfg
    })
    .unwrap();
    assert!(matches!(
        plain.load(&sid).await,
        Err(StoreError::Unavailable(_))
    ));
}

async fn wait_status(
    rx: &mut watch::Receiver<LeaseStatus>,
    within: Duration,
    what: &str,
    f: impl FnMut(&LeaseStatus) -> bool,
) -> LeaseStatus {
    let got = match tokio::time::timeout(within, rx.wait_for(f)).await {
        Ok(Ok(s)) => Some(*s),
        _ => None,
    };
    got.unwrap_or_else(|| {
        panic!(
            "timed out after {within:?} waiting for {what}: {:?}",
            *rx.borrow()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_stops_serving_by_its_deadline_without_a_majority_and_comes_back() {
    let (mut c, store) = cluster_and_store().await;
    let (node, inc) = (NodeId::new("gw-a").unwrap(), Incarnation(5));
    let (ttl, margin) = (Duration::from_secs(2), Duration::from_millis(300));
    let keeper = Keeper::spawn(
        store.clone(),
        KeeperConfig {
            node: node.clone(),
            incarnation: inc,
            ttl,
            margin,
        },
    );
    let mut rx = keeper.status.clone();
    let first = wait_status(&mut rx, Duration::from_secs(10), "a lease", |s| {
        s.generation == 1 && s.serving_until.is_some()
    })
    .await;
    assert!(keeper.serving());
    assert!(store.owner_alive(&node, inc).await.unwrap());
    // Renewals move the deadline on.
    wait_status(&mut rx, Duration::from_secs(5), "a renewal", |s| {
        s.serving_until > first.serving_until
    })
    .await;

    // Every etcd member gone: no renewal can arrive.
    let killed_at = keeper.now();
    for i in 0..3 {
        c.kill(i).await.unwrap();
    }
    let last = *rx.borrow();
    // The deadline already published comes from a keep-alive sent before
    // the kill, so serving ends within TTL − margin of it: before etcd
    // (were it up) could let a taker claim.
    let until = last.serving_until.unwrap();
    assert!(
        until <= killed_at + (ttl - margin),
        "{until:?} after {killed_at:?}"
    );
    wait_status(&mut rx, Duration::from_secs(10), "the fence", |s| {
        s.serving_until.is_none()
    })
    .await;
    assert!(!keeper.serving());
    assert!(keeper.now() >= until);

    // etcd back: the same keeper takes a new lease (a new generation; the
    // old generation's sessions stay ended).
    for i in 0..3 {
        c.restart(i).unwrap();
    }
    let second = wait_status(&mut rx, Duration::from_secs(30), "a second lease", |s| {
        s.generation == 2 && s.serving_until.is_some()
    })
    .await;
    assert_ne!(second.lease, first.lease);
    assert!(
        !second.serving(1, keeper.now()),
        "generation 1 stays fenced"
    );
    assert!(store.owner_alive(&node, inc).await.unwrap());

    // A clean stop revokes the lease: its owner key goes at once. (The
    // first lease's key may still be there: etcd restarted its clock at
    // the restart, and nobody revoked it; it ends within its TTL.)
    keeper.stop().await;
    let left = store.owner_leases(&node).await.unwrap();
    assert!(!left.contains(&(inc, second.lease)), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_sees_an_early_revoke_at_its_next_renewal() {
    let (_c, store) = cluster_and_store().await;
    let ttl = Duration::from_secs(9);
    let keeper = Keeper::spawn(
        store.clone(),
        KeeperConfig {
            node: NodeId::new("gw-a").unwrap(),
            incarnation: Incarnation(6),
            ttl,
            margin: Duration::from_millis(500),
        },
    );
    let mut rx = keeper.status.clone();
    let first = wait_status(&mut rx, Duration::from_secs(10), "a lease", |s| {
        s.generation == 1 && s.serving_until.is_some()
    })
    .await;
    let revoked_at = keeper.now();
    store.revoke(first.lease).await.unwrap();
    wait_status(&mut rx, Duration::from_secs(10), "the fence", |s| {
        s.generation == 1 && s.serving_until.is_none()
    })
    .await;
    let seen = keeper.now().saturating_since(revoked_at);
    // One renewal interval (TTL / 5 = 1.8 s), not the 8.5 s local deadline.
    assert!(
        seen < Duration::from_secs(6),
        "fenced {seen:?} after the revoke"
    );
    wait_status(&mut rx, Duration::from_secs(10), "a new lease", |s| {
        s.generation == 2 && s.serving_until.is_some()
    })
    .await;
    keeper.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_holds_its_owner_lease_while_it_runs_and_revokes_it_on_the_way_out() {
    let c = EtcdCluster::start(3).await.unwrap();
    let mut env = common::start(&format!(
        "{}[timeouts]\ndrain_timeout_ms = 1000\n",
        c.gateway_toml()
    ))
    .await;
    // The gateway's keys live under <prefix>/<cluster.name> (default "jvpn").
    let store = EtcdStore::new(&c.store_config("/jvpn/jvpn", TIMEOUT).unwrap()).unwrap();
    let node = NodeId::new("g1").unwrap();
    eventually(Duration::from_secs(10), "the gateway's owner key", || {
        let (store, node) = (store.clone(), node.clone());
        async move { store.owners(&node).await.is_ok_and(|o| o.len() == 1) }
    })
    .await
    .unwrap();
    // Renewed past its 2 s TTL: the same lease all along.
    let held_lease = store.owner_leases(&node).await.unwrap()[0];
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(3) {
        assert_eq!(store.owner_leases(&node).await.unwrap(), [held_lease]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lost = |by: &'static str| ("by", by);
    assert_eq!(
        env.gw
            .metric("jvpn_gateway_store_leases_lost_total", &[lost("deadline")])
            .await
            .unwrap(),
        0.0
    );
    // SIGTERM: the lease is revoked before the process exits, so the owner
    // key is gone at once, not a TTL later (renewals ran every 400 ms, so
    // an expiry could not have removed it yet).
    env.gw.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = env.gw.wait().await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(store.owners(&node).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_store_is_unreachable_starts_counts_it_and_refuses_hellos() {
    // A store that is down: its one member killed (its certificates stay).
    let mut c = EtcdCluster::start(1).await.unwrap();
    c.kill(0).await.unwrap();
    // Ready without a store: readiness is about listeners, and a gateway
    // must come up to serve once the store is back.
    let env = common::start(&c.gateway_toml()).await;
    eventually(Duration::from_secs(10), "failed renewals counted", || {
        let gw = &env.gw;
        async move {
            gw.metric("jvpn_gateway_store_keepalive_failures_total", &[])
                .await
                .is_ok_and(|v| v >= 2.0)
        }
    })
    .await
    .unwrap();
    // Nothing can be recorded, so nothing is accepted: fail closed.
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    match agent.hello().await {
        Err(jvpn_agent::AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::StoreUnavailable)
        }
        r => panic!("HELLO without a store: {r:?}"),
    }
}

/// deploy/etcd/e{1,2,3}.env as written, with only their hosts, ports and
/// file paths moved to loopback and this test's PKI: the example forms a
/// working 3-member mTLS store that survives the loss of a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_example_members_form_a_working_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir_in("/dev/shm").unwrap();
    let pki = jvpn_gateway::pki::mint_etcd(dir.path(), "jvpn-dev", 3).unwrap();
    let ports: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = (0..3)
        .map(|_| {
            (
                jvpn_loadtest::etcd::free_port().unwrap(),
                jvpn_loadtest::etcd::free_port().unwrap(),
            )
        })
        .collect();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd");
    let mut members = Vec::new();
    for i in 0..3 {
        let text = std::fs::read_to_string(deploy.join(format!("e{}.env", i + 1))).unwrap();
        let mut vars = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap();
            let mut v = v.to_owned();
            for (j, (client, peer)) in ports.iter().enumerate() {
                v = v
                    .replace(&format!("10.0.0.1{}:2379", j + 1), &client.to_string())
                    .replace(&format!("10.0.0.1{}:2380", j + 1), &peer.to_string());
            }
            let (cert, key) = &pki.members[i];
            v = v
                .replace(
                    &format!("/etc/jvpn/etcd/e{}.pem", i + 1),
                    cert.to_str().unwrap(),
                )
                .replace(
                    &format!("/etc/jvpn/etcd/e{}.key", i + 1),
                    key.to_str().unwrap(),
                )
                .replace("/etc/jvpn/etcd/ca.pem", pki.ca.to_str().unwrap())
                .replace(
                    &format!("/var/lib/jvpn-etcd/e{}", i + 1),
                    data.path().join(format!("e{}", i + 1)).to_str().unwrap(),
                );
            assert!(
                !v.contains("10.0.0.") && !v.contains("/etc/jvpn") && !v.contains("/var/lib"),
                "e{}.env: {k} not moved to the test's hosts and files: {v}",
                i + 1
            );
            vars.push((k.to_owned(), v));
        }
        let log = std::fs::File::create(dir.path().join(format!("e{}.log", i + 1))).unwrap();
        let child = tokio::process::Command::new(jvpn_loadtest::etcd::ETCD)
            .env_clear()
            .envs(vars)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        members.push(child);
    }
    let read = std::fs::read;
    let store = EtcdStore::new(&EtcdConfig {
        endpoints: ports.iter().map(|(c, _)| format!("https://{c}")).collect(),
        prefix: "/jvpn/jvpn-dev".into(),
        tls: Some(jvpn_gateway::store::EtcdTls {
            ca_pem: read(&pki.ca).unwrap(),
            cert_pem: read(&pki.client.0).unwrap(),
            key_pem: read(&pki.client.1).unwrap(),
        }),
        request_timeout: TIMEOUT,
    })
    .unwrap();
    let sid = SessionId::from_bytes(rand::random());
    let lease = loop {
        // The example cluster may still be electing its first leader.
        if let Ok((l, _)) = store.grant(Duration::from_secs(30)).await {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    store
        .register_owner(&NodeId::new("g1").unwrap(), Incarnation(1), lease)
        .await
        .unwrap();
    let rec = record(("g1", 1, lease), (1, 1), &sid, [3; 32]);
    let logs = || {
        (1..=3)
            .map(|i| {
                std::fs::read_to_string(dir.path().join(format!("e{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let up = create_eventually(
        &store,
        sid,
        &rec,
        Duration::from_secs(30),
        "the example cluster to take a write",
    )
    .await;
    assert!(up.is_ok(), "{up:?}\n{}", logs());
    members[0].kill().await.unwrap();
    let other = SessionId::from_bytes(rand::random());
    let rec2 = record(("g1", 1, lease), (1, 1), &other, [4; 32]);
    create_eventually(
        &store,
        other,
        &rec2,
        Duration::from_secs(15),
        "a write with 2 of 3 members",
    )
    .await
    .unwrap();
    assert_eq!(store.load(&sid).await.unwrap().unwrap().record, rec);
}

/// A gateway with `[store]` on `c`, its owner lease held.
async fn store_gateway(c: &EtcdCluster) -> (common::Env, EtcdStore) {
    store_gateway_with(c, "").await
}

/// [`store_gateway`] with `extra` in its config.
async fn store_gateway_with(c: &EtcdCluster, extra: &str) -> (common::Env, EtcdStore) {
    store_gateway_full(c, "", extra).await
}

/// [`store_gateway_with`], with `store_keys` added to its `[store]`.
async fn store_gateway_full(
    c: &EtcdCluster,
    store_keys: &str,
    extra: &str,
) -> (common::Env, EtcdStore) {
    let env = common::start(&format!(
        "{}{store_keys}[timeouts]\ndrain_timeout_ms = 1000\n{extra}",
        c.gateway_toml()
    ))
    .await;
    let store = EtcdStore::new(&c.store_config("/jvpn/jvpn", TIMEOUT).unwrap()).unwrap();
    let node = NodeId::new("g1").unwrap();
    eventually(Duration::from_secs(10), "the gateway's owner lease", || {
        let (store, node) = (store.clone(), node.clone());
        async move { store.owners(&node).await.is_ok_and(|o| o.len() == 1) }
    })
    .await
    .unwrap();
    (env, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_recorded_before_hello_ok_and_each_resume_moves_its_binding() {
    let c = EtcdCluster::start(3).await.unwrap();
    let (env, store) = store_gateway(&c).await;
    let keys = env.pki.cluster_keys().unwrap();
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = agent.hello().await.unwrap();
    let sid = agent.session.as_ref().unwrap().id;
    // Already there when HelloOk arrived.
    let first = store
        .load(&sid)
        .await
        .unwrap()
        .expect("recorded before HelloOk");
    let inc = agent.session.as_ref().unwrap().incarnation;
    assert_eq!(first.record.owner_node, "g1");
    assert_eq!(first.record.owner_incarnation, inc);
    assert_eq!(first.record.owner_epoch, 1);
    assert_eq!(first.record.binding_epoch, 1);
    assert_eq!(first.record.principal, "dev-token");
    assert_eq!(first.record.seal, 2, "every field sealed");
    let k1 = open_record_key([&keys], &sid, &first.record).unwrap();
    t.echo(b"one").await.unwrap();
    drop(t);

    let mut t = common::resume(&mut agent).await.unwrap();
    let epoch = agent.session.as_ref().unwrap().binding_epoch;
    assert!(epoch > 1);
    // The binding the agent was told of is the one in the store.
    let second = store.load(&sid).await.unwrap().unwrap();
    assert_eq!(second.record.binding_epoch, epoch);
    assert_eq!(second.record.state_version, 2);
    assert!(second.mod_revision > first.mod_revision);
    let k2 = open_record_key([&keys], &sid, &second.record).unwrap();
    assert_ne!(*k1, *k2, "the key follows the binding");
    t.echo(b"two").await.unwrap();
    // The agent ends its session: the record goes with it.
    agent_ends(&mut t).await;
    record_gone(&store, &sid, Duration::from_secs(10)).await;
    for (op, want) in [("create", 1.0), ("bind", 1.0), ("delete", 1.0)] {
        assert_eq!(
            env.gw
                .metric(
                    "jvpn_gateway_store_writes_total",
                    &[("op", op), ("result", "ok")]
                )
                .await
                .unwrap(),
            want,
            "{op}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_store_attached_sessions_end_explicitly_and_hellos_are_refused() {
    attached_sessions_end_without_a_majority(&[0, 1, 2]).await;
}

/// Two of three members killed: the one left may have led, and a lone
/// leader answers renewals for about an election timeout before it steps
/// down; the fence deadline counts from the last answered renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_members_killed_attached_sessions_end_explicitly_and_hellos_are_refused() {
    attached_sessions_end_without_a_majority(&[1, 2]).await;
}

async fn attached_sessions_end_without_a_majority(members: &[usize]) {
    let mut c = EtcdCluster::start(3).await.unwrap();
    // The agent here sends no pings: the heartbeat timeout must not end
    // its session before the fence does (a lone leader answers renewals
    // a little longer, and CI found the race).
    let (env, store) = store_gateway_with(&c, "[policy]\nheartbeat_timeout_ms = 10000\n").await;
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = agent.hello().await.unwrap();
    let sid = agent.session.as_ref().unwrap().id;
    t.echo(b"attached").await.unwrap();
    // No majority: the owner lease cannot be renewed.
    for i in members {
        c.kill(*i).await.unwrap();
    }
    let killed = Instant::now();
    let reason = terminated(&mut t).await;
    assert_eq!(reason, jvpn_proto::ReasonCode::StoreUnavailable);
    // Served until the deadline (the last renewal's send time + TTL −
    // margin, at most 1.7 s after the kill), then waiting unserved for a
    // next lease for a TTL (2 s); a second of slack for a loaded machine.
    assert!(
        killed.elapsed() < Duration::from_millis(4_700),
        "ended {:?} after the store went",
        killed.elapsed()
    );
    // A new session cannot be recorded: refused, explicitly.
    let mut other = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    match other.hello().await {
        Err(jvpn_agent::AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::StoreUnavailable)
        }
        r => panic!("HELLO without a store: {r:?}"),
    }
    let m = |name, labels| metric(&env, name, labels);
    assert_eq!(
        m("jvpn_gateway_store_fenced_sessions_total", &[]).await,
        1.0
    );
    assert_eq!(
        m(
            "jvpn_gateway_hellos_total",
            &[("result", "store_unavailable")]
        )
        .await,
        1.0
    );
    // A fenced session's record is left for a taker: with a majority
    // back, it is still there, and no delete was tried (whatever its
    // result: one sent without a majority ends `unavailable` or `error`).
    for i in members {
        c.restart(*i).unwrap();
    }
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    eventually(Duration::from_secs(10), "the record read back", || {
        let store = store.clone();
        async move { matches!(store.load(&sid).await, Ok(Some(_))) }
    })
    .await
    .unwrap();
    let tried = m("jvpn_gateway_store_writes_total", &[("op", "delete")]).await;
    assert_eq!(tried, 0.0, "a delete of a fenced session's record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_whose_binding_cannot_be_written_gets_no_resume_ok() {
    let c = EtcdCluster::start(3).await.unwrap();
    let (env, store) = store_gateway(&c).await;
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let t = agent.hello().await.unwrap();
    drop(t);
    let sid = agent.session.as_ref().unwrap().id;
    // Someone else writes the record behind the owner's back (as a taker
    // would): the owner's next compare-and-set names a stale revision.
    let now = store.load(&sid).await.unwrap().unwrap();
    let mut behind = now.record.clone();
    behind.state_version += 1;
    store.update(&sid, now.mod_revision, &behind).await.unwrap();
    match common::resume(&mut agent).await {
        Err(jvpn_agent::AgentError::Terminated(r)) => {
            assert_eq!(r, jvpn_proto::ReasonCode::StoreUnavailable)
        }
        r => panic!("RESUME whose binding was not written: {r:?}"),
    }
    let m = |labels, name| metric(&env, name, labels);
    assert_eq!(
        m(
            &[("result", "store_unavailable")],
            "jvpn_gateway_resumes_total"
        )
        .await,
        1.0
    );
    assert_eq!(
        m(&[("result", "ok")], "jvpn_gateway_resumes_total").await,
        0.0
    );
    assert_eq!(
        m(
            &[("op", "bind"), ("result", "conflict")],
            "jvpn_gateway_store_writes_total"
        )
        .await,
        1.0
    );
    // The other writer's record is still there: the owner overwrote nothing.
    assert_eq!(store.load(&sid).await.unwrap().unwrap().record, behind);
}

/// etcd ended the owner lease early (its issues 12528 and 15247: a leader
/// paused and resumed revokes leases it still believes expired) while the
/// gateway lives: every session of that lease moves to the gateway's next
/// lease, with one compare-and-set each, instead of ending. A RESUME whose
/// binding write finds the lease gone makes the keeper renew at once (the
/// TTL here is an hour: its own turn would come 12 minutes later); the
/// RESUME is answered once its session moved, and the other session's
/// transport carries on. Nothing ends, and the records name the new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_lease_etcd_ended_early_move_to_the_next_lease() {
    let c = EtcdCluster::start(3).await.unwrap();
    let (env, store) = store_gateway_full(&c, "lease_ttl_ms = 3600000\n", "").await;
    let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    drop(a.hello().await.unwrap());
    let mut b = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut tb = b.hello().await.unwrap();
    let node = NodeId::new("g1").unwrap();
    let revoked: Vec<i64> = store
        .owner_leases(&node)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, lease)| lease)
        .collect();
    assert_eq!(revoked.len(), 1);
    store.revoke(revoked[0]).await.unwrap();
    // A's RESUME: its binding write finds the lease gone, and lands under
    // the next one.
    let mut ta = common::resume(&mut a)
        .await
        .unwrap_or_else(|e| panic!("RESUME under a revoked lease: {e}\n{}", env.gw.log()));
    ta.echo(b"a goes on").await.unwrap();
    // B was attached throughout: its transport carries on.
    tb.echo(b"b goes on").await.unwrap();
    let m = |name, labels| metric(&env, name, labels);
    assert_eq!(
        m(
            "jvpn_gateway_store_leases_lost_total",
            &[("by", "lease_gone")]
        )
        .await,
        1.0
    );
    assert_eq!(
        m("jvpn_gateway_store_fenced_sessions_total", &[]).await,
        0.0
    );
    assert_eq!(
        m(
            "jvpn_gateway_store_sessions_moved_total",
            &[("result", "ok")]
        )
        .await,
        2.0
    );
    let next = store.owner_leases(&node).await.unwrap();
    assert_eq!(next.len(), 1, "one owner lease: {next:?}");
    assert_ne!(next[0].1, revoked[0]);
    for agent in [&a, &b] {
        let sid = agent.session.as_ref().unwrap().id;
        let rec = store.load(&sid).await.unwrap().unwrap().record;
        assert_eq!(rec.owner_lease, next[0].1, "the record names the new lease");
        assert_eq!(rec.owner_epoch, 1, "the same owner: no takeover");
    }
}

/// The other side of moving to the next lease: a session whose record
/// someone else wrote since the owner last did (as a taker would; here
/// just before the lease is revoked) is not moved; it ends, explicitly,
/// and the other writer's record stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_record_another_wrote_is_not_moved_and_ends() {
    let c = EtcdCluster::start(3).await.unwrap();
    // The agent sends no pings: only the store can end its session.
    let (env, store) = store_gateway_with(&c, "[policy]\nheartbeat_timeout_ms = 10000\n").await;
    let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = a.hello().await.unwrap();
    t.echo(b"attached").await.unwrap();
    let sid = a.session.as_ref().unwrap().id;
    let now = store.load(&sid).await.unwrap().unwrap();
    let mut behind = now.record.clone();
    behind.state_version += 1;
    behind.owner_epoch += 1;
    store.update(&sid, now.mod_revision, &behind).await.unwrap();
    for (_, lease) in store
        .owner_leases(&NodeId::new("g1").unwrap())
        .await
        .unwrap()
    {
        store.revoke(lease).await.unwrap();
    }
    let reason = terminated(&mut t).await;
    assert_eq!(reason, jvpn_proto::ReasonCode::StoreUnavailable);
    let m = |name, labels| metric(&env, name, labels);
    assert_eq!(
        m(
            "jvpn_gateway_store_sessions_moved_total",
            &[("result", "lost")]
        )
        .await,
        1.0
    );
    assert_eq!(
        m("jvpn_gateway_store_fenced_sessions_total", &[]).await,
        1.0
    );
    assert_eq!(store.load(&sid).await.unwrap().unwrap().record, behind);
}

/// The store without a majority for less than a TTL past the lease's
/// deadline: the session is not served meanwhile (bytes its application
/// sends wait at the gateway, none reaches the destination), and once etcd
/// is back it moves to the next lease and its stream carries on
/// byte-exactly. No stream is reset, nothing is re-made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_shorter_than_a_ttl_past_the_deadline_ends_no_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = EtcdCluster::start(3).await.unwrap();
    // A TTL of patience after the deadline that fits two members'
    // restart, an election and the keeper's next grant on a busy machine.
    let (env, _store) = store_gateway_full(
        &c,
        "lease_ttl_ms = 8000\n",
        jvpn_loadtest::streamload::LOOPBACK_EGRESS,
    )
    .await;
    let echo = jvpn_loadtest::streamload::echo_destination().await.unwrap();
    let a = common::streaming_agent(&env.pki, vec![env.gw.client_addr]);
    let mut st = a.tunnel.connect(&common::target(echo)).await.unwrap();
    st.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    st.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"before");
    // No majority: the lease passes its deadline and the session waits.
    for i in [1, 2] {
        c.kill(i).await.unwrap();
    }
    eventually(
        Duration::from_secs(15),
        "the lease lost by its deadline",
        || {
            let gw = &env.gw;
            async move {
                gw.metric(
                    "jvpn_gateway_store_leases_lost_total",
                    &[("by", "deadline")],
                )
                .await
                .is_ok_and(|v| v == 1.0)
            }
        },
    )
    .await
    .unwrap();
    let during: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    st.write_all(&during).await.unwrap();
    for i in [1, 2] {
        c.restart(i).unwrap();
    }
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut got = vec![0u8; during.len()];
    tokio::time::timeout(Duration::from_secs(20), st.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("no echo 20 s after etcd came back\n{}", env.gw.log()))
        .unwrap();
    assert!(
        got == during,
        "the bytes sent while unserved came back changed"
    );
    st.write_all(b"after").await.unwrap();
    let mut back = [0u8; 5];
    st.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after");
    let m = |name, labels| metric(&env, name, labels);
    assert_eq!(
        m("jvpn_gateway_store_fenced_sessions_total", &[]).await,
        0.0
    );
    assert_eq!(
        m(
            "jvpn_gateway_store_sessions_moved_total",
            &[("result", "ok")]
        )
        .await,
        1.0
    );
    let rep = a.report.lock().unwrap().clone();
    assert_eq!(rep.rehandshakes, 0, "{rep:?}");
    assert!(rep.streams_reset.is_empty(), "{rep:?}");
}

/// Quorum kept, nothing visible: each etcd member in turn is SIGKILLed
/// (one of them the leader), then each in turn SIGSTOPped, while agents
/// RESUME back to back and new agents HELLO one after another. No session
/// ends and no HELLO is refused: a write that meets the election waits
/// for the new leader (within the lease) instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_down_at_a_time_ends_no_session() {
    use jvpn_loadtest::bench_takeover::resume_until_attached;
    use nix::sys::signal::Signal;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = EtcdCluster::start(3).await.unwrap();
    // Back-to-back RESUMEs are this test's load, not abuse.
    let (env, _store) = store_gateway_with(
        &c,
        "[policy]\nswitch_cooldown_ms = 1\nmax_switches_per_min = 1000\n",
    )
    .await;
    let mut agents = Vec::new();
    for _ in 0..6 {
        let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
        drop(common::hello(&mut a).await);
        agents.push(a);
    }
    let sessions: Vec<SessionId> = agents
        .iter()
        .map(|a| a.session.as_ref().unwrap().id)
        .collect();
    let (mut resumes, mut hellos) = (0, 0);
    for (i, kill) in [
        (0, true),
        (1, true),
        (2, true),
        (0, false),
        (1, false),
        (2, false),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for mut a in agents.drain(..) {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    match resume_until_attached(&mut a, Duration::from_secs(10)).await {
                        Ok(mut t) => t.echo(b"on").await.map(|()| n += 1)?,
                        Err(e) => return Err(e),
                    }
                }
                Ok((a, n))
            }));
        }
        if kill {
            c.kill(i).await.unwrap();
        } else {
            c.signal(i, Signal::SIGSTOP).unwrap();
        }
        // Held past an election and past the owner lease's TTL (2 s),
        // while new sessions keep arriving: every HELLO is answered.
        let held = Instant::now() + Duration::from_millis(2_500);
        let mut hellos_now = 0;
        while Instant::now() < held {
            let from = Some(jvpn_loadtest::harness::source_ip(hellos));
            let mut a = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, from).unwrap();
            if let Err(e) = a.hello().await {
                panic!(
                    "member {i} {}: a HELLO was refused: {e}\n{}",
                    if kill { "killed" } else { "paused" },
                    env.gw.log()
                );
            }
            hellos += 1;
            hellos_now += 1;
        }
        assert!(hellos_now > 0);
        if kill {
            c.restart(i).unwrap();
        } else {
            c.signal(i, Signal::SIGCONT).unwrap();
        }
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            match t.await.unwrap() {
                Ok((a, n)) => {
                    resumes += n;
                    agents.push(a);
                }
                Err(e) => panic!(
                    "member {i} {}: a session failed: {e}\n{}",
                    if kill { "killed" } else { "paused" },
                    env.gw.log()
                ),
            }
        }
    }
    let now: Vec<SessionId> = agents
        .iter()
        .map(|a| a.session.as_ref().unwrap().id)
        .collect();
    assert_eq!(now, sessions, "the same sessions throughout");
    assert!(resumes > 6 * 6, "{resumes} RESUMEs");
    // The leader was among the members lost (each went once): some
    // binding writes met the election and were sent again.
    assert!(
        env.gw
            .metric("jvpn_gateway_store_write_retries_total", &[])
            .await
            .unwrap()
            > 0.0,
        "no write met an election: the path under test did not run"
    );
    assert_eq!(
        env.gw
            .metric("jvpn_gateway_store_fenced_sessions_total", &[])
            .await
            .unwrap(),
        0.0
    );
}

/// Group commit: one request carries many sessions' writes, each with its
/// own compares, and each lands or fails alone with the answer a write of
/// its own would get (created, exists, bound, stale, lease gone), at the
/// most writes a batch holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_writes_lands_or_fails_each_on_its_own_compares() {
    use jvpn_gateway::store::{MAX_BATCH, RecordWrite};
    let (_c, store) = cluster_and_store().await;
    let live = owner(&store, "gw-a", 1, Duration::from_secs(30)).await;
    let gone = owner(&store, "gw-b", 1, Duration::from_secs(30)).await;
    // Records of the lease about to go, written while it lives.
    let mut writes = Vec::new();
    let mut want = Vec::new();
    for i in 0..MAX_BATCH {
        let sid = SessionId::from_bytes(rand::random());
        let kind = i % 6;
        let lease = if kind >= 4 {
            ("gw-b", 1, gone)
        } else {
            ("gw-a", 1, live)
        };
        let rec = record(lease, (1, 1), &sid, [i as u8; 32]);
        let mut next = rec.clone();
        next.binding_epoch = 2;
        next.state_version = 2;
        let (expected, record) = match kind {
            // Created.
            0 | 4 => (None, rec),
            // Created already (by another write: its own key nonce).
            1 => {
                let earlier = record(lease, (1, 1), &sid, [i as u8; 32]);
                store.create(&sid, &earlier).await.unwrap();
                (None, rec)
            }
            // Bound at the revision read; at an older one.
            2 | 3 | 5 => {
                let r = store.create(&sid, &rec).await.unwrap();
                if kind == 3 {
                    // Another writer moved it on since `r` was read.
                    let mut theirs = next.clone();
                    theirs.binding_epoch = 3;
                    store.update(&sid, r, &theirs).await.unwrap();
                }
                let at = r;
                (Some(at), next)
            }
            _ => unreachable!(),
        };
        want.push(kind);
        writes.push(RecordWrite {
            sid,
            expected,
            record,
        });
    }
    store.revoke(gone).await.unwrap();
    let before: Vec<_> = {
        let mut v = Vec::new();
        for w in &writes {
            v.push(store.load(&w.sid).await.unwrap());
        }
        v
    };
    let results = store.write_many(&writes).await.unwrap();
    assert_eq!(results.len(), writes.len());
    let mut revisions = std::collections::HashSet::new();
    for (((w, r), kind), was) in writes.iter().zip(&results).zip(&want).zip(&before) {
        let now = store.load(&w.sid).await.unwrap();
        match (kind, r) {
            (0 | 2, Ok(rev)) => {
                revisions.insert(*rev);
                let now = now.unwrap();
                assert_eq!((&now.record, now.mod_revision), (&w.record, *rev));
            }
            (1, Err(StoreError::Exists)) => assert_eq!(&now, was),
            (3, Err(StoreError::Stale { expected })) => {
                assert_eq!(Some(*expected), w.expected);
                assert_eq!(&now, was);
            }
            (4 | 5, Err(StoreError::LeaseGone)) => assert_eq!(&now, was),
            _ => panic!("kind {kind}: {r:?}"),
        }
    }
    assert_eq!(
        revisions.len(),
        1,
        "one request, one revision: {revisions:?}"
    );
}

/// The writer batches only what queues behind requests already out: many
/// concurrent writes need fewer requests than writes, every write gets its
/// own answer, and two writes of one session never share a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_requests_and_each_gets_its_answer() {
    use jvpn_gateway::store::{Batcher, RecordWrite};
    let (_c, store) = cluster_and_store().await;
    let live = owner(&store, "gw-a", 1, Duration::from_secs(30)).await;
    let batcher = Batcher::spawn(store.clone());
    let sids: Vec<_> = (0..300)
        .map(|_| SessionId::from_bytes(rand::random()))
        .collect();
    // Each session created twice at once, back to back (two records with
    // their own nonces): one lands, the other finds it there.
    let until = Instant::now() + Duration::from_secs(10);
    let mut tasks = tokio::task::JoinSet::new();
    for sid in sids.iter().flat_map(|s| [s, s]) {
        let w = RecordWrite {
            sid: *sid,
            expected: None,
            record: record(("gw-a", 1, live), (1, 1), sid, [3; 32]),
        };
        let b = batcher.clone();
        tasks.spawn(async move { b.write(w, until).await });
    }
    let results = tasks.join_all().await;
    let (ok, exists) = results.iter().fold((0, 0), |(o, e), r| match r {
        Ok(_) => (o + 1, e),
        Err(StoreError::Exists) => (o, e + 1),
        Err(other) => panic!("{other}"),
    });
    assert_eq!((ok, exists), (sids.len(), sids.len()));
    for sid in &sids {
        assert!(store.load(sid).await.unwrap().is_some());
    }
    let (requests, writes) = batcher.sent();
    assert_eq!(writes, 2 * sids.len() as u64);
    assert!(
        requests < writes / 2,
        "{requests} requests for {writes} writes: not batched"
    );
}

/// A request resent after it landed (the client moves to another member
/// when one is slow, and the first may have applied it) fails its own
/// compares; the answer must still say it landed, at its revision, and
/// only for exactly that record: another record at the same place is
/// still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_again_after_it_landed_is_answered_as_landed() {
    use jvpn_gateway::store::RecordWrite;
    let (_c, store) = cluster_and_store().await;
    let live = owner(&store, "gw-a", 1, Duration::from_secs(30)).await;
    let sid = SessionId::from_bytes(rand::random());
    let first = RecordWrite {
        sid,
        expected: None,
        record: record(("gw-a", 1, live), (1, 1), &sid, [1; 32]),
    };
    let once = |w: RecordWrite| {
        let store = store.clone();
        async move { store.write_many(&[w]).await.unwrap().pop().unwrap() }
    };
    let r1 = once(first.clone()).await.unwrap();
    assert_eq!(once(first.clone()).await.unwrap(), r1, "a create resent");
    let other = RecordWrite {
        record: record(("gw-a", 1, live), (1, 1), &sid, [1; 32]),
        ..first.clone()
    };
    assert!(matches!(once(other).await, Err(StoreError::Exists)));
    let mut next = first.record.clone();
    next.binding_epoch = 2;
    let bind = RecordWrite {
        sid,
        expected: Some(r1),
        record: next,
    };
    let r2 = once(bind.clone()).await.unwrap();
    assert!(r2 > r1);
    assert_eq!(once(bind.clone()).await.unwrap(), r2, "a bind resent");
    let mut late = first.record.clone();
    late.binding_epoch = 9;
    let late = RecordWrite {
        record: late,
        ..bind
    };
    assert!(matches!(
        once(late).await,
        Err(StoreError::Stale { expected }) if expected == r1
    ));
    assert_eq!(store.load(&sid).await.unwrap().unwrap().mod_revision, r2);
}

/// A write whose writer gave up (its lease deadline passed) while it
/// queued is never sent; one etcd refuses (too large) fails alone, not the
/// writes that shared its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_up_write_is_never_sent_and_a_refused_one_fails_alone() {
    use jvpn_gateway::store::{Batcher, RecordWrite};
    let (_c, store) = cluster_and_store().await;
    let live = owner(&store, "gw-a", 1, Duration::from_secs(30)).await;
    let batcher = Batcher::spawn(store.clone());
    let write = |sid: SessionId| RecordWrite {
        sid,
        expected: None,
        record: record(("gw-a", 1, live), (1, 1), &sid, [5; 32]),
    };
    let late = SessionId::from_bytes(rand::random());
    let r = batcher.write(write(late), Instant::now()).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    // The writer handles writes in order: once a later one is answered,
    // the given-up one was dropped or sent.
    let later = SessionId::from_bytes(rand::random());
    let until = Instant::now() + Duration::from_secs(10);
    batcher.write(write(later), until).await.unwrap();
    assert!(
        store.load(&late).await.unwrap().is_none(),
        "sent after its deadline"
    );
    assert_eq!(batcher.sent().1, 1);

    // 1.6 MiB: past etcd's request limit (1.5 MiB), within its gRPC one.
    let big = SessionId::from_bytes(rand::random());
    let mut huge = write(big);
    huge.record.principal = "x".repeat(1_600_000);
    let mut tasks = tokio::task::JoinSet::new();
    let small: Vec<_> = (0..40)
        .map(|_| SessionId::from_bytes(rand::random()))
        .collect();
    for (i, sid) in small.iter().enumerate() {
        let (b, w) = (batcher.clone(), write(*sid));
        tasks.spawn(async move { (false, b.write(w, until).await) });
        if i == 20 {
            let (b, w) = (batcher.clone(), huge.clone());
            tasks.spawn(async move { (true, b.write(w, until).await) });
        }
    }
    for (is_big, r) in tasks.join_all().await {
        if is_big {
            assert!(matches!(r, Err(StoreError::Refused(_))), "{r:?}");
        } else {
            r.unwrap();
        }
    }
    assert!(store.load(&big).await.unwrap().is_none());
}

/// Records nobody can use again are swept by a running gateway: once their
/// owner is gone, a session past its end of life and one no taker may
/// claim (its agent refuses takers, or no end of life was recorded); a
/// record naming no owner lease, past its end of life; and one of its own,
/// expired, whose session it does not hold (a lost delete). Records a taker
/// may still claim (also within the minute's grace after their end of life),
/// records of a live owner, and a lease-less record without an end of
/// life stay, through two full passes of the sweep. (Failed first against
/// the gateway without a sweep: the records were still there after 20 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_nobody_can_use_are_swept_and_the_rest_stay() {
    let c = EtcdCluster::start(3).await.unwrap();
    let (env, store) = store_gateway_full(&c, "sweep_interval_ms = 100\n", "").await;
    let live = owner(&store, "gw-live", 1, Duration::from_secs(60)).await;
    // An owner that dies once its records are written.
    let dead = owner(&store, "gw-dead", 2, Duration::from_secs(60)).await;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let hour = 3_600_000;
    let case = |who: (&str, u64, i64), migrates: bool, end_of_life: u64| {
        let sid = SessionId::from_bytes(rand::random());
        let mut r = record(who, (1, 1), &sid, rand::random());
        r.agent_migrates = migrates;
        r.end_of_life_unix_ms = end_of_life;
        (sid, r)
    };
    // The gateway's own owner key: an expired record of its own whose
    // session it does not hold is a delete it lost.
    let (inc, lease) = store
        .owner_leases(&NodeId::new("g1").unwrap())
        .await
        .unwrap()[0];
    let swept = [
        case(("g1", inc.0, lease), true, now - hour),
        case(("gw-dead", 2, dead), true, now - hour),
        case(("gw-dead", 2, dead), false, now + hour),
        case(("gw-dead", 2, dead), true, 0),
        case(("gw-old", 3, 0), false, now - hour),
    ];
    let kept = [
        case(("gw-dead", 2, dead), true, now + hour),
        case(("gw-dead", 2, dead), true, now - 30_000),
        case(("gw-live", 1, live), false, now + hour),
        // Its owner deletes it (a clock ahead must not cut a live owner's).
        case(("gw-live", 1, live), true, now - hour),
        case(("gw-old", 3, 0), false, 0),
    ];
    for (sid, r) in swept.iter().chain(&kept) {
        store.create(sid, r).await.unwrap();
    }
    // Bytes that are no record: nobody can use them either.
    let garbage = SessionId::from_bytes(rand::random());
    c.put_raw(&store.session_key(&garbage), &[0xff; 3]).unwrap();
    store.revoke(dead).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the unusable records swept",
        || {
            let (store, sids) = (
                store.clone(),
                swept.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            );
            async move {
                for sid in sids.into_iter().chain([garbage]) {
                    if !matches!(store.load(&sid).await, Ok(None)) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await
    .unwrap();
    // Two more passes over every id: each kept record was looked at since.
    let passes = || env.gw.metric("jvpn_gateway_store_sweep_passes_total", &[]);
    let before = passes().await.unwrap();
    eventually(Duration::from_secs(30), "two more passes", || async {
        passes().await.unwrap() >= before + 2.0
    })
    .await
    .unwrap();
    for (sid, _) in &kept {
        assert!(
            store.load(sid).await.unwrap().is_some(),
            "a record that may still be used was swept"
        );
    }
    for (reason, n) in [("expired", 3.0), ("unclaimable", 2.0), ("undecodable", 1.0)] {
        let labels = [("reason", reason)];
        let got = env.gw.metric("jvpn_gateway_store_swept_total", &labels);
        assert_eq!(got.await.unwrap(), n, "swept {reason}");
    }
}

/// The sweep's ranges, driven by hand with a page of 2 over 40 records: a
/// range that holds more than a page narrows and goes on after its last
/// record, an empty one widens, and every record is read in each pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_reads_every_record_a_page_at_a_time() {
    let (_c, store) = cluster_and_store().await;
    let dead = owner(&store, "gw-dead", 2, Duration::from_secs(60)).await;
    let live = owner(&store, "gw-live", 1, Duration::from_secs(60)).await;
    let mut garbage = Vec::new();
    for i in 0..40 {
        let sid = SessionId::from_bytes(rand::random());
        let (who, migrates) = if i % 2 == 0 {
            (("gw-dead", 2, dead), false)
        } else {
            (("gw-live", 1, live), false)
        };
        let rec = record(who, (1, 1), &sid, rand::random());
        let rec = SessionRecord {
            agent_migrates: migrates,
            ..rec
        };
        store.create(&sid, &rec).await.unwrap();
        if i % 2 == 0 {
            garbage.push(sid);
        }
    }
    store.revoke(dead).await.unwrap();
    let mut sweeper = jvpn_gateway::store::Sweeper::new(store.clone(), 2, None);
    // Records read in each pass (a pass ends where the sweep wraps; the
    // first starts at a random id, so it is partial).
    let mut passes = vec![0];
    let mut steps = 0;
    while passes.len() < 4 {
        let step = sweeper.step(0).await.unwrap();
        *passes.last_mut().unwrap() += step.read;
        if step.wrapped {
            passes.push(0);
        }
        steps += 1;
        assert!(steps < 10_000, "the sweep never came round");
    }
    // The second pass read every record left (the live owner's 20, and
    // what the first, partial pass had not swept yet); the third read
    // exactly the 20 that stay: none skipped, none read twice.
    assert!(passes[1] >= 20, "{passes:?}");
    assert_eq!(passes[2], 20, "{passes:?}");
    for sid in &garbage {
        assert!(store.load(sid).await.unwrap().is_none(), "not swept");
    }
    let left = store.session_range(0, None, 1000).await.unwrap().0.len();
    assert_eq!(left, 20, "the live owner's records stay");
}

/// A session that ends while its record's create is in flight (here its
/// lifetime runs out while etcd answers slowly) leaves nothing behind: the
/// agent gets no `HelloOk`, the record is deleted, and no entry is left
/// that would make the gateway believe it still holds the session (and
/// keep the sweep off its record). Before, the create landed after the
/// end: `HelloOk` went out for a session that no longer existed and its
/// record stayed in etcd for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_while_its_record_is_written_leaves_nothing_behind() {
    // Every chunk to and from etcd waits 300 ms: a write takes 600 ms at
    // least, twice the sessions' whole lifetime.
    let (_c, _proxy, env, store) = behind_a_proxy(
        jvpn_loadtest::faultproxy::Mode::Delay(Duration::from_millis(300)),
        "lease_ttl_ms = 15000\nrequest_timeout_ms = 5000\nsweep_interval_ms = 0\n\
         [timeouts]\ndrain_timeout_ms = 1000\n\
         [policy]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 200\n\
         transport_lost_ttl_ms = 250\nsession_max_lifetime_ms = 300\n",
    )
    .await;
    let metric = |op: &'static str| {
        let gw = &env.gw;
        async move {
            gw.metric(
                "jvpn_gateway_store_writes_total",
                &[("op", op), ("result", "ok")],
            )
            .await
            .unwrap()
        }
    };
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    // The gateway serves once its lease grant's answer came through the
    // slow proxy; HELLOs before that are refused without a write.
    let until = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = agent.hello().await;
        if r.is_ok() || metric("create").await > 0.0 || Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match r {
        // Refused as a HELLO whose credential had run out.
        Err(jvpn_agent::AgentError::Rejected { reason, .. }) => {
            assert_eq!(reason, jvpn_proto::ReasonCode::AuthFailed)
        }
        Ok(_) => panic!("HelloOk for a session that ended before it was recorded"),
        Err(e) => panic!("refused for another reason: {e}"),
    }
    // The create did land (the case at hand, not a refused write)...
    assert_eq!(metric("create").await, 1.0, "{}", env.gw.log());
    // ...and its record goes.
    eventually(Duration::from_secs(10), "no record left", || {
        let store = store.clone();
        async move {
            store
                .session_range(0, None, 10)
                .await
                .is_ok_and(|(kvs, _)| kvs.is_empty())
        }
    })
    .await
    .unwrap();
    // Deleted by the gateway (its answer comes back through the proxy).
    eventually(Duration::from_secs(10), "the delete counted", || async {
        metric("delete").await == 1.0
    })
    .await
    .unwrap();
}

/// Review of the attached loop: the engine's liveness clock started when a
/// HELLO or RESUME committed, and a slow store write (an etcd leader
/// change, a lease renewal) took most of it before the answer went out:
/// the gateway's first keep-alive then came too late, and a healthy new
/// transport was retired (`heartbeat_timeout`) just after its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_write_does_not_retire_the_transport_it_answers() {
    // Every chunk to and from etcd waits 600 ms: a write takes 1.2 s at
    // least, more than the heartbeat timeout (2 s) less the keep-alive
    // interval (1 s).
    let (_c, _proxy, env, _store) = behind_a_proxy(
        jvpn_loadtest::faultproxy::Mode::Delay(Duration::from_millis(600)),
        "lease_ttl_ms = 15000\nrequest_timeout_ms = 5000\nsweep_interval_ms = 0\n",
    )
    .await;
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    agent.set_listens_for_keepalives(true);
    // Nothing from the agent for 3 s: the gateway's keep-alives come, and
    // no `Terminate`.
    async fn quiet(t: &mut jvpn_agent::Transport, what: &str) {
        use jvpn_proto::pb::session::frame::Kind;
        let until = Instant::now() + Duration::from_secs(3);
        let mut keepalives = 0;
        while let Ok(f) = tokio::time::timeout_at(until.into(), t.recv()).await {
            match f {
                Ok(Kind::Terminate(x)) => panic!("{what}: terminated, reason {}", x.reason),
                Ok(Kind::Pong(_)) => keepalives += 1,
                Ok(_) => {}
                Err(e) => panic!("{what}: the transport ended: {e}"),
            }
        }
        assert!(keepalives >= 2, "{what}: {keepalives} keep-alives in 3 s");
    }
    let mut t = common::hello(&mut agent).await;
    quiet(&mut t, "after the HelloOk").await;
    drop(t);
    let mut t = agent.resume().await.unwrap();
    quiet(&mut t, "after the ResumeOk").await;
}

/// Review of topology 3: a session that ends while etcd cannot be reached
/// loses its record once etcd is back. Its delete used to be tried once:
/// the record stayed, and a later takeover (after its owner died) brought
/// a session its agent or an operator had ended back to life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_sessions_record_goes_once_etcd_is_back() {
    // A long lease: the outage below is shorter, the gateway keeps serving.
    let (_c, proxy, env, store) = behind_a_proxy(
        jvpn_loadtest::faultproxy::Mode::Pass,
        "lease_ttl_ms = 30000\nsweep_interval_ms = 0\n[timeouts]\ndrain_timeout_ms = 1000\n",
    )
    .await;
    let mut agent = jvpn_loadtest::harness::agent(&env.pki, env.gw.client_addr, None).unwrap();
    let mut t = agent.hello().await.unwrap();
    let sid = agent.session.as_ref().unwrap().id;
    assert!(store.load(&sid).await.unwrap().is_some());
    // etcd goes out of reach, then the agent ends its session.
    proxy.set_mode(jvpn_loadtest::faultproxy::Mode::Blackhole);
    proxy.stall_all();
    agent_ends(&mut t).await;
    let failed = || {
        let gw = &env.gw;
        async move {
            gw.metric(
                "jvpn_gateway_store_writes_total",
                &[("op", "delete"), ("result", "unavailable")],
            )
            .await
            .unwrap_or(0.0)
        }
    };
    eventually(Duration::from_secs(20), "a delete that failed", || async {
        failed().await >= 1.0
    })
    .await
    .unwrap();
    // etcd is back.
    proxy.set_mode(jvpn_loadtest::faultproxy::Mode::Pass);
    proxy.cut_all();
    record_gone(&store, &sid, Duration::from_secs(20)).await;
}

/// A one-member etcd, a fault proxy in `mode` in front of it, and a gateway
/// whose store goes through the proxy (`extra` follows its `[store]`
/// keys), its owner lease held.
async fn behind_a_proxy(
    mode: jvpn_loadtest::faultproxy::Mode,
    extra: &str,
) -> (
    EtcdCluster,
    jvpn_loadtest::faultproxy::FaultProxy,
    common::Env,
    EtcdStore,
) {
    let c = EtcdCluster::start(1).await.unwrap();
    let member: std::net::SocketAddr = c.endpoints()[0]
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let proxy = jvpn_loadtest::faultproxy::FaultProxy::start(member)
        .await
        .unwrap();
    proxy.set_mode(mode);
    let store_toml = c
        .gateway_toml()
        .replace(&member.to_string(), &proxy.addr.to_string());
    let env = common::start(&format!("{store_toml}{extra}")).await;
    let store = EtcdStore::new(&c.store_config("/jvpn/jvpn", TIMEOUT).unwrap()).unwrap();
    let node = NodeId::new("g1").unwrap();
    eventually(Duration::from_secs(20), "the gateway's owner lease", || {
        let (store, node) = (store.clone(), node.clone());
        async move { store.owners(&node).await.is_ok_and(|o| o.len() == 1) }
    })
    .await
    .unwrap();
    (c, proxy, env, store)
}

/// The value of the gateway's metric `name` with `labels`.
async fn metric(env: &common::Env, name: &str, labels: &[(&str, &str)]) -> f64 {
    env.gw.metric(name, labels).await.unwrap()
}

/// Why the gateway ended the session on `t` (its `Terminate`), within 10 s.
async fn terminated(t: &mut jvpn_agent::Transport) -> jvpn_proto::ReasonCode {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match t.recv().await {
                Err(jvpn_agent::AgentError::Terminated(r)) => return r,
                Err(e) => panic!("the session ended without Terminate: {e}"),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("Terminate within 10 s")
}

/// The agent ends its session (`Terminate{agent_closed}`).
async fn agent_ends(t: &mut jvpn_agent::Transport) {
    t.send(jvpn_proto::pb::session::frame::Kind::Terminate(
        jvpn_proto::pb::session::Terminate {
            reason: jvpn_proto::ReasonCode::AgentClosed as i32,
        },
    ))
    .await
    .unwrap();
}

/// Waits until `sid`'s record is gone from the store.
async fn record_gone(store: &EtcdStore, sid: &SessionId, within: Duration) {
    eventually(within, "the ended session's record gone", || {
        let store = store.clone();
        async move { store.load(sid).await.is_ok_and(|r| r.is_none()) }
    })
    .await
    .unwrap();
}
