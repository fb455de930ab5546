//! Records in and out of rows: the chain tip, the plan of an op, appending an entry with its
//! records row, and reading a record back.

use jiff::Timestamp;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::schema::{INSERT_ENTRY, UPSERT_RECORD};
use super::{Tip, is_constraint};
use crate::ledger::LedgerError;
use crate::ledger::record::{EntryKind, Record, chain_hash, entry_json};
use crate::ledger::store::{self, LedgerOp, Plan};

pub(super) fn read_tip(conn: &Connection) -> Result<Option<Tip>, LedgerError> {
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
pub(super) fn plan(conn: &Connection, op: &LedgerOp) -> Result<Plan, LedgerError> {
    let existing: Option<String> = conn
        .prepare_cached("SELECT outcome FROM records WHERE request_id = ?1")?
        .query_row([&op.record().request_id], |r| r.get(0))
        .optional()?;
    Ok(store::plan(op, existing.as_deref()))
}

/// Append one chain entry for `r` and make `r` the request's current record.
pub(super) fn append(
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
pub(super) fn get_u64(row: &Row, col: usize) -> rusqlite::Result<Option<u64>> {
    row.get::<_, Option<i64>>(col)?
        .map(|v| u64::try_from(v).map_err(|e| conversion(col, Type::Integer, e)))
        .transpose()
}

pub(super) fn conversion(col: usize, ty: Type, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, ty, e.to_string().into())
}

/// A record from a row selected with [`select_columns`] (`seq` ignored).
pub(super) fn record_from_row(row: &Row) -> rusqlite::Result<Record> {
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
