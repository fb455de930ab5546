//! A ledger file as the first release (schema version 1) wrote it: its DDL, copied verbatim,
//! and a writer of its chain entries and records rows through plain SQL, so upgrade tests do not
//! depend on the current store's code.

use std::path::Path;

use rusqlite::{Connection, params};
use sha2::Digest;

/// The first release's `SCHEMA` (src/ledger/sqlite.rs, schema version 1), verbatim.
pub const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('schema_version', '1');
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
    forwarded INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_received ON records (received_at_us);
CREATE INDEX IF NOT EXISTS records_client ON records (client, received_at_us);
CREATE INDEX IF NOT EXISTS records_user ON records (end_user, received_at_us);
CREATE INDEX IF NOT EXISTS records_forwarding ON records (seq) WHERE outcome = 'forwarding';
";

/// `hex(sha256(prev_hash || entry_json))`, as the first release computed it.
pub fn v1_hash(prev: &str, entry_json: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(prev.as_bytes());
    h.update(entry_json.as_bytes());
    hex::encode(h.finalize())
}

/// One request's state as the first release stored it (the fields these tests vary; the
/// others are `null`).
#[derive(Clone, Debug)]
pub struct V1Record {
    pub request_id: &'static str,
    /// RFC 3339 with `Z`, as the first release serialized it.
    pub received_at: &'static str,
    pub received_at_us: i64,
    pub client: &'static str,
    pub outcome: &'static str,
    pub model: Option<&'static str>,
    pub images_returned: Option<u32>,
    pub cost_reserved_micros: i64,
    pub cost_settled_micros: i64,
    pub forwarded: bool,
}

impl V1Record {
    /// The record's JSON in the first release's field order (no `quality` .. `cost_basis`).
    pub fn json(&self) -> String {
        let opt_str = |v: Option<&str>| v.map_or("null".to_owned(), |s| format!("{s:?}"));
        let opt_num = |v: Option<u32>| v.map_or("null".to_owned(), |n| n.to_string());
        format!(
            concat!(
                r#"{{"request_id":"{}","received_at":"{}","client":"{}","user":null,"#,
                r#""client_addr":null,"outcome":"{}","reason_code":null,"reason_param":null,"#,
                r#""reason_message":null,"status":null,"upstream_status":null,"#,
                r#""upstream_request_id":null,"model":{},"n":null,"size":null,"#,
                r#""response_format":null,"images_returned":{},"cost_reserved_micros":{},"#,
                r#""cost_settled_micros":{},"image_sha256":null,"image_bytes":null,"#,
                r#""image_width":null,"image_height":null,"mask_sha256":null,"#,
                r#""mask_bytes":null,"mask_width":null,"mask_height":null,"prompt":null,"#,
                r#""total_ms":null,"upstream_ms":null,"forwarded":{}}}"#
            ),
            self.request_id,
            self.received_at,
            self.client,
            self.outcome,
            opt_str(self.model),
            opt_num(self.images_returned),
            self.cost_reserved_micros,
            self.cost_settled_micros,
            self.forwarded,
        )
    }
}

/// A version 1 ledger file at `path`, written the first release's way.
pub struct V1Ledger {
    pub conn: Connection,
    seq: i64,
    tip: String,
}

impl V1Ledger {
    pub fn create(path: &Path) -> V1Ledger {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(&format!("BEGIN IMMEDIATE;{V1_SCHEMA}COMMIT;"))
            .unwrap();
        V1Ledger {
            conn,
            seq: 0,
            tip: "0".repeat(64),
        }
    }

    /// Append a chain entry of `kind` (`begin`, `complete`, `final`, `recover`) for `r` and
    /// upsert its records row. Returns the entry's JSON.
    pub fn append(&mut self, kind: &str, r: &V1Record) -> String {
        let entry = format!(r#"{{"v":1,"kind":"{kind}","record":{}}}"#, r.json());
        self.seq += 1;
        let hash = v1_hash(&self.tip, &entry);
        self.conn
            .execute(
                "INSERT INTO ledger_chain (seq, request_id, entry_json, prev_hash, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![self.seq, r.request_id, entry, self.tip, hash],
            )
            .unwrap();
        self.conn
            .execute(
                "INSERT INTO records (request_id, received_at_us, client, outcome, model, \
                 images_returned, cost_reserved_micros, cost_settled_micros, forwarded, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (request_id) DO UPDATE SET outcome = excluded.outcome, \
                 images_returned = excluded.images_returned, \
                 cost_settled_micros = excluded.cost_settled_micros, \
                 forwarded = excluded.forwarded, seq = excluded.seq",
                params![
                    r.request_id,
                    r.received_at_us,
                    r.client,
                    r.outcome,
                    r.model,
                    r.images_returned,
                    r.cost_reserved_micros,
                    r.cost_settled_micros,
                    r.forwarded,
                    self.seq
                ],
            )
            .unwrap();
        self.tip = hash;
        entry
    }
}

/// `schema_version` of the ledger at `path`.
pub fn schema_version(path: &Path) -> String {
    Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// Names of the `records` columns of the ledger at `path`, sorted.
pub fn records_columns(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info('records')")
        .unwrap();
    let mut names: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names.sort();
    names
}
