//! Reaching PostgreSQL: the settings (never printing the password), one connection slot per
//! pool, and which errors are transient.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::ledger::LedgerError;

pub use crate::config::{PgSettings, redact_pg_url as redact_url};

pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl PgSettings {
    /// One new connection, its `search_path` set.
    pub fn connect(&self) -> Result<Client, LedgerError> {
        let mut cfg: postgres::Config = self.url.parse().map_err(|e| {
            LedgerError::Store(format!(
                "invalid PostgreSQL URL {}: {e}",
                redact_url(&self.url)
            ))
        })?;
        cfg.connect_timeout(self.connect_timeout);
        cfg.keepalives(true);
        cfg.keepalives_idle(Duration::from_secs(30));
        // A dead server must not hang a write forever.
        cfg.tcp_user_timeout(self.connect_timeout.max(Duration::from_secs(1)) * 3);
        let mut client = cfg.connect(NoTls).map_err(|e| {
            LedgerError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                redact_url(&self.url)
            ))
        })?;
        if let Some(schema) = &self.schema {
            client.batch_execute(&format!("SET search_path TO {}", quote_ident(schema)))?;
        }
        Ok(client)
    }
}

impl From<postgres::Error> for LedgerError {
    fn from(e: postgres::Error) -> Self {
        // `Display` of a server error says only "db error"; its details are what matter.
        let detail = match e.as_db_error() {
            Some(db) => format!("PostgreSQL: {db}"),
            None => format!("PostgreSQL: {e}"),
        };
        if is_transient(&e) {
            LedgerError::Unavailable(detail)
        } else {
            LedgerError::Store(detail)
        }
    }
}

/// Whether the error is the server's or the connection's rather than the statement's.
pub fn is_transient(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: I/O, timeouts, protocol: the connection is gone.
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57P") // admin / crash shutdown, cannot connect now
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock detected
                || c == "25006" // read-only transaction (a standby)
        }
    }
}

pub(super) fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "23505")
}

/// A tiny fixed-size pool: `size` slots, each a lazily (re)connected client behind a mutex.
/// A caller takes the first free slot, or waits for one (round robin).
pub struct PgPool {
    pub(super) settings: PgSettings,
    pub(super) slots: Vec<Mutex<Option<Client>>>,
    pub(super) next: AtomicUsize,
}

impl Drop for PgPool {
    /// A synchronous client closes its connection by blocking on a runtime of its own, which
    /// panics on a thread that drives the gateway's runtime (the pool is dropped with the
    /// state, on shutdown): close them on a plain thread there.
    fn drop(&mut self) {
        let clients: Vec<Client> = self
            .slots
            .iter_mut()
            .filter_map(|slot| {
                slot.get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
            })
            .collect();
        if clients.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("imagegate-pg-close".into())
                .spawn(move || drop(clients));
        } else {
            drop(clients);
        }
    }
}

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPool")
            .field("settings", &self.settings)
            .finish()
    }
}

impl PgPool {
    pub fn new(settings: PgSettings) -> PgPool {
        let size = settings.pool_size.max(1);
        PgPool {
            slots: (0..size).map(|_| Mutex::new(None)).collect(),
            settings,
            next: AtomicUsize::new(0),
        }
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    pub(super) fn slot(&self) -> MutexGuard<'_, Option<Client>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(g) = self.slots[(start + i) % n].try_lock() {
                return g;
            }
        }
        self.slots[start % n]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `f` on a pooled connection. A transient failure drops the connection (the next use
    /// reconnects).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut slot = self.slot();
        with_slot(&self.settings, &mut slot, f)
    }
}

pub(super) fn with_slot<T>(
    settings: &PgSettings,
    slot: &mut Option<Client>,
    f: impl FnOnce(&mut Client) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    if slot.as_ref().is_some_and(|c| c.is_closed()) {
        *slot = None;
    }
    let client = match slot {
        Some(c) => c,
        None => slot.insert(settings.connect()?),
    };
    let out = f(client);
    if matches!(out, Err(LedgerError::Unavailable(_))) {
        *slot = None;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/imagegate?sslmode=disable"),
            "postgres://app:***@db:5432/imagegate?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?password=s3cret"),
            "postgres://app@db/x?password=***"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        let s = PgSettings {
            url: "postgresql://u:pw@h/db".into(),
            schema: None,
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{s:?}").contains("pw@"));
    }
}
