//! The SQLite ledger store (the default). Files: this one (the store, its transactions and its
//! writes), [`schema`] (tables, versions, upgrades), [`rows`] (records in and out of rows),
//! [`query`] (usage, export, recent, status), [`verify`], [`file`] (the file's identity).
//!
//! Tables:
//! - `ledger_chain(seq, request_id, entry_json, prev_hash, hash)`: append-only (triggers refuse
//!   UPDATE and DELETE, which stops accidents, not an attacker: that is what the hashes are
//!   for). One entry per state change, `seq` 1, 2, 3, ... without gaps.
//! - `records`: the current state of each request (one row per `request_id`, upserted), with
//!   `seq` pointing at the chain entry that holds the same state. Indexed by `received_at_us`,
//!   `(client, received_at_us)`, `(end_user, received_at_us)` and `(outcome, received_at_us)`
//!   for reports, the admin pages and start-up recovery (each index is a page written per
//!   commit, so there is no other: the former partial `records_forwarding` is dropped).
//! - `ledger_meta(key, value)`: `schema_version`, now 3. A version 1 ledger (the first release)
//!   or 2 is upgraded in place when a writer opens it: the records columns added since
//!   (`ADDED_IN_2`, `ADDED_IN_3`) are added, all `NULL` in existing rows, in the transaction
//!   that opens the ledger. The chain is not touched: its entries are hashed as stored, and an old entry's
//!   record reads the new fields as `None`, which matches the `NULL` columns. A reader opens a
//!   version 1 or 2 ledger without upgrading it.
//!
//! Pragmas: `journal_mode=WAL` (readers such as the admin API and the CLI never block the
//! writer), `synchronous=FULL` by default: a `Begin` that returned is on disk even if the
//! machine loses power, which is the promise made to the request path. Batching amortizes the
//! fsync (one per transaction, i.e. per batch); `NORMAL` is available through
//! [`SqliteStore::set_synchronous`] (WAL + NORMAL survives a process crash, not a power loss).
//! `busy_timeout=5000` for the other connections on the file (readers, the CLI, the quota
//! store's own connection at start-up). In the gateway the quota store's changes run on THIS
//! connection, in the writer's batches ([`LedgerStore::write_batch_with`], [`SqliteTask`]): one
//! connection writes the file, so no writer sleeps in the busy handler waiting for another, and
//! a batch that holds only quota changes commits without an fsync of its own (the next FULL
//! commit, in WAL order, makes it durable). `wal_autocheckpoint=4000` pages (16 MiB of WAL
//! between checkpoints instead of 4): a page changed by many commits (an index tail, a quota
//! row) is copied into the database once per checkpoint, so fewer pages are written and
//! fsynced per request (measured with `bench/run` under `strace -f -c`: see the README).
//!
//! The writer keeps the chain's tip (last seq and hash) in memory, so appending reads nothing
//! back. Each entry is inserted with an explicit `seq`: if another process appended meanwhile
//! the insert collides, the batch fails as `Unavailable`, and the tip is reloaded before the
//! next batch. After any failed transaction the tip is reloaded the same way.

mod file;
mod query;
mod rows;
mod schema;
pub use schema::{SQLITE_HOLDS, SQLITE_USAGE};
mod verify;

pub(crate) use verify::{differing_fields, kind_fits};

use std::borrow::Cow;
use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use super::LedgerError;
use super::record::{EntryKind, GENESIS_HASH, Outcome, Record};
use super::store::{
    BatchResults, ChainHead, ChainStatus, LedgerOp, LedgerStore, Plan, RecentQuery, SqliteTask,
    UsageQuery, UsageRow, VerifyReport,
};
use file::FileId;
use rows::{append, plan, read_tip, record_from_row};
use schema::{
    SCHEMA, SCHEMA_VERSION, SELECT_RECORD, Schema, migrate_1_to_2, migrate_2_to_3, parse_version,
    read_version, select_columns,
};

pub use crate::config::Synchronous;

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        let transient = match &e {
            rusqlite::Error::SqliteFailure(f, _) => matches!(
                f.code,
                ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::OutOfMemory
                    | ErrorCode::FileLockingProtocolFailed
                    | ErrorCode::PermissionDenied
            ),
            _ => false,
        };
        if transient {
            LedgerError::Unavailable(e.to_string())
        } else {
            LedgerError::Store(e.to_string())
        }
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation)
}

/// The last chain entry as the writer knows it.
#[derive(Clone, Debug)]
struct Tip {
    seq: i64,
    hash: String,
}

pub struct SqliteStore {
    conn: Connection,
    /// `None`: unknown (after a failed transaction); reloaded before the next write.
    tip: Option<Tip>,
    read_only: bool,
    schema: Schema,
    /// The `synchronous` setting of the ledger's commits.
    synchronous: std::cell::Cell<Synchronous>,
    /// The setting the connection has now (NORMAL after a batch of quota tasks alone).
    applied: std::cell::Cell<Synchronous>,
    /// The file this store opened for writing (path, device and inode), checked before each
    /// write: SQLite keeps writing through its open descriptor to a file that was deleted,
    /// replaced or made read-only, so the gateway would not notice otherwise.
    file: Option<FileId>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .field("tip", &self.tip)
            .field("read_only", &self.read_only)
            .field("schema", &self.schema)
            .finish()
    }
}

impl SqliteStore {
    /// Open (creating it and its directory if needed) the ledger at `path`, for writing.
    pub fn open(path: &Path) -> Result<SqliteStore, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LedgerError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| at(path, e))?;
        let mut store = Self::init(conn)?;
        store.file = FileId::of(path);
        Ok(store)
    }

    /// A private in-memory ledger (tests, dry runs).
    pub fn open_in_memory() -> Result<SqliteStore, LedgerError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// Open an existing ledger for queries only (`PRAGMA query_only`): the admin listener and
    /// the CLI read through this while the gateway writes (WAL lets them run side by side).
    ///
    /// A version 1 ledger (not yet upgraded by a writer) is read as it is: the columns it lacks
    /// read as `NULL`, as in its chain entries, so `usage`, `audit export` and `audit verify`
    /// work on it before the gateway's first start on this release.
    pub fn open_reader(path: &Path) -> Result<SqliteStore, LedgerError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| at(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "query_only", true)?;
        let version = read_version(&conn)
            .map_err(|e| LedgerError::Store(format!("{}: not a ledger: {e}", path.display())))?;
        let schema = parse_version(version)
            .map_err(|e| LedgerError::Store(format!("{}: {e}", path.display())))?;
        Ok(SqliteStore {
            conn,
            tip: None,
            read_only: true,
            schema,
            synchronous: std::cell::Cell::new(Synchronous::Full),
            applied: std::cell::Cell::new(Synchronous::Full),
            file: None,
        })
    }

    fn init(conn: Connection) -> Result<SqliteStore, LedgerError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // In memory this stays "memory"; on disk it must become "wal".
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if conn.path().is_some_and(|p| !p.is_empty()) && !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "ledger: WAL mode not available");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the WAL file from staying huge after a burst.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        // Fewer checkpoints: a page changed by many commits is copied once per checkpoint.
        conn.pragma_update(None, "wal_autocheckpoint", 4000)?;
        // Create what is missing and upgrade an older ledger in one transaction: another
        // process opening the same file waits, then finds it current.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;{SCHEMA}{}{}",
            schema::SQLITE_USAGE,
            schema::SQLITE_HOLDS
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        let upgraded = (|| {
            if parse_version(read_version(&conn)?)? == Schema::V1 {
                migrate_1_to_2(&conn)?;
                tracing::info!("ledger: schema upgraded from version 1 to 2");
            }
            if parse_version(read_version(&conn)?)? == Schema::V2 {
                migrate_2_to_3(&conn)?;
                tracing::info!("ledger: schema upgraded from version 2 to {SCHEMA_VERSION}");
            }
            if parse_version(read_version(&conn)?)? != Schema::Current {
                return Err(LedgerError::Store("ledger schema upgrade failed".into()));
            }
            conn.execute_batch("COMMIT")?;
            Ok::<_, LedgerError>(())
        })();
        if let Err(e) = upgraded {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        let mut store = SqliteStore {
            conn,
            tip: None,
            read_only: false,
            schema: Schema::Current,
            synchronous: std::cell::Cell::new(Synchronous::Full),
            applied: std::cell::Cell::new(Synchronous::Full),
            file: None,
        };
        store.load_tip()?;
        Ok(store)
    }

    /// Durability of each commit (see the module doc). FULL unless changed.
    pub fn set_synchronous(&self, mode: Synchronous) -> Result<(), LedgerError> {
        self.synchronous.set(mode);
        self.apply_synchronous(mode)
    }

    /// Give the connection `mode` unless it has it already.
    fn apply_synchronous(&self, mode: Synchronous) -> Result<(), LedgerError> {
        if self.applied.get() != mode {
            let v = match mode {
                Synchronous::Full => "FULL",
                Synchronous::Normal => "NORMAL",
            };
            self.conn.pragma_update(None, "synchronous", v)?;
            self.applied.set(mode);
        }
        Ok(())
    }

    /// Cap the database at `pages` pages (never below its current size); writes that need
    /// more fail with SQLITE_FULL, as on a full disk. Returns the cap now in force.
    pub fn set_max_page_count(&self, pages: u64) -> Result<u64, LedgerError> {
        let now: i64 =
            self.conn
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(now).unwrap_or(0))
    }

    /// Pages the database has now.
    pub fn page_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The last chain entry, read from the database.
    pub fn head(&self) -> Result<Option<ChainHead>, LedgerError> {
        Ok(read_tip(&self.conn)?.map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash,
        }))
    }

    fn load_tip(&mut self) -> Result<Tip, LedgerError> {
        let tip = read_tip(&self.conn)?.unwrap_or_else(|| Tip {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        });
        self.tip = Some(tip.clone());
        Ok(tip)
    }

    fn current_tip(&mut self) -> Result<Tip, LedgerError> {
        match &self.tip {
            Some(t) => Ok(t.clone()),
            None => self.load_tip(),
        }
    }

    /// `SELECT <every column> FROM records` for this store's schema.
    fn select_record(&self) -> Cow<'static, str> {
        match self.schema {
            Schema::Current => Cow::Borrowed(SELECT_RECORD.as_str()),
            Schema::V1 | Schema::V2 => Cow::Owned(format!(
                "SELECT {} FROM records",
                select_columns("", self.schema)
            )),
        }
    }

    fn writable(&self) -> Result<(), LedgerError> {
        if self.read_only {
            Err(LedgerError::Store(
                "this ledger store was opened read-only".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Run `body` in one IMMEDIATE transaction starting from the current tip; commit and keep
    /// the new tip on success, roll back and forget the tip on failure.
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&Connection, &mut Tip) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.writable()?;
        if let Some(file) = &self.file {
            file.check()?;
        }
        let mut tip = self.current_tip()?;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = body(&tx, &mut tip)?;
            tx.commit()?;
            Ok(out)
        })();
        match result {
            Ok(out) => {
                self.tip = Some(tip);
                Ok(out)
            }
            Err(e) => {
                // The transaction rolled back (dropping it does); the tip we advanced is void.
                self.tip = None;
                Err(e)
            }
        }
    }
}

fn at(path: &Path, e: rusqlite::Error) -> LedgerError {
    match LedgerError::from(e) {
        LedgerError::Unavailable(m) => LedgerError::Unavailable(format!("{}: {m}", path.display())),
        LedgerError::Store(m) => LedgerError::Store(format!("{}: {m}", path.display())),
        other => other,
    }
}

impl LedgerStore for SqliteStore {
    fn recover(&mut self) -> Result<usize, LedgerError> {
        self.apply_synchronous(self.synchronous.get())?;
        self.in_transaction(|tx, tip| {
            let stuck: Vec<Record> = tx
                .prepare(&format!(
                    "{} WHERE outcome = 'forwarding' ORDER BY seq",
                    *SELECT_RECORD
                ))?
                .query_map([], record_from_row)?
                .collect::<Result<_, _>>()?;
            for mut r in stuck.iter().cloned() {
                r.outcome = Outcome::Unknown;
                // The upstream may have answered and charged; the quota kept the reservation.
                r.cost_settled_micros = r.cost_reserved_micros;
                append(tx, tip, EntryKind::Recover, &r)?;
            }
            if !stuck.is_empty() {
                tracing::warn!(
                    records = stuck.len(),
                    "ledger: requests left forwarding by a previous run are now unknown"
                );
            }
            Ok(stuck.len())
        })
    }

    fn entry_hash(&self, seq: u64) -> Result<Option<String>, LedgerError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        Ok(self
            .conn
            .query_row("SELECT hash FROM ledger_chain WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn tip(&self) -> Option<ChainHead> {
        self.tip.as_ref().filter(|t| t.seq > 0).map(|t| ChainHead {
            seq: t.seq as u64,
            hash: t.hash.clone(),
        })
    }

    fn check(&mut self) -> Result<(), LedgerError> {
        self.writable()?;
        match &self.file {
            Some(file) => file.check(),
            None => Ok(()),
        }
    }

    fn try_write(&mut self) -> Result<(), LedgerError> {
        // Rewrites a row as it is: a real page write and commit (fails on a full disk too).
        self.apply_synchronous(self.synchronous.get())?;
        self.in_transaction(|tx, _| {
            tx.execute(
                "UPDATE ledger_meta SET value = value WHERE key = 'schema_version'",
                [],
            )?;
            Ok(())
        })
    }

    fn write_batch(
        &mut self,
        ops: &[LedgerOp],
    ) -> Result<Vec<Result<(), LedgerError>>, LedgerError> {
        Ok(self.write_batch_with(ops, &mut [])?.0)
    }

    fn write_batch_with(
        &mut self,
        ops: &[LedgerOp],
        tasks: &mut [Box<dyn SqliteTask>],
    ) -> Result<BatchResults, LedgerError> {
        if ops.is_empty() && tasks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // A batch of quota changes only commits without its own fsync (as the quota store's
        // connection always did, `synchronous=NORMAL`): the WAL is written in order, so the
        // next FULL commit (the request's `forwarding` or final record) makes it durable too,
        // and a crash in between is what start-up recovery reconciles.
        // Set before each transaction (not restored after one), so that a store call that
        // panicked cannot leave the ledger's records committed without their fsync.
        self.apply_synchronous(if ops.is_empty() {
            Synchronous::Normal
        } else {
            self.synchronous.get()
        })?;
        self.in_transaction(|tx, tip| {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match plan(tx, op)? {
                    Plan::Refuse(why) => results.push(Err(LedgerError::Rejected(why))),
                    Plan::Write(kind, record) => {
                        append(tx, tip, kind, &record)?;
                        if kind != EntryKind::Begin {
                            // The quota was settled and now the record is final: the request's
                            // hold has nothing left to reconcile (see `QuotaStore::settle`).
                            tx.prepare_cached(
                                "DELETE FROM quota_holds WHERE request_id = ?1 AND settled = 1",
                            )?
                            .execute([&record.request_id])?;
                        }
                        results.push(Ok(()));
                    }
                }
            }
            let mut done = Vec::with_capacity(tasks.len());
            for task in tasks.iter_mut() {
                tx.prepare_cached("SAVEPOINT ledger_task")?.execute([])?;
                let result = task.run(tx);
                if result.is_err() {
                    tx.prepare_cached("ROLLBACK TO ledger_task")?.execute([])?;
                }
                tx.prepare_cached("RELEASE ledger_task")?.execute([])?;
                done.push(result);
            }
            Ok((results, done))
        })
    }

    fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        Ok(self
            .conn
            .prepare_cached(&format!("{} WHERE request_id = ?1", self.select_record()))?
            .query_row([request_id], record_from_row)
            .optional()?)
    }

    fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        query::usage(self, q)
    }

    fn export(
        &self,
        q: &UsageQuery,
        out: &mut dyn FnMut(&Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        query::export(self, q, out)
    }

    fn recent(&self, q: &RecentQuery) -> Result<Vec<Record>, LedgerError> {
        query::recent(self, q)
    }

    fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        query::chain_status(self)
    }

    fn verify(&self) -> Result<VerifyReport, LedgerError> {
        verify::verify(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::record::chain_hash;
    use crate::ledger::test_support::{rec, sample};
    use jiff::Timestamp;
    use rusqlite::params;

    fn ok(results: Vec<Result<(), LedgerError>>) {
        for r in results {
            r.unwrap();
        }
    }

    fn begun(id: &str) -> Record {
        Record {
            request_id: id.into(),
            received_at: "2025-01-01T00:00:00Z".parse().unwrap(),
            client: Some("acme".into()),
            cost_reserved_micros: 40_000,
            ..Record::default()
        }
    }

    fn entries(s: &SqliteStore) -> i64 {
        s.conn
            .query_row("SELECT COUNT(*) FROM ledger_chain", [], |r| r.get(0))
            .unwrap()
    }

    /// An attacker (or a careless admin) drops the append-only triggers first.
    fn unprotect(s: &SqliteStore) {
        s.conn
            .execute_batch(
                "DROP TRIGGER ledger_chain_no_update; DROP TRIGGER ledger_chain_no_delete;",
            )
            .unwrap();
    }

    #[test]
    fn one_record_per_op_kind() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        // Begin then Complete: one record, two chain entries.
        let mut r = sample();
        r.outcome = Outcome::Answered; // Begin stores forwarding whatever it says
        ok(s.write_batch(&[LedgerOp::Begin(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(got.outcome, Outcome::Forwarding);
        assert!(got.forwarded);
        ok(s.write_batch(&[LedgerOp::Complete(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(
            got,
            Record {
                forwarded: true,
                ..r.clone()
            }
        );

        // Final: one record, one entry, not forwarded.
        let mut rej = rec(
            "req_rej",
            "2025-01-01T00:00:01Z",
            "acme",
            Some("bob"),
            Outcome::Rejected,
        );
        rej.reason_code = Some("rate_limit_exceeded".into());
        rej.reason_param = Some("user".into());
        rej.status = Some(429);
        rej.forwarded = true; // overwritten by the store
        ok(s.write_batch(&[LedgerOp::Final(rej.clone())]).unwrap());
        assert_eq!(
            s.get("req_rej").unwrap().unwrap(),
            Record {
                forwarded: false,
                ..rej
            }
        );

        // Complete without Begin is kept (nothing lost), as not forwarded.
        let gone = rec(
            "req_gone",
            "2025-01-01T00:00:02Z",
            "acme",
            None,
            Outcome::ClientGone,
        );
        ok(s.write_batch(&[LedgerOp::Complete(gone)]).unwrap());
        assert!(!s.get("req_gone").unwrap().unwrap().forwarded);

        assert_eq!(entries(&s), 4);
        assert_eq!(s.get("nope").unwrap(), None);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!((v.entries, v.records), (4, 3));
        assert_eq!(v.head.unwrap().seq, 4);
    }

    #[test]
    fn refusals_skip_the_op_not_the_batch() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let a = begun("a");
        let results = s
            .write_batch(&[
                LedgerOp::Begin(a.clone()),
                LedgerOp::Begin(a.clone()), // duplicate
                LedgerOp::Final(Record::new("", Timestamp::UNIX_EPOCH)), // invalid
                LedgerOp::Final(Record {
                    outcome: Outcome::Forwarding, // a final cannot be forwarding
                    ..begun("b")
                }),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    ..a.clone()
                }),
                LedgerOp::Complete(Record {
                    outcome: Outcome::UpstreamError,
                    ..a.clone()
                }), // already final
                LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..a.clone()
                }), // already recorded
                LedgerOp::Final(Record {
                    outcome: Outcome::Rejected,
                    ..begun("c")
                }),
            ])
            .unwrap();
        let refused: Vec<bool> = results
            .iter()
            .map(|r| matches!(r, Err(LedgerError::Rejected(_))))
            .collect();
        assert_eq!(refused, [false, true, true, true, false, true, true, false]);
        assert_eq!(s.get("a").unwrap().unwrap().outcome, Outcome::Answered);
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(entries(&s), 3);
        assert!(s.verify().unwrap().is_ok());
    }

    /// A task that writes a hold row, then (if told to) fails.
    struct Hold {
        id: &'static str,
        fail: bool,
        done: std::sync::Arc<std::sync::Mutex<Vec<(String, bool)>>>,
    }

    impl SqliteTask for Hold {
        fn run(&mut self, conn: &Connection) -> Result<(), LedgerError> {
            conn.execute(
                "INSERT INTO quota_holds (request_id, scopes, day, month, reserved_images, reserved_micros, images, micros)
                 VALUES (?1, '[]', 'd', 'm', 1, 1, 1, 1)",
                [self.id],
            )?;
            if self.fail {
                return Err(LedgerError::Store("told to fail".into()));
            }
            Ok(())
        }

        fn done(self: Box<Self>, committed: Result<(), LedgerError>) {
            self.done
                .lock()
                .unwrap()
                .push((self.id.to_owned(), committed.is_ok()));
        }
    }

    /// Tasks share the batch's transaction, each under its own savepoint: a failing task
    /// undoes only its own writes, and neither the records nor the other tasks are lost.
    #[test]
    fn tasks_commit_with_the_records_and_a_failing_task_undoes_only_itself() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = |id, fail| -> Box<dyn SqliteTask> {
            Box::new(Hold {
                id,
                fail,
                done: done.clone(),
            })
        };
        let mut tasks = vec![task("h1", false), task("h2", true), task("h3", false)];
        let (ops, results) = s
            .write_batch_with(&[LedgerOp::Begin(begun("a"))], &mut tasks)
            .unwrap();
        ok(ops);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(LedgerError::Store(_))));
        let holds: Vec<String> = s
            .conn
            .prepare("SELECT request_id FROM quota_holds ORDER BY request_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(holds, ["h1", "h3"], "h2's insert was rolled back");
        assert_eq!(s.get("a").unwrap().unwrap().outcome, Outcome::Forwarding);
        // A batch of tasks alone commits too, without an fsync of its own (NORMAL); the next
        // batch with records commits FULL again.
        let sync = |s: &SqliteStore| -> i64 {
            s.conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        let mut alone = vec![task("h4", false)];
        let (ops, results) = s.write_batch_with(&[], &mut alone).unwrap();
        assert!(ops.is_empty() && results[0].is_ok());
        assert_eq!(sync(&s), 1, "NORMAL for a batch of tasks alone");
        ok(s.write_batch(&[LedgerOp::Begin(begun("b"))]).unwrap());
        assert_eq!(sync(&s), 2, "FULL again for the records");
    }

    #[test]
    fn recovery_turns_forwarding_into_unknown_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.db");
        {
            let mut s = SqliteStore::open(&path).unwrap();
            ok(s.write_batch(&[
                LedgerOp::Begin(begun("a")),
                LedgerOp::Begin(begun("b")),
                LedgerOp::Begin(begun("c")),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    cost_settled_micros: 40_000,
                    images_returned: Some(1),
                    ..begun("b")
                }),
            ])
            .unwrap());
            // "crash": dropped with a and c forwarding.
        }
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.recover().unwrap(), 2);
        for id in ["a", "c"] {
            let r = s.get(id).unwrap().unwrap();
            assert_eq!(r.outcome, Outcome::Unknown);
            assert!(r.forwarded);
            assert_eq!(r.cost_settled_micros, 40_000);
        }
        assert_eq!(s.get("b").unwrap().unwrap().outcome, Outcome::Answered);
        assert_eq!(s.recover().unwrap(), 0);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
        assert_eq!((v.entries, v.records), (6, 3));
        // A late completion of a recovered request is refused: it is final.
        let late = s
            .write_batch(&[LedgerOp::Complete(Record {
                outcome: Outcome::Answered,
                ..begun("a")
            })])
            .unwrap();
        assert!(matches!(late[0], Err(LedgerError::Rejected(_))));
        // And a reader sees it all.
        let reader = SqliteStore::open_reader(&path).unwrap();
        assert_eq!(reader.get("c").unwrap().unwrap().outcome, Outcome::Unknown);
        assert!(reader.verify().unwrap().is_ok());
    }

    fn filled(n: usize) -> SqliteStore {
        let mut s = SqliteStore::open_in_memory().unwrap();
        for i in 0..n {
            let id = format!("r{i}");
            ok(s.write_batch(&[
                LedgerOp::Begin(begun(&id)),
                LedgerOp::Complete(Record {
                    outcome: Outcome::Answered,
                    cost_settled_micros: 40_000,
                    ..begun(&id)
                }),
            ])
            .unwrap());
        }
        s
    }

    #[test]
    fn tampered_entry_json_names_its_seq() {
        let s = filled(5);
        assert!(s.verify().unwrap().is_ok());
        unprotect(&s);
        s.conn
            .execute(
                "UPDATE ledger_chain SET entry_json = replace(entry_json, '40000', '1') WHERE seq = 6",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (6, "r2"));
        assert!(b.reason.contains("hash"), "{}", b.reason);
    }

    #[test]
    fn rehashed_entry_breaks_the_next_link() {
        let s = filled(3);
        unprotect(&s);
        // Forge entry 2 consistently with entry 1: entry 3's prev_hash no longer matches.
        let (prev, json): (String, String) = s
            .conn
            .query_row(
                "SELECT prev_hash, entry_json FROM ledger_chain WHERE seq = 2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let forged = json.replace("\"answered\"", "\"upstream_error\"");
        s.conn
            .execute(
                "UPDATE ledger_chain SET entry_json = ?1, hash = ?2 WHERE seq = 2",
                params![forged, chain_hash(&prev, &forged)],
            )
            .unwrap();
        // ... and the records row to match, so only the link to entry 3 can tell.
        s.conn
            .execute(
                "UPDATE records SET outcome = 'upstream_error' WHERE request_id = 'r0'",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 3);
        assert!(b.reason.contains("prev_hash"), "{}", b.reason);
    }

    #[test]
    fn tampered_records_row_names_the_requests_last_entry() {
        let s = filled(5);
        s.conn
            .execute(
                "UPDATE records SET cost_settled_micros = 0 WHERE request_id = 'r3'",
                [],
            )
            .unwrap();
        s.conn
            .execute(
                "UPDATE records SET images_returned = 9 WHERE request_id = 'r4'",
                [],
            )
            .unwrap();
        let v = s.verify().unwrap();
        let b = v.first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (8, "r3"));
        assert!(b.reason.contains("cost_settled_micros"), "{}", b.reason);
        assert_eq!(v.entries, 10); // the chain itself is intact
    }

    #[test]
    fn deleted_rows_are_found() {
        let s = filled(4);
        unprotect(&s);
        s.conn
            .execute("DELETE FROM ledger_chain WHERE seq = 5", [])
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 5);
        assert!(b.reason.contains("missing"), "{}", b.reason);

        let s = filled(4);
        s.conn
            .execute("DELETE FROM records WHERE request_id = 'r1'", [])
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!((b.seq, b.request_id.as_str()), (3, "r1"));

        // An outcome that is no outcome at all is reported, not an error.
        let s = filled(2);
        s.conn
            .execute(
                "UPDATE records SET outcome = 'paid' WHERE request_id = 'r1'",
                [],
            )
            .unwrap();
        let b = s.verify().unwrap().first_broken.unwrap();
        assert_eq!(b.seq, 4);
        assert!(b.reason.contains("unreadable"), "{}", b.reason);
    }

    #[test]
    fn chain_is_append_only() {
        let s = filled(1);
        let e = s
            .conn
            .execute("UPDATE ledger_chain SET hash = 'x' WHERE seq = 1", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"));
        assert!(s.conn.execute("DELETE FROM ledger_chain", []).is_err());
    }

    #[test]
    fn disk_full_rolls_back_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("l.db")).unwrap();
        ok(s.write_batch(&[LedgerOp::Final(rec(
            "first",
            "2025-01-01T00:00:00Z",
            "acme",
            None,
            Outcome::Rejected,
        ))])
        .unwrap());
        let pages = s.page_count().unwrap();
        assert_eq!(s.set_max_page_count(pages).unwrap(), pages);
        let big = |id: &str| Record {
            prompt: Some("p".repeat(64 * 1024)),
            ..begun(id)
        };
        let batch = [LedgerOp::Begin(begun("small")), LedgerOp::Begin(big("big"))];
        let err = s.write_batch(&batch).unwrap_err();
        assert!(
            matches!(err, LedgerError::Unavailable(ref m) if m.contains("full")),
            "{err:?}"
        );
        // Nothing of the batch stayed, and the chain is intact.
        assert_eq!(s.get("small").unwrap(), None);
        assert_eq!(entries(&s), 1);
        assert!(s.verify().unwrap().is_ok());
        // Space returns: the same batch goes through and links onto the old tip.
        s.set_max_page_count(1 << 30).unwrap();
        ok(s.write_batch(&batch).unwrap());
        assert_eq!(entries(&s), 3);
        let v = s.verify().unwrap();
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn a_second_writer_is_detected_and_the_tip_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let mut one = SqliteStore::open(&path).unwrap();
        let mut two = SqliteStore::open(&path).unwrap();
        ok(one.write_batch(&[LedgerOp::Begin(begun("a"))]).unwrap());
        let err = two.write_batch(&[LedgerOp::Begin(begun("b"))]).unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        ok(two.write_batch(&[LedgerOp::Begin(begun("b"))]).unwrap());
        assert!(one.verify().unwrap().is_ok());
        assert_eq!(one.head().unwrap().unwrap().seq, 2);
    }

    #[test]
    fn reader_is_read_only_and_needs_a_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        assert!(SqliteStore::open_reader(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(SqliteStore::open_reader(&path).is_err());
        drop(SqliteStore::open(&path).unwrap());
        let mut r = SqliteStore::open_reader(&path).unwrap();
        assert!(matches!(
            r.write_batch(&[LedgerOp::Begin(begun("a"))]),
            Err(LedgerError::Store(_))
        ));
        assert!(r.conn.execute("DELETE FROM records", []).is_err());
    }

    #[test]
    fn round_trips_every_field() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let mut r = sample();
        r.outcome = Outcome::UpstreamError;
        r.reason_code = Some("upstream_error".into());
        r.reason_param = Some("image".into());
        r.reason_message = Some("quote \" comma , newline \n tab \t nul \0 é".into());
        r.mask_sha256 = Some("cd".repeat(32));
        r.mask_bytes = Some(i64::MAX as u64);
        r.mask_width = Some(u32::MAX);
        r.mask_height = Some(1);
        r.n = Some(u8::MAX);
        r.cost_reserved_micros = i64::MIN;
        r.cost_settled_micros = i64::MAX;
        r.received_at = "2025-03-04T05:06:07.123456789Z".parse().unwrap();
        ok(s.write_batch(&[LedgerOp::Final(r.clone())]).unwrap());
        let got = s.get(&r.request_id).unwrap().unwrap();
        assert_eq!(got, r.normalized());
        assert!(s.verify().unwrap().is_ok());
    }
}
