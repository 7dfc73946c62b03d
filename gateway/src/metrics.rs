//! The gateway's metrics catalogue: every metric is named and described here
//! and nowhere else. Label values come only from closed sets (reason codes,
//! states, the local enums below): never session ids, addresses or keys.

use jvpn_proto::reason::ReasonCode;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::engine::fsm::{Event, State, transition};

pub const CONNECTIONS_ACCEPTED: &str = "jvpn_gateway_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "jvpn_gateway_connections_rejected_total";
pub const CONNECTIONS_OPEN: &str = "jvpn_gateway_connections_open";
pub const TLS_IN_FLIGHT: &str = "jvpn_gateway_tls_handshakes_in_flight";
pub const TLS_QUEUE_WAITING: &str = "jvpn_gateway_tls_queue_waiting";
pub const TLS_HANDSHAKES: &str = "jvpn_gateway_tls_handshakes_total";
pub const TLS_TICKETS_REFUSED: &str = "jvpn_gateway_tls_tickets_refused_total";
pub const HELLOS: &str = "jvpn_gateway_hellos_total";
pub const KEEPALIVES_SENT: &str = "jvpn_gateway_keepalives_sent_total";
pub const RESUMES: &str = "jvpn_gateway_resumes_total";
pub const HELLO_SECONDS: &str = "jvpn_gateway_hello_duration_seconds";
pub const RESUME_SECONDS: &str = "jvpn_gateway_resume_duration_seconds";
pub const SESSIONS: &str = "jvpn_gateway_sessions";
pub const TRANSITIONS: &str = "jvpn_gateway_state_transitions_total";
pub const EVENTS_WRITTEN: &str = "jvpn_gateway_events_written_total";
pub const EVENTS_DROPPED: &str = "jvpn_gateway_events_dropped_total";
pub const SYSLOG_SENT: &str = "jvpn_gateway_syslog_events_sent_total";
pub const SYSLOG_DROPPED: &str = "jvpn_gateway_syslog_events_dropped_total";
pub const SYSLOG_CONNECTED: &str = "jvpn_gateway_syslog_connected";
pub const RATE_LIMITED: &str = "jvpn_gateway_rate_limited_total";
pub const OVERFLOW_BUCKET: &str = "jvpn_gateway_rate_limit_overflow_total";
pub const FRAMES_RECEIVED: &str = "jvpn_gateway_frames_received_total";
pub const DATA_BYTES: &str = "jvpn_gateway_data_bytes_total";
pub const DRAINING: &str = "jvpn_gateway_draining";
pub use jvpn_runtime::metrics::BUILD_INFO;
pub const HEALTH_CHECKS: &str = "jvpn_gateway_proxy_health_checks_total";
pub const HEARTBEATS_SENT: &str = "jvpn_gateway_heartbeats_sent_total";
pub const HEARTBEAT_STREAM_ERRORS: &str = "jvpn_gateway_heartbeat_stream_errors_total";
pub const SUPERSEDED: &str = "jvpn_gateway_superseded_total";
pub const VIEW_MISMATCH: &str = "jvpn_gateway_view_mismatch_total";
pub const RING_BUILDS: &str = "jvpn_gateway_ring_builds_total";
pub const STORE_KEEPALIVE_FAILURES: &str = "jvpn_gateway_store_keepalive_failures_total";
pub const STORE_LEASES_LOST: &str = "jvpn_gateway_store_leases_lost_total";
pub const STORE_WRITES: &str = "jvpn_gateway_store_writes_total";
pub const STORE_WRITE_RETRIES: &str = "jvpn_gateway_store_write_retries_total";
pub const STORE_FENCED_SESSIONS: &str = "jvpn_gateway_store_fenced_sessions_total";
pub const STORE_SESSIONS_MOVED: &str = "jvpn_gateway_store_sessions_moved_total";
pub const STORE_CLAIMS: &str = "jvpn_gateway_store_claims_total";
pub const STORE_SWEPT: &str = "jvpn_gateway_store_swept_total";
pub const STORE_SWEEP_PAGES: &str = "jvpn_gateway_store_sweep_pages_total";
pub const STORE_SWEEP_PASSES: &str = "jvpn_gateway_store_sweep_passes_total";
pub const STORE_SECONDS: &str = "jvpn_gateway_store_request_duration_seconds";
pub const STORE_BATCH_WRITES: &str = "jvpn_gateway_store_batch_writes";
/// Every `result` of [`STORE_CLAIMS`].
pub const CLAIM_RESULTS: [&str; 11] = [
    "ok",
    "no_record",
    "own",
    "not_migratable",
    "bad_proof",
    "stale_binding",
    "expired",
    "owner_alive",
    "conflict",
    "unavailable",
    "error",
];
pub const RING_BUILD_SECONDS: &str = "jvpn_gateway_ring_build_duration_seconds";
pub const VIEW_UNKNOWN: &str = "jvpn_gateway_heartbeat_view_unknown_total";
pub const LEASE_VALID: &str = "jvpn_gateway_lease_valid";
pub const CONFIG_RELOADS: &str = "jvpn_gateway_config_reloads_total";
pub const CONFIG_RELOAD_FAILURES: &str = "jvpn_gateway_config_reload_failures_total";
pub const STREAMS_OPENED: &str = "jvpn_gateway_streams_opened_total";
pub const STREAMS_OPEN: &str = "jvpn_gateway_streams_open";
pub const STREAMS_LIMIT: &str = "jvpn_gateway_streams_limit";
pub const STREAMS_REFUSED: &str = "jvpn_gateway_streams_refused_total";
pub const STREAMS_ENDED: &str = "jvpn_gateway_streams_ended_total";
pub const STREAM_BYTES: &str = "jvpn_gateway_stream_bytes_total";
pub const EGRESS_DENIED: &str = "jvpn_gateway_egress_denied_total";
pub const EGRESS_CONNECT_SECONDS: &str = "jvpn_gateway_egress_connect_duration_seconds";
pub const CHANNEL_BUFFERED: &str = "jvpn_gateway_channel_buffered_bytes";
pub const MEMORY_RECLAIM_SECONDS: &str = "jvpn_gateway_memory_reclaim_duration_seconds";
pub const CHANNEL_RESENT: &str = "jvpn_gateway_channel_resent_bytes_total";
pub const CHANNEL_ERRORS: &str = "jvpn_gateway_channel_protocol_errors_total";

/// Why a connection was closed before it reached the session engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnReject {
    RateLimited,
    Overloaded,
    BadPreamble,
    PreambleTimeout,
    ProxyForbidden,
    ProxyRequired,
    BadProxy,
    DirectForbidden,
    OwnerLost,
    TlsFailed,
    TlsTimeout,
    AlpnMismatch,
    FirstFrameTimeout,
    FrameTooLarge,
    ProtocolError,
    AuthFailed,
    Draining,
    NoLease,
}

impl ConnReject {
    pub const ALL: [ConnReject; 18] = [
        ConnReject::RateLimited,
        ConnReject::Overloaded,
        ConnReject::BadPreamble,
        ConnReject::PreambleTimeout,
        ConnReject::ProxyForbidden,
        ConnReject::ProxyRequired,
        ConnReject::BadProxy,
        ConnReject::DirectForbidden,
        ConnReject::OwnerLost,
        ConnReject::TlsFailed,
        ConnReject::TlsTimeout,
        ConnReject::AlpnMismatch,
        ConnReject::FirstFrameTimeout,
        ConnReject::FrameTooLarge,
        ConnReject::ProtocolError,
        ConnReject::AuthFailed,
        ConnReject::Draining,
        ConnReject::NoLease,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnReject::RateLimited => "rate_limited",
            ConnReject::Overloaded => "overloaded",
            ConnReject::BadPreamble => "bad_preamble",
            ConnReject::PreambleTimeout => "preamble_timeout",
            ConnReject::ProxyForbidden => "proxy_forbidden",
            ConnReject::ProxyRequired => "proxy_required",
            ConnReject::BadProxy => "bad_proxy",
            ConnReject::DirectForbidden => "direct_forbidden",
            ConnReject::OwnerLost => "owner_lost",
            ConnReject::TlsFailed => "tls_failed",
            ConnReject::TlsTimeout => "tls_timeout",
            ConnReject::AlpnMismatch => "alpn_mismatch",
            ConnReject::FirstFrameTimeout => "first_frame_timeout",
            ConnReject::FrameTooLarge => "frame_too_large",
            ConnReject::ProtocolError => "protocol_error",
            ConnReject::AuthFailed => "auth_failed",
            ConnReject::Draining => "draining",
            ConnReject::NoLease => "no_lease",
        }
    }
}

/// What a HELLO can be refused with (besides `ok`): each has a series at 0
/// from start-up.
pub const HELLO_REFUSALS: [ReasonCode; 7] = [
    ReasonCode::StoreUnavailable,
    ReasonCode::ProtocolError,
    ReasonCode::AuthFailed,
    ReasonCode::Draining,
    ReasonCode::NotInCluster,
    ReasonCode::InvalidTransition,
    ReasonCode::FrameTooLarge,
];

/// What a RESUME can be refused with (besides `ok`).
pub const RESUME_REFUSALS: [ReasonCode; 13] = [
    ReasonCode::StoreUnavailable,
    ReasonCode::OwnerUnreachable,
    ReasonCode::ProtocolError,
    ReasonCode::UnknownSession,
    ReasonCode::SessionLifetimeExceeded,
    ReasonCode::TransportTtlExceeded,
    ReasonCode::BadProof,
    ReasonCode::ReplayDetected,
    ReasonCode::StaleBinding,
    ReasonCode::SwitchRateLimited,
    ReasonCode::CooldownActive,
    ReasonCode::InvalidTransition,
    ReasonCode::FrameTooLarge,
];

/// Describes every metric (a metric without a description has no HELP line
/// and fails `promtool check metrics`).
pub fn describe() {
    describe_counter!(
        STORE_WRITES,
        "Topology 3: session record writes, by op (create at HELLO, bind at RESUME, delete when the session ends) and result (ok, conflict, unavailable, error)."
    );
    describe_counter!(
        STORE_WRITE_RETRIES,
        "Topology 3: record writes sent again because etcd did not answer (an election, a member down), by op (create, bind); each write waits at most until its lease's self-fence."
    );
    describe_counter!(
        STORE_CLAIMS,
        "Topology 3: takeovers this gateway attempted for sessions whose owner died, by result (ok; no_record, not_migratable, bad_proof, stale_binding, expired: refused as unknown_session; own, owner_alive, conflict: the agent retries; unavailable, error)."
    );
    describe_counter!(
        STORE_SWEPT,
        "Topology 3: session records the sweep removed, by reason (expired: a minute past the session's end of life, its owner gone or its delete lost; unclaimable: no taker may claim it and its owner is gone)."
    );
    describe_counter!(
        STORE_SWEEP_PAGES,
        "Topology 3: ranges of session records the sweep read, by result (ok; error: etcd failed or refused, the range is read again, and skipped after three failures)."
    );
    describe_counter!(
        STORE_SWEEP_PASSES,
        "Topology 3: times this gateway's sweep went past the last session id and started over (a full pass over the store)."
    );
    describe_counter!(
        STORE_FENCED_SESSIONS,
        "Topology 3: sessions ended with store_unavailable because the owner lease they were recorded under was lost (and they could not move to the next one)."
    );
    describe_counter!(
        STORE_SESSIONS_MOVED,
        "Topology 3: sessions of a lost owner lease moved to this gateway's next lease, by result (ok; lost: another gateway wrote the record meanwhile, the session ends; error)."
    );
    describe_counter!(
        STORE_KEEPALIVE_FAILURES,
        "Topology 3: owner lease grants or keep-alives that failed (store unreachable or slow)."
    );
    describe_counter!(
        STORE_LEASES_LOST,
        "Topology 3: owner leases lost, by how (deadline, lease_gone); the store-backed sessions of that lease stop being served until they move to the next lease (or end)."
    );
    describe_counter!(CONNECTIONS_ACCEPTED, "Client TCP connections accepted.");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Client connections closed before reaching a session, by reason."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Client connections currently open.");
    describe_gauge!(TLS_IN_FLIGHT, "TLS handshakes currently in progress.");
    describe_gauge!(
        TLS_QUEUE_WAITING,
        "Connections waiting for a TLS handshake slot."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        "Completed TLS handshakes by kind: full, or resumed from a ticket."
    );
    describe_counter!(
        TLS_TICKETS_REFUSED,
        "Resumption tickets refused (a full handshake follows), by reason."
    );
    describe_counter!(HELLOS, "HELLO attempts by result (ok or reason code).");
    describe_counter!(
        KEEPALIVES_SENT,
        "Keep-alives sent to agents that listen for them (nothing else went out for keepalive_interval_ms)."
    );
    describe_counter!(
        RESUMES,
        "RESUME attempts by result (ok or exact reason code)."
    );
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Topology 3: session store requests in the session path, by op (create, bind, load, claim, delete), whatever their result; a HELLO or RESUME waits for create or bind."
    );
    describe_histogram!(
        STORE_BATCH_WRITES,
        "Topology 3: record writes (creates at HELLO, binds at RESUME) carried by one etcd request; batches grow only while earlier requests are out."
    );
    describe_histogram!(
        HELLO_SECONDS,
        Unit::Seconds,
        "Time from accepting a connection to writing HelloOk."
    );
    describe_histogram!(
        RESUME_SECONDS,
        Unit::Seconds,
        "Time from accepting a connection to writing ResumeOk."
    );
    describe_gauge!(SESSIONS, "Sessions owned by this gateway, by state.");
    describe_counter!(
        TRANSITIONS,
        "Session state transitions by from, to and reason."
    );
    describe_counter!(EVENTS_WRITTEN, "Events written to the event sink.");
    describe_counter!(
        SYSLOG_SENT,
        "Events sent to the syslog collector (events.syslog_addr)."
    );
    describe_counter!(
        SYSLOG_DROPPED,
        "Events not sent to the syslog collector: its queue was full, or it broke or stalled mid-batch."
    );
    describe_gauge!(
        SYSLOG_CONNECTED,
        "1 while connected to the syslog collector."
    );
    describe_counter!(
        EVENTS_DROPPED,
        "Events dropped because the sink was full or broken."
    );
    describe_counter!(RATE_LIMITED, "Connections refused by admission, by stage.");
    describe_counter!(
        OVERFLOW_BUCKET,
        "Admission decisions made by the shared overflow bucket (source table full)."
    );
    describe_counter!(FRAMES_RECEIVED, "Frames received on attached transports.");
    describe_counter!(DATA_BYTES, "Data payload bytes, by direction.");
    describe_gauge!(DRAINING, "1 while the gateway drains.");
    describe_counter!(HEALTH_CHECKS, "PROXY LOCAL health checks from routers.");
    describe_counter!(HEARTBEATS_SENT, "Membership heartbeats sent to routers.");
    describe_counter!(
        HEARTBEAT_STREAM_ERRORS,
        "Heartbeat streams that failed or closed (each is retried)."
    );
    describe_counter!(
        SUPERSEDED,
        "Times a router said this incarnation was superseded (duplicate node id)."
    );
    describe_counter!(
        VIEW_MISMATCH,
        "Router replies this gateway could not verify: a secret proof or a view made under another cluster secret."
    );
    describe_counter!(
        RING_BUILDS,
        "Hash rings built from routers' views: one per distinct view, shared by every router that reports it."
    );
    describe_histogram!(
        RING_BUILD_SECONDS,
        Unit::Seconds,
        "Time to build the hash ring of a view a router reported."
    );
    describe_counter!(
        VIEW_UNKNOWN,
        "Router replies that named, without its members, a view this gateway no longer held (a reply that crossed a view change; no lease renewed by it)."
    );
    describe_gauge!(
        LEASE_VALID,
        "1 while this gateway holds a valid lease with the router (label: router id)."
    );
    describe_counter!(
        STREAMS_OPENED,
        "Streams (CONNECT) whose destination connection was established."
    );
    describe_gauge!(STREAMS_OPEN, "Streams currently open, over all sessions.");
    describe_gauge!(
        STREAMS_LIMIT,
        "Streams the whole gateway may have open (egress.max_streams, resolved): streams_open over this is the saturation."
    );
    describe_counter!(
        STREAMS_REFUSED,
        "CONNECT requests refused, by reason (not_allowed, timed_out, ...)."
    );
    describe_counter!(
        STREAMS_ENDED,
        "Streams ended, by how: closed (both halves) or reset."
    );
    describe_counter!(
        STREAM_BYTES,
        "Stream bytes moved between sessions and destinations, by direction."
    );
    describe_counter!(
        EGRESS_DENIED,
        "Resolved destination addresses the egress policy refused, by rule kind."
    );
    describe_histogram!(
        EGRESS_CONNECT_SECONDS,
        Unit::Seconds,
        "Time from a CONNECT request to the destination's TCP connection."
    );
    describe_gauge!(
        CHANNEL_BUFFERED,
        "Bytes held unacknowledged in session channels (toward agents)."
    );
    describe_histogram!(
        MEMORY_RECLAIM_SECONDS,
        Unit::Seconds,
        "Time each return of free heap pages to the kernel took (once after each burst of stream traffic, at most every 10 s)."
    );
    describe_counter!(
        CHANNEL_RESENT,
        "Channel bytes sent again after a RESUME (they were in flight on a lost transport)."
    );
    describe_counter!(
        CHANNEL_ERRORS,
        "Session channels ended because the agent broke their rules (the session ends)."
    );
    jvpn_runtime::metrics::describe_reloads(CONFIG_RELOADS, CONFIG_RELOAD_FAILURES);
    // Series alerts read exist from the start at 0: `increase()` needs a
    // sample before the first event to see it.
    for name in [
        CONFIG_RELOADS,
        CONFIG_RELOAD_FAILURES,
        CONNECTIONS_ACCEPTED,
        FRAMES_RECEIVED,
        EVENTS_WRITTEN,
        EVENTS_DROPPED,
        SYSLOG_SENT,
        SYSLOG_DROPPED,
        OVERFLOW_BUCKET,
        HEALTH_CHECKS,
        HEARTBEATS_SENT,
        HEARTBEAT_STREAM_ERRORS,
        SUPERSEDED,
        VIEW_MISMATCH,
        RING_BUILDS,
        VIEW_UNKNOWN,
        STREAMS_OPENED,
        CHANNEL_RESENT,
        CHANNEL_ERRORS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for stage in [
        "source",
        "handshake_budget",
        "tls_queue_full",
        "tls_queue_wait",
    ] {
        metrics::counter!(RATE_LIMITED, "stage" => stage).absolute(0);
    }
    zero_labelled_counters();
    metrics::gauge!(TLS_IN_FLIGHT).set(0.0);
    metrics::gauge!(TLS_QUEUE_WAITING).set(0.0);
    metrics::gauge!(CONNECTIONS_OPEN).set(0.0);
    metrics::gauge!(DRAINING).set(0.0);
    metrics::gauge!(SYSLOG_CONNECTED).set(0.0);
    metrics::gauge!(STREAMS_OPEN).set(0.0);
    metrics::gauge!(CHANNEL_BUFFERED).set(0.0);
}

/// Every series of a labelled counter exists at 0 from start-up, so that
/// `rate()` and `increase()` see the first burst (a series born at its
/// burst's count has no earlier sample to compare with).
fn zero_labelled_counters() {
    let zero = |name: &'static str, labels: &[(&'static str, &'static str)]| {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::from_static_parts(k, v))
            .collect();
        metrics::counter!(name, labels).absolute(0);
    };
    for r in ConnReject::ALL {
        zero(CONNECTIONS_REJECTED, &[("reason", r.as_str())]);
    }
    for kind in ["full", "resumed"] {
        zero(TLS_HANDSHAKES, &[("kind", kind)]);
    }
    for r in crate::tickets::TicketRefusal::ALL {
        zero(TLS_TICKETS_REFUSED, &[("reason", r.as_str())]);
    }
    for by in crate::store::LostBy::ALL {
        zero(STORE_LEASES_LOST, &[("by", by.as_str())]);
    }
    zero(STORE_KEEPALIVE_FAILURES, &[]);
    zero(STORE_FENCED_SESSIONS, &[]);
    for result in ["ok", "lost", "error"] {
        zero(STORE_SESSIONS_MOVED, &[("result", result)]);
    }
    for result in CLAIM_RESULTS {
        zero(STORE_CLAIMS, &[("result", result)]);
    }
    for op in ["create", "bind", "move"] {
        zero(STORE_WRITE_RETRIES, &[("op", op)]);
    }
    for why in crate::store::sweep::Swept::ALL {
        zero(STORE_SWEPT, &[("reason", why.as_str())]);
    }
    for result in ["ok", "error"] {
        zero(STORE_SWEEP_PAGES, &[("result", result)]);
    }
    zero(STORE_SWEEP_PASSES, &[]);
    for op in ["create", "bind", "delete"] {
        for result in ["ok", "conflict", "unavailable", "error"] {
            zero(STORE_WRITES, &[("op", op), ("result", result)]);
        }
    }
    zero(HELLOS, &[("result", "ok")]);
    zero(KEEPALIVES_SENT, &[]);
    for r in HELLO_REFUSALS {
        zero(HELLOS, &[("result", r.as_str())]);
    }
    zero(RESUMES, &[("result", "ok")]);
    for r in RESUME_REFUSALS {
        zero(RESUMES, &[("result", r.as_str())]);
    }
    // Every transition the state machine's table allows, with its reason.
    for from in State::ALL {
        for event in Event::all() {
            if let Ok((to, reason)) = transition(from, event) {
                zero(
                    TRANSITIONS,
                    &[
                        ("from", from.as_str()),
                        ("to", to.as_str()),
                        ("reason", reason.as_str()),
                    ],
                );
            }
        }
    }
    for direction in ["in", "out"] {
        zero(DATA_BYTES, &[("direction", direction)]);
    }
    for direction in STREAM_DIRECTIONS {
        zero(STREAM_BYTES, &[("direction", direction)]);
    }
    for how in STREAM_ENDINGS {
        zero(STREAMS_ENDED, &[("how", how)]);
    }
    for d in crate::egress::Denial::ALL {
        zero(EGRESS_DENIED, &[("rule", d.as_str())]);
    }
    for r in jvpn_proto::stream::Refusal::ALL {
        zero(STREAMS_REFUSED, &[("reason", r.as_str())]);
    }
}

/// Label values of `STREAM_BYTES` and `STREAMS_ENDED`.
pub const STREAM_DIRECTIONS: [&str; 2] = ["to_destination", "from_destination"];
/// `cancelled`: the agent reset the stream while its destination was being
/// dialed (it never opened).
pub const STREAM_ENDINGS: [&str; 3] = ["closed", "reset", "cancelled"];

/// Installs the Prometheus recorder for this process. Histograms get
/// buckets from 100 µs to 10 s.
pub fn install() -> Result<PrometheusHandle, jvpn_runtime::metrics::InstallError> {
    jvpn_runtime::metrics::install_for("gateway", describe)
}
