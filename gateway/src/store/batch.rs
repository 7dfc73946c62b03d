//! Group commit of record writes (topology 3): the HELLO and RESUME paths
//! each need one record written before they answer, and under load many
//! are waiting at once. One etcd request per write costs the gateway a
//! gRPC call each (HTTP/2 frames, wakeups, a loopback round trip) and etcd
//! a raft entry each; one request per *batch* costs that once.
//!
//! No timer: a write goes out at once when a request slot is free; only
//! while [`IN_FLIGHT`] requests are already out do writes queue, and the
//! next free slot takes every queued one (up to [`MAX_BATCH`]). An idle
//! gateway's write waits for nothing; a busy one's batches grow with the
//! load. Each write keeps its own compares (see
//! [`EtcdStore::write_many`]), so batching changes no outcome.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::etcd::{EtcdStore, MAX_BATCH, RecordWrite, StoreError};
use crate::metrics as m;

/// etcd requests of batched writes out at once. One: the next batch forms
/// while a request is out (a write waits at most about two round trips),
/// and measured against two it gave the larger batches and the cheaper
/// RESUME (0.71–0.75 of the RESUMEs per gateway core without a store,
/// against 0.68–0.72; docs/benchmarks.md). Several requests would not get
/// past a slow member either: they all go to the member that last
/// answered.
pub const IN_FLIGHT: usize = 1;

/// Writes waiting for a slot before a writer waits to queue (back
/// pressure, not a drop).
const QUEUE: usize = 4096;

struct Pending {
    write: RecordWrite,
    /// Past this the writer has given up (its lease stops serving): the
    /// write must not go out any more.
    until: Instant,
    reply: oneshot::Sender<Result<i64, StoreError>>,
}

impl Pending {
    /// Still worth sending at `now`: its writer waits and may still use it.
    fn wanted(&self, now: Instant) -> bool {
        now < self.until && !self.reply.is_closed()
    }
}

/// The writer: cheap to clone; its task ends when the last clone is gone.
#[derive(Clone, Debug)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
    stats: Arc<Stats>,
}

/// What the writer sent so far.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    writes: AtomicU64,
}

impl Batcher {
    /// Starts the writer's task on `store`.
    pub fn spawn(store: EtcdStore) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(store, rx, stats.clone()));
        Self { tx, stats }
    }

    /// etcd requests sent and the writes they carried, so far.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.stats.requests.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }

    /// Writes one record, in whichever batch has room; the answer is the
    /// one [`EtcdStore::create`] or [`EtcdStore::update`] would give (or
    /// that it landed, when a resend of the request met it). No answer by
    /// `until` (the writer's lease deadline): `Unavailable`, and a write
    /// still queued then is never sent.
    pub async fn write(&self, write: RecordWrite, until: Instant) -> Result<i64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the store writer stopped".into());
        let queued = async {
            self.tx
                .send(Pending {
                    write,
                    until,
                    reply,
                })
                .await
                .map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        tokio::time::timeout_at(until.into(), queued)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "no store answer before the lease's deadline".into(),
                ))
            })
    }
}

async fn run(store: EtcdStore, mut rx: mpsc::Receiver<Pending>, stats: Arc<Stats>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Writes of a session already in the batch being filled wait for the
    // next one (etcd refuses one key written twice in a request).
    let mut held = VecDeque::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match held.pop_front() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch = vec![first];
        fill(
            &mut batch,
            &mut held,
            MAX_BATCH,
            |p: &Pending| p.write.sid,
            || rx.try_recv().ok(),
        );
        // Writes whose writer gave up while they queued stay unsent.
        let now = Instant::now();
        batch.retain(|p| p.wanted(now));
        if batch.is_empty() {
            continue;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let store = store.clone();
        tokio::spawn(async move {
            let _slot = slot;
            send(&store, batch).await;
        });
    }
}

/// One request for `batch`; every writer gets its own answer. A request
/// etcd refuses as a whole (one write too large, say) is sent again one
/// write at a time, so only the write at fault fails; a request etcd could
/// not answer fails each writer the same way (each resends on its own).
async fn send(store: &EtcdStore, batch: Vec<Pending>) {
    histogram!(m::STORE_BATCH_WRITES).record(batch.len() as f64);
    let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.write, p.reply)).unzip();
    let results = match store.write_many(&writes).await {
        Ok(results) => results,
        Err(StoreError::Refused(_)) if writes.len() > 1 => {
            let mut results = Vec::with_capacity(writes.len());
            for w in &writes {
                let r = store.write_many(std::slice::from_ref(w)).await;
                results.push(r.and_then(|mut r| {
                    r.pop()
                        .unwrap_or_else(|| Err(StoreError::Refused("no result".into())))
                }));
            }
            results
        }
        Err(e) => writes.iter().map(|_| Err(e.again())).collect(),
    };
    for (reply, r) in replies.into_iter().zip(results) {
        let _ = reply.send(r);
    }
}

/// Fills `batch` up to `max`: first with `held` items (in order), then
/// with what `next` gives, until it gives nothing. An item whose key is in
/// the batch already goes to (or stays in) `held`. Pure: the batching rule
/// alone, tested without etcd.
fn fill<T, K: Eq + Hash>(
    batch: &mut Vec<T>,
    held: &mut VecDeque<T>,
    max: usize,
    key: impl Fn(&T) -> K,
    mut next: impl FnMut() -> Option<T>,
) {
    let mut keys: HashSet<K> = batch.iter().map(&key).collect();
    let mut still = VecDeque::new();
    while let Some(item) = held.pop_front() {
        if batch.len() < max && keys.insert(key(&item)) {
            batch.push(item);
        } else {
            still.push_back(item);
        }
    }
    *held = still;
    while batch.len() < max {
        let Some(item) = next() else { break };
        if keys.insert(key(&item)) {
            batch.push(item);
        } else {
            held.push_back(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (session, arrival): batched by session.
    type Items = Vec<(u8, u32)>;

    /// The batch, what is held, what is still queued.
    fn run_fill(batch: Items, held: Items, max: usize, incoming: Items) -> (Items, Items, Items) {
        let (mut batch, mut held) = (batch, VecDeque::from(held));
        let mut incoming = VecDeque::from(incoming);
        fill(&mut batch, &mut held, max, |i| i.0, || incoming.pop_front());
        (batch, held.into(), incoming.into())
    }

    #[test]
    fn takes_everything_queued_up_to_the_cap_in_order() {
        let (batch, held, left) = run_fill(
            vec![(1, 0)],
            vec![],
            3,
            vec![(2, 1), (3, 2), (4, 3), (5, 4)],
        );
        assert_eq!(batch, vec![(1, 0), (2, 1), (3, 2)]);
        assert!(held.is_empty());
        assert_eq!(left, vec![(4, 3), (5, 4)], "the rest waits in the queue");
    }

    #[test]
    fn a_second_write_of_one_session_waits_for_the_next_batch() {
        let (batch, held, _) = run_fill(
            vec![(1, 0)],
            vec![],
            8,
            vec![(2, 1), (1, 2), (3, 3), (2, 4)],
        );
        assert_eq!(batch, vec![(1, 0), (2, 1), (3, 3)]);
        assert_eq!(held, vec![(1, 2), (2, 4)], "in arrival order");
        // The next batch starts with them, still never two of one key.
        let (next, held, _) = run_fill(vec![], held, 8, vec![(1, 5)]);
        assert_eq!(next, vec![(1, 2), (2, 4)]);
        assert_eq!(held, vec![(1, 5)]);
    }

    #[test]
    fn held_writes_beyond_the_cap_stay_held_in_order() {
        let (batch, held, left) = run_fill(vec![], vec![(1, 0), (2, 1), (3, 2)], 2, vec![(4, 3)]);
        assert_eq!(batch, vec![(1, 0), (2, 1)]);
        assert_eq!(held, vec![(3, 2)]);
        assert_eq!(left, vec![(4, 3)], "a full batch reads no more");
    }
}
