//! Per-service metrics (Prometheus) and the state `/health` reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// Not an event; the handler kept it (a quarantine).
    Quarantined,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
            Self::Quarantined => "quarantined",
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

/// Labels of a service's own counts: what happened, and to what.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerEvent {
    /// What happened (`fired`, `silenced`, ...).
    pub event: String,
    /// To what (a rule's name, say).
    pub detail: String,
}

/// Labels of per-sink metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// The sink's name.
    pub sink: String,
}

/// Labels of failed deliveries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkFailure {
    /// The sink's name.
    pub sink: String,
    /// transient, permanent, unavailable or fatal.
    pub class: &'static str,
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
    /// Retrying an event whose handler failed transiently.
    Retrying = 3,
    /// Stopped.
    Stopped = 4,
    /// A dependency of the handler is unavailable: its partitions wait.
    Unavailable = 5,
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
            Self::Unavailable => "unavailable",
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
    /// Seconds per batch seal (the handler's write per batch, before the commit).
    pub seal_seconds: Histogram,
    /// Records between the broker's high watermark and the service's offset.
    pub lag: Family<TopicPartition, Gauge>,
    /// Partitions this instance owns.
    pub partitions_assigned: Gauge,
    /// Holes in a partition's offsets accepted as the topic's own (compaction,
    /// transaction markers, records gone).
    pub offset_gaps: Counter,
    /// Seeks back because a read started past the next offset expected.
    pub rewinds: Counter,
    /// Handler retries after transient failures.
    pub retries: Counter,
    /// Event ids held for deduplication (those of the retention window).
    pub processed_ids: Gauge,
    /// Effects waiting in the outbox, per sink.
    pub effects_waiting: Family<SinkLabel, Gauge>,
    /// Seconds the oldest waiting effect has waited, per sink.
    pub oldest_waiting_seconds: Family<SinkLabel, Gauge>,
    /// Effects delivered, per sink.
    pub effects_delivered: Family<SinkLabel, Counter>,
    /// Failed attempts at effects, per sink and error class.
    pub effects_failed: Family<SinkFailure, Counter>,
    /// Effects a sink rejected, moved to the DLQ.
    pub dead_lettered_effects: Counter,
    /// Whether fetching is paused because the outbox is above its high mark.
    pub outbox_full: Gauge,
    /// Subscribed partitions no member of the group owns.
    pub unowned_partitions: Gauge,
    /// What the service itself counts (the alert service: alerts fired,
    /// silenced, held back, and events a rule could not evaluate, per rule).
    pub handler_events: Family<HandlerEvent, Counter>,
    status: Status<ServiceState>,
    /// When the worker loop last went round (milliseconds since start of the
    /// process's clock); 0 before it started.
    heartbeat: AtomicU64,
    /// Sinks waiting for their receiver, and why; and unowned partitions.
    problems: Mutex<BTreeMap<String, String>>,
    /// When each sink's oldest waiting effect joined its queue.
    oldest: Mutex<BTreeMap<String, (u64, std::time::Instant)>>,
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
            seal_seconds: Histogram::new(exponential_buckets(0.000_1, 3.0, 12)),
            lag: Family::default(),
            partitions_assigned: Gauge::default(),
            offset_gaps: Counter::default(),
            rewinds: Counter::default(),
            retries: Counter::default(),
            processed_ids: Gauge::default(),
            effects_waiting: Family::default(),
            oldest_waiting_seconds: Family::default(),
            effects_delivered: Family::default(),
            effects_failed: Family::default(),
            dead_lettered_effects: Counter::default(),
            outbox_full: Gauge::default(),
            unowned_partitions: Gauge::default(),
            handler_events: Family::default(),
            status: Status::new(ServiceState::Starting),
            heartbeat: AtomicU64::new(0),
            problems: Mutex::default(),
            oldest: Mutex::default(),
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
            "seal_seconds",
            "Seconds per batch seal (the service's write per batch, before the commit)",
            metrics.seal_seconds.clone(),
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
            "Holes in a partition's offsets accepted as the topic's own (compaction, markers, records gone)",
            metrics.offset_gaps.clone(),
        );
        registry.register(
            "rewinds",
            "Seeks back because a read started past the next offset expected",
            metrics.rewinds.clone(),
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
        registry.register(
            "effects_waiting",
            "Effects waiting in the outbox, per sink",
            metrics.effects_waiting.clone(),
        );
        registry.register(
            "oldest_waiting_seconds",
            "Seconds the oldest waiting effect has waited, per sink",
            metrics.oldest_waiting_seconds.clone(),
        );
        registry.register(
            "effects_delivered",
            "Effects delivered, per sink",
            metrics.effects_delivered.clone(),
        );
        registry.register(
            "effects_failed",
            "Failed attempts at effects, per sink and class",
            metrics.effects_failed.clone(),
        );
        registry.register(
            "dead_lettered_effects",
            "Effects a sink rejected, moved to the DLQ",
            metrics.dead_lettered_effects.clone(),
        );
        registry.register(
            "outbox_full",
            "1 while fetching is paused because the outbox is above its high mark",
            metrics.outbox_full.clone(),
        );
        registry.register(
            "unowned_partitions",
            "Subscribed partitions no member of the group owns",
            metrics.unowned_partitions.clone(),
        );
        registry.register(
            "handler_events",
            "What the service itself counts, by event and detail",
            metrics.handler_events.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }
}

impl ConsumerMetrics {
    /// Counts one `event` of the handler's own, with its `detail` (a rule, a
    /// gateway's result) in `handler_events`.
    pub fn count_handler_event(&self, event: &str, detail: &str) {
        let labels = HandlerEvent {
            event: event.to_owned(),
            detail: detail.to_owned(),
        };
        self.handler_events.get_or_create(&labels).inc();
    }

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

    fn set_problem(&self, what: String, problem: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(problem) => problems.insert(what, problem),
            None => problems.remove(&what),
        };
    }

    /// Records that `sink` waits for its receiver (`/health` turns 503), or not.
    pub fn set_sink_error(&self, sink: &str, error: Option<String>) {
        self.set_problem(format!("sink {sink}"), error);
    }

    /// The worker loop went round now (for `/livez`).
    pub fn beat(&self) {
        self.heartbeat.store(clock_ms(), Ordering::Relaxed);
    }

    /// Whether no sink waits for its receiver.
    pub fn sinks_healthy(&self) -> bool {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        !problems.keys().any(|what| what.starts_with("sink "))
    }

    /// Records partitions without an owner (`/health` turns 503), or none.
    pub fn set_unowned(&self, problem: Option<String>) {
        self.set_problem("group".into(), problem);
    }

    /// Counts failed attempts of `sink`.
    pub fn sink_failed(&self, sink: &str, class: &'static str) {
        self.effects_failed
            .get_or_create(&SinkFailure {
                sink: sink.to_owned(),
                class,
            })
            .inc();
    }

    /// Counts `count` effects `sink` delivered.
    pub fn sink_delivered(&self, sink: &str, count: usize) {
        self.effects_delivered
            .get_or_create(&SinkLabel {
                sink: sink.to_owned(),
            })
            .inc_by(count as u64);
    }

    /// Updates `sink`'s queue gauges: effects waiting, and the age of the oldest
    /// (timed from when this instance first saw it at the head).
    pub(super) fn observe_sink(&self, sink: &str, outbox: &super::outbox::Outbox) {
        let (waiting, head) = match outbox.queue(sink) {
            Some(queue) => (queue.waiting.len(), queue.waiting.keys().next().copied()),
            None => return,
        };
        let label = SinkLabel {
            sink: sink.to_owned(),
        };
        self.effects_waiting
            .get_or_create(&label)
            .set(waiting as i64);
        let mut oldest = self.oldest.lock().unwrap_or_else(|e| e.into_inner());
        let age = match head {
            Some(head) => {
                let entry = oldest
                    .entry(sink.to_owned())
                    .or_insert((head, std::time::Instant::now()));
                if entry.0 != head {
                    *entry = (head, std::time::Instant::now());
                }
                entry.1.elapsed().as_secs() as i64
            }
            None => 0,
        };
        self.oldest_waiting_seconds.get_or_create(&label).set(age);
    }
}

/// How long the worker loop may go without a round before `/livez` fails; it
/// goes round at least every 500 ms.
const STUCK_AFTER_MS: u64 = 30_000;

/// Milliseconds on a clock that only moves forward (since its first use).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Observable for ConsumerMetrics {
    /// Alive while starting (recovery is bounded and logged) and while the
    /// worker loop goes round; not once it stopped going round.
    fn alive(&self) -> bool {
        let beat = self.heartbeat.load(Ordering::Relaxed);
        beat == 0 || clock_ms().saturating_sub(beat) < STUCK_AFTER_MS
    }

    fn encode_metrics(&self) -> String {
        encode_registry(&self.registry)
    }

    /// Healthy while consuming with every sink delivering and every partition
    /// owned; otherwise the error says what waits.
    fn health(&self) -> HealthReport {
        let state = self.state();
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        let mut errors: Vec<String> = problems
            .iter()
            .map(|(what, why)| format!("{what}: {why}"))
            .collect();
        errors.extend(self.status.last_error());
        HealthReport {
            healthy: state == ServiceState::Consuming && problems.is_empty(),
            state: state.as_str(),
            last_error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}
