//! Running the PostgreSQL source in-process, writing load, and reading results back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use changewire_kafka::Publisher;
use changewire_producer::checkpoint::SledCheckpoints;
use changewire_producer::postgres::{PostgresConfig, PostgresError, PostgresSource, SnapshotMode};
use changewire_schemas::settings::KafkaConfig;
use changewire_schemas::{ChangeEvent, Codec, TopicNames};
use changewire_tests::{unique_name, Stack, TestConsumer, TestDatabase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Sends in-process sources' logs to the test's output (shown when a test fails).
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A source running in this process, stopped gracefully by `stop`.
pub struct RunningSource {
    /// The source's metrics and health state.
    pub metrics: Arc<changewire_producer::metrics::ProducerMetrics>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), PostgresError>>,
    _state: tempfile::TempDir,
}

impl RunningSource {
    pub fn start(brokers: &str, config: PostgresConfig, prefix: &str) -> anyhow::Result<Self> {
        let kafka = KafkaConfig {
            brokers: brokers.to_owned(),
            properties: Default::default(),
        };
        Self::start_with(&kafka, Codec::json()?, config, prefix)
    }

    /// Starts a source publishing with these Kafka client settings and value codec.
    pub fn start_with(
        kafka: &KafkaConfig,
        codec: Codec,
        config: PostgresConfig,
        prefix: &str,
    ) -> anyhow::Result<Self> {
        log_to_test_output();
        let state = tempfile::tempdir()?;
        let source = PostgresSource::new(
            config,
            TopicNames::new(prefix)?,
            Arc::new(codec),
            Publisher::for_source(kafka)?,
            Arc::new(SledCheckpoints::open(state.path())?),
        );
        let (stop, shutdown) = watch::channel(false);
        let metrics = source.metrics();
        let task = tokio::spawn(async move { source.run(shutdown).await });
        Ok(Self {
            metrics,
            stop,
            task,
            _state: state,
        })
    }

    /// Starts a source and waits until its slot streams, so that changes made from
    /// then on arrive as stream events rather than in the snapshot.
    pub async fn streaming(
        brokers: &str,
        config: PostgresConfig,
        prefix: &str,
        client: &tokio_postgres::Client,
    ) -> anyhow::Result<Self> {
        let slot = config.slot_name();
        let source = Self::start(brokers, config, prefix)?;
        wait_for_slot(client, &slot).await?;
        Ok(source)
    }

    /// Whether the source has ended (after a permanent error, or a stop).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the source created `topic`, then reads it from the beginning.
    /// Fails at once with the source's own error if the source stopped.
    pub async fn consumer(&mut self, stack: &Stack, topic: &str) -> anyhow::Result<TestConsumer> {
        tokio::select! {
            consumer = TestConsumer::once_created(stack, topic, Duration::from_secs(30)) => consumer,
            result = &mut self.task => anyhow::bail!(
                "the source stopped before creating {topic}: {:?}",
                result?.err()
            ),
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        // A source that already ended has dropped its receiver.
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task).await???;
        Ok(())
    }
}

pub fn config(url: &str, name: &str) -> PostgresConfig {
    PostgresConfig {
        name: name.to_owned(),
        url: url.to_owned(),
        password: None,
        // Slot names are cluster-wide: unique per test, so runs and tests never collide.
        slot: Some(unique_name("slot")),
        publication: None,
        include: vec![],
        exclude: vec![],
        snapshot: SnapshotMode::Initial,
        snapshot_chunk_rows: 2,
        tombstones: false,
        topic_partitions: 1,
        redact: vec![],
        redaction_key: None,
        tls: Default::default(),
        max_in_flight: 1000,
    }
}

pub fn decode(records: &[changewire_tests::ReadRecord]) -> anyhow::Result<Vec<ChangeEvent>> {
    let codec = Codec::json()?;
    records
        .iter()
        .map(|r| Ok(codec.decode(r.value.as_deref().unwrap_or_default())?))
        .collect()
}

/// Inserts rows `1..=rows` into `table (id bigint primary key, ...)` in transactions
/// of `per_tx`, reconnecting and retrying a batch when the server goes away (the
/// insert is idempotent). Awaits `midway` once, after half the rows.
pub async fn write_rows(
    url: &str,
    table: &str,
    rows: i64,
    per_tx: i64,
    midway: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut midway = Some(midway);
    let mut client = changewire_tests::connect(url).await?;
    let sql = format!("INSERT INTO {table} (id) SELECT g FROM generate_series($1::bigint, $2::bigint) g ON CONFLICT DO NOTHING");
    let mut first = 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    while first <= rows {
        let last = (first + per_tx - 1).min(rows);
        match client.execute(&sql, &[&first, &last]).await {
            Ok(_) => first = last + 1,
            Err(error) => {
                anyhow::ensure!(Instant::now() < deadline, "writer gave up: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(fresh) = changewire_tests::connect(url).await {
                    client = fresh;
                }
                continue;
            }
        }
        if first > rows / 2 {
            if let Some(midway) = midway.take() {
                midway.await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Reads `topic` until every row id `1..=rows` was seen; returns the ids seen.
pub async fn read_row_ids(
    source: &mut RunningSource,
    stack: &Stack,
    topic: &str,
    rows: i64,
    timeout: Duration,
) -> anyhow::Result<BTreeSet<i64>> {
    let consumer = source.consumer(stack, topic).await?;
    let codec = Codec::json()?;
    let mut seen = BTreeSet::new();
    consumer
        .read_until(timeout, |record| {
            let event = record.value.as_deref().and_then(|v| codec.decode(v).ok());
            if let Some(id) = event.and_then(|e| e.after).and_then(|a| a["id"].as_i64()) {
                seen.insert(id);
            }
            seen.len() as i64 == rows
        })
        .await?;
    Ok(seen)
}

/// A fresh test database on which `ddl` has run, and a connection to it.
pub async fn database_with(
    stack: &Stack,
    ddl: &str,
) -> anyhow::Result<(TestDatabase, tokio_postgres::Client)> {
    let db = TestDatabase::create(stack).await?;
    let client = db.connect().await?;
    client.batch_execute(ddl).await?;
    Ok((db, client))
}

pub async fn wait_for_slot(client: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(Instant::now() < deadline, "slot {slot} never became active");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
