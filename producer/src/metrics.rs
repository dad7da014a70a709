//! Producer metrics (Prometheus) and the state the health endpoint reports.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use changewire_kafka::PublishMetrics;
use changewire_schemas::http::{encode_registry, HealthReport, Observable};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One table's event counters by op, looked up once each: labels are strings, and
/// building them for every event cost allocations on the hot path.
#[derive(Debug, Clone, Default)]
pub struct OpCounters([std::sync::OnceLock<Counter>; 5]);

impl OpCounters {
    /// The counter of `op`, made by `make` the first time.
    pub fn get(&self, op: changewire_schemas::Op, make: impl FnOnce() -> Counter) -> &Counter {
        use changewire_schemas::Op;
        let slot = match op {
            Op::Create => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Read => 3,
            Op::Truncate => 4,
        };
        self.0[slot].get_or_init(make)
    }
}

/// Labels of the event counters: a PostgreSQL table's or a Kubernetes kind's.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum EventLabels {
    /// `{source, table="schema.table", op}`.
    Table {
        /// The source's configured name.
        source: String,
        /// `schema.table`.
        table: String,
        /// Event op code.
        op: String,
    },
    /// `{source, kind="group/Kind", op}`.
    Kind {
        /// The source's configured name.
        source: String,
        /// `group/Kind` (`core/ConfigMap`).
        kind: String,
        /// Event op code.
        op: String,
    },
}

impl EncodeLabelSet for EventLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (source, thing, name, op) = match self {
            EventLabels::Table { source, table, op } => (source, "table", table, op),
            EventLabels::Kind { source, kind, op } => (source, "kind", kind, op),
        };
        [
            ("source", source.as_str()),
            (thing, name.as_str()),
            ("op", op.as_str()),
        ]
        .encode(encoder)
    }
}

/// Label of per-source metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The source's configured name.
    pub source: String,
}

/// Label of per-table PostgreSQL metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// The source's configured name.
    pub source: String,
    /// `schema.table`.
    pub table: String,
}

/// Label of per-kind Kubernetes metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The source's configured name.
    pub source: String,
    /// `group/Kind` (`core/ConfigMap`).
    pub kind: String,
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
    pub lag_bytes: Family<SourceLabel, Gauge>,
    /// Age of the latest confirmed transaction when it was confirmed.
    pub lag_seconds: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    /// The last LSN confirmed to PostgreSQL.
    pub confirmed_lsn: Family<SourceLabel, Gauge>,
    /// Sessions restarted after a transient failure.
    pub reconnects: Family<SourceLabel, Counter>,
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
    pub audit_received: Family<SourceLabel, Counter>,
    /// Kubernetes changes whose actor came from the audit log.
    pub audit_attributed: Family<SourceLabel, Counter>,
    /// Kubernetes changes whose audit event did not arrive in time (managedFields used).
    pub audit_unattributed: Family<SourceLabel, Counter>,
    /// Each running source's state and latest unrecovered failure, by name.
    sources: Mutex<BTreeMap<String, (SourceState, Option<String>)>>,
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("changewire_producer");
        let metrics = Self {
            events: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            in_flight: Gauge::default(),
            lag_bytes: Family::default(),
            lag_seconds: Family::default(),
            confirmed_lsn: Family::default(),
            reconnects: Family::default(),
            snapshot_rows: Family::default(),
            snapshot_rows_estimated: Family::default(),
            watched_objects: Family::default(),
            relists: Family::default(),
            watch_restarts: Family::default(),
            audit_received: Family::default(),
            audit_attributed: Family::default(),
            audit_unattributed: Family::default(),
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

    /// `source`'s share of these metrics.
    pub fn source(self: &Arc<Self>, source: &str) -> SourceMetrics {
        SourceMetrics {
            name: source.to_owned(),
            label: SourceLabel {
                source: source.to_owned(),
            },
            shared: self.clone(),
        }
    }

    /// Records what `source` is doing.
    pub fn set_state(&self, source: &str, state: SourceState) {
        let mut sources = self.lock_sources();
        sources.entry(source.to_owned()).or_insert((state, None)).0 = state;
    }

    /// The state of the least healthy source (`Starting` before any reported).
    pub fn state(&self) -> SourceState {
        let sources = self.lock_sources();
        let worst = sources.values().map(|(state, _)| *state).max();
        worst.unwrap_or(SourceState::Starting)
    }

    /// Records the latest failure of `source` (shown by the health endpoint), or
    /// `None` once it recovered.
    pub fn set_error(&self, source: &str, error: Option<String>) {
        self.lock_sources()
            .entry(source.to_owned())
            .or_insert((SourceState::Starting, None))
            .1 = error;
    }

    /// The sources' failures they have not recovered from, each named.
    pub fn last_error(&self) -> Option<String> {
        let errors: Vec<String> = self
            .lock_sources()
            .iter()
            .filter_map(|(source, (_, error))| error.as_ref().map(|e| format!("{source}: {e}")))
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    fn lock_sources(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, (SourceState, Option<String>)>> {
        // A poisoned lock only means a thread panicked mid-assignment of a pair.
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One source's view of the producer's metrics: every label carries its name.
#[derive(Clone)]
pub struct SourceMetrics {
    name: String,
    label: SourceLabel,
    shared: Arc<ProducerMetrics>,
}

impl SourceMetrics {
    /// The metrics every source shares (the publisher's, the registry).
    pub fn shared(&self) -> &Arc<ProducerMetrics> {
        &self.shared
    }

    /// Records what the source is doing.
    pub fn set_state(&self, state: SourceState) {
        self.shared.set_state(&self.name, state);
    }

    /// Records the source's latest failure, or `None` once it recovered.
    pub fn set_error(&self, error: Option<String>) {
        self.shared.set_error(&self.name, error);
    }

    /// The counter of published events of `table` with `op`.
    pub fn table_events(&self, table: String, op: &str) -> Counter {
        let labels = EventLabels::Table {
            source: self.name.clone(),
            table,
            op: op.to_owned(),
        };
        self.shared.events.get_or_create(&labels).clone()
    }

    /// Counts one published event of `kind`.
    pub fn count_kind_event(&self, kind: String, op: &str) {
        let labels = EventLabels::Kind {
            source: self.name.clone(),
            kind,
            op: op.to_owned(),
        };
        self.shared.events.get_or_create(&labels).inc();
    }

    /// The label of one of the source's tables.
    pub fn table(&self, table: String) -> TableLabel {
        TableLabel {
            source: self.name.clone(),
            table,
        }
    }

    /// The label of one of the source's kinds.
    pub fn kind(&self, kind: String) -> KindLabel {
        KindLabel {
            source: self.name.clone(),
            kind,
        }
    }

    /// WAL bytes between the server and the confirmed position.
    pub fn lag_bytes(&self) -> Gauge {
        self.shared.lag_bytes.get_or_create(&self.label).clone()
    }

    /// Age of the latest confirmed transaction when confirmed.
    pub fn lag_seconds(&self) -> Gauge<f64, AtomicU64> {
        self.shared.lag_seconds.get_or_create(&self.label).clone()
    }

    /// The last LSN confirmed.
    pub fn confirmed_lsn(&self) -> Gauge {
        self.shared.confirmed_lsn.get_or_create(&self.label).clone()
    }

    /// Sessions restarted after a transient failure.
    pub fn reconnects(&self) -> Counter {
        self.shared.reconnects.get_or_create(&self.label).clone()
    }

    /// Audit-webhook counters: received, attributed, unattributed.
    pub fn audit(&self) -> [Counter; 3] {
        [
            &self.shared.audit_received,
            &self.shared.audit_attributed,
            &self.shared.audit_unattributed,
        ]
        .map(|family| family.get_or_create(&self.label).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_the_least_healthy_source() {
        let metrics = ProducerMetrics::default();
        assert!(!metrics.health().healthy, "no source is running yet");
        metrics.set_state("orders", SourceState::Streaming);
        assert!(metrics.health().healthy);
        metrics.set_state("cluster", SourceState::Reconnecting);
        metrics.set_error("cluster", Some("watch failed".into()));
        let report = metrics.health();
        assert!(!report.healthy);
        assert_eq!(report.state, "reconnecting");
        assert_eq!(report.last_error.as_deref(), Some("cluster: watch failed"));
        metrics.set_state("orders", SourceState::Streaming);
        assert!(
            !metrics.health().healthy,
            "postgres streaming again does not hide it"
        );
        metrics.set_state("cluster", SourceState::Streaming);
        metrics.set_error("cluster", None);
        assert!(metrics.health().healthy);
        assert_eq!(metrics.last_error(), None);
    }
}
