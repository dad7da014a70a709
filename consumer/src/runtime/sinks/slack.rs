//! A Slack-compatible incoming-webhook sink: each effect's payload (a JSON
//! message, `{"text": ...}`) is one `POST` to the webhook URL, in order.
//!
//! Answers: network errors, timeouts, 401, 403, 404 (a revoked webhook answers
//! `no_service`), 408, 429 (honouring `Retry-After`), 502, 503, 504 pause the
//! sink and retry without end; other 5xx are transient; another 4xx
//! (`invalid_payload`) sends that message to the DLQ with Slack's text.

use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};

use super::webhook::{check_http_url, retry_after, status_error};
use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// A Slack sink's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL (a secret: never logged).
    pub url: String,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackConfig")
            .field("url", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Posts messages to a Slack-compatible incoming webhook.
pub struct SlackSink {
    url: String,
    http: reqwest::Client,
}

impl SlackSink {
    /// A sink posting as `config` says; `section` names it in messages.
    pub fn new(config: &SlackConfig, section: &'static str) -> Result<Self, ConfigError> {
        check_http_url(section, &config.url)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .build()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        Ok(Self {
            url: config.url.clone(),
            http,
        })
    }

    async fn post(&self, pending: &Pending) -> Result<(), SinkError> {
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(pending.effect.payload.clone())
            .send()
            .await
            // The URL is the secret: say what failed without it.
            .map_err(|e| {
                SinkError::unavailable(format!(
                    "the Slack webhook did not answer: {}",
                    e.without_url()
                ))
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let wait = retry_after(&response);
        let text = response.text().await.unwrap_or_default();
        let error = format!("the Slack webhook answered {status}: {}", text.trim()).into();
        Err(status_error(status, error, wait))
    }
}

impl Sink for SlackSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(effects.len());
        for pending in effects {
            let delivery = match self.post(pending).await {
                Ok(()) => Delivery::Delivered,
                Err(error) => Delivery::Failed(error),
            };
            // After a failure the rest wait: Slack keeps the order of a channel.
            let failed = matches!(delivery, Delivery::Failed(_));
            deliveries.push(delivery);
            if failed {
                deliveries
                    .extend((deliveries.len()..effects.len()).map(|_| Delivery::NotAttempted));
                break;
            }
        }
        deliveries
    }

    fn max_chunk(&self) -> usize {
        50
    }
}
