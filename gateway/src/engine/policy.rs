//! Session policy: liveness, TTLs, anti-flap and replay window (DESIGN §10).

use std::time::Duration;

use jvpn_proto::pb::session::Policy as WirePolicy;
use serde::Deserialize;

use super::replay::MAX_WINDOW;

/// Per-session policy. Every duration key carries its unit.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Agent ping interval.
    pub heartbeat_interval_ms: u64,
    /// No frame for this long: the transport is retired.
    pub heartbeat_timeout_ms: u64,
    /// VOLATILE for this long: DEGRADED.
    pub volatile_to_degraded_ms: u64,
    /// No transport for this long: TERMINATED.
    pub transport_lost_ttl_ms: u64,
    /// Hard session lifetime.
    pub session_max_lifetime_ms: u64,
    /// Committed switches allowed in any 60 s window.
    pub max_switches_per_min: u32,
    /// Minimum time between two committed switches.
    pub switch_cooldown_ms: u64,
    /// RESUME counters remembered below the highest seen.
    pub replay_window: u32,
    /// Agents that listen for them get a keep-alive whenever the gateway
    /// has sent nothing for this long, and ping only to check in (design
    /// note 52). Unset: half of `heartbeat_timeout_ms`; 0: off, agents
    /// ping every `heartbeat_interval_ms`. At most half the timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_interval_ms: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 2_000,
            volatile_to_degraded_ms: 4_000,
            transport_lost_ttl_ms: 15_000,
            session_max_lifetime_ms: 8 * 3600 * 1000,
            max_switches_per_min: 8,
            switch_cooldown_ms: 1_500,
            replay_window: 128,
            keepalive_interval_ms: None,
        }
    }
}

/// A policy value that cannot work. Each variant names the offending key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The value must be at least 1.
    #[error("{field} must be greater than zero")]
    Zero { field: &'static str },
    /// The value lies outside its allowed range.
    #[error("{field} = {value} is outside {min}..={max}")]
    Range {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    /// The value must exceed another key's value.
    #[error("{field} = {value} must be greater than {other} = {other_value}")]
    Order {
        field: &'static str,
        value: u64,
        other: &'static str,
        other_value: u64,
    },
}

/// Every problem of one policy, printed one after another.
pub fn display_all(errs: &[PolicyError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicyError {
    /// The key at fault.
    pub fn field(&self) -> &'static str {
        match self {
            PolicyError::Zero { field }
            | PolicyError::Range { field, .. }
            | PolicyError::Order { field, .. } => field,
        }
    }
}

impl Policy {
    /// Checks every key; returns all problems, not just the first.
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut errs = Vec::new();
        let nonzero = [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("volatile_to_degraded_ms", self.volatile_to_degraded_ms),
            ("transport_lost_ttl_ms", self.transport_lost_ttl_ms),
            ("session_max_lifetime_ms", self.session_max_lifetime_ms),
            ("max_switches_per_min", u64::from(self.max_switches_per_min)),
            ("switch_cooldown_ms", self.switch_cooldown_ms),
            ("replay_window", u64::from(self.replay_window)),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                errs.push(PolicyError::Zero { field });
            }
        }
        let mut order = |field, value: u64, other, other_value: u64| {
            if value != 0 && other_value != 0 && value <= other_value {
                errs.push(PolicyError::Order {
                    field,
                    value,
                    other,
                    other_value,
                });
            }
        };
        order(
            "heartbeat_timeout_ms",
            self.heartbeat_timeout_ms,
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
        );
        order(
            "transport_lost_ttl_ms",
            self.transport_lost_ttl_ms,
            "heartbeat_timeout_ms",
            self.heartbeat_timeout_ms,
        );
        order(
            "session_max_lifetime_ms",
            self.session_max_lifetime_ms,
            "transport_lost_ttl_ms",
            self.transport_lost_ttl_ms,
        );
        if self.replay_window > MAX_WINDOW {
            errs.push(PolicyError::Range {
                field: "replay_window",
                value: u64::from(self.replay_window),
                min: 1,
                max: u64::from(MAX_WINDOW),
            });
        }
        // A keep-alive must have a second chance to arrive before the
        // agent's silence limit.
        let k_max = self.heartbeat_timeout_ms / 2;
        if let Some(k) = self.keepalive_interval_ms
            && k != 0
            && !(50..=k_max).contains(&k)
        {
            errs.push(PolicyError::Range {
                field: "keepalive_interval_ms",
                value: k,
                min: 50,
                max: k_max,
            });
        }
        // A switch budget no window can hold would deny every switch.
        if self.max_switches_per_min > 1_000 {
            errs.push(PolicyError::Range {
                field: "max_switches_per_min",
                value: u64::from(self.max_switches_per_min),
                min: 1,
                max: 1_000,
            });
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// `None`: no gateway keep-alives.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        match self.keepalive_interval_ms {
            Some(0) => None,
            Some(k) => Some(Duration::from_millis(k)),
            // Half the timeout, unless that is below the 50 ms an explicit
            // value may not go under.
            None => {
                let k = self.heartbeat_timeout_ms / 2;
                (k >= 50).then(|| Duration::from_millis(k))
            }
        }
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    pub fn volatile_to_degraded(&self) -> Duration {
        Duration::from_millis(self.volatile_to_degraded_ms)
    }
    pub fn transport_lost_ttl(&self) -> Duration {
        Duration::from_millis(self.transport_lost_ttl_ms)
    }
    pub fn session_max_lifetime(&self) -> Duration {
        Duration::from_millis(self.session_max_lifetime_ms)
    }
    pub fn switch_cooldown(&self) -> Duration {
        Duration::from_millis(self.switch_cooldown_ms)
    }

    /// What the agent is told in `HelloOk`.
    pub fn to_wire(&self) -> WirePolicy {
        WirePolicy {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            transport_lost_ttl_ms: self.transport_lost_ttl_ms,
            session_max_lifetime_ms: self.session_max_lifetime_ms,
            max_switches_per_min: self.max_switches_per_min,
            switch_cooldown_ms: self.switch_cooldown_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_design_defaults_and_valid() {
        let p = Policy::default();
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(
            (
                p.heartbeat_interval_ms,
                p.heartbeat_timeout_ms,
                p.volatile_to_degraded_ms
            ),
            (500, 2000, 4000)
        );
        assert_eq!(
            (p.transport_lost_ttl_ms, p.session_max_lifetime_ms),
            (15_000, 28_800_000)
        );
        assert_eq!(
            (
                p.max_switches_per_min,
                p.switch_cooldown_ms,
                p.replay_window
            ),
            (8, 1500, 128)
        );
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases: Vec<(Policy, &str)> = vec![
            (
                Policy {
                    heartbeat_interval_ms: 0,
                    ..Default::default()
                },
                "heartbeat_interval_ms",
            ),
            (
                Policy {
                    switch_cooldown_ms: 0,
                    ..Default::default()
                },
                "switch_cooldown_ms",
            ),
            (
                Policy {
                    max_switches_per_min: 0,
                    ..Default::default()
                },
                "max_switches_per_min",
            ),
            (
                Policy {
                    replay_window: 0,
                    ..Default::default()
                },
                "replay_window",
            ),
            (
                Policy {
                    replay_window: 300,
                    ..Default::default()
                },
                "replay_window",
            ),
            (
                Policy {
                    heartbeat_timeout_ms: 400,
                    ..Default::default()
                },
                "heartbeat_timeout_ms",
            ),
            (
                Policy {
                    transport_lost_ttl_ms: 1000,
                    ..Default::default()
                },
                "transport_lost_ttl_ms",
            ),
            (
                Policy {
                    session_max_lifetime_ms: 10_000,
                    ..Default::default()
                },
                "session_max_lifetime_ms",
            ),
        ];
        for (p, field) in cases {
            let errs = p.validate().expect_err(field);
            assert!(errs.iter().any(|e| e.field() == field), "{field}: {errs:?}");
            assert!(errs.iter().all(|e| e.to_string().contains(e.field())));
        }
    }

    #[test]
    fn several_errors_are_all_reported() {
        let p = Policy {
            heartbeat_interval_ms: 0,
            volatile_to_degraded_ms: 0,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().len(), 2);
    }
}
