//! The sweep: removes session records nobody can use again.
//!
//! A record outlives its owner on purpose (a taker may claim it), so an
//! owner that dies leaves its sessions' records behind, and so does a
//! delete that failed while etcd was unavailable. Without a sweep they
//! stay in etcd for good, and a cluster that loses gateways now and then
//! fills etcd's quota over months. A record goes when
//!
//! * its session's end of life passed [`EXPIRY_GRACE`] ago (nobody may
//!   serve it: a taker refuses it as expired, its owner ended it), or
//! * no taker may ever claim it (its agent refuses takers, or its writer
//!   recorded no end of life) and etcd no longer has its owner's key.
//!
//! Records from writers that name no owner lease (gateways from before
//! takeovers) go only by the first rule: their owner's liveness is not in
//! etcd. Every delete compares the revision read, so a record written
//! since (a taker's claim, its owner's next binding) is never removed.
//!
//! Each gateway reads one page of records per interval, from a random place
//! in the key space and wrapping around: the cost per gateway is bounded
//! by the page, and gateways sweeping at once seldom read the same page.

use std::collections::HashMap;
use std::time::Duration;

use jvpn_proto::SessionId;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record;
use metrics::counter;
use rand::Rng;
use tracing::debug;

use super::{EtcdStore, StoreError, unix_ms_now};
use crate::metrics as m;

/// How long after its session's end of life a record is surely unused,
/// whatever the gateways' clocks say.
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);

/// What the sweep does with a record, from the record alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Keep,
    /// Past its end of life and the grace: removed.
    Expired,
    /// Unclaimable: removed once its owner's key is gone.
    IfOwnerGone,
}

pub fn fate(rec: &SessionRecord, now_unix_ms: u64) -> Fate {
    let grace = u64::try_from(EXPIRY_GRACE.as_millis()).unwrap_or(u64::MAX);
    let end = rec.end_of_life_unix_ms;
    if end != 0 && now_unix_ms >= end.saturating_add(grace) {
        return Fate::Expired;
    }
    if rec.owner_lease != 0 && (!rec.agent_migrates || end == 0) {
        return Fate::IfOwnerGone;
    }
    Fate::Keep
}

/// Why a record was swept (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swept {
    Expired,
    Unclaimable,
}

impl Swept {
    pub const ALL: [Self; 2] = [Self::Expired, Self::Unclaimable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Unclaimable => "unclaimable",
        }
    }
}

/// `[store] sweep_*`.
#[derive(Clone, Copy, Debug)]
pub struct SweepConfig {
    /// Between two pages (jittered by ±20 %).
    pub interval: Duration,
    /// Records read per page.
    pub page: i64,
}

/// Sweeps until aborted.
pub async fn run(etcd: EtcdStore, cfg: SweepConfig) {
    // Gateways started together spread their first pages over an interval.
    let first = cfg.interval.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(first).await;
    let mut after = Some(etcd.session_key(&SessionId::from_bytes(rand::random())));
    loop {
        match page(&etcd, after.as_deref(), cfg.page, unix_ms_now()).await {
            Ok(next) => {
                counter!(m::STORE_SWEEP_PAGES, "result" => "ok").increment(1);
                after = next;
            }
            Err(e) => {
                counter!(m::STORE_SWEEP_PAGES, "result" => "error").increment(1);
                debug!(error = %e, "store sweep: page not swept");
            }
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::time::sleep(cfg.interval.mul_f64(jitter)).await;
    }
}

/// Sweeps the page after `after`; returns where the next one starts
/// (`None`: from the first record again).
pub async fn page(
    etcd: &EtcdStore,
    after: Option<&[u8]>,
    limit: i64,
    now_unix_ms: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let kvs = etcd.session_page(after, limit).await?;
    let next = if i64::try_from(kvs.len()).unwrap_or(i64::MAX) < limit {
        None
    } else {
        kvs.last().map(|kv| kv.key.clone())
    };
    // Sessions of one owner share its key: looked up once per page.
    let mut owners: HashMap<Vec<u8>, bool> = HashMap::new();
    for kv in kvs {
        let Ok(rec) = store_record::decode(&kv.value) else {
            debug!("store sweep: a record that does not decode is left alone");
            continue;
        };
        let why = match fate(&rec, now_unix_ms) {
            Fate::Keep => continue,
            Fate::Expired => Swept::Expired,
            Fate::IfOwnerGone => {
                let key = etcd.owner_key_of(&rec);
                let alive = match owners.get(&key) {
                    Some(a) => *a,
                    None => {
                        let a = etcd.exists(key.clone()).await?;
                        owners.insert(key, a);
                        a
                    }
                };
                if alive {
                    continue;
                }
                Swept::Unclaimable
            }
        };
        match etcd.delete_key(kv.key, kv.mod_revision).await {
            Ok(_) => counter!(m::STORE_SWEPT, "reason" => why.as_str()).increment(1),
            // Written since it was read: not the record judged.
            Err(StoreError::Stale { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lease: i64, migrates: bool, end: u64) -> SessionRecord {
        SessionRecord {
            owner_lease: lease,
            agent_migrates: migrates,
            end_of_life_unix_ms: end,
            ..SessionRecord::default()
        }
    }

    #[test]
    fn a_record_goes_when_nobody_can_use_it() {
        let now = 10_000_000;
        let grace = EXPIRY_GRACE.as_millis() as u64;
        // Past its end of life and the grace, whoever wrote it.
        assert_eq!(fate(&rec(5, true, now - grace), now), Fate::Expired);
        assert_eq!(fate(&rec(0, false, now - grace), now), Fate::Expired);
        // Within the grace: a clock ahead of the owner's must not cut it.
        assert_eq!(fate(&rec(5, true, now - grace + 1), now), Fate::Keep);
        // Claimable and alive: kept for a taker.
        assert_eq!(fate(&rec(5, true, now + 1), now), Fate::Keep);
        // Unclaimable: goes with its owner.
        assert_eq!(fate(&rec(5, false, now + 1), now), Fate::IfOwnerGone);
        assert_eq!(fate(&rec(5, true, 0), now), Fate::IfOwnerGone);
        // No owner lease named: its owner's liveness is not in etcd.
        assert_eq!(fate(&rec(0, false, 0), now), Fate::Keep);
        assert_eq!(fate(&rec(0, false, now + 1), now), Fate::Keep);
    }
}
