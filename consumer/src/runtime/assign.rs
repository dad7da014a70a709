//! Partition ownership: where each assigned partition starts, handing revoked
//! partitions over with their settled offsets committed, and lag.
//!
//! In `group` mode offsets committed to Kafka carry metadata naming the
//! instance that wrote them. On assignment a partition starts from this
//! instance's sled offset, unless Kafka's committed offset is ahead of it and was
//! not written by this instance: then another instance applied the records in
//! between, and this one starts from Kafka's offset and tells the handler
//! (`partition_reset`). Replaying them would apply them twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::metrics::{ConsumerMetrics, TopicPartition};
use super::outbox::{Outbox, Settlements};
use super::store::Store;
pub(super) use super::types::PartitionKey;

/// What the metadata of this instance's offset commits starts with.
const METADATA_PREFIX: &str = "changewire instance=";

/// The partitions this instance owns, each with the next offset it expects; the
/// settled offsets; partitions taken over from another instance.
#[derive(Default)]
pub(super) struct Assignment {
    owned: Mutex<HashMap<PartitionKey, Option<i64>>>,
    pub(super) settlements: Mutex<Settlements>,
    resets: Mutex<Vec<PartitionKey>>,
    /// Moves at every assignment and revocation.
    generation: AtomicU64,
}

impl Assignment {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<PartitionKey, Option<i64>>> {
        lock(&self.owned)
    }

    /// The partitions owned now.
    pub(super) fn owned(&self) -> HashSet<PartitionKey> {
        self.lock().keys().cloned().collect()
    }

    pub(super) fn settlements(&self) -> MutexGuard<'_, Settlements> {
        lock(&self.settlements)
    }

    /// Partitions taken over since the last call.
    pub(super) fn take_resets(&self) -> Vec<PartitionKey> {
        std::mem::take(&mut *lock(&self.resets))
    }

    /// Changes at every assignment and revocation.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Takes `partitions`, each starting where [`Start`] says.
    pub(super) fn take(&self, partitions: Vec<(PartitionKey, Option<i64>)>) {
        self.lock().extend(partitions);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where an assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// This instance's sled offset.
    Sled(i64),
    /// Kafka's committed offset, written by another instance that went further
    /// than this one's sled: the handler drops the partition's state.
    TakeOver(i64),
    /// Kafka's committed offset (this instance never held the partition).
    Group(i64),
    /// Neither: the reset policy.
    Reset,
}

impl Start {
    /// Decides from the sled offset and Kafka's committed offset with the
    /// metadata it was committed with.
    pub(super) fn decide(
        sled: Option<i64>,
        committed: Option<(i64, &str)>,
        instance: &str,
    ) -> Self {
        match (sled, committed) {
            (Some(sled), Some((kafka, metadata)))
                if kafka > sled && !written_by(metadata, instance) =>
            {
                Self::TakeOver(kafka)
            }
            (Some(sled), _) => Self::Sled(sled),
            (None, Some((kafka, _))) => Self::Group(kafka),
            (None, None) => Self::Reset,
        }
    }

    /// The next offset expected (none for the reset policy).
    fn next(self) -> Option<i64> {
        match self {
            Self::Sled(next) | Self::TakeOver(next) | Self::Group(next) => Some(next),
            Self::Reset => None,
        }
    }
}

/// The metadata of this instance's offset commits.
pub(super) fn commit_metadata(instance: &str) -> String {
    format!("{METADATA_PREFIX}{instance}")
}

/// Adds `key` at `next` with `metadata` to a list of offsets to commit.
pub(super) fn add_offset(
    tpl: &mut TopicPartitionList,
    key: &PartitionKey,
    next: i64,
    metadata: &str,
) {
    let mut element = tpl.add_partition(&key.0, key.1);
    let _ = element.set_offset(Offset::Offset(next));
    element.set_metadata(metadata);
}

fn written_by(metadata: &str, instance: &str) -> bool {
    metadata.strip_prefix(METADATA_PREFIX) == Some(instance)
}

/// The consumer's context: rebalances and statistics.
pub(super) struct ServiceContext {
    pub(super) store: Store,
    pub(super) instance: String,
    pub(super) assignment: Arc<Assignment>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) metrics: Arc<ConsumerMetrics>,
    /// Offsets to start before the sled offset (records below it are skipped):
    /// covers brokers that serve a fetch from inside a record batch with the next
    /// batch (tansu 0.6), which would otherwise skip the rest of that batch.
    pub(super) rewind: i64,
}

impl ClientContext for ServiceContext {
    fn stats(&self, statistics: Statistics) {
        let owned = self.assignment.lock();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if !owned.contains_key(&(topic.clone(), *partition)) || p.hi_offset < 0 {
                    continue;
                }
                let Ok(Some(next)) = self.store.offset(topic, *partition) else {
                    continue;
                };
                self.metrics
                    .lag
                    .get_or_create(&TopicPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    })
                    .set((p.hi_offset - next).max(0));
            }
        }
    }
}

impl ConsumerContext for ServiceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

impl ServiceContext {
    /// Sets each partition's start in the assignment itself (no seek afterwards),
    /// and resumes it (a pause from an earlier ownership outlives revocation).
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = self.committed(consumer, tpl);
        let partitions: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut taken = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let key = (topic.clone(), partition);
            let sled = match self.store.offset(&topic, partition) {
                Ok(next) => next,
                Err(error) => {
                    tracing::error!(%topic, partition, %error, "cannot read the sled offset: starting from the group's offset");
                    None
                }
            };
            let kafka = committed.get(&key).map(|(o, m)| (*o, m.as_str()));
            let start = Start::decide(sled, kafka, &self.instance);
            self.log_start(&key, start, sled, kafka);
            if let Some(next) = start.next() {
                // Records below `next` are skipped as they arrive.
                let from = (next - self.rewind).max(0);
                let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(from));
            }
            match start {
                Start::TakeOver(_) => lock(&self.assignment.resets).push(key.clone()),
                // Settled (and mirrored) once every effect committed so far was
                // delivered: some may be this partition's.
                Start::Sled(next) => self.assignment.settlements().committed(
                    self.outbox.last_sequence(),
                    HashMap::from([(key.clone(), next)]),
                ),
                Start::Group(_) | Start::Reset => {}
            }
            taken.push((key, start.next()));
        }
        self.assignment.take(taken);
        self.metrics
            .partitions_assigned
            .set(self.assignment.lock().len() as i64);
        tracing::info!(partitions = tpl.count(), "partitions assigned");
        if let Err(error) = consumer.assign(tpl) {
            tracing::error!(%error, "cannot take the assignment");
        }
        if let Err(error) = consumer.resume(tpl) {
            tracing::warn!(%error, "cannot resume the assigned partitions");
        }
    }

    fn log_start(
        &self,
        key: &PartitionKey,
        start: Start,
        sled: Option<i64>,
        kafka: Option<(i64, &str)>,
    ) {
        let (topic, partition) = key;
        match start {
            Start::TakeOver(next) => tracing::warn!(
                topic, partition, sled, kafka = next, committed_by = kafka.map(|(_, m)| m),
                "another instance went further on this partition: starting from its offset (the handler drops the partition's state)"
            ),
            Start::Sled(next) => tracing::info!(topic, partition, next, "starting from the sled offset"),
            Start::Group(next) => tracing::info!(topic, partition, next, "no sled offset: starting from the group's offset"),
            Start::Reset => tracing::info!(topic, partition, "no offset anywhere: starting from auto.offset.reset"),
        }
    }

    /// Kafka's committed offsets of `tpl` with their metadata (empty if they
    /// cannot be read: then sled decides alone).
    fn committed(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> HashMap<PartitionKey, (i64, String)> {
        match consumer.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT) {
            Ok(committed) => committed
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(offset) => Some((
                        (e.topic().to_owned(), e.partition()),
                        (offset, e.metadata().to_owned()),
                    )),
                    _ => None,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the group's committed offsets: starting from sled offsets");
                HashMap::new()
            }
        }
    }

    /// Commits the revoked partitions' settled offsets (so the next owner starts
    /// after the last batch whose effects were delivered; this instance's outbox
    /// still delivers the rest) and forgets them. Records already fetched for
    /// them are dropped unapplied: the next owner reads them.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut settlements = self.assignment.settlements();
        settlements.advance(self.outbox.oldest());
        let mut offsets = TopicPartitionList::new();
        let metadata = commit_metadata(&self.instance);
        let mut owned = self.assignment.lock();
        for element in tpl.elements() {
            let key = (element.topic().to_owned(), element.partition());
            owned.remove(&key);
            self.metrics.lag.remove(&TopicPartition {
                topic: key.0.clone(),
                partition: key.1,
            });
            if let Some(next) = settlements.settled(&key) {
                add_offset(&mut offsets, &key, next, &metadata);
            }
            settlements.forget(&key);
        }
        drop(settlements);
        self.assignment.generation.fetch_add(1, Ordering::SeqCst);
        if offsets.count() > 0 {
            if let Err(error) = consumer.commit(&offsets, CommitMode::Sync) {
                tracing::warn!(%error, "cannot hand the revoked partitions' offsets to Kafka");
            }
        }
        self.metrics.partitions_assigned.set(owned.len() as i64);
        tracing::info!(partitions = tpl.count(), "partitions revoked");
        if let Err(error) = consumer.unassign() {
            tracing::error!(%error, "cannot give up the assignment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_starts_from_kafka_only_when_another_instance_went_further() {
        let ours = commit_metadata("a");
        let theirs = commit_metadata("b");
        assert_eq!(
            Start::decide(Some(1001), Some((3027, &theirs)), "a"),
            Start::TakeOver(3027)
        );
        assert_eq!(
            Start::decide(Some(1001), Some((3027, "")), "a"),
            Start::TakeOver(3027),
            "no metadata: not ours"
        );
        assert_eq!(
            Start::decide(Some(1001), Some((3027, &ours)), "a"),
            Start::Sled(1001),
            "our own commit"
        );
        assert_eq!(
            Start::decide(Some(3027), Some((1001, &theirs)), "a"),
            Start::Sled(3027),
            "Kafka behind"
        );
        assert_eq!(
            Start::decide(None, Some((10, &theirs)), "a"),
            Start::Group(10)
        );
        assert_eq!(Start::decide(None, None, "a"), Start::Reset);
    }
}
