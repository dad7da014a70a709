//! Producer metrics (Prometheus) and the state the health endpoint reports.

use std::sync::atomic::AtomicU64;

use changewire_schemas::http::{encode_registry, HealthReport, Observable, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of per-table event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableOp {
    /// `schema.table`.
    pub table: String,
    /// Event op code.
    pub op: String,
}

/// Label of per-kind Kubernetes metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `group/Kind` (`core/ConfigMap`).
    pub kind: String,
}

/// What the source is doing, for the health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Connecting and checking the server.
    Starting = 0,
    /// Taking the initial snapshot.
    Snapshotting = 1,
    /// Streaming changes.
    Streaming = 2,
    /// Waiting to reconnect after a failure.
    Reconnecting = 3,
    /// Stopped (shut down or failed permanently).
    Stopped = 4,
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
    pub events: Family<TableOp, Counter>,
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
    pub snapshot_rows: Counter,
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
    status: Status<SourceState>,
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
            snapshot_rows: Counter::default(),
            watched_objects: Family::default(),
            relists: Family::default(),
            watch_restarts: Family::default(),
            audit_received: Counter::default(),
            audit_attributed: Counter::default(),
            audit_unattributed: Counter::default(),
            status: Status::new(SourceState::Starting),
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

    /// Healthy while snapshotting or streaming.
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
    /// Records what the source is doing.
    pub fn set_state(&self, state: SourceState) {
        self.status.set(state);
    }

    /// What the source is doing.
    pub fn state(&self) -> SourceState {
        self.status.get()
    }

    /// Records the latest failure (shown by the health endpoint).
    pub fn set_error(&self, error: Option<String>) {
        self.status.set_error(error);
    }

    /// The latest failure, if the source has not recovered since.
    pub fn last_error(&self) -> Option<String> {
        self.status.last_error()
    }
}
