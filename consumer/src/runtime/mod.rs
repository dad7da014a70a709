//! The consumer runtime: every service runs on it.
//!
//! A service is a [`Handler`] and the [`Sinks`] it emits effects to. Records are
//! read in batches (whatever the client has fetched, up to `service.max_batch`).
//! For each record the handler changes its state and *emits* effects
//! ([`Context::emit`]); it never acts on the outside world itself. A batch's
//! state changes, emitted effects (the outbox), event ids and partition offsets
//! are written to sled in one atomic, flushed write, on a blocking thread while
//! the next batch is applied; the handler's per-batch [`Seal`] runs first on
//! that thread and its changes join the write. Once the write is durable the effects join their
//! sinks' queues; each sink delivers in a task of its own, in commit order per
//! key, with backoff by time (see [`sink`]). A batch's offsets are mirrored to
//! Kafka only once every effect of it and of the batches before it was
//! delivered.
//!
//! Guarantees:
//! - within an instance every event id takes effect once: its state changes,
//!   effects and offset become durable together, and each effect is delivered
//!   at least once under a stable idempotency key (`<event id>/<sink>/<n>`),
//!   which the Kafka sink checks against its output after a crash and webhook
//!   receivers drop when repeated;
//! - nothing is dead-lettered because a dependency is down
//!   ([`HandlerError::Unavailable`], [`SinkError::Unavailable`]): the work waits,
//!   polling goes on, `/health` says what waits;
//! - across a hand-over of a partition in `group` mode delivery is
//!   at-least-once: the new owner starts at the offset mirrored to Kafka, which
//!   may trail what the old owner applied. An instance that gets a partition
//!   back never replays what another instance applied meanwhile (see
//!   [`assign`]).
//!
//! Undecodable records and permanent handler failures are dead-lettered to
//! `<prefix>.dlq.<service>` through the outbox too (see [`dlq`]); transient
//! handler failures are retried with backoff (only the record's partition
//! waits, paused, its later records held in order), then dead-lettered.
//! Tombstones (records without a value) are skipped.

mod assign;
mod batch;
pub mod config;
mod digest;
pub mod dlq;
mod gaps;
mod handler;
mod ids;
mod kafka;
mod metrics;
mod outbox;
mod parking;
mod pipeline;
mod shutdown;
pub mod sink;
pub mod sinks;
mod store;
#[cfg(test)]
mod testing;
mod types;
mod worker;
mod write;

use std::sync::Arc;

use changewire_schemas::diagnostics::report;
use changewire_schemas::Codec;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use config::{Assignment as AssignmentMode, RuntimeConfig, ServiceConfig};
pub use handler::{Context, Handler, HandlerError, Record, Seal};
use ids::ProcessedIds;
pub use kafka::{client_config, ensure_topic};
pub use metrics::{ConsumerMetrics, HandlerEvent, Outcome, ServiceState, SinkLabel};
use outbox::Outbox;
pub use outbox::{Effect, Pending};
pub use shutdown::stop_on_signals;
use sink::{run_sink, SinkShared};
pub use sink::{Delivery, Sink, SinkError};
use sinks::kafka::{KafkaSink, Oversized};
pub use store::{StateChanges, Store, StoreError};
pub use types::Header;
use worker::Worker;

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state store failed.
    #[error("state store failed")]
    Store(#[from] StoreError),
    /// The Kafka client failed.
    #[error("Kafka client failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The Kafka publisher could not be created.
    #[error("Kafka publisher failed")]
    Publish(#[from] changewire_kafka::PublishError),
    /// The codec could not be built.
    #[error("codec failed")]
    Codec(#[from] changewire_schemas::CodecError),
    /// The configuration cannot be used.
    #[error("invalid configuration")]
    Config(#[from] changewire_schemas::settings::ConfigError),
    /// The HTTP endpoint could not listen.
    #[error("cannot serve HTTP on {address}")]
    Http {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handler or a sink failed fatally.
    #[error("stopped: {0}")]
    Fatal(String),
}

/// Counters of one run (the same figures are in [`ConsumerMetrics`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Events applied by the handler.
    pub applied: u64,
    /// Events skipped as already processed.
    pub duplicates: u64,
    /// Records sent to the DLQ.
    pub dead_lettered: u64,
}

type SinkStarter = Box<dyn FnOnce(Arc<SinkShared>) -> JoinHandle<Result<(), String>> + Send>;

/// The sinks a service emits effects to, by name.
#[derive(Default)]
pub struct Sinks {
    starters: Vec<(String, SinkStarter)>,
}

impl Sinks {
    /// No sinks (a service that only keeps state).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `sink` under `name` (what [`Context::emit`] names).
    pub fn with<S: Sink>(mut self, name: &str, sink: S) -> Self {
        let owned = name.to_owned();
        self.starters.push((
            name.to_owned(),
            Box::new(move |shared| tokio::spawn(run_sink(owned, sink, shared))),
        ));
        self
    }

    /// Every name, the DLQ's sink last; `Err` for a duplicate or reserved name.
    fn names(&self) -> Result<Vec<String>, changewire_schemas::settings::ConfigError> {
        let mut names: Vec<String> = Vec::new();
        for (name, _) in &self.starters {
            if name == dlq::SINK || names.contains(name) {
                return Err(changewire_schemas::settings::ConfigError::invalid(
                    "sinks",
                    format!("the sink name {name:?} is taken"),
                ));
            }
            names.push(name.clone());
        }
        names.push(dlq::SINK.to_owned());
        Ok(names)
    }
}

/// Runs `handler` with `sinks` as the service `config` describes until
/// `shutdown` turns true, serving `/metrics` and `/health` when `[http]` is
/// configured.
pub async fn run<H: Handler>(
    config: &RuntimeConfig,
    handler: H,
    sinks: Sinks,
    shutdown: watch::Receiver<bool>,
) -> Result<RunStats, RuntimeError> {
    let store = open_store(config)?;
    run_on(config, store, handler, sinks, shutdown).await
}

/// Opens (creating when needed) the service's store in `service.state_dir`; a
/// service that also reads its state elsewhere (an API) opens it first and hands
/// it to [`run_on`].
pub fn open_store(config: &RuntimeConfig) -> Result<Store, RuntimeError> {
    std::fs::create_dir_all(&config.service.state_dir)
        .map_err(|e| StoreError::from(sled::Error::Io(e)))?;
    Ok(Store::open(&config.service.state_dir)?)
}

/// [`run`] on a store the caller opened.
pub async fn run_on<H: Handler>(
    config: &RuntimeConfig,
    store: Store,
    handler: H,
    sinks: Sinks,
    shutdown: watch::Receiver<bool>,
) -> Result<RunStats, RuntimeError> {
    let metrics = handler.metrics();
    let server = match &config.http {
        Some(http) => {
            let listener = tokio::net::TcpListener::bind(http.listen)
                .await
                .map_err(|source| RuntimeError::Http {
                    address: http.listen,
                    source,
                })?;
            tracing::info!(listen = %http.listen, "serving /metrics and /health");
            let router = changewire_schemas::http::router(metrics.clone(), http.token.clone());
            Some(tokio::spawn(changewire_schemas::http::serve(
                listener, router,
            )))
        }
        None => None,
    };
    let result = run_observed_on(config, store, handler, sinks, shutdown, metrics).await;
    if let Some(server) = server {
        server.abort();
    }
    result
}

/// [`run`] with metrics the caller holds (and serves, if it wants).
pub async fn run_observed<H: Handler>(
    config: &RuntimeConfig,
    handler: H,
    sinks: Sinks,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<ConsumerMetrics>,
) -> Result<RunStats, RuntimeError> {
    let store = open_store(config)?;
    run_observed_on(config, store, handler, sinks, shutdown, metrics).await
}

async fn run_observed_on<H: Handler>(
    config: &RuntimeConfig,
    store: Store,
    handler: H,
    sinks: Sinks,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<ConsumerMetrics>,
) -> Result<RunStats, RuntimeError> {
    config.validate()?;
    let sink_names = sinks.names()?;
    let processed =
        ProcessedIds::load(&store, config.retention(), config.service.max_processed_ids)?;
    metrics.processed_ids.set(processed.len() as i64);
    metrics.set_state(ServiceState::Recovering);
    let outbox = Arc::new(load_outbox(&store, &sink_names)?);
    let dlq_topic = config.dlq_topic()?;
    ensure_topic(config, &dlq_topic, 1).await?;
    let dlq = || dlq::DeadLetters::new(dlq_topic.clone(), config.service.name.clone());
    let shared = Arc::new(SinkShared {
        outbox: outbox.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        dlq: dlq(),
        give_up_after: std::time::Duration::from_secs(config.service.give_up_after_s),
    });
    let sinks = sinks.with(
        dlq::SINK,
        KafkaSink::new(dlq::SINK, config, Oversized::OmitPayload)?,
    );
    let (fatal_tx, mut fatal) = mpsc::unbounded_channel();
    let tasks: Vec<JoinHandle<Result<(), String>>> = sinks
        .starters
        .into_iter()
        .map(|(_, start)| start(shared.clone()))
        .collect();
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    // Reports the first sink that stops; resolves once every sink task is gone.
    let watcher = tokio::spawn(async move {
        let mut running = tasks;
        while !running.is_empty() {
            let (ended, _, rest) = futures::future::select_all(running).await;
            running = rest;
            let reason = match ended {
                Err(error) if error.is_cancelled() => continue,
                Ok(Ok(())) => "a sink stopped".to_owned(),
                Ok(Err(reason)) => reason,
                Err(panicked) => format!("a sink task panicked: {panicked}"),
            };
            let _ = fatal_tx.send(reason);
        }
    });
    let mut worker = Worker {
        config,
        handler,
        instance: store.instance_id()?,
        store,
        dlq: dlq(),
        codec: Codec::json()?,
        metrics,
        assignment: Arc::default(),
        outbox,
        sink_names: sink_names.into(),
        stats: RunStats::default(),
        processed,
        parking: Default::default(),
        writing: None,
        outbox_full: false,
        gaps: Default::default(),
    };
    let result = worker.consume(&mut shutdown, &mut fatal).await;
    // The sinks hold the store: they are gone before this returns.
    for abort in aborts {
        abort.abort();
    }
    let _ = watcher.await;
    worker.metrics.set_state(ServiceState::Stopped);
    match &result {
        Ok(()) => tracing::info!(stats = ?worker.stats, "consumer runtime stopped"),
        Err(error) => {
            tracing::error!(error = %report(error), stats = ?worker.stats, "consumer runtime failed")
        }
    }
    result.map(|()| worker.stats)
}

/// The outbox as the last run left it: every entry in doubt. A corrupted entry
/// or one for a sink this service does not run stops the start with a message
/// saying which (dropping them would lose effects).
fn load_outbox(store: &Store, sinks: &[String]) -> Result<Outbox, RuntimeError> {
    let entries = store.outbox()?.map_err(|corrupt| {
        RuntimeError::Fatal(format!(
            "{} outbox entries cannot be decoded (sequences {:?}...): the store is corrupted",
            corrupt.len(),
            &corrupt[..corrupt.len().min(5)]
        ))
    })?;
    let outbox = Outbox::new(sinks, entries.last().map(|p| p.sequence));
    let count = entries.len();
    outbox
        .push(entries.into_iter().map(Arc::new).collect(), true)
        .map_err(|sink| {
            RuntimeError::Fatal(format!(
                "the outbox holds effects for sink {sink:?}, which this service does not run (it runs {sinks:?}); \
                 run the service with that sink until they are delivered"
            ))
        })?;
    if count > 0 {
        tracing::info!(
            effects = count,
            "effects of the last run wait in the outbox; their sinks check which landed"
        );
    }
    Ok(outbox)
}
