//! The async shell around the session engine, split by stage.
//!
//! # Layout
//!
//! - this module: [`serve`] takes bound listeners and a shutdown future
//!   (tests bind port 0), runs until shutdown or supersession, then drains.
//! - `state`: what every task shares. Sessions are split over `2 × cores`
//!   engine shards by session id; each shard is a mutex held for
//!   microseconds, never across an await, plus a timer task. Engine outputs
//!   are dispatched after the shard lock is released: events to the sink and
//!   metrics, `CloseTransport` to the connection's task.
//! - `conn`: one task per client connection up to the first frame: PROXY,
//!   the pre-TLS gate, admission, TLS.
//! - `session`: HELLO or RESUME through the engine, then the attached
//!   loop: a reader (Ping, `Data`/`Ack` into the session's channel, in-session
//!   RESUME, `Terminate`) and a writer (replies, control, the channel's
//!   frames) side by side, so neither direction waits for the other.
//! - `streams`: the session's data plane: its resumable channel, the HTTP/2
//!   server over it, `CONNECT` → egress policy → destination.
//! - `handle`: [`GatewayHandle`] for the admin port and harnesses.

mod conn;
mod handle;
mod session;
mod state;
mod stored;
mod streams;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jvpn_runtime::wire::{accept_until, lock};
use metrics::gauge;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use handle::GatewayHandle;
use state::{Control, Shared, build, gauge_loop, timer_loop};
pub use state::{ReloadError, ServeError};

use crate::config::Validated;
use crate::engine::Termination;
use crate::metrics as m;

/// How [`serve`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested and the drain completed.
    Drained,
    /// A router said a newer incarnation of this node id exists: every
    /// session was terminated with `superseded` (the process exits 75).
    Superseded,
}

/// Runs a gateway on already-bound listeners until `shutdown` resolves, then
/// drains (GoAway spread over the first half of `drain_timeout_ms`,
/// `Terminate{draining}` near its end) and returns.
pub async fn serve(
    cfg: Validated,
    client: TcpListener,
    admin: TcpListener,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Exit, ServeError> {
    let advertise = match cfg.raw.cluster.advertise_addr {
        Some(a) => a,
        None => client.local_addr().map_err(ServeError::Listener)?,
    };
    let shared = build(cfg)?;
    let bound = [
        client.local_addr().map_err(ServeError::Listener)?,
        admin.local_addr().map_err(ServeError::Listener)?,
    ];
    let _ = shared.bound.set(bound);
    let mut superseded = None;
    if let (Some(cluster), Some(files)) = (&shared.cluster, &shared.cfg.membership) {
        let c = &shared.cfg.raw.cluster;
        crate::membership::spawn(
            cluster.clone(),
            crate::membership::HeartbeatSettings {
                cert_pem: files.cert_pem.clone(),
                key_pem: files.key_pem.to_vec(),
                ca_pem: files.ca_pem.clone(),
                files: Some(files.paths.clone()),
                last_good: Default::default(),
                server_name: format!("router.{}", c.name),
                advertise_addr: advertise,
                weight: c.weight,
                interval: Duration::from_millis(c.heartbeat_interval_ms),
                keys: shared.cfg.secret.derive(),
            },
        )
        .map_err(ServeError::Membership)?;
        superseded = Some(cluster.superseded());
    }
    // Topology 3: the owner lease runs for the whole life of the process
    // and is revoked on the way out, so takers need not wait for its TTL.
    let keeper = match &shared.cfg.store {
        Some(c) => {
            let s = &shared.cfg.raw.store;
            let etcd = crate::store::EtcdStore::new(c)?;
            let k = crate::store::Keeper::spawn(
                etcd.clone(),
                crate::store::KeeperConfig {
                    node: shared.cfg.node_id.clone(),
                    incarnation: shared.incarnation,
                    ttl: Duration::from_millis(s.lease_ttl_ms),
                    margin: Duration::from_millis(s.lease_margin_ms),
                },
            );
            let stored = Arc::new(stored::Stored::new(
                etcd,
                k.status.clone(),
                k.suspicion(),
                k.origin(),
                stored::StoreKeys {
                    current: shared.cfg.secret.derive(),
                    previous: shared.cfg.previous_secret.as_ref().map(|p| p.derive()),
                    replaced: false,
                    seal: crate::config::record_seal(s),
                },
                Duration::from_millis(s.lease_ttl_ms),
            ));
            let _ = shared.store.set(stored.clone());
            let held = stored.clone();
            tokio::spawn(stored.fence_loop(shared.clone()));
            // Removes records nobody can use again (store/sweep.rs), with a
            // client of its own: its requests never move the session path's
            // choice of etcd member.
            let sweep = if s.sweep_interval_ms > 0 {
                let me = crate::store::Me {
                    node: shared.cfg.node_id.as_str().to_owned(),
                    incarnation: shared.incarnation.0,
                    holds: Arc::new(move |sid| held.holds(sid)),
                };
                let sweeper = crate::store::Sweeper::new(
                    crate::store::EtcdStore::new(c)?,
                    i64::from(s.sweep_page),
                    Some(me),
                );
                let every = Duration::from_millis(s.sweep_interval_ms);
                Some(tokio::spawn(crate::store::sweep::run(sweeper, every)))
            } else {
                None
            };
            Some((k, sweep))
        }
        None => None,
    };
    let handle = GatewayHandle::new(shared.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    for i in 0..shared.shards.len() {
        tokio::spawn(timer_loop(shared.clone(), i, stop_rx.clone()));
    }
    tokio::spawn(jvpn_runtime::admin::serve(
        admin,
        handle.clone(),
        prometheus,
    ));
    if let Some(path) = shared.cfg.source.clone() {
        let target = shared.clone();
        tokio::spawn(jvpn_runtime::process::reload_on_hangup(
            path,
            move |p| {
                crate::config::load(p)
                    .map_err(ReloadError::from)
                    .and_then(|new| target.reload(&new))
            },
            [m::CONFIG_RELOADS, m::CONFIG_RELOAD_FAILURES],
        ));
    }
    tokio::spawn(gauge_loop(shared.clone(), stop_rx.clone()));
    let _reclaim = jvpn_runtime::memory::reclaim_after_bursts(|took| {
        metrics::histogram!(m::MEMORY_RECLAIM_SECONDS).record(took.as_secs_f64());
    });
    info!(node = %shared.cfg.node_id, incarnation = %shared.incarnation, "gateway serving");

    // Accept on a worker thread: connection tasks then start on the same
    // worker instead of being handed over from the `block_on` thread.
    let (accept_stop, mut accept_stopped) = watch::channel(false);
    let acc = shared.clone();
    let accept_task = tokio::spawn(async move {
        while let Some((stream, peer)) = accept_until(&client, &mut accept_stopped).await {
            conn::spawn(&acc, stream, peer);
        }
    });
    if let Some(c) = &shared.cluster {
        c.set_state(crate::membership::LocalState::Ready);
    }
    let trigger = shared.drain.clone();
    let shutdown = async move { trigger.or(shutdown).await };
    let was_superseded = match superseded.as_mut() {
        Some(rx) => tokio::select! {
            () = shutdown => false,
            r = rx.wait_for(|s| *s) => r.is_ok(),
        },
        None => {
            shutdown.await;
            false
        }
    };
    if was_superseded {
        // Another process serves this node id now: our sessions are not ours
        // to keep. End them explicitly and leave at once.
        shared.draining.store(true, Ordering::Relaxed);
        let _ = accept_stop.send(true);
        let _ = accept_task.await;
        let now = shared.now();
        for i in 0..shared.shards.len() {
            shared.with_engine(i, |e| e.terminate_all(now, Termination::Superseded));
        }
        let grace_end = Instant::now() + Duration::from_millis(500);
        poll_until(grace_end, CONNS_POLL, || {
            shared.open_conns.load(Ordering::Relaxed) == 0
        })
        .await;
        let _ = stop_tx.send(true);
        stop_store(keeper).await;
        shared.events.flush(Duration::from_secs(1)).await;
        warn!("superseded by a newer incarnation of this node id; exiting");
        return Ok(Exit::Superseded);
    }

    // Drain.
    shared.draining.store(true, Ordering::Relaxed);
    gauge!(m::DRAINING).set(1.0);
    let drain = Duration::from_millis(shared.cfg.raw.timeouts.drain_timeout_ms);
    let started = Instant::now();
    let terminate_at = started + drain.mul_f64(0.9);
    info!(drain_ms = drain.as_millis() as u64, "draining");
    if let Some(c) = &shared.cluster {
        // GoAway only once every router stopped placing HELLOs here, so the
        // re-handshakes it triggers cannot land on this node again.
        c.set_state(crate::membership::LocalState::Draining);
        // Leaving for good: the whole drain if need be, so that every
        // router forgets this gateway instead of reporting it dead.
        let ack_wait = if c.is_leaving() { drain } else { drain / 4 };
        let ack_deadline = Instant::now() + ack_wait.min(Duration::from_secs(5));
        poll_until(ack_deadline, ACK_POLL, || {
            c.draining_acknowledged(shared.now())
        })
        .await;
    }
    let spread = (terminate_at.saturating_duration_since(Instant::now())).min(drain / 2);
    spread_goaway(&shared, spread, terminate_at);
    loop {
        let live: u64 = shared.counts().iter().sum();
        // Streams of sessions their agents closed may still be delivering
        // what they got (`streams::finish`).
        if live == 0 && shared.streams_open.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(terminate_at.into()) => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let _ = accept_stop.send(true);
    let _ = accept_task.await;
    let now = shared.now();
    for i in 0..shared.shards.len() {
        shared.with_engine(i, |e| e.terminate_all(now, Termination::Drain));
    }
    // Give connection tasks a moment to write their Terminate frames.
    let grace_end = (started + drain).min(Instant::now() + Duration::from_secs(1));
    poll_until(grace_end, CONNS_POLL, || {
        shared.open_conns.load(Ordering::Relaxed) == 0
    })
    .await;
    if let Some(c) = shared.cluster.as_ref().filter(|c| c.is_leaving()) {
        // A leave may have come after the wait above (`POST /leave` during
        // a drain): exit once every router saw it, or after 5 s.
        let until = Instant::now() + Duration::from_secs(5);
        poll_until(until, ACK_POLL, || c.leave_acknowledged()).await;
    }
    let _ = stop_tx.send(true);
    stop_store(keeper).await;
    shared.events.flush(Duration::from_secs(2)).await;
    info!("drained");
    Ok(Exit::Drained)
}

/// Stops the sweep and revokes the owner lease (topology 3).
async fn stop_store(store: Option<(crate::store::Keeper, Option<tokio::task::JoinHandle<()>>)>) {
    if let Some((k, sweep)) = store {
        if let Some(t) = sweep {
            t.abort();
        }
        k.stop().await;
    }
}

fn spread_goaway(shared: &Arc<Shared>, over: Duration, terminate_at: Instant) {
    // Transports attached from now on are told at once (a session whose
    // transport was lost now resumes later).
    let _ = shared.goaway_deadline.set(terminate_at);
    let mut all = Vec::new();
    for s in &shared.shards {
        all.extend(lock(&s.conns).values().cloned());
    }
    let n = all.len().max(1) as u32;
    for (i, tx) in all.into_iter().enumerate() {
        let delay = over * i as u32 / n;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Control::goaway(terminate_at));
        });
    }
}

/// How often the drain looks at open connections, and at routers'
/// acknowledgements.
const CONNS_POLL: Duration = Duration::from_millis(10);
const ACK_POLL: Duration = Duration::from_millis(20);

/// Until `done` says so, looking every `step`, or until `deadline`.
async fn poll_until(deadline: Instant, step: Duration, done: impl Fn() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(step).await;
    }
}
