//! `imagegate ledger copy`: move a SQLite ledger (its hash chain, its records and the quota use
//! kept in the same file) into PostgreSQL, for a gateway that goes from one process to several
//! replicas.
//!
//! The SQLite chain becomes, unchanged, the chain of one replica in PostgreSQL (same `seq`,
//! `entry_json`, `prev_hash` and `hash`), so every hash still verifies; each request's record
//! is taken from its last chain entry (which `verify` proves equal to the SQLite `records`
//! row). A replica started with that replica id continues the chain where the SQLite file
//! left it, and turns the requests it finds still `forwarding` into `unknown`. Quota use is
//! added to the target's `quota_usage` per (scope, period).
//!
//! Everything is one PostgreSQL transaction that ends with a full `verify` of the target: on
//! any failure (a request id already present, a broken chain) nothing is written.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::LedgerError;
use super::postgres::{Columns, INSERT_ENTRY, PgSettings, migrate, verify_in};
use super::record::{EntryIn, Outcome, Record};
use super::sqlite::SqliteStore;
use super::store::{ChainHead, LedgerStore};

/// What a copy wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    /// The replica whose chain the SQLite chain became.
    pub replica: String,
    pub entries: u64,
    pub records: u64,
    /// Records still `forwarding` (a gateway crashed and was not restarted): the replica
    /// `replica` turns them into `unknown` at its first start.
    pub forwarding: u64,
    /// `(scope, period)` rows of quota use.
    pub quota_rows: u64,
    /// The copied chain's head (`None` for an empty ledger).
    pub head: Option<ChainHead>,
}

/// Options of [`sqlite_to_postgres`].
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// The replica id the copied chain is filed under.
    pub replica: String,
    /// Copy even when the target already holds data (the replica's own chain must still be
    /// empty, and no request id may be present already).
    pub allow_non_empty: bool,
}

struct ChainRow {
    seq: i64,
    request_id: String,
    entry_json: String,
    prev_hash: String,
    hash: String,
}

const INSERT_RECORD: &str = "INSERT INTO records (request_id, replica, seq, received_at_us, client, end_user, model, outcome, reason_code, images_returned, cost_settled_micros, input_tokens, output_tokens, forwarded, record_json, upstream_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

const ADD_QUOTA: &str = "INSERT INTO quota_usage (scope, period, images, micros) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (scope, period) DO UPDATE SET images = quota_usage.images + excluded.images, \
     micros = quota_usage.micros + excluded.micros";

/// Copy the SQLite ledger at `source` into the PostgreSQL database of `target` (see the module
/// doc). The source is only read; stop the gateway that writes it first (a write during the
/// copy is not copied). Refuses a source whose chain does not verify, and a target that
/// already holds data unless `allow_non_empty`.
pub fn sqlite_to_postgres(
    source: &Path,
    target: &PgSettings,
    options: &CopyOptions,
) -> Result<CopyReport, LedgerError> {
    let checked = SqliteStore::open_reader(source)?.verify()?;
    if let Some(b) = &checked.first_broken {
        return Err(LedgerError::Rejected(format!(
            "{}: the source chain does not verify (entry {}: {}); nothing copied",
            source.display(),
            b.seq,
            b.reason
        )));
    }
    let (chain, quota) = read_source(source)?;
    let mut last: HashMap<&str, (i64, Record)> = HashMap::new();
    for row in &chain {
        let entry: EntryIn = serde_json::from_str(&row.entry_json).map_err(|e| {
            LedgerError::Store(format!("chain entry {} is unreadable: {e}", row.seq))
        })?;
        last.insert(&row.request_id, (row.seq, entry.record));
    }

    let replica = options.replica.as_str();
    let mut client = target.connect()?;
    migrate(&mut client)?;
    let mut tx = client.transaction()?;
    // One copy at a time into a database (a second one waits, then sees a non-empty target).
    tx.execute("SELECT pg_advisory_xact_lock(8112420634)", &[])?;
    let count = |tx: &mut postgres::Transaction<'_>, sql: &str| -> Result<i64, LedgerError> {
        Ok(tx.query_one(sql, &[])?.get(0))
    };
    let entries = count(&mut tx, "SELECT count(*) FROM ledger_chain")?;
    let records = count(&mut tx, "SELECT count(*) FROM records")?;
    let quotas = count(&mut tx, "SELECT count(*) FROM quota_usage")?;
    if entries + records + quotas > 0 && !options.allow_non_empty {
        return Err(LedgerError::Rejected(format!(
            "the target is not empty ({entries} chain entries, {records} records, {quotas} quota \
             rows); nothing copied (--allow-non-empty copies into it anyway)"
        )));
    }
    let own: i64 = tx
        .query_one(
            "SELECT count(*) FROM ledger_chain WHERE replica = $1",
            &[&replica],
        )?
        .get(0);
    if own > 0 {
        return Err(LedgerError::Rejected(format!(
            "replica {replica} already has {own} chain entries in the target; copy under \
             another --replica; nothing copied"
        )));
    }

    let mut report = CopyReport {
        replica: replica.to_owned(),
        ..CopyReport::default()
    };
    let insert_entry = tx.prepare(INSERT_ENTRY)?;
    for row in &chain {
        tx.execute(
            &insert_entry,
            &[
                &replica,
                &row.seq,
                &row.request_id,
                &row.entry_json,
                &row.prev_hash,
                &row.hash,
            ],
        )?;
        report.entries += 1;
    }
    let insert_record = tx.prepare(INSERT_RECORD)?;
    let mut requests: Vec<(&str, &(i64, Record))> = last.iter().map(|(k, v)| (*k, v)).collect();
    requests.sort_by_key(|(_, (seq, _))| *seq);
    for (id, (seq, r)) in requests {
        let cols = Columns::of(r)?;
        let json = serde_json::to_string(r)
            .map_err(|e| LedgerError::Store(format!("cannot serialize a record: {e}")))?;
        tx.execute(
            &insert_record,
            &[
                &id,
                &replica,
                seq,
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
                &json,
                &cols.upstream_key,
            ],
        )
        .map_err(|e| {
            if e.code().is_some_and(|c| c.code() == "23505") {
                LedgerError::Rejected(format!(
                    "request {id} is already in the target; nothing copied"
                ))
            } else {
                e.into()
            }
        })?;
        report.records += 1;
        if r.outcome == Outcome::Forwarding {
            report.forwarding += 1;
        }
    }
    let add_quota = tx.prepare(ADD_QUOTA)?;
    for (scope, period, images, micros) in &quota {
        tx.execute(&add_quota, &[scope, period, images, micros])?;
        report.quota_rows += 1;
    }
    let verified = verify_in(&mut tx, replica)?;
    if let Some(b) = verified.first_broken {
        return Err(LedgerError::Store(format!(
            "the target does not verify after the copy (entry {} of {}: {}); nothing copied",
            b.seq, b.request_id, b.reason
        )));
    }
    report.head = chain.last().map(|r| ChainHead {
        seq: r.seq.max(0) as u64,
        hash: r.hash.clone(),
    });
    tx.commit()?;
    Ok(report)
}

type QuotaRow = (String, String, i64, i64);

/// The chain (in order) and the quota use of the SQLite file, read in one snapshot.
fn read_source(source: &Path) -> Result<(Vec<ChainRow>, Vec<QuotaRow>), LedgerError> {
    let at = |e: rusqlite::Error| LedgerError::Store(format!("{}: {e}", source.display()));
    let mut conn =
        Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(at)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(at)?;
    let tx = conn.transaction().map_err(at)?;
    let chain = {
        let mut stmt = tx
            .prepare(
                "SELECT seq, request_id, entry_json, prev_hash, hash FROM ledger_chain ORDER BY seq",
            )
            .map_err(at)?;
        stmt.query_map([], |row| {
            Ok(ChainRow {
                seq: row.get(0)?,
                request_id: row.get(1)?,
                entry_json: row.get(2)?,
                prev_hash: row.get(3)?,
                hash: row.get(4)?,
            })
        })
        .map_err(at)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(at)?
    };
    let has_quota: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'quota_usage'",
            [],
            |row| row.get(0),
        )
        .map_err(at)?;
    let quota = if has_quota {
        let mut stmt = tx
            .prepare(
                "SELECT scope, period, images, micros FROM quota_usage \
                 WHERE images <> 0 OR micros <> 0 ORDER BY scope, period",
            )
            .map_err(at)?;
        stmt.query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(at)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(at)?
    } else {
        Vec::new()
    };
    Ok((chain, quota))
}
