//! HELLO placement and RESUME routing decisions on the router at N members
//! (issue 14), through the membership and tag mutexes (how connections
//! decided before) and through the published snapshot (how they decide
//! now), alone and beside a thread that applies heartbeats back to back
//! (the membership lock's other user):
//! `cargo bench -p jvpn-router --bench routing`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jvpn_proto::keys::{ClusterKeys, ClusterSecret};
use jvpn_proto::ring::{Ring, RingParams, View, owner_tag};
use jvpn_proto::token::{TOKEN_LEN, TokenContents, TokenKey, TokenKeyring};
use jvpn_proto::{Incarnation, Mono, NodeId, SessionId};
use jvpn_router::membership::{Heartbeat, Membership, MembershipConfig, NodeState, Routes};
use jvpn_router::routing::{OwnerTags, place_hello, route_token};

fn hb(i: usize) -> Heartbeat {
    Heartbeat {
        node_id: NodeId::new(&format!("gw-{i:04}")).unwrap(),
        incarnation: Incarnation(i as u64 + 1),
        addr: format!("10.0.{}.{}:7443", i / 250, i % 250 + 1)
            .parse()
            .unwrap(),
        state: NodeState::Ready,
        weight: 1,
        lease_ok: true,
        in_view: true,
        ordered: true,
        leaving: false,
    }
}

struct Setup {
    mship: Arc<Mutex<Membership>>,
    tags: Arc<Mutex<OwnerTags>>,
    routes: ArcSwap<Routes>,
    tag_view: ArcSwap<OwnerTags>,
    ring: Ring,
    tokens: TokenKeyring,
    sealed: Vec<[u8; TOKEN_LEN]>,
    now: Mono,
}

fn setup(n: usize, k: &ClusterKeys) -> Setup {
    let mut m = Membership::new(MembershipConfig::default(), Mono::ZERO);
    let mut tags = OwnerTags::default();
    for t in [0u64, 250, 500] {
        for i in 0..n {
            m.on_heartbeat(Mono::from_millis(t), &hb(i));
        }
        m.tick(Mono::from_millis(t));
    }
    for i in 0..n {
        let h = hb(i);
        tags.learn([k], &h.node_id, h.incarnation);
    }
    let now = Mono::from_millis(600);
    let view = View::new(m.placeable_members(now), RingParams::default(), k).unwrap();
    assert_eq!(view.members().len(), n);
    let key = TokenKey::new(k);
    let sealed = (0..1024usize)
        .map(|j| {
            let h = hb(j % n);
            let contents = TokenContents {
                session_id: SessionId::from_bytes([j as u8; 16]),
                owner_tag: owner_tag(k, &h.node_id, h.incarnation),
            };
            key.seal([j as u8; 12], &contents)
        })
        .collect();
    let s = Setup {
        routes: ArcSwap::from_pointee(m.routes()),
        tag_view: ArcSwap::from_pointee(tags.clone()),
        mship: Arc::new(Mutex::new(m)),
        tags: Arc::new(Mutex::new(tags)),
        ring: Ring::new(view, k),
        tokens: TokenKeyring::new(key, None),
        sealed,
        now,
    };
    // Both ways decide alike, and a RESUME reaches its owner.
    for t in &s.sealed[..8] {
        let a = route_token(
            &s.tokens,
            |id, tag| s.tag_view.load().owner(id, tag),
            |o| s.routes.load().route(s.now, o),
            1,
            t,
        );
        assert!(
            matches!(a.route, jvpn_router::state::ResumeRoute::Splice { .. }),
            "{a:?}"
        );
    }
    assert!(place_locked(&s).is_some());
    assert!(place_snapshot(&s).is_some());
    s
}

/// Random keys, as the router draws them.
fn draw() -> SessionId {
    let mut key = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    SessionId::from_bytes(key)
}

fn place_locked(s: &Setup) -> Option<usize> {
    let m = s.mship.lock().unwrap();
    place_hello(&s.ring, draw, |x| {
        m.hello_ready(s.now, &x.node_id, x.incarnation)
    })
}

fn place_snapshot(s: &Setup) -> Option<usize> {
    let r = s.routes.load();
    place_hello(&s.ring, draw, |x| {
        r.hello_ready(s.now, &x.node_id, x.incarnation)
    })
}

fn resume_locked(s: &Setup, token: &[u8; TOKEN_LEN]) -> bool {
    let r = route_token(
        &s.tokens,
        |id, tag| s.tags.lock().unwrap().owner(id, tag),
        |owner| s.mship.lock().unwrap().route(s.now, owner),
        1,
        token,
    );
    r.session_id.is_some()
}

fn resume_snapshot(s: &Setup, token: &[u8; TOKEN_LEN]) -> bool {
    let r = route_token(
        &s.tokens,
        |id, tag| s.tag_view.load().owner(id, tag),
        |owner| s.routes.load().route(s.now, owner),
        1,
        token,
    );
    r.session_id.is_some()
}

/// A thread applying heartbeats of all members back to back under the
/// membership lock, until dropped.
struct Heartbeats(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Heartbeats {
    fn start(s: &Setup, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (m, st) = (s.mship.clone(), stop.clone());
        let beats: Vec<Heartbeat> = (0..n).map(hb).collect();
        let now = s.now;
        let h = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                for b in &beats {
                    m.lock().unwrap().on_heartbeat(now, b);
                }
            }
        });
        Self(stop, Some(h))
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

fn routing(c: &mut Criterion) {
    let k = ClusterSecret::new(1, [9; 32]).derive();
    for contended in [false, true] {
        let name = if contended {
            "beside_heartbeats"
        } else {
            "alone"
        };
        let mut g = c.benchmark_group(format!("routing_{name}"));
        for n in [10usize, 100, 1000] {
            let s = setup(n, &k);
            let _beats = contended.then(|| Heartbeats::start(&s, n));
            let mut i = 0usize;
            let mut next = || {
                i = (i + 1) % 1024;
                i
            };
            g.bench_function(BenchmarkId::new("hello_locked", n), |b| {
                b.iter(|| black_box(place_locked(&s)))
            });
            g.bench_function(BenchmarkId::new("hello_snapshot", n), |b| {
                b.iter(|| black_box(place_snapshot(&s)))
            });
            g.bench_function(BenchmarkId::new("resume_locked", n), |b| {
                b.iter(|| black_box(resume_locked(&s, &s.sealed[next()])))
            });
            g.bench_function(BenchmarkId::new("resume_snapshot", n), |b| {
                b.iter(|| black_box(resume_snapshot(&s, &s.sealed[next()])))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, routing);
criterion_main!(benches);
