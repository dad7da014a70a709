//! The ordered publisher: records go to one idempotent producer through *lanes*, and
//! each lane says, in order, which of its *marks* are confirmed: a mark is confirmed
//! once every record its lane published before it is acknowledged by the broker.
//!
//! A source publishes a transaction's records, then marks the transaction's
//! checkpoint; it stores the checkpoint when the mark comes back. No future or
//! channel exists per record: librdkafka's delivery callback sets a bit in the lane's
//! [`Acks`] and wakes the lane's owner only when the oldest mark it waits for is
//! reached, so a transaction of 1,000 records costs one wake-up, not 1,000.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use changewire_schemas::settings::KafkaConfig;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rdkafka::admin::AdminClient;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use crate::acks::Acks;
use crate::client::{client_config, Role};
use crate::topic::{admin_client, create_missing, TopicSpec};
use crate::{PublishError, Record};
use changewire_schemas::topic::TopicsConfig;

// The delivery opaque packs a lane id and the low half of a sequence number.
const _: () = assert!(usize::BITS == 64, "changewire needs a 64-bit target");
/// One in this many records has its time to acknowledgement measured.
const SAMPLE_EVERY: u64 = 64;
/// How long a publish waits for room before it tries again when the queue is full
/// (room may come from another lane's acknowledgements, which do not wake this one).
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// Metrics a lane keeps up to date (lanes may share them).
#[derive(Debug, Clone, Default)]
pub struct PublishMetrics {
    /// Time from publish to acknowledgement, sampled: one record in 64, the lane's
    /// first included.
    pub delivery_seconds: Option<Histogram>,
    /// Records published and not yet acknowledged.
    pub in_flight: Gauge,
}

/// Where an acknowledged record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    /// The partition.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

/// What became of one record of a lane with receipts.
pub type Receipt = Result<Landed, PublishError>;

/// Publishes records in lanes; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    producer: ThreadedProducer<LaneContext>,
    next_lane: Arc<AtomicU32>,
    /// One admin client for every topic a source creates (not one per table).
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// The `[topics]` section's creation settings.
    topics: Arc<TopicsConfig>,
}

impl Publisher {
    /// A producer with the `[kafka]` section's properties and the producer role's
    /// defaults (idempotent, `acks=all`, no delivery timeout).
    pub fn new(config: &KafkaConfig) -> Result<Self, PublishError> {
        Self::with_role(config, Role::Producer)
    }

    /// A producer for a source's change stream: [`Publisher::new`]'s defaults,
    /// and batches that wait longer to fill ([`Role::Source`]).
    pub fn for_source(config: &KafkaConfig) -> Result<Self, PublishError> {
        Self::with_role(config, Role::Source)
    }

    fn with_role(config: &KafkaConfig, role: Role) -> Result<Self, PublishError> {
        let context = LaneContext {
            lanes: RwLock::default(),
        };
        let producer = client_config(config, role)
            .create_with_context(context)
            .map_err(PublishError::Config)?;
        Ok(Self {
            producer,
            next_lane: Arc::default(),
            admin: Arc::new(admin_client(config)?),
            topics: Arc::default(),
        })
    }

    /// Creates topics with the `[topics]` section's replication factor and settings.
    pub fn with_topic_settings(mut self, topics: &TopicsConfig) -> Self {
        self.topics = Arc::new(topics.clone());
        self
    }

    /// A new lane whose marks carry `T`s, reporting into `metrics`.
    pub fn lane<T>(&self, metrics: PublishMetrics) -> Lane<T> {
        let id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LaneState::new(metrics));
        self.context()
            .lanes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, state.clone());
        Lane {
            publisher: self.clone(),
            id,
            state,
            next: 0,
            limit: usize::MAX,
            marks: VecDeque::new(),
        }
    }

    /// Asks the cluster for its metadata: proves the brokers are reachable.
    pub fn broker_count(&self, timeout: Duration) -> Result<usize, PublishError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(PublishError::Config)?;
        Ok(metadata.brokers().len())
    }

    /// Creates the topics of `specs` that do not exist yet.
    pub async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), PublishError> {
        let specs: Vec<TopicSpec> = (specs.iter())
            .map(|spec| spec.clone().configured(&self.topics))
            .collect();
        create_missing(&self.admin, &specs).await
    }

    /// The client's fatal error, once it has one (an idempotent producer that
    /// lost its sequence, say): nothing it sends will succeed any more.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producer.client().fatal_error()
    }

    /// The number of partitions of `topic` (0 while it does not exist).
    pub async fn partition_count(&self, topic: &str) -> Result<i32, PublishError> {
        let producer = self.producer.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(PublishError::Config)?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len() as i32))
        })
        .await
        .map_err(|_| PublishError::Interrupted)?
    }

    fn context(&self) -> &LaneContext {
        self.producer.context()
    }
}

/// One ordered stream of records and marks, owned by one task.
pub struct Lane<T> {
    publisher: Publisher,
    id: u32,
    state: Arc<LaneState>,
    /// The sequence number of the next record.
    next: u64,
    /// Most records in flight; `publish` waits for acknowledgements beyond it.
    limit: usize,
    /// Marks not yet handed back, each with the sequence number the watermark must
    /// reach for it to be confirmed.
    marks: VecDeque<(u64, T)>,
}

impl<T> Lane<T> {
    /// Keeps a receipt per record (where it landed, or why it failed) for
    /// [`Lane::receipts`]; a failed record then does not stop later marks.
    pub fn with_receipts(self) -> Self {
        self.state.book().receipts = Some(VecDeque::new());
        self
    }

    /// Waits until every record published so far is settled and returns the
    /// receipts of those published since the last call, in publish order (empty
    /// without [`Lane::with_receipts`]).
    pub async fn receipts(&mut self) -> Vec<Receipt> {
        self.state.reached(self.next).await;
        let mut book = self.state.book();
        let taken = (self.next - book.receipts_from) as usize;
        book.receipts_from = self.next;
        match &mut book.receipts {
            Some(receipts) => receipts
                .drain(..taken.min(receipts.len()))
                .map(|r| r.unwrap_or_else(|| Err(PublishError::Canceled)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Bounds the records in flight (and so memory while the broker is slow or
    /// down): `publish` waits for acknowledgements while `limit` are in flight.
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// Queues `record`, waiting while the lane's limit is reached or the producer's
    /// queue is full.
    pub async fn publish(&mut self, record: &Record<'_>) -> Result<(), PublishError> {
        if self.in_flight() >= self.limit {
            self.room().await?;
        }
        loop {
            match self.send(record) {
                Ok(()) => return Ok(()),
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    if let Some(failure) = self.state.failure() {
                        return Err(failure);
                    }
                    let wait = self.state.reached(self.state.watermark() + 1);
                    let _ = tokio::time::timeout(QUEUE_FULL_RETRY, wait).await;
                }
                Err(source) => {
                    return Err(PublishError::Rejected {
                        topic: record.topic.to_owned(),
                        source,
                    })
                }
            }
        }
    }

    fn send(&mut self, record: &Record<'_>) -> Result<(), KafkaError> {
        let opaque = (u64::from(self.id) << 32 | (self.next & u64::from(u32::MAX))) as usize;
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(record.topic, opaque);
        base.key = record.key;
        base.payload = record.value;
        base.partition = record.partition;
        if !record.headers.is_empty() {
            base = base.headers(headers(record.headers));
        }
        // Sampled before sending: the acknowledgement may come before `send` returns.
        let sampled =
            self.state.metrics.delivery_seconds.is_some() && self.next.is_multiple_of(SAMPLE_EVERY);
        if sampled {
            self.state
                .book()
                .samples
                .push_back((self.next, Instant::now()));
        }
        self.state.metrics.in_flight.inc();
        if let Err((error, _)) = self.publisher.producer.send(base) {
            self.state.metrics.in_flight.dec();
            if sampled {
                self.state.book().samples.pop_back();
            }
            return Err(error);
        }
        self.next += 1;
        Ok(())
    }

    /// Adds a mark after everything published so far.
    pub fn mark(&mut self, value: T) {
        self.marks.push_back((self.next, value));
    }

    /// Records published and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        (self.next - self.state.watermark()) as usize
    }

    /// Waits until fewer than the limit are in flight. Fails when a record failed
    /// for good.
    async fn room(&self) -> Result<(), PublishError> {
        let needed = (self.next + 1).saturating_sub(self.limit as u64);
        self.state.reached(needed).await;
        match self.state.failure() {
            Some(failure) if self.state.watermark() < needed => Err(failure),
            _ => Ok(()),
        }
    }

    /// Whether marks are waiting to be confirmed.
    pub fn has_marks(&self) -> bool {
        !self.marks.is_empty()
    }

    /// The oldest mark, once confirmed; `None` when there is no mark. Fails when a
    /// record published before it failed for good. Cancel-safe.
    pub async fn next_confirmed(&mut self) -> Option<Result<T, PublishError>> {
        let needed = self.marks.front()?.0;
        self.state.reached(needed).await;
        self.take_confirmed().transpose()
    }

    /// The oldest mark if it is already confirmed.
    pub fn take_confirmed(&mut self) -> Result<Option<T>, PublishError> {
        let Some(&(needed, _)) = self.marks.front() else {
            return Ok(None);
        };
        if self.state.watermark() >= needed {
            return Ok(self.marks.pop_front().map(|(_, value)| value));
        }
        match self.state.failure() {
            Some(failure) => Err(failure),
            None => Ok(None),
        }
    }
}

impl<T> Drop for Lane<T> {
    fn drop(&mut self) {
        self.publisher
            .context()
            .lanes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        // Reports still to come find no lane: take what they would have counted.
        self.state.metrics.in_flight.dec_by(self.in_flight() as i64);
    }
}

fn headers(headers: &[(&str, Option<&[u8]>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |all, &(key, value)| all.insert(Header { key, value }),
    )
}

/// What the delivery callback and a lane's owner share.
struct LaneState {
    metrics: PublishMetrics,
    book: Mutex<Book>,
    /// A copy of the watermark, read without the lock.
    watermark: AtomicU64,
    /// Whether `book.failure` is set, read without the lock.
    failed: AtomicBool,
    /// The watermark the owner waits for; the callback wakes it on reaching it.
    wake_at: AtomicU64,
    wake: Notify,
}

impl LaneState {
    fn new(metrics: PublishMetrics) -> Self {
        Self {
            metrics,
            book: Mutex::default(),
            watermark: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            wake_at: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::SeqCst)
    }

    /// The first failure, if a record failed for good.
    fn failure(&self) -> Option<PublishError> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        self.book().failure.clone()
    }

    /// Resolves once the watermark reaches `needed` or a record failed.
    async fn reached(&self, needed: u64) {
        loop {
            // Announce first, then look: an acknowledgement in between notifies, and
            // the permit it leaves ends the wait below at once.
            self.wake_at.store(needed, Ordering::SeqCst);
            if self.watermark() >= needed || self.failed.load(Ordering::SeqCst) {
                return;
            }
            self.wake.notified().await;
        }
    }

    /// The record with the low sequence bits `low` is settled: stored where
    /// `receipt` says, or failed.
    fn settled(&self, low: u32, receipt: Receipt) {
        self.metrics.in_flight.dec();
        let mut book = self.book();
        let watermark = book.acks.watermark();
        let seq = watermark + u64::from(low.wrapping_sub(watermark as u32));
        let from = book.receipts_from;
        match (&mut book.receipts, receipt) {
            (Some(receipts), receipt) => {
                let index = (seq - from) as usize;
                if receipts.len() <= index {
                    receipts.resize(index + 1, None);
                }
                receipts[index] = Some(receipt);
            }
            (None, Err(error)) => {
                drop(book);
                return self.failed(error);
            }
            (None, Ok(_)) => {}
        }
        if !book.acks.acknowledge(seq) {
            return;
        }
        let watermark = book.acks.watermark();
        self.watermark.store(watermark, Ordering::SeqCst);
        if let Some(histogram) = &self.metrics.delivery_seconds {
            while let Some(&(sampled, at)) = book.samples.front() {
                if sampled >= watermark {
                    break;
                }
                histogram.observe(at.elapsed().as_secs_f64());
                book.samples.pop_front();
            }
        }
        drop(book);
        if watermark >= self.wake_at.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The record failed for good.
    fn failed(&self, error: PublishError) {
        let mut book = self.book();
        if book.failure.is_none() {
            book.failure = Some(error);
            self.failed.store(true, Ordering::SeqCst);
        }
        drop(book);
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct Book {
    acks: Acks,
    /// The first record that failed for good: no later mark may be confirmed.
    failure: Option<PublishError>,
    /// Sampled publish times, by sequence number.
    samples: VecDeque<(u64, Instant)>,
    /// With receipts: one per record from `receipts_from` on, filled as reports
    /// arrive.
    receipts: Option<VecDeque<Option<Receipt>>>,
    receipts_from: u64,
}

/// The producer's context: routes delivery reports to their lanes.
struct LaneContext {
    lanes: RwLock<HashMap<u32, Arc<LaneState>>>,
}

impl ClientContext for LaneContext {}

impl ProducerContext for LaneContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (id, low) = ((opaque >> 32) as u32, opaque as u32);
        let lanes = self.lanes.read().unwrap_or_else(PoisonError::into_inner);
        // A dropped lane's late reports have no one left to tell.
        let Some(lane) = lanes.get(&id) else { return };
        let receipt = match result {
            Ok(message) => Ok(Landed {
                partition: message.partition(),
                offset: message.offset(),
            }),
            Err((source, message)) => Err(PublishError::Delivery {
                topic: message.topic().to_owned(),
                source: source.clone(),
            }),
        };
        lane.settled(low, receipt);
    }
}
