//! The audit log as stored: where each part lives in the service's state, what an
//! entry holds, and how a batch of entries is appended (in blocks, with their
//! leaf hashes and the subtrees they complete), all in the batch's one write.
//!
//! Entries are stored in pages of about [`PAGE_BYTES`], Snappy-compressed, in
//! segment files beside sled ([`super::pages`]: sled would write each page some
//! 2.5 times as it rewrites and splits its tree nodes); sled keeps where each
//! page is. The leaf hashes of a block of [`BLOCK`] entries are a value of
//! their own, and only subtrees of a whole block and up are stored as hashes:
//! the ones below are recomputed from a block's leaf hashes ([`LogNodes`]). So a
//! thousand events are some 73 sled writes, index included, not thousands:
//! sled's cost is per write far more than per byte. A page never spans two
//! blocks or two batches.
//!
//! State keys (all under `audit/`; numbers big-endian, so keys sort by them):
//!
//! | key | value |
//! |---|---|
//! | `audit/size` | leaves in the log |
//! | `audit/entries/<first index>` | where a page of entries is ([`super::pages::Place`]); each entry in it is length, log index, entry |
//! | `audit/pages_end` | where the next page goes in the segment files |
//! | `audit/leaves/<block>` | the block's leaf hashes, in order (kept when pruned) |
//! | `audit/node/<level><index>` | hash of a complete subtree of a block or more |
//! | `audit/head/<size>` | a signed tree head |
//! | `audit/runs`, `audit/merging`, `audit/fence/<run>` | the query indexes ([`super::runs`]; their chunks are files, [`super::run_files`]) |
//! | `audit/pruned` | entries pruned from the start (their hashes stay) |
//! | `audit/quarantine/<time><topic>\0<partition><offset>` | a record kept out of the log, with why |

use std::collections::HashMap;

use changewire_schemas::{ChangeEvent, Origin};
use serde::{Deserialize, Serialize};

use super::bytes::{read_u64, Writes};
use super::merkle::{appended, leaf_hash, range_hash, Hash, Nodes};
use super::pages::{page_key, Pages, Place, ENTRIES};
use super::AuditError;
use crate::runtime::{Context, Store, StoreError};

/// Key of the log's size.
pub const SIZE: &[u8] = b"audit/size";
/// Prefix of the leaf hashes of blocks.
pub const LEAVES: &[u8] = b"audit/leaves/";
/// Prefix of subtree hashes.
pub const NODE: &[u8] = b"audit/node/";
/// Prefix of signed heads.
pub const HEAD: &[u8] = b"audit/head/";
/// Prefix of quarantined records.
pub const QUARANTINE: &[u8] = b"audit/quarantine/";
/// Key of the number of entries pruned from the log's start.
pub const PRUNED: &[u8] = b"audit/pruned";

/// A block holds `2^BLOCK_LEVEL` entries: the level of the lowest stored subtree.
/// 256 entries: a block's leaf hashes are one 8 kB value, and a proof recomputes
/// at most 255 hashes of a block; blocks of 32 made leaves and subtrees nearly
/// half of a batch's writes.
pub const BLOCK_LEVEL: u32 = 8;
/// Entries in a block.
pub const BLOCK: u64 = 1 << BLOCK_LEVEL;
/// A page takes no more entries once it holds this many bytes (before it is
/// compressed, to some 7 kB for JSON events). 12 kB pages made twice the sled
/// writes when pages were stored in sled.
pub const PAGE_BYTES: usize = 24_000;

/// Reads a state value (a handler's context, or the store).
pub type Get<'a> = dyn Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError> + 'a;

/// Where the log's writes go: a handler's context, or (in tests) memory.
pub trait State {
    /// A value, with the changes made so far.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets a value.
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    /// Removes a value.
    fn remove(&mut self, key: Vec<u8>);
}

impl State for Context<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Context::get(self, key)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        Context::put(self, key, value);
    }

    fn remove(&mut self, key: Vec<u8>) {
        Context::remove(self, key);
    }
}

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
    /// By event id.
    Id,
}

impl IndexKind {
    fn tag(self) -> u8 {
        match self {
            IndexKind::Resource => b'r',
            IndexKind::Actor => b'a',
            IndexKind::Op => b'o',
            IndexKind::Source => b's',
            IndexKind::Time => b't',
            IndexKind::Id => b'i',
        }
    }

    /// The prefix of this index's keys for a field of `parts`, each written
    /// piece by piece (none for [`IndexKind::Time`]; four for a resource).
    pub fn prefix(self, parts: &[&[&str]]) -> Vec<u8> {
        let mut key = Vec::new();
        self.push_prefix(&mut key, parts);
        key
    }

    fn push_prefix(self, key: &mut Vec<u8>, parts: &[&[&str]]) {
        key.push(self.tag());
        push_field(key, parts);
        key.push(0);
    }
}

/// The block holding the entry at `index`.
pub fn block_of(index: u64) -> u64 {
    index >> BLOCK_LEVEL
}

/// The stored page holding the entry at `index` (the last page starting at or
/// before it), with its first index.
pub fn page_of(store: &Store, index: u64) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let found = store.range(ENTRIES, &page_key(index + 1), true).next();
    let Some((key, place)) = found.transpose()? else {
        return Ok(None);
    };
    Ok(Some((
        first_of(&key),
        load_page(&Pages::of(store), &place)?,
    )))
}

/// The stored pages starting in `from..to`, in order, with their first indexes.
pub fn pages(store: &Store, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let files = Pages::of(store);
    (store.range(&page_key(from), &page_key(to), false))
        .map(|found| {
            let (key, place) = found?;
            Ok((first_of(&key), load_page(&files, &place)?))
        })
        .collect()
}

/// The page (its entries as written) at the place stored as `place`; empty
/// when it is not there or does not decompress (an altered store, which
/// `verify` reports as the entries missing).
pub fn load_page(files: &Pages, place: &[u8]) -> Result<Vec<u8>, StoreError> {
    let Some(place) = Place::decode(place) else {
        return Ok(Vec::new());
    };
    Ok(read_page(&files.read(place)?))
}

/// A page as stored: Snappy-compressed. Entries are JSON, so a page shrinks to
/// a fraction.
pub fn stored_page(page: &[u8]) -> Vec<u8> {
    PageCompressor::new().stored(page)
}

/// Compresses a batch's pages through one buffer (Snappy's `compress_vec`
/// zeroes a new worst-case buffer per page), each stored page a copy of its
/// own size.
struct PageCompressor {
    encoder: snap::raw::Encoder,
    buffer: Vec<u8>,
}

impl PageCompressor {
    fn new() -> Self {
        Self {
            encoder: snap::raw::Encoder::new(),
            buffer: Vec::new(),
        }
    }

    fn stored(&mut self, page: &[u8]) -> Vec<u8> {
        let room = snap::raw::max_compress_len(page.len());
        if self.buffer.len() < room {
            self.buffer.resize(room, 0);
        }
        let written = (self.encoder.compress(page, &mut self.buffer))
            .expect("a page is far below Snappy's size limit");
        self.buffer[..written].to_vec()
    }
}

/// A stored page's entries as written (none when it does not decompress: an
/// altered store, which `verify` reports as the entries missing).
pub fn read_page(stored: &[u8]) -> Vec<u8> {
    snap::raw::Decoder::new()
        .decompress_vec(stored)
        .unwrap_or_default()
}

fn first_of(page_key: &[u8]) -> u64 {
    read_u64(page_key.get(ENTRIES.len()..))
}

/// The key of block `block`'s leaf hashes.
pub fn leaves_key(block: u64) -> Vec<u8> {
    [LEAVES, &block.to_be_bytes()[..]].concat()
}

/// The key of the complete subtree at `level` (at least [`BLOCK_LEVEL`]) and `index`.
pub fn node_key(level: u32, index: u64) -> Vec<u8> {
    [NODE, &[level as u8], &index.to_be_bytes()[..]].concat()
}

/// The key of the signed head of the tree over `size` leaves.
pub fn head_key(size: u64) -> Vec<u8> {
    [HEAD, &size.to_be_bytes()[..]].concat()
}

/// Adds an entry (`value`, logged at `index`) to a page.
pub fn push_record(block: &mut Vec<u8>, index: u64, value: &[u8]) {
    block.extend_from_slice(&(value.len() as u32).to_be_bytes());
    block.extend_from_slice(&index.to_be_bytes());
    block.extend_from_slice(value);
}

/// The entries of a stored page as `(index, value)`, in stored order, up to the
/// first that does not parse (an altered page).
pub fn records(page: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = page;
    std::iter::from_fn(move || {
        let (length, after) = rest.split_first_chunk::<4>()?;
        let (index, after) = after.split_first_chunk::<8>()?;
        let length = u32::from_be_bytes(*length) as usize;
        let value = after.get(..length)?;
        rest = &after[length..];
        Some((u64::from_be_bytes(*index), value))
    })
}

/// The stored entry at `index` (its encoded [`Entry`]), if the store holds it.
pub fn entry_at(store: &Store, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let Some((_, page)) = page_of(store, index)? else {
        return Ok(None);
    };
    let found = records(&page)
        .find(|(at, _)| *at == index)
        .map(|(_, value)| value.to_vec());
    Ok(found)
}

/// Complete subtrees as the log stores them: hashes of whole blocks and up as
/// stored, smaller ones from their block's leaf hashes.
pub struct LogNodes<'a>(pub &'a Get<'a>);

impl Nodes for LogNodes<'_> {
    type Error = AuditError;

    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let missing = || AuditError::MissingNode { level, index };
        if level >= BLOCK_LEVEL {
            return (self.0)(&node_key(level, index))?
                .and_then(|v| Hash::try_from(v.as_slice()).ok())
                .ok_or_else(missing);
        }
        let first = index << level;
        let leaves = (self.0)(&leaves_key(block_of(first)))?.ok_or_else(missing)?;
        let start = (first % BLOCK) as usize;
        let hashes = Leaves(&leaves[..]);
        let end = start + (1 << level);
        if leaves.len() < end * 32 {
            return Err(missing());
        }
        Ok(range_hash(&hashes, start as u64, end as u64).expect("leaves are in memory"))
    }
}

/// A block's leaf hashes as a [`Nodes`] source of its own subtrees.
struct Leaves<'a>(&'a [u8]);

impl Nodes for Leaves<'_> {
    type Error = std::convert::Infallible;

    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        if level == 0 {
            let at = index as usize * 32;
            return Ok(self.0[at..at + 32].try_into().expect("32 bytes"));
        }
        let left = self.node(level - 1, index * 2)?;
        let right = self.node(level - 1, index * 2 + 1)?;
        Ok(super::merkle::node_hash(&left, &right))
    }
}

/// The hash of a whole block from its leaf hashes.
pub fn block_hash(leaves: &[u8]) -> Hash {
    Leaves(leaves)
        .node(BLOCK_LEVEL, 0)
        .expect("leaves are in memory")
}

/// The stored (compressed) pages that hold `values` (encoded entries)
/// appended to a log of `size` leaves, with their first indexes: a page starts
/// with the batch, with each block, and once the one before holds
/// [`PAGE_BYTES`].
pub fn batch_pages(size: u64, values: &[impl AsRef<[u8]>]) -> Vec<(u64, Vec<u8>)> {
    let (mut pages, mut compressor) = (Vec::new(), PageCompressor::new());
    let (mut first, mut page) = (size, Vec::new());
    for (index, value) in (size..).zip(values) {
        if index.is_multiple_of(BLOCK) || page.len() >= PAGE_BYTES {
            if !page.is_empty() {
                pages.push((first, compressor.stored(&page)));
                page.clear();
            }
            first = index;
        }
        push_record(&mut page, index, value.as_ref());
    }
    if !page.is_empty() {
        pages.push((first, compressor.stored(&page)));
    }
    pages
}

/// What is stored under `key`, unless it is to start afresh (`at` 0).
fn stored_unless_first(get: &Get<'_>, key: Vec<u8>, at: u64) -> Result<Vec<u8>, StoreError> {
    if at == 0 {
        return Ok(Vec::new());
    }
    Ok(get(&key)?.unwrap_or_default())
}

/// The writes that add the leaf hashes of `values` (encoded entries) from
/// `size` on, and the subtrees of the blocks they complete.
pub fn append_leaves(
    get: &Get<'_>,
    size: u64,
    values: &[impl AsRef<[u8]>],
) -> Result<Writes, AuditError> {
    let mut writes = Vec::new();
    let mut made: HashMap<(u32, u64), Hash> = HashMap::new();
    let mut index = size;
    for part in split_at(size, values, BLOCK) {
        let block = block_of(index);
        let mut leaves = stored_unless_first(get, leaves_key(block), index % BLOCK)?;
        for value in part {
            leaves.extend_from_slice(&leaf_hash(value.as_ref()));
            index += 1;
        }
        if index.is_multiple_of(BLOCK) {
            let sibling = |level: u32, i: u64| match made.get(&(level + BLOCK_LEVEL, i)) {
                Some(hash) => Ok(*hash),
                None => LogNodes(get).node(level + BLOCK_LEVEL, i),
            };
            for (level, position, hash) in appended(block, block_hash(&leaves), sibling)? {
                made.insert((level + BLOCK_LEVEL, position), hash);
                writes.push((node_key(level + BLOCK_LEVEL, position), hash.to_vec()));
            }
        }
        writes.push((leaves_key(block), leaves));
    }
    Ok(writes)
}

/// `values`, appended from `size` on, cut where groups of `per` end.
fn split_at<V>(size: u64, values: &[V], per: u64) -> Vec<&[V]> {
    let mut parts = Vec::new();
    let (mut rest, mut index) = (values, size);
    while !rest.is_empty() {
        let room = (per - index % per).min(rest.len() as u64) as usize;
        let (part, after) = rest.split_at(room);
        parts.push(part);
        rest = after;
        index += room as u64;
    }
    parts
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
    /// Appends the stored form of an entry to `out`: metadata length (4 bytes),
    /// metadata JSON, payload.
    fn encode_into(out: &mut Vec<u8>, provenance: &Provenance, payload: &[u8]) {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut *out, provenance).expect("provenance serializes");
        let meta = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&meta.to_be_bytes());
        out.extend_from_slice(payload);
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

/// A batch's encoded entries, written into one buffer as its events come (no
/// allocation of its own per entry).
#[derive(Debug, Default)]
pub struct Entries {
    bytes: Vec<u8>,
    /// Where each entry ends in `bytes`.
    ends: Vec<usize>,
}

impl Entries {
    /// Adds the entry of `payload`, read with `provenance`.
    pub fn push(&mut self, provenance: &Provenance, payload: &[u8]) {
        Entry::encode_into(&mut self.bytes, provenance, payload);
        self.ends.push(self.bytes.len());
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Removes every entry, keeping the buffers for the next batch.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// The bytes its buffers hold.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * size_of::<usize>()
    }

    /// Each entry's stored form, in order.
    pub fn values(&self) -> Vec<&[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        (starts.zip(&self.ends))
            .map(|(start, &end)| &self.bytes[start..end])
            .collect()
    }
}

/// The index keys of a batch, written into one buffer as its events come.
#[derive(Debug, Default)]
pub struct BatchKeys {
    bytes: Vec<u8>,
    /// Where each key is in `bytes`.
    spans: Vec<(usize, usize)>,
}

impl BatchKeys {
    /// Adds the keys of `event` (read with `provenance`), the `index`th of its
    /// batch: one per index it belongs to, each its index's prefix, the change
    /// time and the log index (relative to the batch until [`Self::rebase`]), so
    /// each index is ordered by time.
    pub fn add<R>(&mut self, event: &ChangeEvent<R>, provenance: &Provenance, index: u64) {
        let suffix = [event.source.ts_ms.max(0).to_be_bytes(), index.to_be_bytes()];
        let mut key = |kind: IndexKind, parts: &[&[&str]]| {
            let start = self.bytes.len();
            kind.push_prefix(&mut self.bytes, parts);
            self.bytes.extend_from_slice(suffix.as_flattened());
            self.spans.push((start, self.bytes.len() - start));
        };
        let source = event.source.name.as_str();
        match &event.source.origin {
            Origin::Kubernetes(k8s) => {
                let group = if k8s.group.is_empty() {
                    "core"
                } else {
                    &k8s.group
                };
                let namespace = k8s.namespace.as_deref().unwrap_or_default();
                let parts: [&[&str]; 4] = [
                    &[source],
                    &[group, "/", &k8s.kind],
                    &[namespace],
                    &[&k8s.name],
                ];
                key(IndexKind::Resource, &parts);
            }
            Origin::Postgresql(pg) => {
                let name = provenance.key.as_deref().unwrap_or_default();
                key(
                    IndexKind::Resource,
                    &[&[source], &[&pg.table], &[&pg.schema], &[name]],
                );
            }
        }
        key(IndexKind::Op, &[&[event.op.code()]]);
        key(IndexKind::Source, &[&[source]]);
        key(IndexKind::Time, &[]);
        key(IndexKind::Id, &[&[event.id.as_str()]]);
        if let Some(actor) = &event.actor {
            key(IndexKind::Actor, &[&[&actor.name]]);
        }
    }

    /// Whether no key was added.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Removes every key, keeping the buffers for the next batch.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.spans.clear();
    }

    /// The bytes its buffers hold.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity() + self.spans.capacity() * size_of::<(usize, usize)>()
    }

    /// Makes the keys' log indexes absolute: the batch starts at `base` (the
    /// log's size before it, known only when the batch is sealed).
    pub fn rebase(&mut self, base: u64) {
        for &(start, length) in &self.spans {
            let index = &mut self.bytes[start + length - 8..start + length];
            let absolute = u64::from_be_bytes(index.try_into().expect("8 bytes")) + base;
            index.copy_from_slice(&absolute.to_be_bytes());
        }
    }

    /// The keys, sorted.
    pub fn sorted(&mut self) -> impl Iterator<Item = &[u8]> {
        let bytes = &self.bytes;
        let key = move |&(start, length): &(usize, usize)| &bytes[start..start + length];
        self.spans.sort_unstable_by(|a, b| key(a).cmp(key(b)));
        self.spans.iter().map(key)
    }
}

/// Separates the parts of a resource in its index field.
const PART_SEPARATOR: u8 = 0x1f;

/// Writes an index field: its parts separated by [`PART_SEPARATOR`], each
/// written piece by piece. NUL ends a field and the separator separates parts,
/// so inside a part both are written as `\x01`.
fn push_field(out: &mut Vec<u8>, parts: &[&[&str]]) {
    for (n, part) in parts.iter().enumerate() {
        if n > 0 {
            out.push(PART_SEPARATOR);
        }
        for piece in *part {
            out.extend(piece.bytes().map(|b| match b {
                0 | PART_SEPARATOR => 1,
                b => b,
            }));
        }
    }
}

/// The log index an index key points at.
pub fn indexed(key: &[u8]) -> u64 {
    read_u64(key.len().checked_sub(8).and_then(|at| key.get(at..)))
}

/// What the indexes need that `event` lacks, if anything: such events are
/// quarantined, not logged.
pub fn lacks<R>(event: &ChangeEvent<R>) -> Option<&'static str> {
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
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::super::merkle::{consistency_proof, inclusion_proof, node_hash, root};
    use super::*;

    /// State in memory.
    #[derive(Default)]
    pub(in super::super) struct Memory(pub BTreeMap<Vec<u8>, Vec<u8>>);

    impl State for Memory {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.0.get(key).cloned())
        }

        fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
            self.0.insert(key, value);
        }

        fn remove(&mut self, key: Vec<u8>) {
            self.0.remove(&key);
        }
    }

    /// RFC 9162's MTH over `values`, straight from its definition.
    fn reference_root(values: &[Vec<u8>]) -> Hash {
        match values.len() {
            0 => super::super::merkle::empty_root(),
            1 => leaf_hash(&values[0]),
            n => {
                let k = 1 << (63 - (n as u64 - 1).leading_zeros());
                node_hash(&reference_root(&values[..k]), &reference_root(&values[k..]))
            }
        }
    }

    /// Appends `values` in batches of the given sizes: the hashes as stored,
    /// and the stored pages with their first indexes.
    fn appended_in(batches: &[usize], values: &[Vec<u8>]) -> (Memory, Vec<(u64, Vec<u8>)>) {
        let (mut memory, mut pages) = (Memory::default(), Vec::new());
        let mut size = 0;
        for &count in batches {
            let batch = &values[size..size + count];
            let writes =
                append_leaves(&|k: &[u8]| memory.get(k), size as u64, batch).expect("appends");
            for (key, value) in writes {
                memory.put(key, value);
            }
            pages.extend(batch_pages(size as u64, batch));
            size += count;
        }
        (memory, pages)
    }

    #[test]
    fn blocks_give_the_roots_and_proofs_of_the_whole_tree() {
        let values: Vec<Vec<u8>> = (0..1200)
            .map(|i| format!("entry {i}").repeat(i % 90).into_bytes())
            .collect();
        let batches = [1, 250, 2, 520, 100, 3, 255, 69];
        let (memory, pages) = appended_in(&batches, &values);
        let get = |k: &[u8]| memory.get(k);
        let nodes = LogNodes(&get);
        for size in 1..=1200u64 {
            let expected = reference_root(&values[..size as usize]);
            assert_eq!(root(&nodes, size).expect("root"), expected, "size {size}");
        }
        let pages: Vec<(u64, Vec<u8>)> = (pages.into_iter())
            .map(|(first, p)| (first, read_page(&p)))
            .collect();
        let stored: Vec<(u64, Vec<u8>)> = (pages.iter())
            .flat_map(|(_, page)| records(page).map(|(at, v)| (at, v.to_vec())))
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = (0..).zip(values.iter().cloned()).collect();
        assert_eq!(stored, expected, "every entry once, in order");
        for (first, page) in pages {
            let largest = values.iter().map(Vec::len).max().unwrap_or(0);
            assert!(
                page.len() < PAGE_BYTES + 12 + largest,
                "page {first} is small"
            );
            let last = records(&page).last().map_or(first, |(last, _)| last);
            assert_eq!(
                block_of(first),
                block_of(last),
                "page {first} stays in its block"
            );
        }
        // Proofs only need what is stored: they come out for every pair.
        assert_eq!(inclusion_proof(&nodes, 37, 1200).expect("proof").len(), 11);
        // Past the last whole block: siblings 1,024 and 64 wide, then 5 in a 32.
        assert_eq!(inclusion_proof(&nodes, 1100, 1150).expect("proof").len(), 8);
        for (from, to) in [(37, 1200), (300, 1100), (1030, 1199)] {
            assert!(!consistency_proof(&nodes, from, to)
                .expect("proof")
                .is_empty());
        }
        let stored_nodes = memory.0.keys().filter(|k| k.starts_with(NODE)).count();
        // 1,200 entries: four whole blocks of 256, two pairs, one of four.
        assert_eq!(stored_nodes, 4 + 2 + 1, "whole blocks and up only");
    }

    #[test]
    fn batch_keys_start_with_the_prefixes_queries_ask_for() {
        use changewire_schemas::fixtures::{kubernetes_create, postgres_update};
        let mut object = kubernetes_create("k8s");
        if let Origin::Kubernetes(k8s) = &mut object.source.origin {
            k8s.name = "odd\0name\u{1f}here".into();
        }
        let row = postgres_update("pg");
        let provenance = |key: Option<&str>| Provenance {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: key.map(str::to_owned),
            logged_ms: 0,
        };
        let mut keys = BatchKeys::default();
        keys.add(&object, &provenance(None), 0);
        keys.add(&row, &provenance(Some("{\"id\":1}")), 1);
        keys.rebase(7);
        let keys: Vec<Vec<u8>> = keys.sorted().map(<[u8]>::to_vec).collect();
        assert_eq!(keys.len(), 12, "six indexes each");
        for (event, provenance, index) in [
            (&object, provenance(None), 7),
            (&row, provenance(Some("{\"id\":1}")), 8),
        ] {
            let resource = Resource::of(event, &provenance);
            let parts: [&[&str]; 4] = [
                &[&resource.source],
                &[&resource.kind],
                &[&resource.namespace],
                &[&resource.name],
            ];
            let actor = event.actor.as_ref().map_or("", |a| a.name.as_str());
            for prefix in [
                IndexKind::Resource.prefix(&parts),
                IndexKind::Id.prefix(&[&[event.id.as_str()]]),
                IndexKind::Actor.prefix(&[&[actor]]),
                IndexKind::Op.prefix(&[&[event.op.code()]]),
            ] {
                let found = keys
                    .iter()
                    .find(|k| k.starts_with(&prefix) && indexed(k) == index);
                assert!(
                    found.is_some(),
                    "{:?} in {keys:?}",
                    String::from_utf8_lossy(&prefix)
                );
            }
        }
    }

    #[test]
    fn a_batch_of_entries_reads_back_entry_by_entry() {
        let provenance = |offset: i64, key: Option<&str>| Provenance {
            topic: "k8s.\"odd\" topic".into(),
            partition: 2,
            offset,
            key: key.map(str::to_owned),
            logged_ms: 1_700_000_000_000 + offset as u64,
        };
        let written = [
            Entry {
                provenance: provenance(0, None),
                payload: b"{}".to_vec(),
            },
            Entry {
                provenance: provenance(1, Some("{\"id\":1}")),
                payload: vec![],
            },
            Entry {
                provenance: provenance(9, Some("")),
                payload: vec![0xff; 3000],
            },
        ];
        let mut entries = Entries::default();
        for entry in &written {
            entries.push(&entry.provenance, &entry.payload);
        }
        assert_eq!(entries.len(), 3);
        let read: Vec<Entry> = (entries.values().into_iter())
            .map(|value| Entry::decode(value).expect("an entry"))
            .collect();
        assert_eq!(read, written);
    }

    #[test]
    fn a_block_with_a_changed_leaf_hash_is_refused_as_a_node_source() {
        let values: Vec<Vec<u8>> = (0..10).map(|i| vec![i]).collect();
        let (mut memory, _) = appended_in(&[10], &values);
        memory.put(leaves_key(0), vec![0; 32 * 3]);
        let get = |k: &[u8]| memory.get(k);
        assert!(matches!(
            root(&LogNodes(&get), 10),
            Err(AuditError::MissingNode { .. })
        ));
    }
}
