//! The service's sled database: its own state, the event ids it processed, and its
//! partition offsets, all written in one atomic, flushed batch.

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

    /// Applies `changes`, marks `event_id` processed (if any) and moves the offset of
    /// `topic`/`partition` past `offset`, atomically, and flushes to disk.
    pub fn commit(
        &self,
        changes: StateChanges,
        event_id: Option<&str>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (state_key, value) in changes.writes {
            match value {
                Some(value) => batch.insert(key(STATE, &[&state_key]), value),
                None => batch.remove(key(STATE, &[&state_key])),
            }
        }
        if let Some(id) = event_id {
            batch.insert(key(PROCESSED, &[id.as_bytes()]), &now_ms().to_be_bytes());
        }
        batch.insert(offset_key(topic, partition), &(offset + 1).to_be_bytes());
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
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

/// State writes a handler makes for one event; applied with the offset or not at all.
#[derive(Debug, Default)]
pub struct StateChanges {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl StateChanges {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), None));
    }

    /// The value `key` will have after these changes, if they touch it.
    pub fn pending(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
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
        store
            .commit(changes, Some("pg:a:0/1:1"), "t", 0, 41)
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
}
