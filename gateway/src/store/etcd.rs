//! The session store on etcd (topology 3, DESIGN.md §9): records, owner
//! leases and the compare-and-set transactions that fence every write.
//!
//! Keys under the configured prefix:
//! - `<prefix>/sessions/<session id hex>`: the [`SessionRecord`]; no lease
//!   (a session outlives its owner: that is the point of the topology);
//! - `<prefix>/owners/<node>/<incarnation hex>/<lease hex>`: empty, put
//!   under that owner lease, so it exists exactly while the lease does
//!   (one key per lease: a gateway's next lease does not revive the key
//!   its sessions' records name). A taker's claim compares its absence
//!   inside the claim's own transaction: the old lease is *seen* gone by
//!   etcd at the claim's revision, never assumed gone on a local timer.
//!
//! Every write names the record's `mod_revision` it read (a write from a
//! stale owner, one whose session was taken over, fails at etcd) and the
//! writer's own owner key with its lease (a write from an owner whose lease
//! etcd already ended fails too, whatever its local clock says).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jvpn_proto::pb::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use jvpn_proto::pb::etcd::kv_client::KvClient;
use jvpn_proto::pb::etcd::lease_client::LeaseClient;
use jvpn_proto::pb::etcd::request_op::Request as Op;
use jvpn_proto::pb::etcd::response_op::Response as Answer;
use jvpn_proto::pb::etcd::{
    Compare, DeleteRangeRequest, KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record::{self, RecordError};
use jvpn_proto::{Incarnation, NodeId, SessionId};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long a keep-alive waits, after a first member said "alive", for
/// another to say "gone".
pub const KEEP_ALIVE_SETTLE: Duration = Duration::from_millis(100);

/// Why a store operation did not happen. Each is explicit: the caller fails
/// closed (no claim, no `ResumeOk`) on every one of them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The record changed since it was read (another writer, a takeover).
    #[error("store record changed since revision {expected}")]
    Stale { expected: i64 },
    /// A record for this session exists already.
    #[error("store record exists already")]
    Exists,
    /// The owner's lease key still exists: no takeover.
    #[error("the owner's lease is still alive")]
    OwnerAlive,
    /// The writer's own owner lease is gone at etcd: it may write nothing.
    #[error("this gateway's owner lease is gone")]
    LeaseGone,
    /// No record for this session.
    #[error("no store record")]
    Missing,
    /// A stored record does not read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A configuration value (endpoint, certificate) is unusable.
    #[error("store config: {0}")]
    Config(String),
    /// etcd answered and refused (permissions, a request too large, an
    /// invalid one): sending it again would not help.
    #[error("store refused: {0}")]
    Refused(String),
}

impl StoreError {
    /// The same error for another waiter of one failed batch request (only
    /// request-level errors are shared: unavailable or refused).
    pub fn again(&self) -> Self {
        match self {
            StoreError::Refused(s) => StoreError::Refused(s.clone()),
            StoreError::Config(s) => StoreError::Config(s.clone()),
            StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<tonic::Status> for StoreError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let text = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented => StoreError::Refused(text),
            // Unavailable, deadlines, leader changes, cancellations, "too
            // many requests" (ResourceExhausted): the store could not
            // decide now.
            _ => StoreError::Unavailable(text),
        }
    }
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `https://host:port` (or `http://` without TLS), one per member.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's records.
    pub prefix: String,
    /// PEM: the CA of etcd's client port, our client certificate and key.
    pub tls: Option<EtcdTls>,
    /// Bound on every request (a store that cannot decide fails closed).
    pub request_timeout: Duration,
}

/// mTLS material for etcd's client port.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls(<redacted>)")
    }
}

/// Most record writes one etcd request carries. etcd's `--max-txn-ops`
/// (128 by default) bounds the outer transaction's operations and each
/// nested one's by what the outer left: a batch of `n` needs at least
/// `n + 2`, so 64 fits the default with room.
pub const MAX_BATCH: usize = 64;

/// One record write of a batch: a create (`expected` `None`) or a
/// compare-and-set on revision `expected`, both only while the owner lease
/// the record names lives.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordWrite {
    pub sid: SessionId,
    pub expected: Option<i64>,
    pub record: SessionRecord,
}

/// A record as read, with the revision every write must name.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub record: SessionRecord,
    pub mod_revision: i64,
}

/// One member's clients (one lazily connected HTTP/2 channel each).
#[derive(Clone, Debug)]
struct Member {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// The store's client. Cheap to clone. It sticks to the member that last
/// answered and moves on to the next one when a member cannot be reached or
/// does not answer within its share of the request bound (a balanced
/// channel would keep sending a share of calls to a dead member, and one
/// paused member must not eat the whole bound). Channels reconnect by
/// themselves and streams are per call, so nothing needs restoring after
/// an etcd restart.
///
/// Moving on is safe for writes too: every write is a compare-and-set, so
/// one that did land before its connection broke fails its compare when
/// sent again (`Exists` / `Stale`) instead of landing twice; the caller
/// then reads the record back before it believes either outcome.
#[derive(Clone, Debug)]
pub struct EtcdStore {
    members: Arc<[Member]>,
    current: Arc<AtomicUsize>,
    prefix: String,
    timeout: Duration,
}

impl EtcdStore {
    /// A client for `cfg`'s endpoints; connects lazily, so a store down at
    /// start-up fails the first operation, not the process.
    pub fn new(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Config("no endpoints".into()));
        }
        let mut eps = Vec::with_capacity(cfg.endpoints.len());
        for url in &cfg.endpoints {
            let mut ep = Endpoint::from_shared(url.clone())
                .map_err(|e| StoreError::Config(format!("endpoint {url}: {e}")))?
                .connect_timeout(cfg.request_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            if let Some(t) = &cfg.tls {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&t.ca_pem))
                    .identity(Identity::from_pem(&t.cert_pem, &t.key_pem));
                ep = ep
                    .tls_config(tls)
                    .map_err(|e| StoreError::Config(format!("tls for {url}: {e}")))?;
            }
            eps.push(ep);
        }
        let members: Vec<Member> = eps
            .into_iter()
            .map(|ep| {
                let ch = ep.connect_lazy();
                Member {
                    kv: KvClient::new(ch.clone()),
                    lease: LeaseClient::new(ch),
                }
            })
            .collect();
        Ok(Self {
            members: members.into(),
            current: Arc::new(AtomicUsize::new(0)),
            prefix: cfg.prefix.trim_end_matches('/').to_owned(),
            timeout: cfg.request_timeout,
        })
    }

    /// Runs `call` on the member that last answered, then on the others in
    /// turn while a member is unreachable or slow (each gets an equal share
    /// of the request bound); the whole within the bound. Any other answer
    /// (including etcd's own errors) is final.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Member) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.members.len();
        let start = self.current.load(Ordering::Relaxed);
        let share = self.timeout / u32::try_from(n).unwrap_or(u32::MAX).max(1);
        let attempts = async {
            let mut last = StoreError::Unavailable("no endpoint".into());
            for k in 0..n {
                let i = (start + k) % n;
                match tokio::time::timeout(share, call(self.members[i].clone())).await {
                    Ok(Ok(v)) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(s)) if s.code() == tonic::Code::Unavailable => last = s.into(),
                    Ok(Err(s)) => return Err(StoreError::from(s)),
                    Err(_) => last = StoreError::Unavailable("member did not answer".into()),
                }
                // The next call starts at the next member.
                self.current.store((i + 1) % n, Ordering::Relaxed);
            }
            Err(last)
        };
        tokio::time::timeout(self.timeout, attempts)
            .await
            .map_err(|_| StoreError::Unavailable("request timed out".into()))?
    }

    /// Where `sid`'s record lives.
    pub fn session_key(&self, sid: &SessionId) -> Vec<u8> {
        format!("{}/sessions/{sid}", self.prefix).into_bytes()
    }

    /// The key that exists while `node`'s incarnation holds `lease`.
    pub fn owner_key(&self, node: &str, inc: u64, lease: i64) -> Vec<u8> {
        format!(
            "{}/owners/{node}/{inc:016x}/{:016x}",
            self.prefix,
            lease.cast_unsigned()
        )
        .into_bytes()
    }

    /// The owner key a record names.
    pub fn owner_key_of(&self, rec: &SessionRecord) -> Vec<u8> {
        self.owner_key(&rec.owner_node, rec.owner_incarnation, rec.owner_lease)
    }

    /// A lease of `ttl` (whole seconds, at least one): its id and the TTL
    /// etcd granted.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, i64), StoreError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self
            .call(|mut m| async move {
                Ok(m.lease
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await?
                    .into_inner())
            })
            .await?;
        if !r.error.is_empty() {
            return Err(StoreError::Unavailable(format!("lease grant: {}", r.error)));
        }
        Ok((r.id, r.ttl))
    }

    /// One keep-alive round trip: the TTL etcd reports (0: the lease is gone).
    /// Sent to every member at once: after a leader is lost, the renewal
    /// lands as soon as any member can forward it to the new one, instead
    /// of after a paused member's share of the bound (the lease deadline
    /// has no time for that). A "gone" answer from any member wins over
    /// "alive" from another (a deposed leader may still say alive): after
    /// the first "alive", the others get [`KEEP_ALIVE_SETTLE`] more to say
    /// otherwise. A stream per call: after an etcd restart the next call
    /// reconnects.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let mut asked = tokio::task::JoinSet::new();
        for m in self.members.iter().cloned() {
            let mut lc = m.lease;
            asked.spawn(async move {
                let req = tokio_stream::once(LeaseKeepAliveRequest { id: lease });
                let mut answers = lc.lease_keep_alive(req).await?.into_inner();
                match answers.message().await? {
                    Some(a) => Ok(a.ttl),
                    None => Err(tonic::Status::unavailable("keep-alive stream ended")),
                }
            });
        }
        let mut alive: Option<i64> = None;
        let mut last = StoreError::Unavailable("no endpoint".into());
        let bound = tokio::time::Instant::now() + self.timeout;
        // Until the first "alive", the bound; then at most the settle window.
        let mut until = bound;
        loop {
            let next = match tokio::time::timeout_at(until, asked.join_next()).await {
                Ok(Some(r)) => r,
                // Everyone answered, or the time is up.
                Ok(None) | Err(_) => break,
            };
            match next {
                Ok(Ok(ttl)) if ttl <= 0 => return Ok(0),
                Ok(Ok(ttl)) => {
                    if alive.is_none() {
                        alive = Some(ttl);
                        until = bound.min(tokio::time::Instant::now() + KEEP_ALIVE_SETTLE);
                    }
                }
                Ok(Err(s)) => last = s.into(),
                Err(e) => last = StoreError::Unavailable(e.to_string()),
            }
        }
        // Dropping the set cancels the members still being asked.
        match alive {
            Some(ttl) => Ok(ttl),
            None if tokio::time::Instant::now() >= bound => {
                Err(StoreError::Unavailable("request timed out".into()))
            }
            None => Err(last),
        }
    }

    /// Ends a lease now (a clean shutdown hands its sessions over at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.call(|mut m| async move {
            m.lease
                .lease_revoke(LeaseRevokeRequest { id: lease })
                .await?;
            Ok(())
        })
        .await
    }

    /// Puts the owner key of `node`'s incarnation under `lease`.
    pub async fn register_owner(
        &self,
        node: &NodeId,
        inc: Incarnation,
        lease: i64,
    ) -> Result<(), StoreError> {
        let put = put(
            self.owner_key(node.as_str(), inc.0, lease),
            Vec::new(),
            lease,
        );
        self.txn(Vec::new(), vec![put]).await.map(|_| ())
    }

    /// Every key under `prefix`.
    async fn range_prefix(&self, key: Vec<u8>) -> Result<Vec<KeyValue>, StoreError> {
        let end = past_prefix(&key);
        Ok(self.range(key, end, 0).await?.kvs)
    }

    /// One range read: `range_end` empty for `key` alone, `limit` 0 for no
    /// limit.
    async fn range(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        limit: i64,
    ) -> Result<RangeResponse, StoreError> {
        self.call(|mut m| {
            let (key, range_end) = (key.clone(), range_end.clone());
            async move {
                Ok(m.kv
                    .range(RangeRequest {
                        key,
                        range_end,
                        limit,
                        keys_only: false,
                    })
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// The incarnations of `node` holding an owner lease now.
    pub async fn owners(&self, node: &NodeId) -> Result<Vec<Incarnation>, StoreError> {
        Ok(self
            .owner_leases(node)
            .await?
            .into_iter()
            .map(|(inc, _)| inc)
            .collect())
    }

    /// `(incarnation, lease)` of every owner key of `node` now.
    pub async fn owner_leases(&self, node: &NodeId) -> Result<Vec<(Incarnation, i64)>, StoreError> {
        let kvs = self
            .range_prefix(format!("{}/owners/{node}/", self.prefix).into_bytes())
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let text = std::str::from_utf8(&kv.key).ok()?;
                let mut parts = text.rsplit('/');
                let lease = u64::from_str_radix(parts.next()?, 16).ok()?;
                let inc = u64::from_str_radix(parts.next()?, 16).ok()?;
                Some((Incarnation(inc), lease.cast_signed()))
            })
            .collect())
    }

    /// Does `node`'s incarnation hold an owner lease now?
    pub async fn owner_alive(&self, node: &NodeId, inc: Incarnation) -> Result<bool, StoreError> {
        let key = format!("{}/owners/{node}/{:016x}/", self.prefix, inc.0).into_bytes();
        Ok(!self.range_prefix(key).await?.is_empty())
    }

    /// Whether the owner key a record names still exists (its lease lives).
    pub async fn owner_key_exists(&self, rec: &SessionRecord) -> Result<bool, StoreError> {
        self.exists(self.owner_key_of(rec)).await
    }

    async fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.range(key, Vec::new(), 1).await?.kvs.into_iter().next())
    }

    /// Runs a transaction: `Ok(Some(revision))` when every compare held and
    /// the writes happened at that revision, `Ok(None)` when one failed.
    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
    ) -> Result<Option<i64>, StoreError> {
        let req = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        self.call(|mut m| {
            let req = req.clone();
            async move {
                let r = m.kv.txn(req).await?.into_inner();
                Ok(r.succeeded.then(|| r.header.map_or(0, |h| h.revision)))
            }
        })
        .await
    }

    /// Reads `sid`'s record.
    pub async fn load(&self, sid: &SessionId) -> Result<Option<Stored>, StoreError> {
        match self.get(self.session_key(sid)).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(Stored {
                record: store_record::decode(&kv.value)?,
                mod_revision: kv.mod_revision,
            })),
        }
    }

    /// The compare that holds while the record's owner lease lives at etcd.
    fn owner_holds(&self, rec: &SessionRecord) -> Compare {
        compare(
            self.owner_key_of(rec),
            CompareTarget::Lease,
            TargetUnion::Lease(rec.owner_lease),
        )
    }

    /// Writes every record of `writes` in one etcd request (group commit):
    /// each in a transaction of its own, with exactly the compares of
    /// [`Self::create`] or [`Self::update`], nested in one outer
    /// transaction that compares nothing. Each lands or fails alone; they
    /// share one round trip and one raft entry. A failed one reads its key
    /// in the same request: why it failed costs no second round trip, and
    /// a write that already landed (the request was resent to another
    /// member after the first one applied it) is recognised as landed: the
    /// stored bytes are exactly its own (the wrapped key's fresh nonce
    /// makes them unique). Keys must be distinct (etcd refuses a request
    /// that writes one key twice) and at most [`MAX_BATCH`].
    pub async fn write_many(
        &self,
        writes: &[RecordWrite],
    ) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
        let encoded: Vec<Vec<u8>> = writes
            .iter()
            .map(|w| store_record::encode(&w.record))
            .collect();
        let one = |(w, value): (&RecordWrite, &Vec<u8>)| {
            let key = self.session_key(&w.sid);
            let first = match w.expected {
                None => compare(
                    key.clone(),
                    CompareTarget::Create,
                    TargetUnion::CreateRevision(0),
                ),
                Some(rev) => compare(
                    key.clone(),
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(rev),
                ),
            };
            let look = RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: key.clone(),
                    range_end: Vec::new(),
                    limit: 1,
                    keys_only: false,
                })),
            };
            RequestOp {
                request: Some(Op::RequestTxn(TxnRequest {
                    compare: vec![first, self.owner_holds(&w.record)],
                    success: vec![put(key, value.clone(), 0)],
                    failure: vec![look],
                })),
            }
        };
        let req = TxnRequest {
            compare: Vec::new(),
            success: writes.iter().zip(&encoded).map(one).collect(),
            failure: Vec::new(),
        };
        let r = self
            .call(|mut m| {
                let req = req.clone();
                async move { Ok(m.kv.txn(req).await?.into_inner()) }
            })
            .await?;
        if r.responses.len() != writes.len() {
            return Err(StoreError::Refused(format!(
                "a batch of {} writes answered with {} results",
                writes.len(),
                r.responses.len()
            )));
        }
        // Every write of one transaction lands at its revision.
        let revision = r.header.map_or(0, |h| h.revision);
        let landed = |kv: &KeyValue, value: &[u8]| kv.value == value;
        Ok(writes
            .iter()
            .zip(&encoded)
            .zip(r.responses)
            .map(|((w, value), answer)| match answer.response {
                Some(Answer::ResponseTxn(t)) if t.succeeded && revision > 0 => Ok(revision),
                Some(Answer::ResponseTxn(t)) if t.succeeded => Err(StoreError::Unavailable(
                    "a batched write landed at no revision".into(),
                )),
                Some(Answer::ResponseTxn(t)) => {
                    let now = t.responses.into_iter().find_map(|r| match r.response {
                        Some(Answer::ResponseRange(rr)) => Some(rr.kvs.into_iter().next()),
                        _ => None,
                    });
                    match now {
                        Some(Some(kv)) if landed(&kv, value) => Ok(kv.mod_revision),
                        Some(kv) => Err(why(
                            w.expected.unwrap_or(0),
                            kv.map_or(0, |kv| kv.mod_revision),
                        )),
                        None => Err(StoreError::Refused(
                            "a failed batched write came back without its read".into(),
                        )),
                    }
                }
                _ => Err(StoreError::Refused(
                    "a batched write came back without its transaction".into(),
                )),
            })
            .collect())
    }

    /// Writes a new session's record; fails if one exists or if the owner
    /// lease the record names is gone.
    pub async fn create(&self, sid: &SessionId, rec: &SessionRecord) -> Result<i64, StoreError> {
        self.write_one(sid, None, rec).await
    }

    /// A binding change by the owner: written only if the record is still
    /// the one read at `expected` (a takeover in between makes it fail) and
    /// the owner lease `rec` names is alive.
    pub async fn update(
        &self,
        sid: &SessionId,
        expected: i64,
        rec: &SessionRecord,
    ) -> Result<i64, StoreError> {
        self.write_one(sid, Some(expected), rec).await
    }

    async fn write_one(
        &self,
        sid: &SessionId,
        expected: Option<i64>,
        rec: &SessionRecord,
    ) -> Result<i64, StoreError> {
        let w = RecordWrite {
            sid: *sid,
            expected,
            record: rec.clone(),
        };
        self.write_many(std::slice::from_ref(&w))
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Refused("no result".into())))
    }

    /// Removes an ended session's record, only if it is still the one
    /// written at `expected` (never one a taker wrote since).
    pub async fn delete(&self, sid: &SessionId, expected: i64) -> Result<i64, StoreError> {
        self.delete_key(self.session_key(sid), expected, None).await
    }

    /// Up to `limit` session records (raw), in key order, whose session
    /// ids lie in `[from, to)` (`to` `None`: to the last id), and whether
    /// the range holds more. A bounded range keeps etcd's work bounded:
    /// it counts every key of the range whatever the limit.
    pub async fn session_range(
        &self,
        from: u128,
        to: Option<u128>,
        limit: i64,
    ) -> Result<(Vec<KeyValue>, bool), StoreError> {
        let at = |id: u128| self.session_key(&SessionId::from_bytes(id.to_be_bytes()));
        let key = at(from);
        let range_end = match to {
            Some(t) => at(t),
            None => past_prefix(format!("{}/sessions/", self.prefix).as_bytes()),
        };
        let r = self.range(key, range_end, limit).await?;
        Ok((r.kvs, r.more))
    }

    /// Whether `key` exists now.
    pub async fn exists(&self, key: Vec<u8>) -> Result<bool, StoreError> {
        Ok(self.get(key).await?.is_some())
    }

    /// Removes the record at `key` if it is still the one written at
    /// `expected` and, with `owner_gone`, if that owner key does not exist.
    pub async fn delete_key(
        &self,
        key: Vec<u8>,
        expected: i64,
        owner_gone: Option<Vec<u8>>,
    ) -> Result<i64, StoreError> {
        let mut compares = vec![compare(
            key.clone(),
            CompareTarget::Mod,
            TargetUnion::ModRevision(expected),
        )];
        if let Some(owner) = owner_gone {
            compares.push(compare(
                owner,
                CompareTarget::Create,
                TargetUnion::CreateRevision(0),
            ));
        }
        let del = RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key,
                range_end: Vec::new(),
            })),
        };
        self.txn(compares, vec![del])
            .await?
            .ok_or(StoreError::Stale { expected })
    }

    /// A takeover: `rec` (the taker's: `owner_epoch` bumped, a fresh key,
    /// its own owner lease) replaces `previous`, read at `expected`, only if
    /// the owner lease `previous` names is gone at this very revision and
    /// the taker's own lease lives.
    pub async fn claim(
        &self,
        sid: &SessionId,
        expected: i64,
        previous: &SessionRecord,
        rec: &SessionRecord,
    ) -> Result<i64, StoreError> {
        let key = self.session_key(sid);
        let owner = self.owner_key_of(previous);
        let same = compare(
            key.clone(),
            CompareTarget::Mod,
            TargetUnion::ModRevision(expected),
        );
        let gone = compare(
            owner.clone(),
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
        );
        let look = |key: Vec<u8>| RequestOp {
            request: Some(Op::RequestRange(RangeRequest {
                key,
                range_end: Vec::new(),
                limit: 1,
                keys_only: true,
            })),
        };
        let req = TxnRequest {
            compare: vec![same, gone, self.owner_holds(rec)],
            success: vec![put(key.clone(), store_record::encode(rec), 0)],
            // Which compare failed, read at the same revision: a lease
            // expiring between the claim and a later read must not pass
            // for the taker's own lease gone.
            failure: vec![look(owner), look(key)],
        };
        let r = self
            .call(|mut m| {
                let req = req.clone();
                async move { Ok(m.kv.txn(req).await?.into_inner()) }
            })
            .await?;
        if r.succeeded {
            return match r.header.map_or(0, |h| h.revision) {
                rev if rev > 0 => Ok(rev),
                _ => Err(StoreError::Unavailable(
                    "a claim landed at no revision".into(),
                )),
            };
        }
        let mut read = r.responses.into_iter().map(|r| match r.response {
            Some(Answer::ResponseRange(rr)) => Ok(rr.kvs.into_iter().next()),
            _ => Err(StoreError::Refused(
                "a failed claim came back without its reads".into(),
            )),
        });
        let (Some(owner_now), Some(record_now)) = (read.next(), read.next()) else {
            return Err(StoreError::Refused(
                "a failed claim came back without its reads".into(),
            ));
        };
        if owner_now?.is_some() {
            return Err(StoreError::OwnerAlive);
        }
        Err(why(expected, record_now?.map_or(0, |kv| kv.mod_revision)))
    }
}

/// The end of the range of every key starting with `prefix`: `prefix`
/// with its last byte incremented (every prefix here ends in '/').
fn past_prefix(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn why(expected: i64, now: i64) -> StoreError {
    match (expected, now) {
        (0, 0) => StoreError::LeaseGone,
        (0, _) => StoreError::Exists,
        (e, n) if e == n => StoreError::LeaseGone,
        (e, _) => StoreError::Stale { expected: e },
    }
}

fn compare(key: Vec<u8>, target: CompareTarget, value: TargetUnion) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key,
        target_union: Some(value),
    }
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest { key, value, lease })),
    }
}
