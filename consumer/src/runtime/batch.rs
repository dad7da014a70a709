//! A batch: what one sled write commits (state changes, emitted effects, the
//! ids applied and the offsets moved). [`super::pipeline`] fills it.

use std::collections::HashMap;
use std::sync::Arc;

use super::digest::IdDigest;
use super::handler::{Emitted, Record, Seal};
use super::outbox::Pending;
use super::store::StateChanges;
use super::types::PartitionKey;

/// What one batch changes, committed to sled in one write.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) changes: StateChanges,
    /// Digests of the event ids applied.
    pub(super) processed: Vec<IdDigest>,
    pub(super) offsets: HashMap<PartitionKey, i64>,
    /// Effects in emit order; numbered by [`number`] when the batch is written.
    pub(super) emitted: Vec<Emitted>,
    /// The handler's write per batch, run with the batch's write.
    pub(super) seal: Option<Box<dyn Seal>>,
}

impl Batch {
    /// Marks `record` done: the partition's next offset moves past it.
    pub(super) fn done(&mut self, record: &Record) {
        self.offsets
            .insert((record.topic.clone(), record.partition), record.offset + 1);
    }

    /// Whether committing it would change nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.offsets.is_empty()
            && self.changes.is_empty()
            && self.emitted.is_empty()
            && self.seal.is_none()
    }
}

/// Numbers a batch's effects from `first`, in emit order, for the outbox (one
/// stored entry, keyed by `first`).
pub(super) fn number(emitted: Vec<Emitted>, first: u64) -> Vec<Arc<Pending>> {
    emitted
        .into_iter()
        .zip(first..)
        .map(|(emitted, sequence)| {
            Arc::new(Pending {
                sequence,
                entry: first,
                sink: emitted.sink,
                idempotency_key: emitted.idempotency_key,
                effect: emitted.effect,
            })
        })
        .collect()
}
