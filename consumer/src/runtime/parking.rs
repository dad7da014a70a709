//! Retry parking: a partition whose event failed transiently (or whose handler's
//! dependency is unavailable) waits, paused in the client, its later records held
//! here in order, while the instance's other partitions go on. When the retry is
//! due, the failed record and the held ones run again. Pure: time comes in as
//! arguments, the caller pauses and resumes partitions in the client.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::handler::Record;
use super::types::PartitionKey;

const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts at an event whose handler failed transiently.
const TRANSIENT_MAX: Duration = Duration::from_secs(10);
/// Longest wait between attempts while a dependency is unavailable.
const UNAVAILABLE_MAX: Duration = Duration::from_secs(30);

/// A partition waiting to retry its head record.
#[derive(Debug)]
struct Parked {
    /// The failed record.
    record: Record,
    /// Records of the partition that came after it.
    held: Vec<Record>,
    attempts: u32,
    delay: Duration,
    until: Instant,
    /// Paused in the client.
    paused: bool,
}

/// How an earlier attempt at a record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Earlier {
    /// Attempts made so far.
    pub(super) attempts: u32,
    delay: Duration,
}

/// Every parked partition.
#[derive(Debug, Default)]
pub(super) struct Parking {
    parked: HashMap<PartitionKey, Parked>,
}

impl Parking {
    /// Whether no partition waits.
    pub(super) fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    /// Holds `record` back if its partition waits to retry an earlier record;
    /// otherwise gives it back.
    pub(super) fn hold(&mut self, record: Record) -> Option<Record> {
        // Most of the time nothing is parked: no key is built (a String per record).
        if self.parked.is_empty() {
            return Some(record);
        }
        match self
            .parked
            .get_mut(&(record.topic.clone(), record.partition))
        {
            Some(parked) if record.offset > parked.record.offset => {
                parked.held.push(record);
                None
            }
            Some(parked) if record.offset == parked.record.offset && parked.paused => None,
            _ => Some(record),
        }
    }

    /// The earlier attempts at `record` if it is its partition's parked record
    /// (run again now), forgetting the parking.
    pub(super) fn take_earlier(&mut self, record: &Record) -> Option<Earlier> {
        if self.parked.is_empty() {
            return None;
        }
        let key = (record.topic.clone(), record.partition);
        match self.parked.get(&key) {
            Some(parked) if parked.record.offset == record.offset => {
                let parked = self.parked.remove(&key)?;
                Some(Earlier {
                    attempts: parked.attempts,
                    delay: parked.delay,
                })
            }
            _ => None,
        }
    }

    /// Parks `record`'s partition after a failed attempt; the wait doubles per
    /// attempt up to a ceiling that is higher while a dependency is
    /// `unavailable`. Returns the wait.
    pub(super) fn park(
        &mut self,
        record: &Record,
        earlier: Option<Earlier>,
        unavailable: bool,
        now: Instant,
    ) -> Duration {
        let ceiling = if unavailable {
            UNAVAILABLE_MAX
        } else {
            TRANSIENT_MAX
        };
        let delay = earlier.map_or(RETRY_MIN, |e| (e.delay * 2).min(ceiling));
        self.parked.insert(
            (record.topic.clone(), record.partition),
            Parked {
                record: record.clone(),
                held: Vec::new(),
                attempts: earlier.map_or(1, |e| e.attempts + 1),
                delay,
                until: now + delay,
                paused: false,
            },
        );
        delay
    }

    /// Newly parked partitions to pause in the client, with the offset each
    /// expects next (its failed record); marks them paused.
    pub(super) fn pause_new(&mut self) -> Vec<(PartitionKey, i64)> {
        self.parked
            .iter_mut()
            .filter(|(_, parked)| !parked.paused)
            .map(|(key, parked)| {
                parked.paused = true;
                (key.clone(), parked.record.offset)
            })
            .collect()
    }

    /// Partitions waiting for their retry (they stay paused whatever else
    /// resumes).
    pub(super) fn paused(&self) -> HashSet<PartitionKey> {
        self.parked.keys().cloned().collect()
    }

    /// The records of the partitions whose retry is due, in order (the failed
    /// record first), and those partitions, to resume.
    pub(super) fn due(&mut self, now: Instant) -> (Vec<Record>, Vec<PartitionKey>) {
        let mut records = Vec::new();
        let mut resumed = Vec::new();
        for (key, parked) in &mut self.parked {
            if !parked.paused || parked.until > now {
                continue;
            }
            // The failed record runs again (its attempts found by `take_earlier`).
            parked.paused = false;
            records.push(parked.record.clone());
            records.append(&mut parked.held);
            resumed.push(key.clone());
        }
        (records, resumed)
    }

    /// Forgets partitions no longer `owned` (their next owner reads the held
    /// records); returns them, to resume in the client (a pause outlives a
    /// re-assignment).
    pub(super) fn retain_owned(&mut self, owned: &HashSet<PartitionKey>) -> Vec<PartitionKey> {
        let gone: Vec<PartitionKey> = self
            .parked
            .keys()
            .filter(|key| !owned.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.parked.remove(key);
        }
        gone
    }

    /// When the earliest paused partition's retry is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.parked
            .values()
            .filter(|p| p.paused)
            .map(|p| p.until)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing;

    fn record(partition: i32, offset: i64) -> Record {
        testing::record(partition, offset, b"x")
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_partition_holds_its_later_records_and_releases_them_in_order_when_due() {
        let mut parking = Parking::default();
        let failed = record(0, 5);
        let delay = parking.park(&failed, None, false, Instant::now());
        assert_eq!(delay, RETRY_MIN);
        assert_eq!(parking.pause_new(), vec![(("t".into(), 0), 5)]);
        assert_eq!(parking.pause_new(), vec![], "paused once");
        assert_eq!(parking.hold(record(0, 6)), None);
        assert_eq!(
            parking.hold(record(0, 5)),
            None,
            "a refetch of the failed record"
        );
        assert_eq!(
            parking.hold(record(1, 9)),
            Some(record(1, 9)),
            "other partitions go on"
        );
        assert_eq!(parking.due(Instant::now()), (vec![], vec![]), "not due yet");
        tokio::time::advance(delay).await;
        let (records, resumed) = parking.due(Instant::now());
        assert_eq!(records, vec![record(0, 5), record(0, 6)]);
        assert_eq!(resumed, vec![("t".into(), 0)]);
        let earlier = parking.take_earlier(&failed).expect("its attempts");
        assert_eq!(earlier.attempts, 1);
        assert!(parking.is_empty());
        let again = parking.park(&failed, Some(earlier), false, Instant::now());
        assert_eq!(again, RETRY_MIN * 2, "the wait doubles");
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_partition_is_forgotten_and_handed_back_for_resuming() {
        let mut parking = Parking::default();
        parking.park(&record(0, 5), None, true, Instant::now());
        parking.park(&record(1, 7), None, true, Instant::now());
        parking.pause_new();
        let owned = HashSet::from([("t".to_owned(), 1)]);
        assert_eq!(parking.retain_owned(&owned), vec![("t".to_owned(), 0)]);
        assert_eq!(parking.paused(), owned);
        let mut earlier = None;
        for _ in 0..12 {
            let delay = parking.park(&record(1, 7), earlier, true, Instant::now());
            earlier = parking.take_earlier(&record(1, 7));
            assert!(delay <= UNAVAILABLE_MAX);
        }
        assert_eq!(
            earlier.map(|e| e.delay),
            Some(UNAVAILABLE_MAX),
            "unavailable waits up to 30 s"
        );
    }
}
