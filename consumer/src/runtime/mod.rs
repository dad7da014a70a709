//! The consumer runtime: every service runs on it.
//!
//! Guarantees: each event's state changes, its id and its partition offset are
//! written to sled in one atomic, flushed batch before the next message is read.
//! On assignment a partition starts from its sled offset (set in the assignment
//! itself); without one, from the group's Kafka offset, else the reset policy.
//! Events whose id was processed within the retention window are skipped. So within
//! one instance every event takes effect once; across a hand-over to another
//! instance (whose sled does not know this one's ids) an event may take effect again
//! (at-least-once), which is why services keep their effects idempotent.
//! Undecodable events and permanent handler failures go to `<prefix>.dlq.<service>`
//! with headers saying why; transient failures are retried with backoff, then
//! dead-lettered, so a poison message never stops the service.

mod handler;
mod store;

use std::collections::HashMap;
use std::time::Duration;

use changewire_schemas::diagnostics::report;
use changewire_schemas::Codec;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

pub use handler::{Context, Handler, HandlerError, RecordMeta};
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
}

/// Starts assigned partitions from the offsets in sled.
struct AssignFromStore {
    store: Store,
}

impl ClientContext for AssignFromStore {}

impl ConsumerContext for AssignFromStore {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, partition) in partitions {
                    // No sled offset: keep the default (the group's offset, else reset).
                    match self.store.offset(&topic, partition) {
                        Ok(Some(next)) => {
                            tracing::info!(%topic, partition, next, "starting from the sled offset");
                            let _ =
                                tpl.set_partition_offset(&topic, partition, Offset::Offset(next));
                        }
                        Ok(None) => {
                            tracing::info!(%topic, partition, "no sled offset: starting from the group's offset")
                        }
                        Err(error) => {
                            tracing::error!(%topic, partition, %error, "cannot read the sled offset: starting from the group's offset")
                        }
                    }
                }
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                if let Err(error) = consumer.assign(tpl) {
                    tracing::error!(%error, "cannot take the assignment");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Events are committed to sled one by one before the next poll, so
                // nothing is in flight when the group takes partitions away.
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "cannot give up the assignment");
                }
            }
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

/// Counters the runtime keeps (a metrics endpoint is future work).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Events applied by the handler.
    pub applied: u64,
    /// Events skipped as already processed.
    pub duplicates: u64,
    /// Records sent to the DLQ.
    pub dead_lettered: u64,
}

/// Runs `handler` as the service `config` describes until `shutdown` turns true.
pub async fn run<H: Handler>(
    config: &ConsumerConfig,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunStats, RuntimeError> {
    std::fs::create_dir_all(&config.service.state_dir)
        .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
    let store = Store::open(&config.service.state_dir)?;
    let pruned = store.prune_processed(config.retention())?;
    tracing::info!(
        pruned,
        "forgot processed ids older than the retention window"
    );
    let consumer = subscribe(config, store.clone())?;
    let dlq = DeadLetters::new(config)?;
    dlq.ensure_topic(config).await?;
    let codec = Codec::json()?;
    let mut stats = RunStats::default();
    let mut mirrored: HashMap<(String, i32), i64> = HashMap::new();
    let mut mirror = tokio::time::interval(MIRROR_INTERVAL);
    loop {
        let message = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            _ = mirror.tick() => {
                mirror_offsets(&consumer, &store, &mut mirrored);
                continue;
            }
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                continue;
            }
        };
        process(
            &message,
            config,
            &handler,
            &store,
            &dlq,
            &codec,
            &mut stats,
            &mut shutdown,
        )
        .await?;
    }
    mirror_offsets(&consumer, &store, &mut mirrored);
    tracing::info!(?stats, "consumer runtime stopped");
    Ok(stats)
}

/// A Kafka client configuration with the `[kafka]` section's properties.
fn client_config(config: &ConsumerConfig) -> ClientConfig {
    config
        .kafka
        .client_properties()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn subscribe(
    config: &ConsumerConfig,
    store: Store,
) -> Result<StreamConsumer<AssignFromStore>, RuntimeError> {
    let mut client = client_config(config);
    client
        .set("group.id", config.group_id())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    if client.get("auto.offset.reset").is_none() {
        client.set("auto.offset.reset", "earliest");
    }
    let consumer: StreamConsumer<AssignFromStore> =
        client.create_with_context(AssignFromStore { store })?;
    let topics: Vec<&str> = config
        .service
        .subscribe
        .iter()
        .map(String::as_str)
        .collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Copies the sled offsets of the assigned partitions to Kafka's committed offsets,
/// for lag tools and for a partition's next owner. Best effort: sled is the truth.
fn mirror_offsets(
    consumer: &StreamConsumer<AssignFromStore>,
    store: &Store,
    mirrored: &mut HashMap<(String, i32), i64>,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for element in assignment.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let Ok(Some(next)) = store.offset(topic, partition) else {
            continue;
        };
        if mirrored.insert((topic.to_owned(), partition), next) != Some(next) {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
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

#[allow(clippy::too_many_arguments)]
async fn process<H: Handler>(
    message: &BorrowedMessage<'_>,
    config: &ConsumerConfig,
    handler: &H,
    store: &Store,
    dlq: &DeadLetters,
    codec: &Codec,
    stats: &mut RunStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    let meta = RecordMeta {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
    };
    let commit_offset_only = |store: &Store| {
        store.commit(
            StateChanges::default(),
            None,
            &meta.topic,
            meta.partition,
            meta.offset,
        )
    };
    let event = match codec.decode(message.payload().unwrap_or_default()) {
        Ok(event) => event,
        Err(error) => {
            dlq.send(
                message,
                &format!("undecodable: {}", report(&error)),
                shutdown,
            )
            .await;
            stats.dead_lettered += 1;
            return Ok(commit_offset_only(store)?);
        }
    };
    if store.is_processed(event.id.as_str())? {
        stats.duplicates += 1;
        return Ok(commit_offset_only(store)?);
    }
    let mut delay = RETRY_MIN;
    for attempt in 1.. {
        let mut context = Context::new(store);
        let failure = match handler.handle(&event, &meta, &mut context).await {
            Ok(()) => {
                store.commit(
                    context.into_changes(),
                    Some(event.id.as_str()),
                    &meta.topic,
                    meta.partition,
                    meta.offset,
                )?;
                stats.applied += 1;
                return Ok(());
            }
            Err(HandlerError::Transient(error)) if attempt < config.service.max_attempts => {
                tracing::warn!(event = %event.id, attempt, error = %report(error.as_ref()), "transient failure; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    // Leave the offset where it is: the event is retried after a restart.
                    () = stopped(shutdown) => return Ok(()),
                }
                delay = (delay * 2).min(RETRY_MAX);
                continue;
            }
            Err(HandlerError::Transient(error)) => {
                format!(
                    "gave up after {attempt} attempts: {}",
                    report(error.as_ref())
                )
            }
            Err(HandlerError::Permanent(error)) => format!("rejected: {}", report(error.as_ref())),
        };
        dlq.send(message, &failure, shutdown).await;
        stats.dead_lettered += 1;
        break;
    }
    Ok(commit_offset_only(store)?)
}

/// Publishes records the service cannot apply, with the reason in headers.
struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: String,
}

impl DeadLetters {
    fn new(config: &ConsumerConfig) -> Result<Self, RuntimeError> {
        let mut client = client_config(config);
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0");
        let topic = config
            .topics
            .names()
            .and_then(|names| names.dlq(&config.service.name))
            .map_err(|e| {
                changewire_schemas::settings::ConfigError::invalid("service.name", e.to_string())
            })?;
        Ok(Self {
            producer: client.create()?,
            topic,
            service: config.service.name.clone(),
        })
    }

    /// Creates the DLQ topic when missing (brokers may not auto-create it).
    async fn ensure_topic(&self, config: &ConsumerConfig) -> Result<(), RuntimeError> {
        let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics([&topic], &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(RuntimeError::Kafka(rdkafka::error::KafkaError::AdminOp(
                        code,
                    )))
                    .inspect_err(|_| tracing::error!(%topic, "cannot create the DLQ topic"))
                }
            }
        }
        Ok(())
    }

    /// Sends `message` to the DLQ and waits for the acknowledgement, retrying until
    /// it is stored (the offset must not move past a record that went nowhere).
    async fn send(
        &self,
        message: &BorrowedMessage<'_>,
        reason: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "dead-lettering"
        );
        let (partition, offset) = (
            message.partition().to_string(),
            message.offset().to_string(),
        );
        let headers = [
            (dlq_headers::ERROR, reason),
            (dlq_headers::TOPIC, message.topic()),
            (dlq_headers::PARTITION, partition.as_str()),
            (dlq_headers::OFFSET, offset.as_str()),
            (dlq_headers::SERVICE, self.service.as_str()),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
        let mut delay = RETRY_MIN;
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => return,
                Err((error, _)) => {
                    tracing::error!(%error, topic = %self.topic, "cannot write to the DLQ; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(shutdown) => return,
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

/// Resolves once shutdown was requested; holds no watch guard across awaits.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
