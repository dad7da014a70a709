//! Publishing a watch's batches: events to the kind's topic through a lane, each
//! batch followed by a mark; the state a batch justifies is written once the mark
//! comes back (everything before it acknowledged).

use std::time::Instant;

use changewire_kafka::{Lane, Record};
use changewire_schemas::{ChangeEvent, Op};
use serde_json::Value;

use super::error::KubernetesError;
use super::object::WatchedKind;
use super::reconcile::Batch;
use super::shared::Shared;
use super::state::ObjectStore;

/// Records a watch may have in flight before it stops reading (bounds memory while
/// the broker is slow or down).
const MAX_IN_FLIGHT: usize = 50_000;

/// A batch whose events are all acknowledged: the state writes it justifies.
pub(super) struct Confirmed {
    ops: Vec<Op>,
    writes: Vec<(String, Option<Value>)>,
    resume: Option<String>,
}

/// Events published, each batch followed by a mark that comes back (in order) once
/// everything published before it is acknowledged. Reading the watch goes on
/// meanwhile, so a slow acknowledgement makes the next batch bigger, not later.
pub(super) struct InFlight<'a, O> {
    shared: &'a Shared<O>,
    kind: &'a WatchedKind,
    lane: Lane<Confirmed>,
}

impl<'a, O: ObjectStore> InFlight<'a, O> {
    pub(super) fn new(shared: &'a Shared<O>, kind: &'a WatchedKind) -> Self {
        Self {
            shared,
            kind,
            lane: shared
                .publisher
                .lane(shared.metrics.shared().publish_metrics())
                .with_limit(MAX_IN_FLIGHT),
        }
    }

    /// Queues a batch's events (read from the watch at `seen`), then its marker.
    pub(super) async fn publish(
        &mut self,
        mut batch: Batch,
        seen: Instant,
    ) -> Result<(), KubernetesError> {
        if let Some(attributions) = &self.shared.attributions {
            attributions.attribute(&mut batch.events, seen).await;
        }
        if !batch.creates.is_empty() {
            let scope = self.kind.scope();
            (self.shared.objects).reserve(&scope, &batch.reservations())?;
        }
        for change in &batch.events {
            self.publish_one(change).await?;
            while let Some(confirmed) = self.lane.take_confirmed()? {
                self.confirm(confirmed)?;
            }
        }
        self.lane.mark(Confirmed {
            ops: batch.events.iter().map(|e| e.op).collect(),
            writes: batch.writes,
            resume: batch.resume,
        });
        Ok(())
    }

    /// Writes the state of the next acknowledged batch; `None` once nothing is in
    /// flight. Cancel-safe.
    pub(super) async fn confirm_next(&mut self) -> Option<Result<(), KubernetesError>> {
        let confirmed = self.lane.next_confirmed().await?;
        Some(
            confirmed
                .map_err(KubernetesError::from)
                .and_then(|c| self.confirm(c)),
        )
    }

    /// Waits until everything published is acknowledged and its state written.
    pub(super) async fn drain(&mut self) -> Result<(), KubernetesError> {
        while let Some(confirmed) = self.confirm_next().await {
            confirmed?;
        }
        Ok(())
    }

    /// Publishes one event, keyed by the object.
    async fn publish_one(&mut self, change: &ChangeEvent) -> Result<(), KubernetesError> {
        let object = change.after.as_ref().or(change.before.as_ref());
        let key = self.kind.key(object.unwrap_or(&Value::Null));
        let value = self.shared.codec.encode(change)?;
        let record = Record::keyed(&self.kind.topic, Some(key.as_bytes()), Some(&value));
        Ok(self.lane.publish(&record).await?)
    }

    /// Writes the state a batch justifies, now that all of its events are acknowledged.
    fn confirm(&self, confirmed: Confirmed) -> Result<(), KubernetesError> {
        let source = self.shared;
        for op in confirmed.ops {
            source
                .metrics
                .count_kind_event(self.kind.label(), op.code());
        }
        if !confirmed.writes.is_empty() || confirmed.resume.is_some() {
            let resume = (confirmed.resume).map(|version| self.kind.resume_token(&version));
            let scope = self.kind.scope();
            (source.objects).apply(&scope, confirmed.writes, resume.as_deref())?;
        }
        Ok(())
    }
}
