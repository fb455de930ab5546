//! The store behind the ledger: the operations it writes, the queries it answers, and the trait
//! a backend implements (SQLite and PostgreSQL).

use std::collections::BTreeMap;
use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::LedgerError;
use super::record::{EntryKind, Outcome, Record};

/// One write to the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerOp {
    /// The request is about to be forwarded. Stored with outcome `forwarding` whatever the
    /// record says. Refused if the request id is already recorded.
    Begin(Record),
    /// The final state of a request that was begun. Refused if the request is already final or
    /// the record's outcome is `forwarding`. A `Complete` without a `Begin` is stored like a
    /// `Final` (nothing is lost), with `forwarded = false`.
    Complete(Record),
    /// The only record of a request that was never forwarded (a rejection, a client gone
    /// mid-upload). Refused if the request id is already recorded or the outcome is
    /// `forwarding`.
    Final(Record),
}

impl LedgerOp {
    pub fn record(&self) -> &Record {
        match self {
            LedgerOp::Begin(r) | LedgerOp::Complete(r) | LedgerOp::Final(r) => r,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LedgerOp::Begin(_) => "begin",
            LedgerOp::Complete(_) => "complete",
            LedgerOp::Final(_) => "final",
        }
    }

    pub fn is_begin(&self) -> bool {
        matches!(self, LedgerOp::Begin(_))
    }
}

/// A backend. Synchronous: it is used from the ledger's single writer thread, from a
/// [`super::LedgerReader`] (behind a mutex, on the blocking pool) and from the CLI.
///
/// Only one process may write a ledger (SQLite) or a replica's part of it (PostgreSQL, one
/// process per `replica_id`): `recover` assumes every `forwarding` record it finds (of its
/// replica) belongs to a process that is gone.
pub trait LedgerStore: Send + 'static {
    /// Turn every `forwarding` record into `unknown` (appending a `recover` chain entry for
    /// each, in one transaction). Call once at start-up, before any request. Returns how many.
    /// A recovered record's `cost_settled_micros` becomes its `cost_reserved_micros`: the
    /// upstream may have answered and charged, and the quota keeps the reservation too.
    fn recover(&mut self) -> Result<usize, LedgerError>;

    /// Write `ops` in order in ONE transaction. `Err` means nothing was written (the
    /// transaction rolled back; [`LedgerError::Unavailable`] when the store may recover by
    /// itself). `Ok` holds one result per op: an op the store refuses
    /// ([`LedgerError::Rejected`]) is skipped without failing the others.
    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError>;

    /// [`LedgerStore::write_batch`], and in the same transaction the `tasks`: work on the
    /// store's own SQLite connection (the quota store's changes, see [`SqliteTask`]), each
    /// under its own savepoint so that its failure undoes only its own changes. `Ok` holds one
    /// result per op and one per task; `Err` means nothing was written, tasks included. Only
    /// the SQLite store runs tasks; the default refuses a batch that has any.
    fn write_batch_with(
        &mut self,
        ops: &[LedgerOp],
        tasks: &mut [Box<dyn SqliteTask>],
    ) -> Result<BatchResults, LedgerError> {
        if !tasks.is_empty() {
            return Err(LedgerError::Store(
                "this ledger store does not run SQLite tasks".into(),
            ));
        }
        Ok((self.write_batch(ops)?, Vec::new()))
    }

    /// A cheap check, without writing, that the store can still be written (the idle writer
    /// runs it each second while healthy, so readiness falls without traffic).
    /// [`LedgerError::Unavailable`] when it cannot.
    fn check(&mut self) -> Result<(), LedgerError> {
        Ok(())
    }

    /// A write that changes nothing, to learn whether the store takes writes again (the idle
    /// writer runs it each second while unhealthy; readiness comes back when it succeeds).
    fn try_write(&mut self) -> Result<(), LedgerError> {
        self.check()
    }

    /// The last chain entry this store wrote or loaded (no query; `None` when unknown, e.g.
    /// after a failed transaction). Exposed on `/metrics`.
    fn tip(&self) -> Option<ChainHead> {
        None
    }

    /// The hash of chain entry `seq` (this replica's chain on PostgreSQL), `None` when the
    /// chain has no such entry.
    fn entry_hash(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let _ = seq;
        Err(LedgerError::Store(
            "this store cannot look up chain entries".into(),
        ))
    }

    /// The current record of a request.
    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError>;

    /// Aggregated use (see [`UsageQuery`] and [`UsageRow`]).
    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError>;

    /// Every record matching the filters of `q` (its `group_by` is ignored), ordered by
    /// `received_at` then `request_id`, at most `q.limit`. Stops at the first error of `out`.
    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError>;

    /// Recompute the chain and check the records against it.
    fn verify(&self) -> Result<VerifyReport, LedgerError>;

    /// Whether the store can be reached now (a server round trip for PostgreSQL). The idle
    /// writer calls it every `ledger.health_interval`, so readiness follows an outage.
    fn ping(&mut self) -> Result<(), LedgerError> {
        Ok(())
    }

    /// The records matching `q`, newest first (`received_at` then `request_id`, descending),
    /// at most `q.limit`. Served by the `records` indexes (`received_at_us`, `(client, ..)`,
    /// `(end_user, ..)`, `(outcome, ..)`). Both real stores implement it; the default (for
    /// wrappers that only write, as in tests) answers an error.
    fn recent(&self, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
        let _ = q;
        Err(LedgerError::Store("this store cannot list records".into()))
    }

    /// The chain's head(s) and the row counts, without reading the chain through (see
    /// [`ChainStatus`]); [`LedgerStore::verify`] is the full check. Default as for `recent`.
    fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        Err(LedgerError::Store(
            "this store cannot report its chain".into(),
        ))
    }
}

/// What [`LedgerStore::write_batch_with`] returns: one result per op, one per task.
pub type BatchResults = (Vec<Result<(), LedgerError>>, Vec<Result<(), LedgerError>>);

/// Work that the ledger's writer thread runs on its SQLite connection, inside the transaction
/// of a batch (see [`super::Ledger::run_task`]): this is how the quota store's changes share
/// the ledger's one connection, one write lock and one commit instead of contending for the
/// file from a second connection.
pub trait SqliteTask: Send + 'static {
    /// Do the work in the open transaction (under a savepoint). May run again if the batch
    /// failed and is retried; an `Err` rolls back this task's changes only.
    fn run(&mut self, conn: &rusqlite::Connection) -> Result<(), LedgerError>;

    /// Called once: with `Ok` once the transaction holding the work committed, else with why
    /// it did not (nothing of it was written).
    fn done(self: Box<Self>, committed: Result<(), LedgerError>);
}

/// Filters and page of [`LedgerStore::recent`] (all filters optional, combined with AND).
#[derive(Clone, Debug, Default)]
pub struct RecentQuery {
    /// `received_at >= since`.
    pub since: Option<Timestamp>,
    /// `received_at < until`.
    pub until: Option<Timestamp>,
    pub client: Option<String>,
    pub user: Option<String>,
    pub outcome: Option<Outcome>,
    /// The paging cursor: only records older than this request's (by `received_at`, then
    /// `request_id`). An unknown id selects nothing.
    pub before: Option<String>,
    /// At most this many records.
    pub limit: u32,
}

/// What [`LedgerStore::chain_status`] reads: cheap enough for every page load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainStatus {
    /// The last entry of the chain (PostgreSQL: this replica's chain, or the first one when
    /// this replica has none).
    pub head: Option<ChainHead>,
    /// Chain entries (every replica's).
    pub entries: u64,
    /// Rows of the records table.
    pub records: u64,
    /// PostgreSQL: the head of each replica's chain. Empty for SQLite (one chain).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<ReplicaHead>,
}

/// How usage is grouped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One row, keyed `total`.
    #[default]
    None,
    /// One row per end user, keyed `client/user` (`-` for an unknown part).
    User,
    /// One row per client, keyed by its name (`-` when unauthenticated).
    Client,
    /// One row per calendar day of `received_at` in the query's time zone (UTC by default),
    /// keyed `YYYY-MM-DD`.
    Day,
    /// One row per model (the request's `model`), keyed by its id (`-` when unknown).
    Model,
}

impl FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "total" => Ok(GroupBy::None),
            "user" => Ok(GroupBy::User),
            "client" => Ok(GroupBy::Client),
            "day" => Ok(GroupBy::Day),
            "model" => Ok(GroupBy::Model),
            other => Err(format!(
                "unknown grouping {other:?} (user, client, day, model, none)"
            )),
        }
    }
}

/// Filters (all optional, combined with AND) and grouping for reports and exports.
#[derive(Clone, Debug, Default)]
pub struct UsageQuery {
    /// `received_at >= since`.
    pub since: Option<Timestamp>,
    /// `received_at < until`.
    pub until: Option<Timestamp>,
    /// Exact client name.
    pub client: Option<String>,
    /// Exact end user (of any client unless `client` is set too).
    pub user: Option<String>,
    pub group_by: GroupBy,
    /// Time zone of `GroupBy::Day`; `None` = UTC.
    pub time_zone: Option<TimeZone>,
    /// Exports only: at most this many records.
    pub limit: Option<u64>,
}

/// Use of one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub key: String,
    /// Every request, whatever its outcome (in-flight `forwarding` ones included).
    pub requests: u64,
    /// Requests that were forwarded upstream (a `Begin` was committed).
    pub forwarded: u64,
    /// Sum of `images_returned`.
    pub images: u64,
    /// Sum of `cost_settled_micros` (USD micro-dollars). In-flight requests count 0 until
    /// completed; recovered (`unknown`) ones count their reservation.
    pub spend_micros: i64,
    /// Sums of the answers' `input_tokens` and `output_tokens` (records without token usage,
    /// such as dall-e-2 ones, add 0).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Rejected requests by `reason_code` (`unspecified` when it had none).
    pub rejections: BTreeMap<String, u64>,
}

impl UsageRow {
    /// All rejections, whatever their reason.
    pub fn rejected(&self) -> u64 {
        self.rejections.values().sum()
    }
}

/// The last chain entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

/// The first place where the ledger disagrees with its chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// Chain sequence number of the first entry that does not verify (for a `records` row that
    /// differs from its chain, the seq of the request's last chain entry).
    pub seq: u64,
    /// The request concerned (empty when the entry itself is missing).
    pub request_id: String,
    pub reason: String,
}

/// What [`LedgerStore::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Chain entries verified (up to the first broken one).
    pub entries: u64,
    /// Rows of the records table.
    pub records: u64,
    /// The last entry of the chain, to compare with a copy kept elsewhere.
    pub head: Option<ChainHead>,
    /// `None` when everything verified.
    pub first_broken: Option<BrokenLink>,
    /// PostgreSQL: the head of each replica's chain (`head` is this replica's). Empty for
    /// SQLite (one chain).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<ReplicaHead>,
}

/// The head of one replica's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplicaHead {
    pub replica: String,
    pub head: ChainHead,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.first_broken.is_none()
    }

    /// Record `candidate` if it comes before the break found so far.
    pub(crate) fn note_broken(&mut self, candidate: BrokenLink) {
        if self
            .first_broken
            .as_ref()
            .is_none_or(|b| candidate.seq < b.seq)
        {
            self.first_broken = Some(candidate);
        }
    }
}

/// What usage aggregation needs of one record (stores feed these to
/// [`super::report::UsageAggregator`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct UsageFact<'a> {
    pub received_at_us: i64,
    pub client: Option<&'a str>,
    pub user: Option<&'a str>,
    pub model: Option<&'a str>,
    pub outcome: Outcome,
    pub reason_code: Option<&'a str>,
    pub images: u32,
    pub spend_micros: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub forwarded: bool,
}

/// What a store does with one op.
pub(crate) enum Plan {
    Write(EntryKind, Box<Record>),
    Refuse(String),
}

/// Decide what `op` does, given the outcome already stored for its request (`None`: no
/// record). The one state machine of the record's life cycle, shared by every store:
/// `Begin` only for a new request; `Complete` only of a `forwarding` record (or of one never
/// begun); `Final` only for a new request; no final op may carry `forwarding`. Refusals touch
/// nothing.
pub(crate) fn plan(op: &LedgerOp, existing: Option<&str>) -> Plan {
    let given = op.record();
    if let Err(m) = given.validate() {
        return Plan::Refuse(m);
    }
    let id = &given.request_id;
    let mut r = Box::new(given.clone().normalized());
    match op {
        LedgerOp::Begin(_) => {
            if let Some(o) = existing {
                return Plan::Refuse(format!("{id} is already recorded ({o})"));
            }
            r.outcome = Outcome::Forwarding;
            r.forwarded = true;
            Plan::Write(EntryKind::Begin, r)
        }
        LedgerOp::Complete(_) | LedgerOp::Final(_) if r.outcome == Outcome::Forwarding => {
            Plan::Refuse(format!(
                "{id}: a {} record cannot have outcome forwarding",
                op.kind()
            ))
        }
        LedgerOp::Complete(_) => {
            match existing {
                Some("forwarding") => r.forwarded = true,
                Some(o) => return Plan::Refuse(format!("{id} is already final ({o})")),
                None => {
                    tracing::debug!(request_id = %id, "ledger: completion of a request never begun");
                    r.forwarded = false;
                }
            }
            Plan::Write(EntryKind::Complete, r)
        }
        LedgerOp::Final(_) => {
            if let Some(o) = existing {
                return Plan::Refuse(format!("{id} is already recorded ({o})"));
            }
            r.forwarded = false;
            Plan::Write(EntryKind::Final, r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_parses() {
        assert_eq!("user".parse::<GroupBy>().unwrap(), GroupBy::User);
        assert_eq!("day".parse::<GroupBy>().unwrap(), GroupBy::Day);
        assert_eq!("model".parse::<GroupBy>().unwrap(), GroupBy::Model);
        assert_eq!("none".parse::<GroupBy>().unwrap(), GroupBy::None);
        assert!("week".parse::<GroupBy>().is_err());
    }

    #[test]
    fn first_broken_keeps_the_smallest_seq() {
        let mut r = VerifyReport::default();
        let link = |seq| BrokenLink {
            seq,
            request_id: String::new(),
            reason: String::new(),
        };
        r.note_broken(link(9));
        r.note_broken(link(4));
        r.note_broken(link(7));
        assert_eq!(r.first_broken.unwrap().seq, 4);
    }
}
