//! TLS helpers every binary shares: PEM files checked the way TLS will use
//! them (a bad set is a configuration problem naming its key at start or
//! at a rotation, not a failure at the first connection), and keying
//! material exported from a connection.

use rustls::RootCertStore;
use rustls::crypto::ring::default_provider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use jvpn_proto::client::ExportError;

use crate::config::ConfigProblem;

/// 32 bytes of keying material (RFC 8446 §7.5) from a client or server
/// connection; an error, never zeros, before its handshake completed
/// (issue 18 L2).
pub fn export<D>(
    conn: &rustls::ConnectionCommon<D>,
    label: &[u8],
    ctx: &[u8],
) -> Result<[u8; 32], ExportError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, Some(ctx))
        .map_err(|_| ExportError)?;
    Ok(out)
}

/// The certificates of a PEM text; a problem is filed under `key`.
pub fn certs_in(pem: &[u8], key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigProblem> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigProblem::new(key, e))?;
    if certs.is_empty() {
        return Err(ConfigProblem::new(key, "no PEM certificate found"));
    }
    Ok(certs)
}

/// A PEM text's certificates as trust roots, every one a usable CA.
pub fn roots_in(pem: &[u8], key: &str) -> Result<RootCertStore, ConfigProblem> {
    let mut roots = RootCertStore::empty();
    let (_, bad) = roots.add_parsable_certificates(certs_in(pem, key)?);
    if bad > 0 || roots.is_empty() {
        return Err(ConfigProblem::new(
            key,
            format!("{bad} unusable CA certificates"),
        ));
    }
    Ok(roots)
}

/// A private key from a PEM text.
pub fn key_in(pem: &[u8], key: &str) -> Result<PrivateKeyDer<'static>, ConfigProblem> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| ConfigProblem::new(key, e))
}

/// A certificate chain and the key that signs for it: the key parses, is
/// of a kind TLS can sign with, and is the first certificate's.
pub fn identity(
    certs: &[u8],
    certs_key: &str,
    private: &[u8],
    private_key: &str,
) -> Result<(), ConfigProblem> {
    let chain = certs_in(certs, certs_key)?;
    let der = key_in(private, private_key)?;
    CertifiedKey::from_der(chain, der, &default_provider())
        .map_err(|e| ConfigProblem::new(private_key, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_handshake_exports_nothing() {
        use std::sync::Arc;
        let provider = Arc::new(default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let conn =
            rustls::ClientConnection::new(Arc::new(cfg), "gw.example".try_into().unwrap()).unwrap();
        assert_eq!(export(&conn, b"label", b"ctx"), Err(ExportError));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_named() {
        let pair = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (a_cert, a_key) = pair("a");
        let (_, b_key) = pair("b");
        assert!(identity(a_cert.as_bytes(), "c", a_key.as_bytes(), "k").is_ok());
        let e = identity(a_cert.as_bytes(), "c", b_key.as_bytes(), "k").unwrap_err();
        assert_eq!(e.key, "k");
        let e = identity(a_key.as_bytes(), "c", a_key.as_bytes(), "k").unwrap_err();
        assert_eq!(e.key, "c");
        let e = roots_in(a_key.as_bytes(), "ca").unwrap_err();
        assert_eq!(e.key, "ca");
        assert!(roots_in(a_cert.as_bytes(), "ca").is_ok());
    }
}
