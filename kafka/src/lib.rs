//! changewire's Kafka plumbing, shared by the producer's sources and the consumer
//! runtime's Kafka sink:
//!
//! - [`client`]: client configuration per role, always with the user's properties;
//! - [`topic`]: topic creation with the settings changewire relies on;
//! - [`Record`]: the one record type;
//! - [`publisher`]: the ordered publisher (lanes, marks, delivery metrics).

mod acks;
pub mod client;
pub mod publisher;
mod record;
pub mod topic;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

pub use client::{client_config, Role};
pub use publisher::{Landed, Lane, PublishMetrics, Publisher, Receipt};
pub use record::Record;
pub use topic::{ensure_topics, TopicSpec};

/// Why a record or a topic did not make it to Kafka.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The client refused the record before queueing it (too large, unknown
    /// partition, ...).
    #[error("the Kafka client refused a record for {topic}")]
    Rejected {
        /// Destination topic.
        topic: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The broker rejected the record or delivery failed.
    #[error("Kafka delivery to {topic} failed")]
    Delivery {
        /// Destination topic.
        topic: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// A topic could not be created.
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        /// Topic name.
        topic: String,
        /// The broker's answer.
        code: RDKafkaErrorCode,
    },
    /// The client could not be created or asked the cluster.
    #[error("Kafka client failed")]
    Config(#[source] KafkaError),
    /// The lane was dropped or its report lost before the record settled.
    #[error("no delivery report arrived for the record")]
    Canceled,
    /// A metadata lookup's thread ended before it answered.
    #[error("the Kafka metadata lookup was interrupted")]
    Interrupted,
}

impl PublishError {
    /// Whether the same record may succeed later (broker down, leader moving); a
    /// permanent error (record too large, bad config) needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::CreateTopic { .. }
            | PublishError::Canceled
            | PublishError::Interrupted => true,
            PublishError::Rejected { source, .. } | PublishError::Delivery { source, .. } => {
                matches!(
                    source.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageTimedOut
                            | RDKafkaErrorCode::AllBrokersDown
                            | RDKafkaErrorCode::BrokerTransportFailure
                            | RDKafkaErrorCode::RequestTimedOut
                            | RDKafkaErrorCode::NotEnoughReplicas
                            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                            | RDKafkaErrorCode::LeaderNotAvailable
                            | RDKafkaErrorCode::NotLeaderForPartition
                    )
                )
            }
            PublishError::Config(_) => false,
        }
    }
}
