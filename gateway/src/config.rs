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
use serde::Deserialize;

use crate::engine::Policy;
use crate::tls::{self, TlsMaterial};

/// Environment prefix; `JVPN_GATEWAY__POLICY__SWITCH_COOLDOWN_MS=2000`.
pub const ENV_PREFIX: &str = "JVPN_GATEWAY";

/// The file as written by the operator. Every key has a default except the
/// node id, the TLS files and the cluster secret.
#[derive(Clone, Debug, Deserialize)]
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
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM chain presented to agents.
    pub cert_file: PathBuf,
    /// PEM private key (ECDSA P-256 or Ed25519).
    pub key_file: PathBuf,
    /// PEM CA whose client certificates authenticate agents (production).
    #[serde(default)]
    pub agent_ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static agent tokens, for development only.
    #[serde(default)]
    pub dev_tokens: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// File holding `<key_id>:<64 hex digits>`.
    pub secret_file: PathBuf,
    /// Router source addresses (exact IPs). Empty: single-node mode. Non-empty:
    /// a PROXY v2 header is mandatory from these and forbidden from anyone else.
    #[serde(default)]
    pub routers: Vec<std::net::IpAddr>,
    /// In cluster mode, also accept agents connecting directly (no PROXY).
    #[serde(default)]
    pub direct_clients: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// New connections per second per source (IPv4 /32, IPv6 /64).
    pub per_source_rate_per_s: f64,
    /// Burst allowed per source.
    pub per_source_burst: u32,
    /// Hard cap on tracked sources; past it unknown sources share one bucket.
    pub source_table_capacity: usize,
    /// TLS handshakes in progress at once; 0 = 4 × CPU cores.
    pub max_tls_handshakes_in_flight: usize,
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
            handshakes_per_s: 5_000.0,
            resume_share: 0.5,
            max_connections: 100_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Where JSON-line events go: a file or FIFO path, `-` for stdout, empty for nowhere.
    pub path: String,
    /// Events buffered before new ones are dropped (and counted).
    pub queue_capacity: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            path: String::new(),
            queue_capacity: 8_192,
        }
    }
}

/// One problem with one key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl ConfigProblem {
    fn new(key: impl Into<String>, problem: impl ToString) -> Self {
        Self {
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

/// Every problem found; `Display` prints one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

/// A configuration that passed every check, with its files loaded.
#[derive(Clone, Debug)]
pub struct Validated {
    pub raw: GatewayConfig,
    pub node_id: NodeId,
    pub tls: Arc<TlsMaterial>,
    pub secret: ClusterSecret,
    pub dev_tokens: Vec<zeroize::Zeroizing<Vec<u8>>>,
    pub max_tls_handshakes_in_flight: usize,
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
    let raw = parse(path, env).map_err(|e| ConfigErrors(vec![e]))?;
    validate(raw)
}

fn parse(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<GatewayConfig, ConfigProblem> {
    if !path.exists() {
        return Err(ConfigProblem::new(
            "--config",
            format!("{} does not exist", path.display()),
        ));
    }
    let env_map: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("auth.dev_tokens")
                .with_list_parse_key("cluster.routers")
                .source(Some(env_map)),
        )
        .build()
        .and_then(|c| c.try_deserialize::<GatewayConfig>())
        .map_err(|e| ConfigProblem::new(key_of(&e), e))
}

/// Best effort: the key a `config` error is about.
fn key_of(e: &config::ConfigError) -> String {
    let text = e.to_string();
    if let Some(rest) = text.split("for key `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    if let Some(rest) = text.split("unknown field `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    if let Some(rest) = text.split("missing field `").nth(1) {
        return rest.split('`').next().unwrap_or("config").to_owned();
    }
    "config".to_owned()
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
    for (key, v) in [
        ("timeouts.preamble_timeout_ms", t.preamble_timeout_ms),
        (
            "timeouts.tls_handshake_timeout_ms",
            t.tls_handshake_timeout_ms,
        ),
        ("timeouts.first_frame_timeout_ms", t.first_frame_timeout_ms),
        ("timeouts.drain_timeout_ms", t.drain_timeout_ms),
    ] {
        if v == 0 {
            errs.push(ConfigProblem::new(key, "must be greater than zero"));
        }
    }
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
    for (key, v) in [
        ("admission.per_source_burst", a.per_source_burst as usize),
        ("admission.source_table_capacity", a.source_table_capacity),
        ("admission.max_connections", a.max_connections),
    ] {
        if v == 0 {
            errs.push(ConfigProblem::new(key, "must be greater than zero"));
        }
    }
    if raw.events.queue_capacity == 0 {
        errs.push(ConfigProblem::new(
            "events.queue_capacity",
            "must be greater than zero",
        ));
    }
    let tls = match tls::load_material(&raw.tls) {
        Ok(m) => Some(Arc::new(m)),
        Err(problems) => {
            errs.extend(problems);
            None
        }
    };
    let secret = match std::fs::read_to_string(&raw.cluster.secret_file) {
        Ok(text) => text
            .trim()
            .parse::<ClusterSecret>()
            .map_err(|e| errs.push(ConfigProblem::new("cluster.secret_file", e)))
            .ok(),
        Err(e) => {
            let shown = raw.cluster.secret_file.display();
            errs.push(ConfigProblem::new(
                "cluster.secret_file",
                format!("{shown}: {e}"),
            ));
            None
        }
    };
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
    match (node_id, tls, secret) {
        (Some(node_id), Some(tls), Some(secret)) if errs.is_empty() => {
            let max_tls = match raw.admission.max_tls_handshakes_in_flight {
                0 => 4 * std::thread::available_parallelism().map_or(1, |n| n.get()),
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
                dev_tokens,
                max_tls_handshakes_in_flight: max_tls,
            })
        }
        _ => Err(ConfigErrors(errs)),
    }
}
