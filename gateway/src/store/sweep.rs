//! The sweep: removes session records nobody can use again.
//!
//! A record outlives its owner on purpose (a taker may claim it), so an
//! owner that dies leaves its sessions' records behind, and so does a
//! delete that failed while etcd was unavailable. Without a sweep they
//! stay in etcd for good, and a cluster that loses gateways now and then
//! fills etcd's quota over months. A record goes when etcd no longer has
//! its owner's key and
//!
//! * its session's end of life passed [`EXPIRY_GRACE`] ago (a taker
//!   refuses it as expired), or
//! * no taker may ever claim it (its agent refuses takers, or its writer
//!   recorded no end of life).
//!
//! A live owner's record goes only when that owner is this gateway, the
//! record is expired, and the session is not here (its delete failed): so
//! a gateway whose clock runs ahead cannot remove another live owner's
//! record. Records from writers that name no owner lease (gateways from
//! before takeovers) go by their end of life alone: their owner's liveness
//! is not in etcd. Every delete compares the revision read (a record
//! written since, by a taker or its owner, is never removed) and, where
//! the owner's absence decided, that the owner key is still absent.
//!
//! Each gateway reads one bounded range of session ids per interval, from
//! a random place, wrapping around. The range adapts to the store: it
//! halves while it holds more than a page and doubles while it holds under
//! half of one, so etcd's work per request (it counts every key in a
//! range) stays about a page however large the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jvpn_proto::SessionId;
use jvpn_proto::pb::store::SessionRecord;
use jvpn_proto::store_record;
use metrics::counter;
use rand::Rng;
use tracing::{debug, warn};

use super::{EtcdStore, StoreError, unix_ms_now};
use crate::metrics as m;

/// How long after its session's end of life a record is surely unused, for
/// gateways whose clocks differ by less than this.
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);
/// How long an owner key seen alive is believed alive (one seen gone stays
/// gone: it exists only under its lease).
const OWNER_ALIVE_FOR: Duration = Duration::from_secs(30);
/// Owner keys remembered at most (then forgotten all at once).
const OWNERS_REMEMBERED: usize = 10_000;
/// A range that failed this many times in a row is skipped.
const TRIES_PER_RANGE: u32 = 3;

/// What the sweep does with a record, from the record alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Keep,
    /// Removed.
    Remove(Swept),
    /// Removed once its owner's key is gone.
    IfOwnerGone(Swept),
}

pub fn fate(rec: &SessionRecord, now_unix_ms: u64) -> Fate {
    let expired = is_expired(rec, now_unix_ms);
    let end = rec.end_of_life_unix_ms;
    match (rec.owner_lease != 0, expired) {
        (true, true) => Fate::IfOwnerGone(Swept::Expired),
        (true, false) if !rec.agent_migrates || end == 0 => Fate::IfOwnerGone(Swept::Unclaimable),
        // A writer that names no lease: its owner's liveness is not in etcd.
        (false, true) => Fate::Remove(Swept::Expired),
        _ => Fate::Keep,
    }
}

fn is_expired(rec: &SessionRecord, now_unix_ms: u64) -> bool {
    let grace = u64::try_from(EXPIRY_GRACE.as_millis()).unwrap_or(u64::MAX);
    let end = rec.end_of_life_unix_ms;
    end != 0 && now_unix_ms >= end.saturating_add(grace)
}

/// Why a record was swept (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swept {
    Expired,
    Unclaimable,
    /// Bytes that are no record (damaged, or written by something else):
    /// no gateway can serve or take over what they held.
    Undecodable,
}

impl Swept {
    pub const ALL: [Self; 3] = [Self::Expired, Self::Unclaimable, Self::Undecodable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Unclaimable => "unclaimable",
            Self::Undecodable => "undecodable",
        }
    }
}

/// This gateway, as the owner its own records name.
pub struct Me {
    pub node: String,
    pub incarnation: u64,
    /// Whether this gateway holds the session now.
    pub holds: Arc<dyn Fn(&SessionId) -> bool + Send + Sync>,
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Records read.
    pub read: usize,
    /// The step reached the last session id and starts over from the first.
    pub wrapped: bool,
}

impl std::fmt::Debug for Me {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Me")
            .field("node", &self.node)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Sweeper {
    etcd: EtcdStore,
    page: i64,
    me: Option<Me>,
    /// The first session id of the next range, and the range's width.
    at: u128,
    width: u128,
    owners: HashMap<Vec<u8>, (bool, Instant)>,
    failures: u32,
}

impl Sweeper {
    /// Starts at a random session id with a narrow range (a large store
    /// is not walked whole on the first request; a small one widens the
    /// range to all of it within a dozen steps).
    pub fn new(etcd: EtcdStore, page: i64, me: Option<Me>) -> Self {
        Self {
            etcd,
            page,
            me,
            at: rand::random(),
            width: 1 << (128 - 12),
            owners: HashMap::new(),
            failures: 0,
        }
    }

    /// Sweeps one range; where the next starts and how wide it is.
    pub async fn step(&mut self, now_unix_ms: u64) -> Result<Step, StoreError> {
        let to = self.at.checked_add(self.width);
        let (read, more, last) = match self.sweep_range(to, now_unix_ms).await {
            Ok(r) => {
                self.failures = 0;
                r
            }
            Err(e) => {
                self.failures += 1;
                if self.failures < TRIES_PER_RANGE {
                    return Err(e);
                }
                // The same range failed again and again: go on past it (it
                // comes round again), narrower, rather than stall the sweep.
                warn!(error = %e, "store sweep: a range failed {TRIES_PER_RANGE} times; skipped");
                self.failures = 0;
                self.width = (self.width / 2).max(1);
                return Ok(self.advance(to, 0));
            }
        };
        let next = if more {
            // More than a page in the range: go on after the last record,
            // with a narrower range.
            self.width = (self.width / 2).max(1);
            match last {
                Some(l) => l.checked_add(1),
                None => to,
            }
        } else {
            // Under half a page (for tiny pages: empty): wider. A range
            // holding half a page to a page keeps its width.
            if i64::try_from(read).unwrap_or(i64::MAX).saturating_mul(2) < self.page {
                self.width = self.width.saturating_mul(2);
            }
            to
        };
        Ok(self.advance(next, read))
    }

    /// Moves to `next` (`None`: past the last id, so the first).
    fn advance(&mut self, next: Option<u128>, read: usize) -> Step {
        self.at = next.unwrap_or(0);
        Step {
            read,
            wrapped: next.is_none(),
        }
    }

    /// `(records read, more in the range, id of the last one read)`.
    async fn sweep_range(
        &mut self,
        to: Option<u128>,
        now_unix_ms: u64,
    ) -> Result<(usize, bool, Option<u128>), StoreError> {
        let (kvs, more) = self.etcd.session_range(self.at, to, self.page).await?;
        let read = kvs.len();
        let last = kvs.last().and_then(|kv| session_of(&kv.key));
        if self.owners.len() > OWNERS_REMEMBERED {
            self.owners.clear();
        }
        for kv in kvs {
            let (why, owner_gone) = match store_record::decode(&kv.value) {
                Err(_) => (Swept::Undecodable, None),
                Ok(rec) => match fate(&rec, now_unix_ms) {
                    Fate::Keep => continue,
                    Fate::Remove(why) => (why, None),
                    Fate::IfOwnerGone(why) => {
                        let key = self.etcd.owner_key_of(&rec);
                        if !self.owner_alive(&key).await? {
                            (why, Some(key))
                        } else if self.leaked_here(&rec, &kv.key, now_unix_ms) {
                            (Swept::Expired, None)
                        } else {
                            continue;
                        }
                    }
                },
            };
            match self
                .etcd
                .delete_key(kv.key, kv.mod_revision, owner_gone)
                .await
            {
                Ok(_) => counter!(m::STORE_SWEPT, "reason" => why.as_str()).increment(1),
                // Written since it was read, or its owner is back under
                // that key: not the record judged.
                Err(StoreError::Stale { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((read, more, last))
    }

    async fn owner_alive(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        if let Some(&(alive, at)) = self.owners.get(key)
            && (!alive || at.elapsed() < OWNER_ALIVE_FOR)
        {
            return Ok(alive);
        }
        let alive = self.etcd.exists(key.to_vec()).await?;
        self.owners.insert(key.to_vec(), (alive, Instant::now()));
        Ok(alive)
    }

    /// An expired record of this very gateway whose session is not here:
    /// its delete failed when the session ended.
    fn leaked_here(&self, rec: &SessionRecord, key: &[u8], now_unix_ms: u64) -> bool {
        let Some(me) = &self.me else { return false };
        rec.owner_node == me.node
            && rec.owner_incarnation == me.incarnation
            && is_expired(rec, now_unix_ms)
            && session_of(key)
                .is_some_and(|id| !(me.holds)(&SessionId::from_bytes(id.to_be_bytes())))
    }
}

/// The session id a record's key ends with.
fn session_of(key: &[u8]) -> Option<u128> {
    let hex = std::str::from_utf8(key).ok()?.rsplit('/').next()?;
    (hex.len() == 32).then(|| u128::from_str_radix(hex, 16).ok())?
}

/// Sweeps until aborted.
pub async fn run(mut sweeper: Sweeper, interval: Duration) {
    // Gateways started together spread their first ranges over an interval.
    let first = interval.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(first).await;
    loop {
        match sweeper.step(unix_ms_now()).await {
            Ok(step) => {
                counter!(m::STORE_SWEEP_PAGES, "result" => "ok").increment(1);
                if step.wrapped {
                    counter!(m::STORE_SWEEP_PASSES).increment(1);
                }
            }
            Err(e) => {
                counter!(m::STORE_SWEEP_PAGES, "result" => "error").increment(1);
                debug!(error = %e, "store sweep: range not swept");
            }
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::time::sleep(interval.mul_f64(jitter)).await;
    }
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
        let (expired, unclaimable) = (
            Fate::IfOwnerGone(Swept::Expired),
            Fate::IfOwnerGone(Swept::Unclaimable),
        );
        // Past its end of life and the grace: goes with its owner.
        assert_eq!(fate(&rec(5, true, now - grace), now), expired);
        assert_eq!(fate(&rec(5, false, now - grace), now), expired);
        // Within the grace: a clock ahead of the owner's must not cut it.
        assert_eq!(fate(&rec(5, true, now - grace + 1), now), Fate::Keep);
        // Claimable and alive: kept for a taker.
        assert_eq!(fate(&rec(5, true, now + 1), now), Fate::Keep);
        // Unclaimable: goes with its owner.
        assert_eq!(fate(&rec(5, false, now + 1), now), unclaimable);
        assert_eq!(fate(&rec(5, true, 0), now), unclaimable);
        // No owner lease named: its owner's liveness is not in etcd, so
        // only its end of life counts, with the same grace.
        assert_eq!(
            fate(&rec(0, false, now - grace), now),
            Fate::Remove(Swept::Expired)
        );
        assert_eq!(fate(&rec(0, false, now - grace + 1), now), Fate::Keep);
        assert_eq!(fate(&rec(0, false, 0), now), Fate::Keep);
        assert_eq!(fate(&rec(0, false, now + 1), now), Fate::Keep);
    }

    #[test]
    fn a_records_key_names_its_session() {
        let id = 0x0123_4567_89ab_cdef_0011_2233_4455_6677_u128;
        let key = format!("/jvpn/c/sessions/{id:032x}");
        assert_eq!(session_of(key.as_bytes()), Some(id));
        let sid = SessionId::from_bytes(id.to_be_bytes());
        assert_eq!(format!("/jvpn/c/sessions/{sid}"), key);
        assert_eq!(session_of(b"/jvpn/c/sessions/xyz"), None);
    }
}
