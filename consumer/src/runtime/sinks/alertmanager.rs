//! A Prometheus Alertmanager sink (API v2).
//!
//! Each effect's payload is one alert (`labels`, `annotations`, `startsAt`,
//! `endsAt`, `generatorURL`); a chunk is one `POST <url>/api/v2/alerts` of their
//! array. Alertmanager merges alerts with equal labels, so sending one again
//! after a crash updates it rather than adding another. Answers: network
//! errors, timeouts, 401, 403, 404, 408, 429, 502, 503, 504 pause the sink and
//! retry without end; other 5xx are transient; a 400 (an alert Alertmanager
//! refuses) sends the chunk's alerts one by one, so only the refused one goes to
//! the DLQ with Alertmanager's reason.

use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::webhook::{check_http_url, retry_after, status_error};
use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// An Alertmanager sink's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Alertmanager's base URL (`http://alertmanager:9093`).
    pub url: String,
    /// A bearer token, for an Alertmanager behind an authenticating proxy
    /// (never logged).
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Alerts per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_batch_size() -> usize {
    100
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for AlertmanagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertmanagerConfig")
            .field("url", &self.url)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// Posts alerts to Alertmanager.
pub struct AlertmanagerSink {
    config: AlertmanagerConfig,
    http: reqwest::Client,
}

impl AlertmanagerSink {
    /// A sink posting as `config` says; `section` names it in messages.
    pub fn new(config: &AlertmanagerConfig, section: &'static str) -> Result<Self, ConfigError> {
        check_http_url(section, &config.url)?;
        if config.batch_size == 0 || config.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                section,
                "batch_size and timeout_ms must be at least 1",
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        Ok(Self {
            config: config.clone(),
            http,
        })
    }

    async fn post(&self, effects: &[Arc<Pending>]) -> Result<(), Failure> {
        let mut body = b"[".to_vec();
        for (n, pending) in effects.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&pending.effect.payload);
        }
        body.push(b']');
        let url = format!("{}/api/v2/alerts", self.config.url.trim_end_matches('/'));
        let mut request = self
            .http
            .post(&url)
            .header("content-type", "application/json");
        if let Some(token) = &self.config.bearer_token {
            request = request.bearer_auth(token);
        }
        let response = match request.body(body).send().await {
            Ok(response) => response,
            Err(error) => {
                return Err(Failure {
                    status: None,
                    message: changewire_schemas::diagnostics::report(&error),
                    retry_after: None,
                })
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = retry_after(&response);
        let text = response.text().await.unwrap_or_default();
        Err(Failure {
            status: Some(status),
            message: format!("{url} answered {status}: {}", text.trim()),
            retry_after,
        })
    }
}

/// A request that did not land.
struct Failure {
    /// Alertmanager's answer; none when it did not answer.
    status: Option<StatusCode>,
    message: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn error(&self) -> SinkError {
        match self.status {
            Some(status) => status_error(status, self.message.clone().into(), self.retry_after),
            None => SinkError::unavailable(self.message.clone()),
        }
    }
}

impl Sink for AlertmanagerSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        match self.post(effects).await {
            Ok(()) => effects.iter().map(|_| Delivery::Delivered).collect(),
            // One refused alert fails the whole request: find it.
            Err(failure)
                if failure.status == Some(StatusCode::BAD_REQUEST) && effects.len() > 1 =>
            {
                let mut deliveries = Vec::with_capacity(effects.len());
                for pending in effects {
                    deliveries.push(match self.post(std::slice::from_ref(pending)).await {
                        Ok(()) => Delivery::Delivered,
                        Err(failure) => Delivery::Failed(failure.error()),
                    });
                }
                deliveries
            }
            Err(failure) => effects
                .iter()
                .map(|_| Delivery::Failed(failure.error()))
                .collect(),
        }
    }

    fn max_chunk(&self) -> usize {
        self.config.batch_size
    }
}
