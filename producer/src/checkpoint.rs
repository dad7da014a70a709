//! The checkpoint seam: where sources keep what they have durably published.

use std::path::Path;

/// A failed checkpoint read or write.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint store failed")]
pub struct CheckpointError(#[from] sled::Error);

/// Durable key-value checkpoints. `put` returns only once the value is on disk.
pub trait CheckpointStore: Send + Sync {
    /// The value stored under `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CheckpointError>;
    /// Stores `value` under `key` durably.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), CheckpointError>;
    /// Removes `key` durably.
    fn remove(&self, key: &str) -> Result<(), CheckpointError>;
}

/// Checkpoints in a sled database.
pub struct SledCheckpoints {
    db: sled::Db,
}

impl SledCheckpoints {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        Ok(Self {
            db: changewire_schemas::storage::open_sled(dir)?,
        })
    }

    /// The database, for stores of other shapes (Kubernetes object state).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

impl CheckpointStore for SledCheckpoints {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CheckpointError> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), CheckpointError> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), CheckpointError> {
        self.db.remove(key)?;
        self.db.flush()?;
        Ok(())
    }
}
