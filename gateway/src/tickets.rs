//! TLS 1.3 resumption tickets (issue 17, design note 45): a reattaching
//! agent resumes its TLS session with the owner instead of a full
//! handshake with certificates on both sides.
//!
//! * Keys are random per process (so per incarnation, and never shared
//!   between gateways) and rotated every half `transport_lost_ttl`; a key
//!   is forgotten one rotation after it stopped sealing, so no ticket is
//!   accepted for longer than `transport_lost_ttl`.
//! * Every ticket is accepted once: its nonce is remembered until its key
//!   is forgotten. A second use gets a full handshake, never a resumed
//!   session. The table is bounded; when it is full, tickets are refused
//!   (full handshakes), never accepted unchecked.
//! * Tickets carry the TLS session's secret and the client's certificate
//!   chain, sealed with ChaCha20-Poly1305; they never reach logs.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::counter;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::server::ProducesTickets;

use crate::metrics as m;

/// Remembered ticket nonces at most (about 40 bytes each).
pub const USED_CAPACITY: usize = 1 << 20;

/// Why a ticket was not accepted (metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketRefusal {
    /// Already used once.
    Reused,
    /// Not sealed by a key this process still holds (another gateway, an
    /// earlier incarnation, expired, or garbage).
    Unknown,
    /// The table of used tickets is full.
    TableFull,
}

impl TicketRefusal {
    pub const ALL: [TicketRefusal; 3] = [Self::Reused, Self::Unknown, Self::TableFull];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reused => "reused",
            Self::Unknown => "unknown",
            Self::TableFull => "table_full",
        }
    }
}

struct Key {
    id: u8,
    key: LessSafeKey,
}

impl Key {
    fn random(id: u8) -> Option<Self> {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok()?;
        Some(Self {
            id,
            key: LessSafeKey::new(key),
        })
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
    since: Instant,
}

/// The gateway's ticketer: give it to rustls as `ServerConfig::ticketer`.
pub struct Tickets {
    keys: RwLock<Keys>,
    /// `transport_lost_ttl` in ms (changes with a policy reload).
    ttl_ms: AtomicU64,
    /// Nonce → when it was used; kept until its key could be gone.
    used: Mutex<HashMap<[u8; NONCE_LEN], Instant>>,
    capacity: usize,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("ttl_ms", &self.ttl_ms.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// Tickets accepted for at most `ttl` (`transport_lost_ttl`).
    pub fn new(ttl: Duration) -> Option<Self> {
        Self::with_capacity(ttl, USED_CAPACITY)
    }

    pub fn with_capacity(ttl: Duration, capacity: usize) -> Option<Self> {
        Some(Self {
            keys: RwLock::new(Keys {
                current: Key::random(0)?,
                previous: None,
                since: Instant::now(),
            }),
            ttl_ms: AtomicU64::new(ttl_ms(ttl)),
            used: Mutex::new(HashMap::new()),
            capacity,
        })
    }

    /// A reloaded `transport_lost_ttl`.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl_ms(ttl), Ordering::Relaxed);
    }

    fn rotation(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed) / 2)
    }

    /// Rotates if due: the current key stops sealing after one period and
    /// is forgotten after two.
    fn roll(&self, now: Instant) {
        let period = self.rotation();
        if now.saturating_duration_since(read(&self.keys).since) < period {
            return;
        }
        let mut k = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let age = now.saturating_duration_since(k.since);
        if age < period {
            return;
        }
        let Some(next) = Key::random(k.current.id.wrapping_add(1)) else {
            return;
        };
        let old = std::mem::replace(&mut k.current, next);
        k.previous = (age < 2 * period).then_some(old);
        k.since = now;
    }

    fn refuse(r: TicketRefusal) -> Option<Vec<u8>> {
        counter!(m::TLS_TICKETS_REFUSED, "reason" => r.as_str()).increment(1);
        None
    }

    /// Marks `nonce` used; false if it was already, or if the table is
    /// full even after forgetting what no key can open any more.
    fn first_use(&self, nonce: [u8; NONCE_LEN], now: Instant) -> Result<(), TicketRefusal> {
        let keep = 2 * self.rotation();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.contains_key(&nonce) {
            return Err(TicketRefusal::Reused);
        }
        if used.len() >= self.capacity {
            used.retain(|_, t| now.saturating_duration_since(*t) < keep);
            if used.len() >= self.capacity {
                return Err(TicketRefusal::TableFull);
            }
        }
        used.insert(nonce, now);
        Ok(())
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(2)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    /// Whole seconds, rounded down: a client never holds a ticket longer
    /// than the gateway would accept it.
    fn lifetime(&self) -> u32 {
        let s = self.ttl_ms.load(Ordering::Relaxed) / 1000;
        u32::try_from(s).unwrap_or(u32::MAX).max(1)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.roll(Instant::now());
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let keys = read(&self.keys);
        let id = keys.current.id;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + 16);
        out.push(id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        keys.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([id]),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let now = Instant::now();
        self.roll(now);
        let (&id, rest) = cipher.split_first()?;
        if rest.len() < NONCE_LEN {
            return Self::refuse(TicketRefusal::Unknown);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let plain = {
            let keys = read(&self.keys);
            let key = std::iter::once(&keys.current)
                .chain(keys.previous.as_ref())
                .find(|k| k.id == id);
            let mut body = sealed.to_vec();
            let opened = key.and_then(|k| {
                k.key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from([id]),
                        &mut body,
                    )
                    .ok()
                    .map(|p| p.len())
            });
            match opened {
                Some(n) => {
                    body.truncate(n);
                    body
                }
                None => return Self::refuse(TicketRefusal::Unknown),
            }
        };
        // Only an authentic ticket is remembered: garbage cannot fill the
        // table.
        match self.first_use(nonce, now) {
            Ok(()) => Some(plain),
            Err(r) => Self::refuse(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tickets() -> Tickets {
        Tickets::new(Duration::from_secs(15)).unwrap()
    }

    #[test]
    fn a_ticket_opens_once() {
        let t = tickets();
        let c = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&c).as_deref(), Some(&b"session state"[..]));
        assert_eq!(t.decrypt(&c), None, "a second use");
    }

    #[test]
    fn another_processes_ticket_and_tampering_are_refused() {
        let (a, b) = (tickets(), tickets());
        let c = a.encrypt(b"x").unwrap();
        assert_eq!(b.decrypt(&c), None, "another gateway or incarnation");
        let mut bad = a.encrypt(b"x").unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(a.decrypt(&bad), None, "tampered");
        assert_eq!(a.decrypt(&[]), None);
        assert_eq!(a.decrypt(&[0; 5]), None);
    }

    #[test]
    fn keys_expire_within_the_ttl() {
        assert_eq!(
            Tickets::new(Duration::from_millis(400)).unwrap().lifetime(),
            1,
            "at least a second is announced"
        );
        let t = Tickets::new(Duration::from_secs(60)).unwrap();
        assert_eq!(t.lifetime(), 60);
        let c = t.encrypt(b"x").unwrap();
        // One rotation later the key no longer seals but still opens;
        // two later it is gone (times ahead of the real clock, which the
        // calls below then do not move).
        let start = read(&t.keys).since;
        t.roll(start + Duration::from_secs(30));
        let d = t.encrypt(b"y").unwrap();
        assert_ne!(c[0], d[0], "a new key seals");
        t.roll(start + Duration::from_secs(60));
        assert_eq!(t.decrypt(&c), None, "older than the ttl");
        assert!(t.decrypt(&d).is_some(), "younger than the ttl");
    }

    #[test]
    fn a_full_table_refuses_instead_of_forgetting() {
        let t = Tickets::with_capacity(Duration::from_secs(15), 2).unwrap();
        let c: Vec<_> = (0..3).map(|_| t.encrypt(b"x").unwrap()).collect();
        assert!(t.decrypt(&c[0]).is_some());
        assert!(t.decrypt(&c[1]).is_some());
        assert_eq!(t.decrypt(&c[2]), None, "full: refused");
        assert_eq!(t.decrypt(&c[0]), None, "and still remembered");
    }
}
