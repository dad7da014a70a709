//! The consumer runtime: every service runs on it.
//!
//! Records are read in batches (whatever the client has fetched, up to
//! `service.max_batch`). For each batch the handler's state changes, the event ids
//! it applied and the partition offsets are written to sled in one atomic, flushed
//! write, on a blocking thread while the next batch is applied (reading the
//! previous batch's state in memory); once it is durable,
//! [`Handler::committed`] starts the batch's outward effects, which settle while
//! later batches are read (a few batches at most). A batch's offsets
//! are mirrored to Kafka (for lag tools and the next owner of a partition) only
//! once it and every batch before it settled.
//!
//! On assignment a partition starts from its sled offset, set in the assignment
//! itself; without one, from the group's Kafka offset, else `auto.offset.reset`
//! (default `earliest`). Events whose id was processed within the retention window
//! are skipped: the ids are looked up in memory and stored as one segment per batch
//! (see `runtime/ids.rs`).
//!
//! The guarantee: within one instance every event takes effect once
//! (effectively-once), because its effects, id and offset become durable together.
//! Across a hand-over to another instance it is at-least-once: the new owner starts
//! from the offset mirrored to Kafka, which may trail sled by up to one mirror
//! interval when the old owner died without a clean revocation, and its own sled
//! does not know the old owner's ids, so a few events may take effect again.
//!
//! Undecodable records and permanent handler failures go to `<prefix>.dlq.<service>`
//! with headers saying why; transient failures are retried with exponential backoff
//! (only the record's partition waits, paused, its later records held in order),
//! then dead-lettered, so a poison message never stops the service.
//! Tombstones (records without a value) are skipped.

mod assign;
mod dlq;
mod handler;
mod ids;
mod metrics;
mod store;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use changewire_schemas::diagnostics::report;
use changewire_schemas::{ChangeEvent, Codec};
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use assign::{Assignment, PartitionKey, ServiceContext};
use dlq::DeadLetters;
pub use handler::{settled, Context, Handler, HandlerError, Record, Settlement};
use ids::{IdDigest, ProcessedIds};
pub use metrics::{ConsumerMetrics, Outcome, ServiceState};
pub use store::{StateChanges, Store, StoreError};

use crate::config::ConsumerConfig;

/// Headers on dead-lettered records.
pub mod dlq_headers {
    /// Why the record was dead-lettered.
    pub const ERROR: &str = "changewire-dlq-error";
    /// Topic it was read from.
    pub const TOPIC: &str = "changewire-dlq-topic";
    /// Partition it was read from.
    pub const PARTITION: &str = "changewire-dlq-partition";
    /// Offset it was read from.
    pub const OFFSET: &str = "changewire-dlq-offset";
    /// The service that gave up on it.
    pub const SERVICE: &str = "changewire-dlq-service";
}

/// How often committed offsets are mirrored to Kafka (for lag tools and hand-over).
const MIRROR_INTERVAL: Duration = Duration::from_millis(500);
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Batches whose effects may be unconfirmed at once; reading pauses beyond.
const MAX_UNSETTLED: usize = 4;
/// How long a stopping service waits for batches in flight to settle.
const SETTLE_ON_EXIT: Duration = Duration::from_secs(10);

/// Settlements of batches in flight, oldest first, each with its offsets.
type Settling = FuturesOrdered<
    futures::future::BoxFuture<'static, (Result<(), HandlerError>, HashMap<PartitionKey, i64>)>,
>;
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store failed.
    #[error("state store failed")]
    Store(#[from] StoreError),
    /// The Kafka client failed.
    #[error("Kafka client failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The codec could not be built.
    #[error("codec failed")]
    Codec(#[from] changewire_schemas::CodecError),
    /// The configuration cannot be used.
    #[error("invalid configuration")]
    Config(#[from] changewire_schemas::settings::ConfigError),
    /// The HTTP endpoint could not listen.
    #[error("cannot serve HTTP on {address}")]
    Http {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of one run (the same figures are in [`ConsumerMetrics`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Events applied by the handler.
    pub applied: u64,
    /// Events skipped as already processed.
    pub duplicates: u64,
    /// Records sent to the DLQ.
    pub dead_lettered: u64,
}

/// Runs `handler` as the service `config` describes until `shutdown` turns true,
/// serving `/metrics` and `/health` when `[http]` is configured.
pub async fn run<H: Handler>(
    config: &ConsumerConfig,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> Result<RunStats, RuntimeError> {
    let metrics = Arc::new(ConsumerMetrics::default());
    let server = match &config.http {
        Some(http) => {
            let listener = tokio::net::TcpListener::bind(http.listen)
                .await
                .map_err(|source| RuntimeError::Http {
                    address: http.listen,
                    source,
                })?;
            tracing::info!(listen = %http.listen, "serving /metrics and /health");
            let router = changewire_schemas::http::router(metrics.clone(), http.token.clone());
            Some(tokio::spawn(changewire_schemas::http::serve(
                listener, router,
            )))
        }
        None => None,
    };
    let result = run_observed(config, handler, shutdown, metrics).await;
    if let Some(server) = server {
        server.abort();
    }
    result
}

/// [`run`] with metrics the caller holds (and serves, if it wants).
pub async fn run_observed<H: Handler>(
    config: &ConsumerConfig,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<ConsumerMetrics>,
) -> Result<RunStats, RuntimeError> {
    std::fs::create_dir_all(&config.service.state_dir)
        .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
    let store = Store::open(&config.service.state_dir)?;
    let processed =
        ProcessedIds::load(&store, config.retention(), config.service.max_processed_ids)?;
    metrics.processed_ids.set(processed.len() as i64);
    let dlq = DeadLetters::new(config)?;
    dlq.ensure_topic(config).await?;
    metrics.set_state(ServiceState::Recovering);
    let recovered = until_done(
        "recovering interrupted effects",
        || handler.recover(&store),
        &metrics,
        &mut shutdown,
    )
    .await
    .is_some();
    let mut worker = Worker {
        config,
        handler,
        store,
        dlq,
        codec: Codec::json()?,
        metrics,
        assignment: Arc::new(Assignment::default()),
        stats: RunStats::default(),
        processed,
        parked: HashMap::new(),
        writing: None,
    };
    if recovered {
        worker.consume(&mut shutdown).await?;
    }
    worker.metrics.set_state(ServiceState::Stopped);
    tracing::info!(stats = ?worker.stats, "consumer runtime stopped");
    Ok(worker.stats)
}

/// A Kafka client configuration with the `[kafka]` section's properties.
pub fn client_config(config: &ConsumerConfig) -> ClientConfig {
    config
        .kafka
        .client_properties()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Creates `topic` with `partitions` when missing (brokers may not auto-create).
pub async fn ensure_topic(
    config: &ConsumerConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), RuntimeError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(%topic, %code, "cannot create the topic");
                return Err(rdkafka::error::KafkaError::AdminOp(code).into());
            }
        }
    }
    Ok(())
}

/// Reads batches, applies them through the handler and commits them.
struct Worker<'a, H> {
    config: &'a ConsumerConfig,
    handler: H,
    store: Store,
    dlq: DeadLetters,
    codec: Codec,
    metrics: Arc<ConsumerMetrics>,
    assignment: Arc<Assignment>,
    stats: RunStats,
    /// Event ids processed within the retention window.
    processed: ProcessedIds,
    /// Partitions waiting to retry their head record after a transient failure.
    parked: HashMap<PartitionKey, Parked>,
    /// The previous batch, while its sled write runs next to the current batch.
    writing: Option<Writing>,
}

/// A batch whose atomic sled write runs on a blocking thread while the next batch
/// is applied (which reads the batch's changes in memory meanwhile); its
/// effects start once the write is durable.
struct Writing {
    batch: Arc<Batch>,
    /// The write; taken once it was awaited.
    write: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
}

/// A partition whose record failed transiently: it is paused and its later
/// records are held here, in order, while the instance's other partitions go on;
/// when the retry is due, the failed record and the held ones run again.
struct Parked {
    /// The failed record.
    record: Record,
    /// Records of the partition that came after it.
    held: Vec<Record>,
    attempts: u32,
    delay: Duration,
    until: tokio::time::Instant,
    /// Paused in the client (done after the batch that parked it commits).
    paused: bool,
}

/// What one batch changes, committed to sled in one write.
#[derive(Default)]
struct Batch {
    changes: StateChanges,
    /// Digests of the event ids applied.
    processed: Vec<IdDigest>,
    offsets: HashMap<PartitionKey, i64>,
}

impl Batch {
    /// Marks `record` done: the partition's next offset moves past it.
    fn done(&mut self, record: &Record) {
        self.offsets
            .insert((record.topic.clone(), record.partition), record.offset + 1);
    }
}

/// Whether work ran to the end or stopped for shutdown.
#[derive(PartialEq, Eq)]
enum Step {
    Done,
    Interrupted,
    /// The record failed transiently: its partition waits, the batch goes on.
    Parked,
}

impl<H: Handler> Worker<'_, H> {
    async fn consume(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), RuntimeError> {
        let consumer = self.subscribe()?;
        self.metrics.set_state(ServiceState::Consuming);
        let mut mirrored: HashMap<PartitionKey, i64> = HashMap::new();
        let mut mirror = tokio::time::interval(MIRROR_INTERVAL);
        let mut settling = Settling::new();
        let mut orphans = OrphanWatch::new();
        loop {
            let first = tokio::select! {
                biased;
                () = stopped(shutdown) => break,
                _ = orphans.tick() => {
                    orphans.check(&self.assignment, &consumer, self.config)?;
                    continue;
                }
                written = written(&mut self.writing), if self.writing.as_ref().is_some_and(|w| w.write.is_some()) => {
                    written?;
                    if !self.start_effects(&mut settling, shutdown).await {
                        break;
                    }
                    continue;
                }
                () = next_retry(&self.parked), if !self.parked.is_empty() => Retry::Due,
                Some((result, offsets)) = settling.next(), if !settling.is_empty() => {
                    if !self.settle(result, offsets, &mut settling, shutdown).await? {
                        break;
                    }
                    continue;
                }
                _ = mirror.tick() => {
                    self.mirror_offsets(&consumer, &mut mirrored);
                    continue;
                }
                message = consumer.recv(), if settling.len() < MAX_UNSETTLED => Retry::No(message),
            };
            let records = match first {
                Retry::Due => self.unpark_due(&consumer),
                Retry::No(first) => self.collect_batch(first, &consumer).await,
            };
            let (mut batch, step) = self.apply(records, shutdown).await?;
            // The previous batch's write ran meanwhile; its effects start before
            // this batch is sealed (a handler seals one batch at a time).
            if self.writing.is_some() {
                written(&mut self.writing).await?;
                if !self.start_effects(&mut settling, shutdown).await {
                    break;
                }
            }
            self.handler.seal(&mut batch.changes);
            if step == Step::Interrupted {
                self.write(batch)?;
                written(&mut self.writing).await?;
                break;
            }
            self.pause_parked(&consumer);
            self.write(batch)?;
            if self.parked.is_empty() {
                self.metrics.set_state(ServiceState::Consuming);
            }
        }
        if self.writing.is_some() {
            written(&mut self.writing).await?;
            self.start_effects(&mut settling, shutdown).await;
        }
        self.finish_settling(&mut settling).await;
        self.mirror_offsets(&consumer, &mut mirrored);
        Ok(())
    }

    /// Starts the effects of the batch whose write just finished; false if shutdown
    /// came first (they are then recovered at the next start).
    async fn start_effects(
        &mut self,
        settling: &mut Settling,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let Some(done) = self.writing.take() else {
            return true;
        };
        let (store, handler) = (&self.store, &self.handler);
        let started = until_done(
            "starting the batch's effects",
            || handler.committed(store),
            &self.metrics,
            shutdown,
        )
        .await;
        let Some(settlement) = started else {
            return false;
        };
        let offsets = done.batch.offsets.clone();
        settling.push_back(Box::pin(async move { (settlement.await, offsets) }));
        true
    }

    /// Starts the batch's atomic sled write on a blocking thread.
    fn write(&mut self, mut batch: Batch) -> Result<(), StoreError> {
        let forgotten = self.processed.expire(&self.store)?;
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot ids older than the retention window");
        }
        let segment = self.processed.segment(std::mem::take(&mut batch.processed));
        self.metrics.processed_ids.set(self.processed.len() as i64);
        let batch = Arc::new(batch);
        let (store, metrics, writing) = (self.store.clone(), self.metrics.clone(), batch.clone());
        let write = tokio::task::spawn_blocking(move || {
            if writing.offsets.is_empty() {
                return Ok(());
            }
            let started = Instant::now();
            store.commit(&writing.changes, &segment, &writing.offsets)?;
            metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(())
        });
        self.writing = Some(Writing {
            batch,
            write: Some(write),
        });
        Ok(())
    }

    /// The batch `first` starts: what else arrives within the linger, up to
    /// `max_batch`. Larger batches amortize the flush and the outward round trip.
    async fn collect_batch(
        &self,
        first: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
        consumer: &StreamConsumer<ServiceContext>,
    ) -> Vec<Record> {
        let mut records = Vec::new();
        collect(first, &mut records);
        let linger = tokio::time::Instant::now() + self.config.batch_linger();
        while records.len() < self.config.service.max_batch {
            match consumer.recv().now_or_never() {
                Some(message) => collect(message, &mut records),
                None => match tokio::time::timeout_at(linger, consumer.recv()).await {
                    Ok(message) => collect(message, &mut records),
                    Err(_) => break,
                },
            }
        }
        records
    }

    /// Takes the oldest batch's settlement: its offsets may go to Kafka. After a
    /// failure, waits for the other batches and recovers. False if shutdown came
    /// before the recovery succeeded.
    async fn settle(
        &mut self,
        result: Result<(), HandlerError>,
        offsets: HashMap<PartitionKey, i64>,
        settling: &mut Settling,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, RuntimeError> {
        let mut done = vec![offsets];
        if let Err(error) = result {
            tracing::warn!(error = %report(&error), "a batch's effects failed; recovering once the batches in flight settle");
            while let Some((_, offsets)) = settling.next().await {
                done.push(offsets);
            }
            // The recovery reads the outbox: the batch being written belongs in it.
            written(&mut self.writing).await?;
            let (store, handler) = (&self.store, &self.handler);
            let recovered = until_done(
                "recovering the batches' effects",
                || handler.recover(store),
                &self.metrics,
                shutdown,
            )
            .await;
            if recovered.is_none() {
                return Ok(false);
            }
        }
        for offsets in &done {
            self.assignment.settle(offsets);
        }
        Ok(true)
    }

    /// On the way out: waits a while for the batches in flight; what does not
    /// settle stays in sled for [`Handler::recover`] at the next start.
    async fn finish_settling(&self, settling: &mut Settling) {
        let deadline = tokio::time::Instant::now() + SETTLE_ON_EXIT;
        while let Ok(Some((result, offsets))) =
            tokio::time::timeout_at(deadline, settling.next()).await
        {
            match result {
                Ok(()) => self.assignment.settle(&offsets),
                Err(error) => {
                    tracing::warn!(error = %report(&error), "a batch's effects failed at shutdown; recovered at the next start");
                    return;
                }
            }
        }
        if !settling.is_empty() {
            tracing::warn!(
                batches = settling.len(),
                "batches' effects unconfirmed at shutdown; recovered at the next start"
            );
        }
    }

    fn subscribe(&self) -> Result<StreamConsumer<ServiceContext>, RuntimeError> {
        let config = self.config;
        let mut client = client_config(config);
        client
            .set("group.id", config.group_id())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (key, default) in [
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
        ] {
            if client.get(key).is_none() {
                client.set(key, default);
            }
        }
        let consumer: StreamConsumer<ServiceContext> =
            client.create_with_context(ServiceContext {
                store: self.store.clone(),
                assignment: self.assignment.clone(),
                metrics: self.metrics.clone(),
                rewind: config.service.resume_rewind,
            })?;
        consumer.subscribe(&subscribed(config))?;
        Ok(consumer)
    }

    /// Copies the settled offsets of owned partitions (batches durable in sled with
    /// their effects confirmed) to Kafka's committed offsets, for lag tools and for
    /// a partition's next owner. Best effort: sled is the truth.
    fn mirror_offsets(
        &self,
        consumer: &StreamConsumer<ServiceContext>,
        mirrored: &mut HashMap<PartitionKey, i64>,
    ) {
        let owned: Vec<PartitionKey> = self.assignment.lock().keys().cloned().collect();
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in owned {
            let Some(next) = self.assignment.settled(&(topic.clone(), partition)) else {
                continue;
            };
            if mirrored.insert((topic.clone(), partition), next) != Some(next) {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "mirroring offsets to Kafka failed");
            mirrored.clear();
        }
    }

    /// Applies `records` in order; stops early (committing what is done) on shutdown.
    async fn apply(
        &mut self,
        records: Vec<Record>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(Batch, Step), RuntimeError> {
        let mut batch = Batch::default();
        for record in records {
            let Some(record) = self.hold(record) else {
                continue;
            };
            if !self.owns(&record) {
                continue;
            }
            if self.apply_one(&record, &mut batch, shutdown).await? == Step::Interrupted {
                return Ok((batch, Step::Interrupted));
            }
        }
        Ok((batch, Step::Done))
    }

    /// Holds `record` back if its partition waits to retry an earlier record;
    /// otherwise gives it back.
    fn hold(&mut self, record: Record) -> Option<Record> {
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

    /// Pauses each newly parked partition (records it already fetched are held as
    /// they come) and expects its failed record again.
    fn pause_parked(&mut self, consumer: &StreamConsumer<ServiceContext>) {
        for ((topic, partition), parked) in &mut self.parked {
            if parked.paused {
                continue;
            }
            parked.paused = true;
            if let Some(expected) = self.assignment.lock().get_mut(&(topic.clone(), *partition)) {
                *expected = Some(parked.record.offset);
            }
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition(topic, *partition);
            if let Err(error) = consumer.pause(&tpl) {
                tracing::warn!(%topic, partition, %error, "cannot pause the partition for its retry");
            }
        }
    }

    /// The records of the partitions whose retry is due, in order (the failed
    /// record first), their partitions resumed; forgets partitions no longer owned.
    fn unpark_due(&mut self, consumer: &StreamConsumer<ServiceContext>) -> Vec<Record> {
        let now = tokio::time::Instant::now();
        let owned = self
            .assignment
            .lock()
            .keys()
            .cloned()
            .collect::<HashSet<_>>();
        self.parked.retain(|key, _| owned.contains(key));
        let mut records = Vec::new();
        for ((topic, partition), parked) in &mut self.parked {
            if !parked.paused || parked.until > now {
                continue;
            }
            // The failed record runs again (with its attempt count, see `handle`).
            parked.paused = false;
            records.push(parked.record.clone());
            records.append(&mut parked.held);
            let mut tpl = TopicPartitionList::new();
            let _ = tpl.add_partition(topic, *partition);
            if let Err(error) = consumer.resume(&tpl) {
                tracing::warn!(%topic, partition, %error, "cannot resume the partition for its retry");
            }
        }
        if self.parked.is_empty() {
            self.metrics.set_state(ServiceState::Consuming);
            self.metrics.set_error(None);
        }
        records
    }

    /// Whether `record` is from a partition this instance owns and at or past the
    /// sled offset (records before it are the rewind, or already applied), and not
    /// from the service's own DLQ.
    fn owns(&self, record: &Record) -> bool {
        // A pattern subscription may match the service's own DLQ: dead-lettering
        // those records again would loop. They are stored there already.
        if record.topic == self.dlq.topic() {
            return false;
        }
        let mut owned = self.assignment.lock();
        let Some(expected) = owned.get_mut(&(record.topic.clone(), record.partition)) else {
            return false;
        };
        match *expected {
            Some(next) if record.offset < next => return false,
            Some(next) if record.offset > next => {
                self.metrics.offset_gaps.inc();
                tracing::warn!(
                    topic = %record.topic,
                    partition = record.partition,
                    expected = next,
                    got = record.offset,
                    "the broker skipped offsets (compaction or transaction markers; or a broker \
                     that serves a fetch from inside a record batch with the next batch: raise \
                     service.resume_rewind)"
                );
            }
            _ => {}
        }
        *expected = Some(record.offset + 1);
        true
    }

    async fn apply_one(
        &mut self,
        record: &Record,
        batch: &mut Batch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Step, RuntimeError> {
        if record.payload.is_empty() {
            // A tombstone after a delete: nothing to apply.
            batch.done(record);
            return Ok(Step::Done);
        }
        let event = match self.codec.decode(&record.payload) {
            Ok(event) => event,
            Err(error) => {
                let reason = format!("undecodable: {}", report(&error));
                return Ok(self.dead_letter(record, &reason, batch, shutdown).await);
            }
        };
        let digest = ids::digest(event.id.as_str());
        if self.processed.contains(digest) {
            self.stats.duplicates += 1;
            self.metrics.count(&record.topic, Outcome::Duplicate);
            batch.done(record);
            return Ok(Step::Done);
        }
        Ok(match self.handle(&event, digest, record, batch).await {
            Ok(step) => step,
            Err(reason) => self.dead_letter(record, &reason, batch, shutdown).await,
        })
    }

    /// Runs the handler once. A transient failure parks the record's partition
    /// (retried later with backoff, the other partitions going on) until the
    /// attempts run out. `Err` carries why the event goes to the DLQ.
    async fn handle(
        &mut self,
        event: &ChangeEvent,
        digest: IdDigest,
        record: &Record,
        batch: &mut Batch,
    ) -> Result<Step, String> {
        let earlier = if self.parked.is_empty() {
            None
        } else {
            self.parked
                .remove(&(record.topic.clone(), record.partition))
                .filter(|p| p.record.offset == record.offset)
        };
        let attempt = earlier.as_ref().map_or(1, |p| p.attempts + 1);
        let started = Instant::now();
        let previous = self.writing.as_ref().map(|w| &w.batch.changes);
        let mut context = Context::new(&self.store, &batch.changes, previous);
        let result = self.handler.handle(event, record, &mut context).await;
        let changes = context.into_changes();
        self.metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                batch.changes.extend(changes);
                // In memory at once: later records of this batch and the next
                // ones see it while the batch's write is under way.
                self.processed.insert(digest);
                batch.processed.push(digest);
                batch.done(record);
                self.stats.applied += 1;
                self.metrics.count(&record.topic, Outcome::Applied);
                Ok(Step::Done)
            }
            Err(HandlerError::Transient(error)) if attempt < self.config.service.max_attempts => {
                let error = report(error.as_ref());
                let delay = earlier.map_or(RETRY_MIN, |p| (p.delay * 2).min(RETRY_MAX));
                tracing::warn!(event = %event.id, attempt, %error, retry_in = ?delay, "transient failure; its partition waits, the others go on");
                self.metrics.retries.inc();
                self.metrics
                    .set_error(Some(format!("retrying {}: {error}", event.id)));
                self.metrics.set_state(ServiceState::Retrying);
                // The offset stays before the event: it is retried after a restart too.
                self.parked.insert(
                    (record.topic.clone(), record.partition),
                    Parked {
                        record: record.clone(),
                        held: Vec::new(),
                        attempts: attempt,
                        delay,
                        until: tokio::time::Instant::now() + delay,
                        paused: false,
                    },
                );
                Ok(Step::Parked)
            }
            Err(HandlerError::Transient(error)) => Err(format!(
                "gave up after {attempt} attempts: {}",
                report(error.as_ref())
            )),
            Err(HandlerError::Permanent(error)) => {
                Err(format!("rejected: {}", report(error.as_ref())))
            }
        }
    }

    async fn dead_letter(
        &mut self,
        record: &Record,
        reason: &str,
        batch: &mut Batch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Step {
        if !self.dlq.send(record, reason, shutdown).await {
            return Step::Interrupted;
        }
        self.stats.dead_lettered += 1;
        self.metrics.count(&record.topic, Outcome::DeadLettered);
        batch.done(record);
        Step::Done
    }
}

/// The topics (or `^` patterns) the service subscribes.
fn subscribed(config: &ConsumerConfig) -> Vec<&str> {
    config
        .service
        .subscribe
        .iter()
        .map(String::as_str)
        .collect()
}

/// Notices an instance the group left without partitions although it is the
/// group's only member (seen on tansu 0.6 after a member died: the survivor's
/// assignment stays empty and no rebalance follows), and rejoins the group.
struct OrphanWatch {
    interval: tokio::time::Interval,
    since: Option<tokio::time::Instant>,
}

/// How long an instance may own no partition before the group is looked at.
const ORPHAN_AFTER: Duration = Duration::from_secs(15);

impl OrphanWatch {
    fn new() -> Self {
        Self {
            interval: tokio::time::interval(ORPHAN_AFTER / 3),
            since: None,
        }
    }

    async fn tick(&mut self) {
        self.interval.tick().await;
    }

    /// Describes the group with the consumer's own client. It blocks for one round
    /// trip, which costs nothing here: without partitions the instance is idle.
    fn check(
        &mut self,
        assignment: &Assignment,
        consumer: &StreamConsumer<ServiceContext>,
        config: &ConsumerConfig,
    ) -> Result<(), RuntimeError> {
        if !assignment.lock().is_empty() {
            self.since = None;
            return Ok(());
        }
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < ORPHAN_AFTER {
            return Ok(());
        }
        let group = config.group_id();
        let members = consumer
            .client()
            .fetch_group_list(Some(&group), Duration::from_secs(5))
            .map(|list| list.groups().first().map_or(0, |g| g.members().len()));
        match members {
            Ok(members) if members <= 1 => {
                tracing::warn!(
                    members,
                    "no partitions although no other member shares the group: rejoining"
                );
                consumer.unsubscribe();
                consumer.subscribe(&subscribed(config))?;
                self.since = None;
            }
            Ok(members) => tracing::debug!(members, "no partitions: other members own them"),
            Err(error) => tracing::debug!(%error, "cannot describe the group"),
        }
        Ok(())
    }
}

/// Adds a polled message to `records` as an owned [`Record`]; logs client errors
/// (librdkafka retries them itself).
fn collect(
    message: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    records: &mut Vec<Record>,
) {
    match message {
        Ok(message) => records.push(Record {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
            payload: message.payload().unwrap_or_default().to_vec(),
        }),
        Err(error) => tracing::warn!(%error, "consumer error"),
    }
}

/// Runs `attempt` until it succeeds, with backoff; `None` if shutdown came first.
async fn until_done<F, Fut, T>(
    what: &str,
    mut attempt: F,
    metrics: &ConsumerMetrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, HandlerError>>,
{
    let mut delay = RETRY_MIN;
    loop {
        match attempt().await {
            Ok(value) => {
                metrics.set_error(None);
                return Some(value);
            }
            Err(error) => {
                let error = report(&error);
                tracing::warn!(%error, "{what} failed; retrying");
                metrics.set_error(Some(format!("{what}: {error}")));
                metrics.set_state(ServiceState::Retrying);
                metrics.retries.inc();
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(shutdown) => return None,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// A shutdown switch that turns true on SIGTERM or SIGINT, for [`run`].
pub fn stop_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop, shutdown) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutting down: finishing the batch at hand");
        let _ = stop.send(true);
    });
    Ok(shutdown)
}

/// Waits for the write under way, if any, to finish (the batch stays in place for
/// `Worker::start_effects`).
async fn written(writing: &mut Option<Writing>) -> Result<(), RuntimeError> {
    let Some(writing) = writing.as_mut() else {
        return Ok(());
    };
    let Some(write) = writing.write.as_mut() else {
        return Ok(());
    };
    // Awaited by reference: a `select!` may drop this future and call again.
    let result = write.await;
    writing.write = None;
    match result {
        Ok(result) => Ok(result?),
        Err(panicked) => {
            Err(StoreError::from(sled::Error::Io(std::io::Error::other(panicked))).into())
        }
    }
}

/// Whether a batch starts with a polled record or with the records of partitions
/// whose retry is due.
enum Retry<M> {
    Due,
    No(M),
}

/// Resolves when the earliest parked partition's retry is due.
async fn next_retry(parked: &HashMap<PartitionKey, Parked>) {
    let paused = parked.values().filter(|p| p.paused);
    match paused.map(|p| p.until).min() {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown was requested; holds no watch guard across awaits.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
