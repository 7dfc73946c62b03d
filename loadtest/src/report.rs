//! `jvpn-loadtest report FILE.json --html OUT.html`: one self-contained page
//! (inline SVG and CSS; no script, no network fetch) with the latency
//! histograms, the recovery-time distribution, a state timeline of sample
//! sessions, and the summary table with the invariant counters.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A bar chart of `[upper bound ms, count]` buckets. Each bar is a
/// `<rect class="bar">` so a browser test can count them.
fn histogram_svg(id: &str, title: &str, buckets: &[(f64, u64)]) -> String {
    let (w, h, pad) = (640.0, 220.0, 36.0);
    let max = buckets.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1) as f64;
    let n = buckets.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg id="{id}" class="chart" data-bars="{}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">"#,
        esc(title),
        buckets.iter().filter(|(_, c)| *c > 0).count()
    );
    let _ = write!(
        svg,
        r#"<line x1="{pad}" y1="{y}" x2="{x2}" y2="{y}" class="axis"/>"#,
        y = h - pad,
        x2 = w - pad
    );
    for (i, (upper, count)) in buckets.iter().enumerate() {
        let bh = (*count as f64 / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        if *count > 0 {
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{bh:.1}"><title>≤ {upper} ms: {count}</title></rect>"#,
                y = h - pad - bh,
                bw = (bw - 2.0).max(1.0)
            );
        }
        if i % 2 == 0 {
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{y}" class="tick">{upper}</text>"#,
                y = h - pad + 14.0
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="{y}" class="tick">count (max {max}) by upper bound, ms</text></svg></figure>"#,
        y = 16
    );
    svg
}

/// One row per sample session: attached spans in green, lost in red.
fn timeline_svg(samples: &[Value], total_ms: f64) -> String {
    let (w, row, pad) = (640.0, 22.0, 60.0);
    let h = row * samples.len().max(1) as f64 + 30.0;
    let scale = (w - pad - 10.0) / total_ms.max(1.0);
    let mut svg = format!(
        r#"<figure><figcaption>State timeline of sample sessions</figcaption><svg id="timeline" class="chart" data-rows="{}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">"#,
        samples.len()
    );
    for (r, s) in samples.iter().enumerate() {
        let y = 10.0 + r as f64 * row;
        let _ = write!(
            svg,
            r#"<text x="2" y="{ty:.1}" class="tick">session {}</text>"#,
            s["session"],
            ty = y + 13.0
        );
        let events: Vec<(f64, String)> = s["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((e[0].as_f64()?, e[1].as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        for (i, (t, what)) in events.iter().enumerate() {
            let end = events.get(i + 1).map_or(total_ms, |(t2, _)| *t2);
            let class = if what == "transport_lost" {
                "lost"
            } else {
                "up"
            };
            let _ = write!(
                svg,
                r#"<rect class="span {class}" x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="16"><title>{} at {t:.0} ms</title></rect>"#,
                esc(what),
                x = pad + t * scale,
                bw = ((end - t) * scale).max(1.0)
            );
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Renders the page for a `jvpn-loadtest run` JSON report.
pub fn render(report: &Value) -> Result<String> {
    let schema = report["schema"]
        .as_str()
        .context("not a run report (no schema)")?;
    let hist = |k: &str| -> Vec<(f64, u64)> {
        report["histograms"][k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| Some((b[0].as_f64()?, b[1].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut rows = String::new();
    for k in [
        "scenario",
        "seed",
        "sessions_requested",
        "sessions_established",
        "rate_requested_per_s",
        "rate_achieved_per_s",
        "resumes_ok",
        "rehandshakes",
        "echo_failed",
        "echo_lost",
        "silent_migrations",
        "forced_rehandshakes",
        "dual_active_detected",
        "lost_sessions",
    ] {
        let _ = write!(
            rows,
            "<tr><th>{k}</th><td>{}</td></tr>",
            esc(&report[k].to_string())
        );
    }
    let mut lat = String::new();
    for k in ["handshake_ms", "resume_ms", "echo_rtt_ms", "recovery_ms"] {
        let l = &report[k];
        let _ = write!(
            lat,
            "<tr><th>{k}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            l["count"], l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
        );
    }
    let total_ms = report["duration_s"].as_f64().unwrap_or(1.0) * 1000.0;
    let samples = report["timeline"].as_array().cloned().unwrap_or_default();
    let charts = [
        histogram_svg(
            "hist-handshake",
            "Handshake latency (from intended arrival)",
            &hist("handshake"),
        ),
        histogram_svg(
            "hist-resume",
            "RESUME latency (one attempt)",
            &hist("resume"),
        ),
        histogram_svg(
            "hist-echo",
            "Echo round trip (from intended send)",
            &hist("echo_rtt"),
        ),
        histogram_svg(
            "hist-recovery",
            "Recovery: transport lost → attached again",
            &hist("recovery"),
        ),
        timeline_svg(&samples, total_ms),
    ]
    .join("\n");
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jvpn-loadtest: {scenario}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ text-align: left; background: #f4f4f4; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: 600; margin-bottom: .3em; }}
.bar {{ fill: #3b7dd8; }} .axis {{ stroke: #888; }} .tick {{ font-size: 10px; fill: #555; }}
.span.up {{ fill: #4caf50; }} .span.lost {{ fill: #e53935; }}
</style></head><body>
<h1>jvpn-loadtest: {scenario}</h1>
<p>Report schema <code>{schema}</code>. Invariant counters must all be 0.</p>
<table>{rows}</table>
<table><tr><th>latency (ms)</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>{lat}</table>
{charts}
</body></html>
"#,
        scenario = esc(report["scenario"].as_str().unwrap_or("")),
        schema = esc(schema),
    ))
}
