//! What the consumer benchmarks share: the runtime's plain apply loop (a handler
//! that applies nothing) and timing a handler over a topic until it read every
//! event.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use changewire_consumer::runtime::{
    self, ConsumerMetrics, Context, Handler, HandlerError, Record, RuntimeConfig, Sinks,
};
use changewire_schemas::{ChangeEvent, Row};
use tokio::sync::watch;

/// The runtime's plain apply loop: a handler that applies nothing (reading,
/// decoding rows as `R`, dedup ids, offsets and the batch's atomic write
/// remain). A baseline decodes rows as the measured service does.
pub struct Nothing<R>(PhantomData<fn() -> R>);

impl<R> Nothing<R> {
    /// The plain loop decoding rows as `R` (`serde_json::Value` or `Box<RawValue>`).
    pub fn decoding_rows_as() -> Self {
        Self(PhantomData)
    }
}

impl<R: Row + Send + Sync + 'static> Handler for Nothing<R> {
    type Row = R;

    async fn handle(
        &self,
        _: &ChangeEvent<R>,
        _: &Record,
        _: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Runs `handler` with `sinks` until it read `events` records and `done` holds
/// for its metrics, then stops it: the time from start to stop, and the records
/// it applied.
pub async fn time_handler<H: Handler>(
    config: RuntimeConfig,
    handler: H,
    sinks: Sinks,
    events: u64,
    done: impl Fn(&ConsumerMetrics) -> bool,
) -> anyhow::Result<(Duration, u64)> {
    let metrics = Arc::new(ConsumerMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let observed = metrics.clone();
    let started = Instant::now();
    let service = tokio::spawn(async move {
        runtime::run_observed(&config, handler, sinks, shutdown, observed).await
    });
    while metrics.records_read() < events || !done(&metrics) {
        anyhow::ensure!(
            !service.is_finished(),
            "the service stopped early: {:?}",
            service.await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    let stats = service.await??;
    Ok((elapsed, stats.applied))
}

/// The runtime's sections for a benchmark service `name` reading `topic`: its
/// own consumer group, batches of up to 5,000, a rewind of 10,000, state in
/// `state`. Callers adjust `service` (assignment, ticks) as they need.
pub fn runtime_config(
    stack: &crate::Stack,
    prefix: &str,
    name: &str,
    topic: &str,
    state: &std::path::Path,
) -> RuntimeConfig {
    RuntimeConfig {
        kafka: stack.kafka_config(),
        topics: changewire_schemas::topic::TopicsConfig {
            prefix: prefix.to_owned(),
            ..Default::default()
        },
        http: None,
        service: changewire_consumer::runtime::ServiceConfig {
            group_id: Some(crate::unique_name(&format!("bench{name}"))),
            max_batch: 5_000,
            resume_rewind: 10_000,
            ..changewire_consumer::runtime::ServiceConfig::new(
                name,
                vec![topic.to_owned()],
                state.to_owned(),
            )
        },
    }
}

/// `config` owning its partitions (static assignment) with a tick a second, as
/// the audit, SIEM and alert services run.
pub fn owning_partitions(mut config: RuntimeConfig) -> RuntimeConfig {
    config.service.assignment = changewire_consumer::runtime::AssignmentMode::Static;
    config.service.tick_interval_ms = Some(1_000);
    config
}

/// A new 3-partition topic `<prefix>.<suffix>` (the prefix unique, from `name`)
/// holding `events` events made by `event`: the prefix, the topic, and the bytes
/// published.
pub async fn published_topic(
    stack: &crate::Stack,
    name: &str,
    suffix: &str,
    events: u64,
    event: impl Fn(u64) -> ChangeEvent,
) -> anyhow::Result<(String, String, u64)> {
    let prefix = crate::unique_name(name);
    let topic = format!("{prefix}.{suffix}");
    crate::create_topics(stack, &[&topic], 3).await?;
    let bytes = crate::publish_events(stack, &topic, events, event).await?;
    Ok((prefix, topic, bytes))
}
