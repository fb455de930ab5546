//! The PostgreSQL ledger store, for several gateway replicas sharing one ledger and one set of
//! quotas.
//!
//! # Tables (created and upgraded by [`migrate`], versions in `schema_migrations`)
//! - `ledger_chain(replica, seq, request_id, entry_json, prev_hash, hash)`: append-only (a
//!   trigger refuses UPDATE and DELETE). **One hash chain per replica**: each replica appends
//!   to its own chain, `seq` 1, 2, 3, ... without gaps within a replica, the first `prev_hash`
//!   64 zeros, `hash = sha256(prev_hash || entry_json)` exactly as in SQLite. Replicas never
//!   contend for a chain tip, so writes scale with replicas; `verify` checks every chain.
//! - `records`: the current state of each request, one row per `request_id`: the record as
//!   JSON (`record_json`, the source of truth for `get` and exports) and, as an index for
//!   reports, the columns `usage` filters and sums (`received_at_us`, `client`, `end_user`,
//!   `model`, `outcome`, ...). `replica` and `seq` point at the chain entry that holds the same
//!   state. `verify` checks the JSON against the chain AND the columns against the JSON.
//! - `quota_usage(scope, period, images, micros)`: the quota store (see
//!   [`crate::limits::quota`]).
//!
//! # Replicas and recovery
//! Each gateway process has a replica id (`[ledger] replica_id`, default the host name). Two
//! live processes must not share one (their chain appends would collide: the second one's
//! batch fails as `Unavailable` and retries from the reloaded tip, so nothing is corrupted,
//! but recovery would be wrong). [`LedgerStore::recover`] turns into `unknown` only the
//! records **this replica** left `forwarding`; a replica that never comes back leaves its
//! stragglers `forwarding` until a process with its id starts once.
//!
//! # Failures
//! Connection errors, a server shutting down, too many connections, serialization failures
//! and a chain collision are [`LedgerError::Unavailable`]: the connection is dropped and the
//! next call reconnects (the writer retries final records; a `Begin` fails, so the request
//! gets 503 `ledger_unavailable`).

use super::store::{self, Plan};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row};

use super::LedgerError;
use super::record::{
    ENTRY_VERSION, EntryIn, EntryKind, GENESIS_HASH, Outcome, Record, chain_hash, entry_json,
};
use super::report::UsageAggregator;
use super::sqlite::{differing_fields, kind_fits};
use super::store::{
    BrokenLink, ChainHead, ChainStatus, LedgerOp, LedgerStore, RecentQuery, ReplicaHead, UsageFact,
    UsageQuery, UsageRow, VerifyReport,
};

/// How to reach PostgreSQL. `Debug` never shows the password.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/db?...` or `host=... user=...`.
    pub url: String,
    /// Tables live in this schema (`SET search_path` on every connection); `None`: the
    /// server's default (`public`).
    pub schema: Option<String>,
    /// Connections of the quota store's pool (the ledger writer and each reader hold one more).
    pub pool_size: usize,
    /// Timeout of a connection attempt.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `url` with any password replaced by `***` (URL and key=value forms).
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => authority.to_owned(),
            },
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            None => tail.to_owned(),
            Some((path, query)) => {
                let query = query
                    .split('&')
                    .map(|p| {
                        if p.to_ascii_lowercase().starts_with("password=") {
                            "password=***".to_owned()
                        } else {
                            p.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                format!("{path}?{query}")
            }
        };
        format!("{scheme}://{authority}{tail}")
    } else {
        url.split_whitespace()
            .map(|kv| {
                if kv.to_ascii_lowercase().starts_with("password=") {
                    "password=***".to_owned()
                } else {
                    kv.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn quote_ident(s: &str) -> String {
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

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == "23505")
}

/// Versioned migrations: `(version, description, SQL)`, applied in order, each once.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "ledger chain, records and quota use",
        "
CREATE TABLE ledger_chain (
    replica TEXT NOT NULL,
    seq BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE INDEX ledger_chain_request ON ledger_chain (request_id, replica, seq);
CREATE FUNCTION ledger_chain_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger_chain is append-only'; END $$;
CREATE TRIGGER ledger_chain_append_only BEFORE UPDATE OR DELETE ON ledger_chain
    FOR EACH ROW EXECUTE FUNCTION ledger_chain_append_only();
CREATE TABLE records (
    request_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    seq BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL,
    client TEXT,
    end_user TEXT,
    model TEXT,
    outcome TEXT NOT NULL,
    reason_code TEXT,
    images_returned BIGINT,
    cost_settled_micros BIGINT NOT NULL,
    input_tokens BIGINT,
    output_tokens BIGINT,
    forwarded BOOLEAN NOT NULL,
    record_json TEXT NOT NULL
);
CREATE INDEX records_received ON records (received_at_us);
CREATE INDEX records_client ON records (client, received_at_us);
CREATE INDEX records_user ON records (end_user, received_at_us);
CREATE INDEX records_forwarding ON records (replica) WHERE outcome = 'forwarding';
CREATE TABLE quota_usage (
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    images BIGINT NOT NULL DEFAULT 0,
    micros BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period)
);
",
    ),
    (
        2,
        "records.upstream_key: the upstream key a request was sent with",
        "
ALTER TABLE records ADD COLUMN upstream_key TEXT;
CREATE INDEX records_upstream_key ON records (upstream_key, received_at_us);
",
    ),
    (
        3,
        "records by outcome (the operator page's recent requests)",
        "CREATE INDEX IF NOT EXISTS records_outcome ON records (outcome, received_at_us);",
    ),
    (
        4,
        "quota holds: one row per open reservation, reconciled with its record",
        "
CREATE TABLE quota_holds (
    request_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    scopes TEXT NOT NULL,
    day TEXT NOT NULL,
    month TEXT NOT NULL,
    reserved_images BIGINT NOT NULL,
    reserved_micros BIGINT NOT NULL,
    images BIGINT NOT NULL,
    micros BIGINT NOT NULL,
    settled BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX quota_holds_replica ON quota_holds (replica);
",
    ),
];

/// The version [`migrate`] brings a database to.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Apply the migrations not applied yet, in one transaction under an advisory lock (replicas
/// starting together take turns). Returns the schema version. Idempotent.
pub fn migrate(client: &mut Client) -> Result<i32, LedgerError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(8112420633)", &[])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .get(0);
    if current > latest_version() {
        return Err(LedgerError::Store(format!(
            "PostgreSQL schema version {current} is newer than this build's {}",
            latest_version()
        )));
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )?;
        tracing::info!(version, description, "ledger: PostgreSQL migration applied");
    }
    tx.commit()?;
    Ok(latest_version())
}

/// The schema version of a database (0: none), without changing anything.
pub fn schema_version(client: &mut Client) -> Result<i32, LedgerError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .get(0))
}

/// A tiny fixed-size pool: `size` slots, each a lazily (re)connected client behind a mutex.
/// A caller takes the first free slot, or waits for one (round robin).
pub struct PgPool {
    settings: PgSettings,
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
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

    fn slot(&self) -> MutexGuard<'_, Option<Client>> {
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

fn with_slot<T>(
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

#[derive(Clone, Debug)]
struct Tip {
    seq: i64,
    hash: String,
}

/// The ledger on PostgreSQL (see the module doc).
pub struct PostgresStore {
    settings: PgSettings,
    replica: String,
    client: Mutex<Option<Client>>,
    tip: Option<Tip>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("settings", &self.settings)
            .field("replica", &self.replica)
            .field("tip", &self.tip)
            .finish()
    }
}

pub(crate) const INSERT_ENTRY: &str = "INSERT INTO ledger_chain (replica, seq, request_id, entry_json, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6)";
pub(crate) const UPSERT_RECORD: &str = "INSERT INTO records (request_id, replica, seq, received_at_us, client, end_user, model, outcome, reason_code, images_returned, cost_settled_micros, input_tokens, output_tokens, forwarded, record_json, upstream_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) ON CONFLICT (request_id) DO UPDATE SET replica = excluded.replica, seq = excluded.seq, received_at_us = excluded.received_at_us, client = excluded.client, end_user = excluded.end_user, model = excluded.model, outcome = excluded.outcome, reason_code = excluded.reason_code, images_returned = excluded.images_returned, cost_settled_micros = excluded.cost_settled_micros, input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens, forwarded = excluded.forwarded, record_json = excluded.record_json, upstream_key = excluded.upstream_key";

/// The indexed columns of a record, as `records` stores them.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Columns {
    pub(crate) received_at_us: i64,
    pub(crate) client: Option<String>,
    pub(crate) end_user: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) outcome: String,
    pub(crate) reason_code: Option<String>,
    pub(crate) images_returned: Option<i64>,
    pub(crate) cost_settled_micros: i64,
    pub(crate) input_tokens: Option<i64>,
    pub(crate) output_tokens: Option<i64>,
    pub(crate) forwarded: bool,
    pub(crate) upstream_key: Option<String>,
}

fn int(v: Option<u64>, name: &str) -> Result<Option<i64>, LedgerError> {
    v.map(i64::try_from)
        .transpose()
        .map_err(|_| LedgerError::Rejected(format!("{name} does not fit a signed 64-bit integer")))
}

impl Columns {
    pub(crate) fn of(r: &Record) -> Result<Columns, LedgerError> {
        Ok(Columns {
            received_at_us: r.received_at.as_microsecond(),
            client: r.client.clone(),
            end_user: r.user.clone(),
            model: r.model.clone(),
            outcome: r.outcome.as_str().to_owned(),
            reason_code: r.reason_code.clone(),
            images_returned: r.images_returned.map(i64::from),
            cost_settled_micros: r.cost_settled_micros,
            input_tokens: int(r.input_tokens, "input_tokens")?,
            output_tokens: int(r.output_tokens, "output_tokens")?,
            forwarded: r.forwarded,
            upstream_key: r.upstream_key.clone(),
        })
    }

    /// From a row whose columns `at..at+12` are the ones of [`COLUMNS_SQL`].
    fn from_row(row: &Row, at: usize) -> Result<Columns, postgres::Error> {
        Ok(Columns {
            received_at_us: row.try_get(at)?,
            client: row.try_get(at + 1)?,
            end_user: row.try_get(at + 2)?,
            model: row.try_get(at + 3)?,
            outcome: row.try_get(at + 4)?,
            reason_code: row.try_get(at + 5)?,
            images_returned: row.try_get(at + 6)?,
            cost_settled_micros: row.try_get(at + 7)?,
            input_tokens: row.try_get(at + 8)?,
            output_tokens: row.try_get(at + 9)?,
            forwarded: row.try_get(at + 10)?,
            upstream_key: row.try_get(at + 11)?,
        })
    }
}

const COLUMNS_SQL: &str = "received_at_us, client, end_user, model, outcome, reason_code, images_returned, cost_settled_micros, input_tokens, output_tokens, forwarded, upstream_key";

fn parse_record(json: &str) -> Result<Record, LedgerError> {
    serde_json::from_str(json)
        .map_err(|e| LedgerError::Store(format!("records: unreadable record_json: {e}")))
}

type Params = Vec<Box<dyn ToSql + Sync>>;

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as _).collect()
}

/// ` WHERE ...` for the filters of `q` (empty without filters), and its arguments.
fn filter(q: &UsageQuery) -> (String, Params) {
    let mut clauses = Vec::new();
    let mut args: Params = Vec::new();
    if let Some(t) = q.since {
        args.push(Box::new(t.as_microsecond()));
        clauses.push(format!("received_at_us >= ${}", args.len()));
    }
    if let Some(t) = q.until {
        args.push(Box::new(t.as_microsecond()));
        clauses.push(format!("received_at_us < ${}", args.len()));
    }
    if let Some(c) = &q.client {
        args.push(Box::new(c.clone()));
        clauses.push(format!("client = ${}", args.len()));
    }
    if let Some(u) = &q.user {
        args.push(Box::new(u.clone()));
        clauses.push(format!("end_user = ${}", args.len()));
    }
    if clauses.is_empty() {
        (String::new(), args)
    } else {
        (format!(" WHERE {}", clauses.join(" AND ")), args)
    }
}

/// ` WHERE ...` for the filters and cursor of a [`RecentQuery`], and its arguments.
fn recent_filter(q: &RecentQuery) -> (String, Params) {
    let (base, mut args) = filter(&UsageQuery {
        since: q.since,
        until: q.until,
        client: q.client.clone(),
        user: q.user.clone(),
        ..UsageQuery::default()
    });
    let mut clauses = Vec::new();
    if let Some(o) = q.outcome {
        args.push(Box::new(o.as_str().to_owned()));
        clauses.push(format!("outcome = ${}", args.len()));
    }
    if let Some(id) = &q.before {
        args.push(Box::new(id.clone()));
        clauses.push(format!(
            "(received_at_us, request_id) < \
             (SELECT c.received_at_us, c.request_id FROM records c WHERE c.request_id = ${})",
            args.len()
        ));
    }
    let sql = match (base.is_empty(), clauses.is_empty()) {
        (_, true) => base,
        (true, false) => format!(" WHERE {}", clauses.join(" AND ")),
        (false, false) => format!("{base} AND {}", clauses.join(" AND ")),
    };
    (sql, args)
}

impl PostgresStore {
    /// A store for `replica`. Connects, runs the migrations, loads this replica's chain tip.
    pub fn open(settings: PgSettings, replica: &str) -> Result<PostgresStore, LedgerError> {
        let mut client = settings.connect()?;
        migrate(&mut client)?;
        let mut store = PostgresStore {
            settings,
            replica: replica.to_owned(),
            client: Mutex::new(Some(client)),
            tip: None,
        };
        store.tip = Some(store.load_tip()?);
        Ok(store)
    }

    /// A store for queries only (the admin listener, the CLI): connects on first use, runs no
    /// migration, never writes. `replica` picks the chain whose head `verify` reports first.
    pub fn reader(settings: PgSettings, replica: &str) -> PostgresStore {
        PostgresStore {
            settings,
            replica: replica.to_owned(),
            client: Mutex::new(None),
            tip: None,
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut slot = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        with_slot(&self.settings, &mut slot, f)
    }

    fn load_tip(&self) -> Result<Tip, LedgerError> {
        let replica = self.replica.clone();
        self.with(|c| read_tip(c, &replica))
    }

    /// This replica's last chain entry.
    pub fn head(&self) -> Result<Option<ChainHead>, LedgerError> {
        let tip = self.load_tip()?;
        Ok((tip.seq > 0).then_some(ChainHead {
            seq: tip.seq as u64,
            hash: tip.hash,
        }))
    }

    /// Run `body` in one transaction from this replica's tip; keep the new tip on commit,
    /// forget it on failure (reloaded before the next write).
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&mut postgres::Transaction<'_>, &str, &mut Tip) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let tip = match self.tip.take() {
            Some(t) => t,
            None => self.load_tip()?,
        };
        let replica = self.replica.clone();
        let result = self.with(|c| {
            let mut tip = tip;
            let mut tx = c.transaction()?;
            let out = body(&mut tx, &replica, &mut tip)?;
            tx.commit()?;
            Ok((out, tip))
        });
        match result {
            Ok((out, tip)) => {
                self.tip = Some(tip);
                Ok(out)
            }
            Err(e) => {
                self.tip = None;
                Err(e)
            }
        }
    }
}

fn read_tip(c: &mut impl GenericClient, replica: &str) -> Result<Tip, LedgerError> {
    Ok(c.query_opt(
        "SELECT seq, hash FROM ledger_chain WHERE replica = $1 ORDER BY seq DESC LIMIT 1",
        &[&replica],
    )?
    .map_or(
        Tip {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        },
        |r| Tip {
            seq: r.get(0),
            hash: r.get(1),
        },
    ))
}

fn plan(tx: &mut postgres::Transaction<'_>, op: &LedgerOp) -> Result<Plan, LedgerError> {
    let existing: Option<String> = tx
        .query_opt(
            "SELECT outcome FROM records WHERE request_id = $1 FOR UPDATE",
            &[&op.record().request_id],
        )?
        .map(|r| r.get(0));
    Ok(store::plan(op, existing.as_deref()))
}

/// Append one chain entry for `r` to `replica`'s chain and make `r` the request's record.
pub(crate) fn append(
    tx: &mut impl GenericClient,
    replica: &str,
    tip: &mut (i64, String),
    kind: EntryKind,
    r: &Record,
) -> Result<(), LedgerError> {
    let json = entry_json(kind, r)
        .map_err(|e| LedgerError::Store(format!("cannot serialize a chain entry: {e}")))?;
    let record_json = serde_json::to_string(r)
        .map_err(|e| LedgerError::Store(format!("cannot serialize a record: {e}")))?;
    let cols = Columns::of(r)?;
    let seq = tip.0 + 1;
    let hash = chain_hash(&tip.1, &json);
    tx.execute(
        INSERT_ENTRY,
        &[&replica, &seq, &r.request_id, &json, &tip.1, &hash],
    )
    .map_err(|e| {
        if is_unique_violation(&e) {
            LedgerError::Unavailable(format!(
                "chain entry {seq} of replica {replica} already exists: another process writes \
                 with this replica id; the tip is reloaded before the next write"
            ))
        } else {
            e.into()
        }
    })?;
    tx.execute(
        UPSERT_RECORD,
        &[
            &r.request_id,
            &replica,
            &seq,
            &cols.received_at_us,
            &cols.client,
            &cols.end_user,
            &cols.model,
            &cols.outcome,
            &cols.reason_code,
            &cols.images_returned,
            &cols.cost_settled_micros,
            &cols.input_tokens,
            &cols.output_tokens,
            &cols.forwarded,
            &record_json,
            &cols.upstream_key,
        ],
    )?;
    *tip = (seq, hash);
    Ok(())
}

fn append_at(
    tx: &mut postgres::Transaction<'_>,
    replica: &str,
    tip: &mut Tip,
    kind: EntryKind,
    r: &Record,
) -> Result<(), LedgerError> {
    let mut t = (tip.seq, tip.hash.clone());
    append(tx, replica, &mut t, kind, r)?;
    *tip = Tip {
        seq: t.0,
        hash: t.1,
    };
    Ok(())
}

impl LedgerStore for PostgresStore {
    fn recover(&mut self) -> Result<usize, LedgerError> {
        self.in_transaction(|tx, replica, tip| {
            let stuck: Vec<Record> = tx
                .query(
                    "SELECT record_json FROM records WHERE outcome = 'forwarding' AND replica = $1 \
                     ORDER BY seq FOR UPDATE",
                    &[&replica],
                )?
                .iter()
                .map(|row| parse_record(row.get(0)))
                .collect::<Result<_, _>>()?;
            for mut r in stuck.iter().cloned() {
                r.outcome = Outcome::Unknown;
                r.cost_settled_micros = r.cost_reserved_micros;
                append_at(tx, replica, tip, EntryKind::Recover, &r)?;
            }
            if !stuck.is_empty() {
                tracing::warn!(
                    records = stuck.len(),
                    replica,
                    "ledger: requests this replica left forwarding are now unknown"
                );
            }
            Ok(stuck.len())
        })
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        let replica = self.replica.clone();
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT hash FROM ledger_chain WHERE replica = $1 AND seq = $2",
                &[&replica, &seq],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn check(&mut self) -> Result<(), LedgerError> {
        self.with(|c| c.batch_execute("SELECT 1").map_err(Into::into))
    }

    fn tip(&self) -> Option<ChainHead> {
        self.tip.as_ref().filter(|t| t.seq > 0).map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash.clone(),
        })
    }

    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.in_transaction(|tx, replica, tip| {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match plan(tx, op)? {
                    Plan::Refuse(why) => results.push(Err(LedgerError::Rejected(why))),
                    Plan::Write(kind, record) => {
                        append_at(tx, replica, tip, kind, &record)?;
                        if kind != EntryKind::Begin {
                            // Settled and now final: the quota hold is reconciled.
                            tx.execute(
                                "DELETE FROM quota_holds WHERE request_id = $1 AND settled",
                                &[&record.request_id],
                            )?;
                        }
                        results.push(Ok(()));
                    }
                }
            }
            Ok(results)
        })
    }

    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        self.with(|c| {
            c.query_opt(
                "SELECT record_json FROM records WHERE request_id = $1",
                &[&request_id],
            )?
            .map(|r| parse_record(r.get(0)))
            .transpose()
        })
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let (filter_sql, args) = filter(q);
        self.with(|c| {
            let sql = format!("SELECT {COLUMNS_SQL} FROM records{filter_sql}");
            let mut rows = c.query_raw(&sql, refs(&args))?;
            let mut agg = UsageAggregator::new(q);
            while let Some(row) = rows.next()? {
                let cols = Columns::from_row(&row, 0)?;
                let outcome = cols
                    .outcome
                    .parse::<Outcome>()
                    .map_err(|e| LedgerError::Store(format!("records: {e}")))?;
                let u64_of = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
                agg.add(UsageFact {
                    received_at_us: cols.received_at_us,
                    client: cols.client.as_deref(),
                    user: cols.end_user.as_deref(),
                    model: cols.model.as_deref(),
                    outcome,
                    reason_code: cols.reason_code.as_deref(),
                    images: cols
                        .images_returned
                        .unwrap_or(0)
                        .clamp(0, i64::from(u32::MAX)) as u32,
                    spend_micros: cols.cost_settled_micros,
                    input_tokens: u64_of(cols.input_tokens),
                    output_tokens: u64_of(cols.output_tokens),
                    forwarded: cols.forwarded,
                });
            }
            Ok(agg.finish())
        })
    }

    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let (filter_sql, mut args) = filter(q);
        let limit = q
            .limit
            .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
        args.push(Box::new(limit));
        let sql = format!(
            "SELECT record_json FROM records{filter_sql} ORDER BY received_at_us, request_id LIMIT ${}",
            args.len()
        );
        self.with(|c| {
            let mut rows = c.query_raw(&sql, refs(&args))?;
            while let Some(row) = rows.next()? {
                out(&parse_record(row.get(0))?)?;
            }
            Ok(())
        })
    }

    fn recent(&self, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
        let (filter_sql, mut args) = recent_filter(q);
        args.push(Box::new(i64::from(q.limit)));
        let sql = format!(
            "SELECT record_json FROM records{filter_sql} \
             ORDER BY received_at_us DESC, request_id DESC LIMIT ${}",
            args.len()
        );
        self.with(|c| {
            c.query(&sql, &refs(&args))?
                .iter()
                .map(|r| parse_record(r.get(0)))
                .collect()
        })
    }

    fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        let own = self.replica.clone();
        self.with(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            // Each replica's last entry, walking the (replica, seq) primary key backwards.
            let chains: Vec<ReplicaHead> = tx
                .query(
                    "SELECT DISTINCT ON (replica) replica, seq, hash FROM ledger_chain \
                     ORDER BY replica, seq DESC",
                    &[],
                )?
                .iter()
                .map(|r| ReplicaHead {
                    replica: r.get(0),
                    head: ChainHead {
                        seq: r.get::<_, i64>(1).max(0) as u64,
                        hash: r.get(2),
                    },
                })
                .collect();
            let records: i64 = tx.query_one("SELECT count(*) FROM records", &[])?.get(0);
            tx.commit()?;
            Ok(ChainStatus {
                head: chains
                    .iter()
                    .find(|h| h.replica == own)
                    .or(chains.first())
                    .map(|h| h.head.clone()),
                // Each chain is numbered 1, 2, 3, ... without gaps (verify checks it).
                entries: chains.iter().map(|h| h.head.seq).sum(),
                records: records.max(0) as u64,
                chains,
            })
        })
    }

    fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let own = self.replica.clone();
        self.with(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let report = verify_in(&mut tx, &own)?;
            tx.commit()?;
            Ok(report)
        })
    }

    fn ping(&mut self) -> Result<(), LedgerError> {
        self.with(|c| Ok(c.batch_execute("SELECT 1")?))
    }
}

pub(crate) fn verify_in(
    tx: &mut postgres::Transaction<'_>,
    own: &str,
) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport::default();

    // 1. Each replica's chain, in seq order: contiguous, linked, hashes right, entries readable.
    {
        let mut rows = tx.query_raw(
            "SELECT replica, seq, request_id, entry_json, prev_hash, hash FROM ledger_chain \
             ORDER BY replica, seq",
            std::iter::empty::<i32>(),
        )?;
        let mut replica = String::new();
        let mut expect: i64 = 1;
        let mut prev = GENESIS_HASH.to_owned();
        let mut broken_chain = false;
        let mut heads: Vec<ReplicaHead> = Vec::new();
        while let Some(row) = rows.next()? {
            let r: String = row.get(0);
            let seq: i64 = row.get(1);
            let request_id: String = row.get(2);
            let json: String = row.get(3);
            let prev_hash: String = row.get(4);
            let hash: String = row.get(5);
            if r != replica || heads.is_empty() {
                replica = r.clone();
                expect = 1;
                prev = GENESIS_HASH.to_owned();
                broken_chain = false;
                heads.push(ReplicaHead {
                    replica: r.clone(),
                    head: ChainHead {
                        seq: 0,
                        hash: String::new(),
                    },
                });
            }
            if let Some(h) = heads.last_mut() {
                h.head = ChainHead {
                    seq: seq.max(0) as u64,
                    hash: hash.clone(),
                };
            }
            if broken_chain {
                continue;
            }
            let broken = |reason: String| BrokenLink {
                seq: seq.max(0) as u64,
                request_id: request_id.clone(),
                reason: format!("replica {r}: {reason}"),
            };
            let problem = if seq != expect {
                Some(BrokenLink {
                    seq: expect as u64,
                    request_id: String::new(),
                    reason: format!(
                        "replica {r}: entry {expect} is missing (found entry {seq} next)"
                    ),
                })
            } else if prev_hash != prev {
                Some(broken(format!(
                    "prev_hash does not match the hash of entry {}",
                    seq - 1
                )))
            } else if chain_hash(&prev, &json) != hash {
                Some(broken("hash does not match the entry".into()))
            } else {
                match serde_json::from_str::<EntryIn>(&json) {
                    Err(e) => Some(broken(format!("entry is not readable: {e}"))),
                    Ok(e) if e.v != ENTRY_VERSION => {
                        Some(broken(format!("entry version {} is unknown", e.v)))
                    }
                    Ok(e) if e.record.request_id != request_id => Some(broken(
                        "request_id column differs from the entry's record".into(),
                    )),
                    Ok(e) if !kind_fits(e.kind, e.record.outcome) => Some(broken(format!(
                        "a {:?} entry cannot hold outcome {}",
                        e.kind, e.record.outcome
                    ))),
                    Ok(_) => None,
                }
            };
            if let Some(p) = problem {
                report.note_broken(p);
                broken_chain = true;
                continue;
            }
            prev = hash;
            expect += 1;
            report.entries += 1;
        }
        report.head = heads
            .iter()
            .find(|h| h.replica == own)
            .or(heads.first())
            .map(|h| h.head.clone());
        report.chains = heads;
    }

    // 2. Each records row: its columns match its JSON, which equals the chain entry it points
    //    at, the request's last entry in that replica's chain.
    {
        let sql = format!(
            "SELECT r.request_id, r.replica, r.seq, r.record_json, c.request_id, c.entry_json, \
             (SELECT MAX(m.seq) FROM ledger_chain m WHERE m.replica = r.replica AND m.request_id = r.request_id), \
             {} FROM records r LEFT JOIN ledger_chain c ON c.replica = r.replica AND c.seq = r.seq",
            COLUMNS_SQL
                .split(", ")
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut rows = tx.query_raw(&sql, std::iter::empty::<i32>())?;
        while let Some(row) = rows.next()? {
            report.records += 1;
            let request_id: String = row.get(0);
            let replica: String = row.get(1);
            let row_seq: i64 = row.get(2);
            let record_json: String = row.get(3);
            let entry_request: Option<String> = row.get(4);
            let entry: Option<String> = row.get(5);
            let last: Option<i64> = row.get(6);
            let broken = |reason: String| BrokenLink {
                seq: row_seq.max(0) as u64,
                request_id: request_id.clone(),
                reason: format!("replica {replica}: {reason}"),
            };
            let (Some(entry_request), Some(entry), Some(last)) = (entry_request, entry, last)
            else {
                report.note_broken(broken("records row has no chain entry".into()));
                continue;
            };
            if entry_request != request_id {
                report.note_broken(broken(format!(
                    "records row points at entry {row_seq}, which is of request {entry_request}"
                )));
                continue;
            }
            if last != row_seq {
                report.note_broken(broken(format!(
                    "records row points at entry {row_seq}, the request's last entry is {last}"
                )));
                continue;
            }
            let record = match parse_record(&record_json) {
                Ok(r) => r,
                Err(e) => {
                    report.note_broken(broken(format!("records row is unreadable: {e}")));
                    continue;
                }
            };
            match (Columns::from_row(&row, 7), Columns::of(&record)) {
                (Ok(a), Ok(b)) if a == b => {}
                _ => {
                    report.note_broken(broken(
                        "records columns differ from the row's record".into(),
                    ));
                    continue;
                }
            }
            match serde_json::from_str::<EntryIn>(&entry) {
                Ok(e) if e.record == record => {}
                Ok(e) => report.note_broken(broken(format!(
                    "records row differs from its last chain entry in: {}",
                    differing_fields(&record, &e.record).join(", ")
                ))),
                Err(_) => report.note_broken(broken("last chain entry is unreadable".into())),
            }
        }
    }

    // 3. Every request of a chain has its records row.
    if let Some(row) = tx.query_opt(
        "SELECT c.replica, c.seq, c.request_id FROM ledger_chain c WHERE NOT EXISTS \
         (SELECT 1 FROM records r WHERE r.request_id = c.request_id) ORDER BY c.replica, c.seq LIMIT 1",
        &[],
    )? {
        let replica: String = row.get(0);
        let seq: i64 = row.get(1);
        report.note_broken(BrokenLink {
            seq: seq.max(0) as u64,
            request_id: row.get(2),
            reason: format!(
                "replica {replica}: the request has chain entries but no records row"
            ),
        });
    }
    Ok(report)
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

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        assert_eq!(latest_version(), *versions.last().unwrap());
    }
}
