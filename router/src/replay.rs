//! How often one routing token may be spliced (issue 18 F6, design note 34).
//!
//! A token names its owner, so every replay of a captured (or one's own)
//! token is spliced to that gateway, where it costs a TLS handshake before
//! the RESUME is refused. An agent uses each token once, plus its retries
//! while it waits for a `ResumeOk` (refusals, back-off); so each token gets
//! a small bucket per source address: a burst of 8, then 2 per second. Per source,
//! so that whoever captured a token (it travels in the clear preamble)
//! cannot use up its agent's bucket from elsewhere. Across sources the
//! per-gateway RESUME budget is the bound. Only tokens that opened (real
//! ones) take a place; the table is bounded and fails closed when full of
//! tokens still in use.

use std::collections::HashMap;
use std::time::Duration;

use jvpn_proto::Mono;
use jvpn_runtime::admission::Bucket;

/// Splices per second one token may keep up.
pub const PER_TOKEN_RATE: f64 = 2.0;
/// Splices one token may make at once.
pub const PER_TOKEN_BURST: f64 = 8.0;
/// Tokens tracked at most (about 16 MiB): four seconds of 65,000 RESUMEs/s.
pub const CAPACITY: usize = 262_144;
/// A full table is swept for idle tokens at most this often.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// After this long unused, a token's bucket is full again: forget it.
const IDLE: Duration = Duration::from_secs(4);
/// Retry hint when the table is full of tokens in use.
const FULL_RETRY: Duration = Duration::from_millis(250);

/// Why a splice of this token is not allowed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// This token was spliced too often; retry after the hint.
    TooOften(Duration),
    /// Too many tokens in use at once (fail closed).
    TableFull(Duration),
}

/// Per-token splice buckets.
#[derive(Debug, Default)]
pub struct TokenUses {
    table: HashMap<u128, (Bucket, Mono)>,
    last_sweep: Option<Mono>,
}

impl TokenUses {
    /// May `token` (one that opened) be spliced for `source` at `now`?
    pub fn check(&mut self, token: &[u8], source: &[u8], now: Mono) -> Result<(), TokenRefusal> {
        let mut h = blake3::Hasher::new();
        h.update(&(token.len() as u64).to_le_bytes());
        h.update(token);
        h.update(source);
        let h = h.finalize();
        let key = u128::from_le_bytes(h.as_bytes()[..16].try_into().unwrap_or([0; 16]));
        if !self.table.contains_key(&key) && self.table.len() >= CAPACITY {
            // One sweep per period, not one per refused token.
            if self
                .last_sweep
                .is_none_or(|t| now.saturating_since(t) >= SWEEP_EVERY)
            {
                self.last_sweep = Some(now);
                self.table
                    .retain(|_, (_, last)| now.saturating_since(*last) < IDLE);
            }
            if self.table.len() >= CAPACITY {
                return Err(TokenRefusal::TableFull(FULL_RETRY));
            }
        }
        let (bucket, last) = self
            .table
            .entry(key)
            .or_insert_with(|| (Bucket::full(PER_TOKEN_BURST, now), now));
        *last = now;
        bucket
            .take(PER_TOKEN_RATE, PER_TOKEN_BURST, now)
            .map_err(TokenRefusal::TooOften)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 F6: replays of one token reach its owner at most at the
    /// bucket's rate; other tokens are unaffected.
    #[test]
    fn one_token_is_spliced_a_bounded_number_of_times() {
        let mut t = TokenUses::default();
        let now = Mono::from_millis(1_000);
        let mut ok = 0;
        for _ in 0..1_000 {
            if t.check(b"captured", b"a", now).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, PER_TOKEN_BURST as usize, "a burst, then refused");
        assert!(matches!(
            t.check(b"captured", b"a", now),
            Err(TokenRefusal::TooOften(d)) if d > Duration::ZERO
        ));
        assert!(t.check(b"another", b"a", now).is_ok());
        // The same token from another source has its own bucket: a replayer
        // cannot use up its agent's.
        assert!(t.check(b"captured", b"b", now).is_ok());
        // Ten seconds later: twenty more at most (2 per second).
        let later = now + Duration::from_secs(10);
        let more = (0..1_000)
            .filter(|_| t.check(b"captured", b"a", later).is_ok())
            .count();
        assert_eq!(more, PER_TOKEN_BURST as usize);
    }

    #[test]
    fn the_table_is_bounded_and_fails_closed_while_full_of_live_tokens() {
        let mut t = TokenUses::default();
        let now = Mono::from_millis(1);
        for i in 0..CAPACITY as u64 {
            assert!(t.check(&i.to_le_bytes(), b"a", now).is_ok());
        }
        assert!(matches!(
            t.check(b"one more", b"a", now),
            Err(TokenRefusal::TableFull(_))
        ));
        assert_eq!(t.len(), CAPACITY);
        // Once they are idle, they make room.
        let idle = now + IDLE;
        assert!(t.check(b"one more", b"a", idle).is_ok());
        assert_eq!(t.len(), 1);
    }
}
