//! Effects delivered by the runtime's sinks against real receivers: a webhook
//! receiver that is down for longer than the poll interval, a service killed
//! mid-stream, and records too large for where they should go.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use changewire_consumer::runtime::dlq::headers as dlq_headers;
use changewire_consumer::runtime::sinks::kafka::IDEMPOTENCY_HEADER;
use changewire_schemas::{ChangeEvent, Codec, Op};
use changewire_tests::servers::free_port;
use changewire_tests::{create_topics, read_to_end, unique_name, workspace_binary, Stack};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::time::Instant;

use crate::consumer::{
    event, last_offsets, start_service, terminate, wait_for_committed, RESUME_REWIND,
};
use crate::forward::{header, signed, KEY};
use crate::rebalance::{metric, ASSIGNED};

/// What a webhook receiver saw.
#[derive(Default)]
struct Hooks {
    /// Answer 503 (with `Retry-After: 1`) while set.
    down: bool,
    /// Requests refused while down.
    refused: u64,
    /// Per event id, the `webhook-id`s it was accepted under.
    accepted: HashMap<String, BTreeSet<String>>,
    /// Accepted requests, repeats included.
    requests: u64,
    bad_signatures: u64,
}

type Shared = Arc<Mutex<Hooks>>;

async fn receive(
    State(hooks): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let mut hooks = hooks.lock().expect("hooks lock");
    if !signed(&headers, &body) {
        hooks.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, [("retry-after", "1")]);
    }
    if hooks.down {
        hooks.refused += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")]);
    }
    let Ok(event) = serde_json::from_slice::<ChangeEvent>(&body) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, [("retry-after", "1")]);
    };
    let webhook_id = header(&headers, "webhook-id").to_owned();
    hooks
        .accepted
        .entry(event.id.to_string())
        .or_default()
        .insert(webhook_id);
    hooks.requests += 1;
    (StatusCode::OK, [("retry-after", "1")])
}

/// Starts a receiver on loopback; returns its URL.
async fn start_receiver(hooks: Shared) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(hooks);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// A forward service set up against a receiver: its topic with events
/// published, its config file (`/metrics` on `port`), binary and log.
struct ForwardRun {
    prefix: String,
    topic: String,
    group: String,
    /// The last offset per partition of the published events.
    last: Vec<(i32, i64)>,
    port: u16,
    file: std::path::PathBuf,
    program: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ForwardRun {
    /// Publishes `events` to a new topic of `partitions` and writes the config
    /// of a forward service posting them to `url`.
    async fn new(stack: &Stack, url: &str, partitions: i32, events: u64) -> anyhow::Result<Self> {
        let (prefix, topic, group) = (
            unique_name("fw"),
            unique_name("input"),
            unique_name("forward"),
        );
        create_topics(stack, &[&topic], partitions).await?;
        let last = last_offsets(&publish_events(stack, &topic, 0..events).await?);
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let file = dir.path().join("forward.toml");
        let config = format!(
            "[kafka]\nbrokers = {brokers:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             \"max.poll.interval.ms\" = \"10000\"\n[topics]\nprefix = {prefix:?}\n\
             [service]\nname = \"forward\"\ngroup_id = {group:?}\nsubscribe = [{topic:?}]\n\
             state_dir = {state:?}\nresume_rewind = {RESUME_REWIND}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [forward]\nurl = {url:?}\nsecret = \"whsec_{secret}\"\n",
            brokers = stack.kafka_brokers,
            state = dir.path().join("state"),
            secret = STANDARD.encode(KEY),
        );
        std::fs::write(&file, config)?;
        Ok(Self {
            prefix,
            topic,
            group,
            last,
            port,
            file,
            program: workspace_binary("changewire-consumer")?,
            log: dir.path().join("forward.log"),
            _dir: dir,
        })
    }

    fn start(&self) -> anyhow::Result<crate::consumer::KillOnDrop> {
        start_service(&self.program, &self.file, &self.log)
    }
}

/// Publishes `count` events keyed over 10 keys, optionally with extra headers;
/// returns where they landed.
async fn publish_events(
    stack: &Stack,
    topic: &str,
    numbers: std::ops::Range<u64>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let codec = Codec::json()?;
    let records = numbers
        .map(|n| {
            Ok((
                format!("key-{}", n % 10).into_bytes(),
                codec.encode(&event(n, Op::Create))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::consumer::publish_keyed(stack, topic, records).await
}

/// Polls `done` on the receiver every 20 ms until `timeout`.
async fn until_hooks(
    hooks: &Shared,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Hooks) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(&hooks.lock().expect("hooks lock")) {
        anyhow::ensure!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Every event id arrived, each under the one `webhook-id` derived from it.
fn assert_each_event_once_by_id(hooks: &Hooks, numbers: std::ops::Range<u64>) {
    assert_eq!(hooks.bad_signatures, 0, "every request correctly signed");
    for n in numbers {
        let id = event(n, Op::Create).id.to_string();
        let webhook_ids = hooks.accepted.get(&id);
        let expected = BTreeSet::from([format!("{id}/webhook/0")]);
        assert_eq!(
            webhook_ids,
            Some(&expected),
            "event {n}: repeats only under the same webhook-id"
        );
    }
}

/// The receiver answers 503 for longer than `max.poll.interval.ms` (10 s): the
/// instance stays in its group, `/health` names the sink, SIGTERM still exits
/// within 5 s, a SIGKILL during the outage loses nothing, nothing goes to the
/// DLQ, and everything arrives once the receiver is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_rides_out_a_receiver_outage_longer_than_the_poll_interval() -> anyhow::Result<()> {
    const EVENTS: u64 = 300;
    let stack = Stack::from_env();
    let hooks = Shared::default();
    hooks.lock().expect("hooks lock").down = true;
    let url = start_receiver(hooks.clone()).await?;
    let run = ForwardRun::new(&stack, &url, 2, EVENTS).await?;

    let service = run.start()?;
    until_hooks(
        &hooks,
        "the first refused request",
        Duration::from_secs(60),
        |h| h.refused > 0,
    )
    .await?;
    let health = reqwest::get(format!("http://127.0.0.1:{}/health", run.port)).await?;
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body = health.text().await?;
    assert!(body.contains("sink webhook"), "{body}");
    let base = format!("http://127.0.0.1:{}", run.port);
    let ready = reqwest::get(format!("{base}/readyz")).await?.status();
    assert_eq!(
        ready,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "not ready during the outage"
    );
    let live = reqwest::get(format!("{base}/livez")).await?.status();
    assert_eq!(
        live,
        reqwest::StatusCode::OK,
        "alive: a liveness probe must not restart it"
    );
    // The outage itself: longer than max.poll.interval.ms.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        metric(run.port, ASSIGNED, "").await?,
        2,
        "still owns its partitions"
    );
    let text = std::fs::read_to_string(&run.log)?;
    assert!(
        !text.contains("partitions revoked"),
        "no rebalance during the outage:\n{text}"
    );
    let stopping = Instant::now();
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        stopping.elapsed()
    );

    let refused = hooks.lock().expect("hooks lock").refused;
    let service = run.start()?;
    until_hooks(
        &hooks,
        "a refused request after the restart",
        Duration::from_secs(60),
        |h| h.refused > refused,
    )
    .await?;
    drop(service); // SIGKILL
    let service = run.start()?;
    hooks.lock().expect("hooks lock").down = false;
    until_hooks(&hooks, "every event", Duration::from_secs(90), |h| {
        h.accepted.len() as u64 == EVENTS
    })
    .await?;
    wait_for_committed(&stack, &run.group, &run.topic, &run.last).await?;
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");

    assert_each_event_once_by_id(&hooks.lock().expect("hooks lock"), 0..EVENTS);
    let dlq = format!("{}.dlq.forward", run.prefix);
    let dead = read_to_end(&stack, &dlq, Duration::from_secs(30)).await?;
    assert!(
        dead.is_empty(),
        "nothing dead-lettered during an outage: {} records",
        dead.len()
    );
    Ok(())
}

/// forward is SIGKILLed while it posts: after the restart the receiver has seen
/// every event, any repeat under the same `webhook-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_killed_mid_stream_delivers_every_event_under_stable_webhook_ids(
) -> anyhow::Result<()> {
    const EVENTS: u64 = 5_000;
    let stack = Stack::from_env();
    let hooks = Shared::default();
    let url = start_receiver(hooks.clone()).await?;
    let run = ForwardRun::new(&stack, &url, 3, EVENTS).await?;

    let service = run.start()?;
    until_hooks(
        &hooks,
        "a tenth of the events",
        Duration::from_secs(60),
        |h| h.requests >= EVENTS / 10,
    )
    .await?;
    drop(service); // SIGKILL
    let at_kill = hooks.lock().expect("hooks lock").requests;
    let service = run.start()?;
    let every_event = until_hooks(&hooks, "every event", Duration::from_secs(120), |h| {
        h.accepted.len() as u64 == EVENTS
    });
    if let Err(error) = every_event.await {
        let accepted = hooks.lock().expect("hooks lock").accepted.len();
        let log = std::fs::read_to_string(&run.log).unwrap_or_default();
        anyhow::bail!("{error:#} ({accepted} of {EVENTS} accepted)\nservice log:\n{log}");
    }
    wait_for_committed(&stack, &run.group, &run.topic, &run.last).await?;
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    let hooks = hooks.lock().expect("hooks lock");
    println!(
        "killed after {at_kill} requests; {} requests for {EVENTS} events",
        hooks.requests
    );
    assert!(at_kill < EVENTS, "killed mid-stream");
    assert_each_event_once_by_id(&hooks, 0..EVENTS);
    Ok(())
}

/// A producer whose records may be up to 10 MB (the broker accepts them).
fn large_producer(stack: &Stack) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("message.max.bytes", "10485760")
        .set("enable.idempotence", "true")
        .create()?)
}

/// dedup reads a 2 MB undecodable record and a 2 MB valid event (the client's
/// default limit is 1 MB): each ends in the DLQ as a reference without its
/// payload, the service goes on to the records after them, a header without a
/// value stays without one, and SIGTERM exits promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_dead_letters_records_too_large_to_write_and_goes_on() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let prefix = unique_name("big");
    let raw = format!("{prefix}.src.public.orders");
    create_topics(&stack, &[&raw], 1).await?;
    let codec = Codec::json()?;
    let mut large_event = event(1, Op::Create);
    large_event.after = Some(serde_json::json!({"blob": "x".repeat(2 << 20)}));
    let values = [
        codec.encode(&event(0, Op::Create))?,
        vec![0xFF; 2 << 20],
        codec.encode(&large_event)?,
        codec.encode(&event(3, Op::Create))?,
    ];
    let producer = large_producer(&stack)?;
    let mut landed = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "origin",
                value: Some("test"),
            })
            .insert(Header::<&[u8]> {
                key: "no-value",
                value: None,
            });
        let key = i.to_string();
        let record = FutureRecord::to(&raw)
            .key(&key)
            .payload(value)
            .headers(headers);
        let delivered = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        landed.push((delivered.partition, delivered.offset));
    }
    let dir = tempfile::tempdir()?;
    let group = unique_name("dedup");
    let file = dir.path().join("dedup.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
             [service]\nname = \"dedup\"\ngroup_id = {group:?}\nsubscribe = [{raw:?}]\n\
             state_dir = {state:?}\nresume_rewind = {RESUME_REWIND}\n[dedup]\n",
            brokers = stack.kafka_brokers,
            state = dir.path().join("state"),
        ),
    )?;
    let log = dir.path().join("dedup.log");
    let service = start_service(&workspace_binary("changewire-consumer")?, &file, &log)?;
    if let Err(error) = wait_for_committed(&stack, &group, &raw, &last_offsets(&landed)).await {
        anyhow::bail!(
            "{error:#}\nservice log:\n{}",
            std::fs::read_to_string(&log)?
        );
    }
    let stopping = Instant::now();
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        stopping.elapsed()
    );

    let output = read_to_end(
        &stack,
        &format!("{prefix}.dedup.src.public.orders"),
        Duration::from_secs(60),
    )
    .await?;
    let ids: Vec<String> = output
        .iter()
        .map(|r| {
            codec
                .decode(r.value.as_deref().unwrap_or_default())
                .map(|e| e.id.to_string())
        })
        .collect::<Result<_, _>>()?;
    let small = [
        event(0, Op::Create).id.to_string(),
        event(3, Op::Create).id.to_string(),
    ];
    assert_eq!(
        ids, small,
        "the records after the large ones were republished"
    );
    assert_eq!(
        output[0].headers[1],
        ("no-value".to_owned(), None),
        "a header without a value stays so"
    );

    let dead = read_to_end(
        &stack,
        &format!("{prefix}.dlq.dedup"),
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(dead.len(), 2, "both large records dead-lettered");
    let undecodable = dead
        .iter()
        .find(|r| r.header(dlq_headers::SINK).is_none())
        .expect("the undecodable record");
    assert_eq!(
        undecodable.header(dlq_headers::OFFSET),
        Some(landed[1].1.to_string())
    );
    assert!(undecodable
        .header(dlq_headers::ERROR)
        .is_some_and(|e| e.starts_with("undecodable")));
    let rejected = dead
        .iter()
        .find(|r| r.header(dlq_headers::SINK).is_some())
        .expect("the rejected effect");
    assert_eq!(
        rejected.header(dlq_headers::SINK).as_deref(),
        Some("output")
    );
    assert_eq!(
        rejected.header(dlq_headers::IDEMPOTENCY_KEY),
        Some(format!("{}/output/0", large_event.id))
    );
    assert!(rejected.header(IDEMPOTENCY_HEADER).is_some());
    for letter in &dead {
        assert!(
            letter.header(dlq_headers::PAYLOAD).is_some(),
            "too large to keep: left out, said so"
        );
        assert_eq!(letter.value.as_deref().unwrap_or_default().len(), 0);
    }
    Ok(())
}
