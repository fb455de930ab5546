//! `audit verify` on SQLite: the chain recomputed, every records row checked against it.

use rusqlite::OptionalExtension;

use super::SqliteStore;
use super::rows::{read_tip, record_from_row};
use super::schema::{SEQ_COLUMN, select_columns};
use crate::ledger::LedgerError;
use crate::ledger::record::{
    ENTRY_VERSION, EntryIn, EntryKind, GENESIS_HASH, Outcome, Record, chain_hash,
};
use crate::ledger::store::{BrokenLink, ChainHead, VerifyReport};

pub(super) fn verify(store: &SqliteStore) -> Result<VerifyReport, LedgerError> {
    // One read transaction: a consistent snapshot while the writer goes on.
    let tx = store.conn.unchecked_transaction()?;
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
            select_columns("r.", store.schema)
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
