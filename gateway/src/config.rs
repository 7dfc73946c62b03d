//! Gateway configuration: TOML file, then `JVPN_GATEWAY__SECTION__KEY`
//! environment overrides, then validation that names every bad key.
//!
//! Loading never binds a socket; [`load`] is exactly what `jvpn-gateway
//! check` runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jvpn_proto::NodeId;
use jvpn_proto::keys::ClusterSecret;
use jvpn_runtime::config::{load_admin_token, parse_layered, read_pem, require_nonzero};
use serde::Deserialize;

pub use jvpn_runtime::config::{ConfigErrors, ConfigProblem};

use crate::engine::Policy;
pub use crate::tls::TlsConfig;
use crate::tls::{self, TlsMaterial};

/// Environment prefix; `JVPN_GATEWAY__POLICY__SWITCH_COOLDOWN_MS=2000`.
pub const ENV_PREFIX: &str = "JVPN_GATEWAY";

/// The file as written by the operator. Every key has a default except the
/// node id, the TLS files and the cluster secret.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This gateway's name in the cluster (`g1`).
    pub node_id: String,
    /// Client listener (agents, or routers in cluster mode).
    #[serde(default = "default_client_addr")]
    pub client_addr: SocketAddr,
    /// Admin HTTP listener: metrics, health, sessions. Loopback by default.
    #[serde(default = "default_admin_addr")]
    pub admin_addr: SocketAddr,
    /// Directory this gateway locks exclusively while it runs, so two
    /// processes can never serve as the same node from one host.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// File holding the bearer token for `POST /drain` and session lookups
    /// on the admin port; unset disables them.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default)]
    pub events: EventsConfig,
    /// Where sessions' streams may go (the data plane; issue 15).
    #[serde(default)]
    pub egress: crate::egress::EgressConfig,
    /// The shared session store (topology 3); in memory by default.
    #[serde(default)]
    pub store: StoreConfig,
}

/// Which session store a gateway uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Sessions live in their owner's memory only (topologies 1 and 2).
    #[default]
    Memory,
    /// Topology 3: records in etcd, owner liveness as an etcd lease.
    Etcd,
}

/// `[store]`: the shared session store of topology 3 (DESIGN.md §9).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd client URLs, `https://host:port`, one per member.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix; records go under `<prefix>/<cluster.name>/`.
    #[serde(default = "default_store_prefix")]
    pub prefix: String,
    /// The owner lease's TTL (etcd counts whole seconds).
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// How long before the lease's end this gateway stops serving.
    #[serde(default = "default_lease_margin_ms")]
    pub lease_margin_ms: u64,
    /// Bound on every store request; past it the request failed (closed).
    #[serde(default = "default_store_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Between two pages of the sweep of unusable records (0: no sweep).
    #[serde(default = "default_sweep_interval_ms")]
    pub sweep_interval_ms: u64,
    /// Records the sweep reads per page.
    #[serde(default = "default_sweep_page")]
    pub sweep_page: u32,
    /// How records are sealed: 2 (every field; the default) or 1 (the
    /// resume key's place only, as the previous version wrote, which that
    /// version can still take over during a rolling upgrade).
    #[serde(default = "default_record_seal")]
    pub record_seal: u8,
    /// PEM: the CA of etcd's client port, and this gateway's client
    /// certificate and key (mTLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Memory,
            endpoints: Vec::new(),
            prefix: default_store_prefix(),
            lease_ttl_ms: default_lease_ttl_ms(),
            lease_margin_ms: default_lease_margin_ms(),
            request_timeout_ms: default_store_request_timeout_ms(),
            sweep_interval_ms: default_sweep_interval_ms(),
            sweep_page: default_sweep_page(),
            record_seal: default_record_seal(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

fn default_store_prefix() -> String {
    "/jvpn".into()
}
fn default_lease_ttl_ms() -> u64 {
    2000
}
fn default_lease_margin_ms() -> u64 {
    300
}
fn default_store_request_timeout_ms() -> u64 {
    600
}
fn default_sweep_interval_ms() -> u64 {
    5000
}
/// How `store` says records are sealed (validated: 1 or 2).
pub fn record_seal(store: &StoreConfig) -> jvpn_proto::store_record::Seal {
    match store.record_seal {
        1 => jvpn_proto::store_record::Seal::V1,
        _ => jvpn_proto::store_record::Seal::V2,
    }
}

fn default_record_seal() -> u8 {
    2
}

fn default_sweep_page() -> u32 {
    256
}

/// Checks `[store]`; with the etcd backend, the client configuration.
fn store_config(
    s: &StoreConfig,
    cluster: &str,
    errs: &mut Vec<ConfigProblem>,
) -> Option<crate::store::EtcdConfig> {
    if s.backend == StoreBackend::Memory {
        return None;
    }
    let before = errs.len();
    if s.endpoints.is_empty() {
        errs.push(ConfigProblem::new(
            "store.endpoints",
            "the etcd backend needs at least one endpoint",
        ));
    }
    for e in &s.endpoints {
        let ok = e
            .parse::<hyper::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https") && u.authority().is_some());
        if !ok {
            errs.push(ConfigProblem::new(
                "store.endpoints",
                format!("{e:?} is not an https://host:port URL (etcd is reached over mTLS)"),
            ));
        }
    }
    if !s.prefix.starts_with('/') || s.prefix.ends_with('/') {
        errs.push(ConfigProblem::new(
            "store.prefix",
            "must start with '/' and not end with one",
        ));
    }
    if s.lease_ttl_ms < 2000 || !s.lease_ttl_ms.is_multiple_of(1000) {
        errs.push(ConfigProblem::new(
            "store.lease_ttl_ms",
            "etcd leases are whole seconds: a multiple of 1000, at least 2000",
        ));
    }
    if s.lease_margin_ms == 0 || s.lease_margin_ms.saturating_mul(2) > s.lease_ttl_ms {
        errs.push(ConfigProblem::new(
            "store.lease_margin_ms",
            "must be above zero and at most half of store.lease_ttl_ms",
        ));
    }
    if s.request_timeout_ms == 0 || s.request_timeout_ms.saturating_mul(3) > s.lease_ttl_ms {
        errs.push(ConfigProblem::new(
            "store.request_timeout_ms",
            "must be above zero and at most a third of store.lease_ttl_ms (a failed renewal must leave time for the next before the deadline)",
        ));
    }
    if !(1..=2).contains(&s.record_seal) {
        errs.push(ConfigProblem::new(
            "store.record_seal",
            "must be 2 (every field of a record sealed) or 1 (as the previous version, during a rolling upgrade)",
        ));
    }
    if !(1..=1_000).contains(&s.sweep_page) {
        errs.push(ConfigProblem::new(
            "store.sweep_page",
            "must be between 1 and 1000 (records read per sweep request)",
        ));
    }
    if s.sweep_interval_ms != 0 && !(100..=3_600_000).contains(&s.sweep_interval_ms) {
        errs.push(ConfigProblem::new(
            "store.sweep_interval_ms",
            "must be 0 (no sweep) or between 100 and 3600000",
        ));
    }
    let ca = read_pem("store.ca_file", s.ca_file.as_deref(), errs);
    let cert = read_pem("store.cert_file", s.cert_file.as_deref(), errs);
    let key = read_pem("store.key_file", s.key_file.as_deref(), errs);
    let (Some(ca_pem), Some(cert_pem), Some(key_pem)) = (ca, cert, key) else {
        return None;
    };
    (errs.len() == before).then(|| crate::store::EtcdConfig {
        endpoints: s.endpoints.clone(),
        prefix: format!("{}/{cluster}", s.prefix),
        tls: Some(crate::store::EtcdTls {
            ca_pem,
            cert_pem,
            key_pem,
        }),
        request_timeout: std::time::Duration::from_millis(s.request_timeout_ms),
    })
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static agent tokens, for development only.
    #[serde(default)]
    pub dev_tokens: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// File holding `<key_id>:<64 hex digits>`.
    pub secret_file: PathBuf,
    /// The secret before the last rotation: topology 3's records sealed
    /// under it are still opened (a takeover of an idle session).
    #[serde(default)]
    pub previous_secret_file: Option<PathBuf>,
    /// Router source addresses (exact IPs). Empty: single-node mode. Non-empty:
    /// a PROXY v2 header is mandatory from these and forbidden from anyone else.
    #[serde(default)]
    pub routers: Vec<std::net::IpAddr>,
    /// In cluster mode, also accept agents connecting directly (no PROXY).
    #[serde(default)]
    pub direct_clients: bool,
    /// Cluster name: membership identities are `jvpn://<name>/gateway/<node>`
    /// and routers present `router.<name>`.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// Router membership endpoints (`host:port`), one heartbeat stream each.
    /// Empty with `routers` set: static PROXY mode (no membership, no leases).
    #[serde(default)]
    pub membership_endpoints: Vec<String>,
    /// Membership client certificate (URI SAN `jvpn://<name>/gateway/<node>`).
    #[serde(default)]
    pub membership_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub membership_key_file: Option<PathBuf>,
    /// CA that signed the routers' membership certificates.
    #[serde(default)]
    pub membership_ca_file: Option<PathBuf>,
    /// Address routers connect to for client traffic; default: the bound client address.
    #[serde(default)]
    pub advertise_addr: Option<SocketAddr>,
    /// Share of new sessions relative to other gateways (1..=16).
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Lease length after an acknowledged heartbeat's send time; must be
    /// shorter than the routers' failure timeout.
    #[serde(default = "default_lease_timeout_ms")]
    pub lease_timeout_ms: u64,
    /// Once leased, a gateway that no router has leased for this long exits
    /// (75) rather than rejoin: routers may have forgotten that a newer
    /// incarnation replaced it. 0: never.
    #[serde(default = "default_unleased_exit_ms")]
    pub unleased_exit_ms: u64,
}

fn default_cluster_name() -> String {
    "jvpn".into()
}
fn default_weight() -> u32 {
    1
}
fn default_heartbeat_interval_ms() -> u64 {
    250
}
fn default_lease_timeout_ms() -> u64 {
    750
}

/// The routers' tombstone lifetime at their defaults (60 × 1 s).
fn default_unleased_exit_ms() -> u64 {
    60_000
}

/// Membership files read at startup.
#[derive(Clone)]
pub struct MembershipFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub ca_pem: Vec<u8>,
    /// Certificate, key and CA paths: heartbeat streams read them again
    /// when they (re)connect.
    pub paths: [PathBuf; 3],
}

impl std::fmt::Debug for MembershipFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MembershipFiles { .. }")
    }
}

/// Default TLS handshakes in flight per core (design note 19).
pub const TLS_SLOTS_PER_CORE: usize = 256;

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// New connections per second per source (IPv4 /32, IPv6 /64).
    pub per_source_rate_per_s: f64,
    /// Burst allowed per source.
    pub per_source_burst: u32,
    /// Hard cap on tracked sources; past it unknown sources share one bucket.
    pub source_table_capacity: usize,
    /// TLS handshakes in progress at once; 0 = 256 × CPU cores. A handshake
    /// waiting on a slow client costs memory, not CPU (the CPU is bounded by
    /// `handshakes_per_s`), so this is sized by Little's law for real RTTs.
    pub max_tls_handshakes_in_flight: usize,
    /// Connections that may wait for a TLS slot; past it, `overloaded`.
    pub tls_queue_max: usize,
    /// Longest wait for a TLS slot, and the most queued work (at the measured
    /// completion rate) a new connection may join.
    pub tls_queue_wait_ms: u64,
    /// Handshakes (HELLO + RESUME) started per second, gateway-wide.
    pub handshakes_per_s: f64,
    /// Share of `handshakes_per_s` reserved for RESUMEs (0..1).
    pub resume_share: f64,
    /// Open client connections at most.
    pub max_connections: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            per_source_rate_per_s: 50.0,
            per_source_burst: 100,
            source_table_capacity: 65_536,
            max_tls_handshakes_in_flight: 0,
            tls_queue_max: 4_096,
            tls_queue_wait_ms: 1_000,
            handshakes_per_s: 5_000.0,
            resume_share: 0.5,
            max_connections: 100_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    pub preamble_timeout_ms: u64,
    pub tls_handshake_timeout_ms: u64,
    pub first_frame_timeout_ms: u64,
    pub drain_timeout_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            preamble_timeout_ms: 2_000,
            tls_handshake_timeout_ms: 5_000,
            first_frame_timeout_ms: 2_000,
            drain_timeout_ms: 30_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Where JSON-line events go: a file or FIFO path, `-` for stdout, empty for nowhere.
    pub path: String,
    /// Events buffered before new ones are dropped (and counted).
    pub queue_capacity: usize,
    /// Stream events name their destination (`host:port` as asked): an
    /// audit trail of where sessions connect, off unless the operator wants it.
    pub audit_destinations: bool,
    /// Also send every event to this syslog collector (`host:port`; RFC
    /// 5424 over TCP, octet counting); empty: none.
    pub syslog_addr: String,
    /// TLS to the collector, its certificate verified against this CA.
    pub syslog_tls_ca_file: Option<PathBuf>,
    /// The name the collector's certificate must carry (default: the host
    /// of `syslog_addr`).
    pub syslog_tls_server_name: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            queue_capacity: 8_192,
            audit_destinations: false,
            syslog_addr: String::new(),
            syslog_tls_ca_file: None,
            syslog_tls_server_name: String::new(),
        }
    }
}

/// The syslog collector `[events]` names, checked; `None` when there is none.
fn syslog_target(e: &EventsConfig, errs: &mut Vec<ConfigProblem>) -> Option<crate::syslog::Target> {
    if e.syslog_addr.is_empty() {
        if e.syslog_tls_ca_file.is_some() {
            errs.push(ConfigProblem::new(
                "events.syslog_tls_ca_file",
                "set without events.syslog_addr",
            ));
        }
        return None;
    }
    let host = match e.syslog_addr.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
        _ => {
            errs.push(ConfigProblem::new(
                "events.syslog_addr",
                format!("{:?}: expected HOST:PORT", e.syslog_addr),
            ));
            return None;
        }
    };
    let tls = match &e.syslog_tls_ca_file {
        None => None,
        Some(path) => {
            let roots = tls::roots_from(path, "events.syslog_tls_ca_file")
                .map_err(|e| errs.push(e))
                .ok()?;
            let name = if e.syslog_tls_server_name.is_empty() {
                host
            } else {
                e.syslog_tls_server_name.clone()
            };
            let name = match rustls_pki_types::ServerName::try_from(name.clone()) {
                Ok(n) => n,
                Err(_) => {
                    errs.push(ConfigProblem::new(
                        "events.syslog_tls_server_name",
                        format!("{name:?} is not a DNS name or IP address"),
                    ));
                    return None;
                }
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| errs.push(ConfigProblem::new("events.syslog_tls_ca_file", e)))
                .ok()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some((Arc::new(cfg), name))
        }
    };
    Some(crate::syslog::Target {
        addr: e.syslog_addr.clone(),
        tls,
    })
}

/// A configuration that passed every check, with its files loaded.
#[derive(Clone, Debug)]
pub struct Validated {
    pub raw: GatewayConfig,
    pub node_id: NodeId,
    pub tls: Arc<TlsMaterial>,
    pub secret: ClusterSecret,
    /// `cluster.previous_secret_file`, when set.
    pub previous_secret: Option<ClusterSecret>,
    pub dev_tokens: Vec<zeroize::Zeroizing<Vec<u8>>>,
    pub max_tls_handshakes_in_flight: usize,
    /// Set when `cluster.membership_endpoints` is not empty.
    pub membership: Option<MembershipFiles>,
    /// The file it was read from (reloads read it again).
    pub source: Option<PathBuf>,
    pub admin_token: Option<jvpn_runtime::admin::AdminToken>,
    /// `[egress]`, compiled; this gateway's own listeners are protected.
    pub egress: Arc<crate::egress::EgressPolicy>,
    /// `events.syslog_*`, checked.
    pub syslog: Option<crate::syslog::Target>,
    /// `[store]` with the etcd backend, checked and its files read.
    pub store: Option<crate::store::EtcdConfig>,
}

/// Reads `path` and the environment, then validates everything.
pub fn load(path: &Path) -> Result<Validated, ConfigErrors> {
    load_with_env(path, std::env::vars())
}

/// As [`load`], with an explicit environment (tests).
pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Validated, ConfigErrors> {
    let raw = parse(path, env)?;
    let mut v = validate(raw)?;
    v.source = Some(path.to_path_buf());
    Ok(v)
}

/// [`load`], plus what only `check` judges: things outside the config that
/// a running gateway tolerates (it warns and drops events) but an operator
/// checking a deployment wants to hear about.
pub fn load_for_check(path: &Path) -> Result<Validated, ConfigErrors> {
    let v = load(path)?;
    match events_sink_problem(&v.raw.events.path) {
        Some(why) => Err(ConfigErrors(vec![ConfigProblem::new("events.path", why)])),
        None => Ok(v),
    }
}

/// Why events could not be written to `path` (a file or FIFO to append to,
/// `-` for stdout, empty for none), if they could not.
pub fn events_sink_problem(path: &str) -> Option<String> {
    use nix::unistd::{AccessFlags, access};
    if path.is_empty() || path == "-" {
        return None;
    }
    let p = Path::new(path);
    if p.exists() {
        return access(p, AccessFlags::W_OK)
            .err()
            .map(|e| format!("{path} is not writable: {e}"));
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Some(format!(
            "directory {} does not exist (for {path})",
            dir.display()
        ));
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .err()
        .map(|e| format!("directory {} is not writable: {e}", dir.display()))
}

/// Sections a reload (SIGHUP) cannot change; everything but `[policy]`,
/// `[tls]`, `[admission]` (less its TLS slot count), `[egress]` and
/// `cluster.secret_file` (and `previous_secret_file`). Returns the names of
/// those that differ.
pub fn restart_only_changes(old: &GatewayConfig, new: &GatewayConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("node_id", old.node_id == new.node_id);
    check("client_addr", old.client_addr == new.client_addr);
    check("admin_addr", old.admin_addr == new.admin_addr);
    check("state_dir", old.state_dir == new.state_dir);
    check("auth", old.auth == new.auth);
    // The secret may rotate (design note 20); the rest of [cluster] may not.
    let same_cluster = ClusterConfig {
        secret_file: old.cluster.secret_file.clone(),
        previous_secret_file: old.cluster.previous_secret_file.clone(),
        ..new.cluster.clone()
    } == old.cluster;
    check("cluster", same_cluster);
    check("timeouts", old.timeouts == new.timeouts);
    check("events", old.events == new.events);
    // Read once at start (the store client, its lease), but the record
    // seal, which a rolling upgrade sets and then sets back.
    let same_store = StoreConfig {
        record_seal: old.store.record_seal,
        ..new.store.clone()
    } == old.store;
    check("store", same_store);
    check(
        "admission.max_tls_handshakes_in_flight",
        old.admission.max_tls_handshakes_in_flight == new.admission.max_tls_handshakes_in_flight,
    );
    out
}

fn parse(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<GatewayConfig, ConfigErrors> {
    parse_layered(
        path,
        env,
        ENV_PREFIX,
        &[
            "auth.dev_tokens",
            "cluster.routers",
            "cluster.membership_endpoints",
            "store.endpoints",
        ],
    )
}

fn validate(raw: GatewayConfig) -> Result<Validated, ConfigErrors> {
    let mut errs = Vec::new();
    let node_id = NodeId::new(&raw.node_id)
        .map_err(|e| errs.push(ConfigProblem::new("node_id", e)))
        .ok();
    if let Err(list) = raw.policy.validate() {
        errs.extend(
            list.into_iter()
                .map(|e| ConfigProblem::new(format!("policy.{}", e.field()), e)),
        );
    }
    let t = &raw.timeouts;
    require_nonzero(
        &mut errs,
        &[
            ("timeouts.preamble_timeout_ms", t.preamble_timeout_ms),
            (
                "timeouts.tls_handshake_timeout_ms",
                t.tls_handshake_timeout_ms,
            ),
            ("timeouts.first_frame_timeout_ms", t.first_frame_timeout_ms),
            ("timeouts.drain_timeout_ms", t.drain_timeout_ms),
        ],
    );
    let a = &raw.admission;
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(a.per_source_rate_per_s) {
        errs.push(ConfigProblem::new(
            "admission.per_source_rate_per_s",
            "must be a positive number",
        ));
    }
    if !positive(a.handshakes_per_s) {
        errs.push(ConfigProblem::new(
            "admission.handshakes_per_s",
            "must be a positive number",
        ));
    }
    if !(0.0..1.0).contains(&a.resume_share) {
        errs.push(ConfigProblem::new(
            "admission.resume_share",
            "must be in [0, 1)",
        ));
    }
    require_nonzero(
        &mut errs,
        &[
            ("admission.per_source_burst", u64::from(a.per_source_burst)),
            (
                "admission.source_table_capacity",
                a.source_table_capacity as u64,
            ),
            ("admission.max_connections", a.max_connections as u64),
            ("admission.tls_queue_wait_ms", a.tls_queue_wait_ms),
        ],
    );
    let syslog = syslog_target(&raw.events, &mut errs);
    if !(1..=1 << 24).contains(&raw.events.queue_capacity) {
        errs.push(ConfigProblem::new(
            "events.queue_capacity",
            "must be in 1..=16777216",
        ));
    }
    if raw.admission.max_tls_handshakes_in_flight > 1 << 20 {
        errs.push(ConfigProblem::new(
            "admission.max_tls_handshakes_in_flight",
            "must be at most 1048576 (0: by core count)",
        ));
    }
    let tls = match tls::load_material(&raw.tls) {
        Ok(m) => Some(Arc::new(m)),
        Err(problems) => {
            errs.extend(problems);
            None
        }
    };
    let (secret, previous_secret) = jvpn_runtime::config::read_secrets(
        &raw.cluster.secret_file,
        raw.cluster.previous_secret_file.as_deref(),
        &mut errs,
    );
    let c = &raw.cluster;
    let mut membership = None;
    if !c.membership_endpoints.is_empty() {
        if c.routers.is_empty() {
            errs.push(ConfigProblem::new(
                "cluster.routers",
                "membership_endpoints are set: list the routers' source addresses too",
            ));
        }
        if let Err(e) = NodeId::new(&c.name) {
            errs.push(ConfigProblem::new("cluster.name", e));
        }
        // Dialled as `https://<entry>`: a scheme, a path or no port would
        // fail at every connect, logged at debug only.
        for (i, e) in c.membership_endpoints.iter().enumerate() {
            let authority = e.parse::<http::uri::Authority>();
            if e.contains(['/', '@']) || !authority.is_ok_and(|a| a.port_u16().is_some()) {
                errs.push(ConfigProblem::new(
                    "cluster.membership_endpoints",
                    format!("entry {} is not host:port", i + 1),
                ));
            }
        }
        let cert = read_pem(
            "cluster.membership_cert_file",
            c.membership_cert_file.as_deref(),
            &mut errs,
        );
        let key = read_pem(
            "cluster.membership_key_file",
            c.membership_key_file.as_deref(),
            &mut errs,
        );
        let ca = read_pem(
            "cluster.membership_ca_file",
            c.membership_ca_file.as_deref(),
            &mut errs,
        );
        // The same check as a rotation's: a set that makes no TLS client
        // (a key that is not the certificate's) would fail every stream.
        let read = (cert, key, ca);
        if let (Some(cert), Some(key), Some(ca)) = &read
            && let Err(p) = crate::membership::usable(cert, key, ca)
        {
            errs.push(p);
        }
        if let (Some(cert_pem), Some(key), Some(ca_pem)) = read
            && errs.is_empty()
        {
            let path = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
            membership = Some(MembershipFiles {
                cert_pem,
                key_pem: zeroize::Zeroizing::new(key),
                ca_pem,
                paths: [
                    path(&c.membership_cert_file),
                    path(&c.membership_key_file),
                    path(&c.membership_ca_file),
                ],
            });
        }
    }
    if !(1..=jvpn_proto::ring::MAX_WEIGHT).contains(&c.weight) {
        errs.push(ConfigProblem::new(
            "cluster.weight",
            format!("must be in 1..={}", jvpn_proto::ring::MAX_WEIGHT),
        ));
    }
    require_nonzero(
        &mut errs,
        &[
            ("cluster.heartbeat_interval_ms", c.heartbeat_interval_ms),
            ("cluster.lease_timeout_ms", c.lease_timeout_ms),
        ],
    );
    // A lease must outlast the gap to the next heartbeat, or it lapses
    // between two and HELLOs are refused `not_in_cluster` now and then.
    if c.lease_timeout_ms <= c.heartbeat_interval_ms {
        errs.push(ConfigProblem::new(
            "cluster.lease_timeout_ms",
            "must be above cluster.heartbeat_interval_ms",
        ));
    }
    if c.unleased_exit_ms != 0 && c.unleased_exit_ms < c.lease_timeout_ms {
        errs.push(ConfigProblem::new(
            "cluster.unleased_exit_ms",
            "must be 0 (never) or at least cluster.lease_timeout_ms",
        ));
    }
    if raw.auth.dev_tokens.is_empty() && raw.tls.agent_ca_file.is_none() {
        errs.push(ConfigProblem::new(
            "auth.dev_tokens",
            "no way to authenticate agents: set tls.agent_ca_file or auth.dev_tokens",
        ));
    }
    if raw.auth.dev_tokens.iter().any(|t| t.len() < 16) {
        errs.push(ConfigProblem::new(
            "auth.dev_tokens",
            "tokens must be at least 16 characters",
        ));
    }
    let admin_token = load_admin_token(raw.admin_token_file.as_deref(), &mut errs);
    let store = store_config(&raw.store, &raw.cluster.name, &mut errs);
    if raw.client_addr == raw.admin_addr && raw.client_addr.port() != 0 {
        errs.push(ConfigProblem::new(
            "admin_addr",
            "is client_addr's address: the second listener could not bind",
        ));
    }
    let mut own = vec![raw.client_addr, raw.admin_addr];
    own.extend(raw.cluster.advertise_addr);
    let egress = crate::egress::EgressPolicy::new(&raw.egress, &own, &host_addrs())
        .map_err(|list| errs.extend(list))
        .ok();
    match (node_id, tls, secret, egress) {
        (Some(node_id), Some(tls), Some(secret), Some(egress)) if errs.is_empty() => {
            let max_tls = match raw.admission.max_tls_handshakes_in_flight {
                0 => {
                    TLS_SLOTS_PER_CORE * std::thread::available_parallelism().map_or(1, |n| n.get())
                }
                n => n,
            };
            let dev_tokens = raw
                .auth
                .dev_tokens
                .iter()
                .map(|t| zeroize::Zeroizing::new(t.as_bytes().to_vec()))
                .collect();
            Ok(Validated {
                raw,
                node_id,
                tls,
                secret,
                previous_secret,
                dev_tokens,
                max_tls_handshakes_in_flight: max_tls,
                membership,
                source: None,
                admin_token,
                egress: Arc::new(egress),
                syslog,
                store,
            })
        }
        _ => Err(ConfigErrors(errs)),
    }
}

/// The host's interface addresses now (a wildcard listener answers on all
/// of them, so egress protects its port on each; addresses added later are
/// read again when a stream asks).
fn host_addrs() -> Vec<std::net::IpAddr> {
    crate::egress::read_host_addrs().unwrap_or_default()
}
