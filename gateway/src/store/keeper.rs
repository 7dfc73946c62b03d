//! The owner lease's keeper: grants this incarnation's etcd lease, puts its
//! owner key under it, renews it every fifth of the TTL, and publishes
//! until when store-backed sessions may be served.
//!
//! Consumers compare the published deadline with their own `now`: a keeper
//! that is late (a starved task, a request hanging on a dead member) can
//! never make them serve past it. When the lease is lost (its deadline
//! passed, or etcd reports it gone) the keeper counts it, publishes "not
//! serving", and starts a new lease: a new `generation`. Sessions bound to
//! an older generation must end (`Terminate{store_unavailable}`) rather
//! than carry on under the new lease: a taker may already own them.
//!
//! The reconnect loop is this one: keep-alives are one call each, so after
//! an etcd restart the next call simply reaches the restarted members.

use std::time::{Duration, Instant};

use jvpn_proto::{Incarnation, Mono, NodeId};
use metrics::counter;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::etcd::EtcdStore;
use super::fence::{LeaseFence, Renewal};
use crate::metrics as m;

/// What the keeper publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Leases this incarnation has held (1 for the first).
    pub generation: u64,
    /// etcd's id of that lease (0 before the first).
    pub lease: i64,
    /// Serving until this instant (the keeper's clock, see [`Keeper::now`]);
    /// `None`: not serving.
    pub serving_until: Option<Mono>,
}

impl LeaseStatus {
    /// May store-backed sessions of `generation` be served at `now`?
    pub fn serving(&self, generation: u64, now: Mono) -> bool {
        self.generation == generation && self.serving_until.is_some_and(|d| now < d)
    }
}

/// The keeper's settings.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    pub node: NodeId,
    pub incarnation: Incarnation,
    /// The lease TTL asked of etcd (whole seconds; etcd's minimum applies).
    pub ttl: Duration,
    /// How long before the lease's end serving stops (clock rates, the
    /// taker's view of the expiry).
    pub margin: Duration,
}

/// Why a lease was lost (metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostBy {
    /// No renewal arrived before the local deadline.
    Deadline,
    /// etcd answered that the lease is gone.
    LeaseGone,
}

impl LostBy {
    pub const ALL: [LostBy; 2] = [LostBy::Deadline, LostBy::LeaseGone];
    pub fn as_str(self) -> &'static str {
        match self {
            LostBy::Deadline => "deadline",
            LostBy::LeaseGone => "lease_gone",
        }
    }
}

/// A running keeper.
#[derive(Debug)]
pub struct Keeper {
    pub status: watch::Receiver<LeaseStatus>,
    /// Renews at once when notified ([`Keeper::suspicion`]).
    suspect: Arc<Notify>,
    origin: Instant,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Keeper {
    /// Starts keeping `cfg`'s lease on `store`.
    pub fn spawn(store: EtcdStore, cfg: KeeperConfig) -> Self {
        let origin = Instant::now();
        let (tx, status) = watch::channel(LeaseStatus::default());
        let (stop, stop_rx) = watch::channel(false);
        let suspect = Arc::new(Notify::new());
        let task = tokio::spawn(run(store, cfg, origin, tx, stop_rx, suspect.clone()));
        Self {
            status,
            suspect,
            origin,
            stop,
            task,
        }
    }

    /// A handle that makes the keeper renew now instead of at its next
    /// turn: a write refused because the lease is gone says so for every
    /// session of this lease, and the renewal's answer (TTL 0) fences them
    /// all at once rather than up to a fifth of a TTL later.
    pub fn suspicion(&self) -> Arc<Notify> {
        self.suspect.clone()
    }

    /// The origin of the clock the published deadlines use.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// `now` on the clock the published deadlines use.
    pub fn now(&self) -> Mono {
        Mono::between(self.origin, Instant::now())
    }

    /// Is the current generation serving now?
    pub fn serving(&self) -> bool {
        let s = *self.status.borrow();
        s.serving(s.generation, self.now())
    }

    /// Stops renewing and revokes the lease (its owner key goes at once,
    /// so takers need not wait for the TTL).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    store: EtcdStore,
    cfg: KeeperConfig,
    origin: Instant,
    status: watch::Sender<LeaseStatus>,
    mut stop: watch::Receiver<bool>,
    suspect: Arc<Notify>,
) {
    let now = || Mono::between(origin, Instant::now());
    let at = |t: Mono| origin + t.saturating_since(Mono::ZERO);
    // Renewals every fifth of the TTL: a leader lost just after one
    // leaves TTL − margin − TTL/5 (1.3 s by default) for etcd to elect
    // the next before this gateway fences itself.
    let interval = cfg.ttl / 5;
    let mut generation = 0u64;
    while !*stop.borrow() {
        // A new lease. While the store cannot grant one, nothing is served.
        let sent = now();
        let (lease, granted) = match store.grant(cfg.ttl).await {
            Ok(g) => g,
            Err(e) => {
                counter!(m::STORE_KEEPALIVE_FAILURES).increment(1);
                warn!(error = %e, "store: no owner lease");
                if sleep_or_stop(&mut stop, Instant::now() + interval).await {
                    return;
                }
                continue;
            }
        };
        let mut fence = LeaseFence::new(cfg.ttl, cfg.margin);
        let usable = fence.granted(now(), sent, granted) != Renewal::Fenced;
        let registered = usable
            && match store
                .register_owner(&cfg.node, cfg.incarnation, lease)
                .await
            {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "store: owner key not written");
                    false
                }
            };
        if !registered {
            // Granted too late to be of use, or no owner key: give the
            // lease back and wait before the next try.
            counter!(m::STORE_KEEPALIVE_FAILURES).increment(1);
            let _ = store.revoke(lease).await;
            if sleep_or_stop(&mut stop, Instant::now() + interval).await {
                return;
            }
            continue;
        }
        generation += 1;
        info!(generation, "store: owner lease held");
        let publish = |fence: &LeaseFence| {
            status.send_replace(LeaseStatus {
                generation,
                lease,
                serving_until: fence.deadline(),
            });
        };
        publish(&fence);
        // After a failed renewal the next one goes out soon, not a fifth
        // of a TTL later: one slow answer (an election, a paused member)
        // must not cost a live gateway its lease and every session.
        let mut wait = interval;
        let lost = loop {
            let Some(deadline) = fence.deadline() else {
                break LostBy::LeaseGone;
            };
            let next = now() + wait;
            wait = interval;
            let stopped = tokio::select! {
                stopped = sleep_or_stop(&mut stop, at(next.min(deadline))) => stopped,
                // A write met the lease gone: ask etcd now.
                () = suspect.notified() => *stop.borrow(),
            };
            if stopped {
                status.send_replace(LeaseStatus {
                    generation,
                    lease,
                    serving_until: None,
                });
                let _ = store.revoke(lease).await;
                return;
            }
            if now() >= deadline {
                break LostBy::Deadline;
            }
            let sent = now();
            // Bounded by the deadline too: a renewal that cannot arrive in
            // time is a lost lease, whatever the request timeout says.
            let answer =
                tokio::time::timeout_at(at(deadline).into(), store.keep_alive(lease)).await;
            match answer {
                Ok(Ok(ttl)) => match fence.renewed(now(), sent, ttl) {
                    Renewal::Renewed { .. } => publish(&fence),
                    Renewal::Fenced if ttl <= 0 => break LostBy::LeaseGone,
                    Renewal::Fenced => break LostBy::Deadline,
                },
                Ok(Err(e)) => {
                    counter!(m::STORE_KEEPALIVE_FAILURES).increment(1);
                    warn!(error = %e, "store: keep-alive failed; retrying");
                    wait = RETRY_AFTER_FAILURE;
                }
                Err(_) => break LostBy::Deadline,
            }
        };
        status.send_replace(LeaseStatus {
            generation,
            lease,
            serving_until: None,
        });
        counter!(m::STORE_LEASES_LOST, "by" => lost.as_str()).increment(1);
        warn!(
            generation,
            by = lost.as_str(),
            "store: owner lease lost; its sessions stop"
        );
    }
}

/// How soon a failed renewal is tried again (while the deadline allows).
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(100);

/// Sleeps until `until`; true when asked to stop first.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, until: Instant) -> bool {
    let slept = tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => true,
        // Asked to stop, or the keeper's owner is gone: stop either way.
        _ = stop.wait_for(|s| *s) => false,
    };
    !slept || *stop.borrow()
}
