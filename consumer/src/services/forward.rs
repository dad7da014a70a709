//! The forward service: POSTs each event, as JSON, to an HTTP endpoint, signed the
//! Standard Webhooks way, so a service in any language can subscribe to changewire.
//!
//! Headers: `webhook-id` (the event id, stable across retries so the receiver can
//! drop repeats), `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` keyed with the secret).
//! 2xx is success; 408, 429, 5xx and network errors are retried with backoff, up to
//! `service.max_attempts`, then the event goes to the DLQ; any other status is a
//! rejection and goes to the DLQ at once. Events are posted one at a time in
//! partition order, so per-key order holds. Delivery is at-least-once: a crash after
//! the POST and before the sled commit posts the event again (same `webhook-id`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use changewire_schemas::settings::ConfigError;
use changewire_schemas::ChangeEvent;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::runtime::{Context, Handler, HandlerError, Record};

/// Prefix of Standard Webhooks secrets (the rest is base64).
const SECRET_PREFIX: &str = "whsec_";

/// The `[forward]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Endpoint to POST events to (http:// or https://).
    pub url: String,
    /// Signing secret, `whsec_<base64>` (set it from `CHANGEWIRE_FORWARD__SECRET`).
    pub secret: String,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for ForwardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardConfig")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl ForwardConfig {
    /// Checks the URL and decodes the secret.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(ConfigError::invalid(
                "forward.url",
                format!("expected an http:// or https:// URL, got {:?}", self.url),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "forward.timeout_ms",
                "must be at least 1",
            ));
        }
        self.key().map(|_| ())
    }

    fn key(&self) -> Result<Vec<u8>, ConfigError> {
        self.secret
            .strip_prefix(SECRET_PREFIX)
            .and_then(|encoded| STANDARD.decode(encoded).ok())
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                ConfigError::invalid(
                    "forward.secret",
                    "expected whsec_ followed by base64 (Standard Webhooks secret)",
                )
            })
    }
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

/// The forward handler.
pub struct Forward {
    url: String,
    key: Vec<u8>,
    http: reqwest::Client,
}

impl Forward {
    /// A forward handler posting to `config.url`.
    pub fn new(config: &ForwardConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| ConfigError::invalid("forward", e.to_string()))?;
        Ok(Self {
            url: config.url.clone(),
            key: config.key()?,
            http,
        })
    }
}

impl Handler for Forward {
    async fn handle(
        &self,
        event: &ChangeEvent,
        _record: &Record,
        _context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let body = serde_json::to_vec(event).map_err(HandlerError::permanent)?;
        let id = event.id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&self.key, &id, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(HandlerError::transient)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let error = format!("{} answered {status}", self.url);
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            Err(HandlerError::transient(error))
        } else {
            Err(HandlerError::permanent(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let config = ForwardConfig {
            url: "http://localhost".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            timeout_ms: 1000,
        };
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(
            &config.key().expect("valid secret"),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_must_be_standard_webhooks_secrets() {
        let config = ForwardConfig {
            url: "http://localhost".into(),
            secret: "plain".into(),
            timeout_ms: 1000,
        };
        let error = config.validate().expect_err("rejected").to_string();
        assert!(error.contains("forward.secret"), "{error}");
        assert!(!format!("{config:?}").contains("plain"), "secret redacted");
    }
}
