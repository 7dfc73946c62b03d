//! Topology 3 in the session path (owner side): a HELLO is recorded in the
//! shared store before its `HelloOk`, every accepted RESUME moves the
//! record's binding by compare-and-set before its `ResumeOk`, and the
//! sessions recorded under an owner lease end, explicitly
//! (`Terminate{store_unavailable}`), once that lease is lost.
//!
//! Every write also compares the owner key of the lease it names, so etcd
//! itself refuses a write from a gateway whose lease it ended; and the
//! lease is checked again after each write, so a lease lost while a write
//! was in flight never lets a `HelloOk` or `ResumeOk` out.
//!
//! When a session ends its record is deleted (compare-and-set: never a
//! record someone else wrote since); a session fenced by a lost lease keeps
//! its record for a taker. Not here yet: the takeover itself. Sessions this
//! module never recorded (a gateway without `[store]`) are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record::{KeyPlace, wrap_key};
use jvpn_proto::{Mono, ReasonCode, SessionId};
use jvpn_runtime::wire::lock;
use metrics::counter;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::state::Shared;
use crate::engine::Termination;
use crate::metrics as m;
use crate::store::{EtcdStore, LeaseStatus, StoreError};

/// What the shell keeps per recorded session.
#[derive(Clone, Debug)]
struct Bound {
    /// The revision every next write must name.
    mod_revision: i64,
    /// The owner lease generation it was recorded under.
    generation: u64,
    record: SessionRecord,
}

/// The store as the session path sees it.
pub(super) struct Stored {
    etcd: EtcdStore,
    status: watch::Receiver<LeaseStatus>,
    /// The keeper's clock origin (its deadlines are on it).
    origin: Instant,
    keys: ClusterKeys,
    sessions: Mutex<HashMap<SessionId, Bound>>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored").finish_non_exhaustive()
    }
}

impl Stored {
    pub(super) fn new(
        etcd: EtcdStore,
        status: watch::Receiver<LeaseStatus>,
        origin: Instant,
        keys: ClusterKeys,
    ) -> Self {
        Self {
            etcd,
            status,
            origin,
            keys,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn now(&self) -> Mono {
        Mono::between(self.origin, Instant::now())
    }

    /// The generation serving now and its lease id, if any.
    fn serving(&self) -> Option<(u64, i64)> {
        let s = *self.status.borrow();
        s.serving(s.generation, self.now())
            .then_some((s.generation, s.lease))
    }

    /// Is `generation` still the one serving?
    fn still(&self, generation: u64) -> bool {
        self.serving().is_some_and(|(g, _)| g == generation)
    }

    fn wrap(&self, sid: &SessionId, rec: &mut SessionRecord, key: &[u8; 32]) {
        let at = KeyPlace {
            sid,
            owner_epoch: rec.owner_epoch,
            state_version: rec.state_version,
        };
        rec.key_id = u32::from(self.keys.key_id());
        rec.wrapped_key = wrap_key(&self.keys, rand::random(), at, key);
    }

    /// Records a new session before its `HelloOk`. Fails closed.
    pub(super) async fn on_hello(
        &self,
        shared: &Shared,
        sid: &SessionId,
        principal: &str,
        binding_epoch: u64,
        key: &[u8; 32],
    ) -> Result<(), ReasonCode> {
        let Some((generation, lease)) = self.serving() else {
            counter!(m::STORE_WRITES, "op" => "create", "result" => "unavailable").increment(1);
            return Err(ReasonCode::StoreUnavailable);
        };
        let mut record = SessionRecord {
            owner_node: shared.cfg.node_id.to_string(),
            owner_incarnation: shared.incarnation.0,
            owner_epoch: 1,
            state_version: 1,
            binding_epoch,
            principal: principal.to_owned(),
            owner_lease: lease,
            ..SessionRecord::default()
        };
        self.wrap(sid, &mut record, key);
        let rev = match self.etcd.create(sid, &record).await {
            Ok(rev) => rev,
            Err(e) => {
                counter!(m::STORE_WRITES, "op" => "create", "result" => result_of(&e)).increment(1);
                warn!(error = %e, "store: HELLO not recorded; refused");
                return Err(ReasonCode::StoreUnavailable);
            }
        };
        counter!(m::STORE_WRITES, "op" => "create", "result" => "ok").increment(1);
        let mut map = lock(&self.sessions);
        // The lease may have been lost while the write was in flight; the
        // fence loop may have scanned before this entry existed.
        if !self.still(generation) {
            return Err(ReasonCode::StoreUnavailable);
        }
        map.insert(
            *sid,
            Bound {
                mod_revision: rev,
                generation,
                record,
            },
        );
        Ok(())
    }

    /// Moves a recorded session's binding before its `ResumeOk`. Every
    /// session of a gateway with a store was recorded at its HELLO; one
    /// that is not here any more was fenced or ended: refused.
    pub(super) async fn on_resume(
        &self,
        sid: &SessionId,
        binding_epoch: u64,
        key: Option<[u8; 32]>,
    ) -> Result<(), ReasonCode> {
        let fail = |result: &'static str| {
            counter!(m::STORE_WRITES, "op" => "bind", "result" => result).increment(1);
            Err(ReasonCode::StoreUnavailable)
        };
        let Some(bound) = lock(&self.sessions).get(sid).cloned() else {
            return fail("unavailable");
        };
        if !self.still(bound.generation) {
            return fail("unavailable");
        }
        let Some(key) = key else {
            return fail("error");
        };
        let mut record = bound.record.clone();
        record.binding_epoch = binding_epoch;
        record.state_version += 1;
        self.wrap(sid, &mut record, &key);
        let rev = match self.etcd.update(sid, bound.mod_revision, &record).await {
            Ok(rev) => rev,
            Err(e) => {
                warn!(error = %e, "store: binding change not recorded; the session ends");
                return fail(result_of(&e));
            }
        };
        let mut map = lock(&self.sessions);
        match map.get_mut(sid) {
            Some(b) if self.still(bound.generation) => {
                b.mod_revision = rev;
                b.record = record;
                counter!(m::STORE_WRITES, "op" => "bind", "result" => "ok").increment(1);
                Ok(())
            }
            // Fenced or ended while the write was in flight.
            _ => fail("unavailable"),
        }
    }

    /// The session ended: its record goes too (in the background, and only
    /// if nobody wrote it since: a taker's record stays). Not when its
    /// lease is lost: the record is for a taker then.
    pub(super) fn ended(&self, sid: &SessionId) {
        let Some(bound) = lock(&self.sessions).remove(sid) else {
            return;
        };
        if !self.still(bound.generation) {
            return;
        }
        let (etcd, sid) = (self.etcd.clone(), *sid);
        tokio::spawn(async move {
            let result = match etcd.delete(&sid, bound.mod_revision).await {
                Ok(_) => "ok",
                Err(e) => {
                    debug!(error = %e, "store: ended session's record not deleted");
                    result_of(&e)
                }
            };
            counter!(m::STORE_WRITES, "op" => "delete", "result" => result).increment(1);
        });
    }

    /// Ends, with `store_unavailable`, every session whose generation no
    /// longer serves (all of them when `all`). The record stays: with the
    /// lease lost it is for a taker now.
    fn fence(&self, shared: &Shared, all: bool) {
        let serving = self.serving().map(|(g, _)| g);
        let lost: Vec<SessionId> = lock(&self.sessions)
            .iter()
            .filter(|(_, b)| all || serving != Some(b.generation))
            .map(|(sid, _)| *sid)
            .collect();
        if lost.is_empty() {
            return;
        }
        counter!(m::STORE_FENCED_SESSIONS).increment(lost.len() as u64);
        debug!(
            sessions = lost.len(),
            "store: owner lease lost; sessions end"
        );
        for sid in lost {
            // Terminated first (its end drops the entry, keeping the
            // record): a RESUME in between finds the engine's session
            // gone, never a session without its record.
            let shard = crate::engine::shard_of(&sid, shared.shards.len());
            let now = shared.now();
            shared.with_engine(shard, |e| {
                e.terminate(now, &sid, Termination::StoreUnavailable)
            });
            lock(&self.sessions).remove(&sid);
        }
    }

    /// Fences sessions whenever the keeper publishes and at each deadline
    /// (a keeper late to publish cannot keep sessions served past it);
    /// if the keeper is gone, every recorded session ends.
    pub(super) async fn fence_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let mut rx = self.status.clone();
        loop {
            let s = *rx.borrow_and_update();
            self.fence(&shared, false);
            let until = s
                .serving_until
                .map(|d| self.origin + d.saturating_since(Mono::ZERO));
            tokio::select! {
                r = rx.changed() => if r.is_err() {
                    self.fence(&shared, true);
                    return;
                },
                () = sleep_until_opt(until) => {}
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn result_of(e: &StoreError) -> &'static str {
    match e {
        StoreError::Stale { .. } | StoreError::Exists | StoreError::OwnerAlive => "conflict",
        StoreError::Unavailable(_) | StoreError::LeaseGone => "unavailable",
        StoreError::Missing | StoreError::Record(_) | StoreError::Config(_) => "error",
    }
}
