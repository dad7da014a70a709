//! The dedup service against the real broker: killed with SIGKILL again and again
//! while it works, its output still holds every distinct event exactly once.

use std::collections::HashMap;
use std::time::Duration;

use changewire_consumer::runtime::sinks::kafka::IDEMPOTENCY_HEADER;
use changewire_consumer::runtime::{StateChanges, Store};
use changewire_consumer::services::dedup;
use changewire_schemas::{Codec, Op};
use changewire_tests::servers::{free_port, PrivateBroker};
use changewire_tests::{create_topics, read_to_end, unique_name, workspace_binary, Stack};
use tokio::time::Instant;

use crate::consumer::{
    event, last_offsets, publish_keyed, start_service, terminate, wait_for_committed,
    wait_for_progress, RESUME_REWIND,
};

/// A `changewire-consumer` config for the dedup service.
fn dedup_config(
    stack: &Stack,
    prefix: &str,
    raw: &str,
    group: &str,
    state: &std::path::Path,
) -> String {
    format!(
        "[kafka]\nbrokers = {brokers:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         \"max.poll.interval.ms\" = \"10000\"\n[topics]\nprefix = {prefix:?}\n\
         [service]\nname = \"dedup\"\ngroup_id = {group:?}\nsubscribe = [{raw:?}]\n\
         state_dir = {state:?}\nresume_rewind = {RESUME_REWIND}\n[dedup]\n",
        brokers = stack.kafka_brokers
    )
}

/// 100,000 events of which 10,000 repeat an earlier id (same key, as a producer
/// retry would), SIGKILL at a quarter, half and three quarters done: every
/// distinct event is in the output topic exactly once, with its key and headers.
/// (It prints the service log when it fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_dedup_publishes_every_distinct_event_exactly_once() -> anyhow::Result<()> {
    const EVENTS: u64 = 100_000;
    const DISTINCT: usize = 90_000;
    // A broker of its own: group rebalances after each kill are slow to settle on a
    // broker the rest of the suite loads.
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let prefix = unique_name("dd");
    let raw = format!("{prefix}.src.public.orders");
    create_topics(&stack, &[&raw], 3).await?;
    // Every tenth event repeats the id of an earlier one.
    let ids = (0..EVENTS).map(|i| if i % 10 == 9 { i / 10 } else { i - i / 10 });
    let last = publish_events(&stack, &raw, ids).await?;

    let dir = tempfile::tempdir()?;
    let group = unique_name("dedup");
    let file = dir.path().join("dedup.toml");
    std::fs::write(
        &file,
        dedup_config(&stack, &prefix, &raw, &group, &dir.path().join("state")),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("dedup.log");
    let run = async {
        for quarter in 1..=3 {
            let service = start_service(&program, &file, &log)?;
            wait_for_progress(&stack, &group, &raw, 3, EVENTS * quarter / 4).await?;
            drop(service); // SIGKILL
        }
        let service = start_service(&program, &file, &log)?;
        wait_for_committed(&stack, &group, &raw, &last).await?;
        anyhow::Ok(service)
    };
    let service = match run.await {
        Ok(service) => service,
        Err(error) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for line in text.lines().filter(|l| !l.contains("CONFWARN")) {
                eprintln!("dedup: {line}");
            }
            return Err(error);
        }
    };
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    let rejoins = std::fs::read_to_string(&log)?.matches("rejoining").count();
    println!("instances that rejoined a group that left them without partitions: {rejoins}");

    assert_published_once(
        &stack,
        &format!("{prefix}.dedup.src.public.orders"),
        DISTINCT,
    )
    .await
}

/// Publishes a create event per number (key = the number); returns the last
/// offset per partition.
async fn publish_events(
    stack: &Stack,
    topic: &str,
    numbers: impl Iterator<Item = u64>,
) -> anyhow::Result<Vec<(i32, i64)>> {
    let codec = Codec::json()?;
    let records = numbers
        .map(|n| {
            Ok((
                n.to_string().into_bytes(),
                codec.encode(&event(n, Op::Create))?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(last_offsets(&publish_keyed(stack, topic, records).await?))
}

/// Reads the whole output topic: `distinct` events, each once, key = the event's
/// number, headers kept.
async fn assert_published_once(stack: &Stack, output: &str, distinct: usize) -> anyhow::Result<()> {
    let codec = Codec::json()?;
    let published = read_to_end(stack, output, Duration::from_secs(120)).await?;
    let mut copies: HashMap<String, usize> = HashMap::new();
    for record in &published {
        let event = codec.decode(record.value.as_deref().unwrap_or_default())?;
        *copies.entry(event.id.to_string()).or_default() += 1;
        let idempotency_key = format!("{}/{}/0", event.id, dedup::OUTPUT);
        assert_eq!(
            record.headers,
            vec![
                ("origin".to_owned(), Some(b"test".to_vec())),
                (
                    IDEMPOTENCY_HEADER.to_owned(),
                    Some(idempotency_key.into_bytes())
                )
            ],
            "headers kept, the idempotency key added"
        );
    }
    let repeated: Vec<_> = copies.iter().filter(|(_, &c)| c > 1).take(5).collect();
    assert!(
        repeated.is_empty(),
        "published more than once: {repeated:?}"
    );
    assert_eq!(copies.len(), distinct, "every distinct event published");
    assert_eq!(published.len(), distinct);
    Ok(())
}

/// Batches the service committed to sled, from `/metrics`.
async fn batches_committed(metrics_url: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(metrics_url).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("changewire_consumer_commit_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Polls the service's metrics until it committed `batches` batches to sled.
async fn wait_for_batches(metrics_url: &str, batches: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The endpoint answers once the service started; until then, poll on.
        let committed = batches_committed(metrics_url).await.unwrap_or(0);
        if committed >= batches {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{committed} batches committed, waited for {batches}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The broker stops answering while dedup publishes a batch, so the batch is
/// committed to sled but not confirmed; the service is then SIGKILLed. After the
/// restart, the recovery reads the output back and publishes only what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_recovers_a_batch_in_doubt_after_a_stalled_broker_and_sigkill() -> anyhow::Result<()>
{
    const EVENTS: u64 = 20_000;
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let prefix = unique_name("ddr");
    let raw = format!("{prefix}.src.public.orders");
    create_topics(&stack, &[&raw], 2).await?;
    let last = publish_events(&stack, &raw, 0..EVENTS).await?;

    let dir = tempfile::tempdir()?;
    let group = unique_name("dedup");
    let port = free_port()?;
    let file = dir.path().join("dedup.toml");
    // Small batches: many of them, so fetched records are still in hand when the
    // broker freezes however fast the service is.
    let config = dedup_config(&stack, &prefix, &raw, &group, &dir.path().join("state"))
        .replace("[dedup]\n", "max_batch = 200\n[dedup]\n");
    std::fs::write(
        &file,
        format!("{config}[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("dedup.log");
    let metrics = format!("http://127.0.0.1:{port}/metrics");

    let service = start_service(&program, &file, &log)?;
    // A batch committed to sled after the broker froze cannot be published: it is
    // in doubt. Whether one is in hand at the freeze depends on timing (under load
    // the service may be waiting on a fetch), so try again later in the stream.
    let mut in_doubt = false;
    // The service is fast and reads ahead: freeze as soon as it committed a batch,
    // while it still has most of the 100 batches' records in hand (then at later
    // points if it had none).
    for batches in [1, 10, 30] {
        if let Err(error) = wait_for_batches(&metrics, batches).await {
            anyhow::bail!(
                "{error:#}\nservice log:\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        broker.freeze()?;
        let at_freeze = batches_committed(&metrics).await?;
        // Shorter than the session timeout (6 s): a longer freeze makes the service
        // leave the group, and tansu 0.6 may then never let it back in.
        let deadline = Instant::now() + Duration::from_secs(4);
        while !in_doubt && Instant::now() < deadline {
            in_doubt = batches_committed(&metrics).await? > at_freeze;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if in_doubt {
            break;
        }
        broker.thaw()?;
    }
    anyhow::ensure!(
        in_doubt,
        "no batch committed after any of three broker freezes"
    );
    drop(service); // SIGKILL
    broker.thaw()?;

    let service = start_service(&program, &file, &log)?;
    wait_for_committed(&stack, &group, &raw, &last).await?;
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    let log = std::fs::read_to_string(&log)?;
    let recoveries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("in-doubt effects checked") && l.contains("sink=\"output\""))
        .collect();
    assert!(
        !recoveries.is_empty(),
        "the restart checked effects in doubt against the output"
    );
    assert_published_once(
        &stack,
        &format!("{prefix}.dedup.src.public.orders"),
        EVENTS as usize,
    )
    .await
}

/// An outbox entry as dedup versions before the runtime-owned outbox wrote it:
/// a marker, the count, then each record length-prefixed (id, topic,
/// partition, key presence and key, headers, payload).
fn legacy_entry(records: &[(String, String, i32, Vec<u8>)]) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    let mut entry = b"\xB1list".to_vec();
    entry.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (id, topic, partition, payload) in records {
        let mut record = Vec::new();
        field(&mut record, id.as_bytes());
        field(&mut record, topic.as_bytes());
        field(&mut record, &partition.to_be_bytes());
        field(&mut record, &[1]);
        field(&mut record, id.as_bytes());
        field(&mut record, &1u32.to_be_bytes());
        field(&mut record, b"origin");
        field(&mut record, b"test");
        field(&mut record, payload);
        field(&mut entry, &record);
    }
    entry
}

/// A store an earlier version left with records in its own outbox (committed,
/// not confirmed): the new version publishes them at its first start and
/// clears the old keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_publishes_what_an_earlier_version_left_in_its_outbox() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let prefix = unique_name("ddl");
    let raw = format!("{prefix}.src.public.orders");
    let output = format!("{prefix}.dedup.src.public.orders");
    create_topics(&stack, &[&raw, &output], 2).await?;
    let codec = Codec::json()?;
    let left: Vec<(String, String, i32, Vec<u8>)> = (0..3)
        .map(|n| {
            let event = event(n, Op::Create);
            Ok((
                event.id.to_string(),
                output.clone(),
                (n % 2) as i32,
                codec.encode(&event)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    {
        let store = Store::open(&state)?;
        let mut changes = StateChanges::default();
        changes.put(b"outbox/\x00\x00\x00\x01".to_vec(), legacy_entry(&left));
        changes.put(b"written/x".to_vec(), 5i64.to_be_bytes().to_vec());
        store.apply_lazily(changes)?;
    }
    let group = unique_name("dedup");
    let file = dir.path().join("dedup.toml");
    std::fs::write(&file, dedup_config(&stack, &prefix, &raw, &group, &state))?;
    let log = dir.path().join("dedup.log");
    let service = start_service(&workspace_binary("changewire-consumer")?, &file, &log)?;
    let reader = changewire_tests::TestConsumer::from_beginning(&stack, &output)?;
    let published = reader.read_exactly(3, Duration::from_secs(60)).await?;
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");
    let mut ids: Vec<String> = published
        .iter()
        .map(|r| {
            codec
                .decode(r.value.as_deref().unwrap_or_default())
                .map(|e| e.id.to_string())
        })
        .collect::<Result<_, _>>()?;
    ids.sort();
    let mut expected: Vec<String> = left.iter().map(|(id, ..)| id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected, "every record left behind published");
    for record in &published {
        assert_eq!(
            record.header("origin").as_deref(),
            Some("test"),
            "headers kept"
        );
    }
    let store = Store::open(&state)?;
    assert!(
        store.scan(b"outbox/")?.is_empty() && store.scan(b"written/")?.is_empty(),
        "old keys cleared"
    );
    Ok(())
}
