//! TLS 1.3 resumption tickets (issue 17, design note 45): a reattaching
//! agent resumes its TLS session with the owner instead of a full
//! handshake with certificates on both sides.
//!
//! * Keys are random per process (so per incarnation, and never shared
//!   between gateways). A key seals for half `transport_lost_ttl` and
//!   opens until a whole one after it was made, so no ticket is accepted
//!   later than `transport_lost_ttl` after it was issued.
//! * Every ticket is accepted once: its nonce is remembered with its key
//!   and forgotten with it. A second use gets a full handshake, never a
//!   resumed session. The memory is bounded per key; when it is full,
//!   tickets are refused (full handshakes), never accepted unchecked.
//! * Tickets carry the TLS session's secret and the client's certificate
//!   chain, sealed with ChaCha20-Poly1305; they never reach logs.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::counter;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::server::ProducesTickets;

use crate::metrics as m;

/// Used tickets remembered per key at most (12-byte nonces: with the hash
/// table's overhead about 16 MiB per key when full).
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

/// One ticket key: seals for half the ttl from `since`, opens until a
/// whole ttl after `since` (so no ticket opens later than a ttl after it
/// was sealed), and remembers the nonces of the tickets it opened.
struct Key {
    key: LessSafeKey,
    since: Instant,
    used: HashSet<[u8; NONCE_LEN]>,
}

impl Key {
    fn random(since: Instant) -> Self {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
        Self {
            key: LessSafeKey::new(key),
            since,
            used: HashSet::new(),
        }
    }
}

struct Keys {
    /// Seals new tickets while younger than half the ttl.
    current: Key,
    /// The one before: opens only.
    previous: Option<Key>,
}

/// The gateway's ticketer: give it to rustls as `ServerConfig::ticketer`.
pub struct Tickets {
    keys: Mutex<Keys>,
    /// `transport_lost_ttl` in ms (changes with a policy reload).
    ttl_ms: AtomicU64,
    /// Used nonces remembered per key at most.
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
    /// Tickets accepted for at most `ttl` (`transport_lost_ttl`) after they
    /// were issued.
    pub fn new(ttl: Duration) -> Self {
        Self::with_capacity(ttl, USED_CAPACITY)
    }

    pub fn with_capacity(ttl: Duration, capacity: usize) -> Self {
        Self {
            keys: Mutex::new(Keys {
                current: Key::random(Instant::now()),
                previous: None,
            }),
            ttl_ms: AtomicU64::new(ttl_ms(ttl)),
            capacity,
        }
    }

    /// A reloaded `transport_lost_ttl`: keys already made expire by the
    /// new one too.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl_ms(ttl), Ordering::Relaxed);
    }

    /// Every ticket issued so far stops opening (a reload may have changed
    /// who is trusted: a resumed handshake does not verify the client's
    /// certificate again).
    pub fn forget_keys(&self) {
        let mut k = lock(&self.keys);
        k.current = Key::random(Instant::now());
        k.previous = None;
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Drops keys past their ttl and starts a new sealing key when the
    /// current one is half a ttl old. Called on every ticket and by the
    /// gateway's timer, so an idle gateway erases old keys too.
    pub fn roll(&self, now: Instant) {
        let ttl = self.ttl();
        let mut k = lock(&self.keys);
        if k.previous
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.since) >= ttl)
        {
            k.previous = None;
        }
        let age = now.saturating_duration_since(k.current.since);
        if age >= ttl / 2 {
            let old = std::mem::replace(&mut k.current, Key::random(now));
            k.previous = (age < ttl).then_some(old);
        }
    }

    fn refuse(r: TicketRefusal) -> Option<Vec<u8>> {
        counter!(m::TLS_TICKETS_REFUSED, "reason" => r.as_str()).increment(1);
        None
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(2)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    /// Whole seconds, rounded down (at least 1: the field cannot say
    /// less). A hint to clients: the gateway decides by its keys.
    fn lifetime(&self) -> u32 {
        let s = self.ttl_ms.load(Ordering::Relaxed) / 1000;
        u32::try_from(s).unwrap_or(u32::MAX).max(1)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, Instant::now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, Instant::now())
    }
}

impl Tickets {
    fn seal_at(&self, plain: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.roll(now);
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        lock(&self.keys)
            .current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open_at(&self, cipher: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.roll(now);
        let ttl = self.ttl();
        if cipher.len() < NONCE_LEN {
            return Self::refuse(TicketRefusal::Unknown);
        }
        let (nonce, sealed) = cipher.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let mut k = lock(&self.keys);
        let Keys { current, previous } = &mut *k;
        for key in std::iter::once(current).chain(previous.as_mut()) {
            // Past its ttl it opens nothing, even before `roll` dropped it.
            if now.saturating_duration_since(key.since) >= ttl {
                continue;
            }
            let mut body = sealed.to_vec();
            let Ok(n) = key
                .key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
                .map(|p| p.len())
            else {
                continue;
            };
            // Only an authentic ticket is remembered: garbage cannot fill
            // the table. Under the same lock as the check: two
            // connections presenting one ticket at once get one resume.
            if key.used.contains(&nonce) {
                return Self::refuse(TicketRefusal::Reused);
            }
            if key.used.len() >= self.capacity {
                return Self::refuse(TicketRefusal::TableFull);
            }
            key.used.insert(nonce);
            body.truncate(n);
            return Some(body);
        }
        Self::refuse(TicketRefusal::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn tickets() -> (Tickets, Instant) {
        let t = Tickets::new(TTL);
        let start = lock(&t.keys).current.since;
        (t, start)
    }

    fn at(start: Instant, ttl_fraction: f64) -> Instant {
        start + TTL.mul_f64(ttl_fraction)
    }

    #[test]
    fn a_ticket_opens_once() {
        let (t, _) = tickets();
        let c = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&c).as_deref(), Some(&b"session state"[..]));
        assert_eq!(t.decrypt(&c), None, "a second use");
    }

    #[test]
    fn another_processes_ticket_and_tampering_are_refused() {
        let ((a, _), (b, _)) = (tickets(), tickets());
        let c = a.encrypt(b"x").unwrap();
        assert_eq!(b.decrypt(&c), None, "another gateway or incarnation");
        let mut bad = a.encrypt(b"x").unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(a.decrypt(&bad), None, "tampered");
        assert_eq!(a.decrypt(&[]), None);
        assert_eq!(a.decrypt(&[0; 5]), None);
    }

    /// No ticket opens a ttl or more after it was sealed, whenever the
    /// keys happened to roll (here: late, at 0.95 of a ttl).
    #[test]
    fn no_ticket_opens_a_ttl_after_it_was_sealed() {
        let (t, start) = tickets();
        let early = t.seal_at(b"x", start).unwrap();
        let late = t.seal_at(b"y", at(start, 0.49)).unwrap();
        let next = t.seal_at(b"z", at(start, 0.95)).unwrap();
        let next2 = t.seal_at(b"w", at(start, 0.96)).unwrap();
        assert!(
            t.open_at(&late, at(start, 0.99)).is_some(),
            "younger than a ttl"
        );
        assert_eq!(t.open_at(&early, at(start, 1.0)), None, "a ttl old");
        assert_eq!(t.open_at(&early, at(start, 1.45)), None);
        assert!(
            t.open_at(&next, at(start, 1.45)).is_some(),
            "sealed by the next key"
        );
        assert_eq!(
            t.open_at(&next2, at(start, 1.95)),
            None,
            "a ttl after that key"
        );
        // A shorter ttl by reload applies to keys already made.
        let (t, start) = tickets();
        let c = t.seal_at(b"x", start).unwrap();
        t.set_ttl(TTL / 4);
        assert_eq!(t.open_at(&c, at(start, 0.25)), None);
    }

    #[test]
    fn forgotten_keys_open_nothing() {
        let (t, _) = tickets();
        let c = t.encrypt(b"x").unwrap();
        t.forget_keys();
        assert_eq!(t.decrypt(&c), None);
        assert!(t.decrypt(&t.encrypt(b"y").unwrap()).is_some());
    }

    #[test]
    fn an_idle_roll_erases_expired_keys() {
        let (t, start) = tickets();
        t.roll(at(start, 0.5));
        assert!(lock(&t.keys).previous.is_some());
        t.roll(at(start, 1.0));
        let k = lock(&t.keys);
        assert!(
            k.previous.as_ref().is_none_or(|p| p.since > start),
            "the first key is gone"
        );
    }

    #[test]
    fn a_full_table_refuses_instead_of_forgetting() {
        let t = Tickets::with_capacity(TTL, 2);
        let c: Vec<_> = (0..3).map(|_| t.encrypt(b"x").unwrap()).collect();
        assert!(t.decrypt(&c[0]).is_some());
        assert!(t.decrypt(&c[1]).is_some());
        assert_eq!(t.decrypt(&c[2]), None, "full: refused");
        assert_eq!(t.decrypt(&c[0]), None, "and still remembered");
    }

    #[test]
    fn lifetime_is_announced_in_whole_seconds() {
        assert_eq!(Tickets::new(Duration::from_millis(400)).lifetime(), 1);
        assert_eq!(Tickets::new(Duration::from_millis(15_900)).lifetime(), 15);
    }
}
