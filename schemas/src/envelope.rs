//! The change event envelope: the contract between the producer and every consumer.
//!
//! Field names follow Debezium's envelope (`before`, `after`, `source`, `op`, `ts_ms`,
//! `transaction`) so Debezium-aware tools read our events; `id`, `diff` and `actor`
//! are changewire extensions.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// A row as an event carries it: its JSON text is what Avro stores. A reader
/// picks the type: [`Value`] to look inside rows, [`Box<RawValue>`] to keep
/// them as checked JSON text (no map built, no allocation per field) when it
/// only passes them on.
pub trait Row: Serialize + serde::de::DeserializeOwned {
    /// The row as compact JSON text.
    fn json_text(&self) -> String;

    /// The row of this JSON text (as Avro stores it).
    fn from_json_text(text: String) -> Result<Self, serde_json::Error>;
}

impl Row for Value {
    fn json_text(&self) -> String {
        self.to_string()
    }

    fn from_json_text(text: String) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&text)
    }
}

impl Row for Box<RawValue> {
    fn json_text(&self) -> String {
        self.get().to_owned()
    }

    fn from_json_text(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text)
    }
}

/// One create, update, delete, snapshot read or truncate of one entity. Consumers
/// read rows as [`Value`]s; the PostgreSQL producer writes them as JSON text once
/// ([`RawValue`]), which encodes to the same JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent<R = Value> {
    /// Stable identity: the same change re-delivered carries the same id.
    pub id: EventId,
    /// What happened to the entity.
    pub op: Op,
    /// When the producer emitted the event (milliseconds since the Unix epoch).
    pub ts_ms: i64,
    /// Where the change came from.
    pub source: Source,
    /// The entity before the change; `None` for creates and snapshot reads.
    pub before: Option<R>,
    /// The entity after the change; `None` for deletes.
    pub after: Option<R>,
    /// RFC 6902 JSON Patch from `before` to `after`, when the producer computes one.
    #[serde(default)]
    pub diff: Option<Value>,
    /// Who made the change, when known.
    #[serde(default)]
    pub actor: Option<Actor>,
    /// The transaction the change belongs to, for transactional sources.
    #[serde(default)]
    pub transaction: Option<Transaction>,
}

/// The kind of change, with Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Entity created (`c`).
    #[serde(rename = "c")]
    Create,
    /// Entity updated (`u`).
    #[serde(rename = "u")]
    Update,
    /// Entity deleted (`d`).
    #[serde(rename = "d")]
    Delete,
    /// Entity read during an initial snapshot (`r`).
    #[serde(rename = "r")]
    Read,
    /// Table truncated (`t`).
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    /// The one-letter code used on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }

    /// Parses a one-letter code; `None` for anything else.
    pub fn from_code(code: &str) -> Option<Op> {
        [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate]
            .into_iter()
            .find(|op| op.code() == code)
    }
}

/// Stable event identity used by consumers to deduplicate.
///
/// `pg:<source>:<commit_lsn>:<seq_in_tx>` or `k8s:<source>:<uid>:<resourceVersion>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    /// Id of the `seq`-th change of the Postgres transaction that committed at `commit_lsn`.
    pub fn postgres(source: &str, commit_lsn: u64, seq: u64) -> Self {
        Self(format!(
            "pg:{source}:{:X}/{:X}:{seq}",
            commit_lsn >> 32,
            commit_lsn & 0xFFFF_FFFF
        ))
    }

    /// Id of one Kubernetes object state.
    pub fn kubernetes(source: &str, uid: &str, resource_version: &str) -> Self {
        Self(format!("k8s:{source}:{uid}:{resource_version}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for EventId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

/// Where a change came from (Debezium's `source` block).
///
/// Read through a flat struct (its fields and every connector's): a flattened, internally tagged enum would make serde
/// buffer the block twice, which was half the cost of decoding an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FlatSource")]
pub struct Source {
    /// The configured source name (one Postgres database or one cluster).
    pub name: String,
    /// When the change happened: commit time or Kubernetes change time (ms since epoch).
    pub ts_ms: i64,
    /// Whether the event comes from an initial snapshot.
    #[serde(default)]
    pub snapshot: SnapshotMarker,
    /// Connector-specific position fields, tagged by `connector`.
    #[serde(flatten)]
    pub origin: Origin,
}

/// The `source` block as both codecs carry it: common fields and those of every
/// connector, checked against `connector` when read into a [`Source`]. Unknown
/// fields are ignored; the field order is that of the Avro record.
#[derive(Serialize, Deserialize)]
pub(crate) struct FlatSource {
    connector: Connector,
    name: String,
    ts_ms: i64,
    #[serde(default)]
    snapshot: SnapshotMarker,
    db: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    lsn: Option<u64>,
    #[serde(rename = "txId")]
    tx_id: Option<i64>,
    sequence: Option<String>,
    cluster: Option<String>,
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    #[serde(rename = "objectName")]
    object_name: Option<String>,
    uid: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(default)]
    status_only: Option<bool>,
}

/// The `connector` tag of a `source` block.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Connector {
    Postgresql,
    Kubernetes,
}

/// A field a connector requires that a `source` block lacks.
#[derive(Debug, thiserror::Error)]
#[error("missing field `{field}` in a {connector} source")]
pub(crate) struct MissingSourceField {
    connector: &'static str,
    /// The field's path in the event (`source.db`).
    pub(crate) field: &'static str,
}

impl From<&Source> for FlatSource {
    fn from(source: &Source) -> Self {
        let mut flat = FlatSource {
            connector: Connector::Postgresql,
            name: source.name.clone(),
            ts_ms: source.ts_ms,
            snapshot: source.snapshot,
            db: None,
            schema: None,
            table: None,
            lsn: None,
            tx_id: None,
            sequence: None,
            cluster: None,
            group: None,
            version: None,
            kind: None,
            namespace: None,
            object_name: None,
            uid: None,
            resource_version: None,
            status_only: None,
        };
        match &source.origin {
            Origin::Postgresql(pg) => {
                flat.db = Some(pg.db.clone());
                flat.schema = Some(pg.schema.clone());
                flat.table = Some(pg.table.clone());
                flat.lsn = Some(pg.lsn);
                flat.tx_id = pg.tx_id;
                flat.sequence.clone_from(&pg.sequence);
            }
            Origin::Kubernetes(k8s) => {
                flat.connector = Connector::Kubernetes;
                flat.cluster = Some(k8s.cluster.clone());
                flat.group = Some(k8s.group.clone());
                flat.version = Some(k8s.version.clone());
                flat.kind = Some(k8s.kind.clone());
                flat.namespace.clone_from(&k8s.namespace);
                flat.object_name = Some(k8s.name.clone());
                flat.uid = Some(k8s.uid.clone());
                flat.resource_version = Some(k8s.resource_version.clone());
                flat.status_only = k8s.status_only.then_some(true);
            }
        }
        flat
    }
}

impl TryFrom<FlatSource> for Source {
    type Error = MissingSourceField;

    fn try_from(flat: FlatSource) -> Result<Self, Self::Error> {
        let origin = match flat.connector {
            Connector::Postgresql => Origin::Postgresql(PostgresOrigin {
                db: required(flat.db, "postgresql", "source.db")?,
                schema: required(flat.schema, "postgresql", "source.schema")?,
                table: required(flat.table, "postgresql", "source.table")?,
                lsn: required(flat.lsn, "postgresql", "source.lsn")?,
                tx_id: flat.tx_id,
                sequence: flat.sequence,
            }),
            Connector::Kubernetes => Origin::Kubernetes(KubernetesOrigin {
                cluster: required(flat.cluster, "kubernetes", "source.cluster")?,
                group: required(flat.group, "kubernetes", "source.group")?,
                version: required(flat.version, "kubernetes", "source.version")?,
                kind: required(flat.kind, "kubernetes", "source.kind")?,
                namespace: flat.namespace,
                name: required(flat.object_name, "kubernetes", "source.objectName")?,
                uid: required(flat.uid, "kubernetes", "source.uid")?,
                resource_version: required(
                    flat.resource_version,
                    "kubernetes",
                    "source.resourceVersion",
                )?,
                status_only: flat.status_only.unwrap_or_default(),
            }),
        };
        Ok(Source {
            name: flat.name,
            ts_ms: flat.ts_ms,
            snapshot: flat.snapshot,
            origin,
        })
    }
}

/// A field `connector` requires, or which is missing.
fn required<T>(
    value: Option<T>,
    connector: &'static str,
    field: &'static str,
) -> Result<T, MissingSourceField> {
    value.ok_or(MissingSourceField { connector, field })
}

/// Debezium's `source.snapshot` marker, a string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMarker {
    /// Part of a snapshot.
    True,
    /// Streamed, not a snapshot.
    #[default]
    False,
    /// The last event of a snapshot.
    Last,
}

impl SnapshotMarker {
    /// The marker as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMarker::True => "true",
            SnapshotMarker::False => "false",
            SnapshotMarker::Last => "last",
        }
    }

    /// Parses the wire form; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::True, Self::False, Self::Last]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

/// Connector-specific source fields; `connector` on the wire selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "lowercase")]
pub enum Origin {
    /// A PostgreSQL logical replication stream.
    Postgresql(PostgresOrigin),
    /// A Kubernetes watch stream.
    Kubernetes(KubernetesOrigin),
}

/// Position of a change in a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresOrigin {
    /// Database name.
    pub db: String,
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// LSN of the change (Debezium: `lsn`, a number).
    pub lsn: u64,
    /// Transaction id (Debezium: `txId`).
    #[serde(rename = "txId", default)]
    pub tx_id: Option<i64>,
    /// Debezium's `sequence`: JSON text `["<last commit lsn>","<lsn>"]`.
    #[serde(default)]
    pub sequence: Option<String>,
}

/// Identity of a changed Kubernetes object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesOrigin {
    /// Configured cluster name.
    pub cluster: String,
    /// API group; empty for the core group.
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind, e.g. `ConfigMap`.
    pub kind: String,
    /// Namespace; `None` for cluster-scoped objects.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Object name (`objectName` on the wire: `name` is the source name).
    #[serde(rename = "objectName")]
    pub name: String,
    /// Object uid (a delete and re-create under one name has two uids).
    pub uid: String,
    /// The object's resourceVersion after the change.
    #[serde(rename = "resourceVersion")]
    pub resource_version: String,
    /// The update changed only `status` (spec and metadata are unchanged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub status_only: bool,
}

/// Who made a change, as far as the producer could tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// User or field-manager name.
    pub name: String,
    /// How the actor was found.
    pub via: ActorVia,
    /// Groups of the authenticated user (audit only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Source IP addresses of the request (audit only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    /// User agent of the request (audit only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// The evidence an [`Actor`] was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActorVia {
    /// The Kubernetes audit log (authenticated user).
    #[serde(rename = "audit")]
    Audit,
    /// The newest `metadata.managedFields` entry (field manager, best effort).
    #[serde(rename = "managedFields")]
    ManagedFields,
    /// The Postgres session (e.g. the role that committed).
    #[serde(rename = "postgres")]
    Postgres,
}

impl ActorVia {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorVia::Audit => "audit",
            ActorVia::ManagedFields => "managedFields",
            ActorVia::Postgres => "postgres",
        }
    }

    /// Parses the wire form; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Audit, Self::ManagedFields, Self::Postgres]
            .into_iter()
            .find(|v| v.as_str() == text)
    }
}

/// Debezium's transaction block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// Transaction id, `<txid>:<commit lsn>`.
    pub id: String,
    /// Position of the event among all events of the transaction (1-based).
    pub total_order: u64,
    /// Position of the event among the events of its table in the transaction (1-based).
    pub data_collection_order: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_event_id_uses_the_postgres_lsn_text_form() {
        let id = EventId::postgres("inventory", 0x1_0000_16B3, 7);
        assert_eq!(id.as_str(), "pg:inventory:1/16B3:7");
    }

    #[test]
    fn op_codes_round_trip() {
        for op in [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate] {
            assert_eq!(Op::from_code(op.code()), Some(op));
            let json = serde_json::to_string(&op).expect("op serializes");
            assert_eq!(json, format!("\"{}\"", op.code()));
        }
        assert_eq!(Op::from_code("x"), None);
    }
}
