//! The quota's SQLite tables and statements (the ledger's file): run in a transaction of the
//! quota store's own connection, or of the ledger's writer (see [`super::QuotaStore::with_ledger_writer`]).

use rusqlite::{Connection, OptionalExtension, params};

use super::holds::{Hold, HoldRecovery, parse_scopes, scopes_json};
use super::{Reservation, ScopeLimits};

/// The quota's tables are part of the ledger file's schema (its store creates them with its own).
pub use crate::ledger::sqlite::{SQLITE_HOLDS, SQLITE_USAGE};

pub(super) fn read(conn: &Connection, scope: &str, period: &str) -> rusqlite::Result<(u64, i64)> {
    conn.prepare_cached("SELECT images, micros FROM quota_usage WHERE scope = ?1 AND period = ?2")?
        .query_row(params![scope, period], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?))
        })
        .optional()
        .map(|o| o.unwrap_or((0, 0)))
}

pub(super) fn add(
    conn: &Connection,
    scope: &str,
    period: &str,
    images: i64,
    micros: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO quota_usage (scope, period, images, micros) VALUES (?1, ?2, MAX(?3, 0), MAX(?4, 0))
         ON CONFLICT (scope, period) DO UPDATE SET images = MAX(images + ?3, 0), micros = MAX(micros + ?4, 0)",
    )?
    .execute(params![scope, period, images, micros])
    .map(|_| ())
}

/// The ledger's state of a request, as seen from the quota store's connection.
enum RecordState {
    /// This database has no ledger (a quota store on its own).
    NoLedger,
    Missing,
    Forwarding,
    Final,
}

fn has_ledger(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'records'",
    )?
    .query_row([], |r| r.get::<_, i64>(0))
    .map(|n| n > 0)
}

fn record_outcome(conn: &Connection, request_id: &str) -> rusqlite::Result<RecordState> {
    if !has_ledger(conn)? {
        return Ok(RecordState::NoLedger);
    }
    Ok(
        match conn
            .prepare_cached("SELECT outcome FROM records WHERE request_id = ?1")?
            .query_row([request_id], |r| r.get::<_, String>(0))
            .optional()?
        {
            None => RecordState::Missing,
            Some(o) if o == "forwarding" => RecordState::Forwarding,
            Some(_) => RecordState::Final,
        },
    )
}

pub(super) fn sqlite_holds(conn: &Connection) -> rusqlite::Result<Vec<Hold>> {
    let ledger = has_ledger(conn)?;
    let sql = if ledger {
        "SELECT h.request_id, h.scopes, h.day, h.month, h.reserved_images, h.reserved_micros,
                h.images, h.micros, h.settled, r.outcome, r.cost_settled_micros, r.images_returned
         FROM quota_holds h LEFT JOIN records r ON r.request_id = h.request_id ORDER BY h.request_id"
    } else {
        "SELECT request_id, scopes, day, month, reserved_images, reserved_micros,
                images, micros, settled, NULL, NULL, NULL
         FROM quota_holds ORDER BY request_id"
    };
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |row| {
        Ok(Hold {
            request_id: row.get(0)?,
            scopes: parse_scopes(row.get(1)?),
            day: row.get(2)?,
            month: row.get(3)?,
            reserved_images: row.get(4)?,
            reserved_micros: row.get(5)?,
            images: row.get(6)?,
            micros: row.get(7)?,
            settled: row.get::<_, i64>(8)? != 0,
            record: row
                .get::<_, Option<String>>(9)?
                .map(|o| -> rusqlite::Result<_> {
                    Ok((
                        o,
                        row.get::<_, Option<i64>>(10)?.unwrap_or(0),
                        row.get::<_, Option<i64>>(11)?,
                    ))
                })
                .transpose()?,
        })
    })?;
    rows.collect()
}

/// A refused reservation: `(label, quota name, limit, used, monthly)` (see `exhausted`).
pub(super) type Refusal = (String, &'static str, i128, i128, bool);

/// The SQLite part of [`QuotaStore::reserve`], in the caller's transaction: read the use of
/// every scope, refuse (changing nothing) if a limit would be exceeded, else add the charge to
/// every scope and period and insert the request's hold row.
pub(super) fn sqlite_reserve(
    tx: &Connection,
    request_id: &str,
    scopes: &[(String, ScopeLimits, String)],
    day: &str,
    month: &str,
    images: u32,
    micros: i64,
) -> rusqlite::Result<Option<Refusal>> {
    for (scope, limits, label) in scopes {
        let (img_day, mic_day) = read(tx, scope, day)?;
        let (img_month, mic_month) = read(tx, scope, month)?;
        let checks: [(Option<i128>, i128, i128, &'static str, bool); 4] = [
            (
                limits.images_day.map(i128::from),
                i128::from(img_day),
                i128::from(images),
                "images per day",
                false,
            ),
            (
                limits.images_month.map(i128::from),
                i128::from(img_month),
                i128::from(images),
                "images per month",
                true,
            ),
            (
                limits.micros_day.map(i128::from),
                i128::from(mic_day),
                i128::from(micros),
                "spend per day",
                false,
            ),
            (
                limits.micros_month.map(i128::from),
                i128::from(mic_month),
                i128::from(micros),
                "spend per month",
                true,
            ),
        ];
        for (limit, used, add, name, monthly) in checks {
            if let Some(limit) = limit
                && used + add > limit
            {
                return Ok(Some((label.clone(), name, limit, used, monthly)));
            }
        }
    }
    for (scope, _, _) in scopes {
        for period in [day, month] {
            add(tx, scope, period, i64::from(images), micros)?;
        }
    }
    let names: Vec<&str> = scopes.iter().map(|s| s.0.as_str()).collect();
    tx.prepare_cached(
        "INSERT INTO quota_holds (request_id, replica, scopes, day, month, reserved_images, reserved_micros, images, micros)
         VALUES (?1, '', ?2, ?3, ?4, ?5, ?6, ?5, ?6)",
    )?
    .execute(params![request_id, scopes_json(&names), day, month, images, micros])?;
    Ok(None)
}

/// [`super::QuotaStore::settle`] in the caller's transaction: the settled amounts replace the
/// reserved ones; the hold row is deleted when the request's record is final already, else
/// marked settled (the ledger writer deletes it with the final record).
pub(super) fn settle(
    tx: &Connection,
    r: &Reservation,
    images: u32,
    micros: i64,
) -> rusqlite::Result<()> {
    let d_images = i64::from(images) - i64::from(r.images);
    let d_micros = micros - r.micros;
    let img = i64::from(images);
    if d_images != 0 || d_micros != 0 {
        for scope in &r.scopes {
            for period in [&r.day, &r.month] {
                add(tx, scope, period, d_images, d_micros)?;
            }
        }
    }
    // Without a ledger in this database (a quota store alone) there is nothing to
    // wait for.
    let done = match record_outcome(tx, &r.request_id)? {
        RecordState::Final | RecordState::NoLedger => true,
        RecordState::Forwarding | RecordState::Missing => false,
    };
    if done {
        tx.prepare_cached("DELETE FROM quota_holds WHERE request_id = ?1")?
            .execute(params![r.request_id])
    } else {
        tx.prepare_cached(
            "UPDATE quota_holds SET images = ?2, micros = ?3, settled = 1 WHERE request_id = ?1",
        )?
        .execute(params![r.request_id, img, micros])
    }
    .map(|_| ())
}

/// [`super::QuotaStore::recover`] in the caller's transaction.
pub(super) fn recover(tx: &Connection) -> rusqlite::Result<HoldRecovery> {
    let holds = sqlite_holds(tx)?;
    let mut report = HoldRecovery::default();
    for h in &holds {
        let Some((d_img, d_mic)) = h.correction(&mut report) else {
            continue;
        };
        if d_img != 0 || d_mic != 0 {
            for scope in &h.scopes {
                for period in [&h.day, &h.month] {
                    add(tx, scope, period, d_img, d_mic)?;
                }
            }
        }
        tx.prepare_cached("DELETE FROM quota_holds WHERE request_id = ?1")?
            .execute(params![h.request_id])?;
    }
    Ok(report)
}
