//! The upstream client's TLS: the webpki roots plus the CAs of `upstream.ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;

use crate::startup::StartupError;

/// The TLS client config: the webpki (Mozilla) roots plus the CAs of `ca_file`, on the ring
/// provider, rustls' safe default protocol versions. ALPN (h2, http/1.1) is left to the
/// connector builder, which refuses a config that already names protocols.
pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StartupError> {
    let roots = root_store(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The webpki roots, plus the CAs of `ca_file` when set.
pub(super) fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, StartupError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        roots.roots.extend(extra_roots(path)?.roots);
    }
    Ok(roots)
}

/// The CA certificates of a PEM file (`upstream.ca_file`) as trust anchors
/// ([`crate::config::read_ca_file`]); the error names the key and the path.
pub fn extra_roots(path: &Path) -> Result<RootCertStore, StartupError> {
    crate::config::read_ca_file(path).map_err(|detail| StartupError::CaFile {
        path: path.to_path_buf(),
        detail,
    })
}
