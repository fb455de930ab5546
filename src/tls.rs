//! TLS termination on the API and admin listeners (`server.tls`, `admin.tls`): rustls with its
//! safe defaults (TLS 1.3 and 1.2, AEAD cipher suites with forward secrecy only, from the `ring`
//! provider) and ALPN `h2` then `http/1.1`, so a client that offers HTTP/2 gets it.
//!
//! An acceptor is built from the certificate chain and key files each time the configuration is
//! loaded (at start and at every reload), so a renewed certificate is served to the connections
//! accepted after the reload; connections already open keep the one they shook hands with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

/// `[server.tls]` / `[admin.tls]`: PEM files.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// The private key of the leaf certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Read the files and build the acceptor. `at` names the config table in messages
/// (`server.tls`); no message ever holds key material.
pub fn acceptor(files: &TlsFiles, at: &str) -> Result<TlsAcceptor, String> {
    let chain = certificates(&files.cert_file, at)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| {
        format!(
            "{at}.key_file {}: {}",
            files.key_file.display(),
            pem_error(&e, "private key")
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{at}: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "{at}: the certificate and the key do not make a usable pair ({} and {}): {e}",
                files.cert_file.display(),
                files.key_file.display()
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(path: &Path, at: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |detail: String| format!("{at}.cert_file {}: {detail}", path.display());
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(pem_error(&e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(pem_error(&e, "certificate")))?;
    if chain.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    Ok(chain)
}

fn pem_error(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls::pki_types::pem::Error::NoItemsFound => format!("holds no PEM {what}"),
        other => format!("not a valid PEM {what}: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        };
        let e = acceptor(&files, "server.tls").err().unwrap();
        assert!(e.starts_with("server.tls.cert_file "), "{e}");
        assert!(e.contains("cannot read"), "{e}");
        std::fs::write(&files.cert_file, "not pem\n").unwrap();
        let e = acceptor(&files, "admin.tls").err().unwrap();
        assert!(
            e.contains("admin.tls.cert_file") && e.contains("no PEM"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_with_another_key_is_refused_and_a_pair_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        assert!(acceptor(&files, "server.tls").is_ok());
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&files.key_file, other.serialize_pem()).unwrap();
        let e = acceptor(&files, "server.tls").err().unwrap();
        assert!(e.contains("do not make a usable pair"), "{e}");
        assert!(
            !e.contains("PRIVATE KEY"),
            "no key material in messages: {e}"
        );
    }
}
