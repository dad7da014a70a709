//! Producer benchmark:
//! `cargo run --release -p changewire-tests --bin bench-postgres -- [ROWS] [ROWS_PER_TX] [LIVE_REPEATS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 0. times the CPU one change costs from decoded tuple to encoded event, the
//!    producer's way against building the row as a `serde_json::Value` (see
//!    [`encode`]);
//! 1. loads ROWS row changes (default 1,000,000: 60% inserts, 30% updates, 10%
//!    deletes, ROWS_PER_TX per transaction, default 1,000) while two pgoutput slots
//!    hold the WAL;
//! 2. times `pg_recvlogical` reading it to /dev/null (the walsender's limit for one
//!    slot; it does not decode);
//! 3. times changewire from the same WAL to Kafka-acknowledged (the producer's
//!    confirmed LSN reaching the end of the load), with its CPU per change;
//! 4. measures commit-to-consumer latency at a steady 10,000 changes/s;
//! 5. end to end, live: from the start of a second load of ROWS changes until every
//!    event is readable by a consumer, against `pg_recvlogical` streaming the same
//!    load (on a table of its own, before) until its walsender sent the last of it;
//!    with the CPU time the bench process, PostgreSQL and the broker spent meanwhile;
//!    LIVE_REPEATS pairs (default 3), alternating, and their median (single live runs
//!    vary by +-15% on 2 cores).
//! 6. the Kafka floor: ROWS insert events written, encoded and published as the
//!    producer does it, then read back, with no database, and the best live time
//!    two cores allow (see [`floor`]).
//!
//! `BENCH_KAFKA_PROPERTIES=name=value,...` passes librdkafka properties to the
//! benchmarked producer (e.g. `compression.type=none`).
//!
//! Every insert and update carries a jsonb document of numbers, so the exact JSON
//! numbers are part of what is measured.

mod encode;
mod floor;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use changewire_kafka::Publisher;
use changewire_producer::checkpoint::SledCheckpoints;
use changewire_producer::postgres::{PostgresConfig, PostgresSource, SnapshotMode};
use changewire_schemas::{Codec, TopicNames};
use changewire_tests::{create_pgoutput_slot, unique_name, Stack, TestConsumer, TestDatabase};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

const LATENCY_RATE: u64 = 10_000;
/// The benchmarked producer's unacknowledged records at most (its lane limit).
const MAX_IN_FLIGHT: usize = 100_000;
const LATENCY_SECONDS: u64 = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arg = |n: usize, default: i64| {
        std::env::args()
            .nth(n)
            .map(|a| a.parse::<i64>())
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let rows = arg(1, 1_000_000)?;
    let per_tx = arg(2, 1_000)?;
    let repeats = arg(3, 3)?;
    ensure!(
        rows > 0 && per_tx > 0 && repeats > 0,
        "ROWS, ROWS_PER_TX and LIVE_REPEATS must be positive"
    );
    let encode = encode::measure()?;
    let stack = Stack::from_env();
    let db = TestDatabase::create(&stack).await?;
    let client = db.connect().await?;
    client
        .batch_execute(
            "CREATE TABLE bench (id bigint PRIMARY KEY, n int, note text, doc jsonb);
             CREATE TABLE live_theirs (LIKE bench INCLUDING ALL);
             CREATE TABLE live_ours (LIKE bench INCLUDING ALL);
             CREATE PUBLICATION changewire_bench FOR ALL TABLES",
        )
        .await?;
    let ours = create_pgoutput_slot(&client).await?;
    let theirs = create_pgoutput_slot(&client).await?;

    let started = Instant::now();
    let changes = load(&client, "bench", rows, per_tx).await?;
    let end_lsn: String = changewire_tests::current_wal_lsn(&client).await?;
    println!(
        "loaded {changes} changes in {:.1} s (end LSN {end_lsn})",
        started.elapsed().as_secs_f64()
    );

    let recvlogical = time_pg_recvlogical(&db, &theirs, &end_lsn)?;
    let prefix = unique_name("bench");
    let cpu_before = CpuTimes::now();
    let (ours_time, peak_rss, running) =
        time_changewire(&stack, &db, &ours, &prefix, &end_lsn).await?;
    let producer_cpu = CpuTimes::now().since(&cpu_before).bench;
    let (p50, p99, samples) = latency(&stack, &db, &prefix).await?;
    running.stop.send(true)?;
    running.task.await??;
    for slot in [&ours, &theirs] {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await?;
    }
    let mut live = Vec::new();
    for _ in 0..repeats {
        let theirs = live_pg_recvlogical(&db, rows, per_tx).await?;
        live.push((theirs, live_changewire(&stack, &db, rows, per_tx).await?));
    }

    let floor = floor::KafkaFloor::measure(&stack, rows).await?;

    let rate = |d: Duration| changes as f64 / d.as_secs_f64();
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| row changes | {changes} |");
    println!(
        "| CPU per change, tuple -> encoded event: rows written once / via serde_json::Value / ratio | {:.0} ns / {:.0} ns / {:.2} |",
        encode.ours_ns,
        encode.baseline_ns,
        encode.baseline_ns / encode.ours_ns
    );
    println!(
        "| pg_recvlogical (no decoding, /dev/null) | {:.0} changes/s ({:.2} s) |",
        rate(recvlogical),
        recvlogical.as_secs_f64()
    );
    println!(
        "| changewire WAL -> Kafka acknowledged | {:.0} changes/s ({:.2} s) |",
        rate(ours_time),
        ours_time.as_secs_f64()
    );
    println!(
        "| ratio changewire / pg_recvlogical | {:.2} |",
        recvlogical.as_secs_f64() / ours_time.as_secs_f64()
    );
    println!(
        "| producer CPU per change, WAL -> Kafka (bench process, no loader or reader) | {:.2} us |",
        producer_cpu.as_secs_f64() * 1e6 / changes as f64
    );
    println!("| commit -> consumer latency at {LATENCY_RATE}/s | p50 {p50} ms, p99 {p99} ms ({samples} events) |");
    println!(
        "| peak RSS of the bench process (producer + loader) | {} MiB |",
        peak_rss / 1024
    );
    print_live(&live, changes);
    floor.print(&live, changes);
    Ok(())
}

/// One row per live pair, then the medians.
fn print_live(live: &[(TheirLiveRun, LiveRun)], changes: i64) {
    println!();
    println!("| live run | load start -> pg_recvlogical sent all (PostgreSQL CPU s) | load start -> all readable | ratio | changewire's load done / all acknowledged | CPU s: bench / PostgreSQL / broker | bench CPU per change |");
    println!("|---|---|---|---|---|---|---|");
    let per_change = |run: &LiveRun| run.cpu.bench.as_secs_f64() * 1e6 / changes as f64;
    let ratio = |theirs: &TheirLiveRun, ours: &LiveRun| {
        theirs.elapsed.as_secs_f64() / ours.elapsed.as_secs_f64()
    };
    for (i, (theirs, ours)) in live.iter().enumerate() {
        println!(
            "| {} | {:.2} s ({:.1}) | {:.2} s | {:.2} | {:.2} s / {:.2} s | {:.1} / {:.1} / {:.1} | {:.1} us |",
            i + 1,
            theirs.elapsed.as_secs_f64(),
            theirs.postgres_cpu.as_secs_f64(),
            ours.elapsed.as_secs_f64(),
            ratio(theirs, ours),
            ours.loaded.as_secs_f64(),
            ours.acknowledged.as_secs_f64(),
            ours.cpu.bench.as_secs_f64(),
            ours.cpu.postgres.as_secs_f64(),
            ours.cpu.broker.as_secs_f64(),
            per_change(ours)
        );
    }
    let ratio = median(
        live.iter()
            .map(|(theirs, ours)| ratio(theirs, ours))
            .collect(),
    );
    let cpu = median(live.iter().map(|(_, ours)| per_change(ours)).collect());
    println!("| median | | | {ratio:.2} | | | {cpu:.1} us |");
}

/// Loads `rows` changes into `table` (6 inserts, 3 updates, 1 delete per 10 rows) in
/// statements of `per_tx` rows, one transaction each; with `per_tx >= rows` all of
/// them form one transaction. Each row carries a jsonb document of three numbers.
async fn load(
    client: &tokio_postgres::Client,
    table: &str,
    rows: i64,
    per_tx: i64,
) -> anyhow::Result<i64> {
    let inserts = rows * 6 / 10;
    let updates = rows * 3 / 10;
    let deletes = rows - inserts - updates;
    let statements = [
        (format!("INSERT INTO {table} SELECT g, 0, md5(g::text), jsonb_build_object('id', g, 'price', g * 1.0000001, 'ratio', g / 7.0) FROM generate_series($1::bigint, $2::bigint) g"), 1, inserts),
        (format!("UPDATE {table} SET n = n + 1 WHERE id BETWEEN $1 AND $2"), 1, updates),
        (format!("DELETE FROM {table} WHERE id BETWEEN $1 AND $2"), inserts - deletes + 1, inserts),
    ];
    client.batch_execute("BEGIN").await?;
    for (sql, from, to) in statements {
        let mut first = from;
        while first <= to {
            let last = (first + per_tx - 1).min(to);
            client.execute(&sql, &[&first, &last]).await?;
            if per_tx < rows {
                client.batch_execute("COMMIT; BEGIN").await?;
            }
            first = last + 1;
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(rows)
}

fn pg_recvlogical() -> anyhow::Result<std::path::PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pg_recvlogical")))
        .filter(|p| p.is_file())
        .max()
        .context("pg_recvlogical not found")
}

fn time_pg_recvlogical(db: &TestDatabase, slot: &str, end_lsn: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new(pg_recvlogical()?)
        .args([
            "-d",
            &db.url,
            "--slot",
            slot,
            "--start",
            "--endpos",
            end_lsn,
            "-f",
            "/dev/null",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=changewire_bench",
            "--no-loop",
        ])
        .status()?;
    ensure!(status.success(), "pg_recvlogical failed");
    Ok(started.elapsed())
}

/// `pg_recvlogical` streams while a load runs: from the load's start until its
/// walsender has sent everything up to the load's end.
async fn live_pg_recvlogical(
    db: &TestDatabase,
    rows: i64,
    per_tx: i64,
) -> anyhow::Result<TheirLiveRun> {
    let client = db.connect().await?;
    client.batch_execute("TRUNCATE live_theirs").await?;
    let slot = create_pgoutput_slot(&client).await?;
    let mut receiver = Command::new(pg_recvlogical()?)
        .args([
            "-d",
            &db.url,
            "--slot",
            &slot,
            "--start",
            "-f",
            "/dev/null",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=changewire_bench",
        ])
        .spawn()?;
    wait_until(
        &client,
        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
        &slot,
    )
    .await?;
    let (cpu_before, started) = (CpuTimes::now(), Instant::now());
    load(&client, "live_theirs", rows, per_tx).await?;
    let end_lsn: String = client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    let sent = "SELECT coalesce(bool_or(r.sent_lsn >= $1::text::pg_lsn), false) \
                FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
                WHERE s.slot_name = $2";
    while !client
        .query_one(sent, &[&end_lsn, &slot])
        .await?
        .get::<_, bool>(0)
    {
        ensure!(receiver.try_wait()?.is_none(), "pg_recvlogical stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let cpu = CpuTimes::now().since(&cpu_before);
    receiver.kill()?;
    receiver.wait()?;
    wait_until(
        &client,
        "SELECT NOT active FROM pg_replication_slots WHERE slot_name = $1",
        &slot,
    )
    .await?;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(TheirLiveRun {
        elapsed,
        postgres_cpu: cpu.postgres,
    })
}

/// What the live phase measured for `pg_recvlogical`.
struct TheirLiveRun {
    /// From the load's start until the walsender sent its end.
    elapsed: Duration,
    /// What PostgreSQL (the loading backend and the walsender) spent meanwhile.
    postgres_cpu: Duration,
}

/// Polls `query` (one bool column, `$1` = `arg`) until it is true.
async fn wait_until(client: &tokio_postgres::Client, query: &str, arg: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .query_opt(query, &[&arg])
        .await?
        .is_some_and(|row| row.get::<_, bool>(0))
    {
        ensure!(Instant::now() < deadline, "timed out on: {query}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// CPU time spent by the parts of a run.
#[derive(Default)]
struct CpuTimes {
    bench: Duration,
    postgres: Duration,
    broker: Duration,
}

impl CpuTimes {
    fn now() -> Self {
        let mut times = Self {
            bench: changewire_tests::cpu_time("self"),
            ..Self::default()
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            match comm.trim() {
                "postgres" => times.postgres += changewire_tests::cpu_time(&pid),
                "tansu" => times.broker += changewire_tests::cpu_time(&pid),
                _ => {}
            }
        }
        times
    }

    /// CPU seconds of the bench process and the broker together.
    fn bench_and_broker(&self) -> f64 {
        (self.bench + self.broker).as_secs_f64()
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            bench: self.bench.saturating_sub(earlier.bench),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            broker: self.broker.saturating_sub(earlier.broker),
        }
    }
}

/// What the live end-to-end phase measured for changewire.
struct LiveRun {
    /// From the load's start until every event was readable.
    elapsed: Duration,
    /// Until the load committed its last transaction.
    loaded: Duration,
    /// Until the producer had every event acknowledged by the broker.
    acknowledged: Duration,
    cpu: CpuTimes,
}

/// changewire streams while a load runs, and a consumer reads its topic: from the
/// load's start until the consumer has read every change.
async fn live_changewire(
    stack: &Stack,
    db: &TestDatabase,
    rows: i64,
    per_tx: i64,
) -> anyhow::Result<LiveRun> {
    let client = db.connect().await?;
    client.batch_execute("TRUNCATE live_ours").await?;
    let slot = create_pgoutput_slot(&client).await?;
    let prefix = unique_name("live");
    let topic = format!("{prefix}.bench.public.live_ours");
    changewire_tests::create_topics(stack, &[&topic], 3).await?;
    let consumer = TestConsumer::from_beginning(stack, &topic)?;
    let running = start_source(stack, db, &slot, &prefix)?;
    wait_until(
        &client,
        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
        &slot,
    )
    .await?;
    // A streaming producer already has its broker connections and topic metadata:
    // one change end to end first, so the timing starts from that state.
    client
        .batch_execute("INSERT INTO live_ours SELECT 0, 0, 'warm-up', '{}'")
        .await?;
    ensure!(
        consumer
            .read_until(Duration::from_secs(60), |_| true)
            .await?,
        "the warm-up change never became readable"
    );
    let (cpu_before, started) = (CpuTimes::now(), Instant::now());
    let stages = {
        let client = db.connect().await?;
        let confirmed = running.confirmed.clone();
        tokio::spawn(async move {
            load(&client, "live_ours", rows, per_tx).await?;
            let loaded = started.elapsed();
            let end = lsn(&changewire_tests::current_wal_lsn(&client).await?)?;
            while confirmed.get() < end {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The client goes back with them: its backend's CPU counts only while
            // the backend lives.
            anyhow::Ok((loaded, started.elapsed(), client))
        })
    };
    let expected = usize::try_from(rows)?;
    let read = consumer.count(expected, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let cpu = CpuTimes::now().since(&cpu_before);
    if read != expected {
        // Its wait for the producer's confirmation would never end.
        stages.abort();
        anyhow::bail!("only {read} of {rows} events were readable");
    }
    let (loaded, acknowledged, _loader) = stages.await??;
    running.stop.send(true)?;
    running.task.await??;
    Ok(LiveRun {
        elapsed,
        loaded,
        acknowledged,
        cpu,
    })
}

/// Starts changewire on `slot` (created beforehand, no snapshot).
fn start_source(
    stack: &Stack,
    db: &TestDatabase,
    slot: &str,
    prefix: &str,
) -> anyhow::Result<RunningBench> {
    let state = tempfile::tempdir()?;
    let config = PostgresConfig {
        name: "bench".into(),
        url: db.url.clone(),
        password: None,
        slot: Some(slot.to_owned()),
        publication: Some("changewire_bench".into()),
        include: vec![],
        exclude: vec![],
        snapshot: SnapshotMode::Never,
        snapshot_chunk_rows: 10_000,
        tombstones: false,
        topic_partitions: 3,
        redact: vec![],
        redaction_key: None,
        tls: Default::default(),
        max_in_flight: MAX_IN_FLIGHT,
    };
    let source = PostgresSource::new(
        config,
        TopicNames::new(prefix)?,
        Arc::new(Codec::json()?),
        Publisher::for_source(&producer_kafka_config(stack)?)?,
        Arc::new(SledCheckpoints::open(state.path())?),
    );
    let confirmed = source.metrics().source("bench").confirmed_lsn();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { source.run(shutdown).await });
    Ok(RunningBench {
        stop,
        task,
        confirmed,
        _state: state,
    })
}

async fn time_changewire(
    stack: &Stack,
    db: &TestDatabase,
    slot: &str,
    prefix: &str,
    end_lsn: &str,
) -> anyhow::Result<(Duration, u64, RunningBench)> {
    let end = lsn(end_lsn)?;
    let started = Instant::now();
    let mut running = start_source(stack, db, slot, prefix)?;
    let mut peak_rss = 0;
    while running.confirmed.get() < end {
        peak_rss = peak_rss.max(changewire_tests::peak_rss_kib("self"));
        if running.task.is_finished() {
            anyhow::bail!("the source stopped: {:?}", (&mut running.task).await?);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The source keeps running (caught up) for the latency phase.
    Ok((started.elapsed(), peak_rss, running))
}

/// The stack's Kafka settings plus `BENCH_KAFKA_PROPERTIES` (`name=value,...`,
/// librdkafka properties for the benchmarked producer, e.g. `compression.type=none`).
fn producer_kafka_config(
    stack: &Stack,
) -> anyhow::Result<changewire_schemas::settings::KafkaConfig> {
    let mut config = stack.kafka_config();
    let extra = std::env::var("BENCH_KAFKA_PROPERTIES").unwrap_or_default();
    for property in extra.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = property
            .split_once('=')
            .with_context(|| format!("BENCH_KAFKA_PROPERTIES: {property:?} is not name=value"))?;
        config.properties.insert(name.to_owned(), value.to_owned());
    }
    Ok(config)
}

/// PostgreSQL's `X/Y` LSN text as the producer's gauge holds it.
fn lsn(text: &str) -> anyhow::Result<i64> {
    let (high, low) = text.split_once('/').context("an LSN is X/Y")?;
    Ok((i64::from_str_radix(high, 16)? << 32) | i64::from_str_radix(low, 16)?)
}

/// The benchmarked source, stopped gracefully at the end.
struct RunningBench {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), changewire_producer::postgres::PostgresError>>,
    /// The LSN the source confirmed last (set when Kafka acknowledged everything
    /// before it; PostgreSQL hears of it up to a status interval later).
    confirmed: Gauge,
    _state: tempfile::TempDir,
}

/// Writes LATENCY_RATE rows/s for LATENCY_SECONDS (100 rows per transaction) and
/// takes, per event, the consumer's receive time minus the commit time
/// (`source.ts_ms`): an upper bound of commit-to-acknowledged latency.
async fn latency(
    stack: &Stack,
    db: &TestDatabase,
    prefix: &str,
) -> anyhow::Result<(i64, i64, usize)> {
    let topic = format!("{prefix}.bench.public.bench");
    let consumer = TestConsumer::from_beginning(stack, &topic)?;
    // Skip what the throughput phase produced.
    while !consumer
        .read(100_000, Duration::from_millis(500))
        .await?
        .is_empty()
    {}
    let writer = db.connect().await?;
    let per_tx = 100i64;
    let interval = Duration::from_micros(1_000_000 * per_tx as u64 / LATENCY_RATE);
    let total = (LATENCY_RATE * LATENCY_SECONDS) as usize;
    let write = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        for first in (10_000_001..10_000_001 + total as i64).step_by(per_tx as usize) {
            tick.tick().await;
            writer
                .execute(
                    "INSERT INTO bench SELECT g, 0, 'x', jsonb_build_object('id', g) FROM generate_series($1::bigint, $2::bigint) g",
                    &[&first, &(first + per_tx - 1)],
                )
                .await?;
        }
        anyhow::Ok(())
    });
    let codec = Codec::json()?;
    let mut latencies = Vec::with_capacity(total);
    consumer
        .read_until(Duration::from_secs(LATENCY_SECONDS + 30), |record| {
            let received = now_ms();
            if let Some(event) = record.value.as_deref().and_then(|v| codec.decode(v).ok()) {
                latencies.push(received - event.source.ts_ms);
            }
            latencies.len() == total
        })
        .await?;
    write.await??;
    ensure!(
        latencies.len() == total,
        "only {} of {total} events arrived",
        latencies.len()
    );
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Ok((pick(0.5), pick(0.99), latencies.len()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The middle value (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
