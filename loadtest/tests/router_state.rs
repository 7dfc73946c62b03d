//! The router's routing decisions driven directly on its state (no
//! process): what connections see before the first tick, and owner tags
//! across ticks (issue 14 review findings).

#![allow(clippy::unwrap_used)]

use jvpn_loadtest::cluster::{RouterOptions, write_router_config};
use jvpn_loadtest::harness::TestPki;
use jvpn_proto::ring::owner_tag;
use jvpn_proto::token::{TokenContents, TokenKey};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use jvpn_router::membership::{Heartbeat, NodeState};
use jvpn_router::state::{ResumeRoute, RouterState};

fn state() -> (std::sync::Arc<RouterState>, TestPki, tempfile::TempDir) {
    let pki = TestPki::new(&["g1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RouterOptions {
        router_id: "r1".into(),
        ..RouterOptions::default()
    };
    let path = write_router_config(&pki, dir.path(), &opts).unwrap();
    let cfg = jvpn_router::config::load(&path).unwrap();
    (RouterState::new(cfg), pki, dir)
}

/// A heartbeat of a ready, leased member `node` at `inc`.
fn ready(node: &str, inc: u64) -> Heartbeat {
    Heartbeat {
        node_id: NodeId::new(node).unwrap(),
        incarnation: Incarnation(inc),
        // The member's advertised address: routing data, nothing binds it.
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7443)),
        state: NodeState::Ready,
        weight: 1,
        lease_ok: true,
        in_view: true,
        ordered: true,
        leaving: false,
    }
}

fn token(pki: &TestPki, node: &str, inc: u64) -> (u8, [u8; jvpn_proto::token::TOKEN_LEN]) {
    let keys = pki.cluster_keys().unwrap();
    let key = TokenKey::new(&keys);
    let contents = TokenContents {
        session_id: SessionId::from_bytes([7; 16]),
        owner_tag: owner_tag(&keys, &NodeId::new(node).unwrap(), Incarnation(inc)),
    };
    (key.key_id(), key.seal([3; 12], &contents))
}

/// Before the first tick has run (agents that queued during a restart
/// arrive first), an unknown owner is transient, as during all of the
/// warm-up: never `owner_lost`, which would make agents re-handshake.
#[test]
fn before_the_first_tick_an_unknown_owner_is_unreachable_not_lost() {
    let (s, pki, _dir) = state();
    let (key_id, t) = token(&pki, "g1", 5);
    assert_eq!(s.route_resume(key_id, &t), ResumeRoute::Unreachable);
}

/// A gateway's first heartbeat makes its sessions routable at once, and
/// ticks keep its owner tags.
#[test]
fn a_new_incarnation_is_routable_after_its_first_heartbeat_and_stays_so() {
    let (s, pki, _dir) = state();
    let hb = ready("g1", 5);
    let (key_id, t) = token(&pki, "g1", 5);
    s.on_heartbeat(&hb);
    for _ in 0..3 {
        assert!(
            matches!(s.route_resume(key_id, &t), ResumeRoute::Splice { .. }),
            "{:?}",
            s.route_resume(key_id, &t)
        );
        s.tick();
        s.on_heartbeat(&hb);
    }
}

/// Design note 53: a member's agent silence is kept per incarnation while
/// the member is known, dropped when it says 0 (or is forgotten), and a
/// member that never said one (a gateway one version older) has none.
#[test]
fn a_members_agent_silence_is_kept_per_incarnation() {
    let (s, _pki, _dir) = state();
    let g1 = NodeId::new("g1").unwrap();
    s.on_heartbeat(&ready("g1", 5));
    assert_eq!(s.agent_silence(&g1, Incarnation(5)), None);
    s.set_agent_silence(&g1, Incarnation(5), 2_000);
    s.tick();
    let two = Some(std::time::Duration::from_millis(2_000));
    assert_eq!(s.agent_silence(&g1, Incarnation(5)), two);
    assert_eq!(s.agent_silence(&g1, Incarnation(6)), None);
    s.set_agent_silence(&g1, Incarnation(5), 0);
    assert_eq!(s.agent_silence(&g1, Incarnation(5)), None);
    // An incarnation the membership does not know is forgotten at a tick.
    s.set_agent_silence(&g1, Incarnation(5), 2_000);
    s.set_agent_silence(&g1, Incarnation(9), 3_000);
    s.tick();
    assert_eq!(s.agent_silence(&g1, Incarnation(5)), two);
    assert_eq!(s.agent_silence(&g1, Incarnation(9)), None);
}

/// The table of open connections per source holds at least as many
/// sources as the router takes connections: a router full of distinct
/// clients (each with a connection open) still admits the next one as
/// long as `max_connections` allows. It used to share one small overflow
/// pool among every source past `source_table_capacity` (65,536 by
/// default, under the default 100,000 connections), refusing them all.
#[test]
fn distinct_sources_are_admitted_up_to_max_connections() {
    let pki = TestPki::new(&["g1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RouterOptions {
        router_id: "r1".into(),
        extra_toml: "[admission]\nsource_table_capacity = 2\n\
                     per_source_max_connections = 1\nmax_connections = 10\n"
            .into(),
        ..RouterOptions::default()
    };
    let path = write_router_config(&pki, dir.path(), &opts).unwrap();
    let s = RouterState::new(jvpn_router::config::load(&path).unwrap());
    let admit = |i: u32| {
        let ip = std::net::IpAddr::from([10, 0, 0, i as u8]);
        s.admit(ip.into())
            .unwrap_or_else(|_| panic!("source {i} refused"))
    };
    let mut slots: Vec<_> = (1..=5).map(admit).collect();
    // A reload (SIGHUP) keeps the table's size.
    s.reconfigure_admission(&s.cfg.raw.admission);
    slots.extend((6..=10).map(admit));
    assert_eq!(slots.len(), 10);
}
