//! The dead-letter queue, `<prefix>.dlq.<service>`: records a service cannot
//! apply and effects a sink rejects, with the reason in headers.
//!
//! A dead letter is an effect like any other: it is written to the outbox (with
//! the batch, or in place of the rejected effect) and delivered by the runtime's
//! own Kafka sink named [`SINK`], so dead-lettering never blocks the poll loop
//! and survives a crash. That sink never gives up: a dead letter too large for
//! the broker is written without its payload (header [`headers::PAYLOAD`]
//! says so); the topic/partition/offset headers still point at the original.

use std::sync::Arc;

use super::handler::{Emitted, Record};
use super::outbox::{Effect, Pending};
use super::types::Header;

/// The name of the DLQ's sink (a name services cannot take).
pub const SINK: &str = "changewire.dlq";

/// Headers on dead letters.
pub mod headers {
    /// Why it was dead-lettered.
    pub const ERROR: &str = "changewire-dlq-error";
    /// Topic the record was read from.
    pub const TOPIC: &str = "changewire-dlq-topic";
    /// Partition the record was read from.
    pub const PARTITION: &str = "changewire-dlq-partition";
    /// Offset the record was read from.
    pub const OFFSET: &str = "changewire-dlq-offset";
    /// The service that gave up on it.
    pub const SERVICE: &str = "changewire-dlq-service";
    /// The sink that rejected the effect (absent for records the handler refused).
    pub const SINK: &str = "changewire-dlq-sink";
    /// The rejected effect's idempotency key.
    pub const IDEMPOTENCY_KEY: &str = "changewire-dlq-idempotency-key";
    /// The rejected effect's destination (a topic, for Kafka sinks).
    pub const DESTINATION: &str = "changewire-dlq-destination";
    /// Present when the payload was left out: why (its size).
    pub const PAYLOAD: &str = "changewire-dlq-payload-omitted";
}

/// Builds dead letters for one service.
pub(super) struct DeadLetters {
    topic: String,
    service: String,
}

impl DeadLetters {
    pub(super) fn new(topic: String, service: String) -> Self {
        Self { topic, service }
    }

    /// The DLQ topic.
    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// The dead letter of a record the service cannot apply (its own headers
    /// kept, ours added), keyed by where the record was read from.
    pub(super) fn record(&self, record: &Record, reason: &str) -> Emitted {
        tracing::warn!(
            topic = record.topic,
            partition = record.partition,
            offset = record.offset,
            reason,
            "dead-lettering"
        );
        let ours = [
            (headers::ERROR, reason.to_owned()),
            (headers::TOPIC, record.topic.clone()),
            (headers::PARTITION, record.partition.to_string()),
            (headers::OFFSET, record.offset.to_string()),
            (headers::SERVICE, self.service.clone()),
        ];
        Emitted {
            sink: SINK.to_owned(),
            idempotency_key: format!(
                "dlq/{}/{}/{}",
                record.topic, record.partition, record.offset
            ),
            effect: self.letter(
                &record.headers,
                ours,
                record.key.clone(),
                record.payload.clone(),
            ),
        }
    }

    /// The dead letter of `pending`, which `sink` rejected for `reason`,
    /// numbered `sequence` in the outbox.
    pub(super) fn rejected(
        &self,
        pending: &Pending,
        sink: &str,
        reason: &str,
        sequence: u64,
    ) -> Arc<Pending> {
        tracing::warn!(
            sink,
            idempotency_key = pending.idempotency_key,
            reason,
            "dead-lettering an effect"
        );
        let effect = &pending.effect;
        let ours = [
            (headers::ERROR, reason.to_owned()),
            (headers::SINK, sink.to_owned()),
            (headers::IDEMPOTENCY_KEY, pending.idempotency_key.clone()),
            (
                headers::DESTINATION,
                effect.destination.clone().unwrap_or_default(),
            ),
            (headers::SERVICE, self.service.clone()),
        ];
        Arc::new(Pending {
            sequence,
            entry: sequence,
            sink: SINK.to_owned(),
            idempotency_key: format!("{}/dlq", pending.idempotency_key),
            effect: self.letter(
                &effect.headers,
                ours,
                effect.key.clone(),
                effect.payload.clone(),
            ),
        })
    }

    fn letter<const N: usize>(
        &self,
        original: &[Header],
        ours: [(&str, String); N],
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
    ) -> Effect {
        let mut headers = original.to_vec();
        headers.extend(ours.map(|(name, value)| (name.to_owned(), Some(value.into_bytes()))));
        Effect {
            destination: Some(self.topic.clone()),
            partition: None,
            key,
            headers,
            payload,
        }
    }
}

/// `letter` without its payload, which the broker refused as too large.
pub(super) fn without_payload(letter: &Effect) -> Effect {
    let mut headers = letter.headers.clone();
    let why = format!(
        "{} bytes, more than the broker or client accepts",
        letter.payload.len()
    );
    headers.push((headers::PAYLOAD.to_owned(), Some(why.into_bytes())));
    Effect {
        headers,
        payload: Vec::new(),
        ..letter.clone()
    }
}
