//! `jvpn-gateway events timeline`: the event files of several gateways
//! merged into one history, per session or for a time window, as text or
//! as a self-contained HTML page.
//!
//! Ordering is clock-skew safe: events of one gateway incarnation keep the
//! order of its monotonic clock (`mono_ns`) whatever its wall clock did.
//! Incarnations that ran on one host (their wall and host-monotonic stamps
//! agree on the host's boot time) are merged by the host's monotonic clock
//! (`host_mono_ns`), which processes share; otherwise each incarnation's
//! monotonic offsets hang from its median wall-clock offset, so a wall
//! clock that jumps mid-run moves none of its events, and hosts are merged
//! by wall time (off by at most their clock skew, which the output says).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// One event line.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: String,
    pub ts_ms: u64,
    pub mono_ns: u64,
    pub host_mono_ns: Option<u64>,
    /// The host boot the event was written in (events from older gateways
    /// have none).
    pub boot_id: Option<String>,
    pub node_id: String,
    pub incarnation: String,
    pub session_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `reason_code`, or a stream's refusal `reason` or ending `how`.
    pub reason: Option<String>,
    pub stream: Option<u64>,
    /// Wall time (ns since the epoch) after merging; what is displayed.
    pub at_ns: u64,
}

/// Events read from files, and what could not be read.
#[derive(Debug, Default)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// Lines that are not events (truncated writes, foreign lines).
    pub skipped: usize,
}

/// Reads JSON-line events; anything else is counted and skipped.
pub fn parse(text: &str, into: &mut Parsed) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match event(line) {
            Some(e) => into.events.push(e),
            None => into.skipped += 1,
        }
    }
}

fn event(line: &str) -> Option<Event> {
    let v: Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    Some(Event {
        kind: s("event_type")?,
        ts_ms: v["ts_ms"].as_u64()?,
        mono_ns: v["mono_ns"].as_u64()?,
        host_mono_ns: v["host_mono_ns"].as_u64(),
        boot_id: s("host_boot_id"),
        node_id: s("node_id")?,
        incarnation: s("incarnation")?,
        session_id: s("session_id"),
        from: s("from"),
        to: s("to"),
        reason: s("reason_code")
            .or_else(|| s("reason"))
            .or_else(|| s("how")),
        stream: v["stream"].as_u64(),
        at_ns: 0,
    })
}

/// Which clock put the gateways' events in one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Every incarnation ran on one host: its monotonic clock, exact.
    HostMonotonic,
    /// Several hosts: each incarnation's monotonic offsets from its wall
    /// clock; between hosts, as good as their clocks agree.
    Wall,
}

impl Order {
    pub fn describe(self) -> &'static str {
        match self {
            Order::HostMonotonic => {
                "one host (one boot id, or stamps that agree on the boot time): merged by its monotonic clock"
            }
            Order::Wall => {
                "several hosts: each gateway's own order kept (monotonic clock), gateways merged by wall time (as close as their clocks)"
            }
        }
    }
}

/// Two incarnations whose boot-time estimates differ by less than this ran
/// on the same host (the estimate moves only with the wall clock).
const SAME_HOST_NS: i128 = 2_000_000_000;

fn median(mut v: Vec<i128>) -> i128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Puts every event in one order and sets its display time (`at_ns`).
pub fn merge(mut events: Vec<Event>) -> (Vec<Event>, Order) {
    // Each incarnation's events, in its own monotonic order.
    let mut streams: BTreeMap<(String, String), Vec<Event>> = BTreeMap::new();
    for e in events.drain(..) {
        streams
            .entry((e.node_id.clone(), e.incarnation.clone()))
            .or_default()
            .push(e);
    }
    for s in streams.values_mut() {
        s.sort_by_key(|e| e.mono_ns);
    }
    let wall = |e: &Event| i128::from(e.ts_ms) * 1_000_000;
    // Boot time of each incarnation's host, as its events estimate it.
    let boots: Vec<Option<i128>> = streams
        .values()
        .map(|s| {
            let d: Vec<i128> = s
                .iter()
                .filter_map(|e| Some(wall(e) - i128::from(e.host_mono_ns?)))
                .collect();
            (d.len() == s.len()).then(|| median(d))
        })
        .collect();
    // One host: every incarnation names the same boot, or (events from
    // gateways that do not name it) their stamps agree on the boot time.
    let boot_ids: Vec<Option<&str>> = streams
        .values()
        .map(|s| s.first().and_then(|e| e.boot_id.as_deref()))
        .collect();
    let one_host = boots.iter().all(Option::is_some)
        && if boot_ids.iter().all(Option::is_some) {
            boot_ids.windows(2).all(|w| w[0] == w[1])
        } else {
            let b: Vec<i128> = boots.iter().flatten().copied().collect();
            let (lo, hi) = (b.iter().min(), b.iter().max());
            matches!((lo, hi), (Some(lo), Some(hi)) if hi - lo < SAME_HOST_NS)
        };
    let order = if one_host {
        Order::HostMonotonic
    } else {
        Order::Wall
    };
    let host_boot = median(boots.iter().flatten().copied().collect());
    for s in streams.values_mut() {
        let offset = median(s.iter().map(|e| wall(e) - i128::from(e.mono_ns)).collect());
        for e in s.iter_mut() {
            let at = match (order, e.host_mono_ns) {
                (Order::HostMonotonic, Some(h)) => host_boot + i128::from(h),
                _ => offset + i128::from(e.mono_ns),
            };
            e.at_ns = u64::try_from(at.max(0)).unwrap_or(u64::MAX);
        }
    }
    // k-way merge: keys are monotone within each stream, so a stable sort
    // by key (streams in a fixed order) keeps every stream's own order.
    let mut all: Vec<Event> = streams.into_values().flatten().collect();
    all.sort_by_key(|e| e.at_ns);
    (all, order)
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC), or milliseconds since the epoch, to
/// nanoseconds since the epoch.
pub fn parse_time(s: &str) -> Option<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return ms.checked_mul(1_000_000);
    }
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let month_days = usize::try_from(m - 1).ok().and_then(|i| days_in.get(i));
    if !month_days.is_some_and(|n| (1..=*n).contains(&day)) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let nanos: u64 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32)
    };
    // Civil date to days since 1970-01-01 (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000_000_000 + nanos)
}

/// Nanoseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = ns % 1_000_000_000 / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Which events to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// A session id, or a prefix of one (at least 8 hex digits).
    pub session: Option<String>,
    /// Wall-time window, ns since the epoch.
    pub from_ns: Option<u64>,
    pub to_ns: Option<u64>,
}

/// One session's part of the history.
#[derive(Debug)]
pub struct SessionLife {
    pub session_id: String,
    pub events: Vec<Event>,
    /// How its history ends in these files.
    pub end: String,
}

/// Why a filter matched nothing usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("no session id starts with {0}")]
    NoSuchSession(String),
    #[error("{0} matches {1} sessions; give more of the id")]
    Ambiguous(String, usize),
    #[error("a session prefix needs at least 8 hex digits: {0}")]
    TooShort(String),
}

/// The sessions the filter selects, each with its events in order.
pub fn lives(merged: &[Event], filter: &Filter) -> Result<Vec<SessionLife>, FilterError> {
    let wanted: Option<String> = match &filter.session {
        None => None,
        Some(p) if p.len() < 8 => return Err(FilterError::TooShort(p.clone())),
        Some(p) => {
            let p = p.to_ascii_lowercase();
            let mut ids: Vec<&str> = merged
                .iter()
                .filter_map(|e| e.session_id.as_deref())
                .filter(|id| id.starts_with(&p))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            match ids.as_slice() {
                [] => return Err(FilterError::NoSuchSession(p)),
                [one] => Some((*one).to_owned()),
                many => return Err(FilterError::Ambiguous(p, many.len())),
            }
        }
    };
    let in_window = |e: &Event| {
        filter.from_ns.is_none_or(|f| e.at_ns >= f) && filter.to_ns.is_none_or(|t| e.at_ns <= t)
    };
    // Where each incarnation's events stop: a session still live there had
    // its gateway stop under it.
    let mut last_of_stream: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for e in merged {
        last_of_stream.insert((&e.node_id, &e.incarnation), e.at_ns);
    }
    let mut by_session: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    let mut first_seen: Vec<&str> = Vec::new();
    for e in merged {
        let Some(id) = e.session_id.as_deref() else {
            continue;
        };
        if wanted.as_deref().is_some_and(|w| w != id) {
            continue;
        }
        let list = by_session.entry(id).or_default();
        if list.is_empty() {
            first_seen.push(id);
        }
        list.push(e);
    }
    let mut out = Vec::new();
    for id in first_seen {
        let all = &by_session[id];
        // In a window: sessions with an event in it, shown in full.
        if wanted.is_none() && !all.iter().any(|e| in_window(e)) {
            continue;
        }
        // A session and a window: only that session's events in the window.
        let windowed = wanted.is_some() && (filter.from_ns.is_some() || filter.to_ns.is_some());
        let events: Vec<Event> = all
            .iter()
            .filter(|e| !windowed || in_window(e))
            .map(|e| (*e).clone())
            .collect();
        let end = ending(&events, &last_of_stream);
        out.push(SessionLife {
            session_id: id.to_owned(),
            events,
            end,
        });
    }
    Ok(out)
}

fn ending(events: &[Event], last_of_stream: &BTreeMap<(&str, &str), u64>) -> String {
    let Some(last) = events.iter().rev().find(|e| e.to.is_some()) else {
        return "no state change in these files".to_owned();
    };
    let state = last.to.as_deref().unwrap_or("?");
    if state == "terminated" {
        return format!(
            "terminated ({}) on {}",
            last.reason.as_deref().unwrap_or("?"),
            last.node_id
        );
    }
    let stream_end = last_of_stream
        .get(&(last.node_id.as_str(), last.incarnation.as_str()))
        .copied()
        .unwrap_or(last.at_ns);
    let newer = |i: &str| match (i.parse::<u128>(), last.incarnation.parse::<u128>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => i > last.incarnation.as_str(),
    };
    let newer_incarnation = last_of_stream
        .keys()
        .any(|(n, i)| *n == last.node_id && newer(i));
    if newer_incarnation {
        format!(
            "still {state} when {} incarnation {} stopped (a newer incarnation took over; sessions do not survive a restart)",
            last.node_id, last.incarnation
        )
    } else {
        format!(
            "{state} when {}'s events stop at {}: the gateway was still running then, or was killed (a drain would have ended the session)",
            last.node_id,
            format_time(stream_end)
        )
    }
}

/// What happened, in words: `attached → volatile (transport_dead)`.
fn what(e: &Event) -> String {
    match (e.kind.as_str(), &e.from, &e.to) {
        ("SessionStateChange", Some(f), Some(t)) => format!("{f} → {t}"),
        ("ResumeRefused", ..) => "RESUME refused".to_owned(),
        ("StreamOpened", ..) => format!("stream {} opened", e.stream.unwrap_or(0)),
        ("StreamRefused", ..) => format!("stream {} refused", e.stream.unwrap_or(0)),
        ("StreamClosed", ..) => format!("stream {} ended", e.stream.unwrap_or(0)),
        (k, ..) => k.to_owned(),
    }
}

/// The transport a state change gave or took: attaches count up.
fn transports(events: &[Event]) -> Vec<String> {
    let mut n = 0u32;
    events
        .iter()
        .map(|e| match (e.from.as_deref(), e.to.as_deref()) {
            (_, Some("attached")) => {
                n += 1;
                format!("transport {n} attached")
            }
            (Some("attached"), Some(_)) => format!("transport {n} lost"),
            _ => String::new(),
        })
        .collect()
}

fn short_incarnation(i: &str) -> &str {
    &i[i.len().saturating_sub(6)..]
}

/// The text rendering: one block per session.
pub fn render_text(lives: &[SessionLife], order: Order, skipped: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "ordering: {}", order.describe());
    if skipped > 0 {
        let _ = writeln!(o, "skipped {skipped} lines that are not events");
    }
    if lives.is_empty() {
        let _ = writeln!(o, "no session in the selection");
    }
    for l in lives {
        let owners: Vec<String> = {
            let mut v: Vec<String> = l
                .events
                .iter()
                .map(|e| {
                    format!(
                        "{} (incarnation …{})",
                        e.node_id,
                        short_incarnation(&e.incarnation)
                    )
                })
                .collect();
            v.dedup();
            v
        };
        let _ = writeln!(o);
        let _ = writeln!(o, "session {}", l.session_id);
        let _ = writeln!(o, "  owner: {}", owners.join(", then "));
        let t = transports(&l.events);
        for (e, tr) in l.events.iter().zip(&t) {
            let _ = writeln!(
                o,
                "  {}  {:<4} …{}  {:<26} {:<26} {}",
                format_time(e.at_ns),
                e.node_id,
                short_incarnation(&e.incarnation),
                what(e),
                e.reason.as_deref().unwrap_or(""),
                tr
            );
        }
        let _ = writeln!(o, "  end: {}", l.end);
    }
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML rendering: a lane per session (state spans over time) and its
/// events, in one page with no script and no fetch.
pub fn render_html(lives: &[SessionLife], order: Order, skipped: usize) -> String {
    let lo = lives
        .iter()
        .flat_map(|l| l.events.first())
        .map(|e| e.at_ns)
        .min()
        .unwrap_or(0);
    let hi = lives
        .iter()
        .flat_map(|l| l.events.last())
        .map(|e| e.at_ns)
        .max()
        .unwrap_or(lo)
        .max(lo + 1);
    let (w, pad) = (960.0, 10.0);
    let x = |ns: u64| pad + (ns - lo) as f64 / (hi - lo) as f64 * (w - 2.0 * pad);
    let mut body = String::new();
    for l in lives {
        let _ = write!(
            body,
            r#"<section class="session" data-session="{id}"><h2>session <code>{id}</code></h2><p class="end">{end}</p>"#,
            id = esc(&l.session_id),
            end = esc(&l.end)
        );
        let _ = write!(
            body,
            r#"<svg class="lane" width="100%" viewBox="0 0 {w} 24" preserveAspectRatio="none" role="img">"#
        );
        let states: Vec<&Event> = l.events.iter().filter(|e| e.to.is_some()).collect();
        for (i, e) in states.iter().enumerate() {
            let end = states.get(i + 1).map_or(hi, |n| n.at_ns);
            let state = e.to.as_deref().unwrap_or("");
            let _ = write!(
                body,
                r#"<rect class="state {state}" x="{:.1}" y="2" width="{:.1}" height="20"><title>{state} on {} from {}</title></rect>"#,
                x(e.at_ns),
                (x(end) - x(e.at_ns)).max(1.0),
                esc(&e.node_id),
                format_time(e.at_ns)
            );
        }
        body.push_str("</svg><table><tr><th>time (UTC)</th><th>gateway</th><th>incarnation</th><th>what</th><th>reason</th><th>transport</th></tr>");
        let t = transports(&l.events);
        for (e, tr) in l.events.iter().zip(&t) {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>…{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                format_time(e.at_ns),
                esc(&e.node_id),
                esc(short_incarnation(&e.incarnation)),
                esc(&what(e)),
                esc(e.reason.as_deref().unwrap_or("")),
                esc(tr)
            );
        }
        body.push_str("</table></section>\n");
    }
    if lives.is_empty() {
        body.push_str("<p>No session in the selection.</p>");
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jvpn session timeline</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
th {{ background: #f4f4f4; }}
.lane {{ display: block; width: 100%; height: 24px; background: #fafafa; }}
.state.attached {{ fill: #4caf50; }} .state.volatile {{ fill: #ffb300; }}
.state.degraded {{ fill: #e53935; }} .state.recovering {{ fill: #1e88e5; }}
.state.terminated {{ fill: #9e9e9e; }} .state.birth {{ fill: #ce93d8; }}
.end {{ font-weight: 600; }}
</style></head><body>
<h1>Session timeline</h1>
<p>{sessions} session(s), {from} to {to}. Ordering: {order}.{skipped}</p>
<p>Lanes: green attached, amber volatile, red degraded, blue recovering, grey terminated.</p>
{body}
</body></html>
"#,
        sessions = lives.len(),
        from = format_time(lo),
        to = format_time(hi),
        order = esc(order.describe()),
        skipped = if skipped > 0 {
            format!(" {skipped} lines were not events and were skipped.")
        } else {
            String::new()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(
        node: &str,
        inc: &str,
        sid: &str,
        to: &str,
        ts_ms: u64,
        mono_ns: u64,
        host: Option<u64>,
    ) -> Event {
        Event {
            kind: "SessionStateChange".into(),
            ts_ms,
            mono_ns,
            host_mono_ns: host,
            boot_id: None,
            node_id: node.into(),
            incarnation: inc.into(),
            session_id: Some(sid.into()),
            from: Some("x".into()),
            to: Some(to.into()),
            reason: None,
            stream: None,
            at_ns: 0,
        }
    }

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn one_host_is_merged_by_its_monotonic_clock_whatever_the_wall_clocks_say() {
        // Two gateways on one host; g2's wall clock runs 1.5 s ahead. g2's
        // event happened 0.5 s before g1's (host monotonic clock) though
        // its wall stamp says 1 s after: the host clock decides.
        let boot_ms = 1_700_000_000_000;
        let a = ev(
            "g1",
            "1",
            "aa",
            "attached",
            boot_ms + 100_000,
            5 * S,
            Some(100 * S),
        );
        let b = ev(
            "g2",
            "1",
            "bb",
            "attached",
            boot_ms + 99_500 + 1_500,
            7 * S,
            Some(99 * S + 500 * MS),
        );
        let (all, order) = merge(vec![a, b]);
        assert_eq!(order, Order::HostMonotonic);
        assert_eq!(all[0].node_id, "g2");
        assert_eq!(all[1].at_ns - all[0].at_ns, 500 * MS);
    }

    #[test]
    fn a_boot_id_decides_one_host_where_stamps_could_mislead() {
        // Two hosts booted within a second of each other: their stamps
        // agree on the boot time, their boot ids do not.
        let boot_ms = 1_700_000_000_000;
        let mut a = ev(
            "g1",
            "1",
            "aa",
            "attached",
            boot_ms + 100_000,
            S,
            Some(100 * S),
        );
        let mut b = ev(
            "g2",
            "1",
            "bb",
            "attached",
            boot_ms + 100_500,
            S,
            Some(99 * S + 500 * MS + 700 * MS),
        );
        a.boot_id = Some("boot-a".into());
        b.boot_id = Some("boot-b".into());
        let (_, order) = merge(vec![a.clone(), b.clone()]);
        assert_eq!(order, Order::Wall);
        // One host whose wall clock was stepped by 10 s between the two
        // gateways' starts: the same boot id keeps the exact clock.
        b.boot_id = Some("boot-a".into());
        b.ts_ms += 10_000;
        let (all, order) = merge(vec![a, b]);
        assert_eq!(order, Order::HostMonotonic);
        assert_eq!(all[0].node_id, "g1");
    }

    #[test]
    fn a_wall_clock_jump_reorders_nothing_within_a_gateway() {
        // Three events 1 s apart by the monotonic clock; the wall clock
        // jumped back an hour before the last one. No host stamps.
        let t = 1_700_000_000_000;
        let evs = vec![
            ev("g1", "1", "aa", "attached", t, S, None),
            ev("g1", "1", "aa", "volatile", t + 1_000, 2 * S, None),
            ev(
                "g1",
                "1",
                "aa",
                "recovering",
                t + 2_000 - 3_600_000,
                3 * S,
                None,
            ),
            // Another host, its clock fine: its event falls between.
            ev("g9", "7", "bb", "attached", t + 1_500, 40 * S, None),
        ];
        let (all, order) = merge(evs);
        assert_eq!(order, Order::Wall);
        let seq: Vec<(&str, &str)> = all
            .iter()
            .map(|e| (e.node_id.as_str(), e.to.as_deref().unwrap()))
            .collect();
        assert_eq!(
            seq,
            [
                ("g1", "attached"),
                ("g1", "volatile"),
                ("g9", "attached"),
                ("g1", "recovering")
            ]
        );
        assert_eq!(all[3].at_ns - all[0].at_ns, 2 * S);
    }

    #[test]
    fn times_round_trip_and_bad_ones_are_refused() {
        for s in [
            "1970-01-01T00:00:00.000Z",
            "2000-02-29T12:34:56.789Z",
            "2026-12-04T17:25:45.001Z",
        ] {
            assert_eq!(format_time(parse_time(s).unwrap()), s);
        }
        assert_eq!(parse_time("1733333333000"), Some(1_733_333_333_000 * MS));
        assert!(parse_time("2024-02-29T00:00:00Z").is_some());
        assert_eq!(parse_time("2026-12-04T17:25:45Z").unwrap() % S, 0);
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-12-04 17:25:45",
            "yesterday",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_session_prefix_must_be_long_and_unique() {
        let (all, _) = merge(vec![
            ev("g1", "1", "abcdef0011", "attached", 1, S, None),
            ev("g1", "1", "abcdef0022", "attached", 2, 2 * S, None),
        ]);
        let f = |p: &str| Filter {
            session: Some(p.into()),
            ..Filter::default()
        };
        assert!(matches!(
            lives(&all, &f("abcd")),
            Err(FilterError::TooShort(_))
        ));
        assert!(matches!(
            lives(&all, &f("abcdef00")),
            Err(FilterError::Ambiguous(_, 2))
        ));
        assert!(matches!(
            lives(&all, &f("ffffffff")),
            Err(FilterError::NoSuchSession(_))
        ));
        let one = lives(&all, &f("abcdef0022")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].session_id, "abcdef0022");
    }

    #[test]
    fn malformed_lines_are_counted_not_fatal() {
        let mut p = Parsed::default();
        parse(
            "{\"event_type\":\"X\",\"ts_ms\":1,\"mono_ns\":2,\"node_id\":\"g1\",\"incarnation\":\"1\"}\nnot json\n{\"ts_ms\":1}\n",
            &mut p,
        );
        assert_eq!((p.events.len(), p.skipped), (1, 2));
    }
}
