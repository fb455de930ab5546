//! `[[clients]]`: the callers, their keys, limits, quotas and upstream keys.

use std::collections::HashSet;

use serde::Deserialize;

use super::KeyHash;
use super::limits::{ClientKind, QuotaSpec, RateSpec, UserOverride};

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ClientConfig {
    /// Name used in logs, the ledger and reports.
    pub name: String,
    /// `sha256:<64 hex>` as printed by `imagegate hash-key`.
    pub key_hash: KeyHash,
    /// `app` (passes its end users in `user`) or `personal` (one person's key).
    #[serde(default)]
    pub kind: ClientKind,
    /// For `personal` clients: the person's user name, charged for every request.
    #[serde(default)]
    pub user: Option<String>,
    /// This client's own limits (over `[limits.per_client]`).
    #[serde(default)]
    pub limits: RateSpec,
    /// Limits of each of this client's users (over `[limits.per_user]`).
    #[serde(default)]
    pub user_limits: RateSpec,
    /// This client's own quotas (over `[quotas.per_client]`).
    #[serde(default)]
    pub quotas: QuotaSpec,
    /// Quotas of each of this client's users (over `[quotas.per_user]`).
    #[serde(default)]
    pub user_quotas: QuotaSpec,
    /// Overrides for single users of this client.
    #[serde(default)]
    pub users: Vec<UserOverride>,
    /// The upstream key(s) this client's requests use (names of `[[upstream.keys]]`); none:
    /// any key of the pool.
    #[serde(default)]
    pub upstream_key: Option<KeyPin>,
}

/// `clients[].upstream_key`: one key name or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum KeyPin {
    One(String),
    Many(Vec<String>),
}

impl KeyPin {
    pub fn names(&self) -> &[String] {
        match self {
            KeyPin::One(n) => std::slice::from_ref(n),
            KeyPin::Many(v) => v,
        }
    }
}

/// Problems of `[[clients]]` (their pins to upstream keys are the upstream section's); returns
/// the digests of their keys, for the checks that other keys differ from them.
pub(super) fn problems(
    clients: &[ClientConfig],
    max_user_chars: usize,
    p: &mut Vec<String>,
) -> HashSet<[u8; 32]> {
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, c) in clients.iter().enumerate() {
        if c.name.trim().is_empty() {
            p.push(format!("clients[{i}].name: must not be empty"));
        } else if !names.insert(c.name.clone()) {
            p.push(format!("clients[{i}].name: '{}' is used twice", c.name));
        }
        match c.key_hash.digest() {
            Ok(h) => {
                if !hashes.insert(h) {
                    p.push(format!(
                        "clients[{i}].key_hash: the same key is used by two clients"
                    ));
                }
            }
            Err(e) => p.push(format!("clients[{i}].key_hash: {e}")),
        }
        match (c.kind, &c.user) {
            (ClientKind::Personal, None) => p.push(format!(
                "clients[{i}].user: a personal client needs its user's name"
            )),
            (ClientKind::Personal, Some(u)) if !valid_user_name(u, max_user_chars) => {
                p.push(format!("clients[{i}].user: not a valid user name"))
            }
            (ClientKind::App, Some(_)) => p.push(format!(
                "clients[{i}].user: only personal clients have a user"
            )),
            _ => {}
        }
        let at = format!("clients[{i}]");
        p.extend(c.limits.problems(&format!("{at}.limits")));
        p.extend(c.user_limits.problems(&format!("{at}.user_limits")));
        p.extend(c.quotas.problems(&format!("{at}.quotas")));
        p.extend(c.user_quotas.problems(&format!("{at}.user_quotas")));
        for (j, u) in c.users.iter().enumerate() {
            p.extend(u.limits.problems(&format!("{at}.users[{j}].limits")));
            p.extend(u.quotas.problems(&format!("{at}.users[{j}].quotas")));
        }
    }
    hashes
}
/// Whether `raw` is an end-user id `limits::normalize_user` accepts (trimmed: no control
/// characters, at most `max_chars` characters; empty counts as absent, not as invalid).
fn valid_user_name(raw: &str, max_chars: usize) -> bool {
    let t = raw.trim();
    !t.chars().any(char::is_control) && t.chars().count() <= max_chars
}
