//! Settings shared by every changewire binary: the Kafka client section and loading
//! a config file with environment overrides.
//!
//! A config file is TOML. Any environment variable `CHANGEWIRE_<SECTION>__<KEY>`
//! overrides `<section>.<key>` (double underscore between levels), e.g.
//! `CHANGEWIRE_KAFKA__BROKERS=kafka:9092`. Unknown keys are errors, whether they come
//! from the file or the environment, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "CHANGEWIRE_";

/// Property-name fragments whose values are secrets and must never be logged.
const SECRET_MARKERS: &[&str] = &["password", "secret", "key", "token", "jaas"];

/// The `[kafka]` section: where the brokers are and any librdkafka properties.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` bootstrap list.
    pub brokers: String,
    /// librdkafka properties passed through verbatim: `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`, ...
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Every client property, `bootstrap.servers` first; pass-through properties may
    /// not override the bootstrap list.
    pub fn client_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once(("bootstrap.servers", self.brokers.as_str())).chain(
            self.properties
                .iter()
                .filter(|(k, _)| k.as_str() != "bootstrap.servers")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// Checks the section makes sense before anything connects.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.split(',').any(|b| !b.trim().contains(':')) {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                format!(
                    "expected a comma-separated host:port list, got {:?}",
                    self.brokers
                ),
            ));
        }
        Ok(())
    }
}

/// True for property names whose values must be redacted in logs.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|marker| name.contains(marker))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &redacted)
            .finish()
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable, not TOML, or has unknown or mistyped keys.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// A key parsed but its value is not acceptable.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// Dotted key path.
        key: &'static str,
        /// What was expected.
        reason: String,
    },
}

impl ConfigError {
    /// An invalid value for `key`.
    pub fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// Loads `T` from a TOML file plus `CHANGEWIRE_*` environment overrides.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::invalid(
            "--config",
            format!("{} does not exist or is not a file", path.display()),
        ));
    }
    Figment::from(Toml::file(path))
        .merge(Env::prefixed(ENV_PREFIX).split("__"))
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka() -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            properties: BTreeMap::from([
                ("sasl.password".to_owned(), "hunter2".to_owned()),
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("bootstrap.servers".to_owned(), "elsewhere:1".to_owned()),
            ]),
        }
    }

    #[test]
    fn debug_output_redacts_secret_properties() {
        let shown = format!("{:?}", kafka());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
    }

    #[test]
    fn pass_through_properties_cannot_replace_the_broker_list() {
        let config = kafka();
        let props: Vec<_> = config.client_properties().collect();
        assert_eq!(props[0], ("bootstrap.servers", "127.0.0.1:9092"));
        assert_eq!(
            props
                .iter()
                .filter(|(k, _)| *k == "bootstrap.servers")
                .count(),
            1
        );
        assert!(props.contains(&("security.protocol", "SASL_SSL")));
    }

    #[test]
    fn broker_list_without_port_is_rejected() {
        let mut config = kafka();
        config.brokers = "localhost".into();
        let error = config.validate().expect_err("no port");
        assert!(error.to_string().contains("kafka.brokers"), "{error}");
    }
}
