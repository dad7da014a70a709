//! The consumer runtime against the real broker: dead letters, and effects that
//! happen once per event id although the service is killed with SIGKILL.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use changewire_consumer::config::{ConsumerConfig, ServiceConfig};
use changewire_consumer::runtime::{
    self, dlq::headers as dlq_headers, Context, Handler, HandlerError, Record, Sinks, Store,
};
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::{ChangeEvent, Codec, EventId, Op};
use changewire_tests::{create_topics, unique_name, workspace_example, Stack, TestConsumer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use changewire_schemas::fixtures;

/// tansu serves a fetch from inside a record batch with the next batch; the test
/// publisher batches up to 10,000 records.
pub const RESUME_REWIND: i64 = 10_000;

pub fn service_config(stack: &Stack, prefix: &str, topic: &str, state: &Path) -> ConsumerConfig {
    let mut kafka = stack.kafka_config();
    kafka
        .properties
        .insert("session.timeout.ms".into(), "6000".into());
    // A rebalance waits this long for members that left without saying so (killed).
    kafka
        .properties
        .insert("max.poll.interval.ms".into(), "10000".into());
    ConsumerConfig {
        kafka,
        topics: TopicsConfig {
            prefix: prefix.to_owned(),
            ..TopicsConfig::default()
        },
        service: ServiceConfig {
            group_id: Some(unique_name("group")),
            max_attempts: 2,
            max_batch: 500,
            resume_rewind: RESUME_REWIND,
            ..ServiceConfig::new("svc", vec![topic.to_owned()], state.to_owned())
        },
        http: None,
        dedup: None,
        forward: None,
        audit: None,
        siem: None,
        alert: None,
        gateway: None,
    }
}

/// An event of the Postgres fixture with its own id and op.
pub fn event(n: u64, op: Op) -> ChangeEvent {
    let mut event = fixtures::postgres_update("src");
    event.id = EventId::postgres("src", 0x100 + n, 1);
    event.op = op;
    event
}

/// Publishes `values` to `topic` (key = index) and returns where each landed.
pub async fn publish(
    stack: &Stack,
    topic: &str,
    values: Vec<Vec<u8>>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let keyed = values
        .into_iter()
        .enumerate()
        .map(|(i, value)| (i.to_string().into_bytes(), value))
        .collect();
    publish_keyed(stack, topic, keyed).await
}

/// Publishes `(key, value)` pairs to `topic` and returns where each landed.
pub async fn publish_keyed(
    stack: &Stack,
    topic: &str,
    records: Vec<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let producer = changewire_tests::producer(stack)?;
    let acks: Vec<_> = records
        .iter()
        .map(|(key, value)| {
            let headers = OwnedHeaders::new().insert(Header {
                key: "origin",
                value: Some(b"test"),
            });
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(value)
                .headers(headers);
            producer.send_result(record).map_err(|(error, _)| error)
        })
        .collect::<Result<_, _>>()?;
    let mut landed = Vec::with_capacity(acks.len());
    for ack in acks {
        let delivered = ack.await?.map_err(|(error, _)| error)?;
        landed.push((delivered.partition, delivered.offset));
    }
    Ok(landed)
}

/// Applies creates; rejects deletes as permanently invalid.
struct RejectDeletes;

impl Handler for RejectDeletes {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if event.op == Op::Delete {
            return Err(HandlerError::Permanent(
                "deletes are not accepted here".into(),
            ));
        }
        context.put(format!("applied/{}", event.id), "1");
        Ok(())
    }
}

#[tokio::test]
async fn bad_records_go_to_the_dlq_with_reasons_and_the_service_keeps_going() -> anyhow::Result<()>
{
    let stack = Stack::from_env();
    let (prefix, topic) = (unique_name("cons"), unique_name("input"));
    create_topics(&stack, &[&topic], 1).await?;
    let codec = Codec::json()?;
    let values = vec![
        b"\x00\x01not an event".to_vec(),
        br#"{"hello": "world"}"#.to_vec(),
        codec.encode(&event(1, Op::Delete))?,
        codec.encode(&event(2, Op::Create))?,
        codec.encode(&event(2, Op::Create))?, // the same id again: skipped
    ];
    publish(&stack, &topic, values).await?;
    let state = tempfile::tempdir()?;
    let config = service_config(&stack, &prefix, &topic, state.path());
    let group = config.group_id();
    let (stop, shutdown) = watch::channel(false);
    let runner = tokio::spawn(async move {
        runtime::run(&config.runtime(), RejectDeletes, Sinks::new(), shutdown).await
    });

    let dlq = format!("{prefix}.dlq.svc");
    let deadline = Instant::now() + Duration::from_secs(60);
    let consumer = loop {
        match TestConsumer::from_beginning(&stack, &dlq) {
            Ok(consumer) => break consumer,
            Err(error) => anyhow::ensure!(Instant::now() < deadline, "no DLQ topic: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead = consumer.read_exactly(3, Duration::from_secs(60)).await?;
    let header = |record: &changewire_tests::ReadRecord, name: &str| record.header(name);
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| header(r, dlq_headers::ERROR).unwrap_or_default())
        .collect();
    assert!(reasons[0].starts_with("undecodable"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("undecodable") && reasons[1].contains("JSON"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("deletes are not accepted"),
        "{reasons:?}"
    );
    for (i, record) in dead.iter().enumerate() {
        assert_eq!(
            header(record, dlq_headers::TOPIC).as_deref(),
            Some(topic.as_str())
        );
        assert_eq!(header(record, dlq_headers::OFFSET), Some(i.to_string()));
        assert_eq!(header(record, dlq_headers::SERVICE).as_deref(), Some("svc"));
    }
    assert_eq!(
        dead[0].value.as_deref(),
        Some(&b"\x00\x01not an event"[..]),
        "the original bytes are kept"
    );

    // The service went on past the bad records to the end of the topic.
    wait_for_committed(&stack, &group, &topic, &[(0, 4)]).await?;
    stop.send(true)?;
    let stats = runner.await??;
    assert_eq!(
        (stats.applied, stats.duplicates, stats.dead_lettered),
        (1, 1, 3),
        "{stats:?}"
    );
    Ok(())
}

/// The group's committed offset per partition (`-1` when none), read without
/// joining the group.
fn committed(stack: &Stack, group: &str, topic: &str, partitions: i32) -> anyhow::Result<Vec<i64>> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition(topic, partition);
    }
    let offsets = client.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(
            |p| match offsets.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => n,
                _ => -1,
            },
        )
        .collect())
}

/// Waits until the group's committed offsets add up to at least `records`.
pub async fn wait_for_progress(
    stack: &Stack,
    group: &str,
    topic: &str,
    partitions: i32,
    records: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let offsets = committed(stack, group, topic, partitions)?;
        let done: i64 = offsets.iter().map(|o| o.max(&0)).sum();
        if done as u64 >= records {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "progress stuck at {offsets:?}, want {records} records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The highest offset per partition among `landed`.
pub fn last_offsets(landed: &[(i32, i64)]) -> Vec<(i32, i64)> {
    let mut last: HashMap<i32, i64> = HashMap::new();
    for &(partition, offset) in landed {
        let entry = last.entry(partition).or_insert(offset);
        *entry = (*entry).max(offset);
    }
    last.into_iter().collect()
}

/// Waits until the group committed past the last offset of each `(partition, offset)`.
pub async fn wait_for_committed(
    stack: &Stack,
    group: &str,
    topic: &str,
    last: &[(i32, i64)],
) -> anyhow::Result<()> {
    let partitions = last.iter().map(|(p, _)| p + 1).max().unwrap_or(1);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let offsets = committed(stack, group, topic, partitions)?;
        if last.iter().all(|&(p, offset)| offsets[p as usize] > offset) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "committed offsets stuck at {offsets:?}, want past {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The example service, killed with SIGKILL three times while it works through
/// 20,000 events of which 2,000 repeat an earlier id: each distinct event takes
/// effect exactly once (its `applied/<id>` counter in sled is 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_service_applies_every_distinct_event_exactly_once() -> anyhow::Result<()> {
    const EVENTS: u64 = 20_000;
    const DISTINCT: u64 = 18_000;
    let stack = Stack::from_env();
    let (prefix, topic) = (unique_name("cons"), unique_name("input"));
    create_topics(&stack, &[&topic], 3).await?;
    let codec = Codec::json()?;
    // Every tenth event repeats the id of an earlier one.
    let ids: Vec<u64> = (0..EVENTS)
        .map(|i| if i % 10 == 9 { i / 10 } else { i - i / 10 })
        .collect();
    let distinct: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len() as u64, DISTINCT);
    let values = ids
        .iter()
        .map(|&n| codec.encode(&event(n, Op::Create)))
        .collect::<Result<Vec<_>, _>>()?;
    let landed = publish(&stack, &topic, values).await?;
    let last = last_offsets(&landed);
    // tansu's high watermark lags stored records; later writes move it on. Publish
    // filler events (ids outside the checked range) until it covers the real ones.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fillers_published = 0u64;
    for round in 0u64.. {
        let covered = last.iter().all(|&(p, offset)| {
            probe
                .fetch_watermarks(&topic, p, Duration::from_secs(5))
                .map(|(_, high)| high > offset)
                .unwrap_or(false)
        });
        if covered {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker's high watermark never covered the events"
        );
        let fillers = (0..30)
            .map(|i| codec.encode(&event(1_000_000 + round * 30 + i, Op::Create)))
            .collect::<Result<Vec<_>, _>>()?;
        fillers_published += fillers.len() as u64;
        publish(&stack, &topic, fillers).await?;
    }
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let config = service_config(&stack, &prefix, &topic, &state);
    let group = config.group_id();
    let file = write_config(dir.path(), "count", &config)?;
    let program = workspace_example("count_events")?;
    let log = dir.path().join("service.log");
    let start = || start_service(&program, &file, &log);
    // Kill when a quarter, half and three quarters are done (as mirrored to Kafka).
    for quarter in 1..=3 {
        let service = start()?;
        wait_for_progress(&stack, &group, &topic, 3, EVENTS * quarter / 4).await?;
        drop(service); // SIGKILL
    }
    let service = start()?;
    if let Err(error) = wait_for_committed(&stack, &group, &topic, &last).await {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        anyhow::bail!("{error:#}\nservice log:\n{log}");
    }
    // SIGTERM: the service finishes the batch at hand and exits.
    terminate(service)?;

    let store = Store::open(&state)?;
    let mut applied_twice = Vec::new();
    for n in &distinct {
        let id = EventId::postgres("src", 0x100 + n, 1);
        let count = store.get(format!("applied/{id}").as_bytes())?;
        if count.as_deref() != Some(b"1") {
            applied_twice.push((
                id.to_string(),
                count.map(|c| String::from_utf8_lossy(&c).into_owned()),
            ));
        }
    }
    if !applied_twice.is_empty() {
        let log = std::fs::read_to_string(dir.path().join("service.log")).unwrap_or_default();
        for line in log
            .lines()
            .filter(|l| l.contains("offset") || l.contains("assigned") || l.contains("revoked"))
        {
            eprintln!("service: {line}");
        }
    }
    assert!(
        applied_twice.is_empty(),
        "{} events not applied exactly once, e.g. {:?}",
        applied_twice.len(),
        &applied_twice[..applied_twice.len().min(5)]
    );
    let table = store
        .get(b"table/public.orders")?
        .map(|c| String::from_utf8_lossy(&c).into_owned());
    assert_eq!(
        table,
        Some((DISTINCT + fillers_published).to_string()),
        "per-table count equals the distinct events"
    );
    Ok(())
}

/// Writes `config` as `<dir>/<name>.toml` and returns the path.
pub fn write_config(dir: &Path, name: &str, config: &ConsumerConfig) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(config)?)?;
    Ok(path)
}

/// Starts a service process with `config`, appending its output to `log`.
pub fn start_service(program: &Path, config: &Path, log: &Path) -> anyhow::Result<KillOnDrop> {
    let child = Command::new(program)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,changewire_consumer=debug")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        )
        .spawn()?;
    Ok(KillOnDrop(child))
}

/// Stops `service` with SIGTERM and waits for it to exit.
pub fn terminate(mut service: KillOnDrop) -> anyhow::Result<std::process::ExitStatus> {
    Command::new("kill")
        .arg(service.0.id().to_string())
        .status()?;
    Ok(service.0.wait()?)
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails one event id transiently a number of times, then applies it; records the
/// order of applied events (partition, number).
struct FlakyOnce {
    flaky_id: String,
    failures_left: std::sync::Mutex<u32>,
    applied: std::sync::Arc<std::sync::Mutex<Vec<(i32, String)>>>,
}

impl Handler for FlakyOnce {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        record: &Record,
        _: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let id = event.id.to_string();
        if id == self.flaky_id {
            let mut left = self.failures_left.lock().expect("lock");
            if *left > 0 {
                *left -= 1;
                return Err(HandlerError::transient("downstream busy"));
            }
        }
        self.applied
            .lock()
            .expect("lock")
            .push((record.partition, id));
        Ok(())
    }
}

#[tokio::test]
async fn a_transient_failure_holds_back_only_its_partition() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, topic) = (unique_name("cons"), unique_name("input"));
    create_topics(&stack, &[&topic], 2).await?;
    let codec = Codec::json()?;
    let values = (0..40)
        .map(|n| codec.encode(&event(n, Op::Create)))
        .collect::<Result<Vec<_>, _>>()?;
    let landed = publish(&stack, &topic, values).await?;
    // The flaky event: the first one of partition 0.
    let first_of_p0 = (0..landed.len())
        .filter(|&i| landed[i].0 == 0)
        .min_by_key(|&i| landed[i].1)
        .expect("records on partition 0");
    anyhow::ensure!(
        landed.iter().any(|(p, _)| *p == 1),
        "records on partition 1"
    );
    let flaky_id = event(first_of_p0 as u64, Op::Create).id.to_string();
    let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = FlakyOnce {
        flaky_id: flaky_id.clone(),
        failures_left: std::sync::Mutex::new(3),
        applied: applied.clone(),
    };
    let state = tempfile::tempdir()?;
    let mut config = service_config(&stack, &prefix, &topic, state.path());
    config.service.max_attempts = 5;
    let group = config.group_id();
    let (stop, shutdown) = watch::channel(false);
    let runner = tokio::spawn(async move {
        runtime::run(&config.runtime(), handler, Sinks::new(), shutdown).await
    });
    wait_for_committed(&stack, &group, &topic, &last_offsets(&landed)).await?;
    stop.send(true)?;
    let stats = runner.await??;
    assert_eq!(stats.applied, 40, "{stats:?}");

    let applied = applied.lock().expect("lock").clone();
    let flaky_at = applied
        .iter()
        .position(|(_, id)| *id == flaky_id)
        .expect("the flaky event was applied in the end");
    let partition_1_before = applied[..flaky_at].iter().filter(|(p, _)| *p == 1).count();
    let partition_0_before = applied[..flaky_at].iter().filter(|(p, _)| *p == 0).count();
    assert!(
        partition_1_before > 0,
        "partition 1 went on while partition 0 waited: {applied:?}"
    );
    assert_eq!(
        partition_0_before, 0,
        "nothing of partition 0 overtook its failed record: {applied:?}"
    );
    // Partition 0 kept its order: publication order is offset order.
    let order: Vec<&String> = applied
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, id)| id)
        .collect();
    let mut by_offset: Vec<(i64, String)> = (0..landed.len())
        .filter(|&i| landed[i].0 == 0)
        .map(|i| (landed[i].1, event(i as u64, Op::Create).id.to_string()))
        .collect();
    by_offset.sort();
    let expected: Vec<&String> = by_offset.iter().map(|(_, id)| id).collect();
    assert_eq!(order, expected);
    Ok(())
}

/// Applies events (`applied/<id>` in its state) at offsets below `stop_at`;
/// from there on its dependency is down.
struct AppliesBelow {
    stop_at: i64,
}

impl Handler for AppliesBelow {
    type Row = Box<serde_json::value::RawValue>;

    async fn handle(
        &self,
        event: &ChangeEvent<Self::Row>,
        record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if record.offset >= self.stop_at {
            return Err(HandlerError::unavailable("down for the test"));
        }
        context.put(format!("applied/{}", event.id), "1");
        Ok(())
    }
}

/// A service with no `resume_rewind` that stopped at offset 500 of a 1,200-event
/// record batch (its dependency down from there), on a new one-partition topic.
struct StoppedInsideABatch {
    stack: Stack,
    topic: String,
    group: String,
    config: ConsumerConfig,
    state: tempfile::TempDir,
    codec: Codec,
    applied: u64,
}

impl StoppedInsideABatch {
    async fn new() -> anyhow::Result<Self> {
        let stack = Stack::from_env();
        let (prefix, topic) = (unique_name("cons"), unique_name("input"));
        create_topics(&stack, &[&topic], 1).await?;
        let codec = Codec::json()?;
        // One send: the producer puts them in one record batch.
        publish(&stack, &topic, encoded(&codec, 0..1_200)?).await?;
        let state = tempfile::tempdir()?;
        let mut config = service_config(&stack, &prefix, &topic, state.path());
        config.service.resume_rewind = 0;
        let group = config.group_id();
        let mut stopped = Self {
            stack,
            topic,
            group,
            config,
            state,
            codec,
            applied: 0,
        };
        let (stop, run) = stopped.run(500);
        wait_for_committed(&stopped.stack, &stopped.group, &stopped.topic, &[(0, 499)]).await?;
        stop.send(true)?;
        stopped.applied = run.await??.applied;
        Ok(stopped)
    }

    /// Runs the service again, applying events at offsets below `stop_at`.
    fn run(
        &self,
        stop_at: i64,
    ) -> (
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<runtime::RunStats, runtime::RuntimeError>>,
    ) {
        let (config, (stop, shutdown)) = (self.config.runtime(), watch::channel(false));
        let task = tokio::spawn(async move {
            runtime::run(&config, AppliesBelow { stop_at }, Sinks::new(), shutdown).await
        });
        (stop, task)
    }

    /// Restarts the service, publishes `more` events, and stops it once every
    /// record is committed; then checks that each event was applied once.
    async fn resume(self, more: u64) -> anyhow::Result<()> {
        let (stop, run) = self.run(i64::MAX);
        if more > 0 {
            publish(
                &self.stack,
                &self.topic,
                encoded(&self.codec, 1_200..1_200 + more)?,
            )
            .await?;
        }
        let end = 1_200 + more as i64;
        wait_for_committed(&self.stack, &self.group, &self.topic, &[(0, end - 1)]).await?;
        stop.send(true)?;
        let resumed = run.await??;
        assert_eq!(
            (self.applied, resumed.applied, resumed.duplicates),
            (500, end as u64 - 500, 0),
            "before the stop {} applied, after it {resumed:?}",
            self.applied
        );
        let applied = Store::open(self.state.path())?.scan(b"applied/")?;
        assert_eq!(applied.len() as i64, end, "each event applied once");
        Ok(())
    }
}

fn encoded(codec: &Codec, numbers: std::ops::Range<u64>) -> anyhow::Result<Vec<Vec<u8>>> {
    numbers
        .map(|n| Ok(codec.encode(&event(n, Op::Create))?))
        .collect()
}

/// tansu answers the resumed fetch from inside the batch with the next batch
/// (here the 100 later events): the runtime sees its read start past the
/// offset it expects and seeks back, so the rest of the batch is applied.
#[tokio::test]
async fn a_read_that_starts_past_the_expected_offset_is_sought_back() -> anyhow::Result<()> {
    StoppedInsideABatch::new().await?.resume(100).await
}

/// With no later batch tansu answers the resumed fetch with nothing at all:
/// the partition lags and reads nothing, and the runtime seeks it back.
#[tokio::test]
async fn a_partition_that_lags_and_reads_nothing_is_sought_back() -> anyhow::Result<()> {
    StoppedInsideABatch::new().await?.resume(0).await
}
