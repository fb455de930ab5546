//! The usage and audit ledger: one record per request to the edits route, whatever its outcome.
//!
//! # Guarantees
//! - **One record per request.** The `records` table holds exactly one row per request id (its
//!   current state); a second `Begin`/`Final` for the same id, or a `Complete` of a request that
//!   is already final, is refused ([`LedgerError::Rejected`]) rather than overwriting history.
//! - **Nothing is lost.** A request that will be forwarded is committed as
//!   [`Outcome::Forwarding`] by [`Ledger::begin_forwarding`] *before* any byte goes upstream; if
//!   that commit fails the caller must not forward (it answers 503 `ledger_unavailable`). Final
//!   records wait for queue space rather than being dropped; when the store fails they are kept
//!   in memory and retried ([`LedgerError::Deferred`]). At start-up, [`LedgerStore::recover`]
//!   turns the records a crash left `forwarding` into [`Outcome::Unknown`]. A record that can
//!   never be written (the ledger was closed, or the store refused it) is logged in full at
//!   `error` level under the target `imagegate::ledger::lost`, so it can be replayed by hand.
//! - **Tamper-evident.** Every state change (begin, complete, final, recover) appends an entry to
//!   the append-only `ledger_chain` table whose `hash = sha256(prev_hash || entry_json)` (hex),
//!   the first `prev_hash` being 64 zeros. [`LedgerStore::verify`] recomputes the chain, checks
//!   that every `records` row equals the last chain entry of its request, and names the first
//!   broken link. Like any hash chain it cannot see a rewrite of the whole tail from some entry
//!   on, or a truncated tail; compare the reported [`VerifyReport::head`] with one kept
//!   elsewhere (logs, backups) to cover that.
//!
//! # Shape
//! - [`record`]: [`Record`], [`Outcome`], [`PromptPolicy`] and the chain entry format.
//! - [`store`]: the synchronous [`LedgerStore`] trait (SQLite now, PostgreSQL later), the ops it
//!   writes and the query types.
//! - [`sqlite`]: [`SqliteStore`] (WAL, `synchronous=FULL`, one transaction per batch).
//! - [`postgres`]: [`PostgresStore`] for several replicas (one chain per replica, versioned
//!   migrations, recovery of this replica's `forwarding` records).
//! - [`copy`]: `imagegate ledger copy`, a SQLite ledger into PostgreSQL, chain intact.
//! - [`writer`]: [`Ledger`], the cloneable async handle used by request handlers, with ONE
//!   writer thread that commits batches; [`LedgerReader`] for the admin listener.
//! - [`report`]: usage aggregation and rendering, JSONL/CSV export.
//!
//! Money is always integer micro-dollars (`i64`); reports print USD with 6 decimals.
//!
//! # Use from the request path
//! 1. At start-up: `let (ledger, recovered) = Ledger::open_sqlite(&config.ledger.path,
//!    config.ledger.queue)?` (blocking; before serving). One gateway process per ledger file.
//! 2. When a request arrives, build a [`Record`] (`Record::new(request_id, now)`) and fill it
//!    in as the request goes; the prompt through [`PromptPolicy::apply`].
//! 3. Refused before forwarding: `ledger.finish(LedgerOp::Final(record)).await`.
//! 4. About to forward: `ledger.begin_forwarding(record.clone()).await`; on `Err`, do not
//!    forward: answer 503 `ledger_unavailable` and record that with `LedgerOp::Final`.
//! 5. Answered, failed upstream, timed out: `ledger.finish(LedgerOp::Complete(record)).await`,
//!    from the task that outlives the client connection.
//! 6. In a `Drop` guard (the handler was dropped: client gone), `ledger.finish_detached(..)`
//!    with outcome `client_gone`: it cannot block and never loses the record.
//! 7. At shutdown, after draining requests: `ledger.close().await`.
//!
//! Readiness can use [`Ledger::healthy`]; metrics [`Ledger::queue_depth`],
//! [`Ledger::retained_records`] and [`Ledger::lost_records`]. The admin listener and the CLI
//! read through [`LedgerReader`] / [`SqliteStore::open_reader`].

pub mod copy;
pub mod postgres;
pub mod record;
pub mod report;
pub mod sqlite;
pub mod store;
pub mod writer;

pub use postgres::{PgSettings, PostgresStore};
pub use record::{CostBasis, Outcome, PromptPolicy, Record};
pub use report::{
    ExportFormat, Format, UsageFilters, micros_to_usd, parse_time_bound, render_usage, write_export,
};
pub use sqlite::{SqliteStore, Synchronous};
pub use store::{
    BrokenLink, ChainHead, ChainStatus, GroupBy, LedgerOp, LedgerStore, RecentQuery, ReplicaHead,
    UsageQuery, UsageRow, VerifyReport,
};
pub use writer::{Ledger, LedgerReader};

use std::fmt;

/// Why a ledger operation failed. Cloneable so one store failure can be handed to every waiter
/// of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerError {
    /// The store cannot be written right now: disk full, I/O error, database locked, read-only
    /// or gone. Transient: the same write may succeed later. For a `Begin` this means "do not
    /// forward".
    Unavailable(String),
    /// The store failed (as for [`LedgerError::Unavailable`]) while writing a final record; the
    /// writer keeps the record in memory and retries it until it commits or the ledger closes.
    /// The record is not durable yet.
    Deferred(String),
    /// The operation was refused and will never be written: an invalid record, a request id
    /// that was already recorded, or a completion of a request that is already final.
    Rejected(String),
    /// Any other store failure (corrupt or foreign database, a bug). Not retried.
    Store(String),
    /// The ledger was closed, or its writer has stopped.
    Closed,
    /// Writing an export or report to its destination failed.
    Io(String),
}

impl LedgerError {
    /// Whether the same write may succeed later (the store, not the data, is at fault).
    pub fn is_transient(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_) | LedgerError::Deferred(_))
    }
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Unavailable(m) => write!(f, "ledger unavailable: {m}"),
            LedgerError::Deferred(m) => {
                write!(f, "ledger write deferred (kept in memory, retrying): {m}")
            }
            LedgerError::Rejected(m) => write!(f, "ledger refused the record: {m}"),
            LedgerError::Store(m) => write!(f, "ledger store error: {m}"),
            LedgerError::Closed => f.write_str("ledger closed"),
            LedgerError::Io(m) => write!(f, "ledger output error: {m}"),
        }
    }
}

impl std::error::Error for LedgerError {}

/// A store for queries only over the ledger `config` names: the SQLite file (which must
/// exist), or PostgreSQL (connecting on first use).
pub fn open_reader(
    config: &crate::config::LedgerConfig,
) -> Result<Box<dyn LedgerStore>, LedgerError> {
    match config.postgres() {
        Some(settings) => Ok(Box::new(PostgresStore::reader(settings, &config.replica()))),
        None if config.backend == crate::config::LedgerBackend::Postgres => Err(
            LedgerError::Store("ledger.postgres_url (or IMAGEGATE_POSTGRES_URL) is not set".into()),
        ),
        None => Ok(Box::new(SqliteStore::open_reader(&config.path)?)),
    }
}

impl From<std::io::Error> for LedgerError {
    fn from(e: std::io::Error) -> Self {
        LedgerError::Io(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::{CostBasis, Outcome, PromptPolicy, Record};

    /// A fully populated answered record.
    pub(crate) fn sample() -> Record {
        Record {
            request_id: "req_0123456789abcdef0123456789abcdef".into(),
            received_at: "2025-03-04T05:06:07.123456Z".parse().unwrap(),
            client: Some("acme".into()),
            user: Some("alice".into()),
            client_addr: Some("127.0.0.1:5555".into()),
            outcome: Outcome::Answered,
            status: Some(200),
            upstream_status: Some(200),
            upstream_request_id: Some("req_up".into()),
            model: Some("gpt-image-1".into()),
            n: Some(2),
            size: Some("1024x1024".into()),
            response_format: Some("b64_json".into()),
            images_returned: Some(2),
            cost_reserved_micros: 84_000,
            cost_settled_micros: 84_000,
            image_sha256: Some("ab".repeat(32)),
            image_bytes: Some(123_456),
            image_width: Some(1024),
            image_height: Some(1024),
            prompt: PromptPolicy::Sha256.apply("a cat"),
            total_ms: Some(12_345),
            upstream_ms: Some(12_000),
            quality: Some("high".into()),
            output_format: Some("png".into()),
            input_images: Some(2),
            stream: Some(false),
            input_tokens: Some(1_060),
            input_text_tokens: Some(60),
            input_image_tokens: Some(1_000),
            output_tokens: Some(2_000),
            total_tokens: Some(3_060),
            usage_extra: Some(
                r#"{"input_tokens_details":{"cached_tokens_details":{"text_tokens":0}}}"#.into(),
            ),
            cost_basis: Some(CostBasis::Usage),
            ..Record::default()
        }
    }

    /// A record with the given id, time (RFC 3339), client, user and outcome.
    pub(crate) fn rec(id: &str, at: &str, client: &str, user: Option<&str>, o: Outcome) -> Record {
        Record {
            request_id: id.into(),
            received_at: at.parse().unwrap(),
            client: Some(client.into()),
            user: user.map(Into::into),
            outcome: o,
            ..Record::default()
        }
    }
}
