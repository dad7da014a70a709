//! Where a PostgreSQL source's events go: lanes of the publisher, records keyed by
//! row, tombstones after deletes when asked, and the event counters.

use changewire_kafka::{Lane, Publisher, Record};
use changewire_schemas::{Codec, Op};
use std::sync::Arc;

use super::error::PostgresError;
use super::normalize::{Table, TableEvent};
use crate::metrics::SourceMetrics;

/// Publishes one source's events.
pub(super) struct Output {
    publisher: Publisher,
    codec: Arc<Codec>,
    metrics: SourceMetrics,
    max_in_flight: usize,
}

impl Output {
    /// Publishing through `publisher`, encoding with `codec`, at most
    /// `max_in_flight` records unacknowledged per lane.
    pub(super) fn new(
        publisher: Publisher,
        codec: Arc<Codec>,
        metrics: SourceMetrics,
        max_in_flight: usize,
    ) -> Self {
        Self {
            publisher,
            codec,
            metrics,
            max_in_flight,
        }
    }

    /// Reports into `metrics` instead.
    pub(super) fn with_metrics(mut self, metrics: SourceMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The source's labelled metrics.
    pub(super) fn metrics(&self) -> &SourceMetrics {
        &self.metrics
    }

    /// A new lane to publish events in.
    pub(super) fn lane<T>(&self) -> Lane<T> {
        self.publisher
            .lane(self.metrics.shared().publish_metrics())
            .with_limit(self.max_in_flight)
    }

    /// Publishes one event of `table` to `lane` with its key, followed by a tombstone
    /// when asked.
    pub(super) async fn publish<T>(
        &self,
        lane: &mut Lane<T>,
        table: &Table,
        event: &TableEvent,
        tombstone: bool,
    ) -> Result<(), PostgresError> {
        let value = self.codec.encode(&event.event)?;
        let key = event.key.as_deref();
        lane.publish(&Record::keyed(&table.topic, key, Some(&value)))
            .await?;
        if tombstone {
            lane.publish(&Record::keyed(&table.topic, key, None))
                .await?;
        }
        Ok(())
    }

    /// Counts one event of `table`.
    pub(super) fn count(&self, table: &Table, op: Op) {
        let counter =
            (table.counters).get(op, || self.metrics.table_events(table.label(), op.code()));
        counter.inc();
    }
}
