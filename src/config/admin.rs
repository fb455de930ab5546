//! `[admin]`: the admin listener, its key and who may read `/metrics`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::KeyHash;
use super::secret::{Secret, env_secret, read_key_file};

/// The admin listener: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/admin/usage`, `/admin/requests/{id}`, `/metrics`).
    pub listen: Option<SocketAddr>,
    /// `sha256:<64 hex>` of the admin key (`imagegate hash-key`); required with `listen`.
    pub key_hash: Option<KeyHash>,
    /// Who may read `/metrics`: the admin key (default), its own token, or anyone.
    pub metrics_auth: MetricsAuth,
    /// With `metrics_auth = "token"`: a file holding the metrics token (else the environment
    /// variable `IMAGEGATE_METRICS_TOKEN`). Never in the TOML itself.
    pub metrics_token_file: Option<PathBuf>,
    /// The metrics token, loaded from `metrics_token_file` or the environment.
    #[serde(skip)]
    pub metrics_token: Option<Secret<String>>,
    /// TLS termination on the admin listener (`[admin.tls]`), separate from the API's.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// How `/metrics` on the admin listener is guarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAuth {
    /// The admin key, as for the routes that read records.
    #[default]
    AdminKey,
    /// Its own Bearer token (or the admin key): a scraper need not hold the key that reads
    /// records.
    Token,
    /// No key at all (for a listener only the monitoring network reaches).
    None,
}

/// The environment variable of the metrics token.
pub const METRICS_TOKEN_ENV: &str = "IMAGEGATE_METRICS_TOKEN";

impl AdminConfig {
    /// With `metrics_auth = "token"`: load the metrics token (its file, else the environment).
    pub(super) fn load_metrics_token(&mut self, problems: &mut Vec<String>) {
        if self.metrics_auth != MetricsAuth::Token {
            return;
        }
        self.metrics_token = match &self.metrics_token_file {
            Some(file) => read_key_file(file, "admin.metrics_token_file", problems),
            None => env_secret(METRICS_TOKEN_ENV),
        };
        if self.metrics_token.is_none() && self.metrics_token_file.is_none() {
            problems.push(format!(
                "admin.metrics_auth = \"token\" needs admin.metrics_token_file or {METRICS_TOKEN_ENV}"
            ));
        }
    }

    /// Problems of `[admin]`: its key, its address (not the API's), its TLS files, and its
    /// keys against the clients' (`client_hashes`).
    pub(super) fn problems(
        &self,
        server_listen: SocketAddr,
        client_hashes: &HashSet<[u8; 32]>,
        p: &mut Vec<String>,
    ) {
        match (&self.listen, &self.key_hash) {
            (Some(_), None) => p.push("admin.key_hash: required when admin.listen is set".into()),
            (_, Some(h)) => {
                if let Err(e) = h.digest() {
                    p.push(format!("admin.key_hash: {e}"));
                }
            }
            (None, None) => {}
        }
        if let Some(admin) = self.listen
            && admin == server_listen
            && admin.port() != 0
        {
            p.push("admin.listen: must differ from server.listen".into());
        }
        if let Some(files) = &self.tls
            && let Err(e) = crate::tls::acceptor(files, "admin.tls")
        {
            p.push(e);
        }
        if self.tls.is_some() && self.listen.is_none() {
            p.push("admin.tls: the admin listener is off; set admin.listen".into());
        }
        let admin = self.key_hash.and_then(|h: KeyHash| h.digest().ok());
        if let Some(token) = &self.metrics_token {
            let token: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
            if client_hashes.contains(&token) || admin == Some(token) {
                p.push(
                    "admin.metrics_token: the metrics token must differ from the admin key and every client key"
                        .into(),
                );
            }
        }
        if let Some(admin) = admin
            && client_hashes.contains(&admin)
        {
            p.push(
                "admin.key_hash: the admin key is also a client's key; it must differ from every client key"
                    .into(),
            );
        }
    }
}
