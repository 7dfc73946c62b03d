//! PEM files checked the way TLS will use them, so a bad set is a
//! configuration problem naming its key at start (or at a rotation), not a
//! failure at the first connection.

use rustls::RootCertStore;
use rustls::crypto::ring::default_provider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigProblem;

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
