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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<FloodReport>,
    /// `bulk`: what the streams saw (stream_bytes, stream_bytes_lost, ...).
    #[serde(flatten)]
    pub streams: Option<crate::streamload::StreamStats>,
    pub thresholds: Vec<ThresholdResult>,
    /// Per latency: `[upper bound ms, count]` on doubling buckets from 0.25 ms.
    pub histograms: BTreeMap<String, Vec<(f64, u64)>>,
    /// Up to 8 sample sessions: `[ms since the run started, what]`.
    pub timeline: Vec<SampleTimeline>,
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

/// Evaluates `name<value` or `name>value` against the report's metrics.
pub fn check_threshold(report: &RunReport, expr: &str) -> Result<ThresholdResult> {
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
    let value = metric(report, name).with_context(|| {
        format!("threshold {expr:?}: unknown metric {name:?} (or not measured in this run)")
    })?;
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
        "stall_ms_per_jump_p50" => r.streams.as_ref()?.stall_ms_per_jump.p50 as f64,
        "stall_ms_per_jump_p99" => r.streams.as_ref()?.stall_ms_per_jump.p99 as f64,
        _ => return None,
    })
}
