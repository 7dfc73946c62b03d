//! Router configuration: TOML file, then `JVPN_ROUTER__SECTION__KEY`
//! environment overrides, then validation naming every bad key. `check` runs
//! exactly [`load`]; nothing binds.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jvpn_proto::NodeId;
use jvpn_proto::keys::ClusterSecret;
use jvpn_runtime::config::{ConfigErrors, ConfigProblem, parse_layered, read_pem, require_nonzero};
use serde::Deserialize;

use crate::membership::MembershipConfig;

/// Environment prefix; `JVPN_ROUTER__MEMBERSHIP__FAILURE_TIMEOUT_MS=1500`.
pub const ENV_PREFIX: &str = "JVPN_ROUTER";

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// This router's name (PROXY TLV 0xE0, metrics, logs).
    pub router_id: String,
    /// Agents connect here.
    #[serde(default = "default_client_addr")]
    pub client_addr: SocketAddr,
    /// Gateways open their heartbeat streams here (gRPC over mTLS).
    #[serde(default = "default_membership_addr")]
    pub membership_addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/ring`. Loopback by default.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// File holding the bearer token for `POST /drain` on the admin port;
    /// unset disables it.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    pub cluster: ClusterSection,
    pub membership: MembershipSection,
    #[serde(default)]
    pub admission: AdmissionSection,
    #[serde(default)]
    pub timeouts: TimeoutSection,
    #[serde(default)]
    pub splice: SpliceSection,
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_membership_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7600))
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9400))
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name: gateway identities are `jvpn://<name>/gateway/<node>`.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// `<key_id>:<64 hex digits>`, the same file the gateways read.
    pub secret_file: PathBuf,
    /// The secret before the last rotation: its tokens are still routed.
    #[serde(default)]
    pub previous_secret_file: Option<PathBuf>,
    /// Virtual nodes per unit of weight on the ring.
    #[serde(default = "default_vnodes")]
    pub vnodes_per_weight: u32,
    /// Largest weight a gateway may claim.
    #[serde(default = "default_max_weight")]
    pub max_weight: u32,
    /// Topology 3 (the gateways share a session store on etcd): a RESUME
    /// whose owner is lost goes to the session's owner on the current
    /// ring, which claims it from the store (fenced), instead of being
    /// answered `owner_lost`. Off by default: a cluster without a store
    /// would only turn `owner_lost` into `unknown_session`, later.
    #[serde(default)]
    pub takeover: bool,
}

fn default_cluster_name() -> String {
    "jvpn".into()
}
fn default_vnodes() -> u32 {
    jvpn_proto::ring::DEFAULT_VNODES_PER_WEIGHT
}
fn default_max_weight() -> u32 {
    jvpn_proto::ring::MAX_WEIGHT
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSection {
    /// Server certificate (SAN `router.<cluster>`), from the membership CA.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA whose client certificates identify gateways.
    pub ca_file: PathBuf,
    /// Advertise IPs accepted even when the certificate does not name them.
    #[serde(default)]
    pub advertise_allow: Vec<IpAddr>,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_failure_timeout")]
    pub failure_timeout_ms: u64,
    /// How long after a death by silence alone RESUMEs for that gateway are
    /// still answered `owner_unreachable` (retry) rather than `owner_lost`:
    /// a paused gateway may come back with its sessions. Unset: 3 ×
    /// `failure_timeout_ms`.
    #[serde(default)]
    pub silence_grace_ms: Option<u64>,
    /// Told to gateways; must be below `failure_timeout_ms`.
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout_ms: u64,
    #[serde(default = "default_hold_down_base")]
    pub hold_down_base_ms: u64,
    #[serde(default = "default_hold_down_max")]
    pub hold_down_max_ms: u64,
    /// How long a dead gateway that stopped heartbeating (crashed, or
    /// drained for a restart) stays known, reported not alive, before this
    /// router forgets it. One that said it was leaving (`POST /leave`) is
    /// forgotten after `failure_timeout_ms`.
    #[serde(default = "default_forget_dead_after")]
    pub forget_dead_after_ms: u64,
    /// Open membership connections one source IP may hold (each gateway
    /// needs one; reconnects overlap briefly).
    #[serde(default = "default_membership_per_source")]
    pub max_connections_per_source: u32,
    /// Distinct source IPs tracked on the membership port; past it, new
    /// sources share one overflow allowance (fail closed).
    #[serde(default = "default_membership_sources")]
    pub max_sources: usize,
    /// Gateway source IPs that always get a place on the membership port
    /// (within `max_connections_per_source`), even when strangers filled
    /// the table; sources of authenticated heartbeat streams are added
    /// while the router runs. For the first minutes after a router restart.
    #[serde(default)]
    pub reserved_sources: Vec<IpAddr>,
    /// Refuse heartbeats without a cluster-secret proof. Off by default so
    /// gateways one version older (which send none) still join during a
    /// rolling upgrade; turn on once every gateway is upgraded.
    #[serde(default)]
    pub require_secret_proof: bool,
}

fn default_membership_per_source() -> u32 {
    8
}
fn default_membership_sources() -> usize {
    4_096
}

fn default_interval() -> u64 {
    250
}
fn default_failure_timeout() -> u64 {
    1000
}
fn default_lease_timeout() -> u64 {
    750
}
fn default_hold_down_base() -> u64 {
    2000
}
fn default_hold_down_max() -> u64 {
    60_000
}
fn default_forget_dead_after() -> u64 {
    24 * 3600 * 1000
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// New connections per second per source (IPv4 /32, IPv6 /64).
    pub per_source_rate_per_s: f64,
    pub per_source_burst: u32,
    /// Open connections per source at most.
    pub per_source_max_connections: u32,
    /// Tracked sources at most; past it unknown sources share one bucket.
    pub source_table_capacity: usize,
    /// Open client connections at most (router-wide).
    pub max_connections: usize,
    /// HELLOs forwarded per second to one gateway.
    pub hello_per_gateway_per_s: f64,
    /// RESUMEs forwarded per second to one gateway.
    pub resume_per_gateway_per_s: f64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        Self {
            per_source_rate_per_s: 100.0,
            per_source_burst: 200,
            per_source_max_connections: 512,
            source_table_capacity: 65_536,
            max_connections: 100_000,
            hello_per_gateway_per_s: 5_000.0,
            resume_per_gateway_per_s: 10_000.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutSection {
    pub preamble_timeout_ms: u64,
    /// TCP connect to a gateway.
    pub connect_timeout_ms: u64,
    /// On SIGTERM: how long spliced connections may finish.
    pub drain_timeout_ms: u64,
}

impl Default for TimeoutSection {
    fn default() -> Self {
        Self {
            preamble_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            drain_timeout_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpliceSection {
    /// Copy buffer (or splice chunk) per direction, allocated only while data is in flight.
    pub buffer_bytes: usize,
    /// `copy` (read/write through a buffer) or `pipe` (`splice(2)`).
    pub mode: crate::splice::Mode,
    /// Once one side of a spliced connection closed its direction, how
    /// long the other may go on before both are closed.
    pub half_close_timeout_ms: u64,
    /// How long no byte may move either way before the splice is closed;
    /// keep it well above the gateways' `heartbeat_interval_ms`.
    pub idle_timeout_ms: u64,
    /// TCP keepalive on both spliced sockets: probes after this much
    /// silence (0 = off). Whole seconds; below 1 s counts as 1 s.
    pub keepalive_ms: u64,
}

impl Default for SpliceSection {
    fn default() -> Self {
        Self {
            buffer_bytes: 64 * 1024,
            mode: crate::splice::Mode::Copy,
            half_close_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            keepalive_ms: 60_000,
        }
    }
}

/// Names the sections a reload (SIGHUP) cannot change: everything but
/// `[admission]`. Routers hold no sessions, so the rest is a restart away.
pub fn restart_only_changes(old: &RouterConfig, new: &RouterConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    // Every field named, so that a new one must be placed here.
    // [admission] and the admin token (its file may move) apply at once.
    let RouterConfig {
        router_id,
        client_addr,
        membership_addr,
        admin_addr,
        admin_token_file: _,
        cluster,
        membership,
        admission: _,
        timeouts,
        splice,
    } = old;
    check("router_id", *router_id == new.router_id);
    check("client_addr", *client_addr == new.client_addr);
    check("membership_addr", *membership_addr == new.membership_addr);
    check("admin_addr", *admin_addr == new.admin_addr);
    check("cluster", *cluster == new.cluster);
    check("membership", *membership == new.membership);
    check("timeouts", *timeouts == new.timeouts);
    check("splice", *splice == new.splice);
    out
}

/// Files read once at start whose contents differ in `new` (the same
/// paths rewritten): a reload cannot apply them, and must not say it did.
pub fn restart_only_files(old: &Validated, new: &Validated) -> Vec<&'static str> {
    let tag = |s: &ClusterSecret| *s.derive().tag_key();
    let mut out = Vec::new();
    if tag(&old.secret) != tag(&new.secret) {
        out.push("cluster.secret_file");
    }
    if old.previous_secret.as_ref().map(tag) != new.previous_secret.as_ref().map(tag) {
        out.push("cluster.previous_secret_file");
    }
    for (key, a, b) in [
        ("membership.cert_file", &old.cert_pem, &new.cert_pem),
        ("membership.key_file", &*old.key_pem, &*new.key_pem),
        ("membership.ca_file", &old.ca_pem, &new.ca_pem),
    ] {
        if a != b {
            out.push(key);
        }
    }
    out
}

/// A configuration that passed every check, with its files read.
#[derive(Clone, Debug)]
pub struct Validated {
    pub raw: RouterConfig,
    pub router_id: NodeId,
    pub secret: ClusterSecret,
    pub previous_secret: Option<ClusterSecret>,
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub ca_pem: Vec<u8>,
    pub admin_token: Option<jvpn_runtime::admin::AdminToken>,
    /// The file it was read from (reloads read it again).
    pub source: Option<PathBuf>,
}

impl Validated {
    pub fn membership(&self) -> MembershipConfig {
        let m = &self.raw.membership;
        MembershipConfig {
            interval: Duration::from_millis(m.interval_ms),
            failure_timeout: Duration::from_millis(m.failure_timeout_ms),
            silence_grace: Duration::from_millis(
                m.silence_grace_ms
                    .unwrap_or(m.failure_timeout_ms.saturating_mul(3)),
            ),
            mass_death_hold: Duration::from_millis(m.failure_timeout_ms.saturating_mul(10)),
            hold_down_base: Duration::from_millis(m.hold_down_base_ms),
            hold_down_max: Duration::from_millis(m.hold_down_max_ms),
            forget_left_after: Duration::from_millis(m.failure_timeout_ms),
            forget_failed_after: Duration::from_millis(m.forget_dead_after_ms),
            ..MembershipConfig::default()
        }
    }
}

pub fn load(path: &Path) -> Result<Validated, ConfigErrors> {
    load_with_env(path, std::env::vars())
}

pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Validated, ConfigErrors> {
    let raw: RouterConfig = parse_layered(
        path,
        env,
        ENV_PREFIX,
        &["membership.advertise_allow", "membership.reserved_sources"],
    )?;
    let mut v = validate(raw)?;
    v.source = Some(path.to_path_buf());
    Ok(v)
}

fn validate(raw: RouterConfig) -> Result<Validated, ConfigErrors> {
    let mut errs = Vec::new();
    let router_id = NodeId::new(&raw.router_id)
        .map_err(|e| errs.push(ConfigProblem::new("router_id", e)))
        .ok();
    if let Err(e) = NodeId::new(&raw.cluster.name) {
        errs.push(ConfigProblem::new("cluster.name", e));
    }
    let c = &raw.cluster;
    if !(jvpn_proto::ring::MIN_VNODES_PER_WEIGHT..=jvpn_proto::ring::MAX_VNODES_PER_WEIGHT)
        .contains(&c.vnodes_per_weight)
    {
        errs.push(ConfigProblem::new(
            "cluster.vnodes_per_weight",
            format!(
                "must be in {}..={}",
                jvpn_proto::ring::MIN_VNODES_PER_WEIGHT,
                jvpn_proto::ring::MAX_VNODES_PER_WEIGHT
            ),
        ));
    }
    if !(1..=jvpn_proto::ring::MAX_WEIGHT).contains(&c.max_weight) {
        errs.push(ConfigProblem::new(
            "cluster.max_weight",
            format!("must be in 1..={}", jvpn_proto::ring::MAX_WEIGHT),
        ));
    }
    let m = &raw.membership;
    require_nonzero(
        &mut errs,
        &[
            ("membership.interval_ms", m.interval_ms),
            ("membership.failure_timeout_ms", m.failure_timeout_ms),
            ("membership.lease_timeout_ms", m.lease_timeout_ms),
            ("membership.hold_down_base_ms", m.hold_down_base_ms),
            ("membership.hold_down_max_ms", m.hold_down_max_ms),
            (
                "membership.max_connections_per_source",
                u64::from(m.max_connections_per_source),
            ),
            ("membership.max_sources", m.max_sources as u64),
            (
                "timeouts.preamble_timeout_ms",
                raw.timeouts.preamble_timeout_ms,
            ),
            (
                "timeouts.connect_timeout_ms",
                raw.timeouts.connect_timeout_ms,
            ),
            ("timeouts.drain_timeout_ms", raw.timeouts.drain_timeout_ms),
            ("splice.buffer_bytes", raw.splice.buffer_bytes as u64),
            (
                "splice.half_close_timeout_ms",
                raw.splice.half_close_timeout_ms,
            ),
            ("splice.idle_timeout_ms", raw.splice.idle_timeout_ms),
            (
                "admission.per_source_burst",
                u64::from(raw.admission.per_source_burst),
            ),
            (
                "admission.per_source_max_connections",
                u64::from(raw.admission.per_source_max_connections),
            ),
            (
                "admission.source_table_capacity",
                raw.admission.source_table_capacity as u64,
            ),
            (
                "admission.max_connections",
                raw.admission.max_connections as u64,
            ),
        ],
    );
    if m.lease_timeout_ms <= m.interval_ms {
        errs.push(ConfigProblem::new(
            "membership.lease_timeout_ms",
            "must be above membership.interval_ms (a lease outlasts the gap to the next heartbeat)",
        ));
    }
    if m.lease_timeout_ms >= m.failure_timeout_ms {
        errs.push(ConfigProblem::new(
            "membership.lease_timeout_ms",
            "must be below membership.failure_timeout_ms (leases end before deaths)",
        ));
    }
    if m.failure_timeout_ms < 2 * m.interval_ms {
        errs.push(ConfigProblem::new(
            "membership.failure_timeout_ms",
            "must be at least twice membership.interval_ms",
        ));
    }
    if m.forget_dead_after_ms < m.failure_timeout_ms {
        errs.push(ConfigProblem::new(
            "membership.forget_dead_after_ms",
            "must be at least membership.failure_timeout_ms",
        ));
    }
    // Past these, a value is a typo: a gateway held down for days, or a
    // keepalive the kernel refuses (TCP_KEEPIDLE is at most 32,767 s).
    if m.hold_down_max_ms > 86_400_000 {
        errs.push(ConfigProblem::new(
            "membership.hold_down_max_ms",
            "must be at most 86400000 (a day)",
        ));
    }
    if raw.splice.keepalive_ms > 32_767_000 {
        errs.push(ConfigProblem::new(
            "splice.keepalive_ms",
            "must be at most 32767000 (the kernel's TCP_KEEPIDLE limit)",
        ));
    }
    if m.hold_down_max_ms < m.hold_down_base_ms {
        errs.push(ConfigProblem::new(
            "membership.hold_down_max_ms",
            "must be at least membership.hold_down_base_ms",
        ));
    }
    if raw.splice.buffer_bytes > 16 * 1024 * 1024 {
        errs.push(ConfigProblem::new(
            "splice.buffer_bytes",
            "must be at most 16 MiB",
        ));
    }
    let a = &raw.admission;
    for (key, v) in [
        ("admission.per_source_rate_per_s", a.per_source_rate_per_s),
        (
            "admission.hello_per_gateway_per_s",
            a.hello_per_gateway_per_s,
        ),
        (
            "admission.resume_per_gateway_per_s",
            a.resume_per_gateway_per_s,
        ),
    ] {
        if !(v.is_finite() && v > 0.0) {
            errs.push(ConfigProblem::new(key, "must be a positive number"));
        }
    }
    let (secret, previous_secret) = jvpn_runtime::config::read_secrets(
        &c.secret_file,
        c.previous_secret_file.as_deref(),
        &mut errs,
    );
    let admin_token =
        jvpn_runtime::config::load_admin_token(raw.admin_token_file.as_deref(), &mut errs);
    let cert = read_pem("membership.cert_file", Some(&m.cert_file), &mut errs);
    let key = read_pem("membership.key_file", Some(&m.key_file), &mut errs);
    let ca = read_pem("membership.ca_file", Some(&m.ca_file), &mut errs);
    // As TLS will use them: a key that is not the certificate's would
    // otherwise stop the router at start with a bare TLS error.
    if let (Some(cert), Some(key)) = (&cert, &key)
        && let Err(p) =
            jvpn_runtime::tls::identity(cert, "membership.cert_file", key, "membership.key_file")
    {
        errs.push(p);
    }
    if let Some(ca) = &ca
        && let Err(p) = jvpn_runtime::tls::roots_in(ca, "membership.ca_file")
    {
        errs.push(p);
    }
    match (router_id, secret, cert, key, ca) {
        (Some(router_id), Some(secret), Some(cert_pem), Some(key), Some(ca_pem))
            if errs.is_empty() =>
        {
            Ok(Validated {
                raw,
                router_id,
                secret,
                previous_secret,
                cert_pem,
                key_pem: zeroize::Zeroizing::new(key),
                ca_pem,
                admin_token,
                source: None,
            })
        }
        _ => Err(ConfigErrors(errs)),
    }
}
