//! Topology 3 in the session path (owner side): a HELLO is recorded in the
//! shared store before its `HelloOk`, every accepted RESUME moves the
//! record's binding by compare-and-set before its `ResumeOk`, and the
//! sessions recorded under an owner lease stop being served the moment
//! that lease is lost. They then move to this gateway's next lease, each
//! by one compare-and-set on the revision it last wrote (nobody else wrote
//! the record meanwhile: no taker has it), or, when that fails or no next
//! lease comes within a TTL, they end, explicitly
//! (`Terminate{store_unavailable}`).
//!
//! Every write also compares the owner key of the lease it names, so etcd
//! itself refuses a write from a gateway whose lease it ended; and the
//! lease is checked again after each write, so a lease lost while a write
//! was in flight never lets a `HelloOk` or `ResumeOk` out.
//!
//! When a session ends its record is deleted (compare-and-set: never a
//! record someone else wrote since); a session fenced by a lost lease keeps
//! its record for a taker, which claims it with [`Stored::take_over`].
//! Sessions this module never recorded (a gateway without `[store]`) are
//! untouched.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jvpn_proto::crypto::{ChannelBinding, ResumeKey};
use jvpn_proto::keys::ClusterKeys;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record::{Seal, open_record_key, seal_record};
use jvpn_proto::{Mono, ReasonCode, SessionId};
use jvpn_runtime::wire::{AtMost, lock};
use metrics::{counter, histogram};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::state::Shared;
use crate::engine::{ResumeRequest, Termination};
use crate::metrics as m;
use crate::store::{Batcher, EtcdStore, LeaseStatus, RecordWrite, StoreError};

/// What the shell keeps per recorded session.
#[derive(Debug)]
struct Bound {
    /// The revision every next write must name.
    mod_revision: i64,
    /// The owner lease generation it was recorded under.
    generation: u64,
    record: SessionRecord,
    /// The generation its fences follow (a move to the next lease sends
    /// the new one); dropped with the entry, which tells them it ended.
    follow: watch::Sender<u64>,
    /// One write of the record at a time: a RESUME's binding and a move
    /// to the next lease both compare the revision the other would change.
    writing: Arc<tokio::sync::Mutex<()>>,
    /// When its generation was seen to stop serving (`None`: serving).
    orphaned: Option<Instant>,
    /// A move to the next lease is under way.
    moving: bool,
    /// Being ended for its lost lease.
    ending: bool,
}

impl Bound {
    fn new(mod_revision: i64, generation: u64, record: SessionRecord) -> Self {
        Self {
            mod_revision,
            generation,
            record,
            follow: watch::Sender::new(generation),
            writing: Arc::new(tokio::sync::Mutex::new(())),
            orphaned: None,
            moving: false,
            ending: false,
        }
    }
}

/// How the store's records are sealed: under `current`, as `seal` says
/// (`store.record_seal`), and opened under whichever key they name.
#[derive(Clone, Debug)]
pub(super) struct StoreKeys {
    pub current: ClusterKeys,
    pub previous: Option<ClusterKeys>,
    /// `previous` is the secret a reload replaced, not a configured one.
    pub replaced: bool,
    pub seal: Seal,
}

impl StoreKeys {
    /// After a reload to `current`, with `previous` configured, sealing as
    /// `seal`.
    fn reloaded(&self, current: ClusterKeys, previous: Option<ClusterKeys>, seal: Seal) -> Self {
        let rotated = current.key_id() != self.current.key_id();
        let (previous, replaced) = match previous {
            Some(p) => (Some(p), false),
            None if rotated => (Some(self.current.clone()), true),
            // A reload that changed neither secret: a replaced one stays (a
            // configured one was just removed from the configuration).
            None if self.replaced => (self.previous.clone(), true),
            None => (None, false),
        };
        Self {
            current,
            previous,
            replaced,
            seal,
        }
    }

    fn all(&self) -> impl Iterator<Item = &ClusterKeys> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

/// Who a session belongs to, as its record keeps it (a taker restores it).
#[derive(Clone, Copy, Debug)]
pub(super) struct Principal<'a> {
    /// The name egress policy rules use.
    pub name: &'a str,
    /// The engine's principal: the exact credential.
    pub credential: &'a str,
    /// When the session must end whatever happens (Unix ms; 0: not known).
    pub end_of_life_unix_ms: u64,
    /// The agent accepts a taker (`Hello.migration`).
    pub migrates: bool,
}

/// A session this gateway just claimed (the record already says so); the
/// session path adopts it, then [`Stored::adopted`] makes it fenced like
/// any recorded session.
pub(super) struct Claimed {
    /// The key the agent proved with; the `server_proof` is made with it.
    pub used_key: ResumeKey,
    /// The record as claimed: owner, epochs, version, principal, lifetime.
    pub record: SessionRecord,
    mod_revision: i64,
    generation: u64,
    _claiming: ClaimGuard,
}

/// The owner lease generation one session was recorded under, checked on
/// its data path: every frame read, every batch written and every chunk
/// going to a destination asks it first, so a process that was paused
/// past its deadline sends nothing for the session when it runs again,
/// whichever of its tasks runs first (the fence loop ends the session
/// too, but it is one task among many).
///
/// A fence that does not hold is not yet an end: the session may move to
/// the next lease ([`Fence::regained`] waits for that, or for its end).
#[derive(Clone)]
pub(crate) struct Fence {
    stored: Arc<Stored>,
    generation: watch::Receiver<u64>,
}

impl Fence {
    /// The lease the session is recorded under serves now.
    pub(crate) fn holds(&self) -> bool {
        self.stored.still(*self.generation.borrow())
    }

    /// Waits until the session is served again (`true`: it moved to the
    /// next lease) or ended (`false`); a session whose lease is lost does
    /// one or the other within a lease TTL.
    pub(crate) async fn regained(mut self) -> bool {
        loop {
            if self.holds() {
                return true;
            }
            // An error: the entry (and its sender) went, the session ended.
            if self.generation.changed().await.is_err() {
                return false;
            }
        }
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("generation", &*self.generation.borrow())
            .finish()
    }
}

/// How often a dead owner's lease key is looked up while takers wait.
const GONE_POLL: Duration = Duration::from_millis(100);

/// Pause between attempts of a write that met an etcd unable to answer.
const WRITE_RETRY: Duration = Duration::from_millis(50);
/// Bound on riding out such an etcd; the lease's self-fence (TTL less a
/// margin after the last renewal) usually ends the wait first.
const WRITE_PATIENCE: Duration = Duration::from_secs(5);

pub(super) use crate::store::unix_ms_now;

/// The store as the session path sees it.
pub(super) struct Stored {
    etcd: EtcdStore,
    /// Creates and binds, group-committed (many sessions' writes per etcd
    /// request under load).
    batch: Batcher,
    status: watch::Receiver<LeaseStatus>,
    /// Tells the keeper to renew now ([`crate::store::Keeper::suspicion`]).
    suspect: Arc<tokio::sync::Notify>,
    /// How long the sessions of a lost lease wait for the next lease (and
    /// a HELLO or RESUME for a lease to write under): the lease TTL.
    patience: Duration,
    /// The keeper's clock origin (its deadlines are on it).
    origin: Instant,
    /// Seals records (current) and opens them (current, then previous: the
    /// secret before the last rotation); a reload swaps them.
    keys: Mutex<Arc<StoreKeys>>,
    sessions: Mutex<HashMap<SessionId, Bound>>,
    /// Dead owners' lease keys takers are waiting on: one poller per key,
    /// however many of its sessions wait (`true` once etcd has no such key).
    gone: Arc<Mutex<HashMap<Vec<u8>, watch::Receiver<bool>>>>,
    /// Sessions this process is claiming right now (claim to adoption).
    claiming: Arc<Mutex<HashSet<SessionId>>>,
}

/// A claim in progress; dropped once the session is adopted (or not).
struct ClaimGuard {
    set: Arc<Mutex<HashSet<SessionId>>>,
    sid: SessionId,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.sid);
    }
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
        suspect: Arc<tokio::sync::Notify>,
        origin: Instant,
        keys: StoreKeys,
        patience: Duration,
    ) -> Self {
        Self {
            batch: Batcher::spawn(etcd.clone()),
            etcd,
            status,
            suspect,
            patience,
            origin,
            keys: Mutex::new(Arc::new(keys)),
            sessions: Mutex::new(HashMap::new()),
            gone: Arc::new(Mutex::new(HashMap::new())),
            claiming: Arc::new(Mutex::new(HashSet::new())),
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

    /// Whether a lease serves now (records may be written).
    pub(super) fn serves(&self) -> bool {
        self.serving().is_some()
    }

    /// When the lease serving now stops serving unless renewed.
    fn serving_until(&self) -> Option<Instant> {
        let s = *self.status.borrow();
        s.serving_until
            .map(|d| self.origin + d.saturating_since(Mono::ZERO))
    }

    /// Waits (until `until`) for a lease that serves, other than
    /// generation `not` (one a write just found gone, which the keeper is
    /// about to hear): its generation and id. A lease lost early is
    /// replaced within milliseconds; a store that cannot grant one is
    /// waited for no longer than `until`.
    async fn serving_by(&self, until: Instant, not: Option<u64>) -> Option<(u64, i64)> {
        let mut rx = self.status.clone();
        loop {
            rx.borrow_and_update();
            if let Some(s) = self.serving().filter(|(g, _)| Some(*g) != not) {
                return Some(s);
            }
            // Not serving until the keeper publishes again (a deadline
            // that passed is never taken back under the same lease).
            match tokio::time::timeout_at(until.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// The fence of a recorded session; a session not (or no longer)
    /// recorded gets one that never holds (fail closed).
    pub(crate) fn fence_of(self: &Arc<Self>, sid: &SessionId) -> Fence {
        let generation = match lock(&self.sessions).get(sid) {
            Some(b) => b.follow.subscribe(),
            // The sender goes at once: never holds, and never regained.
            None => watch::channel(u64::MAX).1,
        };
        Fence {
            stored: self.clone(),
            generation,
        }
    }

    /// Is `generation` still the one serving?
    fn still(&self, generation: u64) -> bool {
        self.serving().is_some_and(|(g, _)| g == generation)
    }

    /// The keys records are sealed and opened with now.
    fn keys(&self) -> Arc<StoreKeys> {
        lock(&self.keys).clone()
    }

    /// A reload: records are sealed under `current`, as `seal` says, from
    /// now on, and opened under it or `previous` (the configured previous
    /// secret; when none is configured, the one a rotation replaced).
    pub(super) fn reload_keys(
        &self,
        current: ClusterKeys,
        previous: Option<ClusterKeys>,
        seal: Seal,
    ) {
        let mut keys = lock(&self.keys);
        let next = keys.reloaded(current, previous, seal);
        *keys = Arc::new(next);
    }

    /// Seals `key` into `rec`, whose other fields are final.
    fn wrap(&self, sid: &SessionId, rec: &mut SessionRecord, key: &[u8; 32]) {
        let keys = self.keys();
        seal_record(&keys.current, rand::random(), sid, rec, key, keys.seal);
    }

    /// Writes `record` at `sid`: a create (`expected` `None`) or a
    /// compare-and-set on revision `expected`. While etcd cannot answer (a
    /// member died and the rest elect a leader: about a second) and this
    /// lease generation still serves, the write is sent again. A resend
    /// (this one, or the etcd client's to another member) whose earlier
    /// attempt did land fails its compare, and the store's answer then
    /// says it landed only if the stored record is exactly this one
    /// ([`crate::store::EtcdStore::write_many`]).
    async fn write(
        &self,
        op: &'static str,
        generation: u64,
        sid: &SessionId,
        expected: Option<i64>,
        record: &SessionRecord,
    ) -> Result<i64, StoreError> {
        let until = Instant::now() + WRITE_PATIENCE;
        loop {
            let write = RecordWrite {
                sid: *sid,
                expected,
                record: record.clone(),
            };
            // Never past the lease's deadline: a write that waits longer
            // is of no use (and must not land late).
            let deadline = match self.serving_until() {
                Some(d) if self.still(generation) => d.min(until),
                _ => return Err(StoreError::Unavailable("the lease stopped serving".into())),
            };
            let r = timed(op, self.batch.write(write, deadline)).await;
            if let Err(e) = &r {
                self.heard(e);
            }
            match r {
                Err(StoreError::Unavailable(_))
                    if self.still(generation) && Instant::now() < until =>
                {
                    counter!(m::STORE_WRITE_RETRIES, "op" => op).increment(1);
                    tokio::time::sleep(WRITE_RETRY).await;
                }
                r => return r,
            }
        }
    }

    /// A write or claim refused because this gateway's lease is gone says
    /// so for every session of the lease, not only its own: the keeper
    /// renews now, and its answer (TTL 0) fences them all.
    fn heard(&self, e: &StoreError) {
        if matches!(e, StoreError::LeaseGone) {
            self.suspect.notify_one();
        }
    }

    /// Records a new session before its `HelloOk`. Fails closed. With no
    /// lease serving (one was just lost) it waits for the next one, as a
    /// write that finds its lease gone is sent again under the next.
    pub(super) async fn on_hello(
        &self,
        shared: &Shared,
        sid: &SessionId,
        who: Principal<'_>,
        binding_epoch: u64,
        key: &[u8; 32],
    ) -> Result<(), ReasonCode> {
        let mut record = SessionRecord {
            owner_node: shared.cfg.node_id.to_string(),
            owner_incarnation: shared.incarnation.0,
            owner_epoch: 1,
            state_version: 1,
            binding_epoch,
            principal: who.name.to_owned(),
            credential: who.credential.to_owned(),
            end_of_life_unix_ms: who.end_of_life_unix_ms,
            agent_migrates: who.migrates,
            ..SessionRecord::default()
        };
        let until = Instant::now() + self.patience;
        // `expected`: a create, until an earlier attempt is found landed.
        let (mut expected, mut failed) = (None, None::<(u64, SessionRecord)>);
        let (generation, rev) = loop {
            let not = failed.as_ref().map(|(g, _)| *g);
            let Some((generation, lease)) = self.serving_by(until, not).await else {
                counter!(m::STORE_WRITES, "op" => "create", "result" => "unavailable").increment(1);
                return Err(ReasonCode::StoreUnavailable);
            };
            let mut attempt = record.clone();
            attempt.owner_lease = lease;
            if expected.is_some() {
                attempt.state_version += 1;
            }
            self.wrap(sid, &mut attempt, key);
            match self
                .write("create", generation, sid, expected, &attempt)
                .await
            {
                Ok(rev) => {
                    record = attempt;
                    break (generation, rev);
                }
                Err(e) if self.lost_meanwhile(&e, generation) => {
                    failed = Some((generation, attempt))
                }
                Err(StoreError::Stale { .. } | StoreError::Exists)
                    if let Some(rev) = self.landed_before(sid, &mut failed).await =>
                {
                    // The attempt whose answer was lost did land: go on
                    // from it (it names a lease that no longer serves).
                    let (_, landed) = failed.take().unwrap_or_default();
                    (expected, record) = (Some(rev), landed);
                }
                Err(e) => {
                    counter!(m::STORE_WRITES, "op" => "create", "result" => result_of(&e))
                        .increment(1);
                    static WARN: AtMost = AtMost::per(Duration::from_secs(10));
                    if let Some(held) = WARN.allow() {
                        warn!(error = %e, held, "store: HELLO not recorded; refused");
                    }
                    return Err(ReasonCode::StoreUnavailable);
                }
            }
        };
        counter!(m::STORE_WRITES, "op" => "create", "result" => "ok").increment(1);
        let mut map = lock(&self.sessions);
        // The lease may have been lost while the write was in flight; the
        // fence loop may have scanned before this entry existed.
        if !self.still(generation) {
            return Err(ReasonCode::StoreUnavailable);
        }
        map.insert(*sid, Bound::new(rev, generation, record));
        Ok(())
    }

    /// The revision of the last attempt that failed for its lease, if that
    /// attempt did land after all (its answer was lost; the retry under
    /// the next lease then fails its compare). `None` clears `failed`.
    async fn landed_before(
        &self,
        sid: &SessionId,
        failed: &mut Option<(u64, SessionRecord)>,
    ) -> Option<i64> {
        let rev = match failed.as_ref() {
            Some((_, rec)) => self.landed(sid, rec).await,
            None => None,
        };
        if rev.is_none() {
            *failed = None;
        }
        rev
    }

    /// Whether a write failed only because the lease it was written under
    /// stopped serving (etcd ended it, or its deadline passed while the
    /// write waited): then it is sent again under the next lease.
    fn lost_meanwhile(&self, e: &StoreError, generation: u64) -> bool {
        match e {
            StoreError::LeaseGone => true,
            StoreError::Unavailable(_) => !self.still(generation),
            _ => false,
        }
    }

    /// Topology 3's takeover, taker side: the router found the owner of the
    /// session `req` resumes dead and sent the RESUME here (the session's
    /// shard owner). The record is read, its key opened and the RESUME's
    /// proof checked with it (nothing is written for an agent that cannot
    /// prove the session); then one compare-and-set claims it: the record
    /// unchanged since the read, the old owner's lease key gone at that
    /// very revision (seen gone, never a timer), this gateway's lease
    /// alive; owner epoch, binding epoch and version bumped, the key
    /// rotated to `next_key` (this connection's, at the new binding
    /// epoch).
    pub(super) async fn take_over(
        &self,
        shared: &Shared,
        req: &ResumeRequest<'_>,
        binding: &ChannelBinding,
        next_key: impl FnOnce(u64) -> Option<[u8; 32]>,
    ) -> Result<Claimed, ReasonCode> {
        let sid = req.session_id;
        let count = |result: &'static str| {
            counter!(m::STORE_CLAIMS, "result" => result).increment(1);
        };
        // A lease lost a moment ago is replaced within milliseconds: wait
        // for the next, as a HELLO does, rather than refuse the claim.
        let until = Instant::now() + self.patience;
        let Some((generation, lease)) = self.serving_by(until, None).await else {
            count("unavailable");
            return Err(ReasonCode::StoreUnavailable);
        };
        if !lock(&self.claiming).insert(sid) {
            // Another connection of this session is claiming it here.
            count("conflict");
            return Err(ReasonCode::OwnerUnreachable);
        }
        let claiming = ClaimGuard {
            set: self.claiming.clone(),
            sid,
        };
        // Another connection of this session may have claimed and adopted
        // it while this one waited for a lease: it is here now, and its
        // record (ours, under this lease) must not be taken for a failed
        // adoption. The agent's next RESUME finds it.
        let shard = crate::engine::shard_of(&sid, shared.shards.len());
        if shared.with_engine(shard, |e| e.session(&sid).is_some()) {
            count("conflict");
            return Err(ReasonCode::OwnerUnreachable);
        }
        let stored = match timed("load", self.etcd.load(&sid)).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                count("no_record");
                return Err(ReasonCode::UnknownSession);
            }
            // Bytes that are no record: no retry makes them one.
            Err(StoreError::Record(_)) => {
                count("error");
                return Err(ReasonCode::UnknownSession);
            }
            Err(e) => {
                count(result_of(&e));
                return Err(ReasonCode::StoreUnavailable);
            }
        };
        let old = &stored.record;
        let me = (shared.cfg.node_id.as_str(), shared.incarnation.0);
        if (old.owner_node.as_str(), old.owner_incarnation) == me && old.owner_lease == lease {
            // Claimed under this very lease, yet the session is not here
            // (the caller looked): a claim whose adoption failed. Nobody
            // can serve that record; it goes, and the agent re-handshakes.
            count("own");
            let _ = self.etcd.delete(&sid, stored.mod_revision).await;
            return Err(ReasonCode::UnknownSession);
        }
        if !old.agent_migrates || old.end_of_life_unix_ms == 0 || old.owner_lease == 0 {
            // Written for an agent that would refuse a taker (or by a
            // gateway from before takeovers): its owner's end is its end.
            count("not_migratable");
            return Err(ReasonCode::UnknownSession);
        }
        let keys = self.keys();
        let Ok(key) = open_record_key(keys.all(), &sid, old) else {
            count("error");
            return Err(ReasonCode::UnknownSession);
        };
        let used_key = ResumeKey::new(*key);
        // The agent proves the session as it would to its owner: with the
        // key of the binding the record holds.
        if !used_key.verify_resume_proof(&sid, req.counter, req.binding_epoch, binding, req.proof) {
            count("bad_proof");
            return Err(ReasonCode::UnknownSession);
        }
        if req.binding_epoch != old.binding_epoch {
            // Proven with the stored key, at another binding epoch: an
            // agent (or a copy of it) out of step with the record.
            count("stale_binding");
            return Err(ReasonCode::UnknownSession);
        }
        let wall_ms = unix_ms_now();
        if old.end_of_life_unix_ms <= wall_ms {
            count("expired");
            return Err(ReasonCode::UnknownSession);
        }
        let mut record = SessionRecord {
            owner_node: me.0.to_owned(),
            owner_incarnation: me.1,
            owner_epoch: old.owner_epoch + 1,
            state_version: old.state_version + 1,
            binding_epoch: old.binding_epoch + 1,
            owner_lease: lease,
            ..old.clone()
        };
        let Some(new_key) = next_key(record.binding_epoch) else {
            count("error");
            return Err(ReasonCode::ProtocolError);
        };
        self.wrap(&sid, &mut record, &new_key);
        // The old owner's lease usually outlives its process by up to a
        // TTL: rather than have the agent retry through the router (a
        // TLS handshake each time), wait here until etcd ended it, at most
        // a TTL and a second; the claim's compare still decides. The key
        // is looked at first, so a live owner costs reads, not writes.
        let bound =
            Duration::from_millis(shared.cfg.raw.store.lease_ttl_ms) + Duration::from_secs(1);
        let alive = timed("load", self.etcd.owner_key_exists(old)).await;
        if matches!(alive, Ok(true)) && !self.wait_gone(old, bound).await {
            // Not seen gone: the router's verdict was early (or wrong: a
            // partition); nothing was taken, the agent asks again.
            count("owner_alive");
            return Err(ReasonCode::OwnerUnreachable);
        }
        let claimed = timed(
            "claim",
            self.etcd.claim(&sid, stored.mod_revision, old, &record),
        )
        .await;
        let rev = match claimed {
            Ok(rev) => rev,
            Err(e) => match self.landed(&sid, &record).await {
                // The answer was lost but the write landed (a timeout, or
                // the same transaction resent to another member whose
                // compare then failed): it is ours.
                Some(rev) => rev,
                None => {
                    let (result, reason) = match e {
                        StoreError::OwnerAlive => ("owner_alive", ReasonCode::OwnerUnreachable),
                        // Someone wrote it since the read (another taker, or
                        // the owner after all): the next read decides.
                        StoreError::Stale { .. } | StoreError::Exists | StoreError::Missing => {
                            ("conflict", ReasonCode::OwnerUnreachable)
                        }
                        e => {
                            self.heard(&e);
                            warn!(error = %e, "store: takeover not claimed");
                            (result_of(&e), ReasonCode::StoreUnavailable)
                        }
                    };
                    count(result);
                    return Err(reason);
                }
            },
        };
        count("ok");
        Ok(Claimed {
            used_key,
            record,
            mod_revision: rev,
            generation,
            _claiming: claiming,
        })
    }

    /// The revision of `rec` if the record stored now is exactly it (its
    /// wrapped key has a fresh nonce: no other write is equal).
    async fn landed(&self, sid: &SessionId, rec: &SessionRecord) -> Option<i64> {
        match self.etcd.load(sid).await {
            Ok(Some(s)) if s.record == *rec => Some(s.mod_revision),
            _ => None,
        }
    }

    /// Waits (at most `bound`) until etcd has no owner key for the lease
    /// `rec` names; `false` if it still had one. Takers of one dead owner's
    /// sessions share one poller per key.
    async fn wait_gone(&self, rec: &SessionRecord, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let mut rx = self.poller(rec, bound);
            // (The watch's guard is not held across the awaits below.)
            let waited = tokio::time::timeout_at(deadline, rx.wait_for(|g| *g))
                .await
                .map(|r| r.is_ok());
            match waited {
                Ok(true) => return true,
                // This waiter's own bound passed.
                Err(_) => return matches!(self.etcd.owner_key_exists(rec).await, Ok(false)),
                // The poller started for an earlier waiter and gave up
                // (its entry is gone): a new one, for the time left.
                Ok(false) => {}
            }
        }
    }

    /// The poller of `rec`'s owner key (started if there is none): it
    /// publishes `true` once etcd has no such key, for at most `bound`.
    fn poller(&self, rec: &SessionRecord, bound: Duration) -> watch::Receiver<bool> {
        let key = self.etcd.owner_key_of(rec);
        let mut map = lock(&self.gone);
        if let Some(rx) = map.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(false);
        map.insert(key.clone(), rx.clone());
        let (etcd, rec, gone) = (self.etcd.clone(), rec.clone(), self.gone.clone());
        tokio::spawn(async move {
            let until = Instant::now() + bound;
            while Instant::now() < until {
                if let Ok(false) = etcd.owner_key_exists(&rec).await {
                    let _ = tx.send(true);
                    break;
                }
                tokio::time::sleep(GONE_POLL).await;
            }
            // Out of the table before `tx` goes, so a waiter that sees the
            // poller end finds no stale entry.
            lock(&gone).remove(&key);
            drop(tx);
        });
        rx
    }

    /// The claimed session is in the engine now: it is fenced from here on
    /// like any recorded one. `false` if the lease was lost meanwhile (the
    /// fence loop may have scanned already): the caller ends the session,
    /// and no `ResumeOk` goes out.
    pub(super) fn adopted(&self, sid: &SessionId, c: &Claimed) -> bool {
        let mut map = lock(&self.sessions);
        if !self.still(c.generation) {
            return false;
        }
        map.insert(
            *sid,
            Bound::new(c.mod_revision, c.generation, c.record.clone()),
        );
        true
    }

    /// Moves a recorded session's binding before its `ResumeOk`. Every
    /// session of a gateway with a store was recorded at its HELLO; one
    /// that is not here any more ended: refused. A session whose lease was
    /// lost moves to the next lease in the same write.
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
        let Some(key) = key else {
            return fail("error");
        };
        let until = Instant::now() + self.patience;
        match self
            .rewrite("bind", sid, Some((binding_epoch, key)), until)
            .await
        {
            Ok(moved) => {
                if moved {
                    counter!(m::STORE_SESSIONS_MOVED, "result" => "ok").increment(1);
                }
                counter!(m::STORE_WRITES, "op" => "bind", "result" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                if !matches!(e, Rewrite::Gone) {
                    static WARN: AtMost = AtMost::per(Duration::from_secs(10));
                    if let Some(held) = WARN.allow() {
                        warn!(error = %e, held, "store: binding change not recorded; the session ends");
                    }
                }
                fail(e.result())
            }
        }
    }

    /// Writes `sid`'s record again, by compare-and-set on the revision
    /// this gateway last wrote, under the lease serving now (waiting for
    /// one until `until`): with a new binding (a RESUME) or as it is (a
    /// move to the next lease, `binding` `None`). A write that finds its
    /// lease gone is sent again under the next. `Ok(true)`: the session
    /// moved to another lease.
    async fn rewrite(
        &self,
        op: &'static str,
        sid: &SessionId,
        binding: Option<(u64, [u8; 32])>,
        until: Instant,
    ) -> Result<bool, Rewrite> {
        let Some(writing) = lock(&self.sessions).get(sid).map(|b| b.writing.clone()) else {
            return Err(Rewrite::Gone);
        };
        let _one = writing.lock().await;
        let mut failed = None::<(u64, SessionRecord)>;
        loop {
            let not = failed.as_ref().map(|(g, _)| *g);
            let Some((generation, lease)) = self.serving_by(until, not).await else {
                return Err(Rewrite::Store(StoreError::Unavailable(
                    "no owner lease serves".into(),
                )));
            };
            let Some((expected, was, mut record)) = lock(&self.sessions)
                .get(sid)
                .map(|b| (b.mod_revision, b.generation, b.record.clone()))
            else {
                return Err(Rewrite::Gone);
            };
            if binding.is_none() && was == generation {
                // Moved already (a RESUME's write did it).
                return Ok(false);
            }
            let key = match binding {
                Some((epoch, key)) => {
                    record.binding_epoch = epoch;
                    zeroize::Zeroizing::new(key)
                }
                None => match open_record_key(self.keys().all(), sid, &record) {
                    Ok(k) => k,
                    Err(e) => return Err(Rewrite::Store(StoreError::Record(e))),
                },
            };
            record.state_version += 1;
            record.owner_lease = lease;
            self.wrap(sid, &mut record, &key);
            match self
                .write(op, generation, sid, Some(expected), &record)
                .await
            {
                Ok(rev) if !self.holds(sid) => {
                    // It ended while the write was in flight, and its end
                    // deleted the revision before this one: this record
                    // goes too (nobody will write it again).
                    self.delete_in_background(sid, rev);
                    return Err(Rewrite::Gone);
                }
                Ok(rev) => {
                    let mut map = lock(&self.sessions);
                    let Some(b) = map.get_mut(sid) else {
                        return Err(Rewrite::Gone);
                    };
                    // Landed: whatever follows compares this revision.
                    b.mod_revision = rev;
                    b.record = record;
                    if !self.still(generation) {
                        // Lost again while the write was in flight: the
                        // record names a lease that no longer serves.
                        b.generation = generation;
                        continue;
                    }
                    let moved = b.generation != generation;
                    b.generation = generation;
                    b.orphaned = None;
                    // A later loss gets a move of its own.
                    b.moving = false;
                    b.follow.send_replace(generation);
                    return Ok(moved);
                }
                Err(e) if self.lost_meanwhile(&e, generation) => {
                    failed = Some((generation, record))
                }
                // Ended meanwhile: its end may be what changed the record.
                Err(_) if !self.holds(sid) => return Err(Rewrite::Gone),
                Err(StoreError::Stale { .. } | StoreError::Exists)
                    if let Some(rev) = self.landed_before(sid, &mut failed).await =>
                {
                    // The attempt whose answer was lost did land: go on
                    // from it (it names a lease that no longer serves).
                    let Some((g, landed)) = failed.take() else {
                        continue;
                    };
                    if let Some(b) = lock(&self.sessions).get_mut(sid) {
                        (b.mod_revision, b.generation, b.record) = (rev, g, landed);
                    }
                }
                Err(e) => return Err(Rewrite::Store(e)),
            }
        }
    }

    /// A session of a lost lease moves to the next one, or ends: written by
    /// another meanwhile (a taker may serve it), or no lease within its
    /// patience.
    async fn move_to_next_lease(self: Arc<Self>, shared: Arc<Shared>, sid: SessionId) {
        let since = {
            let mut map = lock(&self.sessions);
            let Some(b) = map.get_mut(&sid) else {
                return;
            };
            match b.orphaned {
                Some(since) => since,
                // A RESUME moved it before this task ran.
                None => {
                    b.moving = false;
                    return;
                }
            }
        };
        let r = self
            .rewrite("move", &sid, None, since + self.patience)
            .await;
        // `Some`: it ends, counted under that result.
        let ends = match r {
            Ok(moved) => {
                if moved {
                    counter!(m::STORE_SESSIONS_MOVED, "result" => "ok").increment(1);
                }
                None
            }
            Err(Rewrite::Gone) => return,
            // No lease came: the fence loop ends it at its patience.
            Err(Rewrite::Store(StoreError::Unavailable(_) | StoreError::LeaseGone)) => None,
            Err(Rewrite::Store(StoreError::Stale { .. } | StoreError::Missing)) => Some("lost"),
            Err(Rewrite::Store(_)) => Some("error"),
        };
        match ends {
            Some(result) => {
                counter!(m::STORE_SESSIONS_MOVED, "result" => result).increment(1);
                debug!(
                    result,
                    "store: a session of a lost lease not moved; it ends"
                );
                self.end_fenced(&shared, vec![sid]);
            }
            None => {
                if let Some(b) = lock(&self.sessions).get_mut(&sid) {
                    b.moving = false;
                }
            }
        }
    }

    /// Whether `sid`'s record is this gateway's to keep now.
    pub(super) fn holds(&self, sid: &SessionId) -> bool {
        lock(&self.sessions).contains_key(sid)
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
        self.delete_in_background(sid, bound.mod_revision);
    }

    /// Deletes `sid`'s record written at `mod_revision`, in the background.
    fn delete_in_background(&self, sid: &SessionId, mod_revision: i64) {
        let (etcd, sid) = (self.etcd.clone(), *sid);
        tokio::spawn(async move {
            // Tried again while etcd cannot be reached: a record left behind
            // would let a taker bring the ended session back (after its owner
            // died). Safe to repeat: it deletes only the record written at
            // `mod_revision`, never one a taker wrote since, and a delete
            // that landed unanswered reads as stale the next time.
            let mut wait = DELETE_RETRY_FIRST;
            let give_up = Instant::now() + DELETE_RETRY_FOR;
            loop {
                let r = timed("delete", etcd.delete(&sid, mod_revision)).await;
                let result = match &r {
                    Ok(_) => "ok",
                    Err(e) => {
                        debug!(error = %e, "store: ended session's record not deleted");
                        result_of(e)
                    }
                };
                counter!(m::STORE_WRITES, "op" => "delete", "result" => result).increment(1);
                let retry = matches!(r, Err(StoreError::Unavailable(_)));
                if !retry || Instant::now() + wait > give_up {
                    static WARN: AtMost = AtMost::per(Duration::from_secs(10));
                    if retry && let Some(held) = WARN.allow() {
                        warn!(
                            held,
                            "store: an ended session's record could not be deleted"
                        );
                    }
                    return;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(DELETE_RETRY_MAX);
            }
        });
    }

    /// Sessions whose generation no longer serves: each waits (unserved)
    /// for the next lease, moves to it once one serves, and ends when its
    /// patience runs out; all of them end at once when `all` (the keeper
    /// is gone). Returns when the next of them runs out of patience.
    fn fence(self: &Arc<Self>, shared: &Arc<Shared>, all: bool) -> Option<Instant> {
        let serving = self.serving().map(|(g, _)| g);
        let now = Instant::now();
        let (mut end, mut moves, mut next) = (Vec::new(), Vec::new(), None::<Instant>);
        for (sid, b) in lock(&self.sessions).iter_mut() {
            if !all && serving == Some(b.generation) {
                continue;
            }
            let give_up = *b.orphaned.get_or_insert(now) + self.patience;
            if all || now >= give_up {
                end.push(*sid);
                continue;
            }
            next = Some(next.map_or(give_up, |n| n.min(give_up)));
            if serving.is_some() && !b.moving {
                b.moving = true;
                moves.push(*sid);
            }
        }
        if !end.is_empty() {
            debug!(
                sessions = end.len(),
                "store: owner lease lost; sessions end"
            );
            self.end_fenced(shared, end);
        }
        for sid in moves {
            tokio::spawn(self.clone().move_to_next_lease(shared.clone(), sid));
        }
        next
    }

    /// Ends, with `store_unavailable`, sessions of a lost lease. Their
    /// records stay: with the lease lost they are for a taker now.
    fn end_fenced(&self, shared: &Shared, sids: Vec<SessionId>) {
        for sid in sids {
            // Once, whoever asks first (the fence loop at its patience, a
            // move that found the record written by another).
            match lock(&self.sessions).get_mut(&sid) {
                Some(b) if !b.ending => b.ending = true,
                _ => continue,
            }
            counter!(m::STORE_FENCED_SESSIONS).increment(1);
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

    /// Fences sessions whenever the keeper publishes, at each deadline (a
    /// keeper late to publish cannot keep sessions served past it) and
    /// when a lost lease's session runs out of patience; if the keeper is
    /// gone, every recorded session ends.
    pub(super) async fn fence_loop(self: Arc<Self>, shared: Arc<Shared>) {
        let mut rx = self.status.clone();
        loop {
            let s = *rx.borrow_and_update();
            let give_up = self.fence(&shared, false);
            // A deadline already passed wakes nobody: the keeper publishes.
            let until = s
                .serving_until
                .map(|d| self.origin + d.saturating_since(Mono::ZERO))
                .filter(|d| *d > Instant::now())
                .into_iter()
                .chain(give_up)
                .min();
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

/// Why a record could not be written again.
#[derive(Debug, thiserror::Error)]
enum Rewrite {
    /// The session ended meanwhile (its entry is gone).
    #[error("the session ended")]
    Gone,
    #[error(transparent)]
    Store(StoreError),
}

impl Rewrite {
    fn result(&self) -> &'static str {
        match self {
            Rewrite::Gone => "unavailable",
            Rewrite::Store(e) => result_of(e),
        }
    }
}

/// An ended session's record delete is tried again after this, doubling
/// up to [`DELETE_RETRY_MAX`], for [`DELETE_RETRY_FOR`] at most.
const DELETE_RETRY_FIRST: Duration = Duration::from_millis(250);
const DELETE_RETRY_MAX: Duration = Duration::from_secs(5);
const DELETE_RETRY_FOR: Duration = Duration::from_secs(300);

/// A store request, timed into the latency histogram by `op`.
async fn timed<T>(op: &'static str, f: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let r = f.await;
    histogram!(m::STORE_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    r
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
        StoreError::Missing
        | StoreError::Record(_)
        | StoreError::Config(_)
        | StoreError::Refused(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::{Seal, StoreKeys};
    use jvpn_proto::keys::{ClusterKeys, ClusterSecret};

    fn k(id: u8) -> ClusterKeys {
        ClusterSecret::new(id, [id; 32]).derive()
    }

    fn ids(keys: &StoreKeys) -> (u8, Option<u8>) {
        (
            keys.current.key_id(),
            keys.previous.as_ref().map(ClusterKeys::key_id),
        )
    }

    /// A rotation by reload with no previous secret configured keeps the
    /// replaced secret for opening records, and a later reload that
    /// changes nothing of the secrets (a policy, a certificate) keeps it
    /// too; it used to drop it, and takeovers of sessions idle since the
    /// rotation were refused. A configured previous secret is what it says,
    /// and removing it from the configuration removes it.
    #[test]
    fn a_replaced_secret_outlives_later_reloads() {
        let start = StoreKeys {
            current: k(1),
            previous: None,
            replaced: false,
            seal: Seal::V2,
        };
        let rotated = start.reloaded(k(2), None, Seal::V2);
        assert_eq!(ids(&rotated), (2, Some(1)));
        let again = rotated.reloaded(k(2), None, Seal::V2);
        assert_eq!(ids(&again), (2, Some(1)), "a later reload forgot it");
        let configured = again.reloaded(k(2), Some(k(1)), Seal::V2);
        assert_eq!(ids(&configured), (2, Some(1)));
        let dropped = configured.reloaded(k(2), None, Seal::V2);
        assert_eq!(ids(&dropped), (2, None), "removed from the configuration");
    }
}
