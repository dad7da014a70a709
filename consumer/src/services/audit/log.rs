//! The audit log as stored: where each part lives in the service's state, what an
//! entry holds, and how an event is appended (its entry, its leaf and the
//! subtrees it completes, its id, its index keys), all in the batch's one write.
//!
//! State keys (all under `audit/`; numbers big-endian, so keys sort by them):
//!
//! | key | value |
//! |---|---|
//! | `audit/size` | leaves in the log |
//! | `audit/entry/<index>` | the entry: metadata length, metadata JSON, the record's bytes |
//! | `audit/node/<level><index>` | hash of a complete subtree (level 0: a leaf) |
//! | `audit/id/<event id>` | the entry's index |
//! | `audit/head/<size>` | a signed tree head |
//! | `audit/x/<index kind><field>\0<time><index>` | empty: the query indexes |
//! | `audit/pruned` | entries pruned from the start (their hashes stay) |
//! | `audit/quarantine/<time><topic>\0<partition><offset>` | a record kept out of the log, with why |

use changewire_schemas::{ChangeEvent, Origin};
use serde::{Deserialize, Serialize};

use super::merkle::{appended, leaf_hash, Hash};

/// Key of the log's size.
pub const SIZE: &[u8] = b"audit/size";
/// Prefix of entries.
pub const ENTRY: &[u8] = b"audit/entry/";
/// Prefix of subtree hashes.
pub const NODE: &[u8] = b"audit/node/";
/// Prefix of the id index.
pub const ID: &[u8] = b"audit/id/";
/// Prefix of signed heads.
pub const HEAD: &[u8] = b"audit/head/";
/// Prefix of the query indexes.
pub const INDEX: &[u8] = b"audit/x/";
/// Prefix of quarantined records.
pub const QUARANTINE: &[u8] = b"audit/quarantine/";
/// Key of the number of entries pruned from the log's start.
pub const PRUNED: &[u8] = b"audit/pruned";

/// The query indexes, each ordered by change time then log index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// By resource: source, kind or table, namespace or schema, name or key.
    Resource,
    /// By actor name.
    Actor,
    /// By operation code.
    Op,
    /// By source name.
    Source,
    /// By time alone.
    Time,
}

impl IndexKind {
    fn tag(self) -> u8 {
        match self {
            IndexKind::Resource => b'r',
            IndexKind::Actor => b'a',
            IndexKind::Op => b'o',
            IndexKind::Source => b's',
            IndexKind::Time => b't',
        }
    }

    /// The prefix of this index's keys for `field` (empty for [`IndexKind::Time`]).
    pub fn prefix(self, field: &[u8]) -> Vec<u8> {
        let mut key = [INDEX, &[self.tag()]].concat();
        // Fields never hold NUL, the separator; a stray one cannot break out.
        key.extend(field.iter().map(|&b| if b == 0 { 1 } else { b }));
        key.push(0);
        key
    }
}

/// The key of the entry at `index`.
pub fn entry_key(index: u64) -> Vec<u8> {
    [ENTRY, &index.to_be_bytes()[..]].concat()
}

/// The key of the complete subtree at `level` and `index`.
pub fn node_key(level: u32, index: u64) -> Vec<u8> {
    [NODE, &[level as u8], &index.to_be_bytes()[..]].concat()
}

/// The key of the signed head of the tree over `size` leaves.
pub fn head_key(size: u64) -> Vec<u8> {
    [HEAD, &size.to_be_bytes()[..]].concat()
}

/// The key of `event_id`'s index entry.
pub fn id_key(event_id: &str) -> Vec<u8> {
    [ID, event_id.as_bytes()].concat()
}

/// Reads a big-endian `u64` value (0 when absent or malformed).
pub fn read_u64(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| v.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Where a logged record came from, stored (and hashed) with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The Kafka topic, partition and offset it was read at.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The record's key as text (a row's primary key, JSON), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When the audit service logged it (ms since the epoch).
    pub logged_ms: u64,
}

/// One log entry: its provenance and the record's bytes as read from Kafka. The
/// leaf hash covers both, so neither can change unseen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where the record came from.
    pub provenance: Provenance,
    /// The record's value (the encoded event).
    pub payload: Vec<u8>,
}

impl Entry {
    /// The stored form: metadata length (4 bytes), metadata JSON, payload.
    pub fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(&self.provenance).expect("provenance serializes");
        let mut value = Vec::with_capacity(4 + meta.len() + self.payload.len());
        value.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        value.extend_from_slice(&meta);
        value.extend_from_slice(&self.payload);
        value
    }

    /// Reads a stored entry; `None` when it is not one.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let (length, rest) = value.split_first_chunk::<4>()?;
        let length = u32::from_be_bytes(*length) as usize;
        let meta = rest.get(..length)?;
        Some(Self {
            provenance: serde_json::from_slice(meta).ok()?,
            payload: rest[length..].to_vec(),
        })
    }
}

/// What one event adds to the state, besides the size.
#[derive(Debug, Default)]
pub struct Appended {
    /// `(key, value)` pairs to write.
    pub writes: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The writes that append `entry` (the event `event`) at `index`, given the
/// complete subtrees already stored (`sibling`).
pub fn append<E>(
    index: u64,
    event: &ChangeEvent,
    entry: &Entry,
    sibling: impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Appended, E> {
    let value = entry.encode();
    let leaf = leaf_hash(&value);
    let mut writes = vec![
        (entry_key(index), value),
        (id_key(event.id.as_str()), index.to_be_bytes().to_vec()),
    ];
    for (level, position, hash) in appended(index, leaf, sibling)? {
        writes.push((node_key(level, position), hash.to_vec()));
    }
    for key in index_keys(index, event, entry) {
        writes.push((key, Vec::new()));
    }
    Ok(Appended { writes })
}

/// The query index keys of the entry at `index`.
pub fn index_keys(index: u64, event: &ChangeEvent, entry: &Entry) -> Vec<Vec<u8>> {
    let suffix = [
        &event.source.ts_ms.max(0).to_be_bytes()[..],
        &index.to_be_bytes()[..],
    ]
    .concat();
    (index_fields(event, entry).into_iter())
        .map(|(kind, field)| [kind.prefix(&field), suffix.clone()].concat())
        .collect()
}

/// What the indexes need that `event` lacks, if anything: such events are
/// quarantined, not logged.
pub fn lacks(event: &ChangeEvent) -> Option<&'static str> {
    if event.id.as_str().is_empty() {
        return Some("an id");
    }
    if event.source.name.is_empty() {
        return Some("a source name");
    }
    match &event.source.origin {
        Origin::Kubernetes(k8s) if k8s.kind.is_empty() || k8s.name.is_empty() => {
            Some("a kind and an object name")
        }
        Origin::Postgresql(pg) if pg.table.is_empty() => Some("a table"),
        _ => None,
    }
}

/// A record kept out of the log, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// Where it was read.
    pub provenance: Provenance,
    /// Why it is not in the log.
    pub reason: String,
    /// Its value, base64, as read.
    pub payload: String,
}

/// The key a quarantined record is kept under: by time, then where it was read.
pub fn quarantine_key(provenance: &Provenance) -> Vec<u8> {
    [
        QUARANTINE,
        &provenance.logged_ms.to_be_bytes(),
        provenance.topic.as_bytes(),
        &[0],
        &provenance.partition.to_be_bytes(),
        &provenance.offset.to_be_bytes(),
    ]
    .concat()
}

/// The index fields of an event: every index it belongs to.
fn index_fields(event: &ChangeEvent, entry: &Entry) -> Vec<(IndexKind, Vec<u8>)> {
    let resource = Resource::of(event, &entry.provenance);
    let mut fields = vec![
        (IndexKind::Resource, resource.index_field()),
        (IndexKind::Op, event.op.code().as_bytes().to_vec()),
        (IndexKind::Source, event.source.name.as_bytes().to_vec()),
        (IndexKind::Time, Vec::new()),
    ];
    if let Some(actor) = &event.actor {
        fields.push((IndexKind::Actor, actor.name.as_bytes().to_vec()));
    }
    fields
}

/// One changed thing: a Kubernetes object or a table row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// The source's name.
    pub source: String,
    /// `group/Kind` (`core/ConfigMap`), or the table.
    pub kind: String,
    /// The namespace (empty when cluster-scoped), or the schema.
    pub namespace: String,
    /// The object's name, or the row's key (its Kafka key, JSON).
    pub name: String,
}

impl Resource {
    /// The resource `event` changed; a row is named by its record's key.
    pub fn of(event: &ChangeEvent, provenance: &Provenance) -> Self {
        let source = event.source.name.clone();
        match &event.source.origin {
            Origin::Kubernetes(k8s) => Self {
                source,
                kind: format!(
                    "{}/{}",
                    if k8s.group.is_empty() {
                        "core"
                    } else {
                        &k8s.group
                    },
                    k8s.kind
                ),
                namespace: k8s.namespace.clone().unwrap_or_default(),
                name: k8s.name.clone(),
            },
            Origin::Postgresql(pg) => Self {
                source,
                kind: pg.table.clone(),
                namespace: pg.schema.clone(),
                name: provenance.key.clone().unwrap_or_default(),
            },
        }
    }

    /// The resource index's field: the four parts, NUL-free, separated by `\x1f`.
    pub fn index_field(&self) -> Vec<u8> {
        [&self.source, &self.kind, &self.namespace, &self.name]
            .map(|part| part.replace(['\0', '\x1f'], "\u{1}"))
            .join("\x1f")
            .into_bytes()
    }
}
