//! Anti-flap: at most `max_switches_per_min` committed switches in any 60 s
//! window, and `switch_cooldown_ms` between two of them. Only committed
//! switches count: attempts are already bounded by rate limits and counters.
//!
//! Only switches the client chose are governed by that budget: leaving a
//! transport the gateway still holds, or retrying such a switch after a
//! refusal. A RESUME after the transport was lost is a recovery, with a
//! budget of its own, [`RECOVERY_FACTOR`] times as large and without
//! cooldown: generous for flappy networks, still a bound on a client that
//! closes its transport to dodge the switch budget (design note 30).

use std::collections::VecDeque;
use std::time::Duration;

use super::fsm::Denial;
use super::policy::Policy;
use jvpn_proto::time::Mono;

pub const SWITCH_WINDOW: Duration = Duration::from_secs(60);
/// Recoveries allowed per window, as a multiple of `max_switches_per_min`.
pub const RECOVERY_FACTOR: usize = 4;

/// Times of the most recent committed switches (at most `max_switches_per_min`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AntiFlap {
    recent: VecDeque<Mono>,
    /// A switch was refused and none has committed since.
    held: bool,
    /// Times of the most recent recoveries (at most the recovery budget).
    recoveries: VecDeque<Mono>,
}

impl AntiFlap {
    /// Does anti-flap govern a switch that `replaces_live` transport? A
    /// recovery is governed only while a refused switch is pending.
    pub fn governs(&self, replaces_live: bool) -> bool {
        replaces_live || self.held
    }

    /// A governed switch was refused: its retries stay governed.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// May a switch commit at `now`? If not, why and for how long. Changes nothing.
    pub fn check(&self, now: Mono, p: &Policy) -> Result<(), (Denial, Duration)> {
        let cooldown_left = self
            .recent
            .back()
            .map(|last| (*last + p.switch_cooldown()).saturating_since(now))
            .unwrap_or_default();
        let max = p.max_switches_per_min as usize;
        if self.recent.len() >= max {
            // The switch that must leave the window before another may enter.
            if let Some(oldest) = self.recent.get(self.recent.len() - max) {
                let window_left = (*oldest + SWITCH_WINDOW).saturating_since(now);
                if !window_left.is_zero() {
                    return Err((Denial::SwitchRateLimited, window_left.max(cooldown_left)));
                }
            }
        }
        if !cooldown_left.is_zero() {
            return Err((Denial::CooldownActive, cooldown_left));
        }
        Ok(())
    }

    /// May a recovery commit at `now`? Changes nothing.
    pub fn check_recovery(&self, now: Mono, p: &Policy) -> Result<(), (Denial, Duration)> {
        let max = recovery_budget(p);
        if self.recoveries.len() >= max
            && let Some(oldest) = self.recoveries.get(self.recoveries.len() - max)
        {
            let left = (*oldest + SWITCH_WINDOW).saturating_since(now);
            if !left.is_zero() {
                return Err((Denial::SwitchRateLimited, left));
            }
        }
        Ok(())
    }

    /// Records a committed recovery.
    pub fn record_recovery(&mut self, now: Mono, p: &Policy) {
        while self.recoveries.len() >= recovery_budget(p).max(1) {
            self.recoveries.pop_front();
        }
        self.recoveries.push_back(now);
    }

    /// Records a committed switch.
    pub fn record(&mut self, now: Mono, p: &Policy) {
        self.held = false;
        while self.recent.len() >= (p.max_switches_per_min as usize).max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
    }

    /// Committed switches within the 60 s window ending at `now`.
    pub fn switches_in_window(&self, now: Mono) -> usize {
        self.recent
            .iter()
            .filter(|t| now.saturating_since(**t) < SWITCH_WINDOW)
            .count()
    }
}

fn recovery_budget(p: &Policy) -> usize {
    (p.max_switches_per_min as usize).saturating_mul(RECOVERY_FACTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Mono {
        Mono::from_millis(v)
    }

    #[test]
    fn cooldown_then_window() {
        let p = Policy {
            max_switches_per_min: 3,
            switch_cooldown_ms: 1000,
            ..Default::default()
        };
        let mut f = AntiFlap::default();
        assert_eq!(f.check(ms(0), &p), Ok(()));
        f.record(ms(0), &p);
        assert_eq!(
            f.check(ms(400), &p),
            Err((Denial::CooldownActive, Duration::from_millis(600)))
        );
        f.record(ms(1000), &p);
        f.record(ms(2000), &p);
        // Three in the window: the first leaves it at 60 s.
        assert_eq!(
            f.check(ms(3000), &p),
            Err((Denial::SwitchRateLimited, Duration::from_millis(57_000)))
        );
        assert_eq!(f.check(ms(60_000), &p), Ok(()));
        assert_eq!(f.switches_in_window(ms(3000)), 3);
        assert_eq!(f.switches_in_window(ms(61_500)), 1);
    }

    #[test]
    fn only_chosen_switches_and_their_retries_are_governed() {
        let p = Policy::default();
        let mut f = AntiFlap::default();
        assert!(f.governs(true));
        assert!(!f.governs(false));
        f.hold();
        assert!(f.governs(false), "the retry of a refused switch");
        f.record(ms(0), &p);
        assert!(!f.governs(false));
    }
}
