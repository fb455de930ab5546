//! The identity of the ledger file, checked before each write.

use std::path::Path;

use crate::ledger::LedgerError;

/// The identity of the ledger file as opened.
#[derive(Debug, Clone)]
pub(super) struct FileId {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(super) fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// `Err` when the file at the path is gone, is another file, or is read-only.
    pub(super) fn check(&self) -> Result<(), LedgerError> {
        use std::os::unix::fs::MetadataExt;
        let shown = self.path.display();
        let m = std::fs::metadata(&self.path).map_err(|e| {
            LedgerError::Unavailable(format!("{shown}: the ledger file is gone ({e})"))
        })?;
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Err(LedgerError::Unavailable(format!(
                "{shown}: the ledger file was replaced by another file; restart the gateway to use it"
            )));
        }
        if m.permissions().readonly() {
            return Err(LedgerError::Unavailable(format!(
                "{shown}: the ledger file is read-only"
            )));
        }
        Ok(())
    }
}
