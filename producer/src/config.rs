//! The producer's configuration file (TOML, `CHANGEWIRE_*` environment overrides).

use std::path::{Path, PathBuf};

use changewire_schemas::settings::{load_config, ConfigError, KafkaConfig};
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::FormatConfig;
use serde::{Deserialize, Serialize};

use crate::kubernetes::KubernetesConfig;
use crate::postgres::PostgresConfig;
use changewire_schemas::http::HttpConfig;

/// Everything `changewire-producer` reads from its config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    /// Kafka brokers and client properties (TLS/SASL pass through here).
    pub kafka: KafkaConfig,
    /// Topic naming.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Value format (JSON or Avro) and schema registry.
    #[serde(default)]
    pub format: FormatConfig,
    /// Directory of the producer's sled checkpoints.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The `/metrics` and `/health` endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// The PostgreSQL source, if any.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// The Kubernetes source, if any.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("changewire-state")
}

impl ProducerConfig {
    /// Loads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_config(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if let Some(postgres) = &self.postgres {
            postgres.validate()?;
        }
        if let Some(kubernetes) = &self.kubernetes {
            kubernetes.validate()?;
        }
        self.topics
            .names()
            .map_err(|e| ConfigError::invalid("topics.prefix", e.to_string()))?;
        if let Some(registry) = &self.format.schema_registry {
            if !registry.url.starts_with("http://") && !registry.url.starts_with("https://") {
                return Err(ConfigError::invalid(
                    "format.schema_registry.url",
                    format!(
                        "expected an http:// or https:// URL, got {:?}",
                        registry.url
                    ),
                ));
            }
        }
        Ok(())
    }
}
