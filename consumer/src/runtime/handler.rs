//! The handler seam: what a consumer service does with each new event.

use std::future::Future;

use changewire_schemas::ChangeEvent;

use super::store::{StateChanges, Store, StoreError};

/// Where an event was read from.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
}

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// May succeed later (a downstream outage): retried with backoff.
    #[error("transient failure: {0}")]
    Transient(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Will never succeed (invalid for this service): sent to the DLQ.
    #[error("permanent failure: {0}")]
    Permanent(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The state a handler reads and changes for one event. Changes are applied
/// together with the event's offset and id, or not at all.
pub struct Context<'a> {
    store: &'a Store,
    changes: StateChanges,
}

impl<'a> Context<'a> {
    pub(super) fn new(store: &'a Store) -> Self {
        Self {
            store,
            changes: StateChanges::default(),
        }
    }

    /// A state value, including changes made earlier for this event.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.changes.pending(key) {
            Some(value) => Ok(value.map(<[u8]>::to_vec)),
            None => self.store.get(key),
        }
    }

    /// Sets a state value.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.changes.put(key, value);
    }

    /// Removes a state value.
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.changes.remove(key);
    }

    pub(super) fn into_changes(self) -> StateChanges {
        self.changes
    }
}

/// A consumer service. The runtime calls it once per event id (duplicates within
/// the retention window are skipped) and commits its state changes atomically
/// with the partition offset.
pub trait Handler: Send + Sync + 'static {
    /// Applies one event.
    fn handle(
        &self,
        event: &ChangeEvent,
        meta: &RecordMeta,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
