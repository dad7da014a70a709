//! The `[postgres]` section: which database to tail and how.

use crate::pattern;
use std::fmt;
use std::str::FromStr;

use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};

/// How the initial snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Snapshot the published tables when the slot is created, then stream.
    #[default]
    Initial,
    /// Never snapshot: stream changes from the slot's position only.
    Never,
    /// Snapshot at every start (re-creating the slot), then stream.
    Always,
}

/// The `[postgres]` configuration section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Source name: appears in topics, event ids and `source.name`; `[a-zA-Z0-9_-]`.
    pub name: String,
    /// Connection URL, `postgres://user@host:port/database` (libpq style).
    pub url: String,
    /// Password; overrides one in `url` (set it from `CHANGEWIRE_POSTGRES__PASSWORD`).
    #[serde(default)]
    pub password: Option<String>,
    /// Replication slot name; default `changewire_<name>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication name; default `changewire_<name>`.
    #[serde(default)]
    pub publication: Option<String>,
    /// Tables to publish as `schema.table` patterns (`*` wildcard); empty = all tables.
    #[serde(default)]
    pub include: Vec<String>,
    /// Tables to leave out, as `schema.table` patterns.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Initial snapshot mode.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Rows per keyset page while snapshotting.
    #[serde(default = "default_snapshot_chunk")]
    pub snapshot_chunk_rows: u32,
    /// Publish a tombstone (null value) after every delete, for compacted topics.
    #[serde(default)]
    pub tombstones: bool,
    /// Partitions of the topics the producer creates.
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    /// Columns to redact, as `schema.table.column` patterns (`*` wildcard): their
    /// values are replaced by `hmac-sha256:<hex>` keyed with `redaction_key`.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Key of the redaction hash (set it from `CHANGEWIRE_POSTGRES__REDACTION_KEY`).
    #[serde(default)]
    pub redaction_key: Option<String>,
    /// TLS to the server.
    #[serde(default)]
    pub tls: super::tls::TlsSettings,
    /// Events published but not yet acknowledged before reading WAL pauses.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_snapshot_chunk() -> u32 {
    10_000
}

fn default_partitions() -> i32 {
    3
}

fn default_max_in_flight() -> usize {
    100_000
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("slot", &self.slot_name())
            .field("publication", &self.publication_name())
            .field("include", &self.include)
            .field("exclude", &self.exclude)
            .field("snapshot", &self.snapshot)
            .field("redact", &self.redact)
            .field(
                "redaction_key",
                &self.redaction_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

impl PostgresConfig {
    /// The replication slot to use.
    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("changewire_{}", self.name.replace('-', "_")))
    }

    /// The publication to use.
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("changewire_{}", self.name.replace('-', "_")))
    }

    /// Connection settings for ordinary (non-replication) sessions.
    pub fn connection(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| {
            ConfigError::invalid("postgres.url", format!("{}: {e}", redact_url(&self.url)))
        })?;
        if let Some(password) = &self.password {
            config.password(password);
        }
        if config.get_dbname().is_none() || config.get_user().is_none() {
            return Err(ConfigError::invalid(
                "postgres.url",
                "expected postgres://user@host:port/database",
            ));
        }
        Ok(config)
    }

    /// The column redactor, when columns are configured for redaction.
    pub fn redactor(&self) -> Option<crate::redact::Redactor> {
        let key = self.redaction_key.as_deref()?;
        (!self.redact.is_empty())
            .then(|| crate::redact::Redactor::new(key.as_bytes(), self.redact.clone()))
    }

    /// Whether `schema.table` is published under the include/exclude patterns.
    pub fn publishes(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        let included =
            self.include.is_empty() || self.include.iter().any(|p| pattern::matches(p, &name));
        included && !self.exclude.iter().any(|p| pattern::matches(p, &name))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(ConfigError::invalid(
                "postgres.name",
                format!("expected [a-zA-Z0-9_-]+, got {:?}", self.name),
            ));
        }
        self.connection()?;
        self.tls.validate()?;
        for (key, name) in [
            ("postgres.slot", self.slot_name()),
            ("postgres.publication", self.publication_name()),
        ] {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("expected [a-z0-9_]+, got {name:?}"),
                ));
            }
        }
        for pattern in self.include.iter().chain(&self.exclude) {
            if !pattern.contains('.') {
                return Err(ConfigError::invalid(
                    "postgres.include",
                    format!("pattern {pattern:?} must be schema.table (use * as wildcard)"),
                ));
            }
        }
        for pattern in &self.redact {
            if pattern.split('.').count() != 3 {
                return Err(ConfigError::invalid(
                    "postgres.redact",
                    format!("pattern {pattern:?} must be schema.table.column (use * as wildcard)"),
                ));
            }
        }
        if !self.redact.is_empty() && self.redaction_key.as_deref().is_none_or(|k| k.len() < 16) {
            return Err(ConfigError::invalid(
                "postgres.redaction_key",
                "redact is set: a key of at least 16 characters is required (CHANGEWIRE_POSTGRES__REDACTION_KEY)",
            ));
        }
        if self.topic_partitions < 1 || self.max_in_flight == 0 || self.snapshot_chunk_rows == 0 {
            return Err(ConfigError::invalid(
                "postgres",
                "topic_partitions, max_in_flight and snapshot_chunk_rows must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(include: &[&str], exclude: &[&str]) -> PostgresConfig {
        PostgresConfig {
            name: "shop".into(),
            url: "postgres://u:secret@h:5432/db".into(),
            password: None,
            slot: None,
            publication: None,
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            snapshot: SnapshotMode::Initial,
            snapshot_chunk_rows: 10,
            tombstones: false,
            topic_partitions: 1,
            redact: vec![],
            redaction_key: None,
            tls: Default::default(),
            max_in_flight: 10,
        }
    }

    #[test]
    fn include_and_exclude_patterns() {
        let c = config(&["public.*", "audit.events"], &["public.tmp_*"]);
        assert!(c.publishes("public", "orders"));
        assert!(c.publishes("audit", "events"));
        assert!(!c.publishes("audit", "other"));
        assert!(!c.publishes("public", "tmp_x"));
        assert!(config(&[], &[]).publishes("any", "table"));
    }

    #[test]
    fn debug_output_hides_the_password() {
        let shown = format!("{:?}", config(&[], &[]));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("changewire_shop"), "{shown}");
    }

    #[test]
    fn redaction_needs_a_key_and_column_patterns() {
        let mut c = config(&[], &[]);
        c.redact = vec!["public.users.password".into()];
        let error = c.validate().expect_err("no key").to_string();
        assert!(error.contains("postgres.redaction_key"), "{error}");
        c.redaction_key = Some("0123456789abcdef".into());
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        c.redact = vec!["users.password".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn invalid_names_are_rejected() {
        let mut c = config(&[], &[]);
        c.name = "has space".into();
        assert!(c.validate().is_err());
        let mut c = config(&["orders"], &[]);
        assert!(c
            .validate()
            .expect_err("no schema")
            .to_string()
            .contains("schema.table"));
        c.include.clear();
        c.url = "not a url".into();
        assert!(c.validate().is_err());
    }
}
