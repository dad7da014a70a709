//! The sections of a service's config file the runtime reads: `[kafka]`,
//! `[topics]`, `[http]` and `[service]`. A binary adds its services' sections on
//! top (see `crate::config`).

use std::path::PathBuf;
use std::time::Duration;

use changewire_schemas::http::HttpConfig;
use changewire_schemas::settings::{ConfigError, KafkaConfig};
use changewire_schemas::topic::TopicsConfig;
use serde::{Deserialize, Serialize};

/// What the runtime needs to run one service.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Kafka brokers and client properties (TLS/SASL pass through here).
    pub kafka: KafkaConfig,
    /// Topic naming (the DLQ is `<prefix>.dlq.<service>`).
    pub topics: TopicsConfig,
    /// `/metrics` and `/health`; not served when absent.
    pub http: Option<HttpConfig>,
    /// The `[service]` section.
    pub service: ServiceConfig,
}

/// How the service's partitions are owned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    /// A dynamic consumer group: partitions move between instances (stateless or
    /// idempotent services).
    #[default]
    Group,
    /// A fixed set of partitions, assigned without a group: nothing moves, sled is
    /// the only truth (stateful services, or replicas that each need every event).
    Static,
}

/// The `[service]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name: names the consumer group and the DLQ topic.
    pub name: String,
    /// Consumer group id; defaults to `changewire-<name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Topics to subscribe: names, or `^regex` patterns as librdkafka accepts them
    /// (names only with `assignment = "static"`).
    pub subscribe: Vec<String>,
    /// Directory of the service's sled database (state, processed ids, offsets,
    /// the outbox).
    pub state_dir: PathBuf,
    /// `group` (default) or `static`.
    #[serde(default)]
    pub assignment: Assignment,
    /// With `assignment = "static"`: the partitions of every subscribed topic this
    /// instance reads; all of them when absent.
    #[serde(default)]
    pub partitions: Option<Vec<i32>>,
    /// How long processed event ids are remembered for deduplication, in days.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Most processed ids held (in memory, 19 to 39 bytes each); beyond it the
    /// oldest batches' ids are forgotten before their retention ends.
    #[serde(default = "default_max_processed_ids")]
    pub max_processed_ids: usize,
    /// Attempts at an event whose handler fails transiently before it goes to the
    /// DLQ.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How long, in seconds, a sink keeps retrying an effect that fails
    /// transiently before it goes to the DLQ (an unavailable sink is retried
    /// without end).
    #[serde(default = "default_give_up_after_s")]
    pub give_up_after_s: u64,
    /// Most records applied and committed to sled in one batch (one flush).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest wait, in milliseconds, for more records to fill a batch.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// How many offsets before its sled offset a partition is re-read from (the
    /// records below the sled offset are skipped unapplied). 0 is right for Apache
    /// Kafka; tansu 0.6 serves a fetch from inside a record batch with the next
    /// batch, which the runtime then seeks back from (see `gaps`): set it above
    /// the producers' batch size there (10000 covers librdkafka's default
    /// `batch.num.messages`) to save that seek.
    #[serde(default)]
    pub resume_rewind: i64,
    /// Effects waiting in the outbox above which fetching pauses (polling goes
    /// on); it resumes below half of it.
    #[serde(default = "default_outbox_high_mark")]
    pub outbox_high_mark: usize,
    /// Bytes of effects waiting above which fetching pauses, like
    /// `outbox_high_mark`.
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: usize,
    /// Milliseconds between calls of the handler's `tick`; never when absent.
    #[serde(default)]
    pub tick_interval_ms: Option<u64>,
    /// Seconds a subscribed partition may have no owner in the group before it
    /// is reported (metric, `/health`) and this instance rejoins the group.
    #[serde(default = "default_unowned_after_s")]
    pub unowned_after_s: u64,
}

fn default_retention_days() -> u32 {
    7
}

fn default_max_processed_ids() -> usize {
    20_000_000
}

fn default_max_attempts() -> u32 {
    5
}

fn default_give_up_after_s() -> u64 {
    3600
}

fn default_max_batch() -> usize {
    1000
}

fn default_batch_linger_ms() -> u64 {
    20
}

fn default_outbox_high_mark() -> usize {
    100_000
}

fn default_outbox_max_bytes() -> usize {
    256 << 20
}

fn default_unowned_after_s() -> u64 {
    30
}

impl ServiceConfig {
    /// A service named `name` reading `subscribe`, its state in `state_dir`, every
    /// other setting at its default.
    pub fn new(name: &str, subscribe: Vec<String>, state_dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            group_id: None,
            subscribe,
            state_dir,
            assignment: Assignment::Group,
            partitions: None,
            retention_days: default_retention_days(),
            max_processed_ids: default_max_processed_ids(),
            max_attempts: default_max_attempts(),
            give_up_after_s: default_give_up_after_s(),
            max_batch: default_max_batch(),
            batch_linger_ms: default_batch_linger_ms(),
            resume_rewind: 0,
            outbox_high_mark: default_outbox_high_mark(),
            outbox_max_bytes: default_outbox_max_bytes(),
            tick_interval_ms: None,
            unowned_after_s: default_unowned_after_s(),
        }
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("service.max_attempts", self.max_attempts as usize),
            ("service.max_batch", self.max_batch),
            ("service.outbox_high_mark", self.outbox_high_mark),
            ("service.outbox_max_bytes", self.outbox_max_bytes),
            ("service.unowned_after_s", self.unowned_after_s as usize),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.name.is_empty() {
            return Err(ConfigError::invalid("service.name", "must not be empty"));
        }
        if self.max_processed_ids < self.max_batch {
            return Err(ConfigError::invalid(
                "service.max_processed_ids",
                "must be at least service.max_batch",
            ));
        }
        if self.resume_rewind < 0 {
            return Err(ConfigError::invalid(
                "service.resume_rewind",
                "must not be negative",
            ));
        }
        if self.tick_interval_ms == Some(0) {
            return Err(ConfigError::invalid(
                "service.tick_interval_ms",
                "must be at least 1 (or absent for no ticks)",
            ));
        }
        if self.subscribe.is_empty() {
            return Err(ConfigError::invalid(
                "service.subscribe",
                "expected at least one topic name or ^regex",
            ));
        }
        self.validate_assignment()
    }

    fn validate_assignment(&self) -> Result<(), ConfigError> {
        match self.assignment {
            Assignment::Group if self.partitions.is_some() => Err(ConfigError::invalid(
                "service.partitions",
                "only with assignment = \"static\" (a group assigns partitions itself)",
            )),
            Assignment::Static if self.subscribe.iter().any(|t| t.starts_with('^')) => {
                Err(ConfigError::invalid(
                    "service.subscribe",
                    "assignment = \"static\" needs topic names, not ^patterns",
                ))
            }
            Assignment::Static
                if self
                    .partitions
                    .as_ref()
                    .is_some_and(|p| p.is_empty() || p.iter().any(|&p| p < 0)) =>
            {
                Err(ConfigError::invalid(
                    "service.partitions",
                    "expected partition numbers (0 or more), or no key for all partitions",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl RuntimeConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.service.validate()?;
        self.dlq_topic().map(|_| ())
    }

    /// The service's DLQ topic, `<prefix>.dlq.<service>`.
    pub fn dlq_topic(&self) -> Result<String, ConfigError> {
        self.topics
            .names()
            .map_err(|e| ConfigError::invalid("topics.prefix", e.to_string()))?
            .dlq(&self.service.name)
            .map_err(|e| ConfigError::invalid("service.name", e.to_string()))
    }

    /// How long processed ids are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.service.retention_days) * 86_400)
    }

    /// How long a batch waits to fill.
    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.service.batch_linger_ms)
    }

    /// The consumer group this service joins (or commits under, when static).
    pub fn group_id(&self) -> String {
        self.service
            .group_id
            .clone()
            .unwrap_or_else(|| format!("changewire-{}", self.service.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_assignment_needs_names_and_valid_partitions() {
        let mut service = ServiceConfig::new("s", vec!["^cw.*".into()], "/tmp/s".into());
        assert!(service.validate().is_ok(), "group takes patterns");
        service.assignment = Assignment::Static;
        let error = service.validate().expect_err("pattern").to_string();
        assert!(error.contains("service.subscribe"), "{error}");
        service.subscribe = vec!["cw.t".into()];
        service.partitions = Some(vec![]);
        let error = service.validate().expect_err("empty").to_string();
        assert!(error.contains("service.partitions"), "{error}");
        service.partitions = Some(vec![0, 2]);
        assert!(service.validate().is_ok());
        service.assignment = Assignment::Group;
        let error = service.validate().expect_err("group").to_string();
        assert!(error.contains("only with"), "{error}");
    }
}
