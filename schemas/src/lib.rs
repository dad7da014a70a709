//! The changewire event contract, shared by the producer, every consumer service and
//! anyone writing their own consumer:
//!
//! - [`envelope`]: [`ChangeEvent`] and its parts (a Debezium-compatible envelope);
//! - [`gateway`]: the gateway resources (`Route`, policies, `ModelRoute`);
//! - [`topic`]: topic names derived from one prefix;
//! - [`codec`]: JSON and Avro value codecs (the `.avsc` files live in `schemas/avro/`);
//! - [`registry`]: the Confluent schema-registry client used by the Avro codec;
//! - [`diagnostics`]: one-line error reports with their causes;
//! - [`backoff`]: the retry delays every part uses;
//! - [`http`]: the `/metrics` and `/health` endpoints every process serves;
//! - [`settings`]: the `[kafka]` section and config loading shared by every binary;
//! - [`time`]: times as people and SIEMs read them;
//! - `fixtures` (feature `fixtures`): sample events for tests and benchmarks.

pub mod backoff;
pub mod codec;
pub mod diagnostics;
pub mod envelope;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod gateway;
pub mod http;
pub mod registry;
pub mod settings;
pub mod storage;
pub mod time;
pub mod topic;

pub use codec::{Codec, CodecError, FormatConfig, ValueFormat};
pub use envelope::{
    Actor, ActorVia, ChangeEvent, EventId, KubernetesOrigin, Op, Origin, PostgresOrigin, Row,
    SnapshotMarker, Source, Transaction,
};
pub use topic::TopicNames;

/// Lower-case hex of `bytes` (hashes, keys, raw values in logs and JSON).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
