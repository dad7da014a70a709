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
//!
//! A section that may be given several times (`[[postgres]]`) is addressed by the
//! entry's `name` (or its index) after the section:
//! `CHANGEWIRE_POSTGRES__ORDERS__PASSWORD` sets the password of the entry named
//! `orders` (`-` in a name is `_` here). With a single entry the name may be left
//! out, so `CHANGEWIRE_POSTGRES__PASSWORD` works whichever form the file uses.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use figment::error::Kind;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::{DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

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
    let file = Figment::from(Toml::file(path))
        .data()
        .map_err(|e| ConfigError::Load(Box::new(e)))?
        .remove(&Profile::Default)
        .unwrap_or_default();
    route_into_lists(&mut env.sections, &file)?;
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

/// Makes overrides aimed into a list of sections (`[[postgres]]` in `file`) apply
/// to the entry they name: the list, with them applied, replaces the file's.
fn route_into_lists(overrides: &mut Dict, file: &Dict) -> Result<(), ConfigError> {
    for (key, value) in overrides.iter_mut() {
        match (value, file.get(key)) {
            (value @ Value::Dict(..), Some(Value::Array(_, entries))) => {
                let Value::Dict(_, by_entry) = std::mem::replace(value, Value::from(0)) else {
                    unreachable!("matched a dict")
                };
                *value = Value::from(apply_to_entries(key, by_entry, entries.clone())?);
            }
            (Value::Dict(_, inner), Some(Value::Dict(_, file_inner))) => {
                route_into_lists(inner, file_inner)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies `by_entry` (entry name or index -> overrides) to the entries of the
/// `section` list; a key naming no entry is an override of the only entry.
fn apply_to_entries(
    section: &str,
    by_entry: Dict,
    mut entries: Vec<Value>,
) -> Result<Vec<Value>, ConfigError> {
    for (selector, overrides) in by_entry {
        let named = entries.iter().position(|entry| {
            entry
                .find_ref("name")
                .and_then(Value::as_str)
                .is_some_and(|name| name.to_lowercase().replace('-', "_") == selector)
        });
        let (index, overrides) = match (named, selector.parse::<usize>(), entries.len()) {
            (Some(index), _, _) => (index, overrides),
            (None, Ok(index), len) if index < len => (index, overrides),
            (None, _, 1) => (0, Value::from(Dict::from([(selector, overrides)]))),
            _ => {
                return Err(ConfigError::invalid(
                    "environment",
                    format!(
                        "{ENV_PREFIX}{}__{}__*: no [[{section}]] entry is named {selector:?}",
                        section.to_uppercase(),
                        selector.to_uppercase()
                    ),
                ))
            }
        };
        let (Value::Dict(_, mut overrides), Value::Dict(_, entry)) =
            (overrides, &mut entries[index])
        else {
            return Err(ConfigError::invalid(
                "environment",
                format!(
                    "{ENV_PREFIX}{}__*: expected keys of an entry",
                    section.to_uppercase()
                ),
            ));
        };
        route_into_lists(&mut overrides, entry)?;
        merge(entry, overrides);
    }
    Ok(entries)
}

/// Writes `overrides` into `target`, section by section.
fn merge(target: &mut Dict, overrides: Dict) {
    for (key, value) in overrides {
        match (target.get_mut(&key), value) {
            (Some(Value::Dict(_, inner)), Value::Dict(_, value)) => merge(inner, value),
            (_, value) => {
                target.insert(key, value);
            }
        }
    }
}

/// Deserializes a section given once (`[postgres]`) or as a list (`[[postgres]]`)
/// into a list; use with `#[serde(default, deserialize_with = "one_or_many")]`.
pub fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OneOrMany<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a section or a list of sections")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
            let one = T::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
            Ok(vec![one])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }

    deserializer.deserialize_any(OneOrMany(std::marker::PhantomData))
}

impl Provider for &Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.sections.clone()))
    }
}

/// Bearer tokens as a list, or as one comma-separated string (as an environment
/// override gives them); use with `#[serde(default, deserialize_with = "tokens")]`.
pub fn tokens<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tokens {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Tokens::deserialize(deserializer)? {
        Tokens::List(list) => list,
        Tokens::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
    })
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

    /// The file's `[[postgres]]` list after `vars` are routed into it.
    fn routed(vars: &[(&str, &str)]) -> Result<Vec<Value>, ConfigError> {
        let file: Dict = Figment::from(Toml::string(
            "[[postgres]]\nname = \"orders-db\"\nurl = \"a\"\n\
             [[postgres]]\nname = \"billing\"\nurl = \"b\"\n",
        ))
        .data()
        .expect("valid TOML")
        .remove(&Profile::Default)
        .expect("default profile");
        let mut env = Environment::from_vars(
            vars.iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        route_into_lists(&mut env.sections, &file)?;
        match env.sections.remove("postgres") {
            Some(Value::Array(_, entries)) => Ok(entries),
            other => panic!("not a list: {other:?}"),
        }
    }

    fn field<'a>(entry: &'a Value, key: &str) -> Option<&'a str> {
        entry.find_ref(key).and_then(Value::as_str)
    }

    #[test]
    fn list_entries_are_addressed_by_name_or_index() {
        let entries = routed(&[
            ("CHANGEWIRE_POSTGRES__ORDERS_DB__PASSWORD", "007"),
            ("CHANGEWIRE_POSTGRES__1__URL", "c"),
        ])
        .expect("routed");
        assert_eq!(field(&entries[0], "password"), Some("007"));
        assert_eq!(field(&entries[0], "url"), Some("a"), "the rest is kept");
        assert_eq!(field(&entries[1], "url"), Some("c"));
        assert_eq!(field(&entries[1], "password"), None);
    }

    #[test]
    fn an_override_naming_no_entry_of_several_is_an_error() {
        let error = routed(&[("CHANGEWIRE_POSTGRES__PASSWORD", "007")]).expect_err("ambiguous");
        let message = error.to_string();
        assert!(
            message.contains("CHANGEWIRE_POSTGRES__PASSWORD__*"),
            "{message}"
        );
        assert!(message.contains("no [[postgres]] entry"), "{message}");
    }

    #[test]
    fn a_section_is_read_once_or_as_a_list() {
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Section {
            name: String,
        }
        #[derive(Deserialize, Debug)]
        struct File {
            #[serde(default, deserialize_with = "one_or_many")]
            source: Vec<Section>,
        }
        let read = |toml: &str| {
            Figment::from(Toml::string(toml))
                .extract::<File>()
                .map_err(|e| e.to_string())
        };
        let once = read("[source]\nname = \"a\"").expect("one");
        assert_eq!(once.source, [Section { name: "a".into() }]);
        let many = read("[[source]]\nname = \"a\"\n[[source]]\nname = \"b\"").expect("many");
        assert_eq!(many.source.len(), 2);
        assert!(read("").expect("none").source.is_empty());
        let error = read("[source]\nname = \"a\"\ntypo = 1").expect_err("unknown key");
        assert!(error.contains("typo"), "{error}");
    }

    #[test]
    fn broker_list_without_port_is_rejected() {
        let mut config = kafka();
        config.brokers = "localhost".into();
        let error = config.validate().expect_err("no port");
        assert!(error.to_string().contains("kafka.brokers"), "{error}");
    }
}
