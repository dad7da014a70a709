//! Topic names: `<prefix>.<source>.<schema>.<table>`, `<prefix>.<source>.<group>.<kind>`,
//! and `<prefix>.dlq.<consumer>`.
//!
//! Kafka allows `[a-zA-Z0-9._-]` in topic names, at most 249 characters. Name parts
//! that contain anything else (Postgres allows almost any identifier) have those
//! characters replaced by `_`, so every table maps to a valid topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Group segment used for the Kubernetes core API group (whose name is empty).
pub const CORE_GROUP: &str = "core";

/// The `[topics]` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Prefix of every topic name (default `changewire`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Replication factor of the topics changewire creates (default: the broker's).
    #[serde(default)]
    pub replication_factor: Option<i32>,
    /// Topic settings of the topics changewire creates, passed to the broker as
    /// they are: `retention.ms`, `cleanup.policy`, `min.insync.replicas`, ... They
    /// win over changewire's own choices (`cleanup.policy=compact` with tombstones).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            prefix: default_prefix(),
            replication_factor: None,
            settings: BTreeMap::new(),
        }
    }
}

fn default_prefix() -> String {
    "changewire".to_owned()
}

impl TopicsConfig {
    /// Validated topic names for this section.
    pub fn names(&self) -> Result<TopicNames, TopicNameError> {
        TopicNames::new(self.prefix.clone())
    }
}

/// Builds every topic name from one configured prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicNames {
    prefix: String,
}

/// A topic-name part that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicNameError {
    /// The configured prefix is empty or has characters Kafka rejects.
    #[error("topic prefix {0:?} must be non-empty and use only [a-zA-Z0-9._-]")]
    InvalidPrefix(String),
    /// The composed name is longer than Kafka allows.
    #[error("topic name {0:?} is longer than {MAX_TOPIC_LEN} characters")]
    TooLong(String),
}

impl TopicNames {
    /// Topic names under `prefix` (e.g. `changewire`).
    pub fn new(prefix: impl Into<String>) -> Result<Self, TopicNameError> {
        let prefix = prefix.into();
        if prefix.is_empty() || !prefix.chars().all(is_topic_char) {
            return Err(TopicNameError::InvalidPrefix(prefix));
        }
        Ok(Self { prefix })
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic for the rows of one Postgres table.
    pub fn postgres_table(
        &self,
        source: &str,
        schema: &str,
        table: &str,
    ) -> Result<String, TopicNameError> {
        self.compose(&[source, schema, table])
    }

    /// Topic for one Kubernetes kind; the core group is spelled [`CORE_GROUP`].
    pub fn kubernetes_kind(
        &self,
        source: &str,
        group: &str,
        kind: &str,
    ) -> Result<String, TopicNameError> {
        let group = if group.is_empty() { CORE_GROUP } else { group };
        self.compose(&[source, group, kind])
    }

    /// Dead-letter topic of one consumer service.
    pub fn dlq(&self, consumer: &str) -> Result<String, TopicNameError> {
        self.compose(&["dlq", consumer])
    }

    /// Where the dedup service republishes `raw_topic`: `<prefix>.dedup.<suffix>`,
    /// the suffix being the raw topic's name after `<prefix>.` (or all of it).
    pub fn dedup(&self, raw_topic: &str) -> Result<String, TopicNameError> {
        let suffix = raw_topic
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(raw_topic);
        self.compose(&["dedup", suffix])
    }

    fn compose(&self, parts: &[&str]) -> Result<String, TopicNameError> {
        let mut name = self.prefix.clone();
        for part in parts {
            name.push('.');
            name.extend(part.chars().map(|c| if is_topic_char(c) { c } else { '_' }));
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err(TopicNameError::TooLong(name));
        }
        Ok(name)
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> TopicNames {
        TopicNames::new("cw").expect("valid prefix")
    }

    #[test]
    fn dedup_topics_keep_the_raw_suffix() {
        assert_eq!(
            names().dedup("cw.shop.public.orders").as_deref(),
            Ok("cw.dedup.shop.public.orders")
        );
        assert_eq!(names().dedup("other").as_deref(), Ok("cw.dedup.other"));
    }

    #[test]
    fn postgres_topics_follow_the_contract() {
        let topic = names().postgres_table("shop", "public", "orders");
        assert_eq!(topic.as_deref(), Ok("cw.shop.public.orders"));
    }

    #[test]
    fn kubernetes_core_group_is_named_core() {
        assert_eq!(
            names().kubernetes_kind("prod", "", "ConfigMap").as_deref(),
            Ok("cw.prod.core.ConfigMap")
        );
        assert_eq!(
            names()
                .kubernetes_kind("prod", "gateway.networking.k8s.io", "HTTPRoute")
                .as_deref(),
            Ok("cw.prod.gateway.networking.k8s.io.HTTPRoute")
        );
    }

    #[test]
    fn characters_kafka_rejects_are_replaced() {
        let topic = names().postgres_table("shop", "My Schema", "naïve/table");
        assert_eq!(topic.as_deref(), Ok("cw.shop.My_Schema.na_ve_table"));
    }

    #[test]
    fn invalid_prefix_and_overlong_names_are_errors() {
        assert!(matches!(
            TopicNames::new("bad prefix"),
            Err(TopicNameError::InvalidPrefix(_))
        ));
        assert!(matches!(
            TopicNames::new(""),
            Err(TopicNameError::InvalidPrefix(_))
        ));
        let long = "t".repeat(MAX_TOPIC_LEN);
        assert!(matches!(
            names().postgres_table("s", "public", &long),
            Err(TopicNameError::TooLong(_))
        ));
    }

    #[test]
    fn dlq_topic_follows_the_contract() {
        assert_eq!(names().dlq("audit").as_deref(), Ok("cw.dlq.audit"));
    }
}
