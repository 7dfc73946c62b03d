//! Topology 3 in the session path (owner side): a HELLO is recorded in the
//! shared store before its `HelloOk`, every accepted RESUME moves the
//! record's binding by compare-and-set before its `ResumeOk`, and the
//! sessions recorded under an owner lease end, explicitly
//! (`Terminate{store_unavailable}`), once that lease is lost.
//!
//! Not here yet: takeover by another gateway (the record is written so that
//! one can follow: owner, epoch, the resume key wrapped under the cluster
//! key). Sessions this module never recorded (topology 2) are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record::wrap_key;
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

    /// The generation serving now, if any.
    fn serving(&self) -> Option<u64> {
        let s = *self.status.borrow();
        s.serving(s.generation, self.now()).then_some(s.generation)
    }

    fn wrap(&self, sid: &SessionId, owner_epoch: u64, key: &[u8; 32]) -> (u32, Vec<u8>) {
        (
            u32::from(self.keys.key_id()),
            wrap_key(&self.keys, rand::random(), sid, owner_epoch, key),
        )
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
        let Some(generation) = self.serving() else {
            return Err(ReasonCode::StoreUnavailable);
        };
        let (key_id, wrapped_key) = self.wrap(sid, 1, key);
        let record = SessionRecord {
            owner_node: shared.cfg.node_id.to_string(),
            owner_incarnation: shared.incarnation.0,
            owner_epoch: 1,
            state_version: 1,
            binding_epoch,
            key_id,
            wrapped_key,
            principal: principal.to_owned(),
        };
        match self.etcd.create(sid, &record).await {
            Ok(rev) => {
                lock(&self.sessions).insert(
                    *sid,
                    Bound {
                        mod_revision: rev,
                        generation,
                        record,
                    },
                );
                counter!(m::STORE_WRITES, "op" => "create", "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                counter!(m::STORE_WRITES, "op" => "create", "result" => result_of(&e)).increment(1);
                warn!(error = %e, "store: HELLO not recorded; refused");
                Err(ReasonCode::StoreUnavailable)
            }
        }
    }

    /// Moves a recorded session's binding before its `ResumeOk`. `Ok` for a
    /// session this store never recorded (topology 2 sessions).
    pub(super) async fn on_resume(
        &self,
        sid: &SessionId,
        binding_epoch: u64,
        key: Option<[u8; 32]>,
    ) -> Result<(), ReasonCode> {
        let Some(bound) = lock(&self.sessions).get(sid).cloned() else {
            return Ok(());
        };
        if self.serving() != Some(bound.generation) {
            return Err(ReasonCode::StoreUnavailable);
        }
        let Some(key) = key else {
            return Err(ReasonCode::ProtocolError);
        };
        let mut record = bound.record.clone();
        record.binding_epoch = binding_epoch;
        record.state_version += 1;
        (record.key_id, record.wrapped_key) = self.wrap(sid, record.owner_epoch, &key);
        match self.etcd.update(sid, bound.mod_revision, &record).await {
            Ok(rev) => {
                if let Some(b) = lock(&self.sessions).get_mut(sid) {
                    b.mod_revision = rev;
                    b.record = record;
                }
                counter!(m::STORE_WRITES, "op" => "bind", "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                counter!(m::STORE_WRITES, "op" => "bind", "result" => result_of(&e)).increment(1);
                warn!(error = %e, "store: binding change not recorded; the session ends");
                Err(ReasonCode::StoreUnavailable)
            }
        }
    }

    /// The session ended: forget it here (its record stays until a later
    /// part of topology 3 cleans records up; it names a dead binding).
    pub(super) fn forget(&self, sid: &SessionId) {
        lock(&self.sessions).remove(sid);
    }

    /// Ends every session recorded under a lease generation that no longer
    /// serves; runs until the keeper's status channel closes.
    pub(super) async fn fence_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let mut rx = self.status.clone();
        loop {
            let s = *rx.borrow_and_update();
            let serving = s.serving_until.filter(|d| self.now() < *d);
            let lost: Vec<SessionId> = lock(&self.sessions)
                .iter()
                .filter(|(_, b)| serving.is_none() || b.generation != s.generation)
                .map(|(sid, _)| *sid)
                .collect();
            if !lost.is_empty() {
                counter!(m::STORE_FENCED_SESSIONS).increment(lost.len() as u64);
                debug!(
                    sessions = lost.len(),
                    "store: owner lease lost; sessions end"
                );
            }
            for sid in lost {
                self.forget(&sid);
                let shard = crate::engine::shard_of(&sid, shared.shards.len());
                let now = shared.now();
                shared.with_engine(shard, |e| {
                    e.terminate(now, &sid, Termination::StoreUnavailable)
                });
            }
            // Wake at the deadline too: a keeper that is late to publish
            // cannot keep sessions served past it.
            let until = serving.map(|d| self.origin + d.saturating_since(Mono::ZERO));
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
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
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Missing | StoreError::Record(_) | StoreError::Config(_) => "error",
    }
}
