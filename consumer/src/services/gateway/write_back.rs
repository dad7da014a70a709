//! Writing each custom resource's status back to its `status` subresource,
//! with the conditions Gateway API uses: `Accepted` (the spec is valid and fits
//! with the others) and `Programmed` (a gateway serves it), each with the
//! generation it describes. The handler emits a condition set when a
//! resource's state changes; this sink sends it as a JSON merge patch.
//!
//! Answers: 2xx delivered; 404 delivered too (the resource is gone, and its
//! status with it); 401, 403, 429, 5xx and no answer pause the sink and retry
//! without end (`/health` says why); another 4xx goes to the DLQ with the API
//! server's message.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::time::rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::desired::ResourceId;
use super::status::{ResourceState, ResourceStatus};
use crate::runtime::sinks::webhook::{retry_after, status_error};
use crate::runtime::{Delivery, Effect, Pending, Sink, SinkError, Store};

/// The `[gateway.status_write_back]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteBackConfig {
    /// The API server.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// A bearer token file (in a cluster, the service account's:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`); no token when
    /// absent.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The API server's CA (PEM; in a cluster `.../serviceaccount/ca.crt`); the
    /// system's roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_api_url() -> String {
    "https://kubernetes.default.svc".into()
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// The patch that writes `status` (of the resource's `metadata.generation`
/// it observed), as an effect keyed by the resource.
pub fn patch(status: &ResourceStatus) -> Effect {
    let generation = status.observed.unwrap_or_default();
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        json!({"type": kind, "status": if ok { "True" } else { "False" },
            "reason": reason, "message": message, "observedGeneration": generation,
            "lastTransitionTime": rfc3339(status.at_ms)})
    };
    let reason = status.reason.as_deref().unwrap_or_default();
    let conditions = match status.state {
        ResourceState::Accepted => vec![
            condition("Accepted", true, "Accepted", ""),
            condition("Programmed", false, "Pending", "waiting for the next apply"),
        ],
        ResourceState::Programmed => vec![
            condition("Accepted", true, "Accepted", ""),
            condition("Programmed", true, "Programmed", "served by the gateways"),
        ],
        ResourceState::Rejected | ResourceState::Deleted => {
            let why = if reason.contains("conflicts with") {
                "Conflicted"
            } else {
                "Invalid"
            };
            vec![
                condition("Accepted", false, why, reason),
                condition("Programmed", false, why, reason),
            ]
        }
    };
    let body = json!({"status": {"observedGeneration": generation, "conditions": conditions}});
    Effect {
        destination: Some(status_path(&status.resource)),
        key: Some(status.resource.key().into_bytes()),
        ..Effect::new(body.to_string().into_bytes())
    }
}

/// The status subresource's path.
fn status_path(id: &ResourceId) -> String {
    let plural = changewire_schemas::gateway::plural(&id.kind);
    format!(
        "/apis/{}/{}/namespaces/{}/{plural}/{}/status",
        changewire_schemas::gateway::GROUP,
        changewire_schemas::gateway::VERSION,
        id.namespace,
        id.name
    )
}

/// Sends status patches to the API server.
pub struct WriteBackSink {
    api_url: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl WriteBackSink {
    /// The sink `config` describes; the token and CA files are read now.
    pub fn new(config: &WriteBackConfig) -> Result<Self, ConfigError> {
        const SECTION: &str = "gateway.status_write_back";
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                ConfigError::invalid(SECTION, format!("cannot read {}: {e}", path.display()))
            })
        };
        let token = match &config.token_file {
            Some(path) => Some(String::from_utf8_lossy(&read(path)?).trim().to_owned()),
            None => None,
        };
        let mut builder =
            reqwest::Client::builder().timeout(Duration::from_millis(config.timeout_ms.max(1)));
        if let Some(path) = &config.ca_file {
            let ca = reqwest::Certificate::from_pem(&read(path)?)
                .map_err(|e| ConfigError::invalid(SECTION, format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError::invalid(SECTION, e.to_string()))?;
        Ok(Self {
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    async fn send(&self, pending: &Pending) -> Result<(), SinkError> {
        let path = pending.effect.destination.as_deref().unwrap_or_default();
        let mut request = (self.http.patch(format!("{}{path}", self.api_url)))
            .header("content-type", "application/merge-patch+json")
            .body(pending.effect.payload.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SinkError::unavailable(format!("the API server did not answer: {e}")))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        let wait = retry_after(&response);
        let text = response.text().await.unwrap_or_default();
        let error = format!(
            "the API server answered {status} to {path}: {}",
            text.trim()
        )
        .into();
        Err(status_error(status, error, wait))
    }
}

impl Sink for WriteBackSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(effects.len());
        for pending in effects {
            match self.send(pending).await {
                Ok(()) => deliveries.push(Delivery::Delivered),
                Err(error) => {
                    deliveries.push(Delivery::Failed(error));
                    deliveries
                        .extend((deliveries.len()..effects.len()).map(|_| Delivery::NotAttempted));
                    break;
                }
            }
        }
        deliveries
    }

    fn max_chunk(&self) -> usize {
        100
    }
}

/// Whether `status` says the same to a reader of the resource as `other`
/// (the plan's generation, the gateway and the config digest change with
/// every apply; those alone are not worth a write).
pub fn same_to_a_reader(status: &ResourceStatus, other: &ResourceStatus) -> bool {
    status.state == other.state
        && status.reason == other.reason
        && status.observed == other.observed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::gateway::testing::id;

    #[test]
    fn a_status_becomes_gateway_api_conditions_on_the_status_subresource() {
        let mut status = ResourceStatus::new(
            id("RateLimitPolicy", "limit"),
            ResourceState::Rejected,
            Some("conflicts with Route/team/a".into()),
            0,
        );
        status.observed = Some(7);
        let effect = patch(&status);
        assert_eq!(
            effect.destination.as_deref(),
            Some("/apis/gateway.changewire.dev/v1alpha1/namespaces/team/ratelimitpolicies/limit/status")
        );
        let body: serde_json::Value = serde_json::from_slice(&effect.payload).expect("JSON");
        assert_eq!(body["status"]["observedGeneration"], 7);
        let accepted = &body["status"]["conditions"][0];
        assert_eq!(
            (
                accepted["type"].as_str(),
                accepted["status"].as_str(),
                accepted["reason"].as_str()
            ),
            (Some("Accepted"), Some("False"), Some("Conflicted"))
        );
        assert_eq!(accepted["lastTransitionTime"], "1970-01-01T00:00:00.000Z");
        let mut later = status.clone();
        later.generation = Some(9);
        assert!(
            same_to_a_reader(&status, &later),
            "a new plan alone is not worth a write"
        );
        later.observed = Some(8);
        assert!(!same_to_a_reader(&status, &later), "a new generation is");
    }
}
