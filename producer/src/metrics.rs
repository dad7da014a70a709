//! Producer metrics (Prometheus) and the state the health endpoint reports.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use changewire_kafka::PublishMetrics;
use changewire_schemas::http::{encode_registry, HealthReport, Observable};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the event counters: a PostgreSQL table's or a Kubernetes kind's.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum EventLabels {
    /// `{table="schema.table", op}`.
    Table {
        /// `schema.table`.
        table: String,
        /// Event op code.
        op: String,
    },
    /// `{kind="group/Kind", op}`.
    Kind {
        /// `group/Kind` (`core/ConfigMap`).
        kind: String,
        /// Event op code.
        op: String,
    },
}

impl EncodeLabelSet for EventLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self {
            EventLabels::Table { table, op } => {
                [("table", table.as_str()), ("op", op.as_str())].encode(encoder)
            }
            EventLabels::Kind { kind, op } => {
                [("kind", kind.as_str()), ("op", op.as_str())].encode(encoder)
            }
        }
    }
}

/// Label of per-table PostgreSQL metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `schema.table`.
    pub table: String,
}

/// Label of per-kind Kubernetes metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `group/Kind` (`core/ConfigMap`).
    pub kind: String,
}

/// Which of the producer's sources a state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceKind {
    /// The PostgreSQL logical replication source.
    Postgres,
    /// The Kubernetes watch source.
    Kubernetes,
}

impl SourceKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Postgres => "postgres",
            SourceKind::Kubernetes => "kubernetes",
        }
    }
}

/// What a source is doing, for the health endpoint; later variants are worse
/// (the producer reports its worst source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceState {
    /// Streaming changes.
    Streaming,
    /// Taking the initial snapshot.
    Snapshotting,
    /// Connecting and checking the server.
    Starting,
    /// Waiting to reconnect after a failure.
    Reconnecting,
    /// Stopped (shut down or failed permanently).
    Stopped,
}

impl SourceState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Starting => "starting",
            SourceState::Snapshotting => "snapshotting",
            SourceState::Streaming => "streaming",
            SourceState::Reconnecting => "reconnecting",
            SourceState::Stopped => "stopped",
        }
    }
}

/// Every producer metric, registered in one registry.
pub struct ProducerMetrics {
    registry: Registry,
    /// Events published, by table and op.
    pub events: Family<EventLabels, Counter>,
    /// Seconds from handing a record to Kafka until it was acknowledged.
    pub delivery_seconds: Histogram,
    /// Events handed to Kafka and not yet acknowledged.
    pub in_flight: Gauge,
    /// Bytes of WAL between the server's position and the confirmed position.
    pub lag_bytes: Gauge,
    /// Age of the latest confirmed transaction when it was confirmed.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// The last LSN confirmed to PostgreSQL.
    pub confirmed_lsn: Gauge,
    /// Sessions restarted after a transient failure.
    pub reconnects: Counter,
    /// Rows read by snapshots.
    pub snapshot_rows: Family<TableLabel, Counter>,
    /// The planner's row estimate of each table the snapshot reads (`reltuples`).
    pub snapshot_rows_estimated: Family<TableLabel, Gauge>,
    /// Kubernetes objects currently known, by kind.
    pub watched_objects: Family<KindLabel, Gauge>,
    /// Kubernetes relists (initial lists, and lists after 410 Gone or restarts), by kind.
    pub relists: Family<KindLabel, Counter>,
    /// Kubernetes watch failures the watcher recovered from, by kind.
    pub watch_restarts: Family<KindLabel, Counter>,
    /// Audit events received by the Kubernetes audit webhook.
    pub audit_received: Counter,
    /// Kubernetes changes whose actor came from the audit log.
    pub audit_attributed: Counter,
    /// Kubernetes changes whose audit event did not arrive in time (managedFields used).
    pub audit_unattributed: Counter,
    /// Each running source's state and latest unrecovered failure.
    sources: Mutex<BTreeMap<SourceKind, (SourceState, Option<String>)>>,
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("changewire_producer");
        let metrics = Self {
            events: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            in_flight: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            confirmed_lsn: Gauge::default(),
            reconnects: Counter::default(),
            snapshot_rows: Family::default(),
            snapshot_rows_estimated: Family::default(),
            watched_objects: Family::default(),
            relists: Family::default(),
            watch_restarts: Family::default(),
            audit_received: Counter::default(),
            audit_attributed: Counter::default(),
            audit_unattributed: Counter::default(),
            sources: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events",
            "Events published to Kafka",
            metrics.events.clone(),
        );
        registry.register(
            "kafka_delivery_seconds",
            "Time from enqueue to Kafka acknowledgement",
            metrics.delivery_seconds.clone(),
        );
        registry.register(
            "in_flight_events",
            "Events awaiting Kafka acknowledgement",
            metrics.in_flight.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "WAL bytes between the server and the confirmed position",
            metrics.lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Age of the latest confirmed transaction when confirmed",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "confirmed_lsn",
            "Last LSN confirmed to PostgreSQL",
            metrics.confirmed_lsn.clone(),
        );
        registry.register(
            "reconnects",
            "Sessions restarted after a transient failure",
            metrics.reconnects.clone(),
        );
        registry.register(
            "kubernetes_audit_events",
            "Audit events received by the Kubernetes audit webhook",
            metrics.audit_received.clone(),
        );
        registry.register(
            "kubernetes_audit_attributed",
            "Kubernetes changes whose actor came from the audit log",
            metrics.audit_attributed.clone(),
        );
        registry.register(
            "kubernetes_audit_unattributed",
            "Kubernetes changes whose audit event did not arrive within the wait",
            metrics.audit_unattributed.clone(),
        );
        registry.register(
            "snapshot_rows",
            "Rows read by snapshots",
            metrics.snapshot_rows.clone(),
        );
        registry.register(
            "snapshot_rows_estimated",
            "Rows the planner estimates in each table the snapshot reads",
            metrics.snapshot_rows_estimated.clone(),
        );
        registry.register(
            "kubernetes_watched_objects",
            "Kubernetes objects currently known",
            metrics.watched_objects.clone(),
        );
        registry.register(
            "kubernetes_relists",
            "Kubernetes lists (initial, after 410 Gone, after restarts)",
            metrics.relists.clone(),
        );
        registry.register(
            "kubernetes_watch_restarts",
            "Kubernetes watch failures recovered from",
            metrics.watch_restarts.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl Observable for ProducerMetrics {
    fn encode_metrics(&self) -> String {
        encode_registry(&self.registry)
    }

    /// Healthy while every source snapshots or streams.
    fn health(&self) -> HealthReport {
        let state = self.state();
        HealthReport {
            healthy: matches!(state, SourceState::Streaming | SourceState::Snapshotting),
            state: state.as_str(),
            last_error: self.last_error(),
        }
    }
}

impl ProducerMetrics {
    /// The publisher's share of these metrics (delivery time, records in flight).
    pub fn publish_metrics(&self) -> PublishMetrics {
        PublishMetrics {
            delivery_seconds: Some(self.delivery_seconds.clone()),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Records what `source` is doing.
    pub fn set_state(&self, source: SourceKind, state: SourceState) {
        self.lock_sources().entry(source).or_insert((state, None)).0 = state;
    }

    /// The state of the least healthy source (`Starting` before any reported).
    pub fn state(&self) -> SourceState {
        let sources = self.lock_sources();
        let worst = sources.values().map(|(state, _)| *state).max();
        worst.unwrap_or(SourceState::Starting)
    }

    /// Records the latest failure of `source` (shown by the health endpoint), or
    /// `None` once it recovered.
    pub fn set_error(&self, source: SourceKind, error: Option<String>) {
        self.lock_sources()
            .entry(source)
            .or_insert((SourceState::Starting, None))
            .1 = error;
    }

    /// The sources' failures they have not recovered from, each named.
    pub fn last_error(&self) -> Option<String> {
        let errors: Vec<String> = self
            .lock_sources()
            .iter()
            .filter_map(|(source, (_, error))| {
                error.as_ref().map(|e| format!("{}: {e}", source.as_str()))
            })
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    fn lock_sources(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<SourceKind, (SourceState, Option<String>)>> {
        // A poisoned lock only means a thread panicked mid-assignment of a pair.
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_the_least_healthy_source() {
        let metrics = ProducerMetrics::default();
        assert!(!metrics.health().healthy, "no source is running yet");
        metrics.set_state(SourceKind::Postgres, SourceState::Streaming);
        assert!(metrics.health().healthy);
        metrics.set_state(SourceKind::Kubernetes, SourceState::Reconnecting);
        metrics.set_error(SourceKind::Kubernetes, Some("watch failed".into()));
        let report = metrics.health();
        assert!(!report.healthy);
        assert_eq!(report.state, "reconnecting");
        assert_eq!(
            report.last_error.as_deref(),
            Some("kubernetes: watch failed")
        );
        metrics.set_state(SourceKind::Postgres, SourceState::Streaming);
        assert!(
            !metrics.health().healthy,
            "postgres streaming again does not hide it"
        );
        metrics.set_state(SourceKind::Kubernetes, SourceState::Streaming);
        metrics.set_error(SourceKind::Kubernetes, None);
        assert!(metrics.health().healthy);
        assert_eq!(metrics.last_error(), None);
    }
}
