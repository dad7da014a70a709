//! Forward benchmark:
//! `cargo run --release -p changewire-tests --bin bench-forward -- [EVENTS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 1. starts an HTTP receiver on loopback that answers 200 at once;
//! 2. publishes EVENTS events (default 20,000) over 100 keys to a 3-partition topic;
//! 3. times the forward service (in-process, its own sled store, signed
//!    requests, per-key order, outbox) from subscribing until the receiver has
//!    every event;
//! 4. times a plain loop over the same topic: consume, sign and POST each
//!    record's value with the same number of requests in flight, no state, no
//!    order (the ceiling);
//! 5. prints both rates and their ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::ensure;
use axum::routing::post;
use axum::Router;
use changewire_consumer::config::ServiceConfig;
use changewire_consumer::runtime::sinks::webhook::{sign, WebhookConfig};
use changewire_consumer::runtime::{self, ConsumerMetrics, RuntimeConfig};
use changewire_consumer::services::forward::Forward;
use changewire_schemas::fixtures::compact_event;
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::Codec;
use changewire_tests::{bench_events, create_topics, unique_name, Stack};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::watch;

const PARTITIONS: i32 = 3;
const KEYS: u64 = 100;
const CONCURRENCY: usize = 32;
const SECRET_KEY: &[u8] = b"bench-forward-signing-key";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(20_000)?;
    let stack = Stack::from_env();
    let received = Arc::new(AtomicU64::new(0));
    let url = start_receiver(received.clone()).await?;
    let prefix = unique_name("benchfw");
    let topic = format!("{prefix}.src.public.orders");
    create_topics(&stack, &[&topic], PARTITIONS).await?;
    publish(&stack, &topic, events).await?;
    println!("published {events} events over {KEYS} keys to {PARTITIONS} partitions");

    let forward = time_forward(&stack, &prefix, &topic, &url, &received, events).await?;
    received.store(0, Ordering::SeqCst);
    let plain = time_plain_loop(&stack, &topic, &url, &received, events).await?;
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "forward service:      {:>6.2} s  {:>8.0} events/s",
        forward.as_secs_f64(),
        rate(forward)
    );
    println!(
        "plain POST loop ({CONCURRENCY} in flight): {:>6.2} s  {:>8.0} events/s",
        plain.as_secs_f64(),
        rate(plain)
    );
    println!("ratio forward / plain: {:.2}", rate(forward) / rate(plain));
    Ok(())
}

/// A receiver that counts requests and answers 200 at once.
async fn start_receiver(received: Arc<AtomicU64>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new().route(
        "/hook",
        post(move || {
            received.fetch_add(1, Ordering::SeqCst);
            async { "" }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

async fn publish(stack: &Stack, topic: &str, events: u64) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("linger.ms", "5")
        .create()?;
    let codec = Codec::json()?;
    let mut acks = Vec::with_capacity(events as usize);
    for n in 0..events {
        let value = codec.encode(&compact_event(n))?;
        let key = (n % KEYS).to_string();
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(value.as_slice());
        acks.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for ack in futures::future::join_all(acks).await {
        ack?.map_err(|(error, _)| error)?;
    }
    Ok(())
}

/// Runs forward until the receiver has `events` requests.
async fn time_forward(
    stack: &Stack,
    prefix: &str,
    topic: &str,
    url: &str,
    received: &AtomicU64,
    events: u64,
) -> anyhow::Result<Duration> {
    let state = tempfile::tempdir()?;
    let config = RuntimeConfig {
        kafka: stack.kafka_config(),
        topics: TopicsConfig {
            prefix: prefix.to_owned(),
            ..TopicsConfig::default()
        },
        http: None,
        service: ServiceConfig {
            group_id: Some(unique_name("benchfw")),
            max_batch: 5_000,
            resume_rewind: 10_000,
            ..ServiceConfig::new("forward", vec![topic.to_owned()], state.path().to_owned())
        },
    };
    let webhook = WebhookConfig {
        url: url.to_owned(),
        secret: format!("whsec_{}", base64_key()),
        timeout_ms: 10_000,
        concurrency: CONCURRENCY,
    };
    let (handler, sinks) = Forward::new(&webhook)?;
    let (stop, shutdown) = watch::channel(false);
    let metrics = Arc::new(ConsumerMetrics::default());
    let started = Instant::now();
    let service = tokio::spawn(async move {
        runtime::run_observed(&config, handler, sinks, shutdown, metrics).await
    });
    while received.load(Ordering::SeqCst) < events {
        ensure!(!service.is_finished(), "the forward service stopped early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    service.await??;
    Ok(elapsed)
}

/// Consumes `events` records and POSTs each value, signed, with
/// [`CONCURRENCY`] requests in flight.
async fn time_plain_loop(
    stack: &Stack,
    topic: &str,
    url: &str,
    received: &AtomicU64,
    events: u64,
) -> anyhow::Result<Duration> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", unique_name("benchplain"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // As the runtime's consumer: no second-long pause once the queue filled.
        .set("fetch.queue.backoff.ms", "20")
        .create()?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    consumer.subscribe(&[topic])?;
    let bodies = consumer
        .stream()
        .take(events as usize)
        .map(|message| message.map(|m| m.payload().unwrap_or_default().to_vec()));
    let posted: Vec<anyhow::Result<()>> = bodies
        .map(|body| {
            let http = http.clone();
            async move {
                let body = body?;
                let timestamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                let id = unique_name("msg");
                let response = http
                    .post(url)
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", sign(SECRET_KEY, &id, timestamp, &body))
                    .body(body)
                    .send()
                    .await?;
                ensure!(response.status().is_success(), "{}", response.status());
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    posted.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let elapsed = started.elapsed();
    ensure!(
        received.load(Ordering::SeqCst) >= events,
        "receiver saw fewer"
    );
    Ok(elapsed)
}

fn base64_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(SECRET_KEY)
}
