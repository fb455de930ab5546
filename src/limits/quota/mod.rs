//! Daily and monthly quotas (images and USD), per end user and per client, persisted in SQLite
//! beside the usage ledger so they survive restarts.
//!
//! `reserve` charges `n × price` before forwarding, in one transaction: it reads the current use
//! of every scope the request touches, refuses if any quota would be exceeded, else adds the
//! reservation everywhere. On SQLite that transaction runs on the ledger's writer thread (its one
//! connection to the file, see [`QuotaStore::with_ledger_writer`]) or, for a quota store on its
//! own, as `BEGIN IMMEDIATE` under a mutex; on PostgreSQL as conditional UPDATEs. Concurrent
//! requests therefore can never overspend. `settle` adjusts the same periods once the answer is
//! known (a refund when the upstream failed or returned fewer images). Periods are days and
//! months in the configured time zone.
//!
//! Files: this one (the store, its limits and its API), [`sqlite`] and [`postgres`] (the
//! backends' statements), [`holds`] (the hold rows and their recovery), [`writer`] (changes run
//! by the ledger's writer thread), [`show`] (`imagegate quota show`).

mod holds;
mod postgres;
mod show;
mod sqlite;
mod writer;

pub use holds::HoldRecovery;
pub use show::{QuotaLine, render_table};
pub use sqlite::{SQLITE_HOLDS, SQLITE_USAGE};

use std::path::Path;
use std::sync::Mutex;

use jiff::tz::TimeZone;
use jiff::{ToSpan, ZonedDateTime as Zoned};
use rusqlite::Connection;

use crate::ledger::postgres::{PgPool, PgSettings, redact_url};
use crate::ledger::{Ledger, LedgerError};
use std::path::PathBuf;

use super::EndUser;
use super::spec::{QuotaSpec, micros_to_usd, usd_to_micros};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::GatewayError;
use crate::startup::StartupError;
use postgres::pg_read;
use sqlite::{read, sqlite_reserve};
use writer::run_on_writer;

/// A charge held against the quotas, to be settled once. Its hold row (`quota_holds`, keyed
/// by request id) is committed in the same transaction as the charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    request_id: String,
    scopes: Vec<String>,
    day: String,
    month: String,
    pub images: u32,
    pub micros: i64,
}

/// Limits of one scope, in stored units; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeLimits {
    pub images_day: Option<u64>,
    pub images_month: Option<u64>,
    pub micros_day: Option<i64>,
    pub micros_month: Option<i64>,
}

impl From<QuotaSpec> for ScopeLimits {
    fn from(q: QuotaSpec) -> Self {
        let pos = |v: Option<u64>| v.filter(|&v| v > 0);
        let usd = |v: Option<f64>| v.filter(|&v| v > 0.0).map(usd_to_micros);
        ScopeLimits {
            images_day: pos(q.images_per_day),
            images_month: pos(q.images_per_month),
            micros_day: usd(q.usd_per_day),
            micros_month: usd(q.usd_per_month),
        }
    }
}

/// Use of one scope in the current periods.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScopeUse {
    pub scope: String,
    pub day: String,
    pub month: String,
    pub images_day: u64,
    pub images_month: u64,
    pub micros_day: i64,
    pub micros_month: i64,
}

/// Where quota use is kept.
enum Backend {
    /// A connection to the ledger's SQLite file (one gateway process).
    Sqlite(Mutex<Connection>),
    /// The shared PostgreSQL database (several replicas): every reservation is one
    /// transaction of conditional UPDATEs, atomic across replicas.
    Postgres(PgPool),
}

pub struct QuotaStore {
    /// Shared by the stores of every configuration since start (a reload keeps the use).
    backend: std::sync::Arc<Backend>,
    /// The replica whose holds this store recovers (PostgreSQL); empty for SQLite.
    replica: String,
    tz: TimeZone,
    clock: Clock,
    config: std::sync::Arc<Config>,
    /// SQLite: the ledger whose writer thread runs this store's changes on its own connection
    /// (the same file), so one connection holds the write lock and reservations share its
    /// commits; `None`: this store's own connection writes (a quota store on its own).
    writer: Option<Ledger>,
}

/// Scope key of a client.
pub fn client_scope(client: &str) -> String {
    format!("client:{client}")
}

/// Scope key of an end user (`\u{1f}` cannot appear in a normalized user).
pub fn user_scope(who: &EndUser) -> Option<String> {
    who.user
        .as_ref()
        .map(|u| format!("user:{}\u{1f}{u}", who.client))
}

impl QuotaStore {
    pub fn open(
        path: &Path,
        config: std::sync::Arc<Config>,
        clock: Clock,
    ) -> Result<QuotaStore, StartupError> {
        let fail = |detail: String| StartupError::QuotaStore {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
        Self::with_connection(conn, config, clock).map_err(fail)
    }

    pub fn open_in_memory(
        config: std::sync::Arc<Config>,
        clock: Clock,
    ) -> Result<QuotaStore, StartupError> {
        let fail = |detail: String| StartupError::QuotaStore {
            path: ":memory:".into(),
            detail,
        };
        let conn = Connection::open_in_memory().map_err(|e| fail(e.to_string()))?;
        Self::with_connection(conn, config, clock).map_err(fail)
    }

    fn with_connection(
        conn: Connection,
        config: std::sync::Arc<Config>,
        clock: Clock,
    ) -> Result<QuotaStore, String> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             {SQLITE_USAGE}
             {SQLITE_HOLDS}"
        ))
        .map_err(|e| e.to_string())?;
        let tz = TimeZone::get(&config.quotas.time_zone)
            .map_err(|e| format!("quotas.time_zone: {e}"))?;
        Ok(QuotaStore {
            backend: std::sync::Arc::new(Backend::Sqlite(Mutex::new(conn))),
            replica: String::new(),
            tz,
            clock,
            config,
            writer: None,
        })
    }

    /// The quota store on PostgreSQL (the tables come from the ledger's migrations, which this
    /// runs too, so the store may open first). Connects now, to fail early.
    pub fn open_postgres(
        settings: PgSettings,
        config: std::sync::Arc<Config>,
        clock: Clock,
    ) -> Result<QuotaStore, StartupError> {
        let fail = |detail: String| StartupError::QuotaStore {
            path: PathBuf::from(redact_url(&settings.url)),
            detail,
        };
        let pool = PgPool::new(settings.clone());
        pool.with(|c| crate::ledger::postgres::migrate(c).map(|_| ()))
            .map_err(|e| fail(e.to_string()))?;
        let tz = TimeZone::get(&config.quotas.time_zone)
            .map_err(|e| fail(format!("quotas.time_zone: {e}")))?;
        Ok(QuotaStore {
            backend: std::sync::Arc::new(Backend::Postgres(pool)),
            replica: config.ledger.replica(),
            tz,
            clock,
            config,
            writer: None,
        })
    }

    /// The quota store of the backend `config.ledger` names.
    pub fn open_configured(
        config: std::sync::Arc<Config>,
        clock: Clock,
    ) -> Result<QuotaStore, StartupError> {
        match config.ledger.postgres() {
            Some(settings) => Self::open_postgres(settings, config, clock),
            None => {
                let path = config.ledger.path.clone();
                Self::open(&path, config, clock)
            }
        }
    }

    /// The same store (the same use, on the same connection or pool) judged by the limits,
    /// prices and time zone of `config` (a reload).
    pub fn reconfigured(&self, config: std::sync::Arc<Config>) -> Result<QuotaStore, String> {
        let tz = TimeZone::get(&config.quotas.time_zone)
            .map_err(|e| format!("quotas.time_zone: {e}"))?;
        Ok(QuotaStore {
            backend: self.backend.clone(),
            replica: self.replica.clone(),
            tz,
            clock: self.clock.clone(),
            config,
            writer: self.writer.clone(),
        })
    }

    /// Let the writer thread of `ledger` run this store's changes, when `ledger` writes the
    /// SQLite file this store uses (else, or on PostgreSQL, nothing changes). One connection
    /// then writes the file: no second writer waiting for the write lock (`busy_timeout`
    /// sleeps), and a reservation can share a commit with other requests' records.
    pub fn with_ledger_writer(mut self, ledger: &Ledger) -> QuotaStore {
        let same_file = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if let (Backend::Sqlite(_), Some(file)) = (&*self.backend, ledger.sqlite_file())
            && same_file(file, &self.config.ledger.path)
        {
            self.writer = Some(ledger.clone());
        }
        self
    }

    /// Whether the ledger's writer runs this store's changes (see [`Self::with_ledger_writer`]).
    pub fn uses_ledger_writer(&self) -> bool {
        self.writer.is_some()
    }

    /// Run `work` in one transaction: on the ledger's writer thread when there is one, else on
    /// this store's connection (`BEGIN IMMEDIATE`, under its mutex).
    fn transact<T: Send + 'static>(
        &self,
        work: impl FnMut(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let mut work = work;
        if let Some(ledger) = &self.writer {
            return run_on_writer(ledger, work);
        }
        let mut conn = self.sqlite().expect("sqlite backend");
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = work(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn sqlite(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        match &*self.backend {
            // Every change is one SQLite transaction, rolled back if it did not commit: a panic
            // under the lock leaves nothing half-done, so the guard is taken back.
            Backend::Sqlite(c) => Some(c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            Backend::Postgres(_) => None,
        }
    }

    fn now(&self) -> Zoned {
        self.clock.now_wall().to_zoned_datetime(self.tz.clone())
    }

    fn periods(now: &Zoned) -> (String, String) {
        (
            format!("day:{}", now.strftime("%Y-%m-%d")),
            format!("month:{}", now.strftime("%Y-%m")),
        )
    }

    /// The effective limits of a client and of an end user.
    pub fn limits_for(&self, who: &EndUser) -> (ScopeLimits, ScopeLimits) {
        let q = &self.config.quotas;
        let Some(c) = self.config.clients.iter().find(|c| *c.name == *who.client) else {
            return (ScopeLimits::default(), ScopeLimits::default());
        };
        let client = c.quotas.over(q.per_client);
        let user_base = c.user_quotas.over(q.per_user);
        let user = match &who.user {
            Some(u) => c
                .users
                .iter()
                .find(|o| &o.user == u)
                .map_or(user_base, |o| o.quotas.over(user_base)),
            None => QuotaSpec::default(),
        };
        (client.into(), user.into())
    }

    /// Price of `n` images of `size` with `model`, in micro-dollars.
    pub fn price(&self, model: &str, size: &str, images: u32) -> i64 {
        let each = self
            .config
            .prices
            .get(model)
            .and_then(|s| s.get(size))
            .copied()
            .unwrap_or(0.0);
        usd_to_micros(each) * i64::from(images)
    }

    /// Reserve `images` and `micros` for `who` and its client, or refuse with the exhausted quota.
    /// The charge and the request's hold row commit together.
    pub fn reserve(
        &self,
        request_id: &str,
        who: &EndUser,
        images: u32,
        micros: i64,
    ) -> Result<Reservation, GatewayError> {
        let now = self.now();
        let (day, month) = Self::periods(&now);
        let (client_limits, user_limits) = self.limits_for(who);
        let mut scopes: Vec<(String, ScopeLimits, String)> = Vec::new();
        if let Some(s) = user_scope(who) {
            scopes.push((s, user_limits, who.label()));
        }
        scopes.push((
            client_scope(&who.client),
            client_limits,
            format!("client '{}'", who.client),
        ));
        if let Backend::Postgres(pool) = &*self.backend {
            return self.reserve_pg(pool, request_id, scopes, day, month, images, micros, &now);
        }
        let id = request_id.to_owned();
        let (d, m) = (day.clone(), month.clone());
        let held = scopes.clone();
        let refused = self
            .transact(move |tx| sqlite_reserve(tx, &id, &held, &d, &m, images, micros))
            .map_err(|e| {
                tracing::error!(error = %e, "quota store failed");
                GatewayError::LedgerUnavailable
            })?;
        if let Some((label, name, limit, used, monthly)) = refused {
            return Err(self.exhausted(&label, name, limit, used, monthly, &now));
        }
        Ok(Reservation {
            request_id: request_id.to_owned(),
            scopes: scopes.into_iter().map(|s| s.0).collect(),
            day,
            month,
            images,
            micros,
        })
    }

    fn exhausted(
        &self,
        label: &str,
        name: &str,
        limit: i128,
        used: i128,
        monthly: bool,
        now: &Zoned,
    ) -> GatewayError {
        let start = if monthly {
            now.first_of_month()
                .and_then(|d| d.start_of_day())
                .and_then(|d| d.checked_add(1.month()))
        } else {
            now.start_of_day().and_then(|d| d.checked_add(1.day()))
        };
        let (reset, retry_after) = match start {
            Ok(r) => {
                let secs = (r.timestamp().as_second() - now.timestamp().as_second()).max(1) as u64;
                (
                    r.timestamp().to_string(),
                    Some(std::time::Duration::from_secs(secs)),
                )
            }
            Err(_) => ("the start of the next period".into(), None),
        };
        let (limit_s, used_s) = if name.starts_with("spend") {
            (
                format!("${}", micros_to_usd(limit as i64)),
                format!("${}", micros_to_usd(used as i64)),
            )
        } else {
            (limit.to_string(), used.to_string())
        };
        GatewayError::QuotaExceeded {
            message: format!(
                "You exceeded your current quota: the {name} quota of {label} on this gateway is {limit_s} and {used_s} is already used. It resets at {reset}."
            ),
            retry_after,
        }
    }

    /// Settle a reservation: the actual images and cost replace the reserved ones, and its
    /// hold row says so in the same transaction. The hold is deleted once the request's ledger
    /// record is final too (here if it already is, else by the ledger writer when it commits
    /// that record): until then start-up recovery can reconcile the two (see [`Self::recover`]).
    pub fn settle(&self, r: &Reservation, images: u32, micros: i64) -> Result<(), String> {
        if let Backend::Postgres(pool) = &*self.backend {
            return postgres::settle(pool, r, images, micros);
        }
        let r = r.clone();
        self.transact(move |tx| sqlite::settle(tx, &r, images, micros))
            .map_err(|e| e.to_string())
    }

    /// Start-up recovery (after the ledger's, which turned `forwarding` records into
    /// `unknown`): make every hold a crash left behind agree with the ledger, then delete it.
    /// A hold's request is charged what its ledger record charges (`cost_settled_micros`; an
    /// `unknown` record its whole reservation); a request with no record was never forwarded
    /// (the `forwarding` record commits before any byte goes upstream) and is refunded. Holds
    /// whose record is still `forwarding` (another live process) are left alone. Only this
    /// replica's holds are touched. Call before serving.
    pub fn recover(&self) -> Result<HoldRecovery, String> {
        match &*self.backend {
            Backend::Postgres(pool) => postgres::recover(pool, &self.replica),
            Backend::Sqlite(_) => self.transact(sqlite::recover).map_err(|e| e.to_string()),
        }
    }

    /// Holds not deleted yet (in-flight requests, or what a crash left).
    pub fn open_holds(&self) -> Result<u64, String> {
        match &*self.backend {
            Backend::Postgres(pool) => pool
                .with(|c| {
                    Ok(c.query_one(
                        "SELECT COUNT(*) FROM quota_holds WHERE replica = $1",
                        &[&self.replica],
                    )?
                    .get::<_, i64>(0))
                })
                .map(|n| n.max(0) as u64)
                .map_err(|e| e.to_string()),
            Backend::Sqlite(_) => {
                let conn = self.sqlite().expect("sqlite backend");
                conn.query_row("SELECT COUNT(*) FROM quota_holds", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n.max(0) as u64)
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Use of a scope in the current day and month.
    pub fn usage(&self, scope: &str) -> Result<ScopeUse, String> {
        let (day, month) = Self::periods(&self.now());
        let ((images_day, micros_day), (images_month, micros_month)) = match &*self.backend {
            Backend::Postgres(pool) => pool
                .with(|c| Ok((pg_read(c, scope, &day)?, pg_read(c, scope, &month)?)))
                .map_err(|e| e.to_string())?,
            Backend::Sqlite(_) => {
                let conn = self.sqlite().expect("sqlite backend");
                (
                    read(&conn, scope, &day).map_err(|e| e.to_string())?,
                    read(&conn, scope, &month).map_err(|e| e.to_string())?,
                )
            }
        };
        Ok(ScopeUse {
            scope: scope.to_owned(),
            day,
            month,
            images_day,
            images_month,
            micros_day,
            micros_month,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, hash_key};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn store(spec: QuotaSpec) -> (Arc<QuotaStore>, Clock) {
        let mut c = Config::default();
        c.quotas.per_user = spec;
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            ..Default::default()
        });
        // 2026-11-29T23:00:00Z
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200));
        (
            Arc::new(QuotaStore::open_in_memory(Arc::new(c), clock.clone()).unwrap()),
            clock,
        )
    }

    /// A new request id.
    fn rid() -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!(
            "req_{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    fn who(u: &str) -> EndUser {
        EndUser {
            client: "a".into(),
            user: Some(u.into()),
        }
    }

    #[test]
    fn reserve_refuse_refund() {
        let (s, _) = store(QuotaSpec {
            images_per_day: Some(10),
            ..Default::default()
        });
        let r = s.reserve(&rid(), &who("u"), 8, 160_000).unwrap();
        let err = s.reserve(&rid(), &who("u"), 3, 60_000).unwrap_err();
        let GatewayError::QuotaExceeded {
            message,
            retry_after,
        } = err
        else {
            panic!()
        };
        assert!(
            message.contains("images per day quota of user 'u' of client 'a'"),
            "{message}"
        );
        assert!(message.contains("is 10 and 8 is already used"), "{message}");
        assert_eq!(
            retry_after,
            Some(Duration::from_secs(3600)),
            "resets at midnight UTC"
        );
        s.settle(&r, 5, 100_000).unwrap(); // fewer images returned: refund 3
        assert!(s.reserve(&rid(), &who("u"), 3, 60_000).is_ok());
        assert!(
            s.reserve(&rid(), &who("other"), 10, 0).is_ok(),
            "users are isolated"
        );
        let u = s.usage(&client_scope("a")).unwrap();
        assert_eq!((u.images_day, u.micros_day), (18, 160_000));
    }

    #[test]
    fn a_panic_under_the_lock_does_not_break_the_store() {
        let (s, _) = store(QuotaSpec {
            images_per_day: Some(10),
            ..Default::default()
        });
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = s.sqlite();
            panic!("a bug while the connection is held");
        }));
        assert!(poisoned.is_err());
        let r = s
            .reserve(&rid(), &who("u"), 4, 0)
            .expect("reserves after the panic");
        s.settle(&r, 2, 0).unwrap();
        assert_eq!(
            s.usage(&user_scope(&who("u")).unwrap()).unwrap().images_day,
            2
        );
    }

    #[test]
    fn periods_follow_the_configured_time_zone() {
        let mut c = Config::default();
        c.quotas.time_zone = "Asia/Tokyo".into(); // UTC+9, no daylight saving
        c.quotas.per_user = QuotaSpec {
            images_per_day: Some(1),
            ..Default::default()
        };
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            ..Default::default()
        });
        // 2026-11-29T23:00:00Z is 2026-11-30T08:00 in Tokyo: the day resets at 15:00Z.
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200));
        let s = QuotaStore::open_in_memory(Arc::new(c), clock.clone()).unwrap();
        s.reserve(&rid(), &who("u"), 1, 0).unwrap();
        assert_eq!(
            s.usage(&user_scope(&who("u")).unwrap()).unwrap().day,
            "day:2026-11-30"
        );
        let GatewayError::QuotaExceeded {
            message,
            retry_after,
        } = s.reserve(&rid(), &who("u"), 1, 0).unwrap_err()
        else {
            panic!("not a quota refusal")
        };
        assert_eq!(
            retry_after,
            Some(Duration::from_secs(16 * 3600)),
            "{message}"
        );
        assert!(message.contains("2026-11-30T15:00:00Z"), "{message}");
        clock.advance(Duration::from_secs(16 * 3600));
        assert!(
            s.reserve(&rid(), &who("u"), 1, 0).is_ok(),
            "a new Tokyo day"
        );
    }

    #[test]
    fn spend_quota_and_rollover() {
        let (s, clock) = store(QuotaSpec {
            usd_per_day: Some(0.05),
            ..Default::default()
        });
        assert!(
            s.reserve(&rid(), &who("u"), 2, s.price("dall-e-2", "1024x1024", 2))
                .is_ok()
        );
        let err = s
            .reserve(&rid(), &who("u"), 1, s.price("dall-e-2", "1024x1024", 1))
            .unwrap_err();
        assert!(
            err.parts().message.contains("spend per day"),
            "{}",
            err.parts().message
        );
        assert!(
            s.reserve(&rid(), &who("u"), 1, s.price("dall-e-2", "256x256", 1))
                .is_err(),
            "0.04 + 0.016 > 0.05"
        );
        clock.advance(Duration::from_secs(3600));
        assert!(
            s.reserve(&rid(), &who("u"), 2, s.price("dall-e-2", "1024x1024", 2))
                .is_ok(),
            "a new day"
        );
    }

    /// 8 threads each try 20 reservations of 3 images for user "u": the images admitted.
    fn reserve_threes_from_8_threads(s: &QuotaStore) -> u32 {
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|t| {
            for _ in 0..8 {
                t.spawn(|| {
                    for _ in 0..20 {
                        if s.reserve(&rid(), &who("u"), 3, 0).is_ok() {
                            admitted.fetch_add(3, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        admitted.into_inner()
    }

    #[test]
    fn parallel_reservations_never_overspend() {
        let (s, _) = store(QuotaSpec {
            images_per_month: Some(100),
            ..Default::default()
        });
        assert_eq!(
            reserve_threes_from_8_threads(&s),
            99,
            "33 reservations of 3 fit in 100"
        );
        assert_eq!(
            s.usage(&user_scope(&who("u")).unwrap())
                .unwrap()
                .images_month,
            99
        );
    }

    /// With the ledger's writer running the quota's changes (one connection on the file): the
    /// same refusals and never an overspend under parallel callers, each hold row committed with
    /// its charge and gone once settled and final, and a change after the ledger closed answered
    /// "unavailable" (a 503 upstream of it), not lost silently.
    #[test]
    fn the_ledger_writer_runs_the_changes_on_its_connection() {
        use crate::ledger::{Outcome, Record};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut c = Config::default();
        c.ledger.path = path.clone();
        c.quotas.per_user = QuotaSpec {
            images_per_month: Some(100),
            ..Default::default()
        };
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            ..Default::default()
        });
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (ledger, _) = crate::ledger::Ledger::open_sqlite(&path, 64).unwrap();
        let s = QuotaStore::open_configured(Arc::new(c), clock)
            .unwrap()
            .with_ledger_writer(&ledger);
        assert!(s.uses_ledger_writer());

        assert_eq!(
            reserve_threes_from_8_threads(&s),
            99,
            "33 reservations of 3 fit in 100"
        );
        assert_eq!(s.open_holds().unwrap(), 33, "one hold per reservation");
        let err = s.reserve(&rid(), &who("u"), 2, 0).unwrap_err();
        assert!(
            err.parts().message.contains("images per month"),
            "{}",
            err.parts().message
        );

        // reserve, `forwarding` record, settle, final record: the hold goes with the record.
        let id = rid();
        let r = s.reserve(&id, &who("v"), 2, 0).unwrap();
        let record = Record {
            request_id: id.clone(),
            received_at: "2026-11-29T23:00:00Z".parse().unwrap(),
            client: Some("a".into()),
            user: Some("v".into()),
            ..Record::default()
        };
        rt.block_on(ledger.begin_forwarding(record.clone()))
            .unwrap();
        s.settle(&r, 1, 0).unwrap();
        assert_eq!(s.open_holds().unwrap(), 34, "settled, record not final yet");
        rt.block_on(ledger.finish(crate::ledger::LedgerOp::Complete(Record {
            outcome: Outcome::Answered,
            images_returned: Some(1),
            ..record
        })))
        .unwrap();
        assert_eq!(s.open_holds().unwrap(), 33, "deleted with the final record");
        assert_eq!(
            s.usage(&user_scope(&who("v")).unwrap())
                .unwrap()
                .images_month,
            1
        );

        rt.block_on(ledger.clone().close()).unwrap();
        assert!(matches!(
            s.reserve(&rid(), &who("w"), 1, 0),
            Err(GatewayError::LedgerUnavailable)
        ));
        assert_eq!(
            s.open_holds().unwrap(),
            33,
            "nothing written after the close"
        );
    }

    /// Every point a crash can fall between a reservation and its record, recovered: the quota
    /// then counts exactly what the ledger's records charge, and no hold is left.
    #[test]
    fn recovery_makes_the_quota_agree_with_the_ledger_after_a_crash_anywhere() {
        use crate::ledger::store::LedgerOp;
        use crate::ledger::{LedgerStore, Outcome, Record, SqliteStore, UsageQuery};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut c = Config::default();
        c.clients.push(ClientConfig {
            name: "a".into(),
            key_hash: hash_key("a"),
            ..Default::default()
        });
        let config = Arc::new(c);
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200));
        let record = |id: &str, outcome: Outcome, settled: i64, images: Option<u32>| Record {
            request_id: id.into(),
            received_at: "2026-11-29T23:00:00Z".parse().unwrap(),
            client: Some("a".into()),
            user: Some(id.into()),
            outcome,
            cost_reserved_micros: 40_000,
            cost_settled_micros: settled,
            images_returned: images,
            ..Record::default()
        };
        let w = |id: &str| who(id);
        {
            let mut ledger = SqliteStore::open(&path).unwrap();
            let q = QuotaStore::open(&path, config.clone(), clock.clone()).unwrap();
            let write = |l: &mut SqliteStore, op: LedgerOp| {
                assert!(l.write_batch(&[op]).unwrap().iter().all(Result::is_ok));
            };
            // a: reserved, killed before its `forwarding` record: never forwarded.
            q.reserve("a", &w("a"), 2, 40_000).unwrap();
            // b: forwarding when killed: the upstream may have billed it.
            q.reserve("b", &w("b"), 2, 40_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Begin(record("b", Outcome::Forwarding, 0, None)),
            );
            // c: settled to one image, killed before the completed record.
            let rc = q.reserve("c", &w("c"), 2, 40_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Begin(record("c", Outcome::Forwarding, 0, None)),
            );
            q.settle(&rc, 1, 20_000).unwrap();
            // d: settled and completed: nothing to recover.
            let rd = q.reserve("d", &w("d"), 2, 40_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Begin(record("d", Outcome::Forwarding, 0, None)),
            );
            q.settle(&rd, 1, 20_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Complete(record("d", Outcome::Answered, 20_000, Some(1))),
            );
            // e: rejected after the reservation; the record committed, the refund not yet.
            q.reserve("e", &w("e"), 2, 40_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Final(record("e", Outcome::Rejected, 0, None)),
            );
            // f: the same, refunded: the refund finds the record final and deletes the hold.
            let rf = q.reserve("f", &w("f"), 2, 40_000).unwrap();
            write(
                &mut ledger,
                LedgerOp::Final(record("f", Outcome::Rejected, 0, None)),
            );
            q.settle(&rf, 0, 0).unwrap();
            assert_eq!(q.open_holds().unwrap(), 4, "a, b, c and e are open");
            assert_eq!(
                q.usage("client:a").unwrap().micros_day,
                5 * 40_000 - 20_000 - 20_000
            );
            // killed here
        }
        let mut ledger = SqliteStore::open(&path).unwrap();
        assert_eq!(ledger.recover().unwrap(), 2, "b and c were forwarding");
        let q = QuotaStore::open(&path, config, clock).unwrap();
        let report = q.recover().unwrap();
        assert_eq!(
            (report.refunded, report.reconciled, report.left),
            (1, 3, 0),
            "{report:?}"
        );
        assert_eq!(q.open_holds().unwrap(), 0);
        let mut spend = 0;
        let mut images = 0;
        ledger
            .export(&UsageQuery::default(), &mut |r| {
                spend += r.cost_settled_micros;
                images += if r.outcome == Outcome::Unknown {
                    2
                } else {
                    i64::from(r.images_returned.unwrap_or(0))
                };
                Ok(())
            })
            .unwrap();
        let used = q.usage("client:a").unwrap();
        assert_eq!(
            spend,
            40_000 + 40_000 + 20_000,
            "b and c unknown, d answered"
        );
        assert_eq!(
            used.micros_day, spend,
            "the quota charges what the ledger does"
        );
        assert_eq!(used.micros_month, spend);
        assert_eq!(used.images_day as i64, images);
        for (u, micros) in [
            ("a", 0),
            ("b", 40_000),
            ("c", 40_000),
            ("d", 20_000),
            ("e", 0),
            ("f", 0),
        ] {
            assert_eq!(
                q.usage(&user_scope(&w(u)).unwrap()).unwrap().micros_day,
                micros,
                "{u}"
            );
        }
        assert_eq!(q.recover().unwrap(), HoldRecovery::default(), "idempotent");
    }
}
