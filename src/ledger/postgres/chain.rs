//! One replica's hash chain: its tip, appending a batch, and `verify` over every chain.

use crate::ledger::store::{self, Plan};

use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;

use super::Tip;
use super::conn::is_unique_violation;
use super::rows::{COLUMNS_SQL, Columns, INSERT_ENTRY, UPSERT_RECORD, parse_record};
use crate::ledger::LedgerError;
use crate::ledger::record::{
    ENTRY_VERSION, EntryIn, EntryKind, GENESIS_HASH, Record, chain_hash, entry_json,
};
use crate::ledger::sqlite::{differing_fields, kind_fits};
use crate::ledger::store::{BrokenLink, ChainHead, LedgerOp, ReplicaHead, VerifyReport};

pub(super) fn read_tip(c: &mut impl GenericClient, replica: &str) -> Result<Tip, LedgerError> {
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

pub(super) fn plan(tx: &mut postgres::Transaction<'_>, op: &LedgerOp) -> Result<Plan, LedgerError> {
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

pub(super) fn append_at(
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
