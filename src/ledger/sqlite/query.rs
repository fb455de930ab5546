//! The store's queries: usage, export, the recent records and the chain's status.

use rusqlite::params_from_iter;
use rusqlite::types::Value;

use super::SqliteStore;
use super::rows::{get_u64, read_tip, record_from_row};
use crate::ledger::LedgerError;
use crate::ledger::record::{Outcome, Record};
use crate::ledger::report::UsageAggregator;
use crate::ledger::store::{ChainHead, ChainStatus, RecentQuery, UsageFact, UsageQuery, UsageRow};

pub(super) fn usage(store: &SqliteStore, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
    let (filter_sql, args) = filter(q);
    let mut stmt = store.conn.prepare(&format!(
        "SELECT received_at_us, client, end_user, outcome, reason_code, images_returned, \
         cost_settled_micros, forwarded, model, {}, {} FROM records{filter_sql}",
        store.schema.column("", "input_tokens"),
        store.schema.column("", "output_tokens"),
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

pub(super) fn export(
    store: &SqliteStore,
    q: &UsageQuery,
    out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let (filter_sql, mut args) = filter(q);
    let limit = q.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    args.push(Value::Integer(limit));
    let mut stmt = store.conn.prepare(&format!(
        "{}{filter_sql} ORDER BY received_at_us, request_id LIMIT ?",
        store.select_record()
    ))?;
    let mut rows = stmt.query(params_from_iter(args))?;
    while let Some(row) = rows.next()? {
        out(&record_from_row(row)?)?;
    }
    Ok(())
}

pub(super) fn recent(store: &SqliteStore, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
    let (filter_sql, mut args) = recent_filter(q);
    args.push(Value::Integer(i64::from(q.limit)));
    let mut stmt = store.conn.prepare(&format!(
        "{}{filter_sql} ORDER BY received_at_us DESC, request_id DESC LIMIT ?",
        store.select_record()
    ))?;
    let rows = stmt.query_map(params_from_iter(args), record_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn chain_status(store: &SqliteStore) -> Result<ChainStatus, LedgerError> {
    // One read transaction, so the head and the counts agree.
    let tx = store.conn.unchecked_transaction()?;
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

/// ` WHERE ...` for the filters of `q` (empty without filters), and its arguments.
pub(super) fn filter(q: &UsageQuery) -> (String, Vec<Value>) {
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
pub(super) fn recent_filter(q: &RecentQuery) -> (String, Vec<Value>) {
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
