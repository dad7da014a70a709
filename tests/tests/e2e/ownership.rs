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
use changewire_consumer::runtime::{
    self, ConsumerMetrics, Context, Handler, HandlerError, Record, ServiceState, Sinks, Store,
};
use changewire_schemas::http::HttpConfig;
use changewire_schemas::{ChangeEvent, Codec, EventId, Op};
use tokio::sync::watch;
use changewire_tests::servers::{free_port, PrivateBroker};
use changewire_tests::{create_topics, unique_name, workspace_example, Stack};

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
async fn a_partition_that_comes_back_does_not_replay_the_other_instances_work() -> anyhow::Result<()> {
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
    let second_by_b: BTreeSet<u64> = by_b.iter().copied().filter(|n| (BATCH..2 * BATCH).contains(n)).collect();
    assert!(!second_by_b.is_empty(), "B applied part of the second batch");
    let twice: Vec<u64> = second_by_b.intersection(&by_a).copied().collect();
    let log = std::fs::read_to_string(&a.log)?;
    assert!(
        twice.is_empty(),
        "{} events B applied were applied again by A after the hand-over back, e.g. {:?}\nA's log:\n{}",
        twice.len(),
        &twice[..twice.len().min(5)],
        log.lines().filter(|l| l.contains("starting from") || l.contains("another instance")).collect::<Vec<_>>().join("\n")
    );
    assert!(log.contains("another instance went further"), "A noticed the take-over");
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
        self.applied.lock().expect("lock").insert(event.id.to_string());
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
    assert_eq!(metrics.state(), ServiceState::Unavailable, "/health says what waits");

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
    assert_eq!(second_by_a, BATCH, "A applied every new event, on every partition");
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
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{owned} of {partitions} partitions owned");
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
    let mut service_a = start_service(&program, &a.file, &a.log)?;
    let mut service_b = start_service(&program, &b.file, &b.log)?;
    wait_for_assigned(&[&a, &b], 3).await?;
    let publishing = {
        let (stack, topic) = (stack.clone(), topic.clone());
        tokio::spawn(async move {
            let mut landed = Vec::new();
            for chunk in 0..12 {
                landed.extend(publish(&stack, &topic, encode(chunk * 1_000..(chunk + 1) * 1_000)?).await?);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok(landed)
        })
    };
    wait_for_metric(a.port, APPLIED, "applied", 1).await?;
    drop(std::mem::replace(&mut service_a, start_service(&program, &a.file, &a.log)?));
    wait_for_metric(a.port, ASSIGNED, "", 1).await?;
    drop(std::mem::replace(&mut service_b, start_service(&program, &b.file, &b.log)?));
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
        let problems: Vec<&str> = text.lines().filter(|l| l.contains("panicked") || l.contains("ERROR")).collect();
        assert!(status.success(), "{status}: {problems:?}");
    }
    let union: BTreeSet<u64> = applied_by(&a.state, 0..EVENTS)?
        .union(&applied_by(&b.state, 0..EVENTS)?)
        .copied()
        .collect();
    assert_eq!(union.len() as u64, EVENTS, "nothing lost");
    Ok(())
}
