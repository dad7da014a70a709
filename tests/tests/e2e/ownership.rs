//! Partition ownership in the consumer runtime: a partition that moves away and
//! back does not replay the other instance's work; a partition revoked while it
//! waits for a retry advances when it comes back; partitions of killed members
//! get an owner again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use changewire_consumer::config::ConsumerConfig;
use changewire_consumer::runtime::sinks::kafka::{KafkaSink, Oversized, IDEMPOTENCY_HEADER};
use changewire_consumer::runtime::{
    self, AssignmentMode, ConsumerMetrics, Context, Effect, Handler, HandlerError, Record,
    ServiceState, SinkLabel, Sinks, Store,
};
use changewire_schemas::http::HttpConfig;
use changewire_schemas::{ChangeEvent, Codec, EventId, Op};
use changewire_tests::servers::{free_port, PrivateBroker};
use changewire_tests::{create_topics, read_to_end, unique_name, workspace_example, Stack};
use tokio::sync::watch;

use crate::consumer::{
    event, last_offsets, publish, service_config, start_service, terminate, wait_for_committed,
    write_config,
};
use crate::rebalance::{metric, wait_for_metric, APPLIED, ASSIGNED};

const PARTITIONS: i32 = 2;

/// The numbers of the events an instance applied (its `applied/<id>` keys).
fn applied_by(state: &Path, numbers: std::ops::Range<u64>) -> anyhow::Result<BTreeSet<u64>> {
    let store = Store::open(state)?;
    let mut applied = BTreeSet::new();
    for n in numbers {
        let id = EventId::postgres("src", 0x100 + n, 1);
        if store.get(format!("applied/{id}").as_bytes())?.is_some() {
            applied.insert(n);
        }
    }
    Ok(applied)
}

fn encode(range: std::ops::Range<u64>) -> anyhow::Result<Vec<Vec<u8>>> {
    let codec = Codec::json()?;
    Ok(range
        .map(|n| codec.encode(&event(n, Op::Create)))
        .collect::<Result<Vec<_>, _>>()?)
}

/// An instance of the count_events example: its config file, metrics port and
/// state directory.
struct Instance {
    file: PathBuf,
    port: u16,
    state: PathBuf,
    log: PathBuf,
}

fn instance(dir: &Path, name: &str, mut config: ConsumerConfig) -> anyhow::Result<Instance> {
    let state = dir.join(format!("state-{name}"));
    config.service.state_dir = state.clone();
    let port = free_port()?;
    config.http = Some(HttpConfig {
        listen: ([127, 0, 0, 1], port).into(),
        token: None,
    });
    Ok(Instance {
        file: write_config(dir, name, &config)?,
        port,
        state,
        log: dir.join(format!("{name}.log")),
    })
}

/// A -> B -> A: A applies the first events of every partition; B joins and
/// applies the second batch of the partitions it gets; B leaves and its
/// partitions come back to A. A must start them where B stopped: no event of
/// the second batch is applied by both (before the fix A restarted from its own
/// stale sled offset and applied all of B's again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_comes_back_does_not_replay_the_other_instances_work() -> anyhow::Result<()>
{
    const BATCH: u64 = 3_000;
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let (prefix, topic) = (unique_name("own"), unique_name("input"));
    create_topics(&stack, &[&topic], PARTITIONS).await?;
    let dir = tempfile::tempdir()?;
    let config = service_config(&stack, &prefix, &topic, dir.path());
    let group = config.group_id();
    let a = instance(dir.path(), "a", config.clone())?;
    let b = instance(dir.path(), "b", config)?;
    let program = workspace_example("count_events")?;

    let first = publish(&stack, &topic, encode(0..BATCH)?).await?;
    let service_a = start_service(&program, &a.file, &a.log)?;
    wait_for_committed(&stack, &group, &topic, &last_offsets(&first)).await?;
    let service_b = start_service(&program, &b.file, &b.log)?;
    wait_for_metric(b.port, ASSIGNED, "", 1).await?;
    wait_for_metric(a.port, ASSIGNED, "", 1).await?;
    let second = publish(&stack, &topic, encode(BATCH..2 * BATCH)?).await?;
    wait_for_committed(&stack, &group, &topic, &last_offsets(&second)).await?;
    wait_for_metric(b.port, APPLIED, "applied", 1).await?;
    assert!(terminate(service_b)?.success(), "B exits cleanly");
    let third = publish(&stack, &topic, encode(2 * BATCH..3 * BATCH)?).await?;
    wait_for_committed(&stack, &group, &topic, &last_offsets(&third)).await?;
    assert!(terminate(service_a)?.success(), "A exits cleanly");

    let by_a = applied_by(&a.state, 0..3 * BATCH)?;
    let by_b = applied_by(&b.state, 0..3 * BATCH)?;
    let second_by_b: BTreeSet<u64> = by_b
        .iter()
        .copied()
        .filter(|n| (BATCH..2 * BATCH).contains(n))
        .collect();
    assert!(
        !second_by_b.is_empty(),
        "B applied part of the second batch"
    );
    let twice: Vec<u64> = second_by_b.intersection(&by_a).copied().collect();
    let log = std::fs::read_to_string(&a.log)?;
    assert!(
        twice.is_empty(),
        "{} events B applied were applied again by A after the hand-over back, e.g. {:?}\nA's log:\n{}",
        twice.len(),
        &twice[..twice.len().min(5)],
        log.lines().filter(|l| l.contains("starting from") || l.contains("another instance")).collect::<Vec<_>>().join("\n")
    );
    assert!(
        log.contains("another instance went further"),
        "A noticed the take-over"
    );
    let union: BTreeSet<u64> = by_a.union(&by_b).copied().collect();
    assert_eq!(union.len() as u64, 3 * BATCH, "every event applied");
    Ok(())
}

/// Fails every event as unavailable while `down` is set; records what it applied.
struct Dependent {
    down: Arc<AtomicBool>,
    applied: Arc<Mutex<BTreeSet<String>>>,
}

impl Handler for Dependent {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(HandlerError::unavailable("the dependency is down"));
        }
        context.put(format!("applied/{}", event.id), "1");
        self.applied
            .lock()
            .expect("lock")
            .insert(event.id.to_string());
        Ok(())
    }
}

/// A waits on an unavailable dependency, its partitions paused for retries;
/// B joins and leaves, so A's partitions are revoked while paused and assigned
/// again. Once the dependency is back, A applies new events on every partition
/// (before the fix a partition revoked while paused stayed paused for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_revoked_while_paused_advances_when_it_comes_back() -> anyhow::Result<()> {
    const BATCH: u64 = 200;
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let (prefix, topic) = (unique_name("pause"), unique_name("input"));
    create_topics(&stack, &[&topic], PARTITIONS).await?;
    let dir = tempfile::tempdir()?;
    let config = service_config(&stack, &prefix, &topic, &dir.path().join("state-a"));
    let group = config.group_id();
    let b = instance(dir.path(), "b", config.clone())?;
    publish(&stack, &topic, encode(0..BATCH)?).await?;

    let down = Arc::new(AtomicBool::new(true));
    let applied = Arc::new(Mutex::new(BTreeSet::new()));
    let handler = Dependent {
        down: down.clone(),
        applied: applied.clone(),
    };
    let metrics = Arc::new(ConsumerMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let runtime_config = config.runtime();
    let observed = metrics.clone();
    let a = tokio::spawn(async move {
        runtime::run_observed(&runtime_config, handler, Sinks::new(), shutdown, observed).await
    });
    poll_until("A parks both partitions", || metrics.retries.get() >= 4).await?;
    assert_eq!(
        metrics.state(),
        ServiceState::Unavailable,
        "/health says what waits"
    );

    let program = workspace_example("count_events")?;
    let service_b = start_service(&program, &b.file, &b.log)?;
    wait_for_metric(b.port, ASSIGNED, "", 1).await?;
    assert!(terminate(service_b)?.success(), "B exits cleanly");
    poll_until("A owns every partition again", || {
        metrics.partitions_assigned.get() == i64::from(PARTITIONS)
    })
    .await?;
    down.store(false, Ordering::SeqCst);
    let second = publish(&stack, &topic, encode(BATCH..2 * BATCH)?).await?;
    wait_for_committed(&stack, &group, &topic, &last_offsets(&second)).await?;
    stop.send(true)?;
    a.await??;

    let ids = applied.lock().expect("lock").clone();
    let by_a: BTreeSet<u64> = (0..2 * BATCH)
        .filter(|&n| ids.contains(&EventId::postgres("src", 0x100 + n, 1).to_string()))
        .collect();
    let second_by_a = by_a.iter().filter(|n| **n >= BATCH).count() as u64;
    assert_eq!(
        second_by_a, BATCH,
        "A applied every new event, on every partition"
    );
    let by_b = applied_by(&b.state, 0..BATCH)?;
    let union: BTreeSet<u64> = by_a.union(&by_b).copied().collect();
    assert_eq!(union.len() as u64, 2 * BATCH, "nothing lost");
    Ok(())
}

/// Waits until `instances` own `partitions` between them.
async fn wait_for_assigned(instances: &[&Instance], partitions: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = 0;
        for instance in instances {
            owned += metric(instance.port, ASSIGNED, "").await.unwrap_or(0);
        }
        if owned == partitions {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{owned} of {partitions} partitions owned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `done` every 20 ms for up to 60 s.
async fn poll_until(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Two instances in one group, each SIGKILLed and restarted while events are
/// published: every partition gets an owner again (on tansu the group could
/// settle with a partition assigned to nobody; an instance notices after
/// `service.unowned_after_s` and rejoins), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_of_killed_members_get_an_owner_again() -> anyhow::Result<()> {
    const EVENTS: u64 = 12_000;
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let (prefix, topic) = (unique_name("kill"), unique_name("input"));
    create_topics(&stack, &[&topic], 3).await?;
    let dir = tempfile::tempdir()?;
    let mut config = service_config(&stack, &prefix, &topic, dir.path());
    config.service.unowned_after_s = 10;
    let group = config.group_id();
    let a = instance(dir.path(), "a", config.clone())?;
    let b = instance(dir.path(), "b", config)?;
    let program = workspace_example("count_events")?;
    let service_a = start_service(&program, &a.file, &a.log)?;
    let service_b = start_service(&program, &b.file, &b.log)?;
    wait_for_assigned(&[&a, &b], 3).await?;
    let publishing = {
        let (stack, topic) = (stack.clone(), topic.clone());
        tokio::spawn(async move {
            let mut landed = Vec::new();
            for chunk in 0..12 {
                landed.extend(
                    publish(&stack, &topic, encode(chunk * 1_000..(chunk + 1) * 1_000)?).await?,
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok(landed)
        })
    };
    wait_for_metric(a.port, APPLIED, "applied", 1).await?;
    drop(service_a); // SIGKILL
    let service_a = start_service(&program, &a.file, &a.log)?;
    wait_for_assigned(&[&a, &b], 3).await?;
    drop(service_b); // SIGKILL
    let service_b = start_service(&program, &b.file, &b.log)?;
    let landed = publishing.await??;
    if let Err(error) = wait_for_committed(&stack, &group, &topic, &last_offsets(&landed)).await {
        let logs = [&a.log, &b.log].map(|log| std::fs::read_to_string(log).unwrap_or_default());
        anyhow::bail!("{error:#}\nA:\n{}\nB:\n{}", logs[0], logs[1]);
    }
    let rejoins: usize = [&a.log, &b.log]
        .iter()
        .map(|log| std::fs::read_to_string(log).map(|t| t.matches("rejoining the group").count()))
        .sum::<Result<usize, _>>()?;
    println!("rejoins after partitions went without an owner: {rejoins}");
    for (service, log) in [(service_a, &a.log), (service_b, &b.log)] {
        let status = terminate(service)?;
        let text = std::fs::read_to_string(log)?;
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        assert!(status.success(), "{status}: {tail:#?}");
    }
    let union: BTreeSet<u64> = applied_by(&a.state, 0..EVENTS)?
        .union(&applied_by(&b.state, 0..EVENTS)?)
        .copied()
        .collect();
    assert_eq!(union.len() as u64, EVENTS, "nothing lost");
    Ok(())
}

/// Applies events (recording their partitions), fails fatally on `fatal_at`;
/// counts ticks in its state and emits one effect per tick to `topic`.
struct Ticker {
    topic: String,
    fatal_at: Option<String>,
    partitions: Arc<Mutex<BTreeSet<i32>>>,
}

impl Handler for Ticker {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        record: &Record,
        _: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if self.fatal_at.as_deref() == Some(event.id.as_str()) {
            return Err(HandlerError::fatal(
                "the store holds a value this version cannot read",
            ));
        }
        self.partitions
            .lock()
            .expect("lock")
            .insert(record.partition);
        Ok(())
    }

    async fn tick(
        &self,
        _: std::time::SystemTime,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let ticks = context
            .get(b"ticks")?
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        context.put("ticks", ticks.to_string());
        let effect = Effect {
            destination: Some(self.topic.clone()),
            ..Effect::new(ticks.to_string().into_bytes())
        };
        context.emit("ticks", effect)?;
        Ok(())
    }
}

/// `assignment = "static"` with `partitions = [1]`: only partition 1 is read,
/// and no offsets go to a group; `tick` runs on its interval, its state change
/// and its effect committed together (every tick counted in sled has its
/// record in the tick topic, under a `tick/` idempotency key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_assignment_reads_its_partitions_and_ticks_commit_state_and_effects(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, topic, ticks_topic) = (
        unique_name("static"),
        unique_name("input"),
        unique_name("ticks"),
    );
    create_topics(&stack, &[&topic], 2).await?;
    create_topics(&stack, &[&ticks_topic], 1).await?;
    let landed = publish(&stack, &topic, encode(0..100)?).await?;
    let on_partition_1 = landed.iter().filter(|(p, _)| *p == 1).count() as u64;
    let dir = tempfile::tempdir()?;
    let mut config = service_config(&stack, &prefix, &topic, dir.path()).runtime();
    config.service.assignment = AssignmentMode::Static;
    config.service.partitions = Some(vec![1]);
    config.service.tick_interval_ms = Some(100);
    let partitions = Arc::new(Mutex::new(BTreeSet::new()));
    let handler = Ticker {
        topic: ticks_topic.clone(),
        fatal_at: None,
        partitions: partitions.clone(),
    };
    let sinks = Sinks::new().with(
        "ticks",
        KafkaSink::new("ticks", &config, Oversized::Reject)?,
    );
    let metrics = Arc::new(ConsumerMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let (observed, group) = (metrics.clone(), config.group_id());
    let service = tokio::spawn(async move {
        runtime::run_observed(&config, handler, sinks, shutdown, observed).await
    });
    poll_until("partition 1 read and 5 ticks", || {
        metrics.records_read() >= on_partition_1
            && metrics
                .effects_delivered
                .get_or_create(&SinkLabel {
                    sink: "ticks".into(),
                })
                .get()
                >= 5
    })
    .await?;
    stop.send(true)?;
    service.await??;

    assert_eq!(
        *partitions.lock().expect("lock"),
        BTreeSet::from([1]),
        "only the configured partition"
    );
    assert_eq!(metrics.records_read(), on_partition_1);
    let ticks: u64 =
        String::from_utf8(Store::open(dir.path())?.get(b"ticks")?.unwrap_or_default())?.parse()?;
    let records = read_to_end(&stack, &ticks_topic, Duration::from_secs(30)).await?;
    let values: Vec<u64> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(
        values,
        (1..=ticks).collect::<Vec<_>>(),
        "one record per committed tick, in order"
    );
    assert!(records.iter().all(|r| r
        .header(IDEMPOTENCY_HEADER)
        .is_some_and(|k| k.starts_with("tick/"))));
    let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("group.id", &group)
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(&topic, 1);
    let committed =
        rdkafka::consumer::Consumer::committed_offsets(&client, tpl, Duration::from_secs(10))?;
    assert!(
        committed
            .elements()
            .iter()
            .all(|e| e.offset() == rdkafka::Offset::Invalid),
        "no group offsets in static mode"
    );
    Ok(())
}

/// A handler's fatal error stops the service with that error: nothing is
/// dead-lettered, the events before it stay committed.
#[tokio::test]
async fn a_fatal_handler_error_stops_the_service_without_dead_lettering() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, topic) = (unique_name("fatal"), unique_name("input"));
    create_topics(&stack, &[&topic], 1).await?;
    publish(&stack, &topic, encode(0..20)?).await?;
    let dir = tempfile::tempdir()?;
    let config = service_config(&stack, &prefix, &topic, dir.path()).runtime();
    let handler = Ticker {
        topic: String::new(),
        fatal_at: Some(event(7, Op::Create).id.to_string()),
        partitions: Arc::default(),
    };
    let (_stop, shutdown) = watch::channel(false);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        runtime::run(&config, handler, Sinks::new(), shutdown),
    )
    .await?;
    let error = result.expect_err("the service stops");
    assert!(
        matches!(error, runtime::RuntimeError::Fatal(_)),
        "{error:?}"
    );
    assert!(error.to_string().contains("cannot read"), "{error}");
    let store = Store::open(dir.path())?;
    assert!(
        store.offset(&topic, 0)?.is_none_or(|next| next <= 7),
        "nothing past the failed event committed"
    );
    let dead = read_to_end(
        &stack,
        &format!("{prefix}.dlq.svc"),
        Duration::from_secs(30),
    )
    .await?;
    assert!(dead.is_empty(), "nothing dead-lettered");
    Ok(())
}
