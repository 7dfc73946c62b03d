//! TLS 1.3 server setup: certificate files, agent CA, and a rustls config
//! that speaks only TLS 1.3 with ALPN `jvpn/1`, no 0-RTT, and one
//! single-use resumption ticket per connection ([`crate::tickets`]; every
//! connection, resumed or not, gets fresh exporters).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jvpn_runtime::config::ConfigProblem;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// `[tls]`: the certificate agents see and, in production, the CA of
/// their client certificates.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
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

/// Certificate, key and optional agent CA, read and parsed.
pub struct TlsMaterial {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub agent_roots: Option<RootCertStore>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
            agent_roots: self.agent_roots.clone(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .field("agent_ca", &self.agent_roots.as_ref().map(|r| r.len()))
            .finish()
    }
}

fn certs_from(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigProblem> {
    let pem = std::fs::read(path)
        .map_err(|e| ConfigProblem::new(key, format!("{}: {e}", path.display())))?;
    jvpn_runtime::tls::certs_in(&pem, key).map_err(|p| in_file(p, path))
}

/// A CA file's certificates as trust roots; a problem is filed under `key`
/// (no certificate, or one that is not a usable CA).
pub fn roots_from(path: &Path, key: &str) -> Result<RootCertStore, ConfigProblem> {
    let pem = std::fs::read(path)
        .map_err(|e| ConfigProblem::new(key, format!("{}: {e}", path.display())))?;
    jvpn_runtime::tls::roots_in(&pem, key).map_err(|p| in_file(p, path))
}

fn in_file(mut p: ConfigProblem, path: &Path) -> ConfigProblem {
    p.problem = format!("{}: {}", path.display(), p.problem);
    p
}

/// Reads every TLS file; reports each bad one under its own key.
pub fn load_material(cfg: &TlsConfig) -> Result<TlsMaterial, Vec<ConfigProblem>> {
    let mut errs = Vec::new();
    let certs = certs_from(&cfg.cert_file, "tls.cert_file")
        .map_err(|e| errs.push(e))
        .ok();
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| {
            errs.push(ConfigProblem {
                key: "tls.key_file".into(),
                problem: format!("{}: {e}", cfg.key_file.display()),
            })
        })
        .ok();
    let mut agent_roots = None;
    if let Some(ca) = &cfg.agent_ca_file {
        match roots_from(ca, "tls.agent_ca_file") {
            Ok(roots) => agent_roots = Some(roots),
            Err(e) => errs.push(e),
        }
    }
    match (certs, key) {
        (Some(certs), Some(key)) if errs.is_empty() => {
            let material = TlsMaterial {
                certs,
                key,
                agent_roots,
            };
            // Build once now so a key that does not match the certificate is a config error.
            server_config(&material, true, None).map_err(|e| {
                vec![ConfigProblem {
                    key: "tls.key_file".into(),
                    problem: e.to_string(),
                }]
            })?;
            Ok(material)
        }
        _ => Err(errs),
    }
}

/// The rustls server configuration. `allow_tokenless`: agents without a
/// client certificate may connect (they must then present a dev token).
/// `tickets`: the process's ticketer (none: no resumption).
pub fn server_config(
    m: &TlsMaterial,
    allow_tokenless: bool,
    tickets: Option<Arc<crate::tickets::Tickets>>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match &m.agent_roots {
        Some(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider);
            let verifier = if allow_tokenless {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| rustls::Error::General(format!("agent CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(m.certs.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = vec![jvpn_proto::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    // Stateless tickets only: nothing per session is kept server-side.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match tickets {
        Some(t) => {
            cfg.ticketer = t;
            // Each is used once, so the next reattach presents a ticket
            // never seen on the wire. Two: a RESUME refused before TLS
            // (overloaded, in a storm) has sent one in its ClientHello,
            // and its retry resumes with the other.
            cfg.send_tls13_tickets = 2;
        }
        None => cfg.send_tls13_tickets = 0,
    }
    Ok(cfg)
}
