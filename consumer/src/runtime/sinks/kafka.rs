//! A Kafka sink: writes each effect as a record to its `destination` topic
//! (partition as given, else by key), with the idempotent producer (acks=all,
//! retried by librdkafka without end, so records of one partition land in order
//! and without gaps).
//!
//! Every record carries its idempotency key in the header
//! [`IDEMPOTENCY_HEADER`]. After a crash, [`Sink::reconcile`] reads each output
//! partition an in-doubt effect may have gone to, from the sink's *written mark*
//! (the offset after the last record acknowledged there, kept in the service's
//! store) to the end, and reports the keys found: those effects are not written
//! again.
//!
//! Record-level rejections (too large, invalid) are permanent: the runtime
//! dead-letters the effect. The DLQ's own sink ([`Oversized::OmitPayload`])
//! writes such a record without its payload instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use changewire_kafka::{Landed, Lane, PublishError, PublishMetrics, Publisher, Record};
use changewire_schemas::diagnostics::report;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Mutex;

use crate::runtime::{
    client_config, dlq, Delivery, Effect, Pending, RuntimeConfig, RuntimeError, Sink, SinkError,
    StateChanges, Store,
};

/// The header holding a record's idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "changewire-idempotency-key";
/// Longest a read-back of one output partition may take before it is retried.
const SCAN_DEADLINE: Duration = Duration::from_secs(120);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sink does with a record the broker or client refuses as too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversized {
    /// Reject the effect (the runtime dead-letters it).
    Reject,
    /// Write it without its payload, saying so in a header (for the DLQ).
    OmitPayload,
}

/// Writes effects to Kafka topics.
pub struct KafkaSink {
    name: String,
    publisher: Publisher,
    /// One ordered lane with receipts; `deliver` runs on the sink's own task, so
    /// the lock is never contended.
    lane: Mutex<Lane<()>>,
    client: ClientConfig,
    rewind: i64,
    oversized: Oversized,
}

impl KafkaSink {
    /// A sink named `name` writing with the `[kafka]` section's client settings.
    pub fn new(
        name: &str,
        config: &RuntimeConfig,
        oversized: Oversized,
    ) -> Result<Self, RuntimeError> {
        let publisher = Publisher::new(&config.kafka)?.with_topic_settings(&config.topics);
        let lane = publisher.lane(PublishMetrics::default()).with_receipts();
        Ok(Self {
            name: name.to_owned(),
            publisher,
            lane: Mutex::new(lane),
            client: client_config(config),
            rewind: config.service.resume_rewind,
            oversized,
        })
    }

    /// The sink's publisher (for metadata lookups that should share its client).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Publishes `effect` under `key` to `lane`: `Ok` once queued (its receipt
    /// follows), `Err` when the client refused it at once.
    async fn publish(lane: &mut Lane<()>, effect: &Effect, key: &str) -> Result<(), PublishError> {
        let topic = effect.destination.as_deref().unwrap_or_default();
        let headers: Vec<(&str, Option<&[u8]>)> = effect
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
            .chain([(IDEMPOTENCY_HEADER, Some(key.as_bytes()))])
            .collect();
        let record = Record {
            partition: effect.partition,
            headers: &headers,
            ..Record::keyed(topic, effect.key.as_deref(), Some(&effect.payload))
        };
        lane.publish(&record).await
    }

    /// Writes a dead letter the broker or client refused as too large again,
    /// without its payload.
    async fn write_without_payload(
        &self,
        lane: &mut Lane<()>,
        pending: &Pending,
        error: &SinkError,
    ) -> Result<Landed, SinkError> {
        let key = &pending.idempotency_key;
        tracing::warn!(sink = self.name, key, error = %report(error), "writing the dead letter without its payload");
        let stripped = dlq::without_payload(&pending.effect);
        match Self::publish(lane, &stripped, key).await {
            Ok(()) => lane
                .receipts()
                .await
                .pop()
                .unwrap_or(Err(PublishError::Canceled)),
            Err(error) => Err(error),
        }
        .map_err(|e| self.classify(e))
    }

    /// Why a write failed, by what the runtime should do about it.
    fn classify(&self, error: PublishError) -> SinkError {
        if let Some((code, reason)) = self.publisher.fatal_error() {
            return SinkError::Fatal(
                format!("the producer failed for good ({code}): {reason}").into(),
            );
        }
        use RDKafkaErrorCode as Code;
        let code = match &error {
            PublishError::Rejected { source, .. } | PublishError::Delivery { source, .. } => {
                source.rdkafka_error_code()
            }
            _ => None,
        };
        match code {
            Some(
                Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::MessageBatchTooLarge,
            ) => SinkError::Permanent(Box::new(error)),
            Some(
                Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::UnknownPartition
                | Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::Authentication
                | Code::MessageTimedOut,
            ) => SinkError::unavailable(error),
            _ => SinkError::Transient(Box::new(error)),
        }
    }

    /// The store key of the written mark of `topic`/`partition`.
    fn mark_key(&self, topic: &str, partition: i32) -> Vec<u8> {
        format!("changewire.sink/{}/written/{topic}/{partition}", self.name).into_bytes()
    }

    fn mark(&self, store: &Store, topic: &str, partition: i32) -> Result<i64, SinkError> {
        let mark = store
            .get(&self.mark_key(topic, partition))
            .map_err(|e| SinkError::Fatal(Box::new(e)))?;
        Ok(mark
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(0))
    }

    /// The output partitions `in_doubt` may have gone to.
    async fn targets(
        &self,
        in_doubt: &[Arc<Pending>],
    ) -> Result<HashSet<(String, i32)>, SinkError> {
        let mut targets = HashSet::new();
        for pending in in_doubt {
            let Some(topic) = &pending.effect.destination else {
                continue;
            };
            match pending.effect.partition {
                Some(partition) => {
                    targets.insert((topic.clone(), partition));
                }
                None => {
                    let count = self
                        .publisher
                        .partition_count(topic)
                        .await
                        .map_err(SinkError::unavailable)?;
                    targets.extend((0..count).map(|p| (topic.clone(), p)));
                }
            }
        }
        Ok(targets)
    }
}

impl Sink for KafkaSink {
    /// Enqueues the whole chunk, then waits for every acknowledgement; moves the
    /// written marks (durable with the next flush: a stale mark only makes a
    /// read-back longer).
    async fn deliver(&self, effects: &[Arc<Pending>], store: &Store) -> Vec<Delivery> {
        let mut lane = self.lane.lock().await;
        // Per effect: refused at once, or queued (its receipt comes in order).
        let mut queued = Vec::with_capacity(effects.len());
        for pending in effects {
            queued.push(if pending.effect.destination.is_none() {
                let error = format!(
                    "effect {} has no destination topic",
                    pending.idempotency_key
                );
                Err(SinkError::Permanent(error.into()))
            } else {
                Self::publish(&mut lane, &pending.effect, &pending.idempotency_key)
                    .await
                    .map_err(|e| self.classify(e))
            });
        }
        let mut receipts = lane.receipts().await.into_iter();
        let mut marks: HashMap<(String, i32), i64> = HashMap::new();
        let mut deliveries = Vec::with_capacity(effects.len());
        for (pending, queued) in effects.iter().zip(queued) {
            let landed = queued.and_then(|()| {
                receipts
                    .next()
                    .unwrap_or(Err(PublishError::Canceled))
                    .map_err(|e| self.classify(e))
            });
            let landed = match landed {
                Err(error @ SinkError::Permanent(_))
                    if self.oversized == Oversized::OmitPayload =>
                {
                    self.write_without_payload(&mut lane, pending, &error).await
                }
                other => other,
            };
            deliveries.push(match landed {
                Ok(Landed { partition, offset }) => {
                    let topic = pending.effect.destination.clone().unwrap_or_default();
                    let mark = marks.entry((topic, partition)).or_insert(0);
                    *mark = (*mark).max(offset + 1);
                    Delivery::Delivered
                }
                Err(error) => Delivery::Failed(error),
            });
        }
        let mut changes = StateChanges::default();
        for ((topic, partition), next) in marks {
            changes.put(
                self.mark_key(&topic, partition),
                next.to_be_bytes().to_vec(),
            );
        }
        if let Err(error) = store.apply_lazily(changes) {
            // The effects landed; a stale mark only makes a later read-back longer.
            tracing::warn!(sink = self.name, %error, "cannot store the written marks");
        }
        deliveries
    }

    async fn reconcile(
        &self,
        in_doubt: &[Arc<Pending>],
        store: &Store,
    ) -> Result<HashSet<String>, SinkError> {
        let mut found = HashSet::new();
        for (topic, partition) in self.targets(in_doubt).await? {
            let from = (self.mark(store, &topic, partition)? - self.rewind).max(0);
            let client = self.client.clone();
            let keys =
                tokio::task::spawn_blocking(move || scan_keys(client, &topic, partition, from))
                    .await
                    .map_err(|e| SinkError::Fatal(Box::new(e)))??;
            found.extend(keys);
        }
        Ok(found)
    }

    fn max_chunk(&self) -> usize {
        10_000
    }
}

/// Reads `topic`/`partition` from `from` to its end and returns the idempotency
/// keys found.
fn scan_keys(
    client: ClientConfig,
    topic: &str,
    partition: i32,
    from: i64,
) -> Result<HashSet<String>, SinkError> {
    let mut client = client;
    let consumer: BaseConsumer = client
        .set("group.id", "changewire-sink-reconcile")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| SinkError::Fatal(Box::new(e)))?;
    let (_, high) = consumer
        .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
        .map_err(SinkError::unavailable)?;
    let mut keys = HashSet::new();
    if from >= high {
        return Ok(keys);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| SinkError::Fatal(Box::new(e)))?;
    consumer.assign(&tpl).map_err(SinkError::unavailable)?;
    tracing::info!(topic, partition, from, to = high, "reading the output back");
    let deadline = Instant::now() + SCAN_DEADLINE;
    let mut last = -1;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                // A reset to the start means the end was passed (tansu reports its
                // high watermark below records it stores).
                if message.offset() < last {
                    return Ok(keys);
                }
                last = message.offset();
                let key = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == IDEMPOTENCY_HEADER)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                keys.extend(key);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(keys),
            Some(Err(_)) | None if last >= high - 1 => return Ok(keys),
            Some(Err(error)) => tracing::warn!(%error, topic, partition, "reading the output back"),
            None => {}
        }
    }
    Err(SinkError::unavailable(format!(
        "reading {topic}/{partition} back from offset {from} took over {SCAN_DEADLINE:?}"
    )))
}
