//! The dedup service: republishes each distinct event once, to
//! `<prefix>.dedup.<suffix of the raw topic>` (or one configured topic), with the
//! same key, headers and bytes. Duplicates (an id seen within the retention window)
//! are dropped by the runtime and counted (`outcome="duplicate"`).
//!
//! Exactly-once output without Kafka transactions (tansu has none, and they would
//! tie the output to one broker feature): the order is *outbox first*.
//! 1. `handle` stages the output record; `seal` puts the batch's output records in
//!    one outbox entry, and the runtime commits it with the event ids and input
//!    offsets in one flushed sled write. A crash before that loses nothing: the
//!    input offsets have not moved.
//! 2. `committed` publishes the batch's output (idempotent producer, acks=all, from
//!    memory), and its settlement, after every acknowledgement, removes the
//!    batch's outbox entry and records, per output partition, the
//!    offset after the last acknowledged record (the *written mark*). The runtime
//!    applies the next batches meanwhile; one producer keeps the batches in order.
//! 3. A crash between 1 and the end of 2 leaves outbox entries some of which may be
//!    in the topic already. `recover` reads each affected output partition from its
//!    written mark to the end, collects the event ids found, and publishes only the
//!    entries not found. Records published in order by one idempotent producer
//!    land in order without gaps, so what is missing is a suffix and order holds.
//!
//! Publishing after the sled write (rather than before) is what makes 3 possible:
//! the outbox says exactly which ids may be in doubt. Each input partition maps to
//! one output partition (`input partition % output partitions`), so per-key order
//! is kept; the output topic is created with the input's partition count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use changewire_schemas::topic::TopicNames;
use changewire_schemas::{ChangeEvent, Codec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::ConsumerConfig;
use crate::runtime::{
    client_config, ensure_topic, settled, Context, Handler, HandlerError, Record, Settlement,
    StateChanges, Store,
};

const OUTBOX: &[u8] = b"outbox/";
const WRITTEN: &[u8] = b"written/";
/// Starts an outbox entry holding a batch's records (a single record's encoding
/// starts with its id's length, whose first byte is 0).
const LIST_MARKER: &[u8] = b"\xB1list";
/// Longest a recovery scan of one output partition may take before it is retried.
const SCAN_DEADLINE: Duration = Duration::from_secs(120);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[dedup]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// One topic for every distinct event; default: `<prefix>.dedup.<suffix>` per
    /// raw topic.
    #[serde(default)]
    pub output: Option<String>,
}

/// The dedup handler.
pub struct Dedup {
    config: ConsumerConfig,
    names: TopicNames,
    output: Option<String>,
    producer: FutureProducer,
    codec: Arc<Codec>,
    /// Output topic → its partition count.
    partitions: tokio::sync::Mutex<HashMap<String, i32>>,
    /// Output records of the batch being applied, in order.
    staged: Mutex<Vec<Pending>>,
    /// The last sealed batch: its outbox key (one entry for the whole batch) and
    /// records, published from memory once the batch is durable.
    sealed: Mutex<Option<(Vec<u8>, Vec<Pending>)>>,
    /// Sequence of outbox entries (starts at the clock, so it grows across runs).
    sequence: AtomicU64,
    /// Written marks per output partition, moved forward by settlements in turn.
    marks: Arc<Mutex<HashMap<(String, i32), i64>>>,
    /// Set when publishing failed part-way: the next attempt must check the topic.
    in_doubt: Arc<AtomicBool>,
    /// Settlements not finished yet (a check of the topic waits for them).
    unsettled: Arc<AtomicUsize>,
    /// Records found missing from the output by recoveries, and republished.
    republished: AtomicU64,
}

impl Dedup {
    /// A dedup handler for the service `config` describes.
    pub fn new(
        config: &ConsumerConfig,
        dedup: &DedupConfig,
    ) -> Result<Self, crate::runtime::RuntimeError> {
        let names = config.topics.names().map_err(|e| {
            changewire_schemas::settings::ConfigError::invalid("topics.prefix", e.to_string())
        })?;
        let producer = client_config(config)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()?;
        Ok(Self {
            config: config.clone(),
            names,
            output: dedup.output.clone(),
            producer,
            codec: Arc::new(Codec::json()?),
            partitions: tokio::sync::Mutex::new(HashMap::new()),
            staged: Mutex::default(),
            sealed: Mutex::default(),
            sequence: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            ),
            marks: Arc::default(),
            in_doubt: Arc::default(),
            unsettled: Arc::default(),
            republished: AtomicU64::new(0),
        })
    }

    /// Records republished by recoveries (found missing from the output).
    pub fn republished(&self) -> u64 {
        self.republished.load(Ordering::Relaxed)
    }

    fn output_topic(&self, raw_topic: &str) -> Result<String, HandlerError> {
        match &self.output {
            Some(topic) => Ok(topic.clone()),
            None => self.names.dedup(raw_topic).map_err(HandlerError::permanent),
        }
    }

    /// The output topic's partition count, creating it like the raw topic if missing.
    async fn output_partitions(&self, output: &str, raw_topic: &str) -> Result<i32, HandlerError> {
        let mut known = self.partitions.lock().await;
        if let Some(&count) = known.get(output) {
            return Ok(count);
        }
        let raw = partition_count(&self.producer, raw_topic).await?;
        ensure_topic(&self.config, output, raw.max(1))
            .await
            .map_err(HandlerError::transient)?;
        let count = partition_count(&self.producer, output).await?;
        if count == 0 {
            return Err(HandlerError::transient(format!(
                "topic {output} has no partitions yet"
            )));
        }
        known.insert(output.to_owned(), count);
        Ok(count)
    }

    /// Publishes the entries of the outbox (in sled) that the output lacks.
    async fn recover_outbox(&self, store: &Store) -> Result<(), HandlerError> {
        let entries = store.scan(OUTBOX)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut outbox = Vec::new();
        let mut cleared = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let pendings = Pending::decode_list(&value).ok_or_else(|| {
                HandlerError::permanent(format!(
                    "corrupt outbox entry {}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            outbox.extend(pendings.into_iter().map(|p| (key.clone(), p)));
            cleared.push(key);
        }
        let present = self.ids_in_output(store, &outbox).await?;
        let missing: Vec<&Pending> = outbox
            .iter()
            .map(|(_, p)| p)
            .filter(|p| !present.contains(&p.id))
            .collect();
        tracing::info!(
            in_doubt = outbox.len(),
            found = present.len(),
            republishing = missing.len(),
            "recovered the outbox"
        );
        self.republished
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        let mut acks = Vec::with_capacity(missing.len());
        for pending in missing {
            acks.push((pending.topic.clone(), self.enqueue(pending).await?));
        }
        confirm(acks, cleared, store, &self.marks).await
    }

    /// Publishes the sealed batch and returns the settlement that confirms it.
    async fn publish_sealed(&self, store: &Store) -> Result<Settlement, HandlerError> {
        let Some((key, pendings)) = lock(&self.sealed).take() else {
            return Ok(settled());
        };
        let mut acks = Vec::with_capacity(pendings.len());
        for pending in &pendings {
            acks.push((pending.topic.clone(), self.enqueue(pending).await?));
        }
        let cleared = vec![key];
        let (store, marks) = (store.clone(), self.marks.clone());
        let (in_doubt, unsettled) = (self.in_doubt.clone(), self.unsettled.clone());
        unsettled.fetch_add(1, Ordering::SeqCst);
        Ok(Box::pin(async move {
            let result = confirm(acks, cleared, &store, &marks).await;
            if result.is_err() {
                in_doubt.store(true, Ordering::SeqCst);
            }
            unsettled.fetch_sub(1, Ordering::SeqCst);
            result
        }))
    }

    /// Hands `pending` to the producer, waiting while its queue is full.
    async fn enqueue(&self, pending: &Pending) -> Result<DeliveryFuture, HandlerError> {
        let mut record = pending.record();
        loop {
            match self.producer.send_result(record) {
                Ok(ack) => return Ok(ack),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(HandlerError::transient(error)),
            }
        }
    }

    /// Event ids found in the output partitions the outbox writes to, from each
    /// partition's written mark (less the resume rewind) to its end.
    async fn ids_in_output(
        &self,
        store: &Store,
        outbox: &[(Vec<u8>, Pending)],
    ) -> Result<HashSet<String>, HandlerError> {
        let targets: HashSet<(String, i32)> = outbox
            .iter()
            .map(|(_, p)| (p.topic.clone(), p.partition))
            .collect();
        let mut found = HashSet::new();
        for (topic, partition) in targets {
            let mark = store
                .get(&written_key(&topic, partition))?
                .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes))
                .unwrap_or(0);
            let from = (mark - self.config.service.resume_rewind).max(0);
            let client = client_config(&self.config);
            let codec = self.codec.clone();
            let ids = tokio::task::spawn_blocking(move || {
                scan_ids(client, &codec, &topic, partition, from)
            })
            .await
            .map_err(HandlerError::transient)??;
            found.extend(ids);
        }
        Ok(found)
    }
}

impl Handler for Dedup {
    async fn handle(
        &self,
        event: &ChangeEvent,
        record: &Record,
        _context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let topic = self.output_topic(&record.topic)?;
        let partitions = self.output_partitions(&topic, &record.topic).await?;
        let pending = Pending {
            id: event.id.to_string(),
            partition: record.partition % partitions,
            topic,
            key: record.key.clone(),
            headers: record.headers.clone(),
            payload: record.payload.clone(),
        };
        // Written to the outbox by `seal`, one entry for the batch.
        lock(&self.staged).push(pending);
        Ok(())
    }

    /// The batch's output goes into one outbox entry (one sled key for the batch,
    /// not one per event).
    fn seal(&self, changes: &mut StateChanges) {
        let pendings = std::mem::take(&mut *lock(&self.staged));
        if pendings.is_empty() {
            return;
        }
        let mut key = OUTBOX.to_vec();
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst);
        key.extend_from_slice(&sequence.to_be_bytes());
        changes.put(key.clone(), Pending::encode_list(&pendings));
        *lock(&self.sealed) = Some((key, pendings));
    }

    async fn recover(&self, store: &Store) -> Result<(), HandlerError> {
        lock(&self.staged).clear();
        lock(&self.sealed).take();
        self.recover_outbox(store).await?;
        self.in_doubt.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Publishes the batch without waiting for Kafka; the settlement waits. After
    /// a publish failed part-way, the whole outbox is checked against the topic
    /// instead, once nothing else is in flight (what is in flight would look missing).
    async fn committed(&self, store: &Store) -> Result<Settlement, HandlerError> {
        if self.in_doubt.load(Ordering::SeqCst) {
            while self.unsettled.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lock(&self.sealed).take();
            self.recover_outbox(store).await?;
            self.in_doubt.store(false, Ordering::SeqCst);
            return Ok(settled());
        }
        self.publish_sealed(store)
            .await
            .inspect_err(|_| self.in_doubt.store(true, Ordering::SeqCst))
    }
}

/// Waits for every acknowledgement, then clears `cleared` from the outbox and moves
/// the written marks, in one state write. Marks move under their lock, so
/// settlements finishing out of turn never move one back.
async fn confirm(
    acks: Vec<(String, DeliveryFuture)>,
    cleared: Vec<Vec<u8>>,
    store: &Store,
    marks: &Mutex<HashMap<(String, i32), i64>>,
) -> Result<(), HandlerError> {
    let mut written: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, ack) in acks {
        let delivered = ack
            .await
            .map_err(HandlerError::transient)?
            .map_err(|(e, _)| HandlerError::transient(e))?;
        let mark = written.entry((topic, delivered.partition)).or_insert(0);
        *mark = (*mark).max(delivered.offset + 1);
    }
    let mut changes = StateChanges::default();
    for key in cleared {
        changes.remove(key);
    }
    let mut marks = lock(marks);
    for (target, next) in written {
        let mark = marks.entry(target.clone()).or_insert(next);
        *mark = (*mark).max(next);
        changes.put(
            written_key(&target.0, target.1),
            mark.to_be_bytes().to_vec(),
        );
    }
    // A crash may lose this write: the entries are then checked against the topic.
    store.apply_lazily(changes)?;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn partition_count(producer: &FutureProducer, topic: &str) -> Result<i32, HandlerError> {
    let producer = producer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
            .map_err(HandlerError::transient)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32))
    })
    .await
    .map_err(HandlerError::transient)?
}

/// Reads `topic`/`partition` from `from` to its end and returns the event ids.
fn scan_ids(
    client: ClientConfig,
    codec: &Codec,
    topic: &str,
    partition: i32,
    from: i64,
) -> Result<HashSet<String>, HandlerError> {
    let mut client = client;
    let consumer: BaseConsumer = client
        .set("group.id", "changewire-dedup-recovery")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(HandlerError::transient)?;
    let (_, high) = consumer
        .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
        .map_err(HandlerError::transient)?;
    let mut ids = HashSet::new();
    if from >= high {
        return Ok(ids);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(HandlerError::transient)?;
    consumer.assign(&tpl).map_err(HandlerError::transient)?;
    let deadline = Instant::now() + SCAN_DEADLINE;
    let mut last = -1;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                // A reset to the start means the end was passed (tansu reports its
                // high watermark below records it stores).
                if message.offset() < last {
                    return Ok(ids);
                }
                last = message.offset();
                if let Ok(event) = codec.decode(message.payload().unwrap_or_default()) {
                    ids.insert(event.id.to_string());
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(ids),
            Some(Err(error)) if last >= high - 1 => {
                tracing::debug!(%error, "end of the output partition");
                return Ok(ids);
            }
            Some(Err(error)) => tracing::warn!(%error, topic, partition, "reading the output back"),
            None if last >= high - 1 => return Ok(ids),
            None => {}
        }
    }
    Err(HandlerError::transient(format!(
        "reading {topic}/{partition} back from offset {from} took over {SCAN_DEADLINE:?}"
    )))
}

fn written_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = WRITTEN.to_vec();
    key.extend_from_slice(topic.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// An output record waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    id: String,
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Vec<u8>,
}

impl Pending {
    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let headers = self
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let mut record = FutureRecord::to(&self.topic)
            .partition(self.partition)
            .payload(self.payload.as_slice())
            .headers(headers);
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        record
    }

    /// Length-prefixed fields; a key is preceded by a presence byte.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 128);
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        field(self.id.as_bytes());
        field(self.topic.as_bytes());
        field(&self.partition.to_be_bytes());
        match &self.key {
            Some(key) => {
                field(&[1]);
                field(key);
            }
            None => field(&[0]),
        }
        field(&(self.headers.len() as u32).to_be_bytes());
        for (name, value) in &self.headers {
            field(name.as_bytes());
            field(value);
        }
        field(&self.payload);
        out
    }

    /// A batch's records: a marker, the count, then each record length-prefixed.
    fn encode_list(pendings: &[Pending]) -> Vec<u8> {
        let mut out = LIST_MARKER.to_vec();
        out.extend_from_slice(&(pendings.len() as u32).to_be_bytes());
        for pending in pendings {
            let encoded = pending.encode();
            out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            out.extend_from_slice(&encoded);
        }
        out
    }

    /// A batch's records, or the one record of an entry written per event (by
    /// earlier versions).
    fn decode_list(bytes: &[u8]) -> Option<Vec<Self>> {
        let Some(mut rest) = bytes.strip_prefix(LIST_MARKER) else {
            return Self::decode(bytes).map(|p| vec![p]);
        };
        let mut take = |len: usize| -> Option<&[u8]> {
            let (head, tail) = (rest.get(..len)?, rest.get(len..)?);
            rest = tail;
            Some(head)
        };
        let count = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let mut pendings = Vec::with_capacity(count.min(100_000) as usize);
        for _ in 0..count {
            let len = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
            pendings.push(Self::decode(take(len)?)?);
        }
        Some(pendings)
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes;
        let mut field = || -> Option<&[u8]> {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let value = rest.get(4..4 + len)?;
            rest = &rest[4 + len..];
            Some(value)
        };
        let id = String::from_utf8(field()?.to_vec()).ok()?;
        let topic = String::from_utf8(field()?.to_vec()).ok()?;
        let partition = i32::from_be_bytes(field()?.try_into().ok()?);
        let key = match field()? {
            [1] => Some(field()?.to_vec()),
            _ => None,
        };
        let count = u32::from_be_bytes(field()?.try_into().ok()?);
        let mut headers = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            let name = String::from_utf8(field()?.to_vec()).ok()?;
            headers.push((name, field()?.to_vec()));
        }
        let payload = field()?.to_vec();
        Some(Self {
            id,
            topic,
            partition,
            key,
            headers,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_entries_round_trip() {
        let pending = Pending {
            id: "pg:a:0/1:1".into(),
            topic: "cw.dedup.a".into(),
            partition: 2,
            key: Some(b"k".to_vec()),
            headers: vec![("h".into(), b"v".to_vec()), ("empty".into(), vec![])],
            payload: b"{\"x\":1}".to_vec(),
        };
        assert_eq!(Pending::decode(&pending.encode()), Some(pending.clone()));
        let keyless = Pending {
            key: None,
            headers: vec![],
            ..pending.clone()
        };
        assert_eq!(Pending::decode(&keyless.encode()), Some(keyless.clone()));
        let encoded = keyless.encode();
        assert_eq!(
            Pending::decode(&encoded[..encoded.len() - 1]),
            None,
            "truncated"
        );
        let list = Pending::encode_list(&[pending.clone(), keyless.clone()]);
        assert_eq!(
            Pending::decode_list(&list),
            Some(vec![pending, keyless.clone()])
        );
        assert_eq!(
            Pending::decode_list(&encoded),
            Some(vec![keyless]),
            "one record per entry"
        );
        assert_eq!(
            Pending::decode_list(&list[..list.len() - 1]),
            None,
            "truncated"
        );
    }
}
