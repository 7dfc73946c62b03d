//! The one time type of every sans-IO core (engine, admission, membership):
//! nanoseconds on a monotonic clock since an origin the shell picks. Cores
//! take `now` as an argument and never read a clock.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the shell's monotonic clock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Mono(u64);

impl Mono {
    pub const ZERO: Mono = Mono(0);

    pub const fn from_nanos(ns: u64) -> Self {
        Mono(ns)
    }
    pub const fn from_millis(ms: u64) -> Self {
        Mono(ms.saturating_mul(1_000_000))
    }
    pub const fn as_nanos(self) -> u64 {
        self.0
    }
    pub const fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }
    /// `t` on a clock whose origin is `origin` (zero before it). Converts
    /// instants the shell read; reads no clock itself.
    pub fn between(origin: std::time::Instant, t: std::time::Instant) -> Self {
        Mono(u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX))
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Mono {
    type Output = Mono;
    fn add(self, d: Duration) -> Mono {
        Mono(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl Sub<Mono> for Mono {
    type Output = Duration;
    fn sub(self, earlier: Mono) -> Duration {
        self.saturating_since(earlier)
    }
}

/// Whole milliseconds, rounded up so a client waiting that long is never early.
pub fn ceil_millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}
