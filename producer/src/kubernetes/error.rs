//! The Kubernetes source's errors, classed transient or permanent.

use changewire_kafka::PublishError;
use changewire_schemas::topic::TopicNameError;
use changewire_schemas::CodecError;
use kube::runtime::watcher;

use super::audit::AuditServerError;
use super::state::StateError;

/// A Kubernetes source failure.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot configure the Kubernetes client")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The API server does not serve a configured kind.
    #[error("the API server does not serve {0}")]
    UnknownKind(String, #[source] kube::Error),
    /// An API call failed (server down, network).
    #[error("Kubernetes API request failed")]
    Api(#[source] kube::Error),
    /// The watch must start over with a fresh list (410 Gone answered as HTTP status).
    #[error("the watch resumed from an expired resourceVersion")]
    Expired(#[source] watcher::Error),
    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// An event could not be encoded.
    #[error("cannot encode an event")]
    Codec(#[from] CodecError),
    /// The object state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A kind's name makes no valid topic.
    #[error(transparent)]
    Topic(#[from] TopicNameError),
    /// The audit webhook endpoint cannot start.
    #[error(transparent)]
    Audit(#[from] AuditServerError),
}

impl KubernetesError {
    /// Whether retrying may succeed (the server or broker comes back).
    pub fn is_transient(&self) -> bool {
        match self {
            KubernetesError::Api(_) | KubernetesError::Expired(_) => true,
            KubernetesError::Codec(error) => error.is_transient(),
            KubernetesError::Publish(error) => error.is_transient(),
            _ => false,
        }
    }
}
