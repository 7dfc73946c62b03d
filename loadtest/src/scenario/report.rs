//! What a run reports: latencies, flood outcomes, the JSON report and the
//! threshold expressions checked against it.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::invariants::Invariants;

/// What a flood did (`handshake-flood`, `replay-flood`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodReport {
    pub attempts: u64,
    /// HELLOs that got a session / replays that were accepted (must be 0).
    pub admitted: u64,
    pub refused: u64,
    /// Refusals answered with the pre-TLS status, before any TLS work.
    pub refused_before_tls: u64,
    /// Refusals by reason (pre-TLS status or reject reason).
    pub refused_by_reason: BTreeMap<String, u64>,
    /// `replay-flood`: the targeted session resumed normally afterwards.
    pub victim_resumed_after: Option<bool>,
    /// Gateway CPU time per attempt, local clusters only.
    pub gateway_cpu_us_per_attempt: Option<f64>,
    /// How much the local gateways' RSS grew over the run, in KiB.
    pub gateway_rss_growth_kib: Option<i64>,
}

/// HDR percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub(super) fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

pub(super) fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant figures.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid HDR bounds"))
}

/// The JSON report (`docs/loadtest.md` describes every field).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub schema: &'static str,
    pub scenario: String,
    /// What was loaded: a local cluster's size, or the routers' addresses.
    pub target: String,
    /// When the run started (UTC, RFC 3339).
    pub started_at: String,
    /// `pass` or `fail`, as the exit code says.
    pub verdict: &'static str,
    /// Each failed check (see [`RunReport::failures`]); empty on a pass.
    pub failures: Vec<String>,
    pub seed: u64,
    pub sessions_requested: usize,
    pub sessions_established: u64,
    pub rate_requested_per_s: f64,
    pub rate_achieved_per_s: f64,
    pub duration_s: f64,
    pub handshake_ms: Latency,
    pub resume_ms: Latency,
    pub echo_rtt_ms: Latency,
    pub recovery_ms: Latency,
    pub resumes_ok: u64,
    /// RESUMEs whose TLS resumed from a ticket (design note 45).
    pub resumes_tls_resumed: u64,
    pub rehandshakes: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// Echoes with no answer within 10 s on a live session.
    pub echo_failed: u64,
    /// Echoes whose transport died under them (the session then resumed).
    pub echo_lost: u64,
    /// Connections the fault proxies cut (`--loss-pct`), so a run can show
    /// its faults really happened.
    pub connections_cut: u64,
    #[serde(flatten)]
    pub invariants: Invariants,
    /// Gateway state-change events read for `dual_active_detected` (local
    /// clusters, after the gateways stopped cleanly).
    pub events_checked: usize,
    /// A local cluster of two gateways or more: `dual_active_detected`
    /// must have been checked for the run to pass.
    #[serde(skip)]
    pub dual_active_required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<FloodReport>,
    /// `bulk`: what the streams saw (stream_bytes, stream_bytes_lost, ...).
    #[serde(flatten)]
    pub streams: Option<crate::streamload::StreamStats>,
    /// Local clusters: CPU over the scenario window (after every session
    /// was established), so `steady` with no echoes is the idle cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<WindowCpu>,
    pub thresholds: Vec<ThresholdResult>,
    /// Per latency: `[upper bound ms, count]` on doubling buckets from 0.25 ms.
    pub histograms: BTreeMap<String, Vec<(f64, u64)>>,
    /// Up to 8 sample sessions: `[ms since the run started, what]`.
    pub timeline: Vec<SampleTimeline>,
}

/// `t` as an RFC 3339 UTC timestamp with milliseconds
/// (`2026-12-04T17:08:43.123Z`).
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let ns = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    jvpn_gateway::timeline::format_time(ns)
}

impl RunReport {
    /// Every check the run failed, by name and value: invariant counters,
    /// stream bytes lost or duplicated, thresholds. Empty: the run passed.
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .invariants
            .counts()
            .into_iter()
            .chain(self.streams.iter().flat_map(|s| {
                [
                    ("stream_bytes_lost", s.stream_bytes_lost),
                    ("stream_bytes_duplicated", s.stream_bytes_duplicated),
                ]
            }))
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        if self.dual_active_required && self.invariants.dual_active_detected.is_none() {
            out.push("dual_active_detected not checked".into());
        }
        out.extend(self.scenario_failures());
        out.extend(
            self.thresholds
                .iter()
                .filter(|t| !t.ok)
                .map(|t| match t.value {
                    v if v.is_nan() => format!("threshold {} (not measured)", t.expr),
                    v => format!("threshold {} (was {v})", t.expr),
                }),
        );
        out
    }

    /// What the scenario itself promises (docs/loadtest.md, "Scenarios"),
    /// beyond the invariants every run keeps.
    fn scenario_failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.scenario.as_str() {
            "replay-flood" => match &self.flood {
                Some(f) => {
                    if f.admitted > 0 {
                        out.push(format!("replays accepted = {}", f.admitted));
                    }
                    match f.victim_resumed_after {
                        Some(true) => {}
                        Some(false) => out.push("victim_resumed_after = false".into()),
                        None => out.push("victim_resumed_after not checked".into()),
                    }
                }
                None => out.push("flood not measured".into()),
            },
            "scale-out" if self.rehandshakes > 0 => {
                out.push(format!("rehandshakes = {}", self.rehandshakes));
            }
            "failover" => {
                // Only the dead owner's sessions re-handshake, and say why.
                let explicit = self
                    .errors_by_reason
                    .get("rehandshake:owner_lost")
                    .copied()
                    .unwrap_or(0);
                if self.rehandshakes > explicit {
                    out.push(format!(
                        "rehandshakes other than owner_lost = {}",
                        self.rehandshakes - explicit
                    ));
                }
            }
            "bulk" => match &self.streams {
                // Nothing ends a bulk run's sessions: every stream must
                // complete, and bytes must have moved.
                Some(s) => {
                    if s.stream_bytes == 0 {
                        out.push("stream_bytes = 0 (no transfer completed)".into());
                    }
                    if s.streams_failed > 0 {
                        out.push(format!("streams_failed = {}", s.streams_failed));
                    }
                    if s.streams_reset_explicitly > 0 {
                        out.push(format!(
                            "streams_reset_explicitly = {}",
                            s.streams_reset_explicitly
                        ));
                    }
                }
                None => out.push("streams not measured".into()),
            },
            _ => {}
        }
        out
    }

    /// What `run` prints for people: what ran, the main figures, the most
    /// frequent errors, each threshold, and one verdict line last.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let lat = |l: &Latency| {
            if l.count == 0 {
                "none".to_owned()
            } else {
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({})",
                    l.p50, l.p99, l.max, l.count
                )
            }
        };
        let i = &self.invariants;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "run {} (seed {}) against {}, started {}, {:.1} s",
            self.scenario, self.seed, self.target, self.started_at, self.duration_s
        );
        let _ = writeln!(
            o,
            "{} of {} sessions established, {:.1}/s of {:.1}/s requested",
            self.sessions_established,
            self.sessions_requested,
            self.rate_achieved_per_s,
            self.rate_requested_per_s
        );
        let _ = writeln!(o, "handshake {}", lat(&self.handshake_ms));
        let _ = writeln!(o, "resume    {}", lat(&self.resume_ms));
        let _ = writeln!(o, "recovery  {}", lat(&self.recovery_ms));
        let _ = writeln!(
            o,
            "resumes {} ({} resumed TLS), re-handshakes {}, echoes failed {}, connections cut {}",
            self.resumes_ok,
            self.resumes_tls_resumed,
            self.rehandshakes,
            self.echo_failed,
            self.connections_cut
        );
        if let Some(s) = &self.streams {
            let stall = match s.stall_ms_per_jump.count {
                0 => "not measured".to_owned(),
                n => format!("p99 {} ms ({n} jumps)", s.stall_ms_per_jump.p99),
            };
            let _ = writeln!(
                o,
                "streams: {} bytes exact, {} lost, {} duplicated; {} completed, {} reset explicitly, {} failed; stall per jump {stall}",
                s.stream_bytes,
                s.stream_bytes_lost,
                s.stream_bytes_duplicated,
                s.streams_completed,
                s.streams_reset_explicitly,
                s.streams_failed,
            );
        }
        if let Some(c) = &self.cpu {
            let _ = writeln!(
                o,
                "cpu over the last {:.1} s, % of one core: routers {:.1}, gateways {:.1}, tool {:.1}",
                c.window_s, c.routers_pct, c.gateways_pct, c.tool_pct
            );
        }
        if let Some(f) = &self.flood {
            let _ = writeln!(
                o,
                "flood: {} attempts, {} admitted, {} refused ({} before TLS)",
                f.attempts, f.admitted, f.refused, f.refused_before_tls
            );
        }
        let _ = writeln!(
            o,
            "invariants: silent_migrations {}, forced_rehandshakes {}, dual_active_detected {}, lost_sessions {}",
            i.silent_migrations,
            i.forced_rehandshakes,
            i.dual_active_text(),
            i.lost_sessions
        );
        let mut errors: Vec<(&String, &u64)> = self.errors_by_reason.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if errors.is_empty() {
            let _ = writeln!(o, "errors: none");
        } else {
            let top: Vec<String> = errors
                .iter()
                .take(5)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let more = errors.len().saturating_sub(5);
            let tail = if more > 0 {
                format!(" (and {more} more reasons)")
            } else {
                String::new()
            };
            let _ = writeln!(o, "errors: {}{tail}", top.join(", "));
        }
        for t in &self.thresholds {
            let verdict = if t.ok { "ok" } else { "FAILED" };
            let _ = writeln!(o, "threshold {}: {verdict} (was {})", t.expr, t.value);
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(o, "verdict: PASS");
        } else {
            let _ = writeln!(o, "verdict: FAIL: {}", failures.join("; "));
        }
        o
    }
}

/// CPU used over the scenario window, in % of one core (summed over the
/// processes of a kind: 2 routers each at 25 % are 50).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct WindowCpu {
    pub window_s: f64,
    pub routers_pct: f64,
    pub gateways_pct: f64,
    /// This process: the agents, their TLS and the scenario's own work.
    pub tool_pct: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SampleTimeline {
    pub session: usize,
    pub events: Vec<(f64, String)>,
}

/// Doubling buckets from 250 µs: `[upper bound ms, count]`, empty tail cut.
pub(super) fn buckets(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = h
        .iter_log(250, 2.0)
        .map(|v| {
            (
                (v.value_iterated_to() + 1) as f64 / 1000.0,
                v.count_since_last_iteration(),
            )
        })
        .collect();
    while out.last().is_some_and(|(_, c)| *c == 0) {
        out.pop();
    }
    out
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ThresholdResult {
    pub expr: String,
    pub value: f64,
    pub ok: bool,
}

/// Checks before a run that `expr` names a metric a run can report.
pub fn valid_threshold(expr: &str) -> Result<()> {
    let (name, _, _) = parse_threshold(expr)?;
    // Every figure measured once: only an unknown name finds nothing.
    let one = Latency {
        count: 1,
        ..Latency::default()
    };
    let mut probe = RunReport {
        handshake_ms: one.clone(),
        resume_ms: one.clone(),
        echo_rtt_ms: one.clone(),
        recovery_ms: one,
        flood: Some(FloodReport::default()),
        streams: Some(crate::streamload::StreamStats::default()),
        ..RunReport::default()
    };
    probe.invariants.dual_active_detected = Some(0);
    if let Some(s) = probe.streams.as_mut() {
        s.stall_ms_per_jump.count = 1;
    }
    metric(&probe, name)
        .map(|_| ())
        .with_context(|| format!("threshold {expr:?}: unknown metric {name:?}"))
}

fn parse_threshold(expr: &str) -> Result<(&str, char, f64)> {
    let (name, op, limit) = if let Some((n, v)) = expr.split_once('<') {
        (n.trim(), '<', v.trim())
    } else if let Some((n, v)) = expr.split_once('>') {
        (n.trim(), '>', v.trim())
    } else {
        bail!("threshold {expr:?}: expected NAME<VALUE or NAME>VALUE");
    };
    let limit: f64 = limit
        .parse()
        .with_context(|| format!("threshold {expr:?}: {limit:?} is not a number"))?;
    Ok((name, op, limit))
}

/// Evaluates `name<value` or `name>value` against the report's metrics. A
/// figure this run did not measure fails the threshold (value NaN, `null`
/// in JSON): nothing was shown to hold.
pub fn check_threshold(report: &RunReport, expr: &str) -> Result<ThresholdResult> {
    valid_threshold(expr)?;
    let (name, op, limit) = parse_threshold(expr)?;
    let Some(value) = metric(report, name) else {
        return Ok(ThresholdResult {
            expr: expr.to_owned(),
            value: f64::NAN,
            ok: false,
        });
    };
    let ok = if op == '<' {
        value < limit
    } else {
        value > limit
    };
    Ok(ThresholdResult {
        expr: expr.to_owned(),
        value,
        ok,
    })
}

/// Threshold names: `<latency>_<pXX|max>_ms` for handshake, resume, echo_rtt
/// and recovery; and the counters.
fn metric(r: &RunReport, name: &str) -> Option<f64> {
    let lat = |l: &Latency, q: &str| match q {
        // An empty histogram's quantiles read 0: not measured, not fast.
        _ if l.count == 0 => None,
        "p50" => Some(l.p50),
        "p90" => Some(l.p90),
        "p99" => Some(l.p99),
        "p999" => Some(l.p999),
        "max" => Some(l.max),
        _ => None,
    };
    if let Some(rest) = name.strip_suffix("_ms") {
        let (which, q) = rest.rsplit_once('_')?;
        let l = match which {
            "handshake" => &r.handshake_ms,
            "resume" => &r.resume_ms,
            "echo_rtt" => &r.echo_rtt_ms,
            "recovery" => &r.recovery_ms,
            _ => return None,
        };
        return lat(l, q);
    }
    let i = &r.invariants;
    Some(match name {
        "sessions_established" => r.sessions_established as f64,
        "rate_achieved_per_s" => r.rate_achieved_per_s,
        "resumes_ok" => r.resumes_ok as f64,
        "rehandshakes" => r.rehandshakes as f64,
        "echo_failed" => r.echo_failed as f64,
        "echo_lost" => r.echo_lost as f64,
        "flood_admitted" => r.flood.as_ref()?.admitted as f64,
        "flood_refused" => r.flood.as_ref()?.refused as f64,
        "errors" => r.errors_by_reason.values().sum::<u64>() as f64,
        "silent_migrations" => i.silent_migrations as f64,
        "forced_rehandshakes" => i.forced_rehandshakes as f64,
        "dual_active_detected" => i.dual_active_detected? as f64,
        "lost_sessions" => i.lost_sessions as f64,
        "stream_bytes" => r.streams.as_ref()?.stream_bytes as f64,
        "stream_bytes_lost" => r.streams.as_ref()?.stream_bytes_lost as f64,
        "stream_bytes_duplicated" => r.streams.as_ref()?.stream_bytes_duplicated as f64,
        "streams_reset_explicitly" => r.streams.as_ref()?.streams_reset_explicitly as f64,
        "streams_failed" => r.streams.as_ref()?.streams_failed as f64,
        "stall_ms_per_jump_p50" => stall(r)?.p50 as f64,
        "stall_ms_per_jump_p99" => stall(r)?.p99 as f64,
        _ => return None,
    })
}

/// The stall figures, if any jump was measured.
fn stall(r: &RunReport) -> Option<&crate::demo::Percentiles> {
    let s = &r.streams.as_ref()?.stall_ms_per_jump;
    (s.count > 0).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        let at = |s: u64| rfc3339_utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
        assert_eq!(at(1_796_412_345), "2026-12-04T19:25:45.000Z");
    }

    #[test]
    fn the_verdict_names_every_failure_and_only_failures() {
        let mut r = RunReport::default();
        assert!(r.failures().is_empty());
        assert!(r.summary().ends_with("verdict: PASS\n"));
        r.invariants.forced_rehandshakes = 3;
        r.thresholds.push(ThresholdResult {
            expr: "recovery_p99_ms<1000".into(),
            value: 1480.5,
            ok: false,
        });
        r.thresholds.push(ThresholdResult {
            expr: "rehandshakes<1".into(),
            value: 0.0,
            ok: true,
        });
        r.errors_by_reason.insert("owner_lost".into(), 7);
        // A local cluster's run that could not check dual-activity fails.
        r.dual_active_required = true;
        assert!(
            r.failures()
                .contains(&"dual_active_detected not checked".to_owned()),
            "{:?}",
            r.failures()
        );
        r.invariants.dual_active_detected = Some(0);
        let s = r.summary();
        let verdict = s.lines().last().unwrap();
        assert_eq!(
            verdict,
            "verdict: FAIL: forced_rehandshakes = 3; threshold recovery_p99_ms<1000 (was 1480.5)"
        );
        assert!(s.contains("errors: owner_lost 7"), "{s}");
    }

    /// Each scenario's own promise fails the run when broken: a replay
    /// accepted, a scale-out that re-handshakes, a bulk run whose streams
    /// failed or moved nothing; and a latency nobody measured is no
    /// threshold's value.
    #[test]
    fn a_scenario_fails_on_its_own_promise() {
        let run = |scenario: &str| RunReport {
            scenario: scenario.into(),
            ..RunReport::default()
        };
        let mut r = run("replay-flood");
        r.flood = Some(FloodReport {
            victim_resumed_after: Some(true),
            ..FloodReport::default()
        });
        assert!(r.failures().is_empty(), "{:?}", r.failures());
        r.flood.as_mut().unwrap().admitted = 1;
        assert_eq!(r.failures(), ["replays accepted = 1"]);
        r.flood.as_mut().unwrap().victim_resumed_after = None;
        assert_eq!(r.failures().len(), 2, "{:?}", r.failures());

        let mut r = run("scale-out");
        r.rehandshakes = 2;
        assert_eq!(r.failures(), ["rehandshakes = 2"]);
        // The same count is what a failover is for, when explicit.
        let mut r = run("failover");
        r.rehandshakes = 2;
        r.errors_by_reason
            .insert("rehandshake:owner_lost".into(), 2);
        assert!(r.failures().is_empty());
        r.rehandshakes = 3;
        assert_eq!(r.failures(), ["rehandshakes other than owner_lost = 1"]);

        let mut r = run("bulk");
        assert_eq!(r.failures(), ["streams not measured"]);
        r.streams = Some(crate::streamload::StreamStats {
            stream_bytes: 1 << 20,
            ..Default::default()
        });
        assert!(r.failures().is_empty());
        let s = r.streams.as_mut().unwrap();
        s.stream_bytes = 0;
        s.streams_failed = 4;
        assert_eq!(
            r.failures(),
            [
                "stream_bytes = 0 (no transfer completed)",
                "streams_failed = 4"
            ]
        );
        assert!(r.summary().contains("stall per jump not measured"));

        // Thresholds on figures with no samples fail, not pass; an unknown
        // name is refused before any run.
        let t = check_threshold(&r, "resume_p99_ms<500").unwrap();
        assert!(!t.ok && t.value.is_nan(), "{t:?}");
        assert!(!check_threshold(&r, "stall_ms_per_jump_p99<100").unwrap().ok);
        r.thresholds.push(t);
        assert!(
            r.failures()
                .contains(&"threshold resume_p99_ms<500 (not measured)".to_owned())
        );
        r.resume_ms.count = 1;
        assert!(check_threshold(&r, "resume_p99_ms<500").unwrap().ok);
        assert!(valid_threshold("resume_p99_ms<500").is_ok());
        assert!(valid_threshold("stall_ms_per_jump_p99<100").is_ok());
        assert!(valid_threshold("resume_p98_ms<500").is_err());
        assert!(valid_threshold("nonsense>1").is_err());
    }
}
