//! The handler seam: what a consumer service does with each new event and on
//! each tick. A handler changes its state and *emits* effects; it never acts on
//! the outside world itself. The runtime commits both atomically and delivers the
//! effects through the named sinks.

use std::future::Future;
use std::time::SystemTime;

use changewire_schemas::{ChangeEvent, Row};

use super::outbox::Effect;
use super::store::{StateChanges, Store, StoreError};
use super::types::Header;

/// A record as read from Kafka, with the bytes a service may pass on unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub headers: Vec<Header>,
    /// The encoded value.
    pub payload: Vec<u8>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a handler did not apply an event, by what the runtime should do about it.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// May succeed on another attempt: retried with backoff (only the event's
    /// partition waits), then dead-lettered after `service.max_attempts`.
    #[error("transient failure")]
    Transient(#[source] BoxError),
    /// Will never succeed (invalid for this service): dead-lettered at once.
    #[error("permanent failure")]
    Permanent(#[source] BoxError),
    /// A dependency is down: the event's partition waits and is retried without
    /// end, `/health` says why, nothing is dead-lettered.
    #[error("dependency unavailable")]
    Unavailable(#[source] BoxError),
    /// The service cannot go on (a corrupted store, say): it stops with exit
    /// status 1; what was committed stays committed.
    #[error("fatal failure")]
    Fatal(#[source] BoxError),
}

impl HandlerError {
    /// A transient failure from any error.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient(error.into())
    }

    /// A permanent failure from any error.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// An unavailable dependency, from any error.
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        Self::Unavailable(error.into())
    }

    /// A fatal failure from any error.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        Self::Fatal(error.into())
    }
}

/// A store that fails cannot be trusted to hold the next batch either.
impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self::Fatal(Box::new(error))
    }
}

/// An effect a handler emitted, not yet committed.
#[derive(Debug)]
pub(super) struct Emitted {
    pub(super) sink: String,
    pub(super) idempotency_key: String,
    pub(super) effect: Effect,
}

/// A batch's write per batch, taken from its handler once the batch's last
/// record was handled ([`Handler::take_seal`]). `Sync` because it travels in the
/// batch, which the next batch's handles read while the write runs.
pub trait Seal: Send + Sync + 'static {
    /// Writes what the batch's `handle` calls kept. Any failure stops the
    /// service before the batch commits (a restart handles its records again).
    fn seal(self: Box<Self>, context: &mut Context<'_>) -> Result<(), HandlerError>;
}

/// What a handler reads and changes for one event (or one tick). Its state changes
/// and emitted effects are committed with the event's offset and id, in the
/// batch's one atomic write, or not at all (a failed event leaves no trace).
pub struct Context<'a> {
    store: &'a Store,
    batch: &'a StateChanges,
    /// The previous batch's changes while its write is still under way.
    previous: Option<&'a StateChanges>,
    sinks: &'a [String],
    /// What the idempotency keys of this event's effects start with.
    origin: String,
    changes: StateChanges,
    emitted: Vec<Emitted>,
}

impl<'a> Context<'a> {
    pub(super) fn new(
        store: &'a Store,
        batch: &'a StateChanges,
        previous: Option<&'a StateChanges>,
        sinks: &'a [String],
        origin: String,
    ) -> Self {
        Self {
            store,
            batch,
            previous,
            sinks,
            origin,
            changes: StateChanges::default(),
            emitted: Vec::new(),
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

    /// The store as last committed, without this batch's changes or the previous
    /// batch's: for work a handler hands to a thread of its own, off the batch's
    /// path (the audit's index merges).
    pub fn committed(&self) -> &Store {
        self.store
    }

    /// Committed state entries whose key starts with `prefix`, in key order
    /// (changes of batches not yet committed are not seen).
    pub fn scan_committed(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<super::store::StateEntry>, StoreError> {
        self.store.scan(prefix)
    }

    /// Asks for `effect` to be delivered through the sink named `sink`, once the
    /// batch is committed. Its idempotency key is `<event id>/<sink>/<ordinal>`
    /// (the ordinal counts this event's effects), so handling the same event
    /// again after a crash yields the same key. Returns that key.
    pub fn emit(&mut self, sink: &str, effect: Effect) -> Result<String, HandlerError> {
        if !self.sinks.iter().any(|s| s == sink) {
            return Err(HandlerError::fatal(format!(
                "the handler emitted to sink {sink:?}, which the service does not run (it runs {:?})",
                self.sinks
            )));
        }
        let idempotency_key = format!("{}/{sink}/{}", self.origin, self.emitted.len());
        self.emitted.push(Emitted {
            sink: sink.to_owned(),
            idempotency_key: idempotency_key.clone(),
            effect,
        });
        Ok(idempotency_key)
    }

    pub(super) fn finish(self) -> (StateChanges, Vec<Emitted>) {
        (self.changes, self.emitted)
    }
}

/// A consumer service. The runtime calls [`Handler::handle`] once per new event id
/// (duplicates within the retention window are skipped) and commits its state
/// changes and emitted effects atomically with the ids and partition offsets of
/// the whole batch; then its sinks deliver the effects.
pub trait Handler: Send + Sync + 'static {
    /// How the handler reads rows (`before`, `after`): [`serde_json::Value`] to
    /// look inside them; `Box<RawValue>` when it only stores or passes them on,
    /// which spares building a map of every row (the larger the rows, the more
    /// it saves: 7% of a small Kubernetes event's decode).
    type Row: Row + Send + Sync;

    /// Applies one event.
    fn handle(
        &self,
        event: &ChangeEvent<Self::Row>,
        record: &Record,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Runs once after a batch's last record, on the worker: hands over what the
    /// batch's `handle` calls kept for a write per batch rather than per event
    /// (blocks, sorted runs), as a [`Seal`]. The seal runs with the batch's
    /// write, on the write's thread, while the next batch is applied: its
    /// changes and effects commit with the batch, and the next batch's `handle`
    /// and `partition_reset` calls do not see them (ticks do: a tick waits for
    /// the write under way).
    fn take_seal(&self) -> Option<Box<dyn Seal>> {
        None
    }

    /// Runs once before the first record: its changes and effects commit like a
    /// batch's (to move state an earlier version left into effects, say). A
    /// failure other than [`HandlerError::Fatal`] is logged and consuming starts.
    fn start(
        &self,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = context;
        async { Ok(()) }
    }

    /// Runs every `service.tick_interval_ms` (never without it): time-driven work
    /// such as closing windows or debouncing. Its changes and effects are
    /// committed atomically like a batch's. A failure is logged and the next tick
    /// comes as usual, except [`HandlerError::Fatal`], which stops the service.
    fn tick(
        &self,
        now: SystemTime,
        context: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (now, context);
        async { Ok(()) }
    }

    /// A record whose value is not an event, with why. By default it goes to the
    /// DLQ; a handler that keeps such records itself (a quarantine in its state)
    /// returns `Ok(true)`, and its changes and effects commit with the batch.
    fn undecodable(
        &self,
        record: &Record,
        reason: &str,
        context: &mut Context<'_>,
    ) -> Result<bool, HandlerError> {
        let _ = (record, reason, context);
        Ok(false)
    }

    /// The metrics the runtime reports into and serves on `/metrics`. A handler
    /// that counts things of its own returns the ones it counts into; by
    /// default, new ones.
    fn metrics(&self) -> std::sync::Arc<super::ConsumerMetrics> {
        std::sync::Arc::default()
    }

    /// This instance takes over `topic`/`partition` from another one, further
    /// along than its own state: drop state scoped to that partition. Called
    /// before the partition's first event; the changes commit with that batch.
    fn partition_reset(&self, topic: &str, partition: i32, context: &mut Context<'_>) {
        let _ = (topic, partition, context);
    }
}
