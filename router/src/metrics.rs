//! The router's metrics catalogue. Label values come only from closed sets
//! and configured node ids: never session ids, addresses, view ids or
//! incarnations.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const CONNECTIONS: &str = "jvpn_router_connections_total";
pub const CONNECTIONS_OPEN: &str = "jvpn_router_connections_open";
pub const MAX_CONNECTIONS: &str = "jvpn_router_max_connections";
pub const SPLICED_BYTES: &str = "jvpn_router_spliced_bytes_total";
pub const CONNECT_SECONDS: &str = "jvpn_router_gateway_connect_duration_seconds";
pub const CONNECT_FAILURES: &str = "jvpn_router_gateway_connect_failures_total";
pub const CLOSED_ON_DEATH: &str = "jvpn_router_connections_closed_on_member_death_total";
pub const MEMBERS: &str = "jvpn_router_members";
pub const TOMBSTONES: &str = "jvpn_router_tombstones";
pub const TOKEN_SPLICES_REFUSED: &str = "jvpn_router_token_splices_refused_total";
pub const TAKEOVERS_ROUTED: &str = "jvpn_router_takeovers_routed_total";
pub const MEMBER_ALIVE: &str = "jvpn_router_member_alive";
pub const MEMBER_PLACEABLE: &str = "jvpn_router_member_placeable";
pub const CONFIG_RELOADS: &str = "jvpn_router_config_reloads_total";
pub const CONFIG_RELOAD_FAILURES: &str = "jvpn_router_config_reload_failures_total";
pub const RING_MEMBERS: &str = "jvpn_router_ring_members";
pub const RING_CHANGES: &str = "jvpn_router_ring_changes_total";
pub const MEMBER_DEATHS: &str = "jvpn_router_member_deaths_total";
pub const HEARTBEATS: &str = "jvpn_router_heartbeats_total";
pub const VIEWS_OMITTED: &str = "jvpn_router_heartbeat_views_omitted_total";
pub const VIEW_DELTAS: &str = "jvpn_router_heartbeat_view_deltas_total";
pub const MEMBERSHIP_REFUSED: &str = "jvpn_router_membership_refused_total";
pub const MEMBERSHIP_CONNECTIONS_REFUSED: &str = "jvpn_router_membership_connections_refused_total";
pub const UNHEALTHY: &str = "jvpn_router_unhealthy";
pub const ROUTED_TO_UNPLACEABLE: &str = "jvpn_router_routed_to_unplaceable_total";
pub const RESUMES_OFF_SHARD: &str = "jvpn_router_resumes_off_shard_total";
pub const OVERFLOW_BUCKET: &str = "jvpn_router_rate_limit_overflow_total";
pub const REACHABILITY_PROBES: &str = "jvpn_router_reachability_probes_total";
pub const TICK_LATENESS: &str = "jvpn_router_tick_lateness_seconds";
pub const TICK_SECONDS: &str = "jvpn_router_tick_duration_seconds";
pub const RING_BUILD_SECONDS: &str = "jvpn_router_ring_build_duration_seconds";

/// Label values of `TOKEN_SPLICES_REFUSED`.
pub const TOKEN_REFUSALS: [&str; 2] = ["too_often", "table_full"];

/// Describes every metric (no HELP line fails `promtool check metrics`).
pub fn describe() {
    describe_counter!(
        CONNECTIONS,
        "Client connections by preamble kind and outcome (spliced or why not)."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Client connections currently open.");
    describe_gauge!(
        MAX_CONNECTIONS,
        "Client connections admitted at most: admission.max_connections, or less when the open-file limit holds fewer."
    );
    describe_counter!(
        SPLICED_BYTES,
        Unit::Bytes,
        "Bytes copied between agents and gateways, by direction."
    );
    describe_histogram!(
        CONNECT_SECONDS,
        Unit::Seconds,
        "Time to open a TCP connection to a gateway."
    );
    describe_counter!(CONNECT_FAILURES, "Failed TCP connects to gateways.");
    describe_counter!(
        CLOSED_ON_DEATH,
        "Spliced connections closed because their gateway stopped being alive."
    );
    describe_gauge!(
        MEMBERS,
        "Gateways known to this router, by state (known, alive, placeable)."
    );
    describe_gauge!(RING_MEMBERS, "Gateways on the current ring.");
    describe_counter!(
        TAKEOVERS_ROUTED,
        "Topology 3 ([cluster] takeover): RESUMEs whose owner was lost, sent to the session's shard owner to be claimed from the shared store."
    );
    describe_counter!(
        TOKEN_SPLICES_REFUSED,
        "RESUMEs refused because one routing token was spliced too often, or too many tokens were in use (reason)."
    );
    describe_gauge!(
        TOMBSTONES,
        "Superseded gateway incarnations remembered (refused if they come back)."
    );
    describe_counter!(RING_CHANGES, "Ring rebuilds (view changes).");
    describe_counter!(MEMBER_DEATHS, "Gateways declared not alive.");
    describe_counter!(
        HEARTBEATS,
        "Heartbeats received, by verdict (accepted, superseded)."
    );
    describe_counter!(
        VIEWS_OMITTED,
        "Heartbeat replies sent without the members: the gateway already held the view."
    );
    describe_counter!(
        VIEW_DELTAS,
        "Heartbeat replies that carried only what changed since the view the gateway held."
    );
    describe_counter!(
        MEMBERSHIP_REFUSED,
        "Heartbeat streams refused, by reason (identity, advertise, weight, malformed)."
    );
    describe_counter!(
        MEMBERSHIP_CONNECTIONS_REFUSED,
        "Membership-port connections closed before TLS: their source held its cap of open connections."
    );
    describe_gauge!(
        UNHEALTHY,
        "1 while the router distrusts its own view (mass-death guard)."
    );
    describe_counter!(
        ROUTED_TO_UNPLACEABLE,
        "HELLOs spliced to a gateway that was no longer placeable (should stay 0)."
    );
    describe_counter!(
        RESUMES_OFF_SHARD,
        "RESUMEs routed to an owner that is no longer the id's ring owner (kept across a ring change)."
    );
    describe_counter!(
        OVERFLOW_BUCKET,
        "Admission decisions made by a shared overflow entry (source table full), by table."
    );
    describe_counter!(
        REACHABILITY_PROBES,
        "Connects to gateways that died unreachable but still heartbeat, by result; one success brings the gateway back (held down)."
    );
    describe_histogram!(
        TICK_LATENESS,
        Unit::Seconds,
        "How late the 50 ms membership ticker ran (self-suspicion input)."
    );
    describe_histogram!(
        TICK_SECONDS,
        Unit::Seconds,
        "Time one membership tick took (death verdicts, routing snapshot, gauges); ring builds run apart."
    );
    describe_histogram!(
        RING_BUILD_SECONDS,
        Unit::Seconds,
        "Time to build the hash ring of a new view."
    );
    jvpn_runtime::metrics::describe_reloads(CONFIG_RELOADS, CONFIG_RELOAD_FAILURES);
    // Series alerts read exist from the start at 0: `increase()` needs a
    // sample before the first event to see it.
    for name in [
        CONFIG_RELOADS,
        CONFIG_RELOAD_FAILURES,
        CLOSED_ON_DEATH,
        MEMBER_DEATHS,
        ROUTED_TO_UNPLACEABLE,
        RESUMES_OFF_SHARD,
        RING_CHANGES,
        VIEWS_OMITTED,
        VIEW_DELTAS,
        CONNECT_FAILURES,
        MEMBERSHIP_CONNECTIONS_REFUSED,
        TAKEOVERS_ROUTED,
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::counter!(HEARTBEATS, "verdict" => "superseded").absolute(0);
    metrics::counter!(HEARTBEATS, "verdict" => "accepted").absolute(0);
    // Every series of a labelled counter exists at 0 from start-up, so that
    // `rate()` and `increase()` see the first burst.
    for (kind, outcome) in crate::forward::Outcome::SERIES {
        metrics::counter!(CONNECTIONS, "kind" => kind, "result" => outcome.as_str()).absolute(0);
    }
    for reason in TOKEN_REFUSALS {
        metrics::counter!(TOKEN_SPLICES_REFUSED, "reason" => reason).absolute(0);
    }
    for direction in ["up", "down"] {
        metrics::counter!(SPLICED_BYTES, "direction" => direction).absolute(0);
    }
    for r in crate::service::Refusal::ALL {
        metrics::counter!(MEMBERSHIP_REFUSED, "reason" => r.as_str()).absolute(0);
    }
    metrics::counter!(OVERFLOW_BUCKET, "table" => "rate").absolute(0);
    metrics::counter!(OVERFLOW_BUCKET, "table" => "concurrency").absolute(0);
    metrics::counter!(OVERFLOW_BUCKET, "table" => "membership").absolute(0);
    metrics::counter!(REACHABILITY_PROBES, "result" => "ok").absolute(0);
    metrics::counter!(REACHABILITY_PROBES, "result" => "failed").absolute(0);
    metrics::gauge!(UNHEALTHY).set(0.0);
}

/// The per-gateway gauges ([`MEMBER_ALIVE`], [`MEMBER_PLACEABLE`]), drawn
/// at scrape time from the membership the last tick published: a gateway
/// the router forgot is not listed at all (the recorder can only set a
/// series, never remove one, so a decommissioned gateway would read 0, and
/// page, for the router's life). `(node id, alive, placeable)`, one per
/// node id; node ids are `[A-Za-z0-9._-]`, nothing to escape.
pub fn render_member_gauges(members: &[(String, bool, bool)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if members.is_empty() {
        return out;
    }
    let gauges = [
        (
            MEMBER_ALIVE,
            "1 while this router holds a live incarnation of the gateway node_id, else 0; gateways the router forgot are not listed.",
        ),
        (
            MEMBER_PLACEABLE,
            "1 while the gateway node_id receives new sessions from this router, else 0.",
        ),
    ];
    for (i, (name, help)) in gauges.into_iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for m in members {
            let _ = writeln!(
                out,
                "{name}{{node_id=\"{}\"}} {}",
                m.0,
                u8::from(if i == 0 { m.1 } else { m.2 })
            );
        }
        out.push('\n');
    }
    out
}
