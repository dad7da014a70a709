//! A Splunk HTTP Event Collector sink.
//!
//! Each chunk of effects is one `POST <url>/services/collector/event` of
//! concatenated envelopes `{"time", "host", "source", "sourcetype", "index",
//! "event"}` (the event is the effect's payload, a JSON document), with
//! `Authorization: Splunk <token>`. The envelope's time comes from the effect's
//! `changewire-time-ms` header.
//!
//! With `use_ack`, requests carry the channel (`X-Splunk-Request-Channel`), and a
//! chunk counts as delivered only once `POST /services/collector/ack` says its
//! `ackId` is indexed; an ack that does not come within `ack_timeout_ms` sends the
//! chunk again (HEC has no idempotency: the event ids inside let a search drop
//! repeats).
//!
//! Answers: network errors, timeouts, 401, 403, 404, 408, 429, 502, 503, 504 pause
//! the feed and retry without end; a 400 naming an `invalidEventNumber` means the
//! events before it were indexed, that one is rejected (dead-lettered with
//! HEC's text) and the rest are sent again; other 5xx are transient.

use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::webhook::{check_http_url, retry_after, status_error};
use super::{this_host, time_of};
use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// How often indexing acknowledgements are polled.
const ACK_POLL: Duration = Duration::from_millis(200);

/// A HEC sink's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HecConfig {
    /// The collector's URL (`https://splunk:8088`).
    pub url: String,
    /// The HEC token (set it from the environment; never logged).
    pub token: String,
    /// `index` of every event (default: the token's).
    #[serde(default)]
    pub index: Option<String>,
    /// `sourcetype` of every event.
    #[serde(default = "default_sourcetype")]
    pub sourcetype: String,
    /// `source` of every event.
    #[serde(default = "default_source")]
    pub source: String,
    /// `host` of every event (default: this machine's name).
    #[serde(default)]
    pub host: Option<String>,
    /// Wait for indexing acknowledgements (the token must have them enabled).
    #[serde(default)]
    pub use_ack: bool,
    /// The channel (a GUID) acknowledgements are tracked on; default: a new one
    /// per start.
    #[serde(default)]
    pub channel: Option<String>,
    /// How long to wait for an acknowledgement before sending again.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Events per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sourcetype() -> String {
    "_json".to_owned()
}

fn default_source() -> String {
    "changewire".to_owned()
}

fn default_ack_timeout_ms() -> u64 {
    30_000
}

fn default_batch_size() -> usize {
    500
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for HecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HecConfig")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("index", &self.index)
            .field("sourcetype", &self.sourcetype)
            .field("use_ack", &self.use_ack)
            .finish_non_exhaustive()
    }
}

impl HecConfig {
    /// Checks the settings; `section` names them in messages.
    pub fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        check_http_url(section, &self.url)?;
        if self.token.is_empty() || self.batch_size == 0 || self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                section,
                "token must be set; batch_size and timeout_ms at least 1",
            ));
        }
        Ok(())
    }
}

/// Sends effects to a Splunk HTTP Event Collector.
pub struct HecSink {
    config: HecConfig,
    host: String,
    channel: String,
    http: reqwest::Client,
}

impl HecSink {
    /// A sink sending as `config` says; `section` names it in messages.
    pub fn new(config: &HecConfig, section: &'static str) -> Result<Self, ConfigError> {
        config.validate(section)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        let host = config.host.clone().unwrap_or_else(this_host);
        Ok(Self {
            config: config.clone(),
            host,
            channel: (config.channel.clone()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.url.trim_end_matches('/'))
    }

    /// The concatenated envelopes of `effects`.
    fn body(&self, effects: &[Arc<Pending>]) -> Vec<u8> {
        let mut body = Vec::new();
        for pending in effects {
            let event: Value =
                serde_json::from_slice(&pending.effect.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&pending.effect.payload).into_owned())
                });
            let envelope = json!({
                "time": time_of(pending) as f64 / 1000.0,
                "host": self.host,
                "source": self.config.source,
                "sourcetype": self.config.sourcetype,
                "index": self.config.index,
                "event": event,
            });
            body.extend_from_slice(envelope.to_string().as_bytes());
        }
        body
    }

    fn request(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .post(self.url(path))
            .header("authorization", format!("Splunk {}", self.config.token));
        if self.config.use_ack {
            request.header("x-splunk-request-channel", &self.channel)
        } else {
            request
        }
    }

    async fn send(&self, effects: &[Arc<Pending>]) -> Result<Vec<Delivery>, SinkError> {
        let response = self
            .request("/services/collector/event")
            .header("content-type", "application/json")
            .body(self.body(effects))
            .send()
            .await
            .map_err(SinkError::unavailable)?;
        let status = response.status();
        let wait = retry_after(&response);
        let answer: Value = response.json().await.unwrap_or_default();
        if status == StatusCode::BAD_REQUEST {
            if let Some(invalid) = answer["invalidEventNumber"].as_u64() {
                return Ok(partly_indexed(effects.len(), invalid as usize, &answer));
            }
        }
        if !status.is_success() {
            let error = format!(
                "{} answered {status}: {}",
                self.url("/services/collector/event"),
                answer["text"]
            );
            return Err(status_error(status, error.into(), wait));
        }
        if self.config.use_ack {
            let ack = answer["ackId"].as_u64().ok_or_else(|| {
                SinkError::unavailable(
                    "use_ack is set but HEC answered no ackId: enable acknowledgement on the token",
                )
            })?;
            self.wait_for_ack(ack).await?;
        }
        Ok(effects.iter().map(|_| Delivery::Delivered).collect())
    }

    /// Polls until `ack` is indexed, or the wait runs out (then the chunk is sent
    /// again).
    async fn wait_for_ack(&self, ack: u64) -> Result<(), SinkError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.ack_timeout_ms);
        loop {
            let response = self
                .request("/services/collector/ack")
                .json(&json!({ "acks": [ack] }))
                .send()
                .await
                .map_err(SinkError::unavailable)?;
            let answer: Value = response.json().await.unwrap_or_default();
            if answer["acks"][ack.to_string()] == true {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SinkError::unavailable(format!(
                    "HEC did not acknowledge ackId {ack} in time"
                )));
            }
            tokio::time::sleep(ACK_POLL).await;
        }
    }
}

/// The effect's event time from its header (now when absent).
/// HEC indexed the events before `invalid`, rejected that one, and did not look
/// at the rest.
fn partly_indexed(count: usize, invalid: usize, answer: &Value) -> Vec<Delivery> {
    (0..count)
        .map(|i| match i.cmp(&invalid) {
            std::cmp::Ordering::Less => Delivery::Delivered,
            std::cmp::Ordering::Equal => Delivery::Failed(SinkError::Permanent(
                format!(
                    "HEC rejected the event: {}",
                    answer["text"].as_str().unwrap_or("invalid event")
                )
                .into(),
            )),
            std::cmp::Ordering::Greater => Delivery::NotAttempted,
        })
        .collect()
}

impl Sink for HecSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        match self.send(effects).await {
            Ok(deliveries) => deliveries,
            Err(error) => {
                let reason = changewire_schemas::diagnostics::report(&error);
                let class = super::bulk::same_class;
                effects
                    .iter()
                    .map(|_| Delivery::Failed(class(&error, &reason)))
                    .collect()
            }
        }
    }

    fn max_chunk(&self) -> usize {
        self.config.batch_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_event_splits_the_chunk() {
        let answer = json!({"text": "Invalid data format", "code": 6, "invalidEventNumber": 2});
        let outcome: Vec<&str> = partly_indexed(4, 2, &answer)
            .into_iter()
            .map(|d| match d {
                Delivery::Delivered => "delivered",
                Delivery::NotAttempted => "later",
                Delivery::Failed(SinkError::Permanent(_)) => "rejected",
                Delivery::Failed(_) => "other",
            })
            .collect();
        assert_eq!(outcome, ["delivered", "delivered", "rejected", "later"]);
    }
}
