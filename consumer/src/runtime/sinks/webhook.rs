//! A webhook sink: POSTs each effect's payload to one URL, signed the Standard
//! Webhooks way.
//!
//! Headers: `webhook-id` (the effect's idempotency key, the same on every
//! attempt and after a crash, so the receiver drops repeats),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`).
//!
//! Effects with different keys are posted concurrently (up to `concurrency`
//! requests), effects with the same key one after another, in order; after a
//! failure the key's later effects wait. Answers, by what they mean:
//! - 2xx: delivered;
//! - network errors, 401, 403, 404, 408, 429, 502, 503, 504: the receiver is
//!   unavailable or misconfigured, not the effect wrong: retried without end,
//!   honouring `Retry-After`;
//! - other 5xx: transient, dead-lettered after `service.give_up_after_s`;
//! - any other status: the receiver rejects this effect: dead-lettered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use changewire_schemas::settings::ConfigError;
use futures::stream::{self, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// Prefix of Standard Webhooks secrets (the rest is base64).
const SECRET_PREFIX: &str = "whsec_";

/// A webhook sink's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint to POST to (http:// or https://).
    pub url: String,
    /// Signing secret, `whsec_<base64>` (set it from the environment).
    pub secret: String,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most requests in flight at once (different keys only).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_concurrency() -> usize {
    32
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks the URL, the limits and the secret; `section` names the config
    /// section in messages.
    pub fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        check_http_url(section, &self.url)?;
        if self.timeout_ms == 0 || self.concurrency == 0 {
            return Err(ConfigError::invalid(
                section,
                "timeout_ms and concurrency must be at least 1",
            ));
        }
        self.key(section).map(|_| ())
    }

    fn key(&self, section: &'static str) -> Result<Vec<u8>, ConfigError> {
        self.secret
            .strip_prefix(SECRET_PREFIX)
            .and_then(|encoded| STANDARD.decode(encoded).ok())
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                ConfigError::invalid(
                    section,
                    "secret: expected whsec_ followed by base64 (Standard Webhooks secret)",
                )
            })
    }
}

/// Refuses a `url` that is not http:// or https://; `section` names it.
pub(crate) fn check_http_url(section: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(());
    }
    Err(ConfigError::invalid(
        section,
        format!("url: expected an http:// or https:// URL, got {url:?}"),
    ))
}

/// The `webhook-signature` value for one request.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// POSTs effects to one URL.
pub struct WebhookSink {
    url: String,
    key: Vec<u8>,
    concurrency: usize,
    http: reqwest::Client,
}

impl WebhookSink {
    /// A sink posting as `config` says; `section` names it in messages.
    pub fn new(config: &WebhookConfig, section: &'static str) -> Result<Self, ConfigError> {
        config.validate(section)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        Ok(Self {
            url: config.url.clone(),
            key: config.key(section)?,
            concurrency: config.concurrency,
            http,
        })
    }

    async fn post(&self, pending: &Pending) -> Result<(), SinkError> {
        let id = &pending.idempotency_key;
        let body = &pending.effect.payload;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&self.key, id, timestamp, body))
            .body(body.clone())
            .send()
            .await
            .map_err(SinkError::unavailable)?;
        classify(&self.url, &response)
    }

    /// Posts one key's effects in order; the rest wait after a failure.
    async fn post_in_order(&self, effects: Vec<(usize, Arc<Pending>)>) -> Vec<(usize, Delivery)> {
        let mut outcomes = Vec::with_capacity(effects.len());
        let mut failed = false;
        for (index, pending) in effects {
            if failed {
                outcomes.push((index, Delivery::NotAttempted));
                continue;
            }
            match self.post(&pending).await {
                Ok(()) => outcomes.push((index, Delivery::Delivered)),
                Err(error) => {
                    failed = true;
                    outcomes.push((index, Delivery::Failed(error)));
                }
            }
        }
        outcomes
    }
}

/// What an answer means (see the module documentation).
fn classify(url: &str, response: &reqwest::Response) -> Result<(), SinkError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let error: Box<dyn std::error::Error + Send + Sync> = format!("{url} answered {status}").into();
    Err(status_error(status, error, retry_after(response)))
}

/// What a receiver's error status means: down or misconfigured (retried without
/// end), a server error (transient), or a rejection of what was sent.
pub(crate) fn status_error(
    status: StatusCode,
    error: Box<dyn std::error::Error + Send + Sync>,
    retry_after: Option<Duration>,
) -> SinkError {
    match status {
        StatusCode::UNAUTHORIZED
        | StatusCode::FORBIDDEN
        | StatusCode::NOT_FOUND
        | StatusCode::REQUEST_TIMEOUT
        | StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => SinkError::Unavailable {
            source: error,
            retry_after,
        },
        status if status.is_server_error() => SinkError::Transient(error),
        _ => SinkError::Permanent(error),
    }
}

/// The wait a `Retry-After` header asks for (seconds form).
pub(crate) fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

impl Sink for WebhookSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        let mut by_key: HashMap<&[u8], Vec<(usize, Arc<Pending>)>> = HashMap::new();
        let mut groups = Vec::new();
        for (index, pending) in effects.iter().enumerate() {
            match pending.effect.key.as_deref() {
                Some(key) => by_key
                    .entry(key)
                    .or_default()
                    .push((index, pending.clone())),
                None => groups.push(vec![(index, pending.clone())]),
            }
        }
        groups.extend(by_key.into_values());
        let mut outcomes: Vec<(usize, Delivery)> = stream::iter(groups)
            .map(|group| self.post_in_order(group))
            .buffer_unordered(self.concurrency)
            .flat_map(stream::iter)
            .collect()
            .await;
        outcomes.sort_by_key(|(index, _)| *index);
        outcomes.into_iter().map(|(_, delivery)| delivery).collect()
    }

    fn max_chunk(&self) -> usize {
        self.concurrency * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let config = WebhookConfig {
            url: "http://localhost".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            timeout_ms: 1000,
            concurrency: 1,
        };
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(
            &config.key("forward").expect("valid secret"),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_must_be_standard_webhooks_secrets() {
        let config = WebhookConfig {
            url: "http://localhost".into(),
            secret: "plain".into(),
            timeout_ms: 1000,
            concurrency: 1,
        };
        let error = config
            .validate("forward")
            .expect_err("rejected")
            .to_string();
        assert!(error.contains("forward"), "{error}");
        assert!(error.contains("secret"), "{error}");
        assert!(!format!("{config:?}").contains("plain"), "secret redacted");
    }
}
