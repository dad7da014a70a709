//! A batch: what one sled write commits (state changes, emitted effects, the
//! ids applied and the offsets moved). [`super::pipeline`] fills it.

use std::collections::HashMap;
use std::sync::Arc;

use super::digest::IdDigest;
use super::handler::{Emitted, Record};
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
    /// Effects in emit order; numbered by [`Batch::seal`].
    pub(super) emitted: Vec<Emitted>,
}

impl Batch {
    /// Marks `record` done: the partition's next offset moves past it.
    pub(super) fn done(&mut self, record: &Record) {
        self.offsets
            .insert((record.topic.clone(), record.partition), record.offset + 1);
    }

    /// Whether committing it would change nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.changes.is_empty() && self.emitted.is_empty()
    }

    /// Numbers the effects from `first`, in emit order, for the outbox.
    pub(super) fn seal(&mut self, first: u64) -> Vec<Arc<Pending>> {
        std::mem::take(&mut self.emitted)
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
}
