//! `changewire-consumer alert dry-run`: which rules would fire on a file of events
//! or a topic's records, and why, without sending anything or touching a store.
//! Windows are counted in memory over what is read, in the order of the
//! changes' times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use changewire_schemas::time::rfc3339;
use changewire_schemas::{ChangeEvent, Codec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::rules::{Per, RulesFile, Subject};
use super::{in_window, window_key};
use crate::config::ConsumerConfig;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `alert dry-run` flags.
#[derive(Debug, clap::Args)]
pub struct DryRun {
    /// The service's config: its rules file, and the Kafka settings for `--topic`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A rules file to try instead of the config's.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Events, one JSON envelope per line.
    #[arg(long, conflicts_with = "topic")]
    events: Option<PathBuf>,
    /// A topic, read from the beginning to its end (needs `--config`).
    #[arg(long)]
    topic: Option<String>,
    /// Read at most this many records.
    #[arg(long, default_value_t = 1_000_000)]
    max: usize,
    /// One JSON object per firing instead of text.
    #[arg(long)]
    json: bool,
}

/// The `alert` tools.
#[derive(Debug, clap::Subcommand)]
pub enum AlertCommand {
    /// Which rules would fire on a file of events or a topic, and why.
    DryRun(DryRun),
}

/// Runs `command`; `Ok(true)` when it ran to the end.
pub async fn run(command: AlertCommand) -> Result<bool, BoxError> {
    let AlertCommand::DryRun(flags) = command;
    let config = flags
        .config
        .as_deref()
        .map(ConsumerConfig::load)
        .transpose()?;
    let rules_path = match (&flags.rules, config.as_ref().and_then(|c| c.alert.as_ref())) {
        (Some(path), _) => path.clone(),
        (None, Some(alert)) => alert.rules_file.clone(),
        (None, None) => return Err("give --rules, or --config with an [alert] section".into()),
    };
    let rules = RulesFile::load(&rules_path)?;
    let mut events = match (&flags.events, &flags.topic, &config) {
        (Some(path), _, _) => read_file(path, flags.max)?,
        (None, Some(topic), Some(config)) => read_topic(config, topic, flags.max)?,
        _ => return Err("give --events FILE, or --topic TOPIC with --config".into()),
    };
    // Partitions are read one after another: windows need the changes' order.
    events.sort_by_key(|e| e.source.ts_ms);
    let mut report = Report::default();
    for event in &events {
        report.evaluate(&rules, event, flags.json);
    }
    eprintln!("{} events read; fired: {:?}", events.len(), report.fired);
    Ok(true)
}

/// What the rules did, as they would have.
#[derive(Default)]
struct Report {
    windows: HashMap<String, Vec<i64>>,
    firing: HashMap<String, bool>,
    fired: BTreeMap<String, usize>,
}

impl Report {
    fn evaluate(&mut self, rules: &RulesFile, event: &ChangeEvent, json: bool) {
        let subject = Subject::of(event);
        for rule in &rules.rules {
            let Some(mut reasons) = rule.matches(event, &subject) else {
                continue;
            };
            if let Some(threshold) = &rule.threshold {
                let key = window_key(rule, event, &subject, threshold.per);
                let times = self.windows.entry(key.clone()).or_default();
                *times = in_window(
                    std::mem::take(times),
                    event.source.ts_ms,
                    threshold.within_s,
                );
                let firing = self.firing.entry(key).or_default();
                let holds = times.len() >= threshold.count as usize;
                let newly = holds && !*firing;
                *firing = holds;
                if !newly {
                    continue;
                }
                let per = match threshold.per {
                    Per::Actor => "actor",
                    Per::Resource => "resource",
                };
                reasons.push(format!(
                    "{} matching changes by one {per} within {} s",
                    times.len(),
                    threshold.within_s
                ));
            }
            *self.fired.entry(rule.name.clone()).or_default() += 1;
            let actor = event.actor.as_ref().map_or("someone", |a| a.name.as_str());
            if json {
                let line = serde_json::json!({
                    "rule": rule.name, "severity": rule.severity.as_str(), "event_id": event.id.as_str(),
                    "at": rfc3339(event.source.ts_ms), "resource": subject.resource(), "actor": actor, "reasons": reasons,
                });
                println!("{line}");
            } else {
                println!(
                    "{} {:<8} {} by {actor} on {} ({}): {}",
                    rfc3339(event.source.ts_ms),
                    rule.severity.as_str(),
                    rule.name,
                    subject.resource(),
                    event.id.as_str(),
                    reasons.join("; ")
                );
            }
        }
    }
}

fn read_file(path: &PathBuf, max: usize) -> Result<Vec<ChangeEvent>, BoxError> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut events = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate().take(max) {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(event) => events.push(event),
            Err(error) => eprintln!(
                "{}:{}: not an event, skipped: {error}",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(events)
}

/// Every partition of `topic` from its beginning until the consumer reaches its
/// end (librdkafka's partition EOF: the watermark API is not reliable on every
/// Kafka-compatible broker).
fn read_topic(
    config: &ConsumerConfig,
    topic: &str,
    max: usize,
) -> Result<Vec<ChangeEvent>, BoxError> {
    let mut client = crate::runtime::client_config(&config.runtime());
    client
        .set("group.id", "changewire-alert-dry-run")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = client.create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut reading: HashSet<i32> = (metadata.topics().iter())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if reading.is_empty() {
        return Err(format!("topic {topic} has no partitions (does it exist?)").into());
    }
    let mut assignment = TopicPartitionList::new();
    for &partition in &reading {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let codec = Codec::json()?;
    let mut events = Vec::new();
    while !reading.is_empty() && events.len() < max {
        let message = match consumer.poll(timeout) {
            None => return Err(format!("nothing read from {topic} within {timeout:?}").into()),
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                reading.remove(&partition);
                continue;
            }
            Some(message) => message?,
        };
        match message.payload().map(|v| codec.decode(v)) {
            Some(Ok(event)) => events.push(event),
            _ => eprintln!(
                "{topic}/{}@{}: not an event, skipped",
                message.partition(),
                message.offset()
            ),
        }
    }
    Ok(events)
}
