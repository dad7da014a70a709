//! The audit service: every event once, in an append-only log with a Merkle tree
//! over it (RFC 9162), signed tree heads published to Kafka, and a query API.
//!
//! - [`merkle`]: the tree, its roots and proofs (pure);
//! - [`log`]: how the log is stored (in blocks), and appending a batch;
//! - [`pages`]: the entries' pages, in segment files beside sled;
//! - [`runs`]: the query indexes, as sorted runs merged in tiers;
//! - [`run_files`]: the runs' chunks, a file per run beside sled;
//! - [`merger`]: those merges, on a thread of their own;
//! - [`head`]: signed tree heads;
//! - [`query`]: finding events by resource, actor, op, source, time, changed path;
//! - [`verify`]: recomputing the tree from the store against every signed head;
//! - [`prune`]: retention, keeping every hash;
//! - [`api`]: the HTTP API over all of it; [`cli`]: the terminal's view of it.
//!
//! The handler keeps each new event as it comes and appends them all when the
//! batch is sealed, in the batch's one atomic write (entry blocks, leaf hashes,
//! completed subtrees, a sorted run of index keys, size), so a crash leaves each
//! event in the log once or not at all. On each tick with new entries it signs a
//! head and emits it to the `heads` Kafka sink.

pub mod api;
pub mod bytes;
pub mod cli;
pub mod head;
pub mod log;
pub mod merger;
pub mod merkle;
pub mod pages;
pub mod prune;
pub mod query;
pub mod run_files;
pub mod runs;
pub mod verify;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use changewire_schemas::settings::ConfigError;
use changewire_schemas::ChangeEvent;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use self::bytes::read_u64;
use self::head::HeadSigner;
use self::log::{
    append_leaves, batch_pages, head_key, lacks, quarantine_key, BatchKeys, Entries, LogNodes,
    Provenance, Quarantined, PRUNED, SIZE,
};
use self::merger::Merger;
use self::pages::Pages;
use self::prune::{prune, remove_pruned_segments, Retention};
use self::run_files::RunFiles;
use self::runs::Runs;
use crate::runtime::sinks::kafka::{KafkaSink, Oversized};
use crate::runtime::StoreError;
use crate::runtime::{Context, Effect, Handler, HandlerError, Record, RuntimeConfig, Seal, Sinks};

/// The name of the sink signed heads go to.
pub const HEADS: &str = "heads";

/// Key of the size of the last signed head.
const LAST_HEAD: &[u8] = b"audit/last_head";

/// Key of the store's layout version; a store without it that holds entries was
/// written with one entry per key (before version 2). Version 3 keeps leaf hashes
/// in blocks of 256 entries, not 32; version 4 keeps pages in segment files
/// beside sled, not in it; version 5 keeps index-run chunks in files too.
const LAYOUT: &[u8] = b"audit/layout";
const LAYOUT_VERSION: &[u8] = b"5";

/// The `[audit]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Base64 of the 32-byte ed25519 seed tree heads are signed with (set it from
    /// `CHANGEWIRE_AUDIT__SIGNING_KEY`; never logged).
    pub signing_key: String,
    /// Where the query API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer tokens that may query: a list, or one comma-separated string (as
    /// `CHANGEWIRE_AUDIT__READ_TOKENS` gives it).
    #[serde(default, deserialize_with = "changewire_schemas::settings::tokens")]
    pub read_tokens: Vec<String>,
    /// Bearer tokens that may also verify the store (same forms).
    #[serde(default, deserialize_with = "changewire_schemas::settings::tokens")]
    pub admin_tokens: Vec<String>,
    /// The topic signed heads go to; default `<prefix>.audit.heads`.
    #[serde(default)]
    pub heads_topic: Option<String>,
    /// The most events one page of a query returns.
    #[serde(default = "default_max_page")]
    pub max_page: usize,
    /// Prune entries logged longer ago than this (default: keep them).
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Prune the oldest entries beyond this many (default: keep them).
    #[serde(default)]
    pub max_entries: Option<u64>,
}

/// The demo signing key in config/audit.toml: anyone can read it, so heads signed
/// with it prove nothing, and a service using it says so.
pub const DEMO_SIGNING_KEY: &str = "ZGVtby1rZXktbm90LWZvci1wcm9kdWN0aW9uLXVzZSE=";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9470))
}

fn default_max_page() -> usize {
    1000
}

impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConfig")
            .field("listen", &self.listen)
            .field("read_tokens", &self.read_tokens.len())
            .field("admin_tokens", &self.admin_tokens.len())
            .field("heads_topic", &self.heads_topic)
            .field("max_page", &self.max_page)
            .field("retention_days", &self.retention_days)
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl AuditConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        HeadSigner::from_seed(&self.signing_key)
            .map_err(|e| ConfigError::invalid("audit.signing_key", e.to_string()))?;
        if self.read_tokens.is_empty() && self.admin_tokens.is_empty() {
            return Err(ConfigError::invalid(
                "audit.read_tokens",
                "the query API needs at least one token (read_tokens or admin_tokens)",
            ));
        }
        if self.max_page == 0 {
            return Err(ConfigError::invalid("audit.max_page", "must be at least 1"));
        }
        Ok(())
    }

    /// What the log keeps.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: (self.retention_days)
                .map(|d| std::time::Duration::from_secs(u64::from(d) * 86_400)),
            max_entries: self.max_entries,
        }
    }

    /// The topic heads are published to.
    pub fn heads_topic(&self, config: &RuntimeConfig) -> String {
        (self.heads_topic.clone())
            .unwrap_or_else(|| format!("{}.audit.heads", config.topics.prefix))
    }
}

/// Why the log could not be read or appended to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A subtree hash the log needs is not stored.
    #[error("the audit log lacks the hash of subtree {level}/{index}: the store was altered")]
    MissingNode {
        /// Level of the subtree.
        level: u32,
        /// Its index on that level.
        index: u64,
    },
    /// A stored value does not parse.
    #[error("{0} in the audit store does not parse: the store was altered")]
    Corrupt(&'static str),
}

/// What `handle` kept of the batch being applied, for its seal.
#[derive(Default)]
struct Pending {
    /// The batch's entries, encoded.
    entries: Entries,
    /// Their index keys.
    keys: BatchKeys,
}

/// Buffers above this many bytes are not kept for the next batch (one batch
/// of huge events should not hold its memory for good).
const SPARE_BYTES: usize = 64 << 20;

impl Pending {
    /// Empties it for the next batch, unless its buffers grew past
    /// [`SPARE_BYTES`].
    fn into_spare(mut self) -> Option<Self> {
        self.entries.clear();
        self.keys.clear();
        (self.entries.capacity() + self.keys.capacity() <= SPARE_BYTES).then_some(self)
    }
}

/// A batch's seal: its entries, the merges of the index runs, and where its
/// emptied buffers go for a later batch (they grow to megabytes per batch).
struct Sealing {
    pending: Pending,
    merger: Arc<Merger>,
    spare: Arc<Mutex<Option<Pending>>>,
}

/// Appends the batch's entries to the log: pages, leaf and subtree hashes, and
/// the batch's index keys as one sorted run (after a merge finished meanwhile is
/// put in place, or the next one due is started).
impl Seal for Sealing {
    fn seal(self: Box<Self>, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let mut pending = self.pending;
        let values = pending.entries.values();
        let size = read_u64(context.get(SIZE)?.as_deref());
        let end = size + values.len() as u64;
        let pruned = read_u64(context.get(PRUNED)?.as_deref());
        // The pages are on disk before the write that says where they are.
        let pages_end = read_u64(context.get(pages::END)?.as_deref());
        let pages = batch_pages(size, &values);
        let mut writes = Pages::of(context.committed()).write(pages_end, &pages)?;
        writes.extend(
            append_leaves(&|key: &[u8]| context.get(key), size, &values)
                .map_err(HandlerError::fatal)?,
        );
        for (key, value) in writes {
            context.put(key, value);
        }
        pending.keys.rebase(size);
        let mut runs = Runs::load(&|key: &[u8]| context.get(key)).map_err(HandlerError::fatal)?;
        let committed = context.committed().clone();
        (self.merger)
            .step(&committed, context, &mut runs, pruned)
            .map_err(HandlerError::fatal)?;
        let files = RunFiles::of(&committed);
        runs::add_run(
            context,
            &files,
            &mut runs,
            pending.keys.sorted(),
            (size, end),
        )?;
        runs::save(context, &runs);
        context.put(SIZE, end.to_be_bytes().to_vec());
        *self.spare.lock().expect("not poisoned") = pending.into_spare();
        Ok(())
    }
}

/// The audit handler.
pub struct Audit {
    /// The batch's new events, appended when it is sealed.
    pending: Mutex<Pending>,
    /// A sealed batch's emptied buffers, for the next batch.
    spare: Arc<Mutex<Option<Pending>>>,
    merger: Arc<Merger>,
    signer: HeadSigner,
    heads_topic: String,
    service: String,
    retention: Retention,
}

impl Audit {
    /// The handler and its sinks (signed heads go to Kafka).
    pub fn new(config: &RuntimeConfig, audit: &AuditConfig) -> Result<(Self, Sinks), ConfigError> {
        audit.validate()?;
        let signer = HeadSigner::from_seed(&audit.signing_key)
            .map_err(|e| ConfigError::invalid("audit.signing_key", e.to_string()))?;
        if audit.signing_key == DEMO_SIGNING_KEY {
            tracing::warn!("audit.signing_key is the published demo key: anyone can sign heads with it; set CHANGEWIRE_AUDIT__SIGNING_KEY to the base64 of 32 random bytes");
        }
        tracing::info!(
            key_id = %head::key_id(&signer.verifying_key()),
            public_key = %changewire_schemas::hex(signer.verifying_key().as_bytes()),
            "audit heads are signed with this key"
        );
        let sink = KafkaSink::new(HEADS, config, Oversized::Reject)
            .map_err(|e| ConfigError::invalid("kafka", e.to_string()))?;
        let handler = Self {
            pending: Mutex::default(),
            spare: Arc::default(),
            merger: Arc::default(),
            signer,
            heads_topic: audit.heads_topic(config),
            service: config.service.name.clone(),
            retention: audit.retention(),
        };
        Ok((handler, Sinks::new().with(HEADS, sink)))
    }

    /// The public key heads verify with.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.signer.verifying_key()
    }
}

/// Where `record` was read, logged now.
fn provenance(record: &Record) -> Provenance {
    Provenance {
        topic: record.topic.clone(),
        partition: record.partition,
        offset: record.offset,
        key: (record.key.as_deref()).map(|k| String::from_utf8_lossy(k).into_owned()),
        logged_ms: now_ms(SystemTime::now()),
    }
}

/// Keeps `record` out of the log, with why.
fn quarantine(context: &mut Context<'_>, record: &Record, reason: &str) {
    use base64::Engine as _;
    let kept = Quarantined {
        provenance: provenance(record),
        reason: reason.to_owned(),
        payload: base64::engine::general_purpose::STANDARD.encode(&record.payload),
    };
    let value = serde_json::to_vec(&kept).expect("a quarantined record serializes");
    context.put(quarantine_key(&kept.provenance), value);
    tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason, "record quarantined, not logged");
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Handler for Audit {
    type Row = Box<RawValue>;

    async fn handle(
        &self,
        event: &ChangeEvent<Self::Row>,
        record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if let Some(missing) = lacks(event) {
            quarantine(context, record, &format!("the event lacks {missing}"));
            return Ok(());
        }
        // Ids seen before are skipped by the runtime (its dedup window).
        let provenance = provenance(record);
        let mut pending = self.pending.lock().expect("not poisoned");
        // Relative to the batch: the log's size is known once the last batch's
        // seal is written.
        let index = pending.entries.len() as u64;
        pending.keys.add(event, &provenance, index);
        pending.entries.push(&provenance, &record.payload);
        Ok(())
    }

    async fn start(&self, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let layout = context.get(LAYOUT)?;
        if layout.as_deref() == Some(LAYOUT_VERSION) {
            let committed = context.committed();
            let pages_end = pages::committed_end(committed)?;
            Pages::of(committed).cut_after(pages_end)?;
            return Ok(());
        }
        if layout.is_some() || read_u64(context.get(SIZE)?.as_deref()) > 0 {
            return Err(HandlerError::fatal(
                "this audit store was written in an older layout (one entry per key, leaf \
                 hashes in blocks of 32, or pages or index runs inside sled); move its state directory \
                 aside and restart: \
                 the service rebuilds the log from the topics while their retention lasts \
                 (the heads topic keeps what the old log signed)",
            ));
        }
        context.put(LAYOUT, LAYOUT_VERSION.to_vec());
        Ok(())
    }

    fn take_seal(&self) -> Option<Box<dyn Seal>> {
        let mut pending = self.pending.lock().expect("not poisoned");
        if pending.entries.is_empty() {
            return None;
        }
        let spare = self.spare.lock().expect("not poisoned").take();
        let pending = std::mem::replace(&mut *pending, spare.unwrap_or_default());
        Some(Box::new(Sealing {
            pending,
            merger: self.merger.clone(),
            spare: self.spare.clone(),
        }))
    }

    fn undecodable(
        &self,
        record: &Record,
        reason: &str,
        context: &mut Context<'_>,
    ) -> Result<bool, HandlerError> {
        quarantine(context, record, reason);
        Ok(true)
    }

    async fn tick(&self, now: SystemTime, context: &mut Context<'_>) -> Result<(), HandlerError> {
        if self.retention.prunes() {
            let pruned = prune(context, &self.retention, now_ms(now))?;
            if pruned > 0 {
                tracing::info!(pruned, "pruned entries past retention (their hashes stay)");
                self.merger.runs_pruned();
            }
            let removed = remove_pruned_segments(context.committed())?;
            if removed > 0 {
                tracing::info!(removed, "deleted segment files of pruned pages");
            }
        }
        let size = read_u64(context.get(SIZE)?.as_deref());
        if size == 0 || size == read_u64(context.get(LAST_HEAD)?.as_deref()) {
            return Ok(());
        }
        let root = merkle::root(&LogNodes(&|key: &[u8]| context.get(key)), size)
            .map_err(HandlerError::fatal)?;
        let head = self.signer.sign(size, &root, now_ms(now));
        let json = serde_json::to_vec(&head).map_err(HandlerError::fatal)?;
        context.put(head_key(size), json.clone());
        context.put(LAST_HEAD, size.to_be_bytes().to_vec());
        let effect = Effect {
            destination: Some(self.heads_topic.clone()),
            key: Some(self.service.clone().into_bytes()),
            ..Effect::new(json)
        };
        context.emit(HEADS, effect)?;
        tracing::info!(size, root = %head.root, "signed a tree head");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_provenance() -> Provenance {
        Provenance {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            logged_ms: 0,
        }
    }

    #[test]
    fn a_sealed_batch_leaves_its_buffers_empty_for_the_next_unless_they_grew_huge() {
        let event = changewire_schemas::fixtures::kubernetes_create("k8s");
        let mut pending = Pending::default();
        pending.entries.push(&some_provenance(), b"{}");
        pending.keys.add(&event, &some_provenance(), 0);
        let spare = pending.into_spare().expect("small buffers are kept");
        assert!(spare.entries.is_empty() && spare.keys.is_empty());
        assert!(spare.entries.capacity() > 0 && spare.keys.capacity() > 0);

        let mut huge = Pending::default();
        huge.entries.push(&some_provenance(), &vec![0; SPARE_BYTES]);
        assert!(
            huge.into_spare().is_none(),
            "a huge batch's memory is let go"
        );
    }
}
