//! The quota on PostgreSQL (several replicas): every reservation is one transaction of
//! conditional UPDATEs, atomic across replicas.

use jiff::ZonedDateTime as Zoned;

use super::holds::{Hold, HoldRecovery, parse_scopes, scopes_json};
use super::{QuotaStore, Reservation, ScopeLimits};
use crate::error::GatewayError;
use crate::ledger::LedgerError;
use crate::ledger::postgres::PgPool;

/// Add (or, negative, remove) use; never below 0.
const PG_ADD: &str = "INSERT INTO quota_usage (scope, period, images, micros) VALUES ($1, $2, GREATEST($3::BIGINT, 0), GREATEST($4::BIGINT, 0))
     ON CONFLICT (scope, period) DO UPDATE SET images = GREATEST(quota_usage.images + $3::BIGINT, 0), micros = GREATEST(quota_usage.micros + $4::BIGINT, 0)";

/// Add a reservation to one (scope, period) only if no limit is exceeded, in ONE statement: the
/// row lock the UPDATE takes serializes concurrent reservations of every replica, and the
/// condition is re-checked against the row as the previous holder committed it. No row: a
/// limit would be exceeded.
const PG_RESERVE: &str = "UPDATE quota_usage SET images = images + $3, micros = micros + $4
     WHERE scope = $1 AND period = $2
       AND ($5::BIGINT IS NULL OR images + $3 <= $5)
       AND ($6::BIGINT IS NULL OR micros + $4 <= $6)
     RETURNING images";

pub(super) fn pg_read(
    c: &mut impl postgres::GenericClient,
    scope: &str,
    period: &str,
) -> Result<(u64, i64), LedgerError> {
    Ok(c.query_opt(
        "SELECT images, micros FROM quota_usage WHERE scope = $1 AND period = $2",
        &[&scope, &period],
    )?
    .map_or((0, 0), |r| (r.get::<_, i64>(0).max(0) as u64, r.get(1))))
}

impl QuotaStore {
    /// [`QuotaStore::reserve`] on PostgreSQL: for each scope (user first, then client: one
    /// order for everyone, so no deadlock) and period, make sure the row exists, then the
    /// conditional UPDATE. All in one transaction: one refusal rolls back the others.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reserve_pg(
        &self,
        pool: &PgPool,
        request_id: &str,
        scopes: Vec<(String, ScopeLimits, String)>,
        day: String,
        month: String,
        images: u32,
        micros: i64,
        now: &Zoned,
    ) -> Result<Reservation, GatewayError> {
        let img = i64::from(images);
        let refused = pool
            .with(|c| {
                let mut tx = c.transaction()?;
                for (scope, limits, label) in &scopes {
                    for (period, monthly) in [(&day, false), (&month, true)] {
                        let (img_limit, mic_limit) = if monthly {
                            (limits.images_month, limits.micros_month)
                        } else {
                            (limits.images_day, limits.micros_day)
                        };
                        let img_limit = img_limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
                        tx.execute(
                            "INSERT INTO quota_usage (scope, period) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            &[scope, period],
                        )?;
                        let admitted = tx
                            .query_opt(PG_RESERVE, &[scope, period, &img, &micros, &img_limit, &mic_limit])?
                            .is_some();
                        if !admitted {
                            // Which limit was hit, for the message (as committed now).
                            let (used_img, used_mic) = pg_read(&mut tx, scope, period)?;
                            drop(tx);
                            let (name, limit, used) = match img_limit {
                                Some(l) if i128::from(used_img) + i128::from(img) > i128::from(l) => (
                                    if monthly { "images per month" } else { "images per day" },
                                    i128::from(l),
                                    i128::from(used_img),
                                ),
                                _ => (
                                    if monthly { "spend per month" } else { "spend per day" },
                                    i128::from(mic_limit.unwrap_or(0)),
                                    i128::from(used_mic),
                                ),
                            };
                            return Ok(Some((label.clone(), name, limit, used, monthly)));
                        }
                    }
                }
                let names: Vec<&str> = scopes.iter().map(|s| s.0.as_str()).collect();
                tx.execute(
                    "INSERT INTO quota_holds (request_id, replica, scopes, day, month, reserved_images, reserved_micros, images, micros)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $7)",
                    &[&request_id, &self.replica, &scopes_json(&names), &day, &month, &img, &micros],
                )?;
                tx.commit()?;
                Ok(None)
            })
            .map_err(|e| {
                tracing::error!(error = %e, "quota store failed");
                GatewayError::LedgerUnavailable
            })?;
        if let Some((label, name, limit, used, monthly)) = refused {
            return Err(self.exhausted(&label, name, limit, used, monthly, now));
        }
        Ok(Reservation {
            request_id: request_id.to_owned(),
            scopes: scopes.into_iter().map(|s| s.0).collect(),
            day,
            month,
            images,
            micros,
        })
    }
}

/// [`QuotaStore::settle`] on PostgreSQL.
pub(super) fn settle(
    pool: &PgPool,
    r: &Reservation,
    images: u32,
    micros: i64,
) -> Result<(), String> {
    let d_images = i64::from(images) - i64::from(r.images);
    let d_micros = micros - r.micros;
    let img = i64::from(images);
    pool
        .with(|c| {
            let mut tx = c.transaction()?;
            if d_images != 0 || d_micros != 0 {
                for scope in &r.scopes {
                    for period in [&r.day, &r.month] {
                        tx.execute(PG_ADD, &[scope, period, &d_images, &d_micros])?;
                    }
                }
            }
            tx.execute(
                "UPDATE quota_holds SET images = $2, micros = $3, settled = TRUE WHERE request_id = $1",
                &[&r.request_id, &img, &micros],
            )?;
            // Final already: the writer has been and gone.
            tx.execute(
                "DELETE FROM quota_holds h USING records r
                 WHERE h.request_id = $1 AND r.request_id = h.request_id AND r.outcome <> 'forwarding'",
                &[&r.request_id],
            )?;
            tx.commit()?;
            Ok(())
        })
        .map_err(|e| e.to_string())
}

/// [`QuotaStore::recover`] on PostgreSQL: this replica's holds only.
pub(super) fn recover(pool: &PgPool, replica: &str) -> Result<HoldRecovery, String> {
    pool
    .with(|c| {
        let mut tx = c.transaction()?;
        let rows = tx.query(
            "SELECT h.request_id, h.scopes, h.day, h.month, h.reserved_images, h.reserved_micros,
                    h.images, h.micros, h.settled, r.outcome, r.cost_settled_micros, r.images_returned
             FROM quota_holds h LEFT JOIN records r ON r.request_id = h.request_id
             WHERE h.replica = $1 ORDER BY h.request_id FOR UPDATE OF h",
            &[&replica],
        )?;
        let holds: Vec<Hold> = rows
            .iter()
            .map(|row| Hold {
                request_id: row.get(0),
                scopes: parse_scopes(row.get(1)),
                day: row.get(2),
                month: row.get(3),
                reserved_images: row.get(4),
                reserved_micros: row.get(5),
                images: row.get(6),
                micros: row.get(7),
                settled: row.get(8),
                record: row.get::<_, Option<String>>(9).map(|o| {
                    (
                        o,
                        row.get::<_, Option<i64>>(10).unwrap_or(0),
                        row.get::<_, Option<i64>>(11),
                    )
                }),
            })
            .collect();
        let mut report = HoldRecovery::default();
        for h in &holds {
            let Some((d_img, d_mic)) = h.correction(&mut report) else {
                continue;
            };
            if d_img != 0 || d_mic != 0 {
                for scope in &h.scopes {
                    for period in [&h.day, &h.month] {
                        tx.execute(PG_ADD, &[scope, period, &d_img, &d_mic])?;
                    }
                }
            }
            tx.execute(
                "DELETE FROM quota_holds WHERE request_id = $1",
                &[&h.request_id],
            )?;
        }
        tx.commit()?;
        Ok(report)
    })
        .map_err(|e| e.to_string())
}
