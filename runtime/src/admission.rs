//! Admission before TLS work: per-source token buckets in a bounded table,
//! and a gateway-wide handshake budget with a share reserved for RESUMEs.
//!
//! Sans-IO like the engine: every call takes `now`. Sources are keyed by the
//! TCP-validated address only (IPv4 /32, IPv6 /64), never by anything the
//! client claims. The table has a hard capacity and a randomly keyed hasher;
//! when full, buckets that have refilled (indistinguishable from new ones)
//! are evicted first, and if none can be, unknown sources share one overflow
//! bucket while known sources keep theirs: the table fails closed without
//! shutting everyone out.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::time::Duration;

use jvpn_proto::time::Mono;

/// A token bucket: `rate` tokens per second up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    tokens: f64,
    last: Mono,
}

impl Bucket {
    pub fn full(burst: f64, now: Mono) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Mono) {
        let dt = now.saturating_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = self.last.max(now);
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, rate: f64, burst: f64, now: Mono) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(secs((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket would be full now: then it is no different from
    /// a new one and can be forgotten.
    pub fn is_refilled(&self, rate: f64, burst: f64, now: Mono) -> bool {
        let dt = now.saturating_since(self.last).as_secs_f64();
        self.tokens + dt * rate >= burst
    }
}

/// `x` seconds, saturating: a tiny or zero rate means "a very long time",
/// never a panic (`Duration::from_secs_f64` panics past `Duration::MAX`).
fn secs(x: f64) -> Duration {
    Duration::try_from_secs_f64(x).unwrap_or(Duration::MAX)
}

/// The key a source is limited by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => SourceKey::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// Outcome of a per-source check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Admit,
    /// Admitted through the shared overflow bucket (table full).
    AdmitOverflow,
    /// Refused; retry after this long.
    Limit(Duration),
    /// Refused by the shared overflow bucket.
    LimitOverflow(Duration),
}

impl Verdict {
    pub fn admitted(self) -> bool {
        matches!(self, Verdict::Admit | Verdict::AdmitOverflow)
    }
    pub fn overflow(self) -> bool {
        matches!(self, Verdict::AdmitOverflow | Verdict::LimitOverflow(_))
    }
}

/// Per-source buckets with a hard capacity.
#[derive(Debug)]
pub struct SourceLimiter {
    rate: f64,
    burst: f64,
    capacity: usize,
    table: HashMap<SourceKey, Bucket, RandomState>,
    overflow: Bucket,
    /// No sweep before this time (sweeps are O(n); at most one per refill period).
    next_sweep: Mono,
}

impl SourceLimiter {
    pub fn new(rate: f64, burst: u32, capacity: usize, now: Mono) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            capacity: capacity.max(1),
            table: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), RandomState::new()),
            overflow: Bucket::full(burst, now),
            next_sweep: now,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// New rate, burst and capacity (a reload). Known sources keep their
    /// buckets, clamped to the new burst, so a reload never refills anyone.
    pub fn reconfigure(&mut self, rate: f64, burst: u32, capacity: usize) {
        let burst = f64::from(burst.max(1));
        self.rate = rate;
        self.burst = burst;
        self.capacity = capacity.max(1);
        for b in self.table.values_mut() {
            b.tokens = b.tokens.min(burst);
        }
        self.overflow.tokens = self.overflow.tokens.min(burst);
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn check(&mut self, key: SourceKey, now: Mono) -> Verdict {
        let (rate, burst) = (self.rate, self.burst);
        if let Some(b) = self.table.get_mut(&key) {
            return match b.take(rate, burst, now) {
                Ok(()) => Verdict::Admit,
                Err(d) => Verdict::Limit(d),
            };
        }
        if self.table.len() >= self.capacity && now >= self.next_sweep {
            self.table.retain(|_, b| !b.is_refilled(rate, burst, now));
            self.next_sweep = now + secs(burst / rate);
        }
        if self.table.len() < self.capacity {
            let mut b = Bucket::full(burst, now);
            let r = b.take(rate, burst, now);
            self.table.insert(key, b);
            return match r {
                Ok(()) => Verdict::Admit,
                Err(d) => Verdict::Limit(d),
            };
        }
        match self.overflow.take(rate, burst, now) {
            Ok(()) => Verdict::AdmitOverflow,
            Err(d) => Verdict::LimitOverflow(d),
        }
    }
}

/// Kind of handshake asking for budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    Hello,
    Resume,
}

/// Gateway-wide handshakes per second. RESUMEs draw from a reserved bucket
/// first, then the shared one; HELLOs only from the shared one, so a HELLO
/// flood cannot starve reattaching sessions.
#[derive(Debug)]
pub struct HandshakeBudget {
    shared: (Bucket, f64),
    /// `None` when no share is reserved (`resume_share = 0`).
    reserved: Option<(Bucket, f64)>,
}

impl HandshakeBudget {
    pub fn new(per_s: f64, resume_share: f64, now: Mono) -> Self {
        let reserved_rate = (per_s * resume_share).max(0.0);
        let shared_rate = (per_s - reserved_rate).max(f64::MIN_POSITIVE);
        // One second of burst each.
        Self {
            shared: (Bucket::full(shared_rate.max(1.0), now), shared_rate),
            reserved: (reserved_rate > 0.0)
                .then(|| (Bucket::full(reserved_rate.max(1.0), now), reserved_rate)),
        }
    }

    pub fn take(&mut self, kind: HandshakeKind, now: Mono) -> Result<(), Duration> {
        if kind == HandshakeKind::Resume
            && let Some((rb, rr)) = &mut self.reserved
            && rb.take(*rr, rr.max(1.0), now).is_ok()
        {
            return Ok(());
        }
        let (sb, sr) = &mut self.shared;
        sb.take(*sr, sr.max(1.0), now)
    }
}

/// The waiting room in front of the TLS handshake slots.
///
/// A connection refused with `overloaded` comes back as a new TCP connection,
/// preamble and PROXY header, so in a reattach storm refusals cost more than
/// waiting: a short fixed wait turned 10,000 simultaneous RESUMEs into a
/// retry livelock. Connections therefore queue (FIFO, bounded in length and
/// in wait) and are refused only when the queue is full or would take longer
/// than `max_wait` to drain at the measured completion rate. The refusal's
/// retry hint is that drain time, so clients come back when there is room.
#[derive(Debug)]
pub struct TlsQueue {
    max_waiting: usize,
    max_wait: Duration,
    waiting: usize,
    /// Handshakes finished per second (EWMA over 250 ms windows).
    rate: f64,
    window_start: Mono,
    window_done: u32,
}

/// Completion-rate window of [`TlsQueue`].
const RATE_WINDOW: Duration = Duration::from_millis(250);
/// Shortest retry hint, so refused clients do not come straight back.
const MIN_HINT: Duration = Duration::from_millis(100);

impl TlsQueue {
    pub fn new(max_waiting: usize, max_wait: Duration, now: Mono) -> Self {
        Self {
            max_waiting,
            max_wait,
            waiting: 0,
            rate: 0.0,
            window_start: now,
            window_done: 0,
        }
    }

    /// New bounds (a reload); connections already waiting stay.
    pub fn reconfigure(&mut self, max_waiting: usize, max_wait: Duration) {
        self.max_waiting = max_waiting;
        self.max_wait = max_wait;
    }

    /// Longest a connection waits for a slot.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// How long the queue takes to drain at the measured rate (`None` before
    /// any handshake finished).
    pub fn drain_time(&self) -> Option<Duration> {
        (self.rate > 0.0).then(|| Duration::from_secs_f64(self.waiting as f64 / self.rate))
    }

    /// The retry hint for a refused connection.
    pub fn hint(&self) -> Duration {
        self.drain_time().unwrap_or(self.max_wait).max(MIN_HINT)
    }

    /// Joins the queue, or says how long to stay away.
    pub fn enter(&mut self, now: Mono) -> Result<(), Duration> {
        self.roll(now);
        let too_slow = self.drain_time().is_some_and(|d| d > self.max_wait);
        if self.waiting >= self.max_waiting || too_slow {
            return Err(self.hint());
        }
        self.waiting += 1;
        Ok(())
    }

    /// Leaves the queue (a slot was granted, or the wait ran out).
    pub fn leave(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    /// A handshake released its slot.
    pub fn completed(&mut self, now: Mono) {
        self.roll(now);
        self.window_done = self.window_done.saturating_add(1);
    }

    fn roll(&mut self, now: Mono) {
        let dt = now.saturating_since(self.window_start);
        if dt < RATE_WINDOW {
            return;
        }
        let observed = f64::from(self.window_done) / dt.as_secs_f64();
        // A window with nothing waiting says nothing about capacity.
        if self.window_done > 0 || self.waiting > 0 {
            self.rate = if self.rate == 0.0 {
                observed
            } else {
                0.5 * self.rate + 0.5 * observed
            };
        }
        self.window_start = now;
        self.window_done = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Mono {
        Mono::from_millis(v)
    }

    #[test]
    fn bucket_rate_and_burst() {
        let mut l = SourceLimiter::new(10.0, 5, 100, ms(0));
        let k = SourceKey::V4(1);
        for _ in 0..5 {
            assert_eq!(l.check(k, ms(0)), Verdict::Admit);
        }
        assert!(matches!(l.check(k, ms(0)), Verdict::Limit(d) if d == Duration::from_millis(100)));
        assert_eq!(l.check(k, ms(100)), Verdict::Admit);
        // Over 10 s exactly 100 more are admitted (rate 10/s).
        let admitted = (0..10_000)
            .filter(|i| l.check(k, ms(100 + i)).admitted())
            .count();
        assert!((99..=101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn full_table_fails_closed_but_known_sources_keep_their_buckets() {
        let mut l = SourceLimiter::new(1.0, 2, 3, ms(0));
        for i in 0..3 {
            assert_eq!(l.check(SourceKey::V4(i), ms(0)), Verdict::Admit);
        }
        // Unknown sources now share one overflow bucket (burst 2).
        assert_eq!(l.check(SourceKey::V4(10), ms(0)), Verdict::AdmitOverflow);
        assert_eq!(l.check(SourceKey::V4(11), ms(0)), Verdict::AdmitOverflow);
        assert!(matches!(
            l.check(SourceKey::V4(12), ms(0)),
            Verdict::LimitOverflow(_)
        ));
        // A known source is unaffected.
        assert_eq!(l.check(SourceKey::V4(1), ms(0)), Verdict::Admit);
        assert_eq!(l.len(), 3);
        // Once buckets refill they are evicted and new sources get their own.
        assert_eq!(l.check(SourceKey::V4(20), ms(5_000)), Verdict::Admit);
        assert!(l.len() <= 3);
    }

    #[test]
    fn reconfigure_keeps_known_buckets_and_never_refills_them() {
        let mut l = SourceLimiter::new(10.0, 5, 100, ms(0));
        let k = SourceKey::V4(1);
        for _ in 0..5 {
            assert_eq!(l.check(k, ms(0)), Verdict::Admit);
        }
        // A bigger burst after a reload: the empty bucket stays empty.
        l.reconfigure(10.0, 50, 100);
        assert!(matches!(l.check(k, ms(0)), Verdict::Limit(_)));
        // And it now refills up to the new burst.
        let admitted = (0..60)
            .filter(|_| l.check(k, ms(10_000)).admitted())
            .count();
        assert_eq!(admitted, 50);
        // A smaller one clamps.
        l.reconfigure(10.0, 2, 100);
        let admitted = (0..10)
            .filter(|_| l.check(k, ms(20_000)).admitted())
            .count();
        assert_eq!(admitted, 2);
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(SourceKey::from(a), SourceKey::from(b));
        assert_ne!(SourceKey::from(a), SourceKey::from(c));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            SourceKey::from(m),
            SourceKey::from("10.0.0.1".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn resumes_keep_their_reserved_share_under_a_hello_flood() {
        let mut b = HandshakeBudget::new(100.0, 0.5, ms(0));
        let hellos = (0..1_000)
            .filter(|i| b.take(HandshakeKind::Hello, ms(*i)).is_ok())
            .count();
        let mut b2 = HandshakeBudget::new(100.0, 0.5, ms(0));
        let mut resumes = 0;
        for i in 0..1_000 {
            let _ = b2.take(HandshakeKind::Hello, ms(i));
            if b2.take(HandshakeKind::Resume, ms(i)).is_ok() {
                resumes += 1;
            }
        }
        // 1 s at 50/s shared (+ burst 50) for HELLOs; RESUMEs still get their 50/s (+ burst).
        assert!((95..=105).contains(&hellos), "{hellos}");
        assert!(resumes >= 95, "{resumes}");
    }

    #[test]
    fn tls_queue_is_bounded_in_length() {
        let mut q = TlsQueue::new(3, Duration::from_secs(1), ms(0));
        for _ in 0..3 {
            assert!(q.enter(ms(0)).is_ok());
        }
        // Full: refused, and before any completion the hint is the max wait.
        assert_eq!(q.enter(ms(0)), Err(Duration::from_secs(1)));
        q.leave();
        assert!(q.enter(ms(0)).is_ok());
        assert_eq!(q.waiting(), 3);
    }

    #[test]
    fn tls_queue_refuses_what_it_could_not_serve_in_time_and_hints_the_drain_time() {
        let mut q = TlsQueue::new(10_000, Duration::from_secs(1), ms(0));
        // One second at balance: 100 handshakes/s arrive and finish.
        for i in 0..100u64 {
            assert!(q.enter(ms(i * 10)).is_ok());
            q.leave();
            q.completed(ms(i * 10 + 5));
        }
        // Then ten times as many arrive as finish.
        let mut refused = None;
        for i in 0..5_000u64 {
            let t = 1_000 + i;
            if i % 10 == 0 {
                q.leave();
                q.completed(ms(t));
            }
            if let Err(hint) = q.enter(ms(t)) {
                refused = Some((q.waiting(), hint, t));
                break;
            }
        }
        let (waiting, hint, t) = refused.expect("the queue must start refusing");
        // About one second of work queued at 100/s, and a hint of that order.
        assert!((90..=140).contains(&waiting), "waiting {waiting} at {t} ms");
        assert!(
            (Duration::from_millis(900)..=Duration::from_millis(1_400)).contains(&hint),
            "{hint:?}"
        );
    }

    #[test]
    fn tls_queue_hint_is_never_below_the_floor() {
        let mut q = TlsQueue::new(1, Duration::from_secs(1), ms(0));
        for i in 0..1_000 {
            q.completed(ms(i));
        }
        assert!(q.enter(ms(1_000)).is_ok());
        assert_eq!(q.enter(ms(1_000)), Err(MIN_HINT));
    }

    /// The limiter admits what it is configured to, within ±5 %, on a
    /// virtual clock: the burst at once, then the rate, for several shapes.
    #[test]
    fn limiter_fidelity_within_five_percent_of_rate_and_burst() {
        for (rate, burst) in [
            (1.0, 1u32),
            (10.0, 5),
            (50.0, 100),
            (200.0, 20),
            (1_000.0, 2_000),
        ] {
            let mut l = SourceLimiter::new(rate, burst, 16, ms(0));
            let k = SourceKey::V4(7);
            // Burst: exactly `burst` at one instant.
            let at_once = (0..burst * 3)
                .filter(|_| l.check(k, ms(0)).admitted())
                .count();
            assert_eq!(at_once, burst as usize, "burst at rate {rate}");
            // Rate: offered every 100 µs for 60 virtual seconds.
            let mut admitted = 0u64;
            for step in 1..=600_000u64 {
                if l.check(k, Mono::from_nanos(step * 100_000)).admitted() {
                    admitted += 1;
                }
            }
            let want = rate * 60.0;
            let err = (admitted as f64 - want).abs() / want;
            assert!(
                err <= 0.05,
                "rate {rate}: {admitted} admitted in 60 s, want {want} ±5 %"
            );
        }
        // The gateway-wide handshake budget too (RESUMEs: reserved + shared).
        let mut b = HandshakeBudget::new(400.0, 0.25, ms(0));
        let (mut hellos, mut resumes) = (0u64, 0u64);
        for step in 1..=600_000u64 {
            let t = Mono::from_nanos(step * 100_000);
            hellos += u64::from(b.take(HandshakeKind::Hello, t).is_ok());
            resumes += u64::from(b.take(HandshakeKind::Resume, t).is_ok());
        }
        let total = (hellos + resumes) as f64;
        assert!(
            (total - 400.0 * 60.0).abs() / (400.0 * 60.0) <= 0.05,
            "{hellos} + {resumes}"
        );
        assert!(
            resumes as f64 >= 0.95 * 100.0 * 60.0,
            "reserved share kept: {resumes}"
        );
    }

    /// Issue 18 H3: `admission.resume_share = 0` (documented as valid)
    /// made the second RESUME compute a wait of 1 / f64::MIN_POSITIVE
    /// seconds, which panics in `Duration::from_secs_f64`.
    #[test]
    fn a_zero_resume_share_or_a_tiny_rate_never_panics() {
        let mut b = HandshakeBudget::new(10.0, 0.0, ms(0));
        let mut admitted = 0;
        for i in 0..100 {
            if b.take(HandshakeKind::Resume, ms(i)).is_ok() {
                admitted += 1;
            }
        }
        // 10/s for 100 ms after a one-second burst, all from the shared bucket.
        assert!((10..=12).contains(&admitted), "{admitted}");
        let mut tiny = Bucket::full(1.0, ms(0));
        assert!(tiny.take(f64::MIN_POSITIVE, 1.0, ms(0)).is_ok());
        let wait = tiny.take(f64::MIN_POSITIVE, 1.0, ms(0)).unwrap_err();
        assert!(wait >= Duration::from_secs(3600), "{wait:?}");
    }
}
