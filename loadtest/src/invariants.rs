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
    /// One session ATTACHED on two incarnations at the same instant;
    /// `None` (JSON `null`): not checked.
    pub dual_active_detected: Option<u64>,
    /// Sessions that ended without an explicit reason reaching the agent.
    pub lost_sessions: u64,
}

impl Invariants {
    /// Each counter by name (a check that was not made counts 0).
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("silent_migrations", self.silent_migrations),
            ("forced_rehandshakes", self.forced_rehandshakes),
            (
                "dual_active_detected",
                self.dual_active_detected.unwrap_or(0),
            ),
            ("lost_sessions", self.lost_sessions),
        ]
    }

    /// No violation found (a check that was not made finds none).
    pub fn all_zero(&self) -> bool {
        self.counts().iter().all(|(_, n)| *n == 0)
    }

    /// `dual_active_detected` for people: a number, or "not checked".
    pub fn dual_active_text(&self) -> String {
        self.dual_active_detected
            .map_or_else(|| "not checked".to_owned(), |n| n.to_string())
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

/// What [`dual_active`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DualActive {
    /// Sessions seen attached on two incarnations at once; `None`: not
    /// checked (some event had no stamp comparable across processes).
    pub violations: Option<u64>,
    /// State-change events read.
    pub events: usize,
}

/// Scans event files (JSON lines) for one session attached on two
/// incarnations at once. Events of different processes are ordered by
/// `host_mono_ns` (the host's CLOCK_MONOTONIC, one clock for every process
/// on it); `mono_ns` counts from each process's own start and cannot be
/// compared across files. Events without `host_mono_ns` (a gateway older
/// than the stamp) make the answer "not checked".
pub fn dual_active(paths: &[&Path]) -> DualActive {
    let lives: Vec<(&Path, Option<u64>)> = paths.iter().map(|p| (*p, None)).collect();
    dual_active_until(&lives)
}

/// [`dual_active`] over each file with the host clock time its process
/// died, if it was killed: a SIGKILLed process writes no final events, yet
/// holds nothing after its death (a taker may attach its sessions then).
pub fn dual_active_until(lives: &[(&Path, Option<u64>)]) -> DualActive {
    let mut evs: Vec<(u64, String, String, String)> = Vec::new();
    let mut unstamped = 0;
    for (p, died) in lives {
        let Ok(text) = std::fs::read_to_string(p) else {
            // A file not read is not a file without violations.
            unstamped += 1;
            continue;
        };
        let mut held: HashSet<(String, String)> = HashSet::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["event_type"] != "SessionStateChange" {
                continue;
            }
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            let Some(at) = v["host_mono_ns"].as_u64() else {
                unstamped += 1;
                continue;
            };
            if died.is_some() {
                held.insert((s("session_id"), s("incarnation")));
            }
            evs.push((at, s("session_id"), s("incarnation"), s("to")));
        }
        if let Some(at) = died {
            for (sid, inc) in held {
                evs.push((*at, sid, inc, "died".into()));
            }
        }
    }
    evs.sort();
    let events = evs.len() + unstamped;
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
    DualActive {
        violations: (unstamped == 0).then_some(dual),
        events,
    }
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

/// Why a demo's RESUMEs were refused, one line per reason, for people
/// reading its summary: most refusals are the protocol doing its job
/// around the faults the demo injects, not errors.
pub fn explain_rejections(by_reason: &BTreeMap<String, u64>) -> Vec<String> {
    by_reason
        .iter()
        .map(|(reason, n)| format!("{reason} {n}: {}", why_rejected(reason)))
        .collect()
}

fn why_rejected(reason: &str) -> &'static str {
    match reason {
        "owner_lost" => {
            "the router knows the owner is gone (the killed gateway): the agent re-handshakes, explicitly; expected once per session it held"
        }
        "owner_unreachable" => {
            "the owner was dying but not yet declared dead (with a shared store: its lease not yet ended at etcd): the agent retries, then gets owner_lost (or is taken over); expected right after the kill"
        }
        "cooldown_active" | "switch_rate_limited" => {
            "anti-flap: the jump came sooner than the policy allows; the agent waits the hinted time and resumes; expected with forced jumps"
        }
        "stale_binding" => {
            "a RESUME overtaken by a newer one of the same session; the newer binding holds, nothing is lost"
        }
        "unknown_session" | "transport_ttl_exceeded" => {
            "the session had already ended on that gateway; the agent re-handshakes"
        }
        "connect_failed" | "tls_failed" | "transport_dead" => {
            "the connection broke before the RESUME was answered (a router restarting, a gateway dying); the agent tries again"
        }
        "overloaded" | "no_gateway" | "rate_limited" => {
            "a router or gateway shed load for a moment (restart, storm); retried after the hinted time"
        }
        _ => "see the reason codes in docs/protocol.md",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_the_demos_cause_is_explained() {
        let seen: BTreeMap<String, u64> = [
            "owner_lost",
            "owner_unreachable",
            "cooldown_active",
            "switch_rate_limited",
            "stale_binding",
            "unknown_session",
            "overloaded",
            "tls_failed",
            "connect_failed",
        ]
        .into_iter()
        .map(|r| (r.to_owned(), 1))
        .collect();
        let lines = explain_rejections(&seen);
        assert_eq!(lines.len(), seen.len());
        for l in &lines {
            assert!(!l.contains("docs/protocol.md"), "unexplained: {l}");
        }
        let other: BTreeMap<String, u64> = [("bad_proof".to_owned(), 2)].into();
        assert!(explain_rejections(&other)[0].contains("docs/protocol.md"));
    }

    fn event(sid: &str, inc: &str, to: &str, mono_ns: u64, host_ns: Option<u64>) -> String {
        let mut v = serde_json::json!({
            "event_type": "SessionStateChange",
            "session_id": sid,
            "incarnation": inc,
            "to": to,
            "mono_ns": mono_ns,
        });
        if let Some(h) = host_ns {
            v["host_mono_ns"] = h.into();
        }
        v.to_string() + "\n"
    }

    fn files(a: &[String], b: &[String]) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let pa = d.path().join("a.jsonl");
        let pb = d.path().join("b.jsonl");
        std::fs::write(&pa, a.concat()).unwrap();
        std::fs::write(&pb, b.concat()).unwrap();
        (d, vec![pa, pb])
    }

    /// Issue 18 T1: two processes' `mono_ns` count from different origins,
    /// so ordering by them can hide an overlap. Here g1's life attaches the
    /// session at host time 100 and detaches it at 300; g2's attaches it at
    /// host time 200, inside that window, although its own `mono_ns` (from
    /// a later process start) is smaller than all of g1's.
    #[test]
    fn an_overlap_between_processes_is_found_on_the_host_clock() {
        let g1 = [
            event("s1", "a", "attached", 5_000, Some(100)),
            event("s1", "a", "volatile", 5_200, Some(300)),
        ];
        let g2 = [event("s1", "b", "attached", 10, Some(200))];
        let (_d, paths) = files(&g1, &g2);
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let r = dual_active(&paths);
        assert_eq!((r.violations, r.events), (Some(1), 3));
        // Once g1 let go first, there is no overlap.
        let g2 = [event("s1", "b", "attached", 10, Some(400))];
        let (_d, paths) = files(&g1, &g2);
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        assert_eq!(dual_active(&paths).violations, Some(0));
    }

    /// A SIGKILLed owner's last events leave its sessions attached; past
    /// its death a taker attaching them is no overlap, before it is one.
    #[test]
    fn a_killed_process_holds_nothing_after_its_death() {
        let g1 = [event("s1", "a", "attached", 5_000, Some(100))];
        let g2 = [event("s1", "b", "attached", 10, Some(400))];
        let (_d, paths) = files(&g1, &g2);
        let (a, b) = (paths[0].as_path(), paths[1].as_path());
        assert_eq!(dual_active(&[a, b]).violations, Some(1));
        assert_eq!(
            dual_active_until(&[(a, Some(300)), (b, None)]).violations,
            Some(0)
        );
        assert_eq!(
            dual_active_until(&[(a, Some(500)), (b, None)]).violations,
            Some(1)
        );
    }

    /// Without a host clock stamp (an older gateway) the check cannot be
    /// made: "not checked", never 0.
    #[test]
    fn events_without_a_host_clock_are_not_checked() {
        let g1 = [event("s1", "a", "attached", 5_000, None)];
        let (_d, paths) = files(&g1, &[]);
        let paths: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let r = dual_active(&paths);
        assert_eq!((r.violations, r.events), (None, 1));
    }
}
