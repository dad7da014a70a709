//! The service's sled database: its own state, the event ids it processed, and its
//! partition offsets, all written in one atomic, flushed batch.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Key prefixes: one tree, so one batch covers all three.
const STATE: u8 = b's';
const PROCESSED: u8 = b'i';
const OFFSET: u8 = b'o';

/// A failed read or write of the state store.
#[derive(Debug, thiserror::Error)]
#[error("state store failed")]
pub struct StoreError(#[from] sled::Error);

/// A state key and its value.
pub type StateEntry = (Vec<u8>, Vec<u8>);

/// The service's durable state.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![prefix, 0];
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    key(OFFSET, &[topic.as_bytes(), &partition.to_be_bytes()])
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: sled::open(dir)?,
        })
    }

    /// The next offset to read from `topic`/`partition`, if this service stored one.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(offset_key(topic, partition))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    /// Whether the event with this id was processed (within the retention window).
    pub fn is_processed(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .contains_key(key(PROCESSED, &[event_id.as_bytes()]))?)
    }

    /// A state value of the service.
    pub fn get(&self, state_key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key(STATE, &[state_key]))?.map(|v| v.to_vec()))
    }

    /// Applies `changes`, marks `event_ids` processed and moves each partition's
    /// offset to the next one to read (`offsets` maps topic/partition to it),
    /// atomically, and flushes to disk.
    pub fn commit(
        &self,
        changes: &StateChanges,
        event_ids: &[String],
        offsets: &HashMap<(String, i32), i64>,
    ) -> Result<(), StoreError> {
        let mut batch = changes.to_batch();
        let now = now_ms().to_be_bytes();
        for id in event_ids {
            batch.insert(key(PROCESSED, &[id.as_bytes()]), &now);
        }
        for ((topic, partition), next) in offsets {
            batch.insert(offset_key(topic, *partition), &next.to_be_bytes());
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Applies state `changes` alone, atomically and durably.
    pub fn apply(&self, changes: StateChanges) -> Result<(), StoreError> {
        self.db.apply_batch(changes.to_batch())?;
        self.db.flush()?;
        Ok(())
    }

    /// Applies state `changes` atomically, durable with the next flush (for changes
    /// a crash may lose without harm, like clearing confirmed work).
    pub fn apply_lazily(&self, changes: StateChanges) -> Result<(), StoreError> {
        self.db.apply_batch(changes.to_batch())?;
        Ok(())
    }

    /// State entries whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &[u8]) -> Result<Vec<StateEntry>, StoreError> {
        self.db
            .scan_prefix(key(STATE, &[prefix]))
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k[2..].to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Forgets processed ids older than `retention`; returns how many.
    pub fn prune_processed(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut batch = sled::Batch::default();
        let mut pruned = 0;
        for entry in self.db.scan_prefix([PROCESSED, 0]) {
            let (k, v) = entry?;
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at <= cutoff {
                batch.remove(k);
                pruned += 1;
            }
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(pruned)
    }
}

/// State writes, applied together with offsets and ids or not at all.
#[derive(Debug, Default)]
pub struct StateChanges {
    writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl StateChanges {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), Some(value.into()));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.insert(key.into(), None);
    }

    /// The value `key` will have after these changes, if they touch it.
    pub fn pending(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes.get(key).map(Option::as_deref)
    }

    /// Adds `later` on top of these changes.
    pub fn extend(&mut self, later: StateChanges) {
        self.writes.extend(later.writes);
    }

    fn to_batch(&self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (state_key, value) in &self.writes {
            match value {
                Some(value) => batch.insert(key(STATE, &[state_key]), value.as_slice()),
                None => batch.remove(key(STATE, &[state_key])),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_writes_state_id_and_offset_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.offset("t", 0).expect("read"), None);
        let mut changes = StateChanges::default();
        changes.put(b"count".to_vec(), b"1".to_vec());
        let offsets = HashMap::from([(("t".to_owned(), 0), 42)]);
        store
            .commit(&changes, &["pg:a:0/1:1".to_owned()], &offsets)
            .expect("commit");
        assert_eq!(store.offset("t", 0).expect("read"), Some(42));
        assert!(store.is_processed("pg:a:0/1:1").expect("read"));
        assert_eq!(store.get(b"count").expect("read"), Some(b"1".to_vec()));
        assert_eq!(
            store
                .prune_processed(Duration::from_secs(3600))
                .expect("prune"),
            0
        );
        assert_eq!(store.prune_processed(Duration::ZERO).expect("prune"), 1);
        assert!(!store.is_processed("pg:a:0/1:1").expect("read"));
    }

    #[test]
    fn scan_returns_state_under_a_prefix_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut changes = StateChanges::default();
        changes.put(b"outbox/1".to_vec(), b"a".to_vec());
        changes.put(b"outbox/2".to_vec(), b"b".to_vec());
        changes.put(b"other".to_vec(), b"c".to_vec());
        store.apply(changes).expect("apply");
        let found = store.scan(b"outbox/").expect("scan");
        assert_eq!(
            found,
            vec![
                (b"outbox/1".to_vec(), b"a".to_vec()),
                (b"outbox/2".to_vec(), b"b".to_vec())
            ]
        );
    }
}
