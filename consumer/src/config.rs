//! A consumer service's configuration file (TOML, `CHANGEWIRE_*` environment overrides).

use std::path::{Path, PathBuf};

use changewire_schemas::http::HttpConfig;
use changewire_schemas::settings::{load_config, ConfigError, KafkaConfig};
use changewire_schemas::topic::TopicsConfig;
use serde::{Deserialize, Serialize};

use crate::services::dedup::DedupConfig;
use crate::services::forward::ForwardConfig;

/// Everything `changewire-consumer` reads from its config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Kafka brokers and client properties (TLS/SASL pass through here).
    pub kafka: KafkaConfig,
    /// Topic naming (the DLQ is `<prefix>.dlq.<service>`).
    #[serde(default)]
    pub topics: TopicsConfig,
    /// `/metrics` and `/health`; not served when absent.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// Which service this process runs and where it keeps its state.
    pub service: ServiceConfig,
    /// Run the dedup service (`changewire-consumer` runs the one service whose
    /// section is present).
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// Run the forward (webhook) service.
    #[serde(default)]
    pub forward: Option<ForwardConfig>,
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
    /// Topics to subscribe: names, or `^regex` patterns as librdkafka accepts them.
    pub subscribe: Vec<String>,
    /// Directory of the service's sled database (state, processed ids, offsets).
    pub state_dir: PathBuf,
    /// How long processed event ids are remembered for deduplication, in days.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Most processed ids held (in memory, 19 to 39 bytes each); beyond it the
    /// oldest batches' ids are forgotten before their retention ends.
    #[serde(default = "default_max_processed_ids")]
    pub max_processed_ids: usize,
    /// Attempts at a transiently failing event before it goes to the DLQ.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Most records applied and committed to sled in one batch (one flush).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest wait, in milliseconds, for more records to fill a batch.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// How many offsets before its sled offset a partition is re-read from (the
    /// records below the sled offset are skipped unapplied). 0 is right for Apache
    /// Kafka; tansu 0.6 serves a fetch from inside a record batch with the next
    /// batch, so there set it above the producers' batch size (10000 covers
    /// librdkafka's default `batch.num.messages`).
    #[serde(default)]
    pub resume_rewind: i64,
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

fn default_max_batch() -> usize {
    1000
}

fn default_batch_linger_ms() -> u64 {
    20
}

impl ConsumerConfig {
    /// Loads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_config(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        let names = self
            .topics
            .names()
            .map_err(|e| ConfigError::invalid("topics.prefix", e.to_string()))?;
        names
            .dlq(&self.service.name)
            .map_err(|e| ConfigError::invalid("service.name", e.to_string()))?;
        if self.service.name.is_empty() {
            return Err(ConfigError::invalid("service.name", "must not be empty"));
        }
        if self.service.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "service.max_attempts",
                "must be at least 1",
            ));
        }
        if self.service.max_processed_ids < self.service.max_batch {
            return Err(ConfigError::invalid(
                "service.max_processed_ids",
                "must be at least service.max_batch",
            ));
        }
        if self.service.max_batch == 0 {
            return Err(ConfigError::invalid(
                "service.max_batch",
                "must be at least 1",
            ));
        }
        if self.service.resume_rewind < 0 {
            return Err(ConfigError::invalid(
                "service.resume_rewind",
                "must not be negative",
            ));
        }
        if let Some(forward) = &self.forward {
            forward.validate()?;
        }
        if self.service.subscribe.is_empty() {
            return Err(ConfigError::invalid(
                "service.subscribe",
                "expected at least one topic name or ^regex",
            ));
        }
        Ok(())
    }

    /// How long processed ids are kept.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.service.retention_days) * 86_400)
    }

    /// How long a batch waits to fill.
    pub fn batch_linger(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.service.batch_linger_ms)
    }

    /// The consumer group this service joins.
    pub fn group_id(&self) -> String {
        self.service
            .group_id
            .clone()
            .unwrap_or_else(|| format!("changewire-{}", self.service.name))
    }
}
