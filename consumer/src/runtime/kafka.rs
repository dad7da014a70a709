//! Kafka glue: client settings, topics, the consumer in either ownership mode,
//! records, offset mirroring, and the watch over partitions no member owns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use changewire_kafka::{Role, TopicSpec};
use changewire_schemas::diagnostics::report;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;

use super::assign::{add_offset, commit_metadata, Assignment, PartitionKey, ServiceContext};
use super::config::{Assignment as Mode, RuntimeConfig};
use super::handler::Record;
use super::metrics::{ConsumerMetrics, TopicPartition};
use super::RuntimeError;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kafka client configuration with the `[kafka]` section's properties.
pub fn client_config(config: &RuntimeConfig) -> ClientConfig {
    changewire_kafka::client_config(&config.kafka, Role::Consumer)
}

/// Creates `topic` with `partitions` when missing (brokers may not auto-create).
pub async fn ensure_topic(
    config: &RuntimeConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), RuntimeError> {
    let spec = TopicSpec::new(topic, partitions).configured(&config.topics);
    changewire_kafka::ensure_topics(&config.kafka, &[spec])
        .await
        .inspect_err(
            |error| tracing::error!(%topic, error = %report(error), "cannot create the topic"),
        )?;
    Ok(())
}

/// The topics (or `^` patterns) the service subscribes.
pub(super) fn subscribed(config: &RuntimeConfig) -> Vec<&str> {
    config
        .service
        .subscribe
        .iter()
        .map(String::as_str)
        .collect()
}

/// The service's consumer: subscribed to its group, or assigned its static
/// partitions (starting from the sled offsets).
pub(super) fn consumer(
    config: &RuntimeConfig,
    context: ServiceContext,
) -> Result<StreamConsumer<ServiceContext>, RuntimeError> {
    let mut client = client_config(config);
    client
        .set("group.id", config.group_id())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (key, default) in [
        ("auto.offset.reset", "earliest"),
        ("statistics.interval.ms", "5000"),
        // librdkafka stops fetching while its queue holds 64 MB and then waits a
        // full second by default: a service catching up idled up to 40% of the
        // time (the plain loop read 107,000 events/s; 180,000 with this).
        ("fetch.queue.backoff.ms", "20"),
    ] {
        if client.get(key).is_none() {
            client.set(key, default);
        }
    }
    let (store, assignment, rewind) = (
        context.store.clone(),
        context.assignment.clone(),
        context.rewind,
    );
    let consumer: StreamConsumer<ServiceContext> = client.create_with_context(context)?;
    match config.service.assignment {
        Mode::Group => consumer.subscribe(&subscribed(config))?,
        Mode::Static => {
            let mut tpl = TopicPartitionList::new();
            let mut taken = Vec::new();
            for (topic, partition) in static_partitions(&consumer, config)? {
                let next = store.offset(&topic, partition)?;
                let start = next.map_or(Offset::Stored, |n| Offset::Offset((n - rewind).max(0)));
                tracing::info!(%topic, partition, ?next, "assigning the partition");
                tpl.add_partition_offset(&topic, partition, start)?;
                taken.push(((topic, partition), next));
            }
            assignment.take(taken);
            consumer.assign(&tpl)?;
        }
    }
    Ok(consumer)
}

/// The configured partitions of every subscribed topic (all when none are
/// configured); an error names a topic or partition that does not exist.
fn static_partitions(
    consumer: &StreamConsumer<ServiceContext>,
    config: &RuntimeConfig,
) -> Result<Vec<PartitionKey>, RuntimeError> {
    let mut partitions = Vec::new();
    for topic in &config.service.subscribe {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        let wanted = match &config.service.partitions {
            Some(wanted) => wanted.clone(),
            None => (0..count).collect(),
        };
        if let Some(missing) = wanted.iter().find(|&&p| p >= count) {
            return Err(RuntimeError::Config(
                changewire_schemas::settings::ConfigError::invalid(
                    "service.partitions",
                    format!(
                        "topic {topic} has {count} partitions: there is no partition {missing}"
                    ),
                ),
            ));
        }
        partitions.extend(wanted.into_iter().map(|p| (topic.clone(), p)));
    }
    Ok(partitions)
}

/// Adds a polled message to `records` as an owned [`Record`]; logs client errors
/// (librdkafka retries them itself).
pub(super) fn collect(message: Result<BorrowedMessage<'_>, KafkaError>, records: &mut Vec<Record>) {
    match message {
        Ok(message) => records.push(Record {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
            payload: message.payload().unwrap_or_default().to_vec(),
        }),
        Err(error) => tracing::warn!(%error, "consumer error"),
    }
}

/// Pauses (or resumes) `partitions` in the client.
pub(super) fn set_paused(
    consumer: &StreamConsumer<ServiceContext>,
    partitions: &[PartitionKey],
    paused: bool,
) {
    if partitions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    let result = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(error) = result {
        tracing::warn!(%error, paused, "cannot pause or resume partitions");
    }
}

/// Copies settled offsets of owned partitions to Kafka's committed offsets, with
/// this instance's metadata (for lag tools and a partition's next owner). Best
/// effort: sled is the truth.
pub(super) struct Mirror {
    metadata: String,
    mirrored: HashMap<PartitionKey, i64>,
}

impl Mirror {
    pub(super) fn new(instance: &str) -> Self {
        Self {
            metadata: commit_metadata(instance),
            mirrored: HashMap::new(),
        }
    }

    pub(super) fn mirror(
        &mut self,
        consumer: &StreamConsumer<ServiceContext>,
        assignment: &Assignment,
    ) {
        let owned = assignment.owned();
        let settlements = assignment.settlements();
        let mut tpl = TopicPartitionList::new();
        for key in owned {
            let Some(next) = settlements.settled(&key) else {
                continue;
            };
            if self.mirrored.insert(key.clone(), next) != Some(next) {
                add_offset(&mut tpl, &key, next, &self.metadata);
            }
        }
        drop(settlements);
        if tpl.count() == 0 {
            return;
        }
        tracing::debug!(
            partitions = tpl.count(),
            "mirroring settled offsets to Kafka"
        );
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "mirroring offsets to Kafka failed");
            self.mirrored.clear();
        }
    }
}

/// Watches the group for subscribed partitions no member owns (seen on tansu
/// 0.6 after members were killed and restarted: the group settles with a
/// partition assigned to nobody). Where the broker lists the group's members
/// with their assignments, a partition none of them holds is unowned; where it
/// does not (tansu), a partition this instance does not own whose committed
/// offset stays behind its end is suspected. Either is counted in a metric,
/// its lag (from the group's committed offset) is reported, and after
/// `service.unowned_after_s` `/health` names it and this instance rejoins the
/// group, which makes the group assign again.
pub(super) struct GroupWatch {
    config: RuntimeConfig,
    /// Suspected partitions: their committed offset, and since when it stayed.
    since: HashMap<PartitionKey, (i64, Instant)>,
    looking: Option<tokio::task::JoinHandle<Result<GroupView, KafkaError>>>,
    /// Made at the first look, kept for the next ones.
    client: Arc<OnceLock<BaseConsumer>>,
}

/// What the group looks like from outside.
struct GroupView {
    /// Partitions of the subscribed topics, with their high watermarks.
    partitions: HashMap<PartitionKey, i64>,
    /// Partitions some member owns; `None` if the broker does not say.
    owned: Option<HashSet<PartitionKey>>,
    /// The group's committed offsets.
    committed: HashMap<PartitionKey, i64>,
}

impl GroupWatch {
    pub(super) fn new(config: &RuntimeConfig) -> Self {
        Self {
            config: config.clone(),
            since: HashMap::new(),
            looking: None,
            client: Arc::default(),
        }
    }

    /// Starts a look at the group (in a blocking task), or takes the last one's
    /// result: whether partitions have had no owner for too long, so that this
    /// instance (owning `ours`) should rejoin. Call it every few seconds.
    pub(super) async fn check(
        &mut self,
        metrics: &ConsumerMetrics,
        ours: &HashSet<PartitionKey>,
    ) -> bool {
        match self.looking.take() {
            Some(look) if look.is_finished() => match look.await {
                Ok(Ok(view)) => self.judge(&view, metrics, ours),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "cannot look at the group");
                    false
                }
                Err(_) => false,
            },
            Some(look) => {
                self.looking = Some(look);
                false
            }
            None => {
                let (config, client) = (self.config.clone(), self.client.clone());
                self.looking = Some(tokio::task::spawn_blocking(move || {
                    let client = match client.get() {
                        Some(client) => client,
                        None => {
                            let mut settings = client_config(&config);
                            settings.set("group.id", config.group_id());
                            let created: BaseConsumer = settings.create()?;
                            client.get_or_init(|| created)
                        }
                    };
                    look(&config, client)
                }));
                false
            }
        }
    }

    /// Whether `key` looks unowned. An empty member list while this instance
    /// owns partitions means the broker does not report assignments.
    fn suspect(
        view: &GroupView,
        key: &PartitionKey,
        high: i64,
        ours: &HashSet<PartitionKey>,
    ) -> bool {
        if ours.contains(key) {
            return false;
        }
        match view
            .owned
            .as_ref()
            .filter(|owned| !owned.is_empty() || ours.is_empty())
        {
            Some(owned) => !owned.contains(key),
            None => view.committed.get(key).copied().unwrap_or(0) < high,
        }
    }

    fn judge(
        &mut self,
        view: &GroupView,
        metrics: &ConsumerMetrics,
        ours: &HashSet<PartitionKey>,
    ) -> bool {
        let now = Instant::now();
        let mut suspects = HashSet::new();
        for (key, &high) in &view.partitions {
            if !Self::suspect(view, key, high, ours) {
                continue;
            }
            let committed = view.committed.get(key).copied().unwrap_or(0);
            let entry = self.since.entry(key.clone()).or_insert((committed, now));
            if entry.0 != committed {
                *entry = (committed, now);
            }
            metrics
                .lag
                .get_or_create(&TopicPartition {
                    topic: key.0.clone(),
                    partition: key.1,
                })
                .set((high - committed).max(0));
            suspects.insert(key.clone());
        }
        self.since.retain(|key, _| suspects.contains(key));
        let bound = Duration::from_secs(self.config.service.unowned_after_s);
        let mut overdue: Vec<String> = self
            .since
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= bound)
            .map(|((topic, partition), _)| format!("{topic}/{partition}"))
            .collect();
        metrics.unowned_partitions.set(overdue.len() as i64);
        if overdue.is_empty() {
            metrics.set_unowned(None);
            return false;
        }
        overdue.sort();
        metrics.set_unowned(Some(format!(
            "partitions without an owner in the group (or not moving) for over {bound:?}: {}",
            overdue.join(", ")
        )));
        // The next rejoin only after another full bound.
        self.since.clear();
        true
    }
}

/// Looks at the group with a client of its own, not in the group (blocking
/// calls).
fn look(config: &RuntimeConfig, consumer: &BaseConsumer) -> Result<GroupView, KafkaError> {
    let group = config.group_id();
    let list = consumer.fetch_group_list(Some(&group), METADATA_TIMEOUT)?;
    let members = list.groups().first().map_or(&[][..], |g| g.members());
    let owned = members
        .iter()
        .map(|m| parse_assignment(m.assignment().unwrap_or_default()))
        .collect::<Option<Vec<_>>>()
        .map(|sets| sets.into_iter().flatten().collect::<HashSet<_>>());
    let mut partitions = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for topic in config
        .service
        .subscribe
        .iter()
        .filter(|t| !t.starts_with('^'))
    {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        for t in metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
        {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)?;
                partitions.insert((topic.clone(), p.id()), high);
                tpl.add_partition(topic, p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(tpl, METADATA_TIMEOUT)?
        .elements()
        .iter()
        .filter_map(|e| {
            e.offset()
                .to_raw()
                .filter(|o| *o >= 0)
                .map(|o| ((e.topic().to_owned(), e.partition()), o))
        })
        .collect();
    Ok(GroupView {
        partitions,
        owned,
        committed,
    })
}

/// The partitions in a consumer protocol assignment (version, then per topic
/// its name and partitions, then user data); `None` if the bytes are not one.
fn parse_assignment(bytes: &[u8]) -> Option<Vec<PartitionKey>> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let _version = take(2)?;
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut partitions = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let topic = String::from_utf8(take(len.max(0) as usize)?.to_vec()).ok()?;
        let count = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..count.max(0) {
            partitions.push((topic.clone(), i32::from_be_bytes(take(4)?.try_into().ok()?)));
        }
    }
    Some(partitions)
}

/// Rejoins the group: the coordinator assigns every partition again.
pub(super) fn rejoin(
    consumer: &StreamConsumer<ServiceContext>,
    config: &RuntimeConfig,
) -> Result<(), RuntimeError> {
    tracing::warn!("rejoining the group so that every partition gets an owner");
    consumer.unsubscribe();
    consumer.subscribe(&subscribed(config))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::config::ServiceConfig;

    fn watch() -> GroupWatch {
        let mut service = ServiceConfig::new("s", vec!["t".into()], "/tmp/s".into());
        service.unowned_after_s = 30;
        GroupWatch::new(&RuntimeConfig {
            kafka: serde_json::from_value(serde_json::json!({"brokers": "localhost:9092"}))
                .expect("kafka"),
            topics: Default::default(),
            http: None,
            service,
        })
    }

    fn view(owned: Option<&[i32]>, committed_1: i64) -> GroupView {
        GroupView {
            partitions: HashMap::from([(("t".into(), 0), 10), (("t".into(), 1), 10)]),
            owned: owned.map(|o| o.iter().map(|p| ("t".to_owned(), *p)).collect()),
            committed: HashMap::from([(("t".into(), 0), 10), (("t".into(), 1), committed_1)]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_nobody_owns_is_reported_after_the_bound_and_only_then() {
        let metrics = ConsumerMetrics::default();
        let ours = HashSet::from([("t".to_owned(), 0)]);
        let mut watch = watch();
        assert!(
            !watch.judge(&view(None, 5), &metrics, &ours),
            "suspected, not yet overdue"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(
            !watch.judge(&view(None, 6), &metrics, &ours),
            "it moved: someone owns it"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!watch.judge(&view(None, 6), &metrics, &ours));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            watch.judge(&view(None, 6), &metrics, &ours),
            "stuck behind its end for 30 s"
        );
        assert_eq!(metrics.unowned_partitions.get(), 1);
        assert!(
            !watch.judge(&view(None, 6), &metrics, &ours),
            "the next rejoin waits another bound"
        );
        let listed = view(Some(&[0, 1]), 6);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            !watch.judge(&listed, &metrics, &ours),
            "a listed owner holds it"
        );
        let orphan = view(Some(&[0]), 6);
        assert!(!watch.judge(&orphan, &metrics, &ours));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            watch.judge(&orphan, &metrics, &ours),
            "listed as nobody's for 30 s"
        );
    }

    #[test]
    fn member_assignments_parse_as_the_consumer_protocol_writes_them() {
        let mut bytes = vec![0, 1];
        bytes.extend(1i32.to_be_bytes());
        bytes.extend(4i16.to_be_bytes());
        bytes.extend(b"cw.t");
        bytes.extend(2i32.to_be_bytes());
        bytes.extend(0i32.to_be_bytes());
        bytes.extend(2i32.to_be_bytes());
        bytes.extend((-1i32).to_be_bytes());
        assert_eq!(
            parse_assignment(&bytes),
            Some(vec![("cw.t".into(), 0), ("cw.t".into(), 2)])
        );
        assert_eq!(parse_assignment(&bytes[..9]), None, "truncated");
        assert_eq!(parse_assignment(&[]), None, "none stored");
    }
}
