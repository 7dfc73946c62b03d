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

/// `n` with thousands separators: `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A JSON value for people: integers with separators, fractions with at
/// most two decimals, strings bare, null as "not checked".
fn fmt_value(v: &Value) -> String {
    match v {
        Value::Null => "not checked".to_owned(),
        Value::String(s) => esc(s),
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => thousands(u),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                let sign = if f < 0.0 { "-" } else { "" };
                format!("{sign}{}", thousands(f.abs() as u64))
            }
            (None, Some(f)) => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => esc(&other.to_string()),
    }
}

/// A bar chart of `[upper bound ms, count]` buckets; with `part`, the part
/// of each bucket drawn in a second colour on top (`class="bar part"`).
/// Each bar is a `<rect class="bar ...">` so a browser test can count them.
fn histogram_svg(
    id: &str,
    title: &str,
    buckets: &[(f64, u64)],
    part: Option<(&str, &[(f64, u64)])>,
) -> String {
    let (w, h, pad) = (960.0, 240.0, 40.0);
    let max = buckets.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1) as f64;
    let n = buckets.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg id="{id}" class="chart" data-bars="{}" width="100%" viewBox="0 0 {w} {h}" preserveAspectRatio="xMinYMin meet" role="img">"#,
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
        let x = pad + i as f64 * bw;
        let of_part = part
            .and_then(|(_, p)| p.get(i))
            .map_or(0, |(_, c)| (*c).min(*count));
        let rest = count - of_part;
        let unit = (h - 2.0 * pad) / max;
        let width = (bw - 2.0).max(1.0);
        if rest > 0 {
            let bh = rest as f64 * unit;
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{bh:.1}"><title>≤ {upper} ms: {}</title></rect>"#,
                thousands(rest),
                y = h - pad - bh,
            );
        }
        if of_part > 0 {
            let label = part.map_or("", |(l, _)| l);
            let bh = of_part as f64 * unit;
            let _ = write!(
                svg,
                r#"<rect class="bar part" x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{bh:.1}"><title>≤ {upper} ms: {} {}</title></rect>"#,
                thousands(of_part),
                esc(label),
                y = h - pad - rest as f64 * unit - bh,
            );
        }
        if i % 2 == 0 {
            let label = if *upper >= 1000.0 {
                format!("{}s", upper / 1000.0)
            } else {
                format!("{upper}")
            };
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{y}" class="tick">{label}</text>"#,
                y = h - pad + 14.0
            );
        }
    }
    if buckets.iter().all(|(_, c)| *c == 0) {
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}" class="empty">no samples in this run</text>"#,
            x = w / 2.0 - 70.0,
            y = h / 2.0
        );
    }
    let legend = part.map_or(String::new(), |(l, _)| {
        format!(
            r#"; <tspan class="part-label">{}</tspan> in orange"#,
            esc(l)
        )
    });
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="{y}" class="tick">count (max {}) by upper bound, ms{legend}</text></svg></figure>"#,
        thousands(max as u64),
        y = 16
    );
    svg
}

/// A step for time-axis ticks: 1, 2 or 5 × 10^k ms, about 8 ticks across.
fn tick_step(total_ms: f64) -> f64 {
    let raw = (total_ms / 8.0).max(1.0);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow)
}

/// One row per sample session: attached spans in green, lost in red.
fn timeline_svg(samples: &[Value], total_ms: f64) -> String {
    let (w, row, pad) = (960.0, 22.0, 70.0);
    let rows_h = row * samples.len().max(1) as f64 + 10.0;
    let h = rows_h + 30.0;
    // Room on the right for the last tick's label.
    let scale = (w - pad - 30.0) / total_ms.max(1.0);
    let mut svg = format!(
        r#"<figure><figcaption>State timeline of sample sessions (green: attached, red: transport lost)</figcaption><svg id="timeline" class="chart" data-rows="{}" width="100%" viewBox="0 0 {w} {h}" preserveAspectRatio="xMinYMin meet" role="img">"#,
        samples.len()
    );
    // Time axis: seconds since the run started.
    let _ = write!(
        svg,
        r#"<g class="time-axis"><line x1="{pad}" y1="{rows_h}" x2="{x2}" y2="{rows_h}" class="axis"/>"#,
        x2 = w - 30.0
    );
    let step = tick_step(total_ms);
    let mut t = 0.0;
    while t <= total_ms {
        let x = pad + t * scale;
        let _ = write!(
            svg,
            r#"<line x1="{x:.1}" y1="{rows_h}" x2="{x:.1}" y2="{y2}" class="axis"/><text x="{x:.1}" y="{ty}" class="tick time-tick">{} s</text>"#,
            t / 1000.0,
            y2 = rows_h + 4.0,
            ty = rows_h + 16.0
        );
        t += step;
    }
    svg.push_str("</g>");
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
    let row = |k: &str, v: String| format!("<tr><th>{k}</th><td>{v}</td></tr>");
    // The verdict first: what a reader needs before any figure.
    let verdict = match report["verdict"].as_str() {
        Some("pass") => r#"<p id="verdict" class="verdict pass">PASS: every invariant held and every threshold was met</p>"#.to_owned(),
        Some(_) => {
            let items: String = report["failures"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|f| format!("<li>{}</li>", esc(f)))
                .collect();
            format!(r#"<div id="verdict" class="verdict fail"><p>FAIL</p><ul>{items}</ul></div>"#)
        }
        None => r#"<p id="verdict" class="verdict">no verdict in this report (made by an older tool)</p>"#.to_owned(),
    };
    let mut context = String::new();
    for (k, label) in [
        ("target", "target"),
        ("scenario", "scenario"),
        ("seed", "seed"),
        ("started_at", "started (UTC)"),
        ("duration_s", "duration, s"),
        ("sessions_requested", "sessions requested"),
        ("sessions_established", "sessions established"),
        ("rate_requested_per_s", "arrivals requested, /s"),
        ("rate_achieved_per_s", "arrivals achieved, /s"),
    ] {
        if !report[k].is_null() {
            context.push_str(&row(label, fmt_value(&report[k])));
        }
    }
    let mut rows = String::new();
    for k in [
        "resumes_ok",
        "rehandshakes",
        "echo_failed",
        "echo_lost",
        "connections_cut",
    ] {
        rows.push_str(&row(k, fmt_value(&report[k])));
    }
    for k in [
        "silent_migrations",
        "forced_rehandshakes",
        "dual_active_detected",
        "lost_sessions",
    ] {
        let v = &report[k];
        let bad = v.as_u64().is_some_and(|n| n > 0);
        let _ = write!(
            rows,
            r#"<tr class="{}"><th>{k}</th><td>{}</td></tr>"#,
            if bad { "bad" } else { "invariant" },
            fmt_value(v)
        );
    }
    let mut errors: Vec<(String, u64)> = report["errors_by_reason"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    errors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let errors_table = if errors.is_empty() {
        r#"<p id="errors">No errors.</p>"#.to_owned()
    } else {
        let body: String = errors
            .iter()
            .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", esc(k), thousands(*v)))
            .collect();
        format!(
            r#"<table id="errors"><tr><th>error (reason)</th><th>count</th></tr>{body}</table>"#
        )
    };
    let mut thresholds = String::new();
    for t in report["thresholds"].as_array().into_iter().flatten() {
        let ok = t["ok"].as_bool().unwrap_or(false);
        let _ = write!(
            thresholds,
            r#"<tr class="{}"><th>{}</th><td>{}</td><td>{}</td></tr>"#,
            if ok { "ok" } else { "bad" },
            esc(t["expr"].as_str().unwrap_or("")),
            fmt_value(&t["value"]),
            if ok { "ok" } else { "FAILED" }
        );
    }
    if !thresholds.is_empty() {
        thresholds = format!(
            "<table><tr><th>threshold</th><th>value</th><th>result</th></tr>{thresholds}</table>"
        );
    }
    let mut lat = String::new();
    for k in ["handshake_ms", "resume_ms", "echo_rtt_ms", "recovery_ms"] {
        let l = &report[k];
        let _ = write!(
            lat,
            "<tr><th>{k}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            fmt_value(&l["count"]),
            fmt_value(&l["p50"]),
            fmt_value(&l["p90"]),
            fmt_value(&l["p99"]),
            fmt_value(&l["p999"]),
            fmt_value(&l["max"])
        );
    }
    let total_ms = report["duration_s"].as_f64().unwrap_or(1.0) * 1000.0;
    let samples = report["timeline"].as_array().cloned().unwrap_or_default();
    let rehandshake = hist("recovery_rehandshake");
    let charts = [
        histogram_svg(
            "hist-handshake",
            "Handshake latency (from intended arrival)",
            &hist("handshake"),
            None,
        ),
        histogram_svg(
            "hist-resume",
            "RESUME latency (one attempt)",
            &hist("resume"),
            None,
        ),
        histogram_svg(
            "hist-echo",
            "Echo round trip (from intended send)",
            &hist("echo_rtt"),
            None,
        ),
        histogram_svg(
            "hist-recovery",
            "Recovery: transport lost → attached again (resumed, or by re-handshake)",
            &hist("recovery"),
            Some(("by re-handshake", &rehandshake)),
        ),
        timeline_svg(&samples, total_ms),
    ]
    .join("\n");
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jvpn-loadtest: {scenario}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em 2em; color: #222; }}
.chart {{ display: block; width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ text-align: left; background: #f4f4f4; }}
tr.bad th, tr.bad td {{ color: #b71c1c; font-weight: 600; }}
.verdict {{ font-size: 1.3em; font-weight: 700; padding: .4em .8em; border-radius: 4px; }}
.verdict.pass {{ background: #e8f5e9; color: #1b5e20; }}
.verdict.fail {{ background: #ffebee; color: #b71c1c; }}
.verdict.fail li {{ font-size: .8em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 2em; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: 600; margin-bottom: .3em; }}
.bar {{ fill: #3b7dd8; }} .bar.part {{ fill: #f57c00; }} .part-label {{ fill: #f57c00; }}
.axis {{ stroke: #888; }} .tick {{ font-size: 10px; fill: #555; }} .empty {{ font-size: 14px; fill: #999; }}
.span.up {{ fill: #4caf50; }} .span.lost {{ fill: #e53935; }}
</style></head><body>
<h1>jvpn-loadtest: {scenario}</h1>
{verdict}
<div class="grid">
<div><h2>Run</h2><table id="context">{context}</table></div>
<div><h2>Outcomes</h2><table>{rows}</table>{thresholds}</div>
<div><h2>Errors by reason</h2>{errors_table}</div>
</div>
<table><tr><th>latency (ms)</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>{lat}</table>
{charts}
<p>Report schema <code>{schema}</code>. Invariant counters must all be 0.</p>
</body></html>
"#,
        scenario = esc(report["scenario"].as_str().unwrap_or("")),
        schema = esc(schema),
    ))
}
