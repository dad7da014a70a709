//! The producer's configuration file (TOML, `CHANGEWIRE_*` environment overrides).

use std::path::{Path, PathBuf};

use changewire_schemas::settings::{load_config, one_or_many, ConfigError, KafkaConfig};
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::FormatConfig;
use serde::{Deserialize, Serialize};

use crate::kubernetes::KubernetesConfig;
use crate::postgres::PostgresConfig;
use crate::source::ChangeSource;
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
    /// PostgreSQL sources: `[postgres]` for one, `[[postgres]]` for each of several.
    #[serde(default, deserialize_with = "one_or_many")]
    pub postgres: Vec<PostgresConfig>,
    /// Kubernetes sources: `[kubernetes]` for one, `[[kubernetes]]` for each of several.
    #[serde(default, deserialize_with = "one_or_many")]
    pub kubernetes: Vec<KubernetesConfig>,
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
        for postgres in &self.postgres {
            postgres.validate()?;
        }
        for kubernetes in &self.kubernetes {
            kubernetes.validate()?;
        }
        self.check_sources_apart()?;
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

    /// Every configured change source, in file order (PostgreSQL first).
    pub fn sources(&self) -> Vec<Box<dyn ChangeSource>> {
        let postgres = self.postgres.iter().cloned().map(|c| Box::new(c) as Box<_>);
        let kubernetes = (self.kubernetes.iter().cloned()).map(|c| Box::new(c) as Box<_>);
        postgres.chain(kubernetes).collect()
    }

    /// Sources keep their state under their name (and PostgreSQL's under its slot),
    /// so no two may share one.
    fn check_sources_apart(&self) -> Result<(), ConfigError> {
        let names = (self.postgres.iter().map(|p| p.name.clone()))
            .chain(self.kubernetes.iter().map(|k| k.name.clone()));
        if let Some(name) = first_repeated(names) {
            return Err(ConfigError::invalid(
                "name",
                format!("two sources are named {name:?}; each needs its own name"),
            ));
        }
        if let Some(slot) = first_repeated(self.postgres.iter().map(PostgresConfig::slot_name)) {
            return Err(ConfigError::invalid(
                "postgres.slot",
                format!("two PostgreSQL sources use the slot {slot:?}; set `slot` apart"),
            ));
        }
        Ok(())
    }
}

fn first_repeated(values: impl Iterator<Item = String>) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    values.into_iter().find(|value| !seen.insert(value.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sources: &str) -> ProducerConfig {
        let text = format!("[kafka]\nbrokers = \"127.0.0.1:9092\"\n{sources}");
        toml::from_str(&text).expect("parses")
    }

    #[test]
    fn sources_are_listed_in_file_order_and_an_old_single_section_still_loads() {
        let one = parse("[postgres]\nname = \"db\"\nurl = \"postgres://u@h:5432/db\"\n");
        assert_eq!(one.postgres.len(), 1);
        let many = parse(
            "[[postgres]]\nname = \"a\"\nurl = \"postgres://u@h:5432/a\"\n\
             [[postgres]]\nname = \"b\"\nurl = \"postgres://u@h:5432/b\"\n\
             [kubernetes]\nname = \"c\"\napi_url = \"http://h\"\nwatch_all_crds = true\n",
        );
        many.validate().expect("valid");
        let names: Vec<_> = many.sources().iter().map(|s| s.name().to_owned()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn sources_must_not_share_a_name_or_a_slot() {
        let named_twice = parse(
            "[[postgres]]\nname = \"a\"\nurl = \"postgres://u@h:5432/a\"\nslot = \"s1\"\n\
             [kubernetes]\nname = \"a\"\napi_url = \"http://h\"\nwatch_all_crds = true\n",
        );
        let error = named_twice.validate().expect_err("same name").to_string();
        assert!(error.contains("two sources are named \"a\""), "{error}");
        let same_slot = parse(
            "[[postgres]]\nname = \"a\"\nurl = \"postgres://u@h:5432/a\"\nslot = \"s\"\n\
             [[postgres]]\nname = \"b\"\nurl = \"postgres://u@h:5432/b\"\nslot = \"s\"\n",
        );
        let error = same_slot.validate().expect_err("same slot").to_string();
        assert!(error.contains("postgres.slot"), "{error}");
    }
}
