//! Dedup benchmark:
//! `cargo run --release -p changewire-tests --bin bench-dedup -- [EVENTS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 1. publishes EVENTS events (default 1,000,000) of which every tenth repeats an
//!    earlier id, to a 3-partition topic;
//! 2. times the dedup service (in-process, its own sled store) from subscribing to
//!    the last batch published and acknowledged;
//! 3. times a plain rdkafka loop over the same topic: consume, produce, wait for
//!    every acknowledgement (the ceiling: no state, no dedup, no fsync);
//! 4. prints throughput, CPU time (this process, both cores), the ratio, sled's
//!    disk writes per input byte (write amplification), its size on disk, and the
//!    process's peak memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use changewire_consumer::config::{ConsumerConfig, ServiceConfig};
use changewire_consumer::runtime::{self, ConsumerMetrics, ServiceState, SinkLabel, Store};
use changewire_consumer::services::dedup::{self, Dedup, DedupConfig};
use changewire_schemas::fixtures::compact_event;
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::ChangeEvent;
use changewire_tests::{
    bench_events, cpu_time, create_topics, enqueue, peak_rss_kib, publish_events, unique_name,
    Stack,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::watch;

const PARTITIONS: i32 = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(1_000_000)?;
    let stack = Stack::from_env();
    let prefix = unique_name("benchdd");
    let raw = format!("{prefix}.src.public.orders");
    create_topics(&stack, &[&raw], PARTITIONS).await?;
    let started = Instant::now();
    let input_bytes = publish_events(&stack, &raw, events, event).await?;
    println!(
        "published {events} events ({:.0} MB, 10% duplicates) in {:.1} s",
        input_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let state = tempfile::tempdir()?;
    let written_before = process_disk_writes();
    let cpu_before = cpu_time("self");
    let dedup_time = time_dedup(&stack, &prefix, &raw, state.path(), events).await?;
    let dedup_cpu = cpu_time("self") - cpu_before;
    let disk_writes = process_disk_writes().saturating_sub(written_before);
    let store_size = Store::open(state.path())?.size_on_disk()?;
    let dedup_rss = peak_rss_kib("self");
    let (restart, ids) = time_restart(&stack, &prefix, &raw, state.path()).await?;
    let cpu_before = cpu_time("self");
    let plain_time = time_plain_loop(&stack, &raw, &format!("{prefix}.plain"), events).await?;
    let plain_cpu = cpu_time("self") - cpu_before;

    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "dedup service:     {:>8.1} s  {:>9.0} events/s  {:>5.1} CPU s",
        dedup_time.as_secs_f64(),
        rate(dedup_time),
        dedup_cpu.as_secs_f64()
    );
    println!(
        "plain rdkafka loop:{:>8.1} s  {:>9.0} events/s  {:>5.1} CPU s",
        plain_time.as_secs_f64(),
        rate(plain_time),
        plain_cpu.as_secs_f64()
    );
    println!(
        "ratio dedup / plain: {:.2}",
        rate(dedup_time) / rate(plain_time)
    );
    println!(
        "sled: {:.0} MB written to disk for {:.0} MB of input (write amplification {:.2}), {:.0} MB on disk",
        disk_writes as f64 / 1e6,
        input_bytes as f64 / 1e6,
        disk_writes as f64 / input_bytes as f64,
        store_size as f64 / 1e6
    );
    println!("peak RSS after the dedup run: {} MiB", dedup_rss / 1024);
    println!(
        "restart until consuming, {ids} processed ids loaded: {} ms",
        restart.as_millis()
    );
    Ok(())
}

/// A compact create event; every tenth repeats the id of an earlier one.
fn event(i: u64) -> ChangeEvent {
    compact_event(if i % 10 == 9 { i / 10 } else { i - i / 10 })
}

fn producer(stack: &Stack) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()?)
}

/// Runs the dedup service until it has read `events` records and its sink has
/// written every distinct one.
async fn time_dedup(
    stack: &Stack,
    prefix: &str,
    raw: &str,
    state: &std::path::Path,
    events: u64,
) -> anyhow::Result<Duration> {
    let config = dedup_config(stack, prefix, raw, state);
    let started = Instant::now();
    let (service, metrics, stop) = start_dedup(config)?;
    let distinct = events - events / 10;
    let output = SinkLabel {
        sink: dedup::OUTPUT.into(),
    };
    while metrics.records_read() < events
        || (metrics.effects_delivered.get_or_create(&output).get()) < distinct
    {
        ensure!(!service.is_finished(), "the dedup service stopped early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true)?;
    let stats = service.await??;
    let elapsed = started.elapsed();
    let text = changewire_schemas::http::Observable::encode_metrics(metrics.as_ref());
    for line in text
        .lines()
        .filter(|l| l.contains("_sum") || l.contains("_count"))
    {
        println!("  {line}");
    }
    println!(
        "dedup: {} published, {} duplicates dropped",
        stats.applied, stats.duplicates
    );
    ensure!(
        stats.applied + stats.duplicates == events,
        "read {} of {events}",
        stats.applied + stats.duplicates
    );
    Ok(elapsed)
}

/// Starts the dedup service again on the state it left and times it until it
/// consumes (opening sled, loading the processed ids, joining the group).
async fn time_restart(
    stack: &Stack,
    prefix: &str,
    raw: &str,
    state: &std::path::Path,
) -> anyhow::Result<(Duration, i64)> {
    let config = dedup_config(stack, prefix, raw, state);
    let started = Instant::now();
    let (service, metrics, stop) = start_dedup(config)?;
    while metrics.state() != ServiceState::Consuming {
        ensure!(!service.is_finished(), "the dedup service stopped early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    service.await??;
    Ok((elapsed, metrics.processed_ids.get()))
}

/// The dedup service running in this process, its metrics and its stop switch.
type RunningDedup = (
    tokio::task::JoinHandle<Result<runtime::RunStats, runtime::RuntimeError>>,
    Arc<ConsumerMetrics>,
    watch::Sender<bool>,
);

fn start_dedup(config: ConsumerConfig) -> anyhow::Result<RunningDedup> {
    let metrics = Arc::new(ConsumerMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let config = config.runtime();
    let (handler, sinks) = Dedup::new(&config, &DedupConfig::default())?;
    let observed = metrics.clone();
    let service = tokio::spawn(async move {
        runtime::run_observed(&config, handler, sinks, shutdown, observed).await
    });
    Ok((service, metrics, stop))
}

fn dedup_config(stack: &Stack, prefix: &str, raw: &str, state: &std::path::Path) -> ConsumerConfig {
    ConsumerConfig {
        kafka: stack.kafka_config(),
        topics: TopicsConfig {
            prefix: prefix.to_owned(),
            ..TopicsConfig::default()
        },
        http: None,
        service: ServiceConfig {
            group_id: Some(unique_name("benchdd")),
            max_batch: 5_000,
            resume_rewind: 10_000,
            ..ServiceConfig::new("dedup", vec![raw.to_owned()], state.to_owned())
        },
        dedup: Some(DedupConfig::default()),
        forward: None,
        audit: None,
        siem: None,
        alert: None,
        gateway: None,
    }
}

/// Consumes `events` records of `raw` and produces each to `output`, then waits
/// for every acknowledgement.
async fn time_plain_loop(
    stack: &Stack,
    raw: &str,
    output: &str,
    events: u64,
) -> anyhow::Result<Duration> {
    create_topics(stack, &[output], PARTITIONS).await?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", unique_name("benchplain"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // As the runtime's consumer: no second-long pause once the queue filled.
        .set("fetch.queue.backoff.ms", "20")
        .create()?;
    let producer = producer(stack)?;
    let started = Instant::now();
    consumer.subscribe(&[raw])?;
    let mut acks = Vec::with_capacity(events as usize);
    while (acks.len() as u64) < events {
        let message = consumer.recv().await?;
        let record = FutureRecord::to(output)
            .partition(message.partition())
            .key(message.key().unwrap_or_default())
            .payload(message.payload().unwrap_or_default());
        acks.push(enqueue(&producer, record).await);
    }
    for ack in futures::future::join_all(acks).await {
        ack?.map_err(|(error, _)| error)?;
    }
    Ok(started.elapsed())
}

/// Bytes this process caused to be written to storage (`/proc/self/io`).
fn process_disk_writes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
