//! The `records` columns and the SQL of the report queries.

use postgres::Row;
use postgres::types::ToSql;

use crate::ledger::LedgerError;
use crate::ledger::record::Record;
use crate::ledger::store::{RecentQuery, UsageQuery};

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

pub(super) fn int(v: Option<u64>, name: &str) -> Result<Option<i64>, LedgerError> {
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
    pub(super) fn from_row(row: &Row, at: usize) -> Result<Columns, postgres::Error> {
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

pub(super) const COLUMNS_SQL: &str = "received_at_us, client, end_user, model, outcome, reason_code, images_returned, cost_settled_micros, input_tokens, output_tokens, forwarded, upstream_key";

pub(super) fn parse_record(json: &str) -> Result<Record, LedgerError> {
    serde_json::from_str(json)
        .map_err(|e| LedgerError::Store(format!("records: unreadable record_json: {e}")))
}

pub(super) type Params = Vec<Box<dyn ToSql + Sync>>;

pub(super) fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as _).collect()
}

/// ` WHERE ...` for the filters of `q` (empty without filters), and its arguments.
pub(super) fn filter(q: &UsageQuery) -> (String, Params) {
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
pub(super) fn recent_filter(q: &RecentQuery) -> (String, Params) {
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
