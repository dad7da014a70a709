//! Per-service metrics (Prometheus) and the state `/health` reports.

use std::sync::atomic::{AtomicU64, Ordering};

use changewire_schemas::http::{encode_registry, HealthReport, Observable, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What became of a record.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// The handler applied it.
    Applied,
    /// Its event id was processed before: skipped.
    Duplicate,
    /// Sent to the DLQ.
    DeadLettered,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Labels of the per-topic record counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicOutcome {
    /// Topic read from.
    pub topic: String,
    /// What became of the record ([`Outcome::as_str`]).
    pub outcome: &'static str,
}

/// Labels of per-partition gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
}

/// What the service is doing, for the health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Opening the store, joining the group.
    Starting = 0,
    /// Finishing effects a crash interrupted.
    Recovering = 1,
    /// Reading and applying events.
    Consuming = 2,
    /// Retrying a failed effect.
    Retrying = 3,
    /// Stopped.
    Stopped = 4,
}

impl ServiceState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Recovering => "recovering",
            Self::Consuming => "consuming",
            Self::Retrying => "retrying",
            Self::Stopped => "stopped",
        }
    }
}

/// Every metric of one consumer service.
pub struct ConsumerMetrics {
    registry: Registry,
    /// Records read, by topic and outcome (rate = events/s).
    pub records: Family<TopicOutcome, Counter>,
    /// Seconds the handler took per event.
    pub handler_seconds: Histogram,
    /// Seconds per batch commit (sled write and flush).
    pub commit_seconds: Histogram,
    /// Records between the broker's high watermark and the service's offset.
    pub lag: Family<TopicPartition, Gauge>,
    /// Partitions this instance owns.
    pub partitions_assigned: Gauge,
    /// Times the broker delivered a partition from a later offset than asked for.
    pub offset_gaps: Counter,
    /// Handler retries after transient failures.
    pub retries: Counter,
    /// Event ids held for deduplication (those of the retention window).
    pub processed_ids: Gauge,
    status: Status<ServiceState>,
    read: AtomicU64,
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("changewire_consumer");
        let metrics = Self {
            registry: Registry::default(),
            records: Family::default(),
            handler_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 12)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_1, 3.0, 12)),
            lag: Family::default(),
            partitions_assigned: Gauge::default(),
            offset_gaps: Counter::default(),
            retries: Counter::default(),
            processed_ids: Gauge::default(),
            status: Status::new(ServiceState::Starting),
            read: AtomicU64::new(0),
        };
        registry.register(
            "records",
            "Records read, by topic and outcome",
            metrics.records.clone(),
        );
        registry.register(
            "handler_seconds",
            "Seconds the handler took per event",
            metrics.handler_seconds.clone(),
        );
        registry.register(
            "commit_seconds",
            "Seconds per batch commit to sled (write and flush)",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "lag",
            "Records between the high watermark and the service's offset",
            metrics.lag.clone(),
        );
        registry.register(
            "partitions_assigned",
            "Partitions this instance owns",
            metrics.partitions_assigned.clone(),
        );
        registry.register(
            "offset_gaps",
            "Times a partition was delivered from a later offset than asked for",
            metrics.offset_gaps.clone(),
        );
        registry.register(
            "retries",
            "Retries after transient failures",
            metrics.retries.clone(),
        );
        registry.register(
            "processed_ids",
            "Event ids held for deduplication (the retention window)",
            metrics.processed_ids.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl ConsumerMetrics {
    /// Records read and settled (any outcome) since start.
    pub fn records_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Counts one record of `topic` with `outcome`.
    pub fn count(&self, topic: &str, outcome: Outcome) {
        self.read.fetch_add(1, Ordering::Relaxed);
        self.records
            .get_or_create(&TopicOutcome {
                topic: topic.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Records what the service is doing.
    pub fn set_state(&self, state: ServiceState) {
        self.status.set(state);
    }

    /// What the service is doing.
    pub fn state(&self) -> ServiceState {
        self.status.get()
    }

    /// Records the latest failure (shown by the health endpoint), or recovery.
    pub fn set_error(&self, error: Option<String>) {
        self.status.set_error(error);
    }
}

impl Observable for ConsumerMetrics {
    fn encode_metrics(&self) -> String {
        encode_registry(&self.registry)
    }

    /// Healthy while consuming.
    fn health(&self) -> HealthReport {
        let state = self.state();
        HealthReport {
            healthy: state == ServiceState::Consuming,
            state: state.as_str(),
            last_error: self.status.last_error(),
        }
    }
}
