//! Settings shared by every changewire binary: the Kafka client section and loading
//! a config file with environment overrides.
//!
//! A config file is TOML. Any environment variable `CHANGEWIRE_<SECTION>__<KEY>`
//! overrides `<section>.<key>` (double underscore between levels), e.g.
//! `CHANGEWIRE_KAFKA__BROKERS=kafka:9092`. Only `__` separates levels, so
//! librdkafka's dotted names work: `CHANGEWIRE_KAFKA__PROPERTIES__SASL.PASSWORD`.
//! Values are read as text and converted only where the key wants a number or a
//! boolean, so a secret such as `007123` stays exactly that. Unknown keys are
//! errors, in the file and in the environment, so a typo never silently falls
//! back to a default; a variable for a whole section this binary does not have
//! (another binary's, from a shared env file) is ignored with a warning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use figment::error::Kind;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
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
    let mut env = Environment::from_process();
    loop {
        let figment = Figment::from(Toml::file(path)).merge(&env);
        let error = match figment.extract_lossy() {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        match env.foreign_section(&error) {
            Some(section) => {
                eprintln!(
                    "warning: ignoring {ENV_PREFIX}{}__* variables: this binary has no [{section}] section",
                    section.to_uppercase()
                );
                env.sections.remove(&section);
            }
            None => return Err(ConfigError::Load(Box::new(error))),
        }
    }
}

/// The `CHANGEWIRE_*` variables as nested sections of text values.
#[derive(Debug, Clone, Default, PartialEq)]
struct Environment {
    sections: Dict,
}

/// What the environment provider is called in error messages.
const ENV_NAME: &str = "CHANGEWIRE_* environment variable";

impl Environment {
    fn from_process() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// `CHANGEWIRE_A__B__C=v` becomes `a.b.c = "v"`; names are lower-cased,
    /// values kept as text.
    fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut sections = Dict::new();
        for (name, value) in vars {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if name == crate::diagnostics::LOG_FORMAT_VAR {
                continue;
            }
            let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            if keys.iter().any(String::is_empty) {
                continue;
            }
            insert(&mut sections, &keys, value);
        }
        Self { sections }
    }

    /// The section an error is about when it is a whole section from the
    /// environment that the configuration does not have.
    fn foreign_section(&self, error: &figment::Error) -> Option<String> {
        let from_env = error.metadata.as_ref().is_some_and(|m| m.name == ENV_NAME);
        match &error.kind {
            Kind::UnknownField(field, _)
                if from_env && error.path.len() <= 1 && self.sections.contains_key(field) =>
            {
                Some(field.clone())
            }
            _ => None,
        }
    }
}

fn insert(dict: &mut Dict, keys: &[String], value: String) {
    match keys {
        [] => {}
        [last] => {
            dict.insert(last.clone(), Value::from(value));
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

impl Provider for &Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.sections.clone()))
    }
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
    fn environment_values_stay_text_and_dotted_names_stay_whole() {
        let env = Environment::from_vars([
            (
                "CHANGEWIRE_POSTGRES__PASSWORD".to_owned(),
                "007123".to_owned(),
            ),
            (
                "CHANGEWIRE_KAFKA__PROPERTIES__SASL.PASSWORD".to_owned(),
                "0.5".to_owned(),
            ),
            ("OTHER".to_owned(), "x".to_owned()),
        ]);
        let postgres = &env.sections["postgres"];
        assert_eq!(
            postgres.find_ref("password").and_then(Value::as_str),
            Some("007123")
        );
        let kafka = &env.sections["kafka"];
        let properties = kafka
            .find_ref("properties")
            .and_then(Value::as_dict)
            .expect("a dict");
        assert_eq!(
            properties.get("sasl.password").and_then(Value::as_str),
            Some("0.5")
        );
        assert_eq!(env.sections.len(), 2);
    }

    #[test]
    fn broker_list_without_port_is_rejected() {
        let mut config = kafka();
        config.brokers = "localhost".into();
        let error = config.validate().expect_err("no port");
        assert!(error.to_string().contains("kafka.brokers"), "{error}");
    }
}
