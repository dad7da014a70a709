//! The dead-letter queue: records a service cannot apply, with the reason in headers.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

use super::{
    client_config, dlq_headers, ensure_topic, stopped, Record, RuntimeError, RETRY_MAX, RETRY_MIN,
};
use crate::config::ConsumerConfig;

/// Publishes records the service cannot apply, with the reason in headers.
pub(super) struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    service: String,
}

impl DeadLetters {
    pub(super) fn new(config: &ConsumerConfig) -> Result<Self, RuntimeError> {
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

    /// The DLQ topic.
    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the DLQ topic when missing (brokers may not auto-create it).
    pub(super) async fn ensure_topic(&self, config: &ConsumerConfig) -> Result<(), RuntimeError> {
        ensure_topic(config, &self.topic, 1).await
    }

    /// Sends `record` to the DLQ (its own headers kept, ours added) and waits for the acknowledgement, retrying until
    /// it is stored (the offset must not move past a record that went nowhere);
    /// `false` if shutdown came first.
    pub(super) async fn send(
        &self,
        record: &Record,
        reason: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        tracing::warn!(
            topic = record.topic,
            partition = record.partition,
            offset = record.offset,
            reason,
            "dead-lettering"
        );
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let headers = [
            (dlq_headers::ERROR, reason),
            (dlq_headers::TOPIC, record.topic.as_str()),
            (dlq_headers::PARTITION, partition.as_str()),
            (dlq_headers::OFFSET, offset.as_str()),
            (dlq_headers::SERVICE, self.service.as_str()),
        ];
        let originals = record
            .headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()));
        let ours = headers.map(|(key, value)| (key, value.as_bytes()));
        let headers = originals
            .chain(ours)
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let mut delay = RETRY_MIN;
        loop {
            let mut dead: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .headers(headers.clone())
                .payload(&record.payload);
            if let Some(key) = &record.key {
                dead = dead.key(key);
            }
            match self.producer.send(dead, Duration::from_secs(30)).await {
                Ok(_) => return true,
                Err((error, _)) => {
                    tracing::error!(%error, topic = %self.topic, "cannot write to the DLQ; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(shutdown) => return false,
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}
