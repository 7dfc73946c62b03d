//! The engine's memory, measured with a counting allocator (its own test
//! binary; the tests here take turns, so nothing else allocates meanwhile):
//! bytes per detached session, and nothing left behind by churn.

#![allow(clippy::unwrap_used)]
// The one place with unsafe code: a counting wrapper around the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use jvpn_gateway::engine::{
    Engine, EngineConfig, HelloRequest, Mono, Policy, State, Termination, TransportId,
};
use jvpn_proto::crypto::ResumeKey;
use jvpn_proto::{Incarnation, NodeId};
use rand::SeedableRng;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn engine() -> Engine {
    Engine::new(
        EngineConfig {
            node_id: NodeId::new("g1").unwrap(),
            incarnation: Incarnation(1),
            policy: Policy::default(),
        },
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
    )
    .unwrap()
}

fn hello(e: &mut Engine, now: Mono, i: u64, principal: &Arc<str>) -> jvpn_proto::SessionId {
    e.hello(
        now,
        HelloRequest {
            transport: TransportId(i),
            principal: principal.clone(),
            credential_expiry: None,
        },
        |_| ResumeKey::new([1; 32]),
    )
    .unwrap()
    .session_id
}

#[test]
fn a_detached_session_costs_under_one_kib() {
    const N: u64 = 10_000;
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = engine();
    let principal: Arc<str> = Arc::from("agent");
    let base = LIVE.load(Ordering::Relaxed);
    let now = Mono::from_millis(1);
    let mut ids = Vec::with_capacity(N as usize);
    for i in 0..N {
        ids.push(hello(&mut e, now, i, &principal));
    }
    let ids_bytes = (ids.capacity() * 16) as isize;
    for (i, id) in ids.iter().enumerate() {
        e.transport_closed(now, id, TransportId(i as u64));
    }
    while e.poll_event().is_some() {}
    while e.poll_action().is_some() {}
    assert_eq!(e.count(State::Volatile), N);
    let per = (LIVE.load(Ordering::Relaxed) - base - ids_bytes) as f64 / N as f64;
    println!("bytes per detached session: {per:.0}");
    assert!(per <= 1024.0, "{per} bytes per detached session");
    assert!(per > 100.0, "measurement is not counting the table: {per}");
}

/// Sessions created, detached and terminated leave nothing behind: not in
/// the table, and not as timer entries waiting for deadlines of sessions
/// that no longer exist (with the default policy those would live for the
/// heartbeat timeout; under churn that is rate × timeout entries).
#[test]
fn churned_sessions_leave_nothing_behind() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = engine();
    let principal: Arc<str> = Arc::from("agent");
    let now = Mono::from_millis(1);
    let churn = |e: &mut Engine, from: u64, n: u64| {
        for i in from..from + n {
            let id = hello(e, now, i, &principal);
            e.transport_closed(now, &id, TransportId(i));
            assert!(e.terminate(now, &id, Termination::AgentClosed));
            while e.poll_event().is_some() {}
            while e.poll_action().is_some() {}
        }
    };
    // Warm: the table and queues reach their working capacity.
    churn(&mut e, 0, 5_000);
    let base = LIVE.load(Ordering::Relaxed);
    churn(&mut e, 5_000, 100_000);
    let grown = LIVE.load(Ordering::Relaxed) - base;
    assert_eq!(e.len(), 0);
    assert!(
        grown < 256 * 1024,
        "{grown} bytes retained after 100,000 churned sessions"
    );
}
