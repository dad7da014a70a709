//! The event ids a service processed within its retention window.
//!
//! Looked up in memory, persisted in sled as one entry per committed batch (a
//! *segment*: the batch's time and its ids' digests), written in the batch's one
//! atomic write. One sled key per batch instead of one per id is what keeps the
//! write cheap; the set in memory is what keeps the lookup cheap. The cost is
//! memory: about 20 to 40 bytes per id in the window.
//!
//! Ids are kept as the first 128 bits of their SHA-256: two distinct ids share a
//! digest with a probability of about n²/2¹²⁹ (10⁻²¹ for a billion ids), far below
//! the chance of a disk corrupting a byte, and nobody can choose ids that collide.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::digest::{IdDigest, Segment};
use super::store::{now_ms, Store, StoreError};

/// Processed ids: every digest in memory, and where each segment is.
pub struct ProcessedIds {
    digests: HashSet<IdDigest, DigestHasher>,
    /// Sequence and time of each stored segment, oldest first.
    segments: VecDeque<(u64, u64)>,
    next_sequence: u64,
    retention: Duration,
    /// Most ids held; beyond it the oldest segments go before their time.
    max_ids: usize,
    /// When a segment last went early (warned about at most every few minutes).
    warned: Option<Instant>,
}

/// How often forgetting ids before their retention ends is logged.
const WARN_EVERY: Duration = Duration::from_secs(600);

impl ProcessedIds {
    /// Loads the segments written within `retention`, removing older ones (and
    /// turning ids stored one key each, by earlier versions, into a segment).
    pub fn load(store: &Store, retention: Duration, max_ids: usize) -> Result<Self, StoreError> {
        let started = Instant::now();
        let cutoff = cutoff(retention);
        store.migrate_single_ids(cutoff)?;
        let mut ids = Self {
            digests: HashSet::default(),
            segments: VecDeque::new(),
            next_sequence: 0,
            retention,
            max_ids,
            warned: None,
        };
        let mut expired = Vec::new();
        for segment in store.segments() {
            let segment = segment?;
            ids.next_sequence = segment.sequence + 1;
            if segment.at_ms <= cutoff {
                expired.push(segment.sequence);
                continue;
            }
            ids.segments.push_back((segment.sequence, segment.at_ms));
            ids.digests.extend(segment.digests);
        }
        store.remove_segments(&expired)?;
        tracing::info!(
            ids = ids.digests.len(),
            segments = ids.segments.len(),
            expired = expired.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "loaded the processed ids of the retention window"
        );
        Ok(ids)
    }

    /// Whether `digest` was processed (or is in a batch being committed).
    pub fn contains(&self, digest: IdDigest) -> bool {
        self.digests.contains(&digest)
    }

    /// Marks `digest` processed from now on; it must reach the store in the
    /// segment of its batch ([`ProcessedIds::segment`]).
    pub fn insert(&mut self, digest: IdDigest) {
        self.digests.insert(digest);
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// The segment that stores a batch's `digests` (already inserted).
    pub fn segment(&mut self, digests: Vec<IdDigest>) -> Segment {
        let segment = Segment {
            sequence: self.next_sequence,
            at_ms: now_ms(),
            digests,
        };
        self.next_sequence += 1;
        self.segments.push_back((segment.sequence, segment.at_ms));
        segment
    }

    /// Forgets segments older than the retention window, and the oldest ones while
    /// more than the most ids allowed are held, in memory and in the store
    /// (lazily: one a crash brings back is removed at the next start). The newest
    /// segment stays: its write may be under way. Returns how many ids were
    /// forgotten.
    pub fn expire(&mut self, store: &Store) -> Result<usize, StoreError> {
        let cutoff = cutoff(self.retention);
        let mut forgotten = 0;
        while let Some(&(sequence, at_ms)) = self.segments.front() {
            let over = self.digests.len() > self.max_ids;
            if self.segments.len() < 2 || (at_ms > cutoff && !over) {
                break;
            }
            if at_ms > cutoff {
                self.warn_early(at_ms);
            }
            for digest in store.segment(sequence)? {
                forgotten += usize::from(self.digests.remove(&digest));
            }
            store.remove_segments(&[sequence])?;
            self.segments.pop_front();
        }
        Ok(forgotten)
    }

    fn warn_early(&mut self, at_ms: u64) {
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        self.warned = Some(Instant::now());
        let window = Duration::from_millis(now_ms().saturating_sub(at_ms));
        tracing::warn!(
            max_processed_ids = self.max_ids,
            window_secs = window.as_secs(),
            "forgetting processed ids before their retention ends: duplicates older than \
             the window are not recognised; raise service.max_processed_ids (memory) or \
             lower service.retention_days"
        );
    }
}

fn cutoff(retention: Duration) -> u64 {
    now_ms().saturating_sub(retention.as_millis() as u64)
}

/// Digests are uniformly distributed already: their low 64 bits are the hash.
#[derive(Default, Clone, Copy)]
struct DigestHasher;

impl BuildHasher for DigestHasher {
    type Hasher = LowBits;

    fn build_hasher(&self) -> LowBits {
        LowBits(0)
    }
}

struct LowBits(u64);

impl Hasher for LowBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, digest: u128) {
        self.0 = digest as u64;
    }

    /// Only `u128`s are hashed here; any other input still hashes (FNV-1a).
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::digest::digest;
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        (dir, store)
    }

    /// Inserts and commits one segment per id; returns their digests.
    fn commit_each(store: &Store, ids: &mut ProcessedIds, names: &[&str]) -> Vec<IdDigest> {
        names
            .iter()
            .map(|name| {
                let id = digest(name);
                ids.insert(id);
                let segment = ids.segment(vec![id]);
                store
                    .commit(&[], &segment, &Default::default(), &[])
                    .expect("commit");
                id
            })
            .collect()
    }

    #[test]
    fn ids_survive_a_reload_until_they_expire() {
        let (_dir, store) = store();
        let week = Duration::from_secs(7 * 86_400);
        let mut ids = ProcessedIds::load(&store, week, 1000).expect("load");
        let stored = commit_each(&store, &mut ids, &["pg:a:0/1:1", "pg:a:0/2:1"]);
        let other = digest("pg:a:0/3:1");
        assert!(ids.contains(stored[0]) && ids.contains(stored[1]) && !ids.contains(other));

        let mut reloaded = ProcessedIds::load(&store, week, 1000).expect("reload");
        assert!(reloaded.contains(stored[0]) && reloaded.contains(stored[1]));
        assert!(!reloaded.contains(other));
        assert_eq!(reloaded.segment(vec![]).sequence, 2, "sequences go on");

        let mut expiring = ProcessedIds::load(&store, week, 1000).expect("reload");
        expiring.retention = Duration::ZERO;
        assert_eq!(expiring.expire(&store).expect("expire"), 1);
        assert!(!expiring.contains(stored[0]));
        assert!(
            expiring.contains(stored[1]),
            "the newest segment may be in writing"
        );
        let after = ProcessedIds::load(&store, week, 1000).expect("reload");
        assert_eq!(after.len(), 1, "the expired segment left the store");
    }

    #[test]
    fn beyond_the_most_ids_the_oldest_segments_go_early() {
        let (_dir, store) = store();
        let week = Duration::from_secs(7 * 86_400);
        let mut ids = ProcessedIds::load(&store, week, 2).expect("load");
        let stored = commit_each(&store, &mut ids, &["a", "b", "c", "d"]);
        assert_eq!(ids.expire(&store).expect("expire"), 2);
        assert_eq!(ids.len(), 2);
        assert!(!ids.contains(stored[1]) && ids.contains(stored[2]) && ids.contains(stored[3]));
        assert_eq!(store.segments().count(), 2);
    }

    #[test]
    fn expired_segments_are_dropped_at_load() {
        let (_dir, store) = store();
        let mut ids = ProcessedIds::load(&store, Duration::ZERO, 1000).expect("load");
        let segment = ids.segment(vec![digest("x")]);
        store
            .commit(&[], &segment, &Default::default(), &[])
            .expect("commit");
        assert_eq!(
            ProcessedIds::load(&store, Duration::ZERO, 1000)
                .expect("load")
                .len(),
            0
        );
        assert_eq!(store.segments().count(), 0);
    }

    #[test]
    fn ids_stored_one_key_each_become_a_segment() {
        let (_dir, store) = store();
        store
            .put_single_id_for_test("pg:old:0/1:1", now_ms())
            .expect("put");
        store
            .put_single_id_for_test("pg:old:0/2:1", 1)
            .expect("put");
        let ids = ProcessedIds::load(&store, Duration::from_secs(3600), 1000).expect("load");
        assert!(ids.contains(digest("pg:old:0/1:1")));
        assert!(!ids.contains(digest("pg:old:0/2:1")), "expired");
        assert_eq!(store.segments().count(), 1);
        assert!(
            ProcessedIds::load(&store, Duration::from_secs(3600), 1000)
                .expect("reload")
                .contains(digest("pg:old:0/1:1")),
            "migrated once, kept"
        );
    }
}
