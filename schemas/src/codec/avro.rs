//! Avro encoding of the envelope, framed either as Avro single-object encoding
//! (`C3 01` + 8-byte CRC-64-AVRO fingerprint) or, with a schema registry, in the
//! Confluent wire format (`00` + 4-byte big-endian schema id).
//!
//! `before`, `after` and `diff` travel as JSON text: row and object shapes differ per
//! table and kind, and one envelope schema for all topics keeps the registry simple.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use apache_avro::rabin::Rabin;
use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value, Schema};
use serde::{Deserialize, Serialize};

use super::CodecError;
use crate::envelope::{
    Actor, ActorVia, ChangeEvent, EventId, FlatSource, Op, Origin, Row, Source, Transaction,
};
use crate::hex;
use crate::registry::SchemaRegistry;

/// The current envelope schema, as kept in `schemas/avro/change_event.avsc`.
pub const CURRENT_SCHEMA: &str = include_str!("../../avro/change_event.avsc");

/// Every released schema version, oldest first, as kept in `schemas/avro/released/`.
/// Data written with any of them must stay readable (see the compatibility tests).
pub const RELEASED_SCHEMAS: &[(&str, &str)] = &[(
    "v1",
    include_str!("../../avro/released/change_event.v1.avsc"),
)];

/// First two bytes of an Avro single-object encoded message.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of a Confluent wire-format message.
pub const CONFLUENT_MAGIC: u8 = 0x00;

const FINGERPRINT_LEN: usize = 8;
const SCHEMA_ID_LEN: usize = 4;

/// How encoded datums are framed.
#[derive(Debug)]
enum Framing {
    SingleObject,
    Confluent {
        schema_id: u32,
    },
    /// Registered under `<topic>-value` per topic; the id comes with the first
    /// topic (the registry gives one schema text one id, whatever the subject).
    ConfluentPerTopic {
        schema_id: OnceLock<u32>,
    },
}

/// Encodes and decodes [`ChangeEvent`]s as Avro.
#[derive(Debug)]
pub struct AvroCodec {
    reader: Schema,
    framing: Framing,
    by_fingerprint: Vec<([u8; FINGERPRINT_LEN], Schema)>,
    by_id: RwLock<HashMap<u32, Arc<Schema>>>,
    registry: Option<SchemaRegistry>,
}

impl AvroCodec {
    /// A codec using single-object encoding, no registry needed.
    pub fn single_object() -> Result<Self, CodecError> {
        let reader = parse(CURRENT_SCHEMA)?;
        let mut by_fingerprint = vec![(fingerprint(&reader), reader.clone())];
        for (_, text) in RELEASED_SCHEMAS {
            let schema = parse(text)?;
            by_fingerprint.push((fingerprint(&schema), schema));
        }
        Ok(Self {
            reader,
            framing: Framing::SingleObject,
            by_fingerprint,
            by_id: RwLock::new(HashMap::new()),
            registry: None,
        })
    }

    /// Fetches writer schemas of Confluent-framed messages from `registry`.
    pub fn fetching_from(mut self, registry: SchemaRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Registers the current schema (its full text: defaults, docs and aliases
    /// are what a registry's compatibility check reads) under `subject` and
    /// from then on writes the Confluent wire format with the id the registry
    /// assigned.
    pub async fn register(mut self, subject: &str) -> Result<Self, CodecError> {
        let registry = self
            .registry
            .as_ref()
            .ok_or_else(|| invalid("format.schema_registry", "no registry configured"))?;
        let schema_id = registry.register(subject, CURRENT_SCHEMA).await?;
        self.cache_schema(schema_id, Arc::new(self.reader.clone()));
        self.framing = Framing::Confluent { schema_id };
        Ok(self)
    }

    /// Writes the Confluent wire format with the schema registered per topic,
    /// under `<topic>-value` (the subject naming Confluent tools default to), as
    /// [`AvroCodec::register_topic`] registers each topic.
    pub fn per_topic(mut self) -> Self {
        self.framing = Framing::ConfluentPerTopic {
            schema_id: OnceLock::new(),
        };
        self
    }

    /// Registers the current schema under `<topic>-value` when subjects are named
    /// per topic (nothing to do otherwise). Idempotent.
    pub async fn register_topic(&self, topic: &str) -> Result<(), CodecError> {
        let (Framing::ConfluentPerTopic { schema_id }, Some(registry)) =
            (&self.framing, &self.registry)
        else {
            return Ok(());
        };
        let subject = format!("{topic}-value");
        let id = registry.register(&subject, CURRENT_SCHEMA).await?;
        let first = *schema_id.get_or_init(|| id);
        if first != id {
            return Err(invalid(
                "format.schema_registry",
                format!("the registry gave the envelope schema id {id} under {subject} but {first} under an earlier subject; one schema text must have one id"),
            ));
        }
        self.cache_schema(id, Arc::new(self.reader.clone()));
        Ok(())
    }

    /// Encodes one event with the configured framing.
    pub fn encode<R: Row>(&self, event: &ChangeEvent<R>) -> Result<Vec<u8>, CodecError> {
        let value = to_value(AvroEvent::try_from(event)?)
            .and_then(|v| v.resolve(&self.reader))
            .map_err(avro_error)?;
        let datum = to_avro_datum(&self.reader, value).map_err(avro_error)?;
        let confluent = |schema_id: u32| {
            let mut head = vec![CONFLUENT_MAGIC];
            head.extend_from_slice(&schema_id.to_be_bytes());
            head
        };
        let mut out = match &self.framing {
            Framing::SingleObject => {
                let mut head = SINGLE_OBJECT_MAGIC.to_vec();
                head.extend_from_slice(&self.by_fingerprint[0].0);
                head
            }
            Framing::Confluent { schema_id } => confluent(*schema_id),
            Framing::ConfluentPerTopic { schema_id } => match schema_id.get() {
                Some(id) => confluent(*id),
                None => {
                    return Err(invalid(
                        "format.schema_registry.subject_naming",
                        "no topic's subject is registered yet (call prepare_topic first)",
                    ))
                }
            },
        };
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Decodes a single-object or Confluent-framed message. A Confluent schema id this
    /// codec has not seen yields [`CodecError::UnknownSchemaId`]; call
    /// [`AvroCodec::learn_schema_id`] and decode again.
    pub fn decode<R: Row>(&self, bytes: &[u8]) -> Result<ChangeEvent<R>, CodecError> {
        if let Some(rest) = bytes.strip_prefix(&SINGLE_OBJECT_MAGIC) {
            let (print, datum) = split(rest, FINGERPRINT_LEN)?;
            let writer = self
                .by_fingerprint
                .iter()
                .find(|(known, _)| known == print)
                .map(|(_, schema)| schema)
                .ok_or_else(|| CodecError::UnknownFingerprint(hex(print)))?;
            return self.decode_datum(writer, datum);
        }
        if let Some(rest) = bytes.strip_prefix(&[CONFLUENT_MAGIC]) {
            let (id, datum) = split(rest, SCHEMA_ID_LEN)?;
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            let writer = self
                .cached_schema(id)
                .ok_or(CodecError::UnknownSchemaId(id))?;
            return self.decode_datum(&writer, datum);
        }
        Err(CodecError::UnknownFraming {
            first_byte: bytes.first().copied(),
        })
    }

    /// Fetches the writer schema with this Confluent id from the registry and keeps it.
    pub async fn learn_schema_id(&self, id: u32) -> Result<(), CodecError> {
        let registry = self
            .registry
            .as_ref()
            .ok_or(CodecError::UnknownSchemaId(id))?;
        let schema = registry.schema_by_id(id).await?;
        self.cache_schema(id, Arc::new(schema));
        Ok(())
    }

    fn decode_datum<R: Row>(
        &self,
        writer: &Schema,
        mut datum: &[u8],
    ) -> Result<ChangeEvent<R>, CodecError> {
        let value = from_avro_datum(writer, &mut datum, Some(&self.reader)).map_err(avro_error)?;
        if !datum.is_empty() {
            return Err(CodecError::TrailingBytes(datum.len()));
        }
        let event: AvroEvent = from_value(&value).map_err(avro_error)?;
        event.try_into()
    }

    fn cached_schema(&self, id: u32) -> Option<Arc<Schema>> {
        // A poisoned lock only means another thread panicked mid-insert of an Arc;
        // the map itself is still consistent.
        let map = self.by_id.read().unwrap_or_else(|e| e.into_inner());
        map.get(&id).cloned()
    }

    fn cache_schema(&self, id: u32, schema: Arc<Schema>) {
        let mut map = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        map.insert(id, schema);
    }
}

fn parse(text: &str) -> Result<Schema, CodecError> {
    Schema::parse_str(text).map_err(avro_error)
}

fn fingerprint(schema: &Schema) -> [u8; FINGERPRINT_LEN] {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut print = [0; FINGERPRINT_LEN];
    print.copy_from_slice(&bytes[..FINGERPRINT_LEN]);
    print
}

fn split(bytes: &[u8], at: usize) -> Result<(&[u8], &[u8]), CodecError> {
    if bytes.len() < at {
        return Err(CodecError::Truncated);
    }
    Ok(bytes.split_at(at))
}

fn avro_error(error: apache_avro::Error) -> CodecError {
    CodecError::Avro(Box::new(error))
}

/// The envelope as the `.avsc` record lays it out.
#[derive(Serialize, Deserialize)]
pub(super) struct AvroEvent {
    id: String,
    op: String,
    ts_ms: i64,
    source: FlatSource,
    before: Option<String>,
    after: Option<String>,
    diff: Option<String>,
    actor: Option<AvroActor>,
    transaction: Option<AvroTransaction>,
}

#[derive(Serialize, Deserialize)]
struct AvroActor {
    name: String,
    via: String,
    groups: Vec<String>,
    source_ips: Vec<String>,
    user_agent: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct AvroTransaction {
    id: String,
    total_order: i64,
    data_collection_order: i64,
}

fn json_text<R: Row>(value: &Option<R>) -> Option<String> {
    value.as_ref().map(Row::json_text)
}

fn parse_json_text<R: Row>(
    field: &'static str,
    text: Option<String>,
) -> Result<Option<R>, CodecError> {
    text.map(R::from_json_text)
        .transpose()
        .map_err(|source| CodecError::InvalidField {
            field,
            reason: source.to_string(),
        })
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError::InvalidField {
        field,
        reason: reason.into(),
    }
}

// Avro has no unsigned types: counters travel as `long` and must fit.
fn to_long(field: &'static str, n: u64) -> Result<i64, CodecError> {
    i64::try_from(n).map_err(|_| invalid(field, format!("{n} does not fit an Avro long")))
}

fn from_long(field: &'static str, n: i64) -> Result<u64, CodecError> {
    u64::try_from(n).map_err(|_| invalid(field, format!("negative value {n}")))
}

impl<R: Row> TryFrom<&ChangeEvent<R>> for AvroEvent {
    type Error = CodecError;

    fn try_from(event: &ChangeEvent<R>) -> Result<Self, CodecError> {
        Ok(Self {
            id: event.id.to_string(),
            op: event.op.code().to_owned(),
            ts_ms: event.ts_ms,
            source: avro_source(&event.source)?,
            before: json_text(&event.before),
            after: json_text(&event.after),
            diff: json_text(&event.diff),
            actor: event.actor.as_ref().map(|a| AvroActor {
                name: a.name.clone(),
                via: a.via.as_str().to_owned(),
                groups: a.groups.clone(),
                source_ips: a.source_ips.clone(),
                user_agent: a.user_agent.clone(),
            }),
            transaction: event
                .transaction
                .as_ref()
                .map(|t| {
                    Ok::<_, CodecError>(AvroTransaction {
                        id: t.id.clone(),
                        total_order: to_long("transaction.total_order", t.total_order)?,
                        data_collection_order: to_long(
                            "transaction.data_collection_order",
                            t.data_collection_order,
                        )?,
                    })
                })
                .transpose()?,
        })
    }
}

/// The flat `source` record; its LSN must fit an Avro long.
fn avro_source(source: &Source) -> Result<FlatSource, CodecError> {
    if let Origin::Postgresql(pg) = &source.origin {
        to_long("source.lsn", pg.lsn)?;
    }
    Ok(FlatSource::from(source))
}

impl<R: Row> TryFrom<AvroEvent> for ChangeEvent<R> {
    type Error = CodecError;

    fn try_from(event: AvroEvent) -> Result<Self, CodecError> {
        let op = Op::from_code(&event.op).ok_or_else(|| invalid("op", event.op.clone()))?;
        Ok(ChangeEvent {
            id: EventId::from(event.id),
            op,
            ts_ms: event.ts_ms,
            source: Source::try_from(event.source)
                .map_err(|missing| invalid(missing.field, "missing"))?,
            before: parse_json_text("before", event.before)?,
            after: parse_json_text("after", event.after)?,
            diff: parse_json_text("diff", event.diff)?,
            actor: event.actor.map(Actor::try_from).transpose()?,
            transaction: event
                .transaction
                .map(|t| {
                    Ok::<_, CodecError>(Transaction {
                        id: t.id,
                        total_order: from_long("transaction.total_order", t.total_order)?,
                        data_collection_order: from_long(
                            "transaction.data_collection_order",
                            t.data_collection_order,
                        )?,
                    })
                })
                .transpose()?,
        })
    }
}

impl TryFrom<AvroActor> for Actor {
    type Error = CodecError;

    fn try_from(actor: AvroActor) -> Result<Self, CodecError> {
        Ok(Actor {
            via: ActorVia::parse(&actor.via)
                .ok_or_else(|| invalid("actor.via", actor.via.clone()))?,
            name: actor.name,
            groups: actor.groups,
            source_ips: actor.source_ips,
            user_agent: actor.user_agent,
        })
    }
}
