//! The handler seam: what a consumer service does with each new event.

use std::future::Future;
use std::pin::Pin;

use changewire_schemas::ChangeEvent;

use super::store::{StateChanges, Store, StoreError};

/// A record as read from Kafka, with the bytes a service may pass on unchanged.
#[derive(Debug, Clone)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The encoded value.
    pub payload: Vec<u8>,
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

impl HandlerError {
    /// A transient failure from any error.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Transient(error.into())
    }

    /// A permanent failure from any error.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Permanent(error.into())
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self::Transient(Box::new(error))
    }
}

/// The state a handler reads and changes for one event. Its changes are applied
/// with the event's offset and id, in the batch's one atomic write, or not at all
/// (a failed event leaves no trace).
pub struct Context<'a> {
    store: &'a Store,
    batch: &'a StateChanges,
    /// The previous batch's changes while its write is still under way.
    previous: Option<&'a StateChanges>,
    changes: StateChanges,
}

impl<'a> Context<'a> {
    pub(super) fn new(
        store: &'a Store,
        batch: &'a StateChanges,
        previous: Option<&'a StateChanges>,
    ) -> Self {
        Self {
            store,
            batch,
            previous,
            changes: StateChanges::default(),
        }
    }

    /// A state value, including changes made earlier in this batch (and in the
    /// previous one, whose write may still be under way).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .changes
            .pending(key)
            .or_else(|| self.batch.pending(key))
            .or_else(|| self.previous.and_then(|p| p.pending(key)))
        {
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

/// A consumer service. The runtime calls [`Handler::handle`] once per new event id
/// (duplicates within the retention window are skipped) and commits its state
/// changes atomically with the ids and partition offsets of the whole batch.
pub trait Handler: Send + Sync + 'static {
    /// Applies one event.
    fn handle(
        &self,
        event: &ChangeEvent,
        record: &Record,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Runs once before the first batch is read: finish outward effects a crash
    /// interrupted (state written by [`Handler::handle`] and committed, effect not
    /// yet confirmed). Failures are retried with backoff.
    fn recover(&self, store: &Store) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = store;
        async { Ok(()) }
    }

    /// Runs once per batch, after its last [`Handler::handle`] and before its one
    /// atomic write: state changes that belong to the batch as a whole (one
    /// outbox entry for all of its output, say) are committed with it.
    fn seal(&self, changes: &mut StateChanges) {
        let _ = changes;
    }

    /// Runs after each batch is durable in sled: start the outward effects the batch
    /// recorded, and return a [`Settlement`] that resolves once they are confirmed.
    /// The runtime reads and applies the next batches meanwhile (a few at most),
    /// and mirrors a batch's offsets to Kafka only once it and every batch before it
    /// settled. A failed settlement makes the runtime wait for the others and run
    /// [`Handler::recover`]. Failures to start are retried with backoff.
    fn committed(
        &self,
        store: &Store,
    ) -> impl Future<Output = Result<Settlement, HandlerError>> + Send {
        let _ = store;
        async { Ok(settled()) }
    }
}

/// Resolves once a batch's outward effects are confirmed (see [`Handler::committed`]).
pub type Settlement = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// A settlement with nothing left to confirm.
pub fn settled() -> Settlement {
    Box::pin(std::future::ready(Ok(())))
}
