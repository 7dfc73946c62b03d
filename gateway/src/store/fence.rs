//! The self-fence of topology 3 (sans-IO): when a gateway must stop serving
//! its store-backed sessions.
//!
//! A lease is never proof of ownership by itself (etcd can revoke one
//! early, issue 12528/15247), so the gateway stops on whichever comes
//! first: its local deadline (send time of the last answered keep-alive +
//! TTL − margin, on the monotonic clock, so a late answer cannot stretch
//! it) or an answer saying the lease is gone (TTL 0). Once fenced under a
//! lease it never serves under that lease again, whatever arrives later.

use std::time::Duration;

use jvpn_proto::Mono;

/// What a keep-alive answer did to the fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Serving until the (possibly later) deadline.
    Renewed { deadline: Mono },
    /// The lease is gone or the deadline passed first: fenced for good.
    Fenced,
}

/// One lease's fence.
#[derive(Clone, Debug)]
pub struct LeaseFence {
    ttl: Duration,
    margin: Duration,
    deadline: Option<Mono>,
    fenced: bool,
}

impl LeaseFence {
    /// A fence for a lease of `ttl` (what was asked for), stopping `margin`
    /// before its end.
    pub fn new(ttl: Duration, margin: Duration) -> Self {
        Self {
            ttl,
            margin,
            deadline: None,
            fenced: false,
        }
    }

    /// The grant request was sent at `sent` and etcd granted `granted_s`
    /// seconds.
    pub fn granted(&mut self, now: Mono, sent: Mono, granted_s: i64) -> Renewal {
        self.renewed(now, sent, granted_s)
    }

    /// A keep-alive sent at `sent` was answered, at `now`, with `ttl_s`
    /// seconds (0: the lease is gone).
    pub fn renewed(&mut self, now: Mono, sent: Mono, ttl_s: i64) -> Renewal {
        if !self.serving(now) && self.deadline.is_some() {
            self.fenced = true;
        }
        if self.fenced || ttl_s <= 0 {
            self.fenced = true;
            return Renewal::Fenced;
        }
        // The shorter of what we asked for and what etcd granted.
        let granted = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(0)).min(self.ttl);
        let until = sent + granted.saturating_sub(self.margin);
        let deadline = self.deadline.map_or(until, |d| d.max(until));
        if now >= deadline {
            self.fenced = true;
            return Renewal::Fenced;
        }
        self.deadline = Some(deadline);
        Renewal::Renewed { deadline }
    }

    /// May the gateway serve store-backed sessions at `now`?
    pub fn serving(&self, now: Mono) -> bool {
        !self.fenced && self.deadline.is_some_and(|d| now < d)
    }

    /// When serving ends unless renewed.
    pub fn deadline(&self) -> Option<Mono> {
        if self.fenced { None } else { self.deadline }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Mono {
        Mono::from_millis(v)
    }

    fn fence() -> LeaseFence {
        LeaseFence::new(Duration::from_secs(2), Duration::from_millis(300))
    }

    #[test]
    fn the_deadline_runs_from_the_send_time_of_the_last_answered_keepalive() {
        let mut f = fence();
        assert!(!f.serving(ms(0)), "nothing granted yet");
        assert_eq!(
            f.granted(ms(10), ms(0), 2),
            Renewal::Renewed { deadline: ms(1700) }
        );
        // Answered late: the deadline follows the send time, not the answer.
        assert_eq!(
            f.renewed(ms(1600), ms(600), 2),
            Renewal::Renewed { deadline: ms(2300) }
        );
        assert!(f.serving(ms(2299)));
        assert!(!f.serving(ms(2300)));
    }

    #[test]
    fn an_answer_after_the_deadline_never_revives_the_lease() {
        let mut f = fence();
        f.granted(ms(0), ms(0), 2);
        // The keep-alive was sent in time but answered after the deadline.
        assert_eq!(f.renewed(ms(1800), ms(1000), 2), Renewal::Fenced);
        assert!(!f.serving(ms(1801)));
        assert_eq!(f.renewed(ms(1900), ms(1850), 2), Renewal::Fenced);
        assert_eq!(f.deadline(), None);
    }

    #[test]
    fn a_lease_reported_gone_fences_at_once() {
        let mut f = fence();
        f.granted(ms(0), ms(0), 2);
        assert_eq!(f.renewed(ms(500), ms(400), 0), Renewal::Fenced);
        assert!(!f.serving(ms(501)), "well before the local deadline");
        assert_eq!(f.renewed(ms(600), ms(550), 2), Renewal::Fenced);
    }

    #[test]
    fn a_longer_grant_than_asked_does_not_stretch_the_deadline() {
        let mut f = fence();
        assert_eq!(
            f.granted(ms(0), ms(0), 60),
            Renewal::Renewed { deadline: ms(1700) }
        );
    }

    #[test]
    fn an_older_answer_does_not_pull_the_deadline_back() {
        let mut f = fence();
        f.granted(ms(0), ms(0), 2);
        f.renewed(ms(900), ms(800), 2);
        // Answers can arrive out of order; the later send time wins.
        assert_eq!(
            f.renewed(ms(950), ms(400), 2),
            Renewal::Renewed { deadline: ms(2500) }
        );
    }
}
