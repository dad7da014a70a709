//! Topic creation: brokers may not auto-create topics, and when they do they use
//! their own defaults, not the ones changewire's guarantees rely on.

use std::time::Duration;

use changewire_schemas::settings::KafkaConfig;
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
