//! The service's sled database: its own state, the event ids it processed (one
//! segment per batch, see [`super::ids`]), its partition offsets and the outbox
//! of effects (see [`super::outbox`]), all written in one atomic, flushed batch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::digest::{digest, IdDigest, Segment};
use super::outbox::{decode_entry, encode_entry, Pending};

/// Key prefixes: one tree, so one batch covers them all.
const STATE: u8 = b's';
/// A processed id per key, as written by earlier versions (migrated at load).
const SINGLE_ID: u8 = b'i';
/// A batch's processed ids: the key ends with the segment's sequence.
const SEGMENT: u8 = b'p';
const OFFSET: u8 = b'o';
/// An outbox entry (a batch's effects): the key ends with its first sequence.
const OUTBOX: u8 = b'e';
/// The runtime's own values (the instance id).
const META: u8 = b'm';

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
    dir: Arc<Path>,
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

fn segment_key(sequence: u64) -> Vec<u8> {
    key(SEGMENT, &[&sequence.to_be_bytes()])
}

fn outbox_key(sequence: u64) -> Vec<u8> {
    key(OUTBOX, &[&sequence.to_be_bytes()])
}

/// Milliseconds since the epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `dir` (waiting briefly for sled's lock,
    /// see [`changewire_schemas::storage::open_sled`]).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            db: changewire_schemas::storage::open_sled(dir)?,
            dir: Arc::from(dir),
        })
    }

    /// The directory the store is in (a service may keep files of its own
    /// beside sled's there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next offset to read from `topic`/`partition`, if this service stored one.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(offset_key(topic, partition))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    /// A state value of the service.
    pub fn get(&self, state_key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key(STATE, &[state_key]))?.map(|v| v.to_vec()))
    }

    /// Applies `changes` (in order: later ones win), stores the batch's
    /// `processed` ids and `effects`, and moves each partition's offset to the
    /// next one to read (`offsets` maps topic/partition to it), atomically, and
    /// flushes to disk.
    pub(super) fn commit(
        &self,
        changes: &[&StateChanges],
        processed: &Segment,
        offsets: &HashMap<(String, i32), i64>,
        effects: &[Arc<Pending>],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for changes in changes {
            changes.add_to(&mut batch);
        }
        if let Some(first) = effects.first() {
            batch.insert(outbox_key(first.entry), encode_entry(effects));
        }
        if !processed.digests.is_empty() {
            batch.insert(
                segment_key(processed.sequence),
                encode_segment(processed.at_ms, &processed.digests),
            );
        }
        for ((topic, partition), next) in offsets {
            batch.insert(offset_key(topic, *partition), &next.to_be_bytes());
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Applies state `changes` atomically, durable with the next flush (for changes
    /// a crash may lose without harm, like a sink's written marks).
    pub fn apply_lazily(&self, changes: StateChanges) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        changes.add_to(&mut batch);
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Every effect in the outbox, oldest first; `Err` carries the keys of
    /// entries that cannot be decoded (a corrupted store).
    pub(super) fn outbox(&self) -> Result<Result<Vec<Pending>, Vec<u64>>, StoreError> {
        let (mut effects, mut corrupt) = (Vec::new(), Vec::new());
        for entry in self.db.scan_prefix([OUTBOX, 0]) {
            let (k, v) = entry?;
            let first = k[2..]
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            match decode_entry(first, &v) {
                Some(pendings) => effects.extend(pendings),
                None => corrupt.push(first),
            }
        }
        Ok(if corrupt.is_empty() {
            Ok(effects)
        } else {
            Err(corrupt)
        })
    }

    /// Removes outbox entries whose effects were all delivered, durable with
    /// the next flush (a crash brings them back, in doubt, and their sinks drop
    /// what landed).
    pub(super) fn remove_outbox(&self, entries: &[u64]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.remove(outbox_key(*entry));
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Stores an effect as an entry of its own, durably (a dead letter).
    pub(super) fn add_outbox(&self, effect: &Arc<Pending>) -> Result<(), StoreError> {
        let entry = encode_entry(std::slice::from_ref(effect));
        self.db.insert(outbox_key(effect.entry), entry)?;
        self.db.flush()?;
        Ok(())
    }

    /// This store's instance id, made up and stored at first use: it tells this
    /// instance's offset commits in Kafka from other instances'.
    pub(super) fn instance_id(&self) -> Result<String, StoreError> {
        let id_key = key(META, &[b"instance"]);
        if let Some(id) = self.db.get(&id_key)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = format!("{:016x}", fastrand::u64(..));
        self.db.insert(&id_key, id.as_bytes())?;
        self.db.flush()?;
        Ok(id)
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

    /// State entries with keys in `start..end`, in key order or (`reverse`) the
    /// other way, read lazily (a query stops when its page is full).
    pub fn range(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
    ) -> Box<dyn Iterator<Item = Result<StateEntry, StoreError>> + '_> {
        let entries = self
            .db
            .range(key(STATE, &[start])..key(STATE, &[end]))
            .map(|entry| {
                let (k, v) = entry?;
                Ok((k[2..].to_vec(), v.to_vec()))
            });
        if reverse {
            Box::new(entries.rev())
        } else {
            Box::new(entries)
        }
    }

    /// Writes one state entry outside any batch, flushed. Only for tools that
    /// repair or (in tests) tamper with a stopped service's store.
    pub fn put_state(&self, state_key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(value) => self.db.insert(key(STATE, &[state_key]), value)?,
            None => self.db.remove(key(STATE, &[state_key]))?,
        };
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// The stored segments of processed ids, oldest first.
    pub(super) fn segments(&self) -> impl Iterator<Item = Result<Segment, StoreError>> + '_ {
        self.db.scan_prefix([SEGMENT, 0]).map(|entry| {
            let (k, v) = entry?;
            let sequence = k[2..].try_into().map(u64::from_be_bytes).unwrap_or(0);
            let (at_ms, digests) = decode_segment(&v);
            Ok(Segment {
                sequence,
                at_ms,
                digests,
            })
        })
    }

    /// The digests of one stored segment (none if it is gone).
    pub(super) fn segment(&self, sequence: u64) -> Result<Vec<IdDigest>, StoreError> {
        Ok(self
            .db
            .get(segment_key(sequence))?
            .map(|v| decode_segment(&v).1)
            .unwrap_or_default())
    }

    /// Removes segments, durable with the next flush (a crash brings them back
    /// until the next start expires them again).
    pub(super) fn remove_segments(&self, sequences: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for sequence in sequences {
            batch.remove(segment_key(*sequence));
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Replaces the ids earlier versions stored one key each by one segment of
    /// those written after `cutoff` (dated by the newest), atomically.
    pub(super) fn migrate_single_ids(&self, cutoff: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let (mut digests, mut newest, mut found) = (Vec::new(), 0, 0);
        for entry in self.db.scan_prefix([SINGLE_ID, 0]) {
            let (k, v) = entry?;
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at > cutoff {
                digests.push(digest(&String::from_utf8_lossy(&k[2..])));
                newest = newest.max(at);
            }
            batch.remove(k);
            found += 1;
        }
        if found == 0 {
            return Ok(());
        }
        if !digests.is_empty() {
            let sequence = match self.db.scan_prefix([SEGMENT, 0]).next_back() {
                Some(last) => u64::from_be_bytes(last?.0[2..].try_into().unwrap_or([0; 8])) + 1,
                None => 0,
            };
            batch.insert(segment_key(sequence), encode_segment(newest, &digests));
        }
        tracing::info!(
            found,
            kept = digests.len(),
            "moved processed ids stored one key each into a segment"
        );
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn put_single_id_for_test(&self, id: &str, at_ms: u64) -> Result<(), StoreError> {
        self.db
            .insert(key(SINGLE_ID, &[id.as_bytes()]), &at_ms.to_be_bytes())?;
        Ok(())
    }
}

/// A segment's value: its time, then each digest, big-endian.
fn encode_segment(at_ms: u64, digests: &[IdDigest]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + 16 * digests.len());
    value.extend_from_slice(&at_ms.to_be_bytes());
    for digest in digests {
        value.extend_from_slice(&digest.to_be_bytes());
    }
    value
}

fn decode_segment(value: &[u8]) -> (u64, Vec<IdDigest>) {
    let at_ms = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let digests = value
        .get(8..)
        .unwrap_or_default()
        .chunks_exact(16)
        .map(|c| u128::from_be_bytes(c.try_into().unwrap_or([0; 16])))
        .collect();
    (at_ms, digests)
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

    /// Whether there are no changes.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Adds `later` on top of these changes.
    pub fn extend(&mut self, later: StateChanges) {
        self.writes.extend(later.writes);
    }

    fn add_to(&self, batch: &mut sled::Batch) {
        for (state_key, value) in &self.writes {
            match value {
                Some(value) => batch.insert(key(STATE, &[state_key]), value.as_slice()),
                None => batch.remove(key(STATE, &[state_key])),
            }
        }
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
        let processed = Segment {
            sequence: 7,
            at_ms: 1_763_769_600_000,
            digests: vec![digest("pg:a:0/1:1"), 1],
        };
        store
            .commit(&[&changes], &processed, &offsets, &[])
            .expect("commit");
        assert_eq!(store.offset("t", 0).expect("read"), Some(42));
        assert_eq!(store.get(b"count").expect("read"), Some(b"1".to_vec()));
        let stored: Vec<Segment> = store.segments().collect::<Result<_, _>>().expect("scan");
        assert_eq!(stored, vec![processed.clone()]);
        assert_eq!(store.segment(7).expect("read"), processed.digests);
        store.remove_segments(&[7]).expect("remove");
        assert_eq!(store.segments().count(), 0);
    }

    #[test]
    fn scan_returns_state_under_a_prefix_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut changes = StateChanges::default();
        changes.put(b"outbox/1".to_vec(), b"a".to_vec());
        changes.put(b"outbox/2".to_vec(), b"b".to_vec());
        changes.put(b"other".to_vec(), b"c".to_vec());
        store.apply_lazily(changes).expect("apply");
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
