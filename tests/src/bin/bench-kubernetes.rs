//! Kubernetes source benchmark:
//! `cargo run --release -p changewire-tests --bin bench-kubernetes -- [OBJECTS] [RATE] [SECONDS]`
//!
//! Against the fake API server (in this process) and the local stack's broker:
//! 1. baseline: a paginated kube-rs list of OBJECTS ConfigMaps (default 10,000), the
//!    API-side limit of any initial sync;
//! 2. changewire's initial sync of the same objects, until every event is readable in
//!    Kafka: objects/s and the ratio to the baseline;
//! 3. RATE changes/s (default 1,000) for SECONDS (default 10): latency from the API
//!    server's write to the event read from Kafka, p50 and p99 after the first
//!    second, and the first second's apart (right after the sync the broker and
//!    the reader are still busy with it: those changes took 100-300 ms);
//! 4. the producer's memory per watched object (RSS growth over the sync / objects).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use changewire_kafka::Publisher;
use changewire_producer::kubernetes::{KubernetesConfig, KubernetesSource, SledObjects};
use changewire_schemas::storage::open_sled;
use changewire_schemas::{ChangeEvent, Codec, Origin, TopicNames};
use changewire_tests::kube_api::{FakeApiServer, ResourceType};
use changewire_tests::{unique_name, Stack, TestConsumer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use serde_json::json;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arg = |n: usize, default: u64| {
        std::env::args()
            .nth(n)
            .map_or(Ok(default), |a| a.parse::<u64>())
    };
    let (objects, rate, seconds) = (arg(1, 10_000)?, arg(2, 1_000)?, arg(3, 10)?);
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let kind = fake
        .store()
        .resource_type("", "v1", "configmaps")
        .map_err(|e| anyhow::anyhow!(e.message))?;
    for i in 0..objects {
        let map = json!({"metadata": {"name": format!("m{i}"), "labels": {"app": "bench"}}, "data": {"route": format!("/api/v{i}"), "upstream": "svc:8080"}});
        fake.store()
            .create(&kind, "default", map, "bench")
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }

    let started = Instant::now();
    let api: Api<ConfigMap> = Api::all(fake.client()?);
    let (mut listed, mut token) = (0, None::<String>);
    loop {
        let mut params = ListParams::default().limit(500);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = api.list(&params).await?;
        listed += page.items.len();
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    let list_secs = started.elapsed().as_secs_f64();
    ensure!(listed as u64 == objects, "listed {listed} of {objects}");

    let prefix = unique_name("bench_k8s");
    let state = tempfile::tempdir()?;
    let config: KubernetesConfig = toml::from_str(&format!(
        "name = \"bench\"\napi_url = \"{}\"\n[[kinds]]\nversion = \"v1\"\nkind = \"ConfigMap\"\nplural = \"configmaps\"\n",
        fake.url()
    ))?;
    let rss_before = rss_kib();
    let source = KubernetesSource::new(
        config,
        TopicNames::new(&prefix)?,
        Arc::new(Codec::json()?),
        Publisher::for_source(&stack.kafka_config())?,
        Arc::new(SledObjects::open(&open_sled(state.path())?, "bench")?),
    );
    let (stop, shutdown) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(source.run(shutdown));
    let topic = format!("{prefix}.bench.core.ConfigMap");
    let consumer = TestConsumer::once_created(&stack, &topic, Duration::from_secs(60)).await?;
    let synced = read_events(&consumer, objects as usize, Duration::from_secs(600)).await?;
    let sync_secs = started.elapsed().as_secs_f64();
    ensure!(
        synced.len() as u64 == objects,
        "synced {} of {objects}",
        synced.len()
    );
    let rss_after = rss_kib();

    let latencies = steady_changes(&fake, &kind, &consumer, objects, rate, seconds).await?;
    let _ = stop.send(true);
    task.await??;

    let (mut warm_up, mut steady) = (Vec::new(), Vec::new());
    for &(written, ms) in &latencies {
        let part = if written < rate {
            &mut warm_up
        } else {
            &mut steady
        };
        part.push(ms);
    }
    warm_up.sort_by(f64::total_cmp);
    steady.sort_by(f64::total_cmp);
    let percentile = |part: &[f64], p: f64| {
        part.get(((part.len().max(1) - 1) as f64 * p) as usize)
            .copied()
    };
    println!("objects                      {objects}");
    println!(
        "baseline kube-rs list        {:>10.0} objects/s ({list_secs:.2} s)",
        objects as f64 / list_secs
    );
    println!(
        "changewire initial sync      {:>10.0} objects/s ({sync_secs:.2} s, to readable in Kafka)",
        objects as f64 / sync_secs
    );
    println!(
        "ratio sync / list            {:>10.3}",
        list_secs / sync_secs
    );
    println!(
        "steady changes               {rate}/s for {seconds} s: {} events",
        latencies.len()
    );
    println!(
        "latency write -> Kafka read  p50 {:.1} ms, p99 {:.1} ms (after the first second)",
        percentile(&steady, 0.50).unwrap_or_default(),
        percentile(&steady, 0.99).unwrap_or_default()
    );
    println!(
        "  the first second's         p50 {:.1} ms, max {:.1} ms",
        percentile(&warm_up, 0.50).unwrap_or_default(),
        warm_up.last().copied().unwrap_or_default()
    );
    println!(
        "memory per watched object    {:.2} KiB (RSS {rss_before} -> {rss_after} KiB)",
        (rss_after.saturating_sub(rss_before)) as f64 / objects as f64
    );
    Ok(())
}

/// Writes `rate` updates per second for `seconds`; returns each one's number (in
/// write order) and latency (ms) from the write to reading its event.
async fn steady_changes(
    fake: &FakeApiServer,
    kind: &ResourceType,
    consumer: &TestConsumer,
    objects: u64,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Vec<(u64, f64)>> {
    let total = rate * seconds;
    let mut written: HashMap<String, (u64, Instant)> = HashMap::new();
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut next = 0;
    let mut drain_started = None;
    while next < total || latencies.len() < total as usize {
        if next < total {
            interval.tick().await;
            for _ in 0..per_tick.min(total - next) {
                let name = format!("m{}", next % objects);
                let patch = json!({"data": {"version": next.to_string()}});
                let object = fake
                    .store()
                    .merge_patch(kind, "default", &name, &patch, "bench", false)
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                let rv = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                written.insert(rv, (next, Instant::now()));
                next += 1;
            }
        }
        // Short reads, so each latency is taken within a millisecond of arrival.
        for event in read_events(consumer, usize::MAX, Duration::from_millis(1)).await? {
            if let Origin::Kubernetes(k8s) = &event.source.origin {
                if let Some((number, at)) = written.remove(&k8s.resource_version) {
                    latencies.push((number, at.elapsed().as_secs_f64() * 1000.0));
                }
            }
        }
        if next == total {
            let drain_deadline =
                *drain_started.get_or_insert_with(Instant::now) + Duration::from_secs(60);
            ensure!(
                Instant::now() < drain_deadline,
                "{} of {total} changes arrived",
                latencies.len()
            );
        }
    }
    Ok(latencies)
}

/// Reads up to `count` events for at most `wait`.
async fn read_events(
    consumer: &TestConsumer,
    count: usize,
    wait: Duration,
) -> anyhow::Result<Vec<ChangeEvent>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = Vec::new();
    while events.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let records = consumer.read(count.min(1000), left).await?;
        if records.is_empty() {
            break;
        }
        for record in records {
            events.push(serde_json::from_slice(
                record.value.as_deref().context("tombstone")?,
            )?);
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    Ok(events)
}

/// Current resident set size of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}
