//! The batch pipeline: records (and ticks, and partition take-overs) go through
//! the handler into one [`Batch`], by the handler's error class: applied,
//! parked for a retry, dead-lettered, or the service stops.

use std::time::{Instant, SystemTime};

use changewire_schemas::diagnostics::report;
use changewire_schemas::ChangeEvent;

use super::batch::Batch;
use super::digest::{self, IdDigest};
use super::gaps::Verdict;
use super::handler::{Context, Handler, HandlerError, Record};
use super::metrics::{Outcome, ServiceState};
use super::parking::Earlier;
use super::store::StateChanges;
use super::types::unix_millis;
use super::worker::Worker;
use super::RuntimeError;

impl<H: Handler> Worker<'_, H> {
    /// Applies `records` in order into a new batch, after the partitions taken
    /// over from other instances were reset.
    pub(super) async fn apply(&mut self, records: Vec<Record>) -> Result<Batch, RuntimeError> {
        let mut batch = Batch::default();
        self.reset_taken_over(&mut batch);
        for record in records {
            let Some(record) = self.parking.hold(record) else {
                continue;
            };
            if !self.owns(&record) {
                continue;
            }
            self.apply_one(&record, &mut batch).await?;
        }
        batch.seal = self.handler.take_seal();
        Ok(batch)
    }

    /// Lets the handler drop the state of partitions another instance went
    /// further on.
    fn reset_taken_over(&mut self, batch: &mut Batch) {
        for (topic, partition) in self.assignment.take_resets() {
            let origin = format!("reset/{topic}/{partition}");
            let mut context = self.context(&batch.changes, origin);
            self.handler
                .partition_reset(&topic, partition, &mut context);
            let (changes, emitted) = context.finish();
            batch.changes.extend(changes);
            batch.emitted.extend(emitted);
        }
    }

    /// The handler's start, as a batch of its own.
    pub(super) async fn start(&mut self) -> Result<Batch, RuntimeError> {
        let nothing = StateChanges::default();
        let origin = format!("start/{}", unix_millis(SystemTime::now()));
        let mut context = self.context(&nothing, origin);
        let result = self.handler.start(&mut context).await;
        batch_of(context, result, "start")
    }

    /// A tick of the handler's clock, as a batch of its own. It waits for the
    /// write under way: a tick sees what the last batch's seal wrote.
    pub(super) async fn tick(&mut self) -> Result<Batch, RuntimeError> {
        self.finish_write().await?;
        let nothing = StateChanges::default();
        let now = SystemTime::now();
        let mut context = self.context(&nothing, format!("tick/{}", unix_millis(now)));
        let result = self.handler.tick(now, &mut context).await;
        batch_of(context, result, "tick")
    }

    fn context<'c>(&'c self, batch: &'c StateChanges, origin: String) -> Context<'c> {
        let previous = self.writing.as_ref().map(|w| &w.batch.changes);
        Context::new(&self.store, batch, previous, &self.sink_names, origin)
    }

    async fn apply_one(&mut self, record: &Record, batch: &mut Batch) -> Result<(), RuntimeError> {
        if record.payload.is_empty() {
            // A tombstone after a delete: nothing to apply.
            batch.done(record);
            return Ok(());
        }
        let event = match self.codec.decode_as(&record.payload) {
            Ok(event) => event,
            Err(error) => {
                let reason = format!("undecodable: {}", report(&error));
                return self.undecodable(record, &reason, batch);
            }
        };
        let digest = digest::digest(event.id.as_str());
        if self.processed.contains(digest) {
            self.stats.duplicates += 1;
            self.metrics.count(&record.topic, Outcome::Duplicate);
            batch.done(record);
            return Ok(());
        }
        self.handle(&event, digest, record, batch).await
    }

    /// Runs the handler once and acts on its error class.
    async fn handle(
        &mut self,
        event: &ChangeEvent<H::Row>,
        digest: IdDigest,
        record: &Record,
        batch: &mut Batch,
    ) -> Result<(), RuntimeError> {
        let earlier = self.parking.take_earlier(record);
        let started = Instant::now();
        let mut context = self.context(&batch.changes, event.id.to_string());
        let result = self.handler.handle(event, record, &mut context).await;
        let (changes, emitted) = context.finish();
        self.metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        let attempt = earlier.as_ref().map_or(1, |e| e.attempts() + 1);
        match result {
            Ok(()) => {
                batch.changes.extend(changes);
                batch.emitted.extend(emitted);
                // In memory at once: later records of this batch and the next
                // ones see it while the batch's write is under way.
                self.processed.insert(digest);
                batch.processed.push(digest);
                batch.done(record);
                self.stats.applied += 1;
                self.metrics.count(&record.topic, Outcome::Applied);
            }
            Err(HandlerError::Transient(error)) if attempt < self.config.service.max_attempts => {
                self.park(event, record, earlier, false, &report(error.as_ref()));
            }
            Err(HandlerError::Unavailable(error)) => {
                self.park(event, record, earlier, true, &report(error.as_ref()));
            }
            Err(HandlerError::Transient(error)) => {
                let reason = format!(
                    "gave up after {attempt} attempts: {}",
                    report(error.as_ref())
                );
                self.dead_letter(record, &reason, batch);
            }
            Err(HandlerError::Permanent(error)) => {
                self.dead_letter(
                    record,
                    &format!("rejected: {}", report(error.as_ref())),
                    batch,
                );
            }
            Err(HandlerError::Fatal(error)) => {
                return Err(RuntimeError::Fatal(format!(
                    "handling {}: {}",
                    event.id,
                    report(error.as_ref())
                )));
            }
        }
        Ok(())
    }

    /// Parks the record's partition: it waits (paused), the others go on. The
    /// offset stays before the event, so a restart retries it too.
    fn park(
        &mut self,
        event: &ChangeEvent<H::Row>,
        record: &Record,
        earlier: Option<Earlier>,
        unavailable: bool,
        error: &str,
    ) {
        let attempt = earlier.as_ref().map_or(1, |e| e.attempts() + 1);
        let delay = self
            .parking
            .park(record, earlier, unavailable, tokio::time::Instant::now());
        if unavailable {
            tracing::warn!(event = %event.id, attempt, %error, retry_in = ?delay, "a dependency is unavailable; the partition waits, nothing is dead-lettered");
            self.metrics.set_state(ServiceState::Unavailable);
            self.metrics
                .set_error(Some(format!("unavailable, retrying {}: {error}", event.id)));
        } else {
            tracing::warn!(event = %event.id, attempt, %error, retry_in = ?delay, "transient failure; its partition waits, the others go on");
            self.metrics.set_state(ServiceState::Retrying);
            self.metrics
                .set_error(Some(format!("retrying {}: {error}", event.id)));
        }
        self.metrics.retries.inc();
    }

    /// Offers a record that is not an event to the handler; dead-letters it
    /// unless the handler keeps it.
    fn undecodable(
        &mut self,
        record: &Record,
        reason: &str,
        batch: &mut Batch,
    ) -> Result<(), RuntimeError> {
        let origin = format!("{}/{}/{}", record.topic, record.partition, record.offset);
        let mut context = self.context(&batch.changes, origin);
        let kept = self.handler.undecodable(record, reason, &mut context);
        let (changes, emitted) = context.finish();
        match kept {
            Ok(true) => {
                batch.changes.extend(changes);
                batch.emitted.extend(emitted);
                self.metrics.count(&record.topic, Outcome::Quarantined);
                batch.done(record);
            }
            Ok(false) => self.dead_letter(record, reason, batch),
            Err(HandlerError::Fatal(error)) => {
                return Err(RuntimeError::Fatal(format!(
                    "keeping an undecodable record: {}",
                    report(error.as_ref())
                )))
            }
            Err(error) => {
                let reason = format!(
                    "{reason}; the handler could not keep it: {}",
                    report(&error)
                );
                self.dead_letter(record, &reason, batch);
            }
        }
        Ok(())
    }

    /// Commits `record`'s dead letter with the batch; the record is done.
    fn dead_letter(&mut self, record: &Record, reason: &str, batch: &mut Batch) {
        batch.emitted.push(self.dlq.record(record, reason));
        self.stats.dead_lettered += 1;
        self.metrics.count(&record.topic, Outcome::DeadLettered);
        batch.done(record);
    }

    /// Whether `record` is from a partition this instance owns and at or past the
    /// next offset expected (records before it are the rewind, or already
    /// applied), and not from the service's own DLQ. A read that starts past
    /// the expected offset is sought back (see [`super::gaps`]).
    fn owns(&mut self, record: &Record) -> bool {
        // A pattern subscription may match the service's own DLQ: dead-lettering
        // those records again would loop. They are stored there already.
        if record.topic == self.dlq.topic() {
            return false;
        }
        let key = (record.topic.clone(), record.partition);
        let mut owned = self.assignment.lock();
        let Some(expected) = owned.get_mut(&key) else {
            return false;
        };
        if let Some(next) = *expected {
            match self.gaps.check(&key, next, record.offset) {
                Verdict::Apply => {}
                // A seek is made (and logged) once the batch is applied.
                Verdict::Skip | Verdict::SeekTo(_) => return false,
                Verdict::ApplyPastHole => {
                    self.metrics.offset_gaps.inc();
                    tracing::warn!(
                        topic = %record.topic,
                        partition = record.partition,
                        expected = next,
                        got = record.offset,
                        "offsets missing from the partition (compaction, transaction markers, \
                         or records deleted before they were read)"
                    );
                }
            }
        }
        *expected = Some(record.offset + 1);
        true
    }
}

/// What a start or a tick did, as a batch, by its outcome: a failure other
/// than a fatal one leaves nothing to commit.
fn batch_of(
    context: Context<'_>,
    result: Result<(), HandlerError>,
    what: &str,
) -> Result<Batch, RuntimeError> {
    let mut batch = Batch::default();
    match result {
        Ok(()) => {
            let (changes, emitted) = context.finish();
            batch.changes = changes;
            batch.emitted = emitted;
        }
        Err(HandlerError::Fatal(error)) => {
            return Err(RuntimeError::Fatal(format!(
                "{what}: {}",
                report(error.as_ref())
            )));
        }
        Err(error) => {
            tracing::warn!(error = %report(&error), "the handler's {what} failed; going on")
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing::{self, event_id, event_record, Scripted};
    use crate::runtime::{dlq, RunStats};

    fn sinks_of(batch: &Batch) -> Vec<&str> {
        batch.emitted.iter().map(|e| e.sink.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_error_class_does_what_it_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = testing::config(dir.path());
        let handler = Scripted::default()
            .fails(2, &["permanent"])
            .fails(3, &["transient", "transient"])
            .fails(5, &["unavailable"; 10]);
        let mut worker = testing::worker(&config, handler);
        let records = vec![
            testing::record(0, 0, b"not an event"),
            event_record(0, 1, 1),
            event_record(0, 2, 2),
            event_record(1, 0, 3),
            event_record(1, 1, 4),
        ];
        let batch = worker.apply(records).await.expect("applies");
        assert_eq!(
            sinks_of(&batch),
            vec![dlq::SINK, "s", dlq::SINK],
            "undecodable and rejected dead-lettered, 1 applied"
        );
        assert_eq!(
            batch.emitted[1].idempotency_key,
            format!("{}/s/0", event_id(1))
        );
        assert_eq!(batch.offsets.get(&("t".into(), 0)), Some(&3));
        assert_eq!(
            batch.offsets.get(&("t".into(), 1)),
            None,
            "partition 1 waits for 3"
        );
        assert_eq!(
            worker.parking.pause_new(),
            vec![(("t".into(), 1), 0)],
            "4 is held behind 3"
        );
        // As the worker does when it pauses the partition: 3 is expected again.
        worker.assignment.lock().insert(("t".into(), 1), Some(0));
        assert_eq!(
            worker.stats,
            RunStats {
                applied: 1,
                duplicates: 0,
                dead_lettered: 2
            }
        );

        // The retry of 3 fails transiently again: max_attempts (2) is reached.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let (due, _) = worker.parking.due(tokio::time::Instant::now());
        let batch = worker.apply(due).await.expect("applies");
        assert_eq!(
            sinks_of(&batch),
            vec![dlq::SINK, "s"],
            "3 dead-lettered, 4 applied after it"
        );
        assert_eq!(batch.offsets.get(&("t".into(), 1)), Some(&2));

        // An unavailable dependency is retried without end, never dead-lettered.
        for attempt in 0..10 {
            let batch = worker
                .apply(vec![event_record(1, 2, 5)])
                .await
                .expect("applies");
            assert!(
                batch.emitted.is_empty(),
                "attempt {attempt}: nothing emitted"
            );
            assert!(worker
                .parking
                .take_earlier(&event_record(1, 2, 5))
                .is_some());
            worker.assignment.lock().insert(("t".into(), 1), Some(2));
        }
        assert_eq!(worker.metrics.state(), ServiceState::Unavailable);
        let batch = worker
            .apply(vec![event_record(1, 2, 5)])
            .await
            .expect("applies");
        assert_eq!(
            sinks_of(&batch),
            vec!["s"],
            "applied once the dependency is back"
        );
        assert_eq!(worker.stats.dead_lettered, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_seal_runs_with_the_batch_write_and_sees_its_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = testing::config(dir.path());
        let mut worker = testing::worker(&config, Scripted::default().fails(2, &["permanent"]));
        let records = vec![
            event_record(0, 0, 1),
            event_record(0, 1, 2),
            event_record(0, 2, 3),
        ];
        let batch = worker.apply(records).await.expect("applies");
        assert!(batch.seal.is_some(), "taken from the handler");
        assert_eq!(batch.changes.pending(b"sealed"), None, "not sealed yet");
        worker.write(batch);
        worker.finish_write().await.expect("written");
        assert_eq!(
            worker.store.get(b"sealed").expect("read"),
            Some(b"2 of 2".to_vec()),
            "sealed once, after both applied events, seeing their changes, \
             committed with the batch"
        );
        assert_eq!(
            worker.store.offset("t", 0).expect("read"),
            Some(3),
            "in the same write"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_tick_sees_what_the_seal_under_way_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = testing::config(dir.path());
        let mut worker = testing::worker(&config, Scripted::default());
        let batch = worker
            .apply(vec![event_record(0, 0, 1)])
            .await
            .expect("applies");
        worker.write(batch);
        let tick = worker.tick().await.expect("ticks");
        assert_eq!(
            tick.changes.pending(b"ticked"),
            Some(Some(&b"1 of 1"[..])),
            "the tick read the seal's write"
        );
    }

    #[tokio::test]
    async fn duplicates_are_skipped_and_a_fatal_error_stops_the_pipeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = testing::config(dir.path());
        let mut worker = testing::worker(&config, Scripted::default().fails(7, &["fatal"]));
        let batch = worker
            .apply(vec![event_record(0, 0, 1), event_record(0, 1, 1)])
            .await
            .expect("applies");
        assert_eq!(
            sinks_of(&batch),
            vec!["s"],
            "the repeated id has no second effect"
        );
        assert_eq!(worker.stats.duplicates, 1);
        assert_eq!(batch.offsets.get(&("t".into(), 0)), Some(&2));
        let error = worker
            .apply(vec![event_record(0, 2, 7)])
            .await
            .err()
            .expect("stops");
        assert!(
            matches!(error, RuntimeError::Fatal(ref why) if why.contains("corrupt")),
            "{error:?}"
        );
    }
}
