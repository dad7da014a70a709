//! Support code for changewire's end-to-end tests: the local stack's endpoints, a
//! database and topic names of its own per test, a Kafka consumer that polls until a
//! deadline, and teardown. Tests run in parallel, so every name is unique.
//!
//! Start the stack first (`scripts/stack up`); `scripts/test` does it for you.

pub mod alertmanager;
pub mod bench;
pub mod certs;
pub mod gateway;
pub mod kube_api;
pub mod servers;
pub mod syslog;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_postgres::NoTls;

/// Where the local stack listens (see `scripts/stack env`).
#[derive(Debug, Clone)]
pub struct Stack {
    /// Superuser URL of the `postgres` database.
    pub pg_url: String,
    /// Kafka bootstrap list.
    pub kafka_brokers: String,
}

impl Stack {
    /// Reads `CW_TEST_PG_URL` and `CW_TEST_KAFKA_BROKERS`, defaulting to `scripts/stack`'s ports.
    pub fn from_env() -> Self {
        Self {
            pg_url: std::env::var("CW_TEST_PG_URL").unwrap_or_else(|_| {
                "postgres://changewire:changewire@127.0.0.1:55432/postgres".to_owned()
            }),
            kafka_brokers: std::env::var("CW_TEST_KAFKA_BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:19092".to_owned()),
        }
    }

    /// The local stack's PostgreSQL with another broker (a private one).
    pub fn with_brokers(brokers: String) -> Self {
        Self {
            kafka_brokers: brokers,
            ..Self::from_env()
        }
    }

    /// The `[kafka]` config section pointing at the test broker.
    pub fn kafka_config(&self) -> changewire_schemas::settings::KafkaConfig {
        changewire_schemas::settings::KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            properties: Default::default(),
        }
    }
}

/// A name no other test uses: `<prefix>_<12 hex digits>`, valid as a database, slot
/// and topic name.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// A database created for one test and dropped when the value is dropped.
pub struct TestDatabase {
    /// Database name.
    pub name: String,
    /// Connection URL of the database.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database.
    pub async fn create(stack: &Stack) -> anyhow::Result<Self> {
        let name = unique_name("cw");
        let admin = connect(&stack.pg_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = stack
            .pg_url
            .rsplit_once('/')
            .map(|(server, _)| format!("{server}/{name}"))
            .context("CW_TEST_PG_URL must end in /<database>")?;
        Ok(Self {
            name,
            url,
            admin_url: stack.pg_url.clone(),
        })
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on async work:
        // tear down on a thread of its own and wait for it.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let teardown = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = connect(&admin_url).await?;
                // Replication slots pin a database. A failed test may leave its source
                // streaming: end those sessions, then drop the slots once released.
                admin
                    .execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE database = $1 AND active",
                        &[&name],
                    )
                    .await?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    admin
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                             WHERE database = $1 AND NOT active",
                            &[&name],
                        )
                        .await?;
                    let left: i64 = admin
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                            &[&name],
                        )
                        .await?
                        .get(0);
                    if left == 0 || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(error)) = teardown.join() {
            eprintln!("teardown of database {} failed: {error:#}", self.name);
        }
    }
}

/// Connects to Postgres and drives the connection in the background.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact_url(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if scheme < at => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Creates topics with `partitions` partitions each (tansu does not auto-create them).
pub async fn create_topics(stack: &Stack, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &options).await? {
        if let Err((topic, code)) = result {
            bail!("creating topic {topic} failed: {code}");
        }
    }
    Ok(())
}

/// A record read back from Kafka, detached from the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// Partition it was stored in.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value (`None` for a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in order (a header may have no value, which is not an empty one).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl ReadRecord {
    /// The value of the first header named `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// Reads topics from the beginning by direct partition assignment: no consumer group
/// to join, so reading starts at once.
pub struct TestConsumer {
    consumer: StreamConsumer,
    partitions: Vec<i32>,
}

impl TestConsumer {
    /// Assigns every partition of `topic` (which must exist) from the beginning.
    pub fn from_beginning(stack: &Stack, topic: &str) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &stack.kafka_brokers)
            .set("group.id", unique_name("test-reader"))
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            // librdkafka waits up to 500 ms for a fetch to fill by default; tests and
            // the latency benchmark want records as soon as they are stored.
            .set("fetch.wait.max.ms", "10")
            // Nor a second after its queue filled up (it would idle meanwhile).
            .set("fetch.queue.backoff.ms", "20")
            .create()
            .context("creating the test consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("fetching metadata of {topic}"))?;
        let mut assignment = TopicPartitionList::new();
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .map(|p| p.id())
            .collect();
        for &partition in &partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        if assignment.count() == 0 {
            bail!("topic {topic} has no partitions (was it created?)");
        }
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            partitions,
        })
    }

    /// Waits up to `timeout` for `topic` to be created, then reads it from the beginning.
    pub async fn once_created(
        stack: &Stack,
        topic: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::from_beginning(stack, topic) {
                Ok(consumer) => return Ok(consumer),
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Reads until `count` records arrived or `timeout` passed; returns what arrived.
    pub async fn read(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<ReadRecord>> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::with_capacity(count);
        while records.len() < count {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(message) => records.push(ReadRecord::from_message(&message?)),
                Err(_elapsed) => break,
            }
        }
        Ok(records)
    }

    /// Receives until `count` records arrived or `timeout` passed, without copying
    /// them (benchmarks: the reader's own cost stays small); returns how many arrived.
    pub async fn count(&self, count: usize, timeout: Duration) -> anyhow::Result<usize> {
        let mut received = 0;
        // One timer for the whole read, not one per record (the live benchmark
        // counts a million records with it).
        let reading = async {
            while received < count {
                self.consumer.recv().await?;
                received += 1;
            }
            anyhow::Ok(())
        };
        if let Ok(read) = tokio::time::timeout(timeout, reading).await {
            read?;
        }
        Ok(received)
    }

    /// Reads until `done` returns true for a record or `timeout` passed; returns
    /// whether `done` was reached.
    pub async fn read_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(ReadRecord) -> bool,
    ) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(message) => {
                    if done(ReadRecord::from_message(&message?)) {
                        return Ok(true);
                    }
                }
                Err(_elapsed) => return Ok(false),
            }
        }
    }

    /// Reads exactly `count` records, failing with what arrived if fewer did in time.
    pub async fn read_exactly(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReadRecord>> {
        let records = self.read(count, timeout).await?;
        if records.len() != count {
            bail!(
                "expected {count} records within {timeout:?}, got {}",
                records.len()
            );
        }
        Ok(records)
    }
}

/// A plain idempotent producer for test input, independent of changewire's own.
pub fn producer(stack: &Stack) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("enable.idempotence", "true")
        .create()?)
}

/// Payload of the end markers [`read_to_end`] writes.
const END_MARKER: &[u8] = b"changewire-test-end-marker";

/// Every record of `topic`, once nothing writes to it any more: appends an end
/// marker to each partition and reads until every marker arrived (watermarks are
/// not trusted: tansu's lag the records it stores). Markers are left out.
pub async fn read_to_end(
    stack: &Stack,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadRecord>> {
    let reader = TestConsumer::from_beginning(stack, topic)?;
    let producer = producer(stack)?;
    let partitions = reader.partitions.clone();
    for &partition in &partitions {
        let marker: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .partition(partition)
            .payload(END_MARKER);
        producer
            .send(marker, Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)?;
    }
    let mut records = Vec::new();
    let mut ended = std::collections::HashSet::new();
    let complete = reader
        .read_until(timeout, |record| {
            if record.value.as_deref() == Some(END_MARKER) {
                ended.insert(record.partition);
            } else {
                records.push(record);
            }
            ended.len() == partitions.len()
        })
        .await?;
    if !complete {
        bail!(
            "the end markers of {topic} did not all arrive within {timeout:?} ({} of {})",
            ended.len(),
            partitions.len()
        );
    }
    Ok(records)
}

/// Path of a workspace binary built next to the running test.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    // Test binaries live in target/<profile>/deps; workspace binaries one level up.
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .context("cannot locate the target directory")?;
    if !path.is_file() {
        bail!(
            "{} is not built; run `cargo build --workspace --bins --examples` first",
            path.display()
        );
    }
    Ok(path)
}

/// Path of a workspace example built next to the running test.
pub fn workspace_example(name: &str) -> anyhow::Result<PathBuf> {
    workspace_binary(&format!("examples/{name}"))
}

/// Creates a pgoutput slot with a unique name in the database `client` is on.
pub async fn create_pgoutput_slot(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    let slot = unique_name("slot");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("creating slot {slot}"))?;
    Ok(slot)
}

/// The server's current WAL position, as text.
pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// Whether `slot` has confirmed everything up to `lsn`.
pub async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
    lsn: &str,
) -> anyhow::Result<bool> {
    Ok(client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $2",
            &[&lsn, &slot],
        )
        .await?
        .get(0))
}

/// Peak resident set size (VmHWM) in KiB of `process`: a pid, or `self`.
/// 0 when it cannot be read.
pub fn peak_rss_kib(process: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user plus system) a process used so far (`/proc/<process>/stat`).
pub fn cpu_time(process: &str) -> std::time::Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{process}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces: utime is the 12th.
            let fields: Vec<u64> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            Some(fields.iter().sum::<u64>())
        })
        .unwrap_or(0);
    // The kernel reports USER_HZ ticks, 100 per second on Linux.
    std::time::Duration::from_millis(ticks * 10)
}

/// Writes `dir/producer.toml` for running `changewire-producer` against the stack:
/// state in `dir/state`, HTTP on a free port, source `name` on `db_url` with `slot`,
/// plus `extra_postgres` lines in the `[postgres]` section. Returns its path.
pub fn write_producer_config(
    dir: &std::path::Path,
    stack: &Stack,
    prefix: &str,
    name: &str,
    db_url: &str,
    slot: &str,
    extra_postgres: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("producer.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[kafka]\nbrokers = {:?}\n\
             [topics]\nprefix = {prefix:?}\n[postgres]\nname = {name:?}\nurl = {db_url:?}\n\
             slot = {slot:?}\n{extra_postgres}\n",
            dir.join("state"),
            stack.kafka_brokers,
        ),
    )?;
    Ok(path)
}

/// The number of events a benchmark runs: its first argument, else `default`.
pub fn bench_events(default: u64) -> anyhow::Result<u64> {
    let events = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(default);
    anyhow::ensure!(events > 0, "EVENTS must be positive");
    Ok(events)
}

/// Publishes `count` events to `topic` for a benchmark (key: the event's number,
/// value: `value(n)` encoded as JSON), in chunks, waiting while the producer's
/// queue is full; returns the bytes of the values.
pub async fn publish_events(
    stack: &Stack,
    topic: &str,
    count: u64,
    value: impl Fn(u64) -> changewire_schemas::ChangeEvent,
) -> anyhow::Result<u64> {
    const CHUNK: u64 = 50_000;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()?;
    let codec = changewire_schemas::Codec::json()?;
    let (mut bytes, mut next) = (0, 0);
    while next < count {
        let end = (next + CHUNK).min(count);
        let mut acks = Vec::new();
        for n in next..end {
            let encoded = codec.encode(&value(n))?;
            bytes += encoded.len() as u64;
            let key = n.to_string();
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(encoded.as_slice());
            acks.push(enqueue(&producer, record).await);
        }
        for ack in futures::future::join_all(acks).await {
            ack?.map_err(|(error, _)| error)?;
        }
        next = end;
    }
    Ok(bytes)
}

/// Hands `record` to `producer`, waiting while its queue is full.
pub async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> rdkafka::producer::DeliveryFuture {
    loop {
        match producer.send_result(record) {
            Ok(ack) => return ack,
            Err((_, back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
