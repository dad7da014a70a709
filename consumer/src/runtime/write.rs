//! A batch's write: the handler's seal, then one atomic, flushed sled write of
//! the batch's state changes, effects, processed ids and offsets. It runs on a
//! blocking thread while the worker applies the next batch, which reads the
//! batch's own changes in memory meanwhile (not the seal's).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use changewire_schemas::diagnostics::report;

use super::batch::{number, Batch};
use super::digest::Segment;
use super::handler::{Context, Emitted, Seal};
use super::metrics::ConsumerMetrics;
use super::outbox::{Outbox, Pending};
use super::store::{StateChanges, Store};
use super::types::unix_millis;
use super::RuntimeError;

/// A batch whose write runs (or ran) next to the batch being applied.
pub(super) struct Writing {
    pub(super) batch: Arc<Batch>,
    /// Its effects, numbered, once the write is done.
    pub(super) effects: Vec<Arc<Pending>>,
    /// The write; taken once it was awaited.
    write: Option<tokio::task::JoinHandle<Result<Vec<Arc<Pending>>, RuntimeError>>>,
}

/// What the write of one batch needs besides the batch.
pub(super) struct WriteJob {
    pub(super) store: Store,
    pub(super) outbox: Arc<Outbox>,
    pub(super) metrics: Arc<ConsumerMetrics>,
    pub(super) sinks: Arc<[String]>,
    pub(super) segment: Segment,
}

impl Writing {
    /// Starts writing `batch` on a blocking thread.
    pub(super) fn start(mut batch: Batch, job: WriteJob) -> Self {
        let (seal, emitted) = (batch.seal.take(), std::mem::take(&mut batch.emitted));
        let batch = Arc::new(batch);
        let writing = batch.clone();
        let write = tokio::task::spawn_blocking(move || job.run(&writing, seal, emitted));
        Self {
            batch,
            effects: Vec::new(),
            write: Some(write),
        }
    }

    /// Whether the write is still to be awaited.
    pub(super) fn is_running(&self) -> bool {
        self.write.is_some()
    }

    /// Waits for the write if it runs; its effects are in `effects` then.
    async fn finished(&mut self) -> Result<(), RuntimeError> {
        let Some(write) = self.write.as_mut() else {
            return Ok(());
        };
        // Awaited by reference: a `select!` may drop this future and call again.
        let result = write.await;
        self.write = None;
        self.effects = match result {
            Ok(result) => result?,
            Err(panicked) => {
                return Err(RuntimeError::Fatal(format!(
                    "a batch's write failed: {panicked}"
                )))
            }
        };
        Ok(())
    }
}

/// Waits for the write under way, if any (the batch stays in place).
pub(super) async fn written(writing: &mut Option<Writing>) -> Result<(), RuntimeError> {
    match writing {
        Some(writing) => writing.finished().await,
        None => Ok(()),
    }
}

impl WriteJob {
    fn run(
        self,
        batch: &Batch,
        seal: Option<Box<dyn Seal>>,
        mut emitted: Vec<Emitted>,
    ) -> Result<Vec<Arc<Pending>>, RuntimeError> {
        let sealed = match seal {
            Some(seal) => {
                let started = Instant::now();
                let (changes, more) = self.seal(batch, seal)?;
                (self.metrics.seal_seconds).observe(started.elapsed().as_secs_f64());
                emitted.extend(more);
                changes
            }
            None => StateChanges::default(),
        };
        let first = self.outbox.sequence(emitted.len());
        let effects = number(emitted, first);
        let started = Instant::now();
        let changes = [&batch.changes, &sealed];
        (self.store).commit(&changes, &self.segment, &batch.offsets, &effects)?;
        (self.metrics.commit_seconds).observe(started.elapsed().as_secs_f64());
        Ok(effects)
    }

    /// Runs `seal` over the store and the batch's changes.
    fn seal(
        &self,
        batch: &Batch,
        seal: Box<dyn Seal>,
    ) -> Result<(StateChanges, Vec<Emitted>), RuntimeError> {
        let origin = format!("seal/{}", unix_millis(SystemTime::now()));
        let mut context = Context::new(&self.store, &batch.changes, None, &self.sinks, origin);
        seal.seal(&mut context)
            .map_err(|e| RuntimeError::Fatal(format!("sealing a batch: {}", report(&e))))?;
        Ok(context.finish())
    }
}
