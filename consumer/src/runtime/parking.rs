//! Retry parking: a partition whose event failed transiently (or whose handler's
//! dependency is unavailable) waits, paused in the client, its later records held
//! here in order, while the instance's other partitions go on. When the retry is
//! due, the failed record and the held ones run again. Pure: time comes in as
//! arguments, the caller pauses and resumes partitions in the client.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use changewire_schemas::backoff::Backoff;
use tokio::time::Instant;

use super::handler::Record;
use super::types::PartitionKey;

/// The first wait's ceiling (waits are half to all of their ceiling: jitter).
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
    backoff: Backoff,
    until: Instant,
    /// Paused in the client.
    paused: bool,
}

/// How earlier attempts at a record went.
#[derive(Debug, Clone)]
pub(super) struct Earlier {
    backoff: Backoff,
}

impl Earlier {
    /// Attempts made so far.
    pub(super) fn attempts(&self) -> u32 {
        self.backoff.attempts()
    }
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
                    backoff: parked.backoff,
                })
            }
            _ => None,
        }
    }

    /// Parks `record`'s partition after a failed attempt; the wait doubles per
    /// attempt (with jitter) up to a ceiling that is higher while a dependency is
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
        // A record that fails again is retried, not run healthy: no reset.
        let backoff = earlier.map_or_else(
            || Backoff::new(RETRY_MIN, ceiling, Duration::MAX),
            |e| e.backoff.with_max(ceiling),
        );
        let mut backoff = backoff;
        let delay = backoff.next_delay_at(now);
        self.parked.insert(
            (record.topic.clone(), record.partition),
            Parked {
                record: record.clone(),
                held: Vec::new(),
                backoff,
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
        assert!(delay >= RETRY_MIN / 2 && delay <= RETRY_MIN, "{delay:?}");
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
        assert_eq!(earlier.attempts(), 1);
        assert!(parking.is_empty());
        let again = parking.park(&failed, Some(earlier), false, Instant::now());
        assert!(
            again >= RETRY_MIN && again <= RETRY_MIN * 2,
            "the wait doubles: {again:?}"
        );
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
        let mut delay = Duration::ZERO;
        for _ in 0..12 {
            delay = parking.park(&record(1, 7), earlier, true, Instant::now());
            earlier = parking.take_earlier(&record(1, 7));
            assert!(delay <= UNAVAILABLE_MAX);
        }
        assert!(
            delay >= UNAVAILABLE_MAX / 2,
            "unavailable waits up to 30 s: {delay:?}"
        );
    }
}
