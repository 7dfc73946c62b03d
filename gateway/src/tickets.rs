//! TLS 1.3 resumption tickets (issue 17, design notes 45 and 51): a
//! reattaching agent resumes its TLS session with the owner instead of a
//! full handshake with certificates on both sides.
//!
//! * Keys are random per process (so per incarnation, and never shared
//!   between gateways). A key seals for half `transport_lost_ttl`. A
//!   ticket on the wire is a random nonce and its ciphertext, nothing
//!   else; the gateway finds the key by the nonce in its table, so
//!   opening is one lookup however many keys are still needed.
//! * A ticket is good for as long as the session its connection came to
//!   carry lives (the engine ends a session `transport_lost_ttl` after its
//!   transport was lost, and at its lifetime), so the ticket of a connection
//!   that was up for hours still resumes when a NAT reset cuts it. A
//!   connection that never carried a session gives a ticket good for
//!   `transport_lost_ttl` from its issue.
//! * Every ticket is accepted once: the gateway remembers the tickets it
//!   issued until they are used or their session is gone, and a second use
//!   gets a full handshake, never a resumed session. The table is bounded;
//!   when it is full no ticket is issued (full handshakes), none is
//!   accepted unchecked.
//! * Tickets carry the TLS session's secret and the client's certificate
//!   chain, sealed with ChaCha20-Poly1305; they never reach logs.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use jvpn_proto::SessionId;
use metrics::counter;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::server::ProducesTickets;

use crate::metrics as m;

/// Tickets remembered at most (issued and not yet forgotten: about 150
/// bytes each with the table's overhead).
pub const ISSUED_CAPACITY: usize = 1 << 20;

/// The longest lifetime a TLS 1.3 ticket may announce (RFC 8446 §4.6.1).
const MAX_ANNOUNCED_S: u64 = 7 * 24 * 3600;

/// Why a ticket was not accepted (metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketRefusal {
    /// Already used once.
    Reused,
    /// Not sealed by a key this process still holds (another gateway, an
    /// earlier incarnation, a reload since, or garbage).
    Unknown,
    /// Authentic, but its session has ended (or, for a connection that
    /// carried none, `transport_lost_ttl` has passed).
    Expired,
    /// The table of issued tickets is full: no ticket was issued.
    TableFull,
}

impl TicketRefusal {
    pub const ALL: [TicketRefusal; 4] =
        [Self::Reused, Self::Unknown, Self::Expired, Self::TableFull];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reused => "reused",
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::TableFull => "table_full",
        }
    }
}

/// The connection a ticket was issued on, and the session it came to
/// carry once its first frame was accepted.
#[derive(Debug)]
pub struct Connection {
    session: OnceLock<SessionId>,
    /// When it was accepted: a handshake begun before a reload ran under
    /// the old TLS configuration (perhaps the old agent CA).
    began: Instant,
}

impl Default for Connection {
    fn default() -> Self {
        Self::begun_at(Instant::now())
    }
}

impl Connection {
    fn begun_at(began: Instant) -> Self {
        Self {
            session: OnceLock::new(),
            began,
        }
    }
}

tokio::task_local! {
    /// The connection whose handshake is being driven by this task: rustls
    /// makes the ticket inside that poll, with no way to say for whom.
    static CONNECTION: Arc<Connection>;
}

/// Runs one accepted connection's task (handshake, first frame, hand-over
/// to the session loop) as that connection, so the ticket issued in its
/// handshake is tied to it.
pub async fn on_connection<F: Future>(f: F) -> F::Output {
    CONNECTION.scope(Arc::default(), f).await
}

/// The connection this task drives now carries `sid`: its ticket is good
/// for as long as that session lives. Outside [`on_connection`], nothing.
pub fn carries(sid: SessionId) {
    let _ = CONNECTION.try_with(|c| c.session.set(sid));
}

struct Issued {
    /// The key that sealed it. Kept here, not in the ticket: an id on the
    /// wire would show which tickets were issued in the same key window.
    key: u32,
    connection: Arc<Connection>,
    at: Instant,
    used: Option<Instant>,
}

/// One ticket key.
struct Key {
    key: LessSafeKey,
    since: Instant,
    /// Remembered tickets it sealed: at 0 (and not current) it goes.
    tickets: usize,
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
            tickets: 0,
        }
    }
}

struct Keys {
    /// Seals new tickets while younger than half the ttl.
    current: u32,
    next_id: u32,
    /// Every key that may still open a ticket, the current one included.
    by_id: HashMap<u32, Key>,
    /// Every ticket remembered, by its nonce (random, so unique).
    issued: HashMap<[u8; NONCE_LEN], Issued>,
    /// When these keys replaced the previous ones at a reload: handshakes
    /// begun before it get no ticket.
    since_reload: Option<Instant>,
}

impl Keys {
    fn fresh(now: Instant) -> Self {
        let mut k = Self {
            current: 0,
            next_id: 0,
            by_id: HashMap::new(),
            issued: HashMap::new(),
            since_reload: None,
        };
        k.start_key(now);
        k
    }

    fn start_key(&mut self, now: Instant) {
        self.next_id = self.next_id.wrapping_add(1);
        self.by_id.insert(self.next_id, Key::random(now));
        self.current = self.next_id;
    }

    fn forget(&mut self, nonce: &[u8; NONCE_LEN]) {
        if let Some(t) = self.issued.remove(nonce)
            && let Some(k) = self.by_id.get_mut(&t.key)
        {
            k.tickets -= 1;
        }
    }
}

/// Whether a session is still alive (not ended): the engine's answer.
type Liveness = Box<dyn Fn(&SessionId) -> bool + Send + Sync>;

/// The gateway's ticketer: give it to rustls as `ServerConfig::ticketer`.
pub struct Tickets {
    keys: Mutex<Keys>,
    /// `transport_lost_ttl` in ms (changes with a policy reload).
    ttl_ms: AtomicU64,
    /// `session_max_lifetime` in ms: no session, so no ticket, outlives it.
    max_life_ms: AtomicU64,
    /// Tickets remembered at most.
    capacity: usize,
    live: OnceLock<Liveness>,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("ttl_ms", &self.ttl_ms.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// `ttl`: `transport_lost_ttl`; `max_life`: `session_max_lifetime`.
    pub fn new(ttl: Duration, max_life: Duration) -> Self {
        Self::with_capacity(ttl, max_life, ISSUED_CAPACITY)
    }

    pub fn with_capacity(ttl: Duration, max_life: Duration, capacity: usize) -> Self {
        Self {
            keys: Mutex::new(Keys::fresh(Instant::now())),
            ttl_ms: AtomicU64::new(ms(ttl)),
            max_life_ms: AtomicU64::new(ms(max_life)),
            capacity,
            live: OnceLock::new(),
        }
    }

    /// How to ask whether a session is alive (set once, by the gateway).
    pub fn set_liveness(&self, live: impl Fn(&SessionId) -> bool + Send + Sync + 'static) {
        let _ = self.live.set(Box::new(live));
    }

    /// Reloaded `transport_lost_ttl` and `session_max_lifetime`: they apply
    /// to tickets already issued too.
    pub fn set_limits(&self, ttl: Duration, max_life: Duration) {
        self.ttl_ms.store(ms(ttl), Ordering::Relaxed);
        self.max_life_ms.store(ms(max_life), Ordering::Relaxed);
    }

    /// Every ticket issued so far stops opening (a reload may have changed
    /// who is trusted: a resumed handshake does not verify the client's
    /// certificate again).
    ///
    /// Call it before the new TLS configuration is installed (no old
    /// ticket resumes under the new one), and [`Tickets::reloaded`] after.
    pub fn forget_keys(&self) {
        *lock(&self.keys) = Keys::fresh(Instant::now());
    }

    /// The new TLS configuration is in: handshakes begun before now ran
    /// with the old one (perhaps an agent CA the reload removed) and get no
    /// ticket.
    pub fn reloaded(&self) {
        lock(&self.keys).since_reload = Some(Instant::now());
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn max_life(&self) -> Duration {
        Duration::from_millis(self.max_life_ms.load(Ordering::Relaxed))
    }

    /// Whether an unused ticket may still be accepted, `dead` being the
    /// sessions known to have ended: while its session lives, or for a ttl
    /// when its connection carried none (or no liveness was set).
    fn good(&self, t: &Issued, now: Instant, dead: &dyn Fn(&SessionId) -> bool) -> bool {
        match t.connection.session.get() {
            Some(sid) if self.live.get().is_some() => !dead(sid),
            _ => now.saturating_duration_since(t.at) < self.ttl(),
        }
    }

    fn alive(&self, sid: &SessionId) -> bool {
        self.live.get().is_none_or(|live| live(sid))
    }

    /// Starts a new sealing key when the current one is half a ttl old,
    /// and then forgets what can no longer be accepted: tickets whose
    /// session ended, unused ones of a connection that a newer one of the
    /// same session has superseded, used ones a ttl after their use (a
    /// replay is then refused as unknown rather than reused), and keys
    /// with nothing left to open or older than any session can live.
    /// Called on every ticket and by the gateway's timer, so an idle
    /// gateway forgets too. The engine is asked about sessions with the
    /// table unlocked: handshakes do not wait for it.
    pub fn roll(&self, now: Instant) {
        let ttl = self.ttl();
        let oldest = self.max_life() + ttl * 2;
        let sessions: Vec<SessionId> = {
            let mut k = lock(&self.keys);
            let age = k
                .by_id
                .get(&k.current)
                .map_or(ttl, |c| now.saturating_duration_since(c.since));
            if age < ttl / 2 {
                return;
            }
            k.start_key(now);
            let mut sids: Vec<SessionId> = k
                .issued
                .values()
                .filter(|t| t.used.is_none())
                .filter_map(|t| t.connection.session.get().copied())
                .collect();
            sids.sort_unstable_by_key(|s| *s.as_bytes());
            sids.dedup();
            sids
        };
        let dead: std::collections::HashSet<SessionId> =
            sessions.into_iter().filter(|s| !self.alive(s)).collect();
        let mut k = lock(&self.keys);
        let current = k.current;
        let expired: Vec<u32> = k
            .by_id
            .iter()
            .filter(|(id, key)| {
                **id != current && now.saturating_duration_since(key.since) >= oldest
            })
            .map(|(id, _)| *id)
            .collect();
        // Per session, its newest connection: an agent keeps only the
        // tickets of its last connection, so older unused ones (the spare
        // of each earlier reattach) would only fill the table. By
        // connection, not by time: a connection's two tickets are made a
        // moment apart.
        let mut newest: HashMap<SessionId, (Instant, *const Connection)> = HashMap::new();
        for t in k.issued.values() {
            if let Some(sid) = t.connection.session.get() {
                let n = newest
                    .entry(*sid)
                    .or_insert((t.at, Arc::as_ptr(&t.connection)));
                if t.at > n.0 {
                    *n = (t.at, Arc::as_ptr(&t.connection));
                }
            }
        }
        let superseded = |t: &Issued| {
            t.connection
                .session
                .get()
                .and_then(|sid| newest.get(sid))
                .is_some_and(|n| !std::ptr::eq(n.1, Arc::as_ptr(&t.connection)))
        };
        let gone: Vec<[u8; NONCE_LEN]> = k
            .issued
            .iter()
            .filter(|(_, t)| {
                expired.contains(&t.key)
                    || match t.used {
                        Some(at) => now.saturating_duration_since(at) >= ttl,
                        None => superseded(t) || !self.good(t, now, &|s| dead.contains(s)),
                    }
            })
            .map(|(n, _)| *n)
            .collect();
        for n in &gone {
            k.forget(n);
        }
        k.by_id
            .retain(|id, key| *id == current || (key.tickets > 0 && !expired.contains(id)));
    }

    fn refuse(r: TicketRefusal) -> Option<Vec<u8>> {
        counter!(m::TLS_TICKETS_REFUSED, "reason" => r.as_str()).increment(1);
        None
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(2)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    /// How long a client keeps a ticket: as long as a session can live
    /// (plus a ttl), in whole seconds, at most the protocol's 7 days. A
    /// hint: the gateway decides by its table.
    fn lifetime(&self) -> u32 {
        let s = (self.max_life() + self.ttl()).as_secs();
        u32::try_from(s.clamp(1, MAX_ANNOUNCED_S)).unwrap_or(u32::MAX)
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
        let connection = CONNECTION.try_with(Arc::clone).unwrap_or_default();
        let mut k = lock(&self.keys);
        if k.since_reload.is_some_and(|r| connection.began < r) {
            // Begun under the configuration a reload replaced.
            return None;
        }
        if k.issued.len() >= self.capacity {
            return Self::refuse(TicketRefusal::TableFull);
        }
        let nonce = loop {
            let mut n = [0u8; NONCE_LEN];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut n);
            if !k.issued.contains_key(&n) {
                break n;
            }
        };
        let id = k.current;
        let key = k.by_id.get_mut(&id)?;
        let mut body = plain.to_vec();
        key.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .ok()?;
        key.tickets += 1;
        k.issued.insert(
            nonce,
            Issued {
                key: id,
                connection,
                at: now,
                used: None,
            },
        );
        let mut out = Vec::with_capacity(NONCE_LEN + body.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open_at(&self, cipher: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.roll(now);
        if cipher.len() < NONCE_LEN {
            return Self::refuse(TicketRefusal::Unknown);
        }
        let (nonce, sealed) = cipher.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        // Authentic and unused? (Its session is asked about unlocked.)
        let (body, session) = {
            let k = lock(&self.keys);
            let Some(t) = k.issued.get(&nonce) else {
                return Self::refuse(TicketRefusal::Unknown);
            };
            if t.used.is_some() {
                return Self::refuse(TicketRefusal::Reused);
            }
            let Some(key) = k.by_id.get(&t.key) else {
                return Self::refuse(TicketRefusal::Unknown);
            };
            let mut body = sealed.to_vec();
            let Ok(n) = key
                .key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
                .map(|p| p.len())
            else {
                return Self::refuse(TicketRefusal::Unknown);
            };
            body.truncate(n);
            (body, t.connection.session.get().copied())
        };
        let alive = session.is_none_or(|s| self.alive(&s));
        // Check and use under one lock: two connections presenting one
        // ticket at once get one resumption.
        let mut k = lock(&self.keys);
        let verdict = match k.issued.get_mut(&nonce) {
            None => Err(TicketRefusal::Unknown),
            Some(t) if t.used.is_some() => Err(TicketRefusal::Reused),
            Some(t) if self.good(t, now, &|_| !alive) => {
                t.used = Some(now);
                Ok(())
            }
            Some(_) => {
                k.forget(&nonce);
                Err(TicketRefusal::Expired)
            }
        };
        match verdict {
            Ok(()) => Some(body),
            Err(r) => Self::refuse(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const TTL: Duration = Duration::from_secs(60);
    const LIFE: Duration = Duration::from_secs(3600);

    fn tickets() -> (Tickets, Instant) {
        let t = Tickets::new(TTL, LIFE);
        let start = {
            let k = lock(&t.keys);
            k.by_id[&k.current].since
        };
        (t, start)
    }

    fn at(start: Instant, ttl_fraction: f64) -> Instant {
        start + TTL.mul_f64(ttl_fraction)
    }

    /// Sessions alive, as the engine would answer.
    fn sessions(t: &Tickets) -> Arc<Mutex<HashSet<SessionId>>> {
        let alive = Arc::new(Mutex::new(HashSet::new()));
        let a = alive.clone();
        t.set_liveness(move |sid| lock(&a).contains(sid));
        alive
    }

    /// Seals as the handshake of a connection that then carries `sid`.
    fn sealed_for(t: &Tickets, sid: SessionId, now: Instant) -> Vec<u8> {
        let c = Arc::new(Connection::default());
        let ticket = CONNECTION
            .sync_scope(c.clone(), || t.seal_at(b"state", now))
            .unwrap();
        CONNECTION.sync_scope(c, || carries(sid));
        ticket
    }

    /// The two tickets of one connection, made at `a` and `b`.
    fn sealed_pair(t: &Tickets, sid: SessionId, a: Instant, b: Instant) -> (Vec<u8>, Vec<u8>) {
        let c = Arc::new(Connection::default());
        let pair = CONNECTION.sync_scope(c.clone(), || {
            (
                t.seal_at(b"state", a).unwrap(),
                t.seal_at(b"state", b).unwrap(),
            )
        });
        CONNECTION.sync_scope(c, || carries(sid));
        pair
    }

    fn remembered(t: &Tickets) -> (usize, usize) {
        let k = lock(&t.keys);
        (k.issued.len(), k.by_id.len())
    }

    /// A reload drops every key, and a handshake still under way when it
    /// came ran with the old TLS configuration (perhaps the agent CA the
    /// reload removed): it gets no ticket under the new keys either.
    #[test]
    fn a_handshake_begun_before_a_reload_gets_no_ticket() {
        let (t, _) = tickets();
        let now = Instant::now();
        let before = Arc::new(Connection::begun_at(now - Duration::from_secs(1)));
        t.forget_keys();
        t.reloaded();
        let sealed = CONNECTION.sync_scope(before, || t.seal_at(b"state", now));
        assert!(
            sealed.is_none(),
            "a ticket for a handshake begun before the reload"
        );
        let after = Arc::new(Connection::begun_at(
            Instant::now() + Duration::from_secs(1),
        ));
        let sealed = CONNECTION.sync_scope(after, || t.seal_at(b"state", now));
        let ticket = sealed.expect("a handshake begun after the reload gets its ticket");
        assert!(t.open_at(&ticket, now).is_some());
    }

    #[test]
    fn a_ticket_opens_once() {
        let (t, _) = tickets();
        let c = t.encrypt(b"session state").unwrap();
        // On the wire in each ClientHello: a random nonce and the sealed
        // state, nothing shared with the window's other tickets.
        assert_eq!(c.len(), NONCE_LEN + b"session state".len() + 16);
        assert_eq!(t.decrypt(&c).as_deref(), Some(&b"session state"[..]));
        assert_eq!(t.decrypt(&c), None, "a second use");
    }

    #[test]
    fn another_processes_ticket_and_tampering_are_refused() {
        let ((a, _), (b, _)) = (tickets(), tickets());
        let c = a.encrypt(b"x").unwrap();
        assert_eq!(b.decrypt(&c), None, "another gateway or incarnation");
        for i in [0, NONCE_LEN] {
            let mut bad = a.encrypt(b"x").unwrap();
            bad[i] ^= 1;
            assert_eq!(a.decrypt(&bad), None, "tampered at {i}");
        }
        let mut bad = a.encrypt(b"x").unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(a.decrypt(&bad), None, "tampered");
        assert_eq!(a.decrypt(&[]), None);
        assert_eq!(a.decrypt(&[0; 5]), None);
    }

    /// Two sessions the engine (`sessions`) calls alive.
    fn two_live_sessions(t: &Tickets) -> (Arc<Mutex<HashSet<SessionId>>>, SessionId, SessionId) {
        let alive = sessions(t);
        let (s1, s2) = (
            SessionId::from_bytes([1; 16]),
            SessionId::from_bytes([2; 16]),
        );
        lock(&alive).extend([s1, s2]);
        (alive, s1, s2)
    }

    /// The issue's storm: a connection up for longer than the ttl is cut;
    /// its ticket resumes because its session lives, however often the
    /// keys rolled meanwhile; once the session ended it does not.
    #[test]
    fn a_ticket_opens_while_its_session_lives() {
        let (t, start) = tickets();
        let (alive, s1, s2) = two_live_sessions(&t);
        let c1 = sealed_for(&t, s1, start);
        let c2 = sealed_for(&t, s2, start);
        for i in 1..=20 {
            t.roll(at(start, f64::from(i) * 0.5));
        }
        assert!(
            t.open_at(&c1, at(start, 10.0)).is_some(),
            "ten ttls later, its session alive"
        );
        lock(&alive).remove(&s2);
        assert_eq!(t.open_at(&c2, at(start, 10.0)), None, "its session ended");
        assert_eq!(t.open_at(&c1, at(start, 10.1)), None, "used once");
    }

    /// A connection that never carried a session (a refused RESUME, say):
    /// its ticket opens for a ttl from its issue, whenever keys roll.
    #[test]
    fn a_ticket_of_no_session_opens_for_a_ttl() {
        let (t, start) = tickets();
        let _ = sessions(&t);
        let early = t.seal_at(b"x", start).unwrap();
        let late = t.seal_at(b"y", at(start, 0.49)).unwrap();
        let next = t.seal_at(b"z", at(start, 0.95)).unwrap();
        assert!(
            t.open_at(&late, at(start, 1.48)).is_some(),
            "younger than a ttl"
        );
        assert_eq!(t.open_at(&early, at(start, 1.0)), None, "a ttl old");
        assert_eq!(t.open_at(&next, at(start, 1.95)), None, "a ttl old");
        // A shorter ttl by reload applies to tickets already issued.
        let (t, start) = tickets();
        let c = t.seal_at(b"x", start).unwrap();
        t.set_limits(TTL / 4, LIFE);
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

    /// What can no longer open is forgotten, with the keys left empty: the
    /// table follows the live sessions, not every connection ever made.
    #[test]
    fn rolling_forgets_what_can_no_longer_open() {
        let (t, start) = tickets();
        let (alive, s1, s2) = two_live_sessions(&t);
        let keep = sealed_for(&t, s1, start);
        let _gone = sealed_for(&t, s2, start);
        let used = t.seal_at(b"u", start).unwrap();
        let _unbound = t.seal_at(b"n", start).unwrap();
        assert!(t.open_at(&used, at(start, 0.1)).is_some());
        assert_eq!(remembered(&t), (4, 1));
        lock(&alive).remove(&s2);
        t.roll(at(start, 0.5));
        assert_eq!(remembered(&t).0, 3, "the ended session's ticket");
        t.roll(at(start, 1.2));
        assert_eq!(
            remembered(&t),
            (1, 2),
            "a ttl on: the used and the unbound ones; the key that sealed the \
             live session's ticket stays, the empty one between goes"
        );
        lock(&alive).remove(&s1);
        t.roll(at(start, 1.7));
        assert_eq!(remembered(&t), (0, 1), "only the sealing key is left");
        assert_eq!(t.open_at(&keep, at(start, 1.8)), None);
    }

    /// Each reattach leaves the spare ticket of the connection before; the
    /// table keeps only the tickets of a session's newest connection.
    #[test]
    fn a_newer_connection_supersedes_the_tickets_of_older_ones() {
        let (t, start) = tickets();
        let alive = sessions(&t);
        let s = SessionId::from_bytes([1; 16]);
        lock(&alive).insert(s);
        let old = sealed_pair(&t, s, start, start);
        let newer = sealed_pair(&t, s, at(start, 0.1), at(start, 0.11));
        let unbound = t.seal_at(b"n", start).unwrap();
        t.roll(at(start, 0.5));
        assert_eq!(remembered(&t).0, 3);
        assert_eq!(t.open_at(&old.0, at(start, 0.6)), None, "superseded");
        assert_eq!(t.open_at(&old.1, at(start, 0.6)), None, "superseded");
        assert!(t.open_at(&newer.0, at(start, 0.6)).is_some(), "the newest");
        assert!(t.open_at(&newer.1, at(start, 0.6)).is_some(), "its spare");
        assert!(t.open_at(&unbound, at(start, 0.6)).is_some());
    }

    #[test]
    fn no_key_outlives_the_longest_session() {
        let (t, start) = tickets();
        let alive = sessions(&t);
        let s = SessionId::from_bytes([1; 16]);
        lock(&alive).insert(s);
        let c = sealed_for(&t, s, start);
        let end = start + LIFE + TTL * 2;
        t.roll(end);
        assert_eq!(t.open_at(&c, end), None);
        assert_eq!(remembered(&t), (0, 1));
    }

    #[test]
    fn a_full_table_issues_no_ticket() {
        let t = Tickets::with_capacity(TTL, LIFE, 2);
        let c: Vec<_> = (0..2).map(|_| t.encrypt(b"x").unwrap()).collect();
        assert_eq!(t.encrypt(b"x"), None, "full: no ticket");
        assert!(t.decrypt(&c[0]).is_some());
        assert_eq!(t.decrypt(&c[0]), None, "used tickets stay remembered");
        assert_eq!(t.encrypt(b"x"), None, "so still full");
    }

    #[test]
    fn lifetime_covers_the_longest_session() {
        let t = Tickets::new(Duration::from_millis(15_900), Duration::from_secs(8 * 3600));
        assert_eq!(t.lifetime(), 8 * 3600 + 15);
        let t = Tickets::new(TTL, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(t.lifetime(), 7 * 24 * 3600, "at most 7 days");
    }
}
