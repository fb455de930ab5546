//! Reload without restart: SIGHUP (`imagegate serve`) and `POST /admin/reload` (admin listener)
//! read the configuration file and the files it names again (upstream key file, TLS
//! certificates and keys, CA file) and swap what may change live as one snapshot
//! ([`Live`](crate::app::Live)).
//!
//! - All or nothing: a configuration with any problem (the same checks as at start, the
//!   exposure rules included) changes nothing; the problems are logged, returned in the
//!   [`ReloadReport`] and counted (`imagegate_config_reload_failures_total`).
//! - Each request takes the snapshot in force when it reaches the edits route and keeps it to
//!   its end (its ledger record and quota settlement included); connections stay open; new
//!   connections get the TLS certificate of the snapshot in force when they are accepted.
//! - State is kept: quota use lives in the ledger's database and is shared by every snapshot;
//!   rate limiters whose numbers did not change keep their state (see
//!   [`RateLimits::reconfigured`](crate::limits::rate::RateLimits::reconfigured)); the upstream
//!   client (and its pooled connections) is kept when `[upstream]` and the key did not change.
//! - Settings bound at start ([`RESTART_ONLY`]: listen addresses, connection handling, the
//!   ledger, the rate-limit backend, the cache, logging) are not applied: the report names the
//!   ones that differ as needing a restart, and the rest of the new configuration is applied.

use std::fmt::Debug;

use serde::Serialize;

use crate::config::Config;

/// The settings a reload does not apply (read once at start). Documented in the README.
pub const RESTART_ONLY: &[&str] = &[
    "server.listen",
    "server.header_read_timeout",
    "server.shutdown_grace",
    "server.max_in_flight",
    "server.max_concurrent_decodes",
    "server.max_buffered_bytes",
    "server.max_forwarding",
    "server.buffer_wait",
    "server.max_connections",
    "server.probe_connections",
    "server.idle_timeout",
    "server.http2_max_concurrent_streams",
    "server.http2_keep_alive_interval",
    "server.http2_keep_alive_timeout",
    "admin.listen",
    "ledger (every key but prompt)",
    "limits.backend and limits.redis_*",
    "cache",
    "log",
];

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReloadReport {
    /// `applied` or `rejected`.
    pub status: &'static str,
    /// The configuration generation in force after the reload (1 at start, +1 per applied
    /// reload).
    pub generation: u64,
    /// What the applied configuration changed, by section (clients by name).
    pub changed: Vec<String>,
    /// Settings that differ in the file but are only read at start: not applied.
    pub restart_required: Vec<String>,
    /// Why the new configuration was rejected (empty when applied).
    pub problems: Vec<String>,
    /// How long the reload took, from reading the file to the swap.
    pub duration_ms: f64,
}

impl ReloadReport {
    pub fn applied(&self) -> bool {
        self.status == "applied"
    }

    pub(crate) fn rejected(generation: u64, problems: Vec<String>) -> ReloadReport {
        ReloadReport {
            status: "rejected",
            generation,
            changed: Vec::new(),
            restart_required: Vec::new(),
            problems,
            duration_ms: 0.0,
        }
    }

    /// Log it, count it (`imagegate_config_reloads_total{result}`,
    /// `imagegate_config_reload_failures_total`, `imagegate_config_last_reload_success_timestamp_seconds`,
    /// `imagegate_config_generation`).
    pub(crate) fn publish(&self, trigger: &str) {
        metrics::counter!("imagegate_config_reloads_total", "result" => self.status).increment(1);
        if self.applied() {
            mark_success(self.generation);
            tracing::info!(
                trigger,
                generation = self.generation,
                changed = ?self.changed,
                duration_ms = self.duration_ms,
                "configuration reloaded"
            );
            if !self.restart_required.is_empty() {
                tracing::warn!(
                    trigger,
                    settings = ?self.restart_required,
                    "configuration reloaded, but these settings need a restart and were not applied"
                );
            }
        } else {
            metrics::counter!("imagegate_config_reload_failures_total").increment(1);
            tracing::error!(
                trigger,
                generation = self.generation,
                problems = ?self.problems,
                "configuration reload rejected: nothing changed"
            );
        }
    }
}

/// A configuration is in force: the success gauges (also set at start).
pub(crate) fn mark_success(generation: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("imagegate_config_last_reload_success_timestamp_seconds").set(now);
    metrics::gauge!("imagegate_config_generation").set(generation as f64);
}

fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// Put back into `new` every setting of [`RESTART_ONLY`] that differs from `running` and return
/// their names. `Debug` compares the plain values; the secrets (`Debug` hides them) are compared
/// by value.
pub fn pin_restart_only(running: &Config, new: &mut Config) -> Vec<String> {
    let mut names = Vec::new();
    macro_rules! pin {
        ($($section:ident . $field:ident),* $(,)?) => {$(
            if differs(&running.$section.$field, &new.$section.$field) {
                names.push(concat!(stringify!($section), ".", stringify!($field)).to_string());
                new.$section.$field = running.$section.$field.clone();
            }
        )*};
    }
    pin!(
        server.listen,
        server.header_read_timeout,
        server.shutdown_grace,
        server.max_in_flight,
        server.max_concurrent_decodes,
        server.max_buffered_bytes,
        server.max_forwarding,
        server.buffer_wait,
        server.max_connections,
        server.probe_connections,
        server.idle_timeout,
        server.http2_max_concurrent_streams,
        server.http2_keep_alive_interval,
        server.http2_keep_alive_timeout,
        admin.listen,
        ledger.path,
        ledger.queue,
        ledger.backend,
        ledger.postgres_schema,
        ledger.pool_size,
        ledger.connect_timeout,
        ledger.replica_id,
        ledger.stall_timeout,
        ledger.sqlite_synchronous,
        limits.backend,
        limits.redis_prefix,
        limits.redis_timeout,
        limits.redis_failure,
        cache.validated_images_max_entries,
        cache.validated_images_max_bytes,
        cache.validated_images_ttl,
        log.format,
        log.level,
    );
    let pg = |c: &Config| c.ledger.postgres_url.as_ref().map(|u| u.0.clone());
    if pg(running) != pg(new) {
        names.push("ledger.postgres_url".into());
        new.ledger.postgres_url = running.ledger.postgres_url.clone();
    }
    let redis = |c: &Config| c.limits.redis_url.as_ref().map(|u| u.expose().clone());
    if redis(running) != redis(new) {
        names.push("limits.redis_url".into());
        new.limits.redis_url = running.limits.redis_url.clone();
    }
    names
}

/// What differs between two configurations, by section, for the report and the log. Clients
/// are named (added, removed, changed); no key or secret is ever shown.
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = |name: &str, changed: bool| {
        if changed {
            out.push(name.to_string());
        }
    };
    section("server", differs(&old.server, &new.server));
    section("upstream", differs(&old.upstream, &new.upstream));
    section(
        "upstream key",
        old.upstream_key.as_ref().map(|k| k.expose())
            != new.upstream_key.as_ref().map(|k| k.expose()),
    );
    section("validation", differs(&old.validation, &new.validation));
    section("models", differs(&old.models, &new.models));
    section("limits", differs(&old.limits, &new.limits));
    section("quotas", differs(&old.quotas, &new.quotas));
    section("prices", differs(&old.prices, &new.prices));
    section("ledger", differs(&old.ledger, &new.ledger));
    section("admin", differs(&old.admin, &new.admin));
    let named = |c: &Config| {
        c.clients
            .iter()
            .map(|c| (c.name.clone(), format!("{c:?}")))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (before, after) = (named(old), named(new));
    let list = |names: Vec<&String>| {
        names
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added: Vec<_> = after.keys().filter(|n| !before.contains_key(*n)).collect();
    let removed: Vec<_> = before.keys().filter(|n| !after.contains_key(*n)).collect();
    let modified: Vec<_> = after
        .iter()
        .filter(|(n, d)| before.get(*n).is_some_and(|b| b != *d))
        .map(|(n, _)| n)
        .collect();
    if !added.is_empty() {
        out.push(format!("clients added: {}", list(added)));
    }
    if !removed.is_empty() {
        out.push(format!("clients removed: {}", list(removed)));
    }
    if !modified.is_empty() {
        out.push(format!("clients changed: {}", list(modified)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, hash_key};

    fn client(name: &str, key: &str) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            key_hash: hash_key(key),
            ..Default::default()
        }
    }

    #[test]
    fn restart_only_settings_are_named_and_put_back() {
        let running = Config::default();
        let mut new = Config::default();
        new.server.listen = "127.0.0.1:9999".parse().unwrap();
        new.server.max_connections = 7;
        new.ledger.path = "elsewhere.db".into();
        new.limits.redis_url = Some(crate::config::Secret::new("redis://:pw@h".into()));
        // Live settings are left alone.
        new.server.body_read_timeout = std::time::Duration::from_secs(5);
        new.validation.max_prompt_chars = 10;
        let names = pin_restart_only(&running, &mut new);
        assert_eq!(
            names,
            [
                "server.listen",
                "server.max_connections",
                "ledger.path",
                "limits.redis_url"
            ]
        );
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.server.max_connections, running.server.max_connections);
        assert_eq!(new.ledger.path, running.ledger.path);
        assert!(new.limits.redis_url.is_none());
        assert_eq!(new.server.body_read_timeout.as_secs(), 5);
        assert_eq!(new.validation.max_prompt_chars, 10);
        assert!(pin_restart_only(&running, &mut new).is_empty());
    }

    #[test]
    fn changes_name_sections_and_clients() {
        let old = Config {
            clients: vec![client("a", "ka"), client("b", "kb"), client("c", "kc")],
            ..Config::default()
        };
        let mut new = old.clone();
        new.clients.remove(1);
        new.clients.push(client("d", "kd"));
        new.clients[0].limits.requests_per_minute = Some(1);
        new.prices.clear();
        assert_eq!(
            changes(&old, &new),
            [
                "prices",
                "clients added: d",
                "clients removed: b",
                "clients changed: a"
            ]
        );
        assert!(changes(&old, &old.clone()).is_empty());
    }
}
