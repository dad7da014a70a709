//! What to do when a partition's records skip past the next offset expected.
//!
//! A hole inside a read (the record before it was read too) is the topic's own:
//! compaction, transaction markers. But when the *first* record read since the
//! partition was positioned (assigned, or sought) lands past where reading should
//! start, the broker started too late: tansu 0.6 answers a fetch from inside a
//! record batch with the next batch, skipping the rest of that batch. Then the
//! partition is sought back, further each time (10,000 offsets, doubling), until
//! a read starts at or before the expected offset; the records below it are
//! skipped unapplied as with `service.resume_rewind`. Only when even a read from
//! offset 0 starts past it (the records are gone: retention) is the hole
//! accepted, logged and counted.
//!
//! A read resumed inside a topic's *last* batch gets nothing from tansu at all
//! until a newer record arrives. So a partition that has read nothing since it
//! was positioned while the broker reports records past its offset (lag) is
//! sought back the same way after [`STALL_ROUNDS`] looks.

use std::collections::{HashMap, HashSet};

use super::types::PartitionKey;

/// How far back the first seek goes: above a producer's batch (librdkafka's
/// `batch.num.messages` is 10,000).
pub(super) const FIRST_REWIND: i64 = 10_000;

/// Looks (one per housekeeping round) at a partition that reads nothing while
/// it lags before it is sought back.
pub(super) const STALL_ROUNDS: u32 = 4;

/// What becomes of a record, given the next offset its partition expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Apply it.
    Apply,
    /// Apply it: the offsets before it are a hole in the topic, not a late start.
    ApplyPastHole,
    /// Skip it unapplied (already applied, or read before a seek takes effect).
    Skip,
    /// Skip it and seek the partition back to this offset.
    SeekTo(i64),
}

/// Per partition: whether a record was read since it was positioned, and how
/// far back the last seek went.
#[derive(Debug, Default)]
pub(super) struct Gaps {
    read: HashSet<PartitionKey>,
    last_seek: HashMap<PartitionKey, i64>,
    seeking: HashSet<PartitionKey>,
    /// Looks at partitions lagging with nothing read.
    quiet: HashMap<PartitionKey, u32>,
}

impl Gaps {
    /// Every partition was (or may have been) positioned anew: its next record
    /// is the first of a read.
    pub(super) fn repositioned(&mut self) {
        self.read.clear();
        self.quiet.clear();
    }

    /// A look at a partition that lags (the broker has records from `next`
    /// on) and is not paused: after [`STALL_ROUNDS`] looks with nothing read
    /// since it was positioned, the offset to seek back to (none once a seek
    /// to offset 0 read nothing either: there is no further back).
    pub(super) fn stalled(&mut self, key: &PartitionKey, next: i64) -> Option<i64> {
        let at_start = self.last_seek.get(key) == Some(&0);
        if self.read.contains(key) || self.seeking.contains(key) || at_start {
            self.quiet.remove(key);
            return None;
        }
        let looks = self.quiet.entry(key.clone()).or_default();
        *looks += 1;
        if *looks < STALL_ROUNDS {
            return None;
        }
        self.quiet.remove(key);
        Some(self.seek_back(key, next))
    }

    /// The verdict on a record at `offset` of `key`, whose next expected offset
    /// is `next`.
    pub(super) fn check(&mut self, key: &PartitionKey, next: i64, offset: i64) -> Verdict {
        if self.seeking.contains(key) {
            return Verdict::Skip;
        }
        if offset <= next {
            if !self.read.contains(key) {
                self.read.insert(key.clone());
                self.last_seek.remove(key);
            }
            return if offset == next {
                Verdict::Apply
            } else {
                Verdict::Skip
            };
        }
        if self.read.contains(key) {
            return Verdict::ApplyPastHole;
        }
        if self.last_seek.get(key) == Some(&0) {
            self.read.insert(key.clone());
            self.last_seek.remove(key);
            return Verdict::ApplyPastHole;
        }
        Verdict::SeekTo(self.seek_back(key, next))
    }

    /// Decides a seek of `key` back from `next`: further than the last one.
    fn seek_back(&mut self, key: &PartitionKey, next: i64) -> i64 {
        let target = match self.last_seek.get(key) {
            Some(&last) => next - 2 * (next - last),
            None => next - FIRST_REWIND,
        }
        .max(0);
        self.last_seek.insert(key.clone(), target);
        self.seeking.insert(key.clone());
        target
    }

    /// A seek could not be made: it is asked for again, the partition's records
    /// skipped meanwhile.
    pub(super) fn seek_failed(&mut self, key: PartitionKey) {
        self.seeking.insert(key);
    }

    /// The seeks decided since the last call, now being made: each partition's
    /// next record is the first of a new read.
    pub(super) fn take_seeks(&mut self) -> Vec<(PartitionKey, i64)> {
        let seeks = self
            .seeking
            .drain()
            .map(|key| {
                let target = self.last_seek[&key];
                (key, target)
            })
            .collect();
        seeks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PartitionKey {
        ("t".into(), 0)
    }

    #[test]
    fn a_read_that_starts_where_expected_applies_and_skips_what_came_before() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.check(&key(), 100, 90), Verdict::Skip);
        assert_eq!(gaps.check(&key(), 100, 100), Verdict::Apply);
        assert!(gaps.take_seeks().is_empty());
    }

    #[test]
    fn a_hole_inside_a_read_is_the_topics_own() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.check(&key(), 100, 100), Verdict::Apply);
        assert_eq!(gaps.check(&key(), 101, 150), Verdict::ApplyPastHole);
        assert!(gaps.take_seeks().is_empty());
    }

    #[test]
    fn a_read_that_starts_past_the_expected_offset_seeks_back_further_each_time() {
        let mut gaps = Gaps::default();
        let next = 50_000;
        assert_eq!(gaps.check(&key(), next, 55_000), Verdict::SeekTo(40_000));
        assert_eq!(
            gaps.check(&key(), next, 55_001),
            Verdict::Skip,
            "records read before the seek takes effect"
        );
        assert_eq!(gaps.take_seeks(), vec![(key(), 40_000)]);
        assert_eq!(gaps.check(&key(), next, 55_000), Verdict::SeekTo(30_000));
        gaps.take_seeks();
        assert_eq!(gaps.check(&key(), next, 55_000), Verdict::SeekTo(10_000));
        gaps.take_seeks();
        assert_eq!(gaps.check(&key(), next, 9_000), Verdict::Skip);
        assert_eq!(gaps.check(&key(), next, next), Verdict::Apply);
        assert!(gaps.take_seeks().is_empty());
    }

    #[test]
    fn records_gone_from_offset_0_on_leave_a_hole_accepted_once() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.check(&key(), 15_000, 80_000), Verdict::SeekTo(5_000));
        gaps.take_seeks();
        assert_eq!(gaps.check(&key(), 15_000, 80_000), Verdict::SeekTo(0));
        gaps.take_seeks();
        assert_eq!(gaps.check(&key(), 15_000, 80_000), Verdict::ApplyPastHole);
        assert_eq!(gaps.check(&key(), 80_001, 80_001), Verdict::Apply);
        gaps.repositioned();
        assert_eq!(
            gaps.check(&key(), 90_000, 95_000),
            Verdict::SeekTo(80_000),
            "a new read starts the search afresh"
        );
    }

    #[test]
    fn a_lagging_partition_that_reads_nothing_is_sought_back_after_some_looks() {
        let mut gaps = Gaps::default();
        for _ in 1..STALL_ROUNDS {
            assert_eq!(gaps.stalled(&key(), 25_000), None);
        }
        assert_eq!(gaps.stalled(&key(), 25_000), Some(15_000));
        assert_eq!(gaps.take_seeks(), vec![(key(), 15_000)]);
        assert_eq!(gaps.check(&key(), 25_000, 24_000), Verdict::Skip);
        for _ in 0..2 * STALL_ROUNDS {
            assert_eq!(gaps.stalled(&key(), 25_000), None, "it reads now");
        }
    }

    #[test]
    fn a_stall_goes_no_further_back_than_offset_0() {
        let mut gaps = Gaps::default();
        let mut targets = Vec::new();
        for _ in 0..10 * STALL_ROUNDS {
            targets.extend(gaps.stalled(&key(), 15_000));
            gaps.take_seeks();
        }
        assert_eq!(targets, vec![5_000, 0]);
    }

    #[test]
    fn partitions_are_judged_apart() {
        let mut gaps = Gaps::default();
        let other: PartitionKey = ("t".into(), 1);
        assert_eq!(gaps.check(&key(), 20_000, 25_000), Verdict::SeekTo(10_000));
        assert_eq!(gaps.check(&other, 7, 7), Verdict::Apply);
        assert_eq!(gaps.take_seeks(), vec![(key(), 10_000)]);
    }
}
