//! The SQLite ledger store (the default).
//!
//! Tables:
//! - `ledger_chain(seq, request_id, entry_json, prev_hash, hash)`: append-only (triggers refuse
//!   UPDATE and DELETE, which stops accidents, not an attacker: that is what the hashes are
//!   for). One entry per state change, `seq` 1, 2, 3, ... without gaps.
//! - `records`: the current state of each request (one row per `request_id`, upserted), with
//!   `seq` pointing at the chain entry that holds the same state. Indexed by `received_at_us`,
//!   `(client, received_at_us)` and `(end_user, received_at_us)` for reports.
//! - `ledger_meta(key, value)`: `schema_version`, now 3. A version 1 ledger (the first release)
//!   or 2 is upgraded in place when a writer opens it: the records columns added since
//!   (`ADDED_IN_2`, `ADDED_IN_3`) are added, all `NULL` in existing rows, in the transaction
//!   that opens the ledger. The chain is not touched: its entries are hashed as stored, and an old entry's
//!   record reads the new fields as `None`, which matches the `NULL` columns. A reader opens a
//!   version 1 or 2 ledger without upgrading it.
//!
//! Pragmas: `journal_mode=WAL` (readers such as the admin API and the CLI never block the
//! writer), `synchronous=FULL` by default: a `Begin` that returned is on disk even if the
//! machine loses power, which is the promise made to the request path. Batching amortizes the
//! fsync (one per transaction, i.e. per batch); `NORMAL` is available through
//! [`SqliteStore::set_synchronous`] (WAL + NORMAL survives a process crash, not a power loss).
//! `busy_timeout=5000` for the other connections on the file (readers, the CLI, the quota
//! store's own connection at start-up). In the gateway the quota store's changes run on THIS
//! connection, in the writer's batches ([`LedgerStore::write_batch_with`], [`SqliteTask`]): one
//! connection writes the file, so no writer sleeps in the busy handler waiting for another, and
//! a batch that holds only quota changes commits without an fsync of its own (the next FULL
//! commit, in WAL order, makes it durable). `wal_autocheckpoint=4000` pages (16 MiB of WAL
//! between checkpoints instead of 4): a page changed by many commits (an index tail, a quota
//! row) is copied into the database once per checkpoint, so fewer pages are written and
//! fsynced per request (measured with `bench/run` under `strace -f -c`: see the README).
//!
//! The writer keeps the chain's tip (last seq and hash) in memory, so appending reads nothing
//! back. Each entry is inserted with an explicit `seq`: if another process appended meanwhile
//! the insert collides, the batch fails as `Unavailable`, and the tip is reloaded before the
//! next batch. After any failed transaction the tip is reloaded the same way.

use super::store::{self, Plan};
use std::borrow::Cow;
use std::path::Path;
use std::sync::LazyLock;

use jiff::Timestamp;
use rusqlite::types::{Type, Value};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
    params_from_iter,
};

use super::LedgerError;
use super::record::{
    ENTRY_VERSION, EntryIn, EntryKind, GENESIS_HASH, Outcome, Record, chain_hash, entry_json,
};
use super::report::UsageAggregator;
use super::store::{
    BatchResults, BrokenLink, ChainHead, ChainStatus, LedgerOp, LedgerStore, RecentQuery,
    SqliteTask, UsageFact, UsageQuery, UsageRow, VerifyReport,
};

/// SQLite's `synchronous` setting for the ledger connection (`ledger.sqlite_synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync the WAL at every commit: durable across power loss. The default.
    #[default]
    Full,
    /// fsync only at checkpoints: durable across a process crash, not a power loss.
    Normal,
}

/// Version of the tables. 1: the first release. 2: the records columns `quality` to
/// `cost_basis` (see [`migrate_1_to_2`]). 3: `upstream_key` (see [`migrate_2_to_3`]). The
/// chain entry format is unchanged.
const SCHEMA_VERSION: &str = "3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('schema_version', '3');
CREATE TABLE IF NOT EXISTS ledger_chain (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    entry_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_chain_request ON ledger_chain (request_id, seq);
CREATE TRIGGER IF NOT EXISTS ledger_chain_no_update BEFORE UPDATE ON ledger_chain
BEGIN SELECT RAISE(ABORT, 'ledger_chain is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_chain_no_delete BEFORE DELETE ON ledger_chain
BEGIN SELECT RAISE(ABORT, 'ledger_chain is append-only'); END;
CREATE TABLE IF NOT EXISTS records (
    request_id TEXT PRIMARY KEY,
    received_at_us INTEGER NOT NULL,
    client TEXT,
    end_user TEXT,
    client_addr TEXT,
    outcome TEXT NOT NULL,
    reason_code TEXT,
    reason_param TEXT,
    reason_message TEXT,
    status INTEGER,
    upstream_status INTEGER,
    upstream_request_id TEXT,
    model TEXT,
    n INTEGER,
    size TEXT,
    response_format TEXT,
    images_returned INTEGER,
    cost_reserved_micros INTEGER NOT NULL,
    cost_settled_micros INTEGER NOT NULL,
    image_sha256 TEXT,
    image_bytes INTEGER,
    image_width INTEGER,
    image_height INTEGER,
    mask_sha256 TEXT,
    mask_bytes INTEGER,
    mask_width INTEGER,
    mask_height INTEGER,
    prompt TEXT,
    total_ms INTEGER,
    upstream_ms INTEGER,
    quality TEXT,
    output_format TEXT,
    input_images INTEGER,
    stream INTEGER,
    input_tokens INTEGER,
    input_text_tokens INTEGER,
    input_image_tokens INTEGER,
    output_tokens INTEGER,
    total_tokens INTEGER,
    usage_extra TEXT,
    cost_basis TEXT,
    upstream_key TEXT,
    forwarded INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_received ON records (received_at_us);
CREATE INDEX IF NOT EXISTS records_client ON records (client, received_at_us);
CREATE INDEX IF NOT EXISTS records_user ON records (end_user, received_at_us);
CREATE INDEX IF NOT EXISTS records_forwarding ON records (seq) WHERE outcome = 'forwarding';
CREATE INDEX IF NOT EXISTS records_outcome ON records (outcome, received_at_us);
";

/// The records columns added by version 2, with their types. All nullable: existing rows read
/// them as `NULL`, which is what the chain entries written before them say (a missing field
/// reads as `None`).
const ADDED_IN_2: [(&str, &str); 11] = [
    ("quality", "TEXT"),
    ("output_format", "TEXT"),
    ("input_images", "INTEGER"),
    ("stream", "INTEGER"),
    ("input_tokens", "INTEGER"),
    ("input_text_tokens", "INTEGER"),
    ("input_image_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("total_tokens", "INTEGER"),
    ("usage_extra", "TEXT"),
    ("cost_basis", "TEXT"),
];

/// The upgrade of a version 1 ledger (the first release) to version 2: one `ALTER TABLE ... ADD
/// COLUMN` per [`ADDED_IN_2`] column, then `schema_version` = 2. Run inside the transaction
/// that opens the ledger: all of it or nothing.
fn migrate_1_to_2(conn: &Connection) -> rusqlite::Result<()> {
    for (name, ty) in ADDED_IN_2 {
        conn.execute_batch(&format!("ALTER TABLE records ADD COLUMN {name} {ty};"))?;
    }
    conn.execute(
        "UPDATE ledger_meta SET value = '2' WHERE key = 'schema_version'",
        [],
    )?;
    Ok(())
}

/// The records column added by version 3 (all `NULL` in rows written before it, as their chain
/// entries say).
const ADDED_IN_3: [(&str, &str); 1] = [("upstream_key", "TEXT")];

/// The upgrade of a version 2 ledger to version 3, in the transaction that opens it.
fn migrate_2_to_3(conn: &Connection) -> rusqlite::Result<()> {
    for (name, ty) in ADDED_IN_3 {
        conn.execute_batch(&format!("ALTER TABLE records ADD COLUMN {name} {ty};"))?;
    }
    conn.execute(
        "UPDATE ledger_meta SET value = '3' WHERE key = 'schema_version'",
        [],
    )?;
    Ok(())
}

/// The tables a store reads: current, or version 1 or 2 (read-only stores only; see
/// [`SqliteStore::open_reader`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schema {
    V1,
    V2,
    Current,
}

impl Schema {
    /// `prefix` + `column`, or `NULL` for a column this schema does not have.
    fn column(self, prefix: &str, column: &str) -> String {
        let added = |list: &[(&str, &str)]| list.iter().any(|(c, _)| *c == column);
        let missing = match self {
            Schema::V1 => added(&ADDED_IN_2) || added(&ADDED_IN_3),
            Schema::V2 => added(&ADDED_IN_3),
            Schema::Current => false,
        };
        if missing {
            "NULL".to_owned()
        } else {
            format!("{prefix}{column}")
        }
    }
}

/// Columns of a record, in [`Record`] field order (`user` is `end_user`: `user` is reserved in
/// PostgreSQL). `seq` follows them in every statement.
const COLUMNS: [&str; 43] = [
    "request_id",
    "received_at_us",
    "client",
    "end_user",
    "client_addr",
    "outcome",
    "reason_code",
    "reason_param",
    "reason_message",
    "status",
    "upstream_status",
    "upstream_request_id",
    "model",
    "n",
    "size",
    "response_format",
    "images_returned",
    "cost_reserved_micros",
    "cost_settled_micros",
    "image_sha256",
    "image_bytes",
    "image_width",
    "image_height",
    "mask_sha256",
    "mask_bytes",
    "mask_width",
    "mask_height",
    "prompt",
    "total_ms",
    "upstream_ms",
    "quality",
    "output_format",
    "input_images",
    "stream",
    "input_tokens",
    "input_text_tokens",
    "input_image_tokens",
    "output_tokens",
    "total_tokens",
    "usage_extra",
    "cost_basis",
    "upstream_key",
    "forwarded",
];

/// Index of `seq` in a row selected with [`select_columns`].
const SEQ_COLUMN: usize = COLUMNS.len();

fn select_columns(prefix: &str, schema: Schema) -> String {
    COLUMNS
        .iter()
        .chain(&["seq"])
        .map(|c| schema.column(prefix, c))
        .collect::<Vec<_>>()
        .join(", ")
}

static SELECT_RECORD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM records",
        select_columns("", Schema::Current)
    )
});

static UPSERT_RECORD: LazyLock<String> = LazyLock::new(|| {
    let placeholders = (1..=COLUMNS.len() + 1)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let updates = COLUMNS[1..]
        .iter()
        .chain(&["seq"])
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO records ({}) VALUES ({placeholders}) ON CONFLICT (request_id) DO UPDATE SET {updates}",
        select_columns("", Schema::Current)
    )
});

const INSERT_ENTRY: &str = "INSERT INTO ledger_chain (seq, request_id, entry_json, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5)";

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        let transient = match &e {
            rusqlite::Error::SqliteFailure(f, _) => matches!(
                f.code,
                ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::OutOfMemory
                    | ErrorCode::FileLockingProtocolFailed
                    | ErrorCode::PermissionDenied
            ),
            _ => false,
        };
        if transient {
            LedgerError::Unavailable(e.to_string())
        } else {
            LedgerError::Store(e.to_string())
        }
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

/// The last chain entry as the writer knows it.
#[derive(Clone, Debug)]
struct Tip {
    seq: i64,
    hash: String,
}

pub struct SqliteStore {
    conn: Connection,
    /// `None`: unknown (after a failed transaction); reloaded before the next write.
    tip: Option<Tip>,
    read_only: bool,
    schema: Schema,
    /// The connection's `synchronous` setting.
    synchronous: Synchronous,
    /// The file this store opened for writing (path, device and inode), checked before each
    /// write: SQLite keeps writing through its open descriptor to a file that was deleted,
    /// replaced or made read-only, so the gateway would not notice otherwise.
    file: Option<FileId>,
}

/// The identity of the ledger file as opened.
#[derive(Debug, Clone)]
struct FileId {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// `Err` when the file at the path is gone, is another file, or is read-only.
    fn check(&self) -> Result<(), LedgerError> {
        use std::os::unix::fs::MetadataExt;
        let shown = self.path.display();
        let m = std::fs::metadata(&self.path).map_err(|e| {
            LedgerError::Unavailable(format!("{shown}: the ledger file is gone ({e})"))
        })?;
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Err(LedgerError::Unavailable(format!(
                "{shown}: the ledger file was replaced by another file; restart the gateway to use it"
            )));
        }
        if m.permissions().readonly() {
            return Err(LedgerError::Unavailable(format!(
                "{shown}: the ledger file is read-only"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .field("tip", &self.tip)
            .field("read_only", &self.read_only)
            .field("schema", &self.schema)
            .finish()
    }
}

impl SqliteStore {
    /// Open (creating it and its directory if needed) the ledger at `path`, for writing.
    pub fn open(path: &Path) -> Result<SqliteStore, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LedgerError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| at(path, e))?;
        let mut store = Self::init(conn)?;
        store.file = FileId::of(path);
        Ok(store)
    }

    /// A private in-memory ledger (tests, dry runs).
    pub fn open_in_memory() -> Result<SqliteStore, LedgerError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// Open an existing ledger for queries only (`PRAGMA query_only`): the admin listener and
    /// the CLI read through this while the gateway writes (WAL lets them run side by side).
    ///
    /// A version 1 ledger (not yet upgraded by a writer) is read as it is: the columns it lacks
    /// read as `NULL`, as in its chain entries, so `usage`, `audit export` and `audit verify`
    /// work on it before the gateway's first start on this release.
    pub fn open_reader(path: &Path) -> Result<SqliteStore, LedgerError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| at(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "query_only", true)?;
        let version = read_version(&conn)
            .map_err(|e| LedgerError::Store(format!("{}: not a ledger: {e}", path.display())))?;
        let schema = parse_version(version)
            .map_err(|e| LedgerError::Store(format!("{}: {e}", path.display())))?;
        Ok(SqliteStore {
            conn,
            tip: None,
            read_only: true,
            schema,
            synchronous: Synchronous::Full,
            file: None,
        })
    }

    fn init(conn: Connection) -> Result<SqliteStore, LedgerError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // In memory this stays "memory"; on disk it must become "wal".
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if conn.path().is_some_and(|p| !p.is_empty()) && !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "ledger: WAL mode not available");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the WAL file from staying huge after a burst.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        // Fewer checkpoints: a page changed by many commits is copied once per checkpoint.
        conn.pragma_update(None, "wal_autocheckpoint", 4000)?;
        // Create what is missing and upgrade an older ledger in one transaction: another
        // process opening the same file waits, then finds it current.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;{SCHEMA}{}{}",
            crate::limits::quota::SQLITE_USAGE,
            crate::limits::quota::SQLITE_HOLDS
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        let upgraded = (|| {
            if parse_version(read_version(&conn)?)? == Schema::V1 {
                migrate_1_to_2(&conn)?;
                tracing::info!("ledger: schema upgraded from version 1 to 2");
            }
            if parse_version(read_version(&conn)?)? == Schema::V2 {
                migrate_2_to_3(&conn)?;
                tracing::info!("ledger: schema upgraded from version 2 to {SCHEMA_VERSION}");
            }
            if parse_version(read_version(&conn)?)? != Schema::Current {
                return Err(LedgerError::Store("ledger schema upgrade failed".into()));
            }
            conn.execute_batch("COMMIT")?;
            Ok::<_, LedgerError>(())
        })();
        if let Err(e) = upgraded {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        let mut store = SqliteStore {
            conn,
            tip: None,
            read_only: false,
            schema: Schema::Current,
            synchronous: Synchronous::Full,
            file: None,
        };
        store.load_tip()?;
        Ok(store)
    }

    /// Durability of each commit (see the module doc). FULL unless changed.
    pub fn set_synchronous(&mut self, mode: Synchronous) -> Result<(), LedgerError> {
        let v = match mode {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        self.conn.pragma_update(None, "synchronous", v)?;
        self.synchronous = mode;
        Ok(())
    }

    /// Cap the database at `pages` pages (never below its current size); writes that need
    /// more fail with SQLITE_FULL, as on a full disk. Returns the cap now in force.
    pub fn set_max_page_count(&self, pages: u64) -> Result<u64, LedgerError> {
        let now: i64 =
            self.conn
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(now).unwrap_or(0))
    }

    /// Pages the database has now.
    pub fn page_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The last chain entry, read from the database.
    pub fn head(&self) -> Result<Option<ChainHead>, LedgerError> {
        Ok(read_tip(&self.conn)?.map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash,
        }))
    }

    fn load_tip(&mut self) -> Result<Tip, LedgerError> {
        let tip = read_tip(&self.conn)?.unwrap_or_else(|| Tip {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        });
        self.tip = Some(tip.clone());
        Ok(tip)
    }

    fn current_tip(&mut self) -> Result<Tip, LedgerError> {
        match &self.tip {
            Some(t) => Ok(t.clone()),
            None => self.load_tip(),
        }
    }

    /// `SELECT <every column> FROM records` for this store's schema.
    fn select_record(&self) -> Cow<'static, str> {
        match self.schema {
            Schema::Current => Cow::Borrowed(SELECT_RECORD.as_str()),
            Schema::V1 | Schema::V2 => Cow::Owned(format!(
                "SELECT {} FROM records",
                select_columns("", self.schema)
            )),
        }
    }

    fn writable(&self) -> Result<(), LedgerError> {
        if self.read_only {
            Err(LedgerError::Store(
                "this ledger store was opened read-only".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Run `body` in one IMMEDIATE transaction starting from the current tip; commit and keep
    /// the new tip on success, roll back and forget the tip on failure.
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&Connection, &mut Tip) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.writable()?;
        if let Some(file) = &self.file {
            file.check()?;
        }
        let mut tip = self.current_tip()?;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = body(&tx, &mut tip)?;
            tx.commit()?;
            Ok(out)
        })();
        match result {
            Ok(out) => {
                self.tip = Some(tip);
                Ok(out)
            }
            Err(e) => {
                // The transaction rolled back (dropping it does); the tip we advanced is void.
                self.tip = None;
                Err(e)
            }
        }
    }
}

fn at(path: &Path, e: rusqlite::Error) -> LedgerError {
    match LedgerError::from(e) {
        LedgerError::Unavailable(m) => LedgerError::Unavailable(format!("{}: {m}", path.display())),
        LedgerError::Store(m) => LedgerError::Store(format!("{}: {m}", path.display())),
        other => other,
    }
}

fn read_version(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// The schema of a ledger with this `schema_version`, if this build reads it.
fn parse_version(version: Option<String>) -> Result<Schema, LedgerError> {
    match version.as_deref() {
        Some(SCHEMA_VERSION) => Ok(Schema::Current),
        Some("1") => Ok(Schema::V1),
        Some("2") => Ok(Schema::V2),
        Some(v) => Err(LedgerError::Store(format!(
            "ledger schema version {v} is not supported (expected {SCHEMA_VERSION})"
        ))),
        None => Err(LedgerError::Store("ledger schema version missing".into())),
    }
}

fn read_tip(conn: &Connection) -> Result<Option<Tip>, LedgerError> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM ledger_chain ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok(Tip {
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                })
            },
        )
        .optional()?)
}

/// Decide what `op` does, given what is stored (the shared [`store::plan`]).
fn plan(conn: &Connection, op: &LedgerOp) -> Result<Plan, LedgerError> {
    let existing: Option<String> = conn
        .prepare_cached("SELECT outcome FROM records WHERE request_id = ?1")?
        .query_row([&op.record().request_id], |r| r.get(0))
        .optional()?;
    Ok(store::plan(op, existing.as_deref()))
}

/// Append one chain entry for `r` and make `r` the request's current record.
fn append(
    conn: &Connection,
    tip: &mut Tip,
    kind: EntryKind,
    r: &Record,
) -> Result<(), LedgerError> {
    let json = entry_json(kind, r)
        .map_err(|e| LedgerError::Store(format!("cannot serialize a chain entry: {e}")))?;
    let seq = tip.seq + 1;
    let hash = chain_hash(&tip.hash, &json);
    conn.prepare_cached(INSERT_ENTRY)?
        .execute(params![seq, r.request_id, json, tip.hash, hash])
        .map_err(|e| {
            if is_constraint(&e) {
                LedgerError::Unavailable(format!(
                    "chain entry {seq} already exists: another process wrote to this ledger; \
                     the tip is reloaded before the next write"
                ))
            } else {
                e.into()
            }
        })?;
    // rusqlite binds u64 only with a feature the main crate does not enable; `validate`
    // guarantees these fit.
    let int = |v: Option<u64>, name: &str| {
        v.map(i64::try_from).transpose().map_err(|_| {
            LedgerError::Rejected(format!("{name} does not fit a signed 64-bit integer"))
        })
    };
    let image_bytes = int(r.image_bytes, "image_bytes")?;
    let mask_bytes = int(r.mask_bytes, "mask_bytes")?;
    let total_ms = int(r.total_ms, "total_ms")?;
    let upstream_ms = int(r.upstream_ms, "upstream_ms")?;
    let input_tokens = int(r.input_tokens, "input_tokens")?;
    let input_text_tokens = int(r.input_text_tokens, "input_text_tokens")?;
    let input_image_tokens = int(r.input_image_tokens, "input_image_tokens")?;
    let output_tokens = int(r.output_tokens, "output_tokens")?;
    let total_tokens = int(r.total_tokens, "total_tokens")?;
    conn.prepare_cached(&UPSERT_RECORD)?.execute(params![
        r.request_id,
        r.received_at.as_microsecond(),
        r.client,
        r.user,
        r.client_addr,
        r.outcome.as_str(),
        r.reason_code,
        r.reason_param,
        r.reason_message,
        r.status,
        r.upstream_status,
        r.upstream_request_id,
        r.model,
        r.n,
        r.size,
        r.response_format,
        r.images_returned,
        r.cost_reserved_micros,
        r.cost_settled_micros,
        r.image_sha256,
        image_bytes,
        r.image_width,
        r.image_height,
        r.mask_sha256,
        mask_bytes,
        r.mask_width,
        r.mask_height,
        r.prompt,
        total_ms,
        upstream_ms,
        r.quality,
        r.output_format,
        r.input_images,
        r.stream,
        input_tokens,
        input_text_tokens,
        input_image_tokens,
        output_tokens,
        total_tokens,
        r.usage_extra,
        r.cost_basis.map(|b| b.as_str()),
        r.upstream_key,
        r.forwarded,
        seq,
    ])?;
    *tip = Tip { seq, hash };
    Ok(())
}

/// A non-negative INTEGER column as u64.
fn get_u64(row: &Row, col: usize) -> rusqlite::Result<Option<u64>> {
    row.get::<_, Option<i64>>(col)?
        .map(|v| u64::try_from(v).map_err(|e| conversion(col, Type::Integer, e)))
        .transpose()
}

fn conversion(col: usize, ty: Type, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, ty, e.to_string().into())
}

/// A record from a row selected with [`select_columns`] (`seq` ignored).
fn record_from_row(row: &Row) -> rusqlite::Result<Record> {
    let at: i64 = row.get(1)?;
    let outcome: String = row.get(5)?;
    Ok(Record {
        request_id: row.get(0)?,
        received_at: Timestamp::from_microsecond(at)
            .map_err(|e| conversion(1, Type::Integer, e))?,
        client: row.get(2)?,
        user: row.get(3)?,
        client_addr: row.get(4)?,
        outcome: outcome
            .parse()
            .map_err(|e: String| conversion(5, Type::Text, e))?,
        reason_code: row.get(6)?,
        reason_param: row.get(7)?,
        reason_message: row.get(8)?,
        status: row.get(9)?,
        upstream_status: row.get(10)?,
        upstream_request_id: row.get(11)?,
        model: row.get(12)?,
        n: row.get(13)?,
        size: row.get(14)?,
        response_format: row.get(15)?,
        images_returned: row.get(16)?,
        cost_reserved_micros: row.get(17)?,
        cost_settled_micros: row.get(18)?,
        image_sha256: row.get(19)?,
        image_bytes: get_u64(row, 20)?,
        image_width: row.get(21)?,
        image_height: row.get(22)?,
        mask_sha256: row.get(23)?,
        mask_bytes: get_u64(row, 24)?,
        mask_width: row.get(25)?,
        mask_height: row.get(26)?,
        prompt: row.get(27)?,
        total_ms: get_u64(row, 28)?,
        upstream_ms: get_u64(row, 29)?,
        quality: row.get(30)?,
        output_format: row.get(31)?,
        input_images: row.get(32)?,
        stream: row.get(33)?,
        input_tokens: get_u64(row, 34)?,
        input_text_tokens: get_u64(row, 35)?,
        input_image_tokens: get_u64(row, 36)?,
        output_tokens: get_u64(row, 37)?,
        total_tokens: get_u64(row, 38)?,
        usage_extra: row.get(39)?,
        cost_basis: row
            .get::<_, Option<String>>(40)?
            .map(|b| b.parse().map_err(|e: String| conversion(40, Type::Text, e)))
            .transpose()?,
        upstream_key: row.get(41)?,
        forwarded: row.get(42)?,
    })
}

/// ` WHERE ...` for the filters of `q` (empty without filters), and its arguments.
fn filter(q: &UsageQuery) -> (String, Vec<Value>) {
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    if let Some(t) = q.since {
        clauses.push("received_at_us >= ?");
        args.push(Value::Integer(t.as_microsecond()));
    }
    if let Some(t) = q.until {
        clauses.push("received_at_us < ?");
        args.push(Value::Integer(t.as_microsecond()));
    }
    if let Some(c) = &q.client {
        clauses.push("client = ?");
        args.push(Value::Text(c.clone()));
    }
    if let Some(u) = &q.user {
        clauses.push("end_user = ?");
        args.push(Value::Text(u.clone()));
    }
    if clauses.is_empty() {
        (String::new(), args)
    } else {
        (format!(" WHERE {}", clauses.join(" AND ")), args)
    }
}

/// ` WHERE ...` for the filters and cursor of a [`RecentQuery`], and its arguments.
fn recent_filter(q: &RecentQuery) -> (String, Vec<Value>) {
    let (base, mut args) = filter(&UsageQuery {
        since: q.since,
        until: q.until,
        client: q.client.clone(),
        user: q.user.clone(),
        ..UsageQuery::default()
    });
    let mut clauses: Vec<&str> = Vec::new();
    if let Some(o) = q.outcome {
        clauses.push("outcome = ?");
        args.push(Value::Text(o.as_str().to_owned()));
    }
    if let Some(id) = &q.before {
        clauses.push(
            "(received_at_us, request_id) < \
             (SELECT received_at_us, request_id FROM records WHERE request_id = ?)",
        );
        args.push(Value::Text(id.clone()));
    }
    let sql = match (base.is_empty(), clauses.is_empty()) {
        (_, true) => base,
        (true, false) => format!(" WHERE {}", clauses.join(" AND ")),
        (false, false) => format!("{base} AND {}", clauses.join(" AND ")),
    };
    (sql, args)
}

/// Whether a chain entry of `kind` may carry `outcome` (as the writer produces them).
pub(crate) fn kind_fits(kind: EntryKind, outcome: Outcome) -> bool {
    match kind {
        EntryKind::Begin => outcome == Outcome::Forwarding,
        EntryKind::Recover => outcome == Outcome::Unknown,
        EntryKind::Complete | EntryKind::Final => outcome.is_final(),
    }
}

/// Names of the fields in which two records differ.
pub(crate) fn differing_fields(a: &Record, b: &Record) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

impl LedgerStore for SqliteStore {
    fn recover(&mut self) -> Result<usize, LedgerError> {
        self.in_transaction(|tx, tip| {
            let stuck: Vec<Record> = tx
                .prepare(&format!(
                    "{} WHERE outcome = 'forwarding' ORDER BY seq",
                    *SELECT_RECORD
                ))?
                .query_map([], record_from_row)?
                .collect::<Result<_, _>>()?;
            for mut r in stuck.iter().cloned() {
                r.outcome = Outcome::Unknown;
                // The upstream may have answered and charged; the quota kept the reservation.
                r.cost_settled_micros = r.cost_reserved_micros;
                append(tx, tip, EntryKind::Recover, &r)?;
            }
            if !stuck.is_empty() {
                tracing::warn!(
                    records = stuck.len(),
                    "ledger: requests left forwarding by a previous run are now unknown"
                );
            }
            Ok(stuck.len())
        })
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        Ok(self
            .conn
            .query_row("SELECT hash FROM ledger_chain WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn tip(&self) -> Option<ChainHead> {
        self.tip.as_ref().filter(|t| t.seq > 0).map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash.clone(),
        })
    }

    fn check(&mut self) -> Result<(), LedgerError> {
        self.writable()?;
        match &self.file {
            Some(file) => file.check(),
            None => Ok(()),
        }
    }

    fn try_write(&mut self) -> Result<(), LedgerError> {
        // Rewrites a row as it is: a real page write and commit (fails on a full disk too).
        self.in_transaction(|tx, _| {
            tx.execute(
                "UPDATE ledger_meta SET value = value WHERE key = 'schema_version'",
                [],
            )?;
            Ok(())
        })
    }

    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
        Ok(self.write_batch_with(ops, &mut [])?.0)
    }

    fn write_batch_with(
        &mut self,
        ops: &[LedgerOp],
        tasks: &mut [Box<dyn SqliteTask>],
    ) -> Result<BatchResults, LedgerError> {
        if ops.is_empty() && tasks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // A batch of quota changes only commits without its own fsync (as the quota store's
        // connection always did, `synchronous=NORMAL`): the WAL is written in order, so the
        // next FULL commit (the request's `forwarding` or final record) makes it durable too,
        // and a crash in between is what start-up recovery reconciles.
        let relaxed = ops.is_empty() && self.synchronous == Synchronous::Full;
        if relaxed {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let written = self.in_transaction(|tx, tip| {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match plan(tx, op)? {
                    Plan::Refuse(why) => results.push(Err(LedgerError::Rejected(why))),
                    Plan::Write(kind, record) => {
                        append(tx, tip, kind, &record)?;
                        if kind != EntryKind::Begin {
                            // The quota was settled and now the record is final: the request's
                            // hold has nothing left to reconcile (see `QuotaStore::settle`).
                            tx.prepare_cached(
                                "DELETE FROM quota_holds WHERE request_id = ?1 AND settled = 1",
                            )?
                            .execute([&record.request_id])?;
                        }
                        results.push(Ok(()));
                    }
                }
            }
            let mut done = Vec::with_capacity(tasks.len());
            for task in tasks.iter_mut() {
                tx.prepare_cached("SAVEPOINT ledger_task")?.execute([])?;
                let result = task.run(tx);
                if result.is_err() {
                    tx.prepare_cached("ROLLBACK TO ledger_task")?.execute([])?;
                }
                tx.prepare_cached("RELEASE ledger_task")?.execute([])?;
                done.push(result);
            }
            Ok((results, done))
        });
        if relaxed {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        written
    }

    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        Ok(self
            .conn
            .prepare_cached(&format!("{} WHERE request_id = ?1", self.select_record()))?
            .query_row([request_id], record_from_row)
            .optional()?)
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let (filter_sql, args) = filter(q);
        let mut stmt = self.conn.prepare(&format!(
            "SELECT received_at_us, client, end_user, outcome, reason_code, images_returned, \
             cost_settled_micros, forwarded, model, {}, {} FROM records{filter_sql}",
            self.schema.column("", "input_tokens"),
            self.schema.column("", "output_tokens"),
        ))?;
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut agg = UsageAggregator::new(q);
        while let Some(row) = rows.next()? {
            let client: Option<String> = row.get(1)?;
            let user: Option<String> = row.get(2)?;
            let outcome: String = row.get(3)?;
            let reason: Option<String> = row.get(4)?;
            let model: Option<String> = row.get(8)?;
            let outcome = outcome
                .parse::<Outcome>()
                .map_err(|e| LedgerError::Store(format!("records: {e}")))?;
            agg.add(UsageFact {
                received_at_us: row.get(0)?,
                client: client.as_deref(),
                user: user.as_deref(),
                model: model.as_deref(),
                outcome,
                reason_code: reason.as_deref(),
                images: row.get::<_, Option<u32>>(5)?.unwrap_or(0),
                spend_micros: row.get(6)?,
                input_tokens: get_u64(row, 9)?.unwrap_or(0),
                output_tokens: get_u64(row, 10)?.unwrap_or(0),
                forwarded: row.get(7)?,
            });
        }
        Ok(agg.finish())
    }

    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let (filter_sql, mut args) = filter(q);
        let limit = q.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        args.push(Value::Integer(limit));
        let mut stmt = self.conn.prepare(&format!(
            "{}{filter_sql} ORDER BY received_at_us, request_id LIMIT ?",
            self.select_record()
        ))?;
        let mut rows = stmt.query(params_from_iter(args))?;
        while let Some(row) = rows.next()? {
            out(&record_from_row(row)?)?;
        }
        Ok(())
    }

    fn recent(&self, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
        let (filter_sql, mut args) = recent_filter(q);
        args.push(Value::Integer(i64::from(q.limit)));
        let mut stmt = self.conn.prepare(&format!(
            "{}{filter_sql} ORDER BY received_at_us DESC, request_id DESC LIMIT ?",
            self.select_record()
        ))?;
        let rows = stmt.query_map(params_from_iter(args), record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        // One read transaction, so the head and the counts agree.
        let tx = self.conn.unchecked_transaction()?;
        let head = read_tip(&tx)?.map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash,
        });
        let records: i64 = tx.query_row("SELECT count(*) FROM records", [], |r| r.get(0))?;
        Ok(ChainStatus {
            // The chain is numbered 1, 2, 3, ... without gaps (verify checks it).
            entries: head.as_ref().map_or(0, |h| h.seq),
            head,
            records: records.max(0) as u64,
            chains: Vec::new(),
        })
    }

    fn verify(&self) -> Result<VerifyReport, LedgerError> {
        // One read transaction: a consistent snapshot while the writer goes on.
        let tx = self.conn.unchecked_transaction()?;
        let mut report = VerifyReport {
            head: read_tip(&tx)?.map(|t| ChainHead {
                seq: t.seq as u64,
                hash: t.hash,
            }),
            ..VerifyReport::default()
        };

        // 1. The chain, in seq order: contiguous, linked, hashes right, entries readable.
        {
            let mut stmt = tx.prepare(
                "SELECT seq, request_id, entry_json, prev_hash, hash FROM ledger_chain ORDER BY seq",
            )?;
            let mut rows = stmt.query([])?;
            let mut expect: i64 = 1;
            let mut prev = GENESIS_HASH.to_owned();
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let text = |i| row.get::<_, String>(i).ok();
                let request_id = text(1).unwrap_or_default();
                let broken = |reason: String| BrokenLink {
                    seq: seq.max(0) as u64,
                    request_id: request_id.clone(),
                    reason,
                };
                if seq != expect {
                    report.note_broken(BrokenLink {
                        seq: expect as u64,
                        request_id: String::new(),
                        reason: format!("entry {expect} is missing (found entry {seq} next)"),
                    });
                    break;
                }
                let (Some(json), Some(prev_hash), Some(hash)) = (text(2), text(3), text(4)) else {
                    report.note_broken(broken("a column of the entry is not text".into()));
                    break;
                };
                if prev_hash != prev {
                    report.note_broken(broken(format!(
                        "prev_hash does not match the hash of entry {}",
                        seq - 1
                    )));
                    break;
                }
                if chain_hash(&prev, &json) != hash {
                    report.note_broken(broken("hash does not match the entry".into()));
                    break;
                }
                match serde_json::from_str::<EntryIn>(&json) {
                    Err(e) => {
                        report.note_broken(broken(format!("entry is not readable: {e}")));
                        break;
                    }
                    Ok(e) if e.v != ENTRY_VERSION => {
                        report.note_broken(broken(format!("entry version {} is unknown", e.v)));
                        break;
                    }
                    Ok(e) if e.record.request_id != request_id => {
                        report.note_broken(broken(
                            "request_id column differs from the entry's record".into(),
                        ));
                        break;
                    }
                    Ok(e) if !kind_fits(e.kind, e.record.outcome) => {
                        report.note_broken(broken(format!(
                            "a {:?} entry cannot hold outcome {}",
                            e.kind, e.record.outcome
                        )));
                        break;
                    }
                    Ok(_) => {}
                }
                prev = hash;
                expect += 1;
                report.entries += 1;
            }
        }

        // 2. Each records row equals the last chain entry of its request.
        {
            let sql = format!(
                "SELECT {}, c.seq, c.entry_json FROM records r LEFT JOIN ledger_chain c \
                 ON c.seq = (SELECT MAX(m.seq) FROM ledger_chain m WHERE m.request_id = r.request_id)",
                select_columns("r.", self.schema)
            );
            let mut stmt = tx.prepare(&sql)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                report.records += 1;
                let request_id = row.get::<_, String>(0).unwrap_or_default();
                let row_seq = row.get::<_, i64>(SEQ_COLUMN).unwrap_or(0);
                let chain_seq: Option<i64> = row.get(SEQ_COLUMN + 1)?;
                let entry: Option<String> = row.get(SEQ_COLUMN + 2).ok().flatten();
                let Some(chain_seq) = chain_seq else {
                    report.note_broken(BrokenLink {
                        seq: row_seq.max(0) as u64,
                        request_id,
                        reason: "records row has no chain entry".into(),
                    });
                    continue;
                };
                let broken = |reason: String| BrokenLink {
                    seq: chain_seq.max(0) as u64,
                    request_id: request_id.clone(),
                    reason,
                };
                let record = match record_from_row(row) {
                    Ok(r) => r,
                    Err(e) => {
                        report.note_broken(broken(format!("records row is unreadable: {e}")));
                        continue;
                    }
                };
                if row_seq != chain_seq {
                    report.note_broken(broken(format!(
                        "records row points at entry {row_seq}, the request's last entry is {chain_seq}"
                    )));
                    continue;
                }
                match entry.as_deref().map(serde_json::from_str::<EntryIn>) {
                    Some(Ok(e)) if e.record == record => {}
                    Some(Ok(e)) => report.note_broken(broken(format!(
                        "records row differs from its last chain entry in: {}",
                        differing_fields(&record, &e.record).join(", ")
                    ))),
                    _ => report.note_broken(broken("last chain entry is unreadable".into())),
                }
            }
        }

        // 3. Every request of the chain has its records row.
        let orphan: Option<(i64, String)> = tx
            .query_row(
                "SELECT c.seq, c.request_id FROM ledger_chain c WHERE NOT EXISTS \
                 (SELECT 1 FROM records r WHERE r.request_id = c.request_id) ORDER BY c.seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get::<_, String>(1).unwrap_or_default())),
            )
            .optional()?;
        if let Some((seq, request_id)) = orphan {
            report.note_broken(BrokenLink {
                seq: seq.max(0) as u64,
                request_id,
                reason: "the request has chain entries but no records row".into(),
            });
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::{rec, sample};

    fn ok(results: Vec<Result<(), LedgerError>>) {
        for r in results {
            r.unwrap();
        }
    }

    fn begun(id: &str) -> Record {
        Record {
            request_id: id.into(),
            received_at: "2025-01-01T00:00:00Z".parse().unwrap(),
            client: Some("acme".into()),
            cost_reserved_micros: 40_000,
            ..Record::default()
        }
    }

    fn entries(s: &SqliteStore) -> i64 {
        s.conn
            .query_row("SELECT COUNT(*) FROM ledger_chain", [], |r| r.get(0))
            .unwrap()
    }

    /// An attacker (or a careless admin) drops the append-only triggers first.
    fn unprotect(s: &SqliteStore) {
        s.conn
            .execute_batch(
                "DROP TRIGGER ledger_chain_no_update; DROP TRIGGER ledger_chain_no_delete;",
            )
            .unwrap();
    }

    #[test]
    fn one_record_per_op_kind() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        // Begin then Complete: one record, two chain entries.
        let mut r = sample();
        r.outcome = Outcome::Answered; // Begin stores forwarding whatever it says
        ok(s.write_batch(&[LedgerOp::Begin(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(got.outcome, Outcome::Forwarding);
        assert!(got.forwarded);
        ok(s.write_batch(&[LedgerOp::Complete(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(
            got,
            Record {
                forwarded: true,
                ..r.clone()
            }
        );

        // Final: one record, one entry, not forwarded.
        let mut rej = rec(
            "req_rej",
            "2025-01-01T00:00:01Z",
            "acme",
            Some("bob"),
            Outcome::Rejected,
        );
        rej.reason_code = Some("rate_limit_exceeded".into());
        rej.reason_param = Some("user".into());
        rej.status = Some(429);
        rej.forwarded = true; // overwritten by the store
        ok(s.write_batch(&[LedgerOp::Final(rej.clone())]).unwrap());
        assert_eq!(
            s.get("req_rej").unwrap().unwrap(),
            Record {
                forwarded: false,
                ..rej
            }
        );

        // Complete without Begin is kept (nothing lost), as not forwarded.
        let gone = rec(
            "req_gone",
            "2025-01-01T00:00:02Z",
            "acme",
            None,
            Outcome::ClientGone,
        );
        ok(s.write_batch(&[LedgerOp::Complete(gone)]).unwrap());
        assert!(!s.get("req_gone").unwrap().unwrap().forwarded);

        assert_eq!(entries(&s), 4);
        assert_eq!(s.get("nope").unwrap(), None);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!((v.entries, v.records), (4, 3));
        assert_eq!(v.head.unwrap().seq, 4);
    }

    #[test]
    fn refusals_skip_the_op_not_the_batch() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let a = begun("a");
        let results = s
            .write_batch(&[
                LedgerOp::Begin(a.clone()),
                LedgerOp::Begin(a.clone()), // duplicate
                LedgerOp::Final(Record::new("", Timestamp::UNIX_EPOCH)), // invalid
                LedgerOp::Final(Record {
                    outcome: Outcome::Forwarding, // a final cannot be forwarding
                    ..begun("b")
                }),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    ..a.clone()
                }),
                LedgerOp::Complete(Record {
                    outcome: Outcome::UpstreamError,
                    ..a.clone()
                }), // already final
                LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..a.clone()
                }), // already recorded
                LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..begun("c")
                }),
            ])
            .unwrap();
        let refused: Vec<bool> = results
            .iter()
            .map(|r| matches!(r, Err(LedgerError::Rejected(_))))
            .collect();
        assert_eq!(refused, [false, true, true, true, false, true, true, false]);
        assert_eq!(s.get("a").unwrap().unwrap().outcome, Outcome::Answered);
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(entries(&s), 3);
        assert!(s.verify().unwrap().is_ok());
    }

    #[test]
    fn recovery_turns_forwarding_into_unknown_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.db");
        {
            let mut s = SqliteStore::open(&path).unwrap();
            ok(s.write_batch(&[
                LedgerOp::Begin(begun("a")),
                LedgerOp::Begin(begun("b")),
                LedgerOp::Begin(begun("c")),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    cost_settled_micros: 40_000,
                    images_returned: Some(1),
                    ..begun("b")
                }),
            ])
            .unwrap());
            // "crash": dropped with a and c forwarding.
        }
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.recover().unwrap(), 2);
        for id in ["a", "c"] {
            let r = s.get(id).unwrap().unwrap();
            assert_eq!(r.outcome, Outcome::Unknown);
            assert!(r.forwarded);
            assert_eq!(r.cost_settled_micros, 40_000);
        }
        assert_eq!(s.get("b").unwrap().unwrap().outcome, Outcome::Answered);
        assert_eq!(s.recover().unwrap(), 0);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!((v.entries, v.records), (6, 3));
        // A late completion of a recovered request is refused: it is final.
        let late = s
            .write_batch(&[LedgerOp::Complete(Record {
                outcome: Outcome::Answered,
                ..begun("a")
            })])
            .unwrap();
        assert!(matches!(late[0], Err(LedgerError::Rejected(_))));
        // And a reader sees it all.
        let reader = SqliteStore::open_reader(&path).unwrap();
        assert_eq!(reader.get("c").unwrap().unwrap().outcome, Outcome::Unknown);
        assert!(reader.verify().unwrap().is_ok());
    }

    fn filled(n: usize) -> SqliteStore {
        let mut s = SqliteStore::open_in_memory().unwrap();
        for i in 0..n {
            let id = format!("r{i}");
            ok(s.write_batch(&[
                LedgerOp::Begin(begun(&id)),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    cost_settled_micros: 40_000,
                    ..begun(&id)
                }),
            ])
            .unwrap());
        }
        s
    }

    #[test]
    fn tampered_entry_json_names_its_seq() {
        let s = filled(5);
        assert!(s.verify().unwrap().is_ok());
        unprotect(&s);
        s.conn
            .execute(
                "UPDATE ledger_chain SET entry_json = replace(entry_json, '40000', '1') WHERE seq = 6",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (6, "r2"));
        assert!(b.reason.contains("hash"), "{}", b.reason);
    }

    #[test]
    fn rehashed_entry_breaks_the_next_link() {
        let s = filled(3);
        unprotect(&s);
        // Forge entry 2 consistently with entry 1: entry 3's prev_hash no longer matches.
        let (prev, json): (String, String) = s
            .conn
            .query_row(
                "SELECT prev_hash, entry_json FROM ledger_chain WHERE seq = 2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let forged = json.replace("\"answered\"", "\"upstream_error\"");
        s.conn
            .execute(
                "UPDATE ledger_chain SET entry_json = ?1, hash = ?2 WHERE seq = 2",
                params![forged, chain_hash(&prev, &forged)],
            )
            .unwrap();
        // ... and the records row to match, so only the link to entry 3 can tell.
        s.conn
            .execute(
                "UPDATE records SET outcome = 'upstream_error' WHERE request_id = 'r0'",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 3);
        assert!(b.reason.contains("prev_hash"), "{}", b.reason);
    }

    #[test]
    fn tampered_records_row_names_the_requests_last_entry() {
        let s = filled(5);
        s.conn
            .execute(
                "UPDATE records SET cost_settled_micros = 0 WHERE request_id = 'r3'",
                [],
            )
            .unwrap();
        s.conn
            .execute(
                "UPDATE records SET images_returned = 9 WHERE request_id = 'r4'",
                [],
            )
            .unwrap();
        let v = s.verify().unwrap();
        let b = v.first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (8, "r3"));
        assert!(b.reason.contains("cost_settled_micros"), "{}", b.reason);
        assert_eq!(v.entries, 10); // the chain itself is intact
    }

    #[test]
    fn deleted_rows_are_found() {
        let s = filled(4);
        unprotect(&s);
        s.conn
            .execute("DELETE FROM ledger_chain WHERE seq = 5", [])
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 5);
        assert!(b.reason.contains("missing"), "{}", b.reason);

        let s = filled(4);
        s.conn
            .execute("DELETE FROM records WHERE request_id = 'r1'", [])
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (3, "r1"));

        // An outcome that is no outcome at all is reported, not an error.
        let s = filled(2);
        s.conn
            .execute(
                "UPDATE records SET outcome = 'paid' WHERE request_id = 'r1'",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 4);
        assert!(b.reason.contains("unreadable"), "{}", b.reason);
    }

    #[test]
    fn chain_is_append_only() {
        let s = filled(1);
        let e = s
            .conn
            .execute("UPDATE ledger_chain SET hash = 'x' WHERE seq = 1", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"));
        assert!(s.conn.execute("DELETE FROM ledger_chain", []).is_err());
    }

    #[test]
    fn disk_full_rolls_back_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("l.db")).unwrap();
        ok(s.write_batch(&[LedgerOp::Final(rec(
            "first",
            "2025-01-01T00:00:00Z",
            "acme",
            None,
            Outcome::Rejected,
        ))])
        .unwrap());
        let pages = s.page_count().unwrap();
        assert_eq!(s.set_max_page_count(pages).unwrap(), pages);
        let big = |id: &str| Record {
            prompt: Some("p".repeat(64 * 1024)),
            ..begun(id)
        };
        let batch = [LedgerOp::Begin(begun("small")), LedgerOp::Begin(big("big"))];
        let err = s.write_batch(&batch).unwrap_err();
        assert!(
            matches!(err, LedgerError::Unavailable(ref m) if m.contains("full")),
            "{err:?}"
        );
        // Nothing of the batch stayed, and the chain is intact.
        assert_eq!(s.get("small").unwrap(), None);
        assert_eq!(entries(&s), 1);
        assert!(s.verify().unwrap().is_ok());
        // Space returns: the same batch goes through and links onto the old tip.
        s.set_max_page_count(1 << 30).unwrap();
        ok(s.write_batch(&batch).unwrap());
        assert_eq!(entries(&s), 3);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn a_second_writer_is_detected_and_the_tip_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let mut one = SqliteStore::open(&path).unwrap();
        let mut two = SqliteStore::open(&path).unwrap();
        ok(one.write_batch(&[LedgerOp::Begin(begun("a"))]).unwrap());
        let err = two.write_batch(&[LedgerOp::Begin(begun("b"))]).unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        ok(two.write_batch(&[LedgerOp::Begin(begun("b"))]).unwrap());
        assert!(one.verify().unwrap().is_ok());
        assert_eq!(one.head().unwrap().unwrap().seq, 2);
    }

    #[test]
    fn reader_is_read_only_and_needs_a_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        assert!(SqliteStore::open_reader(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(SqliteStore::open_reader(&path).is_err());
        drop(SqliteStore::open(&path).unwrap());
        let mut r = SqliteStore::open_reader(&path).unwrap();
        assert!(matches!(
            r.write_batch(&[LedgerOp::Begin(begun("a"))]),
            Err(LedgerError::Store(_))
        ));
        assert!(r.conn.execute("DELETE FROM records", []).is_err());
    }

    #[test]
    fn round_trips_every_field() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let mut r = sample();
        r.outcome = Outcome::UpstreamError;
        r.reason_code = Some("upstream_error".into());
        r.reason_param = Some("image".into());
        r.reason_message = Some("quote \" comma , newline \n tab \t nul \0 é".into());
        r.mask_sha256 = Some("cd".repeat(32));
        r.mask_bytes = Some(i64::MAX as u64);
        r.mask_width = Some(u32::MAX);
        r.mask_height = Some(1);
        r.n = Some(u8::MAX);
        r.cost_reserved_micros = i64::MIN;
        r.cost_settled_micros = i64::MAX;
        r.received_at = "2025-03-04T05:06:07.123456789Z".parse().unwrap();
        ok(s.write_batch(&[LedgerOp::Final(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(got, r.normalized());
        assert!(s.verify().unwrap().is_ok());
    }
}
