//! [`Ledger`]: the cloneable async handle request handlers use, and its single writer thread.
//! [`LedgerReader`]: queries for the admin listener, off the async runtime.
//!
//! # Queue and writer
//! Jobs go through ONE channel to ONE writer thread (a plain `std` thread named
//! `ledger-writer`, so the store's blocking I/O never runs on the runtime), which takes one job
//! (waiting), then up to [`MAX_BATCH`]` - 1` more that are already queued, and commits them in
//! one transaction; each waiter then gets its own result.
//!
//! The queue is bounded for async callers: [`Ledger::begin_forwarding`] and [`Ledger::finish`]
//! first take one of `queue` permits (waiting when the queue is full: backpressure, never a
//! drop), and the writer returns the permit when it takes the job. [`Ledger::finish_detached`]
//! is for `Drop` paths, which cannot wait: it skips the permit, so the channel itself is
//! unbounded; detached records are few (one per request whose handler was dropped), and
//! refusing them would lose records.
//!
//! # Failures
//! - The store fails transiently (disk full, database locked or gone): every waiter of the
//!   batch gets the error. A `Begin` is answered [`LedgerError::Unavailable`] (the caller must
//!   not forward; it answers 503 and records that rejection with a `Final`). A final record is
//!   kept in memory (up to [`MAX_RETAINED`]) and retried before newer jobs, with a backoff from
//!   50 ms to 5 s even when nothing new arrives; its waiter gets [`LedgerError::Deferred`].
//!   [`Ledger::healthy`] is false from a failed write to the next successful one.
//! - Any other store error fails a batch of several jobs, so they are retried one by one to
//!   isolate the bad one; a store that panics is treated the same way (the writer catches it).
//!   A record refused for good is logged in full under the target `imagegate::ledger::lost`.
//! - [`Ledger::close`] stops taking jobs, lets the writer commit everything queued, retries
//!   the retained records a few times, logs any it still cannot write, and waits for the
//!   writer to exit.

mod reader;
mod thread;

pub use reader::LedgerReader;
use thread::run;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::LedgerError;
use super::record::Record;
use super::sqlite::SqliteStore;
use super::store::{ChainHead, LedgerOp, LedgerStore, SqliteTask};

/// Most jobs in one transaction: the one waited for and up to 256 more already queued.
pub const MAX_BATCH: usize = 257;
/// Most final records kept in memory while the store is failing. Past this, a record that
/// fails is logged (target `imagegate::ledger::lost`) and counted in [`Ledger::lost_records`].
pub const MAX_RETAINED: usize = 100_000;
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Attempts to write retained records once the ledger is closing.
const CLOSE_ATTEMPTS: u32 = 3;
/// Log target of records that could not be written, with their full JSON.
pub const LOST_TARGET: &str = "imagegate::ledger::lost";

type Reply = oneshot::Sender<Result<(), LedgerError>>;

// Records are the common job and were never boxed; a task is a pointer.
#[allow(clippy::large_enum_variant)]
enum Job {
    Op {
        op: LedgerOp,
        reply: Option<Reply>,
        /// Returned (dropped) when the writer takes the job.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Work on the SQLite connection (the quota store's), run in the batch's transaction.
    Task(Box<dyn SqliteTask>),
}

/// Counters shared with the writer thread.
struct Stats {
    depth: AtomicUsize,
    healthy: AtomicBool,
    retained: AtomicUsize,
    lost: AtomicU64,
    /// The chain head after the last commit.
    head: Mutex<Option<ChainHead>>,
    /// Origin of `busy_since_ms`.
    epoch: std::time::Instant,
    /// When the store call running now started (ms since `epoch`, + 1); 0: no call running.
    busy_since_ms: AtomicU64,
    /// A store call running longer than this makes the ledger stalled (`ledger.stall_timeout`).
    stall_after_ms: AtomicU64,
}

impl Stats {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }
}

/// Marks a store call as running for as long as it lives (see [`Ledger::stalled`]).
struct Busy<'a>(&'a Stats);

impl<'a> Busy<'a> {
    fn start(stats: &'a Stats) -> Self {
        stats.busy_since_ms.store(stats.now_ms(), Ordering::SeqCst);
        Busy(stats)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since_ms.store(0, Ordering::SeqCst);
    }
}

/// How often a waiter for a commit looks whether the store stalled.
const STALL_POLL: Duration = Duration::from_millis(100);

pub use crate::config::DEFAULT_STALL_TIMEOUT;

/// What the handles share. Holds the only sender: when the last handle goes (or `close` takes
/// it), the channel closes and the writer drains it and exits.
struct Shared {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    permits: Arc<Semaphore>,
    stats: Arc<Stats>,
    exited: Mutex<Option<oneshot::Receiver<Result<(), LedgerError>>>>,
    /// The SQLite file the writer writes, when it writes one.
    sqlite_file: Option<std::path::PathBuf>,
}

/// The async handle to the ledger. Cheap to clone; all clones feed the same writer.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("queue_depth", &self.queue_depth())
            .field("healthy", &self.healthy())
            .field("retained", &self.retained_records())
            .field("lost", &self.lost_records())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can leave the data half-updated.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Log a record that will never be written, in full, so it can be replayed by hand.
fn log_lost(op: &LedgerOp, why: &str) {
    let json = serde_json::to_string(op.record()).unwrap_or_default();
    tracing::error!(
        target: LOST_TARGET,
        request_id = %op.record().request_id,
        kind = op.kind(),
        record = %json,
        "ledger record not written: {why}"
    );
}

/// A final op not yet handed to the writer: if the future carrying it is dropped first, the op
/// is still queued (detached), so cancelling `finish` never loses a record.
struct Pending<'a> {
    op: Option<LedgerOp>,
    ledger: &'a Ledger,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.ledger.finish_detached(op);
        }
    }
}

impl Ledger {
    /// Start the writer thread over `store`. `queue` bounds the jobs waiting for it (at least
    /// 1). Run [`LedgerStore::recover`] on the store first (see [`Ledger::open_sqlite`]).
    pub fn start(store: Box<dyn LedgerStore>, queue: usize) -> Result<Ledger, LedgerError> {
        Self::start_probed(store, queue, None)
    }

    /// [`Ledger::start`], and while no job comes for `probe`, the writer checks the store
    /// ([`LedgerStore::ping`]): a failure turns [`Ledger::healthy`] false, a success (with no
    /// record waiting for a retry) true again, so readiness follows the store even when idle.
    pub fn start_probed(
        store: Box<dyn LedgerStore>,
        queue: usize,
        probe: Option<Duration>,
    ) -> Result<Ledger, LedgerError> {
        Self::start_on(store, queue, probe, None)
    }

    fn start_on(
        store: Box<dyn LedgerStore>,
        queue: usize,
        probe: Option<Duration>,
        sqlite_file: Option<std::path::PathBuf>,
    ) -> Result<Ledger, LedgerError> {
        let (tx, rx) = mpsc::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        let stats = Arc::new(Stats {
            depth: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            retained: AtomicUsize::new(0),
            lost: AtomicU64::new(0),
            head: Mutex::new(store.tip()),
            epoch: std::time::Instant::now(),
            busy_since_ms: AtomicU64::new(0),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL_TIMEOUT.as_millis() as u64),
        });
        let writer_stats = stats.clone();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let result = run(store, rx, &writer_stats, probe);
                writer_stats.healthy.store(false, Ordering::SeqCst);
                let _ = exit_tx.send(result);
            })
            .map_err(|e| LedgerError::Store(format!("cannot start the ledger writer: {e}")))?;
        Ok(Ledger {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                permits: Arc::new(Semaphore::new(queue.clamp(1, Semaphore::MAX_PERMITS))),
                stats,
                exited: Mutex::new(Some(exit_rx)),
                sqlite_file,
            }),
        })
    }

    /// Open the SQLite ledger at `path`, turn what a crash left `forwarding` into `unknown`,
    /// and start the writer. Returns the ledger and how many records were recovered. Blocking
    /// (file I/O): call it at start-up, before serving.
    pub fn open_sqlite(path: &Path, queue: usize) -> Result<(Ledger, usize), LedgerError> {
        Self::open_sqlite_with(path, queue, super::Synchronous::Full)
    }

    /// [`Ledger::open_sqlite`] with the ledger connection's `synchronous` setting.
    pub fn open_sqlite_with(
        path: &Path,
        queue: usize,
        synchronous: super::Synchronous,
    ) -> Result<(Ledger, usize), LedgerError> {
        let mut store = SqliteStore::open(path)?;
        store.set_synchronous(synchronous)?;
        let recovered = store.recover()?;
        if let Some(head) = store.head()? {
            tracing::info!(seq = head.seq, hash = %head.hash, path = %path.display(), "ledger opened");
        }
        let ledger = Ledger::start_on(Box::new(store), queue, None, Some(path.to_path_buf()))?;
        Ok((ledger, recovered))
    }

    /// Open the PostgreSQL ledger (running its migrations), turn what this replica left
    /// `forwarding` into `unknown`, and start the writer. Blocking: call it at start-up.
    pub fn open_postgres(
        settings: super::postgres::PgSettings,
        replica: &str,
        queue: usize,
    ) -> Result<(Ledger, usize), LedgerError> {
        Self::open_postgres_probed(settings, replica, queue, Duration::from_secs(5))
    }

    /// [`Ledger::open_postgres`], the idle writer checking the server every `probe`.
    pub fn open_postgres_probed(
        settings: super::postgres::PgSettings,
        replica: &str,
        queue: usize,
        probe: Duration,
    ) -> Result<(Ledger, usize), LedgerError> {
        let mut store = super::postgres::PostgresStore::open(settings, replica)?;
        let recovered = store.recover()?;
        if let Some(head) = store.head()? {
            tracing::info!(seq = head.seq, hash = %head.hash, replica, "ledger opened (PostgreSQL)");
        }
        Ok((
            Ledger::start_probed(Box::new(store), queue, Some(probe))?,
            recovered,
        ))
    }

    /// Commit `record` as `forwarding` (whatever its outcome says) and wait until the commit
    /// returned. `Err` means the record is not durable: the caller must NOT forward the request
    /// (answer 503 `ledger_unavailable`, then record that rejection with a `Final` of the same
    /// request id). If this future is dropped after the job was queued, the `Begin` still
    /// commits; dropped before, nothing is written (nothing was forwarded either).
    pub async fn begin_forwarding(&self, record: Record) -> Result<(), LedgerError> {
        let permit = self
            .shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LedgerError::Closed)?;
        let (reply, done) = oneshot::channel();
        self.send(Job::Op {
            op: LedgerOp::Begin(record),
            reply: Some(reply),
            permit: Some(permit),
        })?;
        done.await.unwrap_or(Err(LedgerError::Closed))
    }

    /// Queue a final record (`Complete` or `Final`) and wait until it is committed. Waits for
    /// queue space when the queue is full. `Err(Deferred)`: the store failed and the writer
    /// keeps retrying the record. `Err(Rejected)`: refused for good (logged). If this future is
    /// dropped before the op was queued, the op is queued detached; after, it commits anyway.
    pub async fn finish(&self, op: LedgerOp) -> Result<(), LedgerError> {
        if op.is_begin() {
            return Err(LedgerError::Rejected(
                "finish takes Complete or Final; use begin_forwarding".into(),
            ));
        }
        let mut pending = Pending {
            op: Some(op),
            ledger: self,
        };
        let permit = self.shared.permits.clone().acquire_owned().await;
        let Some(op) = pending.op.take() else {
            return Err(LedgerError::Closed);
        };
        let Ok(permit) = permit else {
            self.lose(&op, "the ledger is closed");
            return Err(LedgerError::Closed);
        };
        let (reply, done) = oneshot::channel();
        self.send(Job::Op {
            op,
            reply: Some(reply),
            permit: Some(permit),
        })?;
        // Not behind a stalled store: the job stays queued (written when the store comes
        // back) and the caller goes on.
        tokio::pin!(done);
        loop {
            tokio::select! {
                answer = &mut done => return answer.unwrap_or(Err(LedgerError::Closed)),
                () = tokio::time::sleep(STALL_POLL) => {
                    if self.stalled() {
                        return Err(LedgerError::Unavailable(
                            "the ledger store is stalled; the record stays queued".into(),
                        ));
                    }
                }
            }
        }
    }

    /// Queue a final record without waiting, for `Drop` paths and other code that cannot
    /// await. Never blocks and skips the queue bound (see the module doc). A record that cannot
    /// be queued (the ledger is closed) is logged in full and counted as lost.
    pub fn finish_detached(&self, op: LedgerOp) {
        if op.is_begin() {
            self.lose(&op, "finish_detached takes Complete or Final");
            return;
        }
        // A refusal is logged and counted by `send`; there is no one to tell.
        let _ = self.send(Job::Op {
            op,
            reply: None,
            permit: None,
        });
    }

    /// Run `task` on the writer's SQLite connection, in the transaction of its next batch (with
    /// the records queued beside it: one commit for all). Never waits (like
    /// [`Ledger::finish_detached`], it skips the queue bound: its caller waits for the answer,
    /// so tasks are at most one per request in flight). A ledger that is closed, or whose
    /// store is not SQLite, answers the task's `done` with the error.
    pub fn run_task(&self, task: Box<dyn SqliteTask>) {
        let _ = self.send(Job::Task(task));
    }

    /// The SQLite file this ledger's writer writes ([`Ledger::open_sqlite`]), if any.
    pub fn sqlite_file(&self) -> Option<&Path> {
        self.shared.sqlite_file.as_deref()
    }

    /// Jobs queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        self.shared.stats.depth.load(Ordering::SeqCst)
    }

    /// False from a failed write to the next successful one, and once the ledger is closed.
    /// The ledger chain's head as this process last committed it (its own chain on
    /// PostgreSQL); `None` before the first entry.
    pub fn chain_head(&self) -> Option<ChainHead> {
        lock(&self.shared.stats.head).clone()
    }

    pub fn healthy(&self) -> bool {
        self.shared.stats.healthy.load(Ordering::SeqCst)
            && lock(&self.shared.tx).is_some()
            && !self.stalled()
    }

    /// Whether a store call has been running for longer than the stall timeout: a store that
    /// neither answers nor fails (a PostgreSQL server frozen with its connections open). While
    /// it lasts, readiness fails and new edits are refused 503 `ledger_unavailable` before any
    /// quota is reserved, so they end at once instead of queueing behind the stuck call.
    pub fn stalled(&self) -> bool {
        let stats = &self.shared.stats;
        let since = stats.busy_since_ms.load(Ordering::SeqCst);
        since != 0
            && stats.now_ms().saturating_sub(since) > stats.stall_after_ms.load(Ordering::SeqCst)
    }

    /// Set the stall timeout (`ledger.stall_timeout`; see [`Ledger::stalled`]).
    pub fn set_stall_timeout(&self, after: Duration) {
        self.shared.stats.stall_after_ms.store(
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Final records held in memory for retry because the store failed.
    pub fn retained_records(&self) -> usize {
        self.shared.stats.retained.load(Ordering::SeqCst)
    }

    /// Records given up on (logged under [`LOST_TARGET`]) since start.
    pub fn lost_records(&self) -> u64 {
        self.shared.stats.lost.load(Ordering::SeqCst)
    }

    /// Stop taking jobs, commit everything queued, and wait for the writer to exit. `Err` if
    /// some records could not be written (they were logged). Later calls, from any clone,
    /// return `Ok` at once; jobs sent after this fail with [`LedgerError::Closed`].
    pub async fn close(self) -> Result<(), LedgerError> {
        let tx = lock(&self.shared.tx).take();
        self.shared.permits.close();
        drop(tx);
        let exited = lock(&self.shared.exited).take();
        match exited {
            Some(exited) => exited.await.unwrap_or_else(|_| {
                Err(LedgerError::Store(
                    "the ledger writer stopped abnormally".into(),
                ))
            }),
            None => Ok(()),
        }
    }

    /// Queue `job`. If the ledger is closed, a final record is logged and counted as lost.
    fn send(&self, job: Job) -> Result<(), LedgerError> {
        let tx = lock(&self.shared.tx);
        let refused = match tx.as_ref() {
            None => job,
            Some(tx) => {
                // Count before sending, so the writer's decrement never comes first.
                self.shared.stats.depth.fetch_add(1, Ordering::SeqCst);
                match tx.send(job) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        self.shared.stats.depth.fetch_sub(1, Ordering::SeqCst);
                        e.0
                    }
                }
            }
        };
        drop(tx);
        match refused {
            Job::Op { op, .. } if !op.is_begin() => self.lose(&op, "the ledger is closed"),
            Job::Op { .. } => {}
            Job::Task(task) => task.done(Err(LedgerError::Closed)),
        }
        Err(LedgerError::Closed)
    }

    fn lose(&self, op: &LedgerOp, why: &str) {
        self.shared.stats.lost.fetch_add(1, Ordering::SeqCst);
        log_lost(op, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::record::Outcome;
    use crate::ledger::store::{UsageQuery, UsageRow, VerifyReport};
    use crate::ledger::test_support::{rec, sample};
    use std::time::Instant;

    /// Stalls the writer thread while closed (no guard held across the test's awaits).
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl Gate {
        fn close(&self) {
            *lock(&self.0.0) = true;
        }
        fn open(&self) {
            *lock(&self.0.0) = false;
            self.0.1.notify_all();
        }
        fn pass(&self) {
            let mut closed = lock(&self.0.0);
            while *closed {
                closed = self
                    .0
                    .1
                    .wait(closed)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    /// What a test can see and change of the store inside the writer.
    #[derive(Clone, Default)]
    struct Controls {
        /// Applied as `max_page_count` before each batch when non-zero.
        page_limit: Arc<AtomicU64>,
        batches: Arc<AtomicUsize>,
        largest: Arc<AtomicUsize>,
        /// Batches started (before waiting on the gate).
        entered: Arc<AtomicUsize>,
        /// Closed by a test to stall the writer inside `write_batch`.
        gate: Gate,
        panic_on: Arc<Mutex<Option<String>>>,
    }

    struct Spy {
        inner: SqliteStore,
        c: Controls,
    }

    impl LedgerStore for Spy {
        fn recover(&mut self) -> Result<usize, LedgerError> {
            self.inner.recover()
        }
        fn write_batch(
            &mut self,
            ops: &[LedgerOp],
        ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
            self.c.entered.fetch_add(1, Ordering::SeqCst);
            self.c.gate.pass();
            let limit = self.c.page_limit.load(Ordering::SeqCst);
            if limit > 0 {
                self.inner.set_max_page_count(limit)?;
            }
            let poison = lock(&self.c.panic_on).clone();
            if let Some(p) = poison {
                if ops.iter().any(|o| o.record().request_id == p) {
                    panic!("poisoned record {p}");
                }
            }
            self.c.batches.fetch_add(1, Ordering::SeqCst);
            self.c.largest.fetch_max(ops.len(), Ordering::SeqCst);
            self.inner.write_batch(ops)
        }
        fn get(&self, id: &str) -> Result<Option<Record>, LedgerError> {
            self.inner.get(id)
        }
        fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
            self.inner.usage(q)
        }
        fn export(
            &self,
            q: &UsageQuery,
            out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
        ) -> Result<(), LedgerError> {
            self.inner.export(q, out)
        }
        fn verify(&self) -> Result<VerifyReport, LedgerError> {
            self.inner.verify()
        }
    }

    fn spy_ledger(path: &Path, queue: usize) -> (Ledger, Controls) {
        let c = Controls::default();
        let store = Spy {
            inner: SqliteStore::open(path).unwrap(),
            c: c.clone(),
        };
        (Ledger::start(Box::new(store), queue).unwrap(), c)
    }

    /// Wait (bounded) for a condition the writer thread makes true.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn req(id: &str) -> Record {
        Record {
            request_id: id.into(),
            ..sample()
        }
    }

    fn answered(id: &str) -> LedgerOp {
        LedgerOp::Complete(Record {
            outcome: Outcome::Answered,
            ..req(id)
        })
    }

    fn rejected(id: &str) -> LedgerOp {
        LedgerOp::Final(Record {
            reason_code: Some("rate_limit_exceeded".into()),
            status: Some(429),
            ..rec(
                id,
                "2025-01-01T00:00:00Z",
                "acme",
                Some("u"),
                Outcome::Rejected,
            )
        })
    }

    fn entries(path: &Path) -> (u64, u64) {
        let v = SqliteStore::open_reader(path).unwrap().verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        (v.entries, v.records)
    }

    /// A store call that neither answers nor fails (the gate held closed inside `write_batch`)
    /// makes the ledger stalled once it has run past the stall timeout: not healthy, so
    /// readiness fails and new edits are refused; it ends when the call does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_call_that_hangs_makes_the_ledger_stalled_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, c) = spy_ledger(&dir.path().join("l.db"), 8);
        ledger.set_stall_timeout(Duration::from_millis(50));
        assert!(!ledger.stalled() && ledger.healthy());
        c.gate.close();
        ledger.finish_detached(rejected("req_stuck"));
        until("the batch to enter the store", || {
            c.entered.load(Ordering::SeqCst) == 1
        })
        .await;
        until("the call to pass the stall timeout", || ledger.stalled()).await;
        assert!(!ledger.healthy(), "a stalled ledger is not ready");
        c.gate.open();
        until("the call to end", || !ledger.stalled()).await;
        until("the ledger to be healthy again", || ledger.healthy()).await;
        assert_eq!(
            c.batches.load(Ordering::SeqCst),
            1,
            "the held batch was written"
        );
    }

    #[tokio::test]
    async fn begin_finish_detached_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, recovered) = Ledger::open_sqlite(&path, 16).unwrap();
        assert_eq!(recovered, 0);
        assert!(ledger.healthy());
        ledger.begin_forwarding(req("a")).await.unwrap();
        ledger.finish(answered("a")).await.unwrap();
        ledger.finish(rejected("b")).await.unwrap();
        ledger.begin_forwarding(req("c")).await.unwrap();
        ledger.finish_detached(LedgerOp::Complete(Record {
            outcome: Outcome::ClientGone,
            ..req("c")
        }));
        // Refusals reach the waiter.
        assert!(matches!(
            ledger.begin_forwarding(req("a")).await,
            Err(LedgerError::Rejected(_))
        ));
        assert!(matches!(
            ledger.finish(LedgerOp::Begin(req("z"))).await,
            Err(LedgerError::Rejected(_))
        ));
        let clone = ledger.clone();
        ledger.close().await.unwrap();
        assert!(!clone.healthy());
        assert_eq!(
            clone.begin_forwarding(req("d")).await,
            Err(LedgerError::Closed)
        );
        assert_eq!(clone.finish(rejected("e")).await, Err(LedgerError::Closed));
        clone.finish_detached(rejected("f"));
        assert_eq!(clone.lost_records(), 2);
        clone.close().await.unwrap();

        let r = SqliteStore::open_reader(&path).unwrap();
        assert_eq!(r.get("c").unwrap().unwrap().outcome, Outcome::ClientGone);
        assert_eq!(r.get("a").unwrap().unwrap().outcome, Outcome::Answered);
        assert_eq!(entries(&path), (5, 3));
    }

    #[tokio::test]
    async fn crash_recovery_through_open_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, _) = Ledger::open_sqlite(&path, 16).unwrap();
        ledger.begin_forwarding(req("a")).await.unwrap();
        ledger.begin_forwarding(req("b")).await.unwrap();
        ledger.finish(answered("b")).await.unwrap();
        // Dropping every handle without close: the writer drains and exits (a crash leaves
        // the same on disk: a committed forwarding record).
        drop(ledger);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (ledger, recovered) = loop {
            // The old writer may still hold the file briefly; open waits on the busy timeout.
            match Ledger::open_sqlite(&path, 16) {
                Ok(x) => break x,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("retrying open: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(recovered, 1);
        ledger.close().await.unwrap();
        let r = SqliteStore::open_reader(&path).unwrap();
        assert_eq!(r.get("a").unwrap().unwrap().outcome, Outcome::Unknown);
        assert_eq!(entries(&path), (4, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_all_land_in_one_chain() {
        const TASKS: usize = 8;
        const PER_TASK: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, c) = spy_ledger(&path, 64);
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    let id = format!("t{t}-{i}");
                    ledger.begin_forwarding(req(&id)).await.unwrap();
                    ledger.finish(answered(&id)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(ledger.queue_depth(), 0);
        ledger.close().await.unwrap();
        let pairs = (TASKS * PER_TASK) as u64;
        assert_eq!(entries(&path), (2 * pairs, pairs));
        let batches = c.batches.load(Ordering::SeqCst);
        assert!(c.largest.load(Ordering::SeqCst) <= MAX_BATCH);
        eprintln!(
            "{} ops in {batches} batches (largest {})",
            2 * pairs,
            c.largest.load(Ordering::SeqCst)
        );
        let r = SqliteStore::open_reader(&path).unwrap();
        let usage = r.usage(&UsageQuery::default()).unwrap();
        assert_eq!(usage[0].requests, pairs);
        assert_eq!(usage[0].forwarded, pairs);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_callers_wait_and_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, c) = spy_ledger(&path, 2);
        c.gate.close();
        let first = tokio::spawn({
            let l = ledger.clone();
            async move { l.finish(rejected("r0")).await }
        });
        until("the writer to hold r0", || {
            c.entered.load(Ordering::SeqCst) == 1 && ledger.queue_depth() == 0
        })
        .await;
        let mut waiting = Vec::new();
        for i in 1..=3 {
            let l = ledger.clone();
            waiting.push(tokio::spawn(async move {
                l.finish(rejected(&format!("r{i}"))).await
            }));
        }
        until("two queued jobs", || ledger.queue_depth() == 2).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(ledger.queue_depth(), 2, "the third must wait for space");
        assert_eq!(waiting.iter().filter(|t| t.is_finished()).count(), 0);
        // A detached record does not wait.
        ledger.finish_detached(rejected("r4"));
        assert_eq!(ledger.queue_depth(), 3);
        // A finish cancelled while waiting for space still gets its record queued.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), ledger.finish(rejected("r5"))).await;
        assert!(cancelled.is_err());
        assert_eq!(ledger.queue_depth(), 4);
        c.gate.open();
        first.await.unwrap().unwrap();
        for t in waiting {
            t.await.unwrap().unwrap();
        }
        ledger.close().await.unwrap();
        assert_eq!(entries(&path), (6, 6));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_full_fails_every_waiter_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, c) = spy_ledger(&path, 64);
        ledger.finish(rejected("before")).await.unwrap();
        // Every record below needs new pages: a 64 KiB prompt each.
        let big = |id: &str| Record {
            prompt: Some("p".repeat(64 * 1024)),
            ..req(id)
        };
        c.page_limit.store(1, Ordering::SeqCst); // clamped to the current size: "disk full"

        // Stall the writer so the next jobs form one batch.
        c.gate.close();
        let stall = tokio::spawn({
            let l = ledger.clone();
            let r = big("stall");
            async move {
                l.finish(LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..r
                }))
                .await
            }
        });
        until("the writer to stall", || {
            c.entered.load(Ordering::SeqCst) == 2
        })
        .await;
        let mut begins = Vec::new();
        let mut finals = Vec::new();
        for i in 0..3 {
            let l = ledger.clone();
            let r = big(&format!("begin{i}"));
            begins.push(tokio::spawn(async move { l.begin_forwarding(r).await }));
            let l = ledger.clone();
            let r = big(&format!("final{i}"));
            finals.push(tokio::spawn(async move {
                l.finish(LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..r
                }))
                .await
            }));
        }
        until("six queued jobs", || ledger.queue_depth() == 6).await;
        let batches_before = c.batches.load(Ordering::SeqCst);
        c.gate.open();
        assert!(matches!(
            stall.await.unwrap(),
            Err(LedgerError::Deferred(_))
        ));
        for t in begins {
            let e = t.await.unwrap().unwrap_err();
            assert!(
                matches!(e, LedgerError::Unavailable(ref m) if m.contains("full")),
                "{e:?}"
            );
        }
        for t in finals {
            assert!(matches!(t.await.unwrap(), Err(LedgerError::Deferred(_))));
        }
        // One batch for the stalled job, one for the six (plus the stalled one retried).
        assert_eq!(c.batches.load(Ordering::SeqCst) - batches_before, 2);
        assert!(!ledger.healthy());
        assert_eq!(ledger.retained_records(), 4);
        // Still full: a begin fails at once, nothing forwarded.
        assert!(ledger.begin_forwarding(big("still")).await.is_err());

        // Space returns: retained records land without any new traffic, health comes back.
        c.page_limit.store(1 << 30, Ordering::SeqCst);
        until("retained records to land", || {
            ledger.retained_records() == 0 && ledger.healthy()
        })
        .await;
        ledger.begin_forwarding(big("after")).await.unwrap();
        assert_eq!(ledger.lost_records(), 0);
        ledger.close().await.unwrap();

        let r = SqliteStore::open_reader(&path).unwrap();
        for id in ["stall", "final0", "final1", "final2"] {
            assert_eq!(
                r.get(id).unwrap().unwrap().outcome,
                Outcome::Rejected,
                "{id}"
            );
        }
        for id in ["begin0", "begin1", "begin2", "still"] {
            assert_eq!(r.get(id).unwrap(), None, "{id}");
        }
        assert_eq!(entries(&path), (6, 6));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_record_or_a_panicking_store_hurts_no_other_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, c) = spy_ledger(&path, 64);
        *lock(&c.panic_on) = Some("boom".into());
        c.gate.close();
        let stall = tokio::spawn({
            let l = ledger.clone();
            async move { l.finish(rejected("stall")).await }
        });
        until("the writer to stall", || {
            c.entered.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut jobs = Vec::new();
        for id in ["ok1", "boom", "ok1", "ok2"] {
            let l = ledger.clone();
            jobs.push(tokio::spawn(async move { l.finish(rejected(id)).await }));
            until("the job to queue", || ledger.queue_depth() == jobs.len()).await;
        }
        c.gate.open();
        stall.await.unwrap().unwrap();
        let results: Vec<_> = futures_join(jobs).await;
        assert_eq!(results[0], Ok(()));
        assert!(matches!(results[1], Err(LedgerError::Store(ref m)) if m.contains("panicked")));
        assert!(matches!(results[2], Err(LedgerError::Rejected(_)))); // duplicate id
        assert_eq!(results[3], Ok(()));
        assert!(ledger.healthy());
        assert_eq!(ledger.lost_records(), 2);
        ledger.close().await.unwrap();
        assert_eq!(entries(&path), (3, 3));
    }

    async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn close_gives_up_on_a_store_that_stays_full_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, c) = spy_ledger(&path, 4);
        ledger.finish(rejected("a")).await.unwrap();
        c.page_limit.store(1, Ordering::SeqCst);
        let big = LedgerOp::Final(Record {
            prompt: Some("p".repeat(64 * 1024)),
            outcome: Outcome::Rejected,
            ..req("b")
        });
        assert!(matches!(
            ledger.finish(big).await,
            Err(LedgerError::Deferred(_))
        ));
        let clone = ledger.clone();
        let e = ledger.close().await.unwrap_err();
        assert!(e.to_string().contains("1 records"), "{e}");
        assert_eq!(clone.lost_records(), 1);
    }
}
