//! [`LedgerReader`]: the ledger's queries for the admin listener and the CLI, off the async
//! runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::ledger::LedgerError;
use crate::ledger::record::Record;
use crate::ledger::report::{ExportFormat, write_export};
use crate::ledger::sqlite::SqliteStore;
use crate::ledger::store::{
    ChainStatus, LedgerStore, RecentQuery, UsageQuery, UsageRow, VerifyReport,
};

/// Queries for the admin listener and the CLI, run on tokio's blocking pool over a store of
/// their own (normally [`SqliteStore::open_reader`]: WAL lets it read while the writer
/// writes). Cloneable; clones share the store, one query at a time.
#[derive(Clone)]
pub struct LedgerReader {
    store: Arc<Mutex<Box<dyn LedgerStore>>>,
}

impl std::fmt::Debug for LedgerReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerReader")
    }
}

impl LedgerReader {
    pub fn new(store: Box<dyn LedgerStore>) -> LedgerReader {
        LedgerReader {
            store: Arc::new(Mutex::new(store)),
        }
    }

    /// A reader over the SQLite ledger at `path` (which must exist). Blocking.
    pub fn open_sqlite(path: &Path) -> Result<LedgerReader, LedgerError> {
        Ok(LedgerReader::new(Box::new(SqliteStore::open_reader(path)?)))
    }

    /// A reader over the ledger a configuration names (SQLite: the file must exist;
    /// PostgreSQL: connects on first query).
    pub fn open(config: &crate::config::LedgerConfig) -> Result<LedgerReader, LedgerError> {
        Ok(LedgerReader::new(crate::ledger::open_reader(config)?))
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn LedgerStore) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(lock(&store).as_ref()))
            .await
            .unwrap_or_else(|e| Err(LedgerError::Store(format!("ledger query failed: {e}"))))
    }

    pub async fn get(&self, request_id: String) -> Result<Option<Record>, LedgerError> {
        self.with(move |s| s.get(&request_id)).await
    }

    pub async fn usage(&self, q: UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        self.with(move |s| s.usage(&q)).await
    }

    /// The export in memory: set `q.limit` for anything reachable over HTTP.
    pub async fn export(
        &self,
        q: UsageQuery,
        format: ExportFormat,
    ) -> Result<Vec<u8>, LedgerError> {
        self.with(move |s| {
            let mut out = Vec::new();
            write_export(s, &q, format, &mut out)?;
            Ok(out)
        })
        .await
    }

    pub async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        self.with(|s| s.verify()).await
    }

    pub async fn recent(&self, q: RecentQuery) -> Result<Vec<Record>, LedgerError> {
        self.with(move |s| s.recent(&q)).await
    }

    pub async fn chain_status(&self) -> Result<ChainStatus, LedgerError> {
        self.with(|s| s.chain_status()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use crate::ledger::record::Outcome;
    use crate::ledger::store::LedgerOp;
    use crate::ledger::test_support::rec;

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

    #[tokio::test]
    async fn reader_answers_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let (ledger, _) = Ledger::open_sqlite(&path, 16).unwrap();
        ledger.finish(rejected("x")).await.unwrap();
        let reader = LedgerReader::open_sqlite(&path).unwrap();
        assert_eq!(
            reader.get("x".into()).await.unwrap().unwrap().outcome,
            Outcome::Rejected
        );
        let rows = reader.usage(UsageQuery::default()).await.unwrap();
        assert_eq!(rows[0].rejections["rate_limit_exceeded"], 1);
        let jsonl = reader
            .export(UsageQuery::default(), ExportFormat::Jsonl)
            .await
            .unwrap();
        assert_eq!(jsonl.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(reader.verify().await.unwrap().is_ok());
        ledger.close().await.unwrap();
    }
}
