//! The PostgreSQL ledger store, for several gateway replicas sharing one ledger and one set of
//! quotas.
//!
//! # Tables (created and upgraded by [`migrate`], versions in `schema_migrations`)
//! - `ledger_chain(replica, seq, request_id, entry_json, prev_hash, hash)`: append-only (a
//!   trigger refuses UPDATE and DELETE). **One hash chain per replica**: each replica appends
//!   to its own chain, `seq` 1, 2, 3, ... without gaps within a replica, the first `prev_hash`
//!   64 zeros, `hash = sha256(prev_hash || entry_json)` exactly as in SQLite. Replicas never
//!   contend for a chain tip, so writes scale with replicas; `verify` checks every chain.
//! - `records`: the current state of each request, one row per `request_id`: the record as
//!   JSON (`record_json`, the source of truth for `get` and exports) and, as an index for
//!   reports, the columns `usage` filters and sums (`received_at_us`, `client`, `end_user`,
//!   `model`, `outcome`, ...). `replica` and `seq` point at the chain entry that holds the same
//!   state. `verify` checks the JSON against the chain AND the columns against the JSON.
//! - `quota_usage(scope, period, images, micros)`: the quota store (see
//!   [`crate::limits::quota`]).
//!
//! # Replicas and recovery
//! Each gateway process has a replica id (`[ledger] replica_id`, default the host name). Two
//! live processes must not share one (their chain appends would collide: the second one's
//! batch fails as `Unavailable` and retries from the reloaded tip, so nothing is corrupted,
//! but recovery would be wrong). [`LedgerStore::recover`] turns into `unknown` only the
//! records **this replica** left `forwarding`; a replica that never comes back leaves its
//! stragglers `forwarding` until a process with its id starts once.
//!
//! # Failures
//! Connection errors, a server shutting down, too many connections, serialization failures
//! and a chain collision are [`LedgerError::Unavailable`]: the connection is dropped and the
//! next call reconnects (the writer retries final records; a `Begin` fails, so the request
//! gets 503 `ledger_unavailable`).
//!
//! # Files
//! Here the store and its [`LedgerStore`] implementation; `conn`: settings, the connection pool
//! and transient errors; `schema`: the migrations; `chain`: a replica's chain (tip, append,
//! verify); `rows`: the `records` columns and the report queries.

mod chain;
mod conn;
mod rows;
mod schema;

use super::store::Plan;
use std::sync::Mutex;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::LedgerError;
use super::record::{EntryKind, Outcome, Record};
use super::report::UsageAggregator;
use super::store::{
    ChainHead, ChainStatus, LedgerOp, LedgerStore, RecentQuery, ReplicaHead, UsageFact, UsageQuery,
    UsageRow, VerifyReport,
};

pub(crate) use chain::verify_in;
use chain::{append_at, plan, read_tip};
use conn::with_slot;
pub use conn::{PgPool, PgSettings, is_transient, redact_url};
use rows::{COLUMNS_SQL, filter, parse_record, recent_filter, refs};
pub(crate) use rows::{Columns, INSERT_ENTRY};
pub use schema::{MIGRATIONS, latest_version, migrate, schema_version};

#[derive(Clone, Debug)]
struct Tip {
    seq: i64,
    hash: String,
}

/// The ledger on PostgreSQL (see the module doc).
pub struct PostgresStore {
    settings: PgSettings,
    replica: String,
    client: Mutex<Option<Client>>,
    tip: Option<Tip>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("settings", &self.settings)
            .field("replica", &self.replica)
            .field("tip", &self.tip)
            .finish()
    }
}

impl PostgresStore {
    /// A store for `replica`. Connects, runs the migrations, loads this replica's chain tip.
    pub fn open(settings: PgSettings, replica: &str) -> Result<PostgresStore, LedgerError> {
        let mut client = settings.connect()?;
        migrate(&mut client)?;
        let mut store = PostgresStore {
            settings,
            replica: replica.to_owned(),
            client: Mutex::new(Some(client)),
            tip: None,
        };
        store.tip = Some(store.load_tip()?);
        Ok(store)
    }

    /// A store for queries only (the admin listener, the CLI): connects on first use, runs no
    /// migration, never writes. `replica` picks the chain whose head `verify` reports first.
    pub fn reader(settings: PgSettings, replica: &str) -> PostgresStore {
        PostgresStore {
            settings,
            replica: replica.to_owned(),
            client: Mutex::new(None),
            tip: None,
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut slot = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        with_slot(&self.settings, &mut slot, f)
    }

    fn load_tip(&self) -> Result<Tip, LedgerError> {
        let replica = self.replica.clone();
        self.with(|c| read_tip(c, &replica))
    }

    /// This replica's last chain entry.
    pub fn head(&self) -> Result<Option<ChainHead>, LedgerError> {
        let tip = self.load_tip()?;
        Ok((tip.seq > 0).then_some(ChainHead {
            seq: tip.seq as u64,
            hash: tip.hash,
        }))
    }

    /// Run `body` in one transaction from this replica's tip; keep the new tip on commit,
    /// forget it on failure (reloaded before the next write).
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&mut postgres::Transaction<'_>, &str, &mut Tip) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let tip = match self.tip.take() {
            Some(t) => t,
            None => self.load_tip()?,
        };
        let replica = self.replica.clone();
        let result = self.with(|c| {
            let mut tip = tip;
            let mut tx = c.transaction()?;
            let out = body(&mut tx, &replica, &mut tip)?;
            tx.commit()?;
            Ok((out, tip))
        });
        match result {
            Ok((out, tip)) => {
                self.tip = Some(tip);
                Ok(out)
            }
            Err(e) => {
                self.tip = None;
                Err(e)
            }
        }
    }
}

impl LedgerStore for PostgresStore {
    fn recover(&mut self) -> Result<usize, LedgerError> {
        self.in_transaction(|tx, replica, tip| {
            let stuck: Vec<Record> = tx
                .query(
                    "SELECT record_json FROM records WHERE outcome = 'forwarding' AND replica = $1 \
                     ORDER BY seq FOR UPDATE",
                    &[&replica],
                )?
                .iter()
                .map(|row| parse_record(row.get(0)))
                .collect::<Result<_, _>>()?;
            for mut r in stuck.iter().cloned() {
                r.outcome = Outcome::Unknown;
                r.cost_settled_micros = r.cost_reserved_micros;
                append_at(tx, replica, tip, EntryKind::Recover, &r)?;
            }
            if !stuck.is_empty() {
                tracing::warn!(
                    records = stuck.len(),
                    replica,
                    "ledger: requests this replica left forwarding are now unknown"
                );
            }
            Ok(stuck.len())
        })
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        let replica = self.replica.clone();
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT hash FROM ledger_chain WHERE replica = $1 AND seq = $2",
                &[&replica, &seq],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn check(&mut self) -> Result<(), LedgerError> {
        self.with(|c| c.batch_execute("SELECT 1").map_err(Into::into))
    }

    fn tip(&self) -> Option<ChainHead> {
        self.tip.as_ref().filter(|t| t.seq > 0).map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash.clone(),
        })
    }

    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.in_transaction(|tx, replica, tip| {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match plan(tx, op)? {
                    Plan::Refuse(why) => results.push(Err(LedgerError::Rejected(why))),
                    Plan::Write(kind, record) => {
                        append_at(tx, replica, tip, kind, &record)?;
                        if kind != EntryKind::Begin {
                            // Settled and now final: the quota hold is reconciled.
                            tx.execute(
                                "DELETE FROM quota_holds WHERE request_id = $1 AND settled",
                                &[&record.request_id],
                            )?;
                        }
                        results.push(Ok(()));
                    }
                }
            }
            Ok(results)
        })
    }

    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        self.with(|c| {
            c.query_opt(
                "SELECT record_json FROM records WHERE request_id = $1",
                &[&request_id],
            )?
            .map(|r| parse_record(r.get(0)))
            .transpose()
        })
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let (filter_sql, args) = filter(q);
        self.with(|c| {
            let sql = format!("SELECT {COLUMNS_SQL} FROM records{filter_sql}");
            let mut rows = c.query_raw(&sql, refs(&args))?;
            let mut agg = UsageAggregator::new(q);
            while let Some(row) = rows.next()? {
                let cols = Columns::from_row(&row, 0)?;
                let outcome = cols
                    .outcome
                    .parse::<Outcome>()
                    .map_err(|e| LedgerError::Store(format!("records: {e}")))?;
                let u64_of = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
                agg.add(UsageFact {
                    received_at_us: cols.received_at_us,
                    client: cols.client.as_deref(),
                    user: cols.end_user.as_deref(),
                    model: cols.model.as_deref(),
                    outcome,
                    reason_code: cols.reason_code.as_deref(),
                    images: cols
                        .images_returned
                        .unwrap_or(0)
                        .clamp(0, i64::from(u32::MAX)) as u32,
                    spend_micros: cols.cost_settled_micros,
                    input_tokens: u64_of(cols.input_tokens),
                    output_tokens: u64_of(cols.output_tokens),
                    forwarded: cols.forwarded,
                });
            }
            Ok(agg.finish())
        })
    }

    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let (filter_sql, mut args) = filter(q);
        let limit = q
            .limit
            .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
        args.push(Box::new(limit));
        let sql = format!(
            "SELECT record_json FROM records{filter_sql} ORDER BY received_at_us, request_id LIMIT ${}",
            args.len()
        );
        self.with(|c| {
            let mut rows = c.query_raw(&sql, refs(&args))?;
            while let Some(row) = rows.next()? {
                out(&parse_record(row.get(0))?)?;
            }
            Ok(())
        })
    }

    fn recent(&self, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
        let (filter_sql, mut args) = recent_filter(q);
        args.push(Box::new(i64::from(q.limit)));
        let sql = format!(
            "SELECT record_json FROM records{filter_sql} \
             ORDER BY received_at_us DESC, request_id DESC LIMIT ${}",
            args.len()
        );
        self.with(|c| {
            c.query(&sql, &refs(&args))?
                .iter()
                .map(|r| parse_record(r.get(0)))
                .collect()
        })
    }

    fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        let own = self.replica.clone();
        self.with(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            // Each replica's last entry, walking the (replica, seq) primary key backwards.
            let chains: Vec<ReplicaHead> = tx
                .query(
                    "SELECT DISTINCT ON (replica) replica, seq, hash FROM ledger_chain \
                     ORDER BY replica, seq DESC",
                    &[],
                )?
                .iter()
                .map(|r| ReplicaHead {
                    replica: r.get(0),
                    head: ChainHead {
                        seq: r.get::<_, i64>(1).max(0) as u64,
                        hash: r.get(2),
                    },
                })
                .collect();
            let records: i64 = tx.query_one("SELECT count(*) FROM records", &[])?.get(0);
            tx.commit()?;
            Ok(ChainStatus {
                head: chains
                    .iter()
                    .find(|h| h.replica == own)
                    .or(chains.first())
                    .map(|h| h.head.clone()),
                // Each chain is numbered 1, 2, 3, ... without gaps (verify checks it).
                entries: chains.iter().map(|h| h.head.seq).sum(),
                records: records.max(0) as u64,
                chains,
            })
        })
    }

    fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let own = self.replica.clone();
        self.with(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let report = verify_in(&mut tx, &own)?;
            tx.commit()?;
            Ok(report)
        })
    }

    fn ping(&mut self) -> Result<(), LedgerError> {
        self.with(|c| Ok(c.batch_execute("SELECT 1")?))
    }
}
