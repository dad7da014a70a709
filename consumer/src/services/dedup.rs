//! The dedup service: republishes each distinct event once, to
//! `<prefix>.dedup.<suffix of the raw topic>` (or one configured topic), with the
//! same key, headers (plus the idempotency key, see
//! [`crate::runtime::sinks::kafka::IDEMPOTENCY_HEADER`]) and bytes. Duplicates
//! (an id seen within the retention window) are dropped by the runtime and
//! counted (`outcome="duplicate"`).
//!
//! The handler only maps a record to an output record and emits it to the
//! [`OUTPUT`] sink, a Kafka sink: the runtime commits it in the batch's outbox
//! and the sink writes it with the idempotent producer; after a crash the sink
//! reads its output back and writes only what is missing. That gives exactly
//! one output record per distinct event without Kafka transactions (tansu has
//! none, and they would tie the output to one broker feature).
//!
//! Each input partition maps to one output partition (`input partition % output
//! partitions`), so per-key order is kept; the output topic is created with the
//! input's partition count.

use std::collections::HashMap;

use changewire_kafka::Publisher;
use changewire_schemas::topic::TopicNames;
use changewire_schemas::ChangeEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::runtime::sinks::kafka::{KafkaSink, Oversized};
use crate::runtime::{
    ensure_topic, Context, Effect, Handler, HandlerError, Record, RuntimeConfig, RuntimeError,
    Sinks,
};

/// The name of dedup's sink.
pub const OUTPUT: &str = "output";
/// Where earlier versions kept their own outbox, and their written marks.
const LEGACY_OUTBOX: &[u8] = b"outbox/";
const LEGACY_WRITTEN: &[u8] = b"written/";

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
    config: RuntimeConfig,
    names: TopicNames,
    output: Option<String>,
    /// The sink's publisher, for topic metadata.
    publisher: Publisher,
    /// Raw topic → where it is republished and that topic's partition count,
    /// worked out once (naming the output per record was 4% of the service's CPU).
    outputs: tokio::sync::Mutex<HashMap<String, (String, i32)>>,
}

impl Dedup {
    /// A dedup handler for the service `config` describes, with its sink.
    pub fn new(config: &RuntimeConfig, dedup: &DedupConfig) -> Result<(Self, Sinks), RuntimeError> {
        let names = config.topics.names().map_err(|e| {
            changewire_schemas::settings::ConfigError::invalid("topics.prefix", e.to_string())
        })?;
        let sink = KafkaSink::new(OUTPUT, config, Oversized::Reject)?;
        let handler = Self {
            config: config.clone(),
            names,
            output: dedup.output.clone(),
            publisher: sink.publisher().clone(),
            outputs: tokio::sync::Mutex::new(HashMap::new()),
        };
        Ok((handler, Sinks::new().with(OUTPUT, sink)))
    }

    fn output_topic(&self, raw_topic: &str) -> Result<String, HandlerError> {
        match &self.output {
            Some(topic) => Ok(topic.clone()),
            None => self.names.dedup(raw_topic).map_err(HandlerError::permanent),
        }
    }

    /// Where `raw_topic` is republished, and that topic's partition count.
    async fn output(&self, raw_topic: &str) -> Result<(String, i32), HandlerError> {
        let mut known = self.outputs.lock().await;
        if let Some(output) = known.get(raw_topic) {
            return Ok(output.clone());
        }
        let topic = self.output_topic(raw_topic)?;
        let count = self.output_partitions(&topic, raw_topic).await?;
        known.insert(raw_topic.to_owned(), (topic.clone(), count));
        Ok((topic, count))
    }

    /// The output topic's partition count, creating it like the raw topic if
    /// missing. A broker that cannot tell is unavailable.
    async fn output_partitions(&self, output: &str, raw_topic: &str) -> Result<i32, HandlerError> {
        let raw = self
            .publisher
            .partition_count(raw_topic)
            .await
            .map_err(HandlerError::unavailable)?;
        ensure_topic(&self.config, output, raw.max(1))
            .await
            .map_err(HandlerError::unavailable)?;
        let count = self
            .publisher
            .partition_count(output)
            .await
            .map_err(HandlerError::unavailable)?;
        if count == 0 {
            return Err(HandlerError::unavailable(format!(
                "topic {output} has no partitions yet"
            )));
        }
        Ok(count)
    }
}

impl Handler for Dedup {
    type Row = Box<RawValue>;

    /// Moves the records an earlier version left in its own outbox into the
    /// runtime's, so nothing it had not confirmed is lost. Those it had
    /// written already may then appear twice in the output (their records
    /// carry no idempotency key to find them by).
    async fn start(&self, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let entries = context.scan_committed(LEGACY_OUTBOX)?;
        let marks = context.scan_committed(LEGACY_WRITTEN)?;
        let mut moved = 0;
        for (key, value) in entries {
            let records = legacy::decode_entry(&value).ok_or_else(|| {
                HandlerError::fatal(format!(
                    "the outbox entry {} of an earlier version cannot be read",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            for record in records {
                context.emit(OUTPUT, record)?;
                moved += 1;
            }
            context.remove(key);
        }
        for (key, _) in marks {
            context.remove(key);
        }
        if moved > 0 {
            tracing::warn!(
                moved,
                "moved records an earlier version had not confirmed into the runtime's outbox"
            );
        }
        Ok(())
    }

    async fn handle(
        &self,
        _event: &ChangeEvent<Self::Row>,
        record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let (topic, partitions) = self.output(&record.topic).await?;
        let effect = Effect {
            destination: Some(topic),
            partition: Some(record.partition % partitions),
            key: record.key.clone(),
            headers: record.headers.clone(),
            payload: record.payload.clone(),
        };
        context.emit(OUTPUT, effect)?;
        Ok(())
    }
}

/// The outbox format of earlier versions (read once, at start).
mod legacy {
    use crate::runtime::Effect;

    /// Starts an entry holding a batch's records.
    const LIST_MARKER: &[u8] = b"\xB1list";

    /// A batch's records, or the one record of an entry written per event.
    pub(super) fn decode_entry(bytes: &[u8]) -> Option<Vec<Effect>> {
        let Some(mut rest) = bytes.strip_prefix(LIST_MARKER) else {
            return decode_record(bytes).map(|r| vec![r]);
        };
        let count = u32::from_be_bytes(take(&mut rest, 4)?.try_into().ok()?);
        let mut records = Vec::with_capacity(count.min(100_000) as usize);
        for _ in 0..count {
            let len = u32::from_be_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
            records.push(decode_record(take(&mut rest, len)?)?);
        }
        Some(records)
    }

    fn take<'a>(rest: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
        let (head, tail) = (rest.get(..len)?, rest.get(len..)?);
        *rest = tail;
        Some(head)
    }

    /// Length-prefixed: id, topic, partition, key presence (and key), header
    /// count and headers, payload.
    fn decode_record(bytes: &[u8]) -> Option<Effect> {
        let mut rest = bytes;
        let mut field = || -> Option<&[u8]> {
            let len = u32::from_be_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
            take(&mut rest, len)
        };
        let _id = field()?;
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
            headers.push((name, Some(field()?.to_vec())));
        }
        Some(Effect {
            destination: Some(topic),
            partition: Some(partition),
            key,
            headers,
            payload: field()?.to_vec(),
        })
    }
}
