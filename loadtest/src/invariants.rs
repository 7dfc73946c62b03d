//! The four invariant counters of DESIGN §11, computed from agent reports
//! and the gateways' event streams.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use jvpn_agent::AgentReport;
use serde::Serialize;

/// Reasons that make a re-handshake explicit: the gateway said so.
pub const EXPLICIT_REASONS: &[&str] = &[
    "unknown_session",
    "owner_lost",
    "draining",
    "go_away",
    "superseded",
    "operator_terminated",
    "session_lifetime_exceeded",
    "transport_ttl_exceeded",
];

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Invariants {
    /// ResumeOk (or data) from another owner than the session's.
    pub silent_migrations: u64,
    /// New HELLOs while the owner was alive and had not said the session was gone.
    pub forced_rehandshakes: u64,
    /// One session ATTACHED on two incarnations at the same instant.
    pub dual_active_detected: u64,
    /// Sessions that ended without an explicit reason reaching the agent.
    pub lost_sessions: u64,
}

impl Invariants {
    pub fn all_zero(&self) -> bool {
        *self == Invariants::default()
    }
}

/// Counts from agent reports (`ended` = why each agent stopped; `agent_closed` is normal).
pub fn from_agents(reports: &[AgentReport]) -> Invariants {
    let mut inv = Invariants::default();
    for r in reports {
        inv.silent_migrations += r.silent_migration_attempts;
        for (why, n) in &r.rehandshake_reasons {
            if !EXPLICIT_REASONS.contains(&why.as_str()) {
                inv.forced_rehandshakes += n;
            }
        }
        match r.ended.as_deref() {
            None | Some("agent_closed") => {}
            Some(why) if EXPLICIT_REASONS.contains(&why) => {}
            Some(_) => inv.lost_sessions += 1,
        }
    }
    inv
}

/// Scans event files (JSON lines) for one session attached on two
/// incarnations at once, ordering by the monotonic stamps of each file
/// (one host: one monotonic clock). Returns (violations, events read).
pub fn dual_active(paths: &[&Path]) -> (u64, usize) {
    let mut evs: Vec<(u64, String, String, String)> = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["event_type"] != "SessionStateChange" {
                continue;
            }
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            evs.push((
                v["mono_ns"].as_u64().unwrap_or(0),
                s("session_id"),
                s("incarnation"),
                s("to"),
            ));
        }
    }
    evs.sort();
    let read = evs.len();
    let mut attached: HashMap<String, HashSet<String>> = HashMap::new();
    let mut dual = 0;
    for (_, sid, inc, to) in evs {
        let set = attached.entry(sid).or_default();
        if to == "attached" {
            set.insert(inc);
            if set.len() > 1 {
                dual += 1;
            }
        } else {
            set.remove(&inc);
        }
    }
    (dual, read)
}

/// Reasons of rejected resumes summed over agents.
pub fn rejected_by_reason(reports: &[AgentReport]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in reports {
        for (k, v) in &r.resumes_rejected {
            *out.entry(k.clone()).or_insert(0) += v;
        }
    }
    out
}
