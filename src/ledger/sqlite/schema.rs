//! The ledger's SQLite tables: the schema, its versions and their upgrades, and the column
//! lists every statement is built from.

use std::sync::LazyLock;

use rusqlite::{Connection, OptionalExtension};

use crate::ledger::LedgerError;

/// Version of the tables. 1: the first release. 2: the records columns `quality` to
/// `cost_basis` (see [`migrate_1_to_2`]). 3: `upstream_key` (see [`migrate_2_to_3`]). The
/// chain entry format is unchanged.
pub(super) const SCHEMA_VERSION: &str = "3";

/// The table of quota use (SQLite), one row per (scope, period). Created by the ledger store with
/// its own tables (and by a quota store alone); the ledger's writer runs the quota's changes.
pub const SQLITE_USAGE: &str = "CREATE TABLE IF NOT EXISTS quota_usage (
    scope TEXT NOT NULL,
    period TEXT NOT NULL,
    images INTEGER NOT NULL DEFAULT 0,
    micros INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period)
) WITHOUT ROWID;";

/// The table of open reservations (SQLite), one row per request whose charge is not yet
/// reconciled with its ledger record: `images`/`micros` are what the request adds to
/// `quota_usage` now (the reservation, or once `settled` what it was settled to). Created by the
/// quota store and by the ledger (whose writer deletes settled holds with their final record).
pub const SQLITE_HOLDS: &str = "CREATE TABLE IF NOT EXISTS quota_holds (
    request_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL DEFAULT '',
    scopes TEXT NOT NULL,
    day TEXT NOT NULL,
    month TEXT NOT NULL,
    reserved_images INTEGER NOT NULL,
    reserved_micros INTEGER NOT NULL,
    images INTEGER NOT NULL,
    micros INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;";

pub(super) const SCHEMA: &str = "
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
-- Start-up recovery finds the `forwarding` records through records_outcome; a partial index of
-- its own cost a page write at every begin and every completion. Dropped from older ledgers.
DROP INDEX IF EXISTS records_forwarding;
CREATE INDEX IF NOT EXISTS records_outcome ON records (outcome, received_at_us);
";

/// The records columns added by version 2, with their types. All nullable: existing rows read
/// them as `NULL`, which is what the chain entries written before them say (a missing field
/// reads as `None`).
pub(super) const ADDED_IN_2: [(&str, &str); 11] = [
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
pub(super) fn migrate_1_to_2(conn: &Connection) -> rusqlite::Result<()> {
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
pub(super) const ADDED_IN_3: [(&str, &str); 1] = [("upstream_key", "TEXT")];

/// The upgrade of a version 2 ledger to version 3, in the transaction that opens it.
pub(super) fn migrate_2_to_3(conn: &Connection) -> rusqlite::Result<()> {
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
pub(super) enum Schema {
    V1,
    V2,
    Current,
}

impl Schema {
    /// `prefix` + `column`, or `NULL` for a column this schema does not have.
    pub(super) fn column(self, prefix: &str, column: &str) -> String {
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
pub(super) const COLUMNS: [&str; 43] = [
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
pub(super) const SEQ_COLUMN: usize = COLUMNS.len();

pub(super) fn select_columns(prefix: &str, schema: Schema) -> String {
    COLUMNS
        .iter()
        .chain(&["seq"])
        .map(|c| schema.column(prefix, c))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) static SELECT_RECORD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM records",
        select_columns("", Schema::Current)
    )
});

pub(super) static UPSERT_RECORD: LazyLock<String> = LazyLock::new(|| {
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

pub(super) const INSERT_ENTRY: &str = "INSERT INTO ledger_chain (seq, request_id, entry_json, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5)";

pub(super) fn read_version(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// The schema of a ledger with this `schema_version`, if this build reads it.
pub(super) fn parse_version(version: Option<String>) -> Result<Schema, LedgerError> {
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
