//! Partition assignment: start each partition from its sled offset, hand revoked
//! partitions over with their offsets committed, and report lag.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::metrics::{ConsumerMetrics, TopicPartition};
use super::store::Store;

/// A topic and partition.
pub(super) type PartitionKey = (String, i32);

/// The partitions this instance owns, each with the next offset it expects; and
/// per partition the offset up to which every batch settled (its outward effects
/// confirmed): what may be handed to Kafka.
#[derive(Default)]
pub(super) struct Assignment {
    owned: Mutex<HashMap<PartitionKey, Option<i64>>>,
    settled: Mutex<HashMap<PartitionKey, i64>>,
}

impl Assignment {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<PartitionKey, Option<i64>>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records settled offsets (they only move forward).
    pub(super) fn settle(&self, offsets: &HashMap<PartitionKey, i64>) {
        let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        for (key, &next) in offsets {
            let entry = settled.entry(key.clone()).or_insert(next);
            *entry = (*entry).max(next);
        }
    }

    /// The offset up to which `key`'s batches settled.
    pub(super) fn settled(&self, key: &PartitionKey) -> Option<i64> {
        let settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        settled.get(key).copied()
    }
}

/// The consumer's context: rebalances and statistics.
pub(super) struct ServiceContext {
    pub(super) store: Store,
    pub(super) assignment: Arc<Assignment>,
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

impl ServiceContext {
    /// Sets each partition's start in the assignment itself (no seek afterwards):
    /// the sled offset (minus the rewind), else the group's offset, else the reset
    /// policy.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut owned = self.assignment.lock();
        for (topic, partition) in partitions {
            let next = match self.store.offset(&topic, partition) {
                Ok(next) => next,
                Err(error) => {
                    tracing::error!(%topic, partition, %error, "cannot read the sled offset: starting from the group's offset");
                    None
                }
            };
            match next {
                Some(next) => {
                    // Effects of earlier runs were recovered before consuming began.
                    self.assignment
                        .settle(&HashMap::from([((topic.clone(), partition), next)]));
                    let start = (next - self.rewind).max(0);
                    tracing::info!(%topic, partition, next, start, "starting from the sled offset");
                    let _ = tpl.set_partition_offset(&topic, partition, Offset::Offset(start));
                }
                None => {
                    tracing::info!(%topic, partition, "no sled offset: starting from the group's offset")
                }
            }
            owned.insert((topic, partition), next);
        }
        self.metrics.partitions_assigned.set(owned.len() as i64);
        tracing::info!(partitions = tpl.count(), "partitions assigned");
        if let Err(error) = consumer.assign(tpl) {
            tracing::error!(%error, "cannot take the assignment");
        }
    }

    /// Batches are committed to sled before the next poll, and revocation happens
    /// inside a poll, so nothing is half-applied here: records already fetched for
    /// these partitions are dropped unapplied (the next owner reads them), and the
    /// settled offsets are committed to Kafka so the next owner starts after the
    /// last batch whose effects are confirmed (the rest settle here meanwhile).
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut owned = self.assignment.lock();
        let mut offsets = TopicPartitionList::new();
        for element in tpl.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            owned.remove(&(topic.to_owned(), partition));
            self.metrics.lag.remove(&TopicPartition {
                topic: topic.to_owned(),
                partition,
            });
            if let Some(next) = self.assignment.settled(&(topic.to_owned(), partition)) {
                let _ = offsets.add_partition_offset(topic, partition, Offset::Offset(next));
            }
        }
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
