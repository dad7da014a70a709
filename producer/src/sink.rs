//! The event sink seam: where normalized events leave the producer.
//!
//! A source hands records to an [`EventSink`] and gets back a future per record that
//! resolves when the record is durably acknowledged. Sources checkpoint (confirm an
//! LSN, store a resourceVersion) only after every record up to that point resolved.

use std::future::Future;
use std::time::Duration;

use changewire_schemas::settings::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    /// Destination topic.
    pub topic: String,
    /// Message key (entity identity, so per-entity order holds in a partition).
    pub key: Option<Vec<u8>>,
    /// Encoded event; `None` publishes a tombstone.
    pub value: Option<Vec<u8>>,
    /// Message headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where an acknowledged record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Partition the broker chose.
    pub partition: i32,
    /// Offset within that partition.
    pub offset: i64,
}

/// A record the sink could not accept or deliver.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The local queue is full: wait for acknowledgements, then retry.
    #[error("the Kafka producer queue is full")]
    QueueFull,
    /// The broker rejected the record or delivery failed.
    #[error("Kafka delivery to {topic} failed")]
    Delivery {
        /// Destination topic.
        topic: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The producer was dropped before the record was acknowledged.
    #[error("the Kafka producer shut down before acknowledging the record")]
    Canceled,
    /// A topic could not be created.
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic {
        /// Topic name.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    /// The client could not be created from the configuration.
    #[error("invalid Kafka client configuration")]
    Config(#[source] KafkaError),
}

impl SinkError {
    /// Whether the same record may succeed later (broker down, queue full); a
    /// permanent error (record too large, bad config) needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::QueueFull | SinkError::Canceled | SinkError::CreateTopic { .. } => true,
            SinkError::Delivery { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageTimedOut
                        | RDKafkaErrorCode::AllBrokersDown
                        | RDKafkaErrorCode::BrokerTransportFailure
                        | RDKafkaErrorCode::RequestTimedOut
                        | RDKafkaErrorCode::NotEnoughReplicas
                        | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                        | RDKafkaErrorCode::LeaderNotAvailable
                        | RDKafkaErrorCode::NotLeaderForPartition
                )
            ),
            SinkError::Config(_) => false,
        }
    }
}

/// Accepts records and reports when each is durably stored.
pub trait EventSink: Send + Sync {
    /// Queues `record` (the sink copies what it needs). The returned future resolves
    /// once the record is acknowledged.
    fn enqueue(
        &self,
        record: &OutboundRecord,
    ) -> Result<impl Future<Output = Result<Delivered, SinkError>> + Send + 'static, SinkError>;

    /// Waits up to `timeout` for every queued record to be acknowledged.
    fn flush(&self, timeout: Duration) -> Result<(), SinkError>;

    /// Creates the topics that do not exist yet (brokers may not auto-create them).
    fn ensure_topics(
        &self,
        topics: &[String],
        partitions: i32,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// The Kafka sink: an idempotent producer with `acks=all`.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl KafkaSink {
    /// Creates the producer. Idempotence and `acks=all` are forced: they are what make
    /// "confirm only after Kafka acknowledged" mean "nothing lost, no reordering".
    pub fn new(config: &KafkaConfig) -> Result<Self, SinkError> {
        let mut client: ClientConfig = config
            .client_properties()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        client.set("enable.idempotence", "true").set("acks", "all");
        for (name, default) in [("linger.ms", "5"), ("compression.type", "lz4")] {
            if client.get(name).is_none() {
                client.set(name, default);
            }
        }
        // No delivery timeout: while the broker is down records wait (and the in-flight
        // bound stops the source) instead of failing and forcing a replay.
        if client.get("message.timeout.ms").is_none() {
            client.set("message.timeout.ms", "0");
        }
        let producer = client.create().map_err(SinkError::Config)?;
        let admin = client.create().map_err(SinkError::Config)?;
        Ok(Self { producer, admin })
    }

    /// Asks the cluster for its metadata: proves the brokers are reachable.
    pub fn broker_count(&self, timeout: Duration) -> Result<usize, SinkError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(None, timeout)
            .map_err(SinkError::Config)?;
        Ok(metadata.brokers().len())
    }
}

impl EventSink for KafkaSink {
    fn enqueue(
        &self,
        record: &OutboundRecord,
    ) -> Result<impl Future<Output = Result<Delivered, SinkError>> + Send + 'static, SinkError>
    {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut kafka_record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&record.topic).headers(headers);
        if let Some(key) = &record.key {
            kafka_record = kafka_record.key(key);
        }
        if let Some(value) = &record.value {
            kafka_record = kafka_record.payload(value);
        }
        let ack = match self.producer.send_result(kafka_record) {
            Ok(ack) => ack,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(SinkError::QueueFull)
            }
            Err((source, _)) => {
                return Err(SinkError::Delivery {
                    topic: record.topic.clone(),
                    source,
                })
            }
        };
        let topic = record.topic.clone();
        Ok(async move {
            match ack.await {
                Ok(Ok(delivery)) => Ok(Delivered {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }),
                Ok(Err((source, _))) => Err(SinkError::Delivery { topic, source }),
                Err(_canceled) => Err(SinkError::Canceled),
            }
        })
    }

    async fn ensure_topics(&self, topics: &[String], partitions: i32) -> Result<(), SinkError> {
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(SinkError::Config)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(SinkError::CreateTopic {
                        topic,
                        reason: code.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer
            .flush(timeout)
            .map_err(|source| SinkError::Delivery {
                topic: String::from("<flush>"),
                source,
            })
    }
}
