//! Bytes per detached session in the engine's table, measured with a counting
//! allocator (its own test binary, so nothing else allocates concurrently).

#![allow(clippy::unwrap_used)]
// The one place with unsafe code: a counting wrapper around the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use jvpn_gateway::engine::{Engine, EngineConfig, HelloRequest, Mono, Policy, State, TransportId};
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

#[test]
fn a_detached_session_costs_under_one_kib() {
    const N: u64 = 10_000;
    let mut e = Engine::new(
        EngineConfig {
            node_id: NodeId::new("g1").unwrap(),
            incarnation: Incarnation(1),
            policy: Policy::default(),
        },
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1)),
    )
    .unwrap();
    let principal: Arc<str> = Arc::from("agent");
    let base = LIVE.load(Ordering::Relaxed);
    let now = Mono::from_millis(1);
    let mut ids = Vec::with_capacity(N as usize);
    for i in 0..N {
        let acc = e
            .hello(
                now,
                HelloRequest {
                    transport: TransportId(i),
                    principal: principal.clone(),
                    credential_expiry: None,
                },
                |_| ResumeKey::new([1; 32]),
            )
            .unwrap();
        ids.push(acc.session_id);
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
