//! Topic creation: brokers may not auto-create topics, and when they do they use
//! their own defaults, not the ones changewire's guarantees rely on.

use std::time::Duration;

use changewire_schemas::settings::KafkaConfig;
use changewire_schemas::topic::TopicsConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::client::{client_config, Role};
use crate::PublishError;

/// How a topic is created when it does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor; `None` takes the broker's default.
    pub replication: Option<i32>,
    /// Broker-side topic settings (`cleanup.policy`, `retention.ms`, ...).
    pub settings: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic of `partitions` partitions with the broker's defaults otherwise.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication: None,
            settings: Vec::new(),
        }
    }

    /// Log compaction (`cleanup.policy=compact`): for topics whose records are
    /// keyed states and whose deletes are tombstones.
    pub fn compacted(self) -> Self {
        self.with_setting("cleanup.policy", "compact")
    }

    /// Sets one broker-side setting, replacing an earlier value.
    pub fn with_setting(mut self, name: &str, value: &str) -> Self {
        self.settings.retain(|(existing, _)| existing != name);
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Applies the `[topics]` section: its replication factor and settings win.
    pub fn configured(self, topics: &TopicsConfig) -> Self {
        let mut spec = topics
            .settings
            .iter()
            .fold(self, |spec, (name, value)| spec.with_setting(name, value));
        spec.replication = topics.replication_factor.or(spec.replication);
        spec
    }
}

/// Creates the topics of `specs` that do not exist yet; existing ones are left as
/// they are.
pub async fn ensure_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), PublishError> {
    create_missing(&admin_client(config)?, specs).await
}

/// An admin client with the `[kafka]` section's properties.
pub(crate) fn admin_client(
    config: &KafkaConfig,
) -> Result<AdminClient<DefaultClientContext>, PublishError> {
    client_config(config, Role::Admin)
        .create()
        .map_err(PublishError::Config)
}

/// Creates the topics of `specs` that do not exist yet, through `admin`.
pub(crate) async fn create_missing(
    admin: &AdminClient<DefaultClientContext>,
    specs: &[TopicSpec],
) -> Result<(), PublishError> {
    let topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            let replication = TopicReplication::Fixed(spec.replication.unwrap_or(-1));
            spec.settings.iter().fold(
                NewTopic::new(&spec.name, spec.partitions, replication),
                |topic, (name, value)| topic.set(name, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(PublishError::Config)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(PublishError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topics_section_wins_over_the_sources_choices() {
        let mut topics = TopicsConfig {
            replication_factor: Some(3),
            ..TopicsConfig::default()
        };
        topics
            .settings
            .insert("retention.ms".to_owned(), "604800000".to_owned());
        let spec = TopicSpec::new("t", 6).compacted().configured(&topics);
        assert_eq!(spec.replication, Some(3));
        assert_eq!(
            spec.settings,
            [
                ("cleanup.policy".to_owned(), "compact".to_owned()),
                ("retention.ms".to_owned(), "604800000".to_owned()),
            ]
        );
        topics
            .settings
            .insert("cleanup.policy".to_owned(), "compact,delete".to_owned());
        let spec = TopicSpec::new("t", 6).compacted().configured(&topics);
        assert!(spec
            .settings
            .contains(&("cleanup.policy".to_owned(), "compact,delete".to_owned())));
        assert_eq!(spec.settings.len(), 2, "{:?}", spec.settings);
    }
}
