//! Value codecs: JSON (the default, Debezium-compatible) and Avro.
//!
//! Encoding uses the configured format; decoding recognises every format by its first
//! bytes, so a consumer reads topics whatever format their producer was set to.
//! Decoding never panics: malformed or foreign bytes give a [`CodecError`].

mod avro;

use serde::{Deserialize, Serialize};

pub use avro::{AvroCodec, CONFLUENT_MAGIC, CURRENT_SCHEMA, RELEASED_SCHEMAS, SINGLE_OBJECT_MAGIC};

use crate::envelope::{ChangeEvent, Row};
use crate::registry::{RegistryConfig, RegistryError, SchemaRegistry, SubjectNaming};

/// Value format written by producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// JSON text, Debezium field names.
    #[default]
    Json,
    /// Avro: Confluent wire format with a registry, single-object encoding without.
    Avro,
}

/// The `[format]` configuration section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// Value format to write (`json` or `avro`).
    #[serde(default)]
    pub value: ValueFormat,
    /// Confluent-compatible schema registry; only used with `value = "avro"`.
    #[serde(default)]
    pub schema_registry: Option<RegistryConfig>,
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Bytes start like JSON but are not a valid event.
    #[error("invalid JSON event")]
    Json(#[from] serde_json::Error),
    /// Avro data that does not match the envelope schema.
    #[error("invalid Avro event")]
    Avro(#[source] Box<apache_avro::Error>),
    /// A field holds a value the envelope does not allow.
    #[error("field `{field}` is invalid: {reason}")]
    InvalidField {
        /// Dotted path of the field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The first bytes match no known format.
    #[error("unknown value framing (first byte {first_byte:02x?}); expected JSON, Avro single-object or Confluent wire format")]
    UnknownFraming {
        /// The first byte, `None` for an empty value.
        first_byte: Option<u8>,
    },
    /// An Avro single-object message written with a schema this build does not know.
    #[error("Avro schema fingerprint {0} is not a known changewire schema")]
    UnknownFingerprint(String),
    /// A Confluent-framed message whose schema id has not been fetched.
    #[error("Confluent schema id {0} is unknown to this codec")]
    UnknownSchemaId(u32),
    /// The message ends inside its header.
    #[error("value is truncated")]
    Truncated,
    /// Bytes left over after a complete Avro datum.
    #[error("{0} trailing bytes after the Avro datum")]
    TrailingBytes(usize),
    /// The schema registry could not be reached or refused the schema.
    #[error("schema registry request failed")]
    Registry(#[from] RegistryError),
}

impl CodecError {
    /// Whether retrying later may succeed (registry outages); everything else is a
    /// property of the bytes and will fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            CodecError::Registry(error) => error.is_transient(),
            _ => false,
        }
    }
}

/// Encodes events in the configured format and decodes any supported format.
#[derive(Debug)]
pub struct Codec {
    format: ValueFormat,
    avro: AvroCodec,
}

impl Codec {
    /// A JSON-writing codec (decodes Avro single-object too).
    pub fn json() -> Result<Self, CodecError> {
        Ok(Self {
            format: ValueFormat::Json,
            avro: AvroCodec::single_object()?,
        })
    }

    /// Builds the codec a `[format]` section asks for. With a registry, readers fetch
    /// unknown schema ids from it, and an Avro writer registers the envelope schema.
    pub async fn from_config(config: &FormatConfig) -> Result<Self, CodecError> {
        let mut avro = AvroCodec::single_object()?;
        if let Some(registry) = &config.schema_registry {
            avro = avro.fetching_from(SchemaRegistry::new(registry)?);
            if config.value == ValueFormat::Avro {
                avro = match registry.subject_naming {
                    SubjectNaming::Record => avro.register(&registry.subject).await?,
                    SubjectNaming::Topic => avro.per_topic(),
                };
            }
        }
        Ok(Self {
            format: config.value,
            avro,
        })
    }

    /// Readies the codec to write to `topic`: with subjects named per topic,
    /// registers the schema under `<topic>-value`. Call it before the first event
    /// for a topic is encoded; idempotent.
    pub async fn prepare_topic(&self, topic: &str) -> Result<(), CodecError> {
        match self.format {
            ValueFormat::Avro => self.avro.register_topic(topic).await,
            ValueFormat::Json => Ok(()),
        }
    }

    /// The format this codec writes.
    pub fn format(&self) -> ValueFormat {
        self.format
    }

    /// Encodes one event.
    pub fn encode<R: Row>(&self, event: &ChangeEvent<R>) -> Result<Vec<u8>, CodecError> {
        match self.format {
            ValueFormat::Json => {
                // Most events are under 1 KiB: one allocation instead of doubling
                // from serde_json's 128 bytes.
                let mut bytes = Vec::with_capacity(1024);
                serde_json::to_writer(&mut bytes, event)?;
                Ok(bytes)
            }
            ValueFormat::Avro => self.avro.encode(event),
        }
    }

    /// Decodes one value of any supported format, rows as [`Value`]s.
    pub fn decode(&self, bytes: &[u8]) -> Result<ChangeEvent, CodecError> {
        self.decode_as(bytes)
    }

    /// Decodes one value of any supported format, rows as `R` (see [`Row`]).
    pub fn decode_as<R: Row>(&self, bytes: &[u8]) -> Result<ChangeEvent<R>, CodecError> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(serde_json::from_slice(bytes)?),
            _ => self.avro.decode(bytes),
        }
    }

    /// Decodes one value, fetching an unknown Confluent schema id from the registry.
    pub async fn decode_fetching(&self, bytes: &[u8]) -> Result<ChangeEvent, CodecError> {
        match self.decode(bytes) {
            Err(CodecError::UnknownSchemaId(id)) => {
                self.avro.learn_schema_id(id).await?;
                self.decode(bytes)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
