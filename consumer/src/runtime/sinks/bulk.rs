//! An Elasticsearch-compatible `_bulk` sink (Elasticsearch, OpenSearch, and the
//! many stores that speak the same API).
//!
//! Each chunk of effects is one `POST <url>/_bulk` of NDJSON: a `create` action
//! whose `_id` is the effect's idempotency key, then the effect's payload as the
//! document. Creating an id that exists fails with 409, which here means the
//! document landed before (a retry, or a redelivery after a crash): delivered.
//!
//! A `200` answer may still hold failed items (`"errors": true`); each item is
//! judged on its own status, like a whole answer:
//! - network errors, timeouts, 401, 403, 404, 408, 429, 502, 503, 504: the
//!   receiver is down, overloaded or misconfigured: the sink waits and retries
//!   without end (nothing is dead-lettered, nothing skipped);
//! - other 5xx: transient (dead-lettered after `service.give_up_after_s`);
//! - other 4xx (a mapping conflict, a document too large): that document goes to
//!   the DLQ with the receiver's reason; the others are not held up.

use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::webhook::{check_http_url, retry_after, status_error};
use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// A `_bulk` sink's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkConfig {
    /// The cluster's URL (`https://elastic:9200`), `/_bulk` is appended.
    pub url: String,
    /// The index (or data stream) documents go to.
    pub index: String,
    /// An API key, sent as `Authorization: ApiKey <key>` (set it from the
    /// environment; never logged).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Documents per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_batch_size() -> usize {
    500
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl std::fmt::Debug for BulkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkConfig")
            .field("url", &self.url)
            .field("index", &self.index)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("batch_size", &self.batch_size)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl BulkConfig {
    /// Checks the settings; `section` names them in messages.
    pub fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        check_http_url(section, &self.url)?;
        if self.index.is_empty() || self.batch_size == 0 || self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                section,
                "index must be set; batch_size and timeout_ms at least 1",
            ));
        }
        Ok(())
    }
}

/// Indexes effects' payloads with `_bulk`.
pub struct BulkSink {
    endpoint: String,
    index: String,
    api_key: Option<String>,
    batch_size: usize,
    http: reqwest::Client,
}

impl BulkSink {
    /// A sink indexing as `config` says; `section` names it in messages.
    pub fn new(config: &BulkConfig, section: &'static str) -> Result<Self, ConfigError> {
        config.validate(section)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        Ok(Self {
            endpoint: format!("{}/_bulk", config.url.trim_end_matches('/')),
            index: config.index.clone(),
            api_key: config.api_key.clone(),
            batch_size: config.batch_size,
            http,
        })
    }

    /// The NDJSON request body for `effects`.
    fn body(&self, effects: &[Arc<Pending>]) -> Vec<u8> {
        let mut body = Vec::new();
        for pending in effects {
            let action =
                json!({ "create": { "_index": self.index, "_id": pending.idempotency_key } });
            body.extend_from_slice(action.to_string().as_bytes());
            body.push(b'\n');
            body.extend_from_slice(&pending.effect.payload);
            body.push(b'\n');
        }
        body
    }

    async fn post(&self, effects: &[Arc<Pending>]) -> Result<Vec<Delivery>, SinkError> {
        let mut request = self
            .http
            .post(&self.endpoint)
            .header("content-type", "application/x-ndjson")
            .body(self.body(effects));
        if let Some(key) = &self.api_key {
            request = request.header("authorization", format!("ApiKey {key}"));
        }
        let response = request.send().await.map_err(SinkError::unavailable)?;
        let status = response.status();
        if !status.is_success() {
            let error = format!("{} answered {status}", self.endpoint).into();
            return Err(status_error(status, error, retry_after(&response)));
        }
        let answer: Value = response.json().await.map_err(SinkError::unavailable)?;
        let items = answer["items"].as_array().cloned().unwrap_or_default();
        if items.len() != effects.len() {
            return Err(SinkError::Transient(
                format!(
                    "{} answered {} items for {} documents",
                    self.endpoint,
                    items.len(),
                    effects.len()
                )
                .into(),
            ));
        }
        Ok(items.iter().map(item_delivery).collect())
    }
}

/// What became of one document, from its item in the answer.
fn item_delivery(item: &Value) -> Delivery {
    let result = item
        .as_object()
        .and_then(|o| o.values().next())
        .cloned()
        .unwrap_or_default();
    let status = result["status"].as_u64().unwrap_or(0) as u16;
    let Ok(status) = StatusCode::from_u16(status) else {
        return Delivery::Failed(SinkError::Transient(
            format!("an item without a status: {item}").into(),
        ));
    };
    if status.is_success() || status == StatusCode::CONFLICT {
        return Delivery::Delivered;
    }
    let error = &result["error"];
    let reason = format!(
        "{status}: {} {}",
        error["type"].as_str().unwrap_or("error"),
        error["reason"].as_str().unwrap_or("(no reason given)")
    );
    Delivery::Failed(status_error(status, reason.into(), None))
}

impl Sink for BulkSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        match self.post(effects).await {
            Ok(deliveries) => deliveries,
            Err(error) => {
                // One answer for the whole request: every document shares it.
                let reason = changewire_schemas::diagnostics::report(&error);
                effects
                    .iter()
                    .map(|_| Delivery::Failed(same_class(&error, &reason)))
                    .collect()
            }
        }
    }

    fn max_chunk(&self) -> usize {
        self.batch_size
    }
}

/// An error of `error`'s class with `reason` (errors are not `Clone`).
pub(crate) fn same_class(error: &SinkError, reason: &str) -> SinkError {
    let source = reason.to_owned().into();
    match error {
        SinkError::Transient(_) => SinkError::Transient(source),
        SinkError::Permanent(_) => SinkError::Permanent(source),
        SinkError::Unavailable { retry_after, .. } => SinkError::Unavailable {
            source,
            retry_after: *retry_after,
        },
        SinkError::Fatal(_) => SinkError::Fatal(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(delivery: Delivery) -> &'static str {
        match delivery {
            Delivery::Delivered => "delivered",
            Delivery::NotAttempted => "not attempted",
            Delivery::Failed(SinkError::Unavailable { .. }) => "unavailable",
            Delivery::Failed(SinkError::Transient(_)) => "transient",
            Delivery::Failed(SinkError::Permanent(_)) => "permanent",
            Delivery::Failed(SinkError::Fatal(_)) => "fatal",
        }
    }

    #[test]
    fn items_are_judged_one_by_one() {
        let item = |status: u16| json!({ "create": { "status": status, "error": { "type": "x", "reason": "y" } } });
        assert_eq!(class(item_delivery(&item(201))), "delivered");
        assert_eq!(
            class(item_delivery(&item(409))),
            "delivered",
            "it landed before"
        );
        assert_eq!(class(item_delivery(&item(429))), "unavailable");
        assert_eq!(class(item_delivery(&item(503))), "unavailable");
        assert_eq!(class(item_delivery(&item(500))), "transient");
        assert_eq!(class(item_delivery(&item(400))), "permanent");
        let Delivery::Failed(SinkError::Permanent(reason)) = item_delivery(&item(400)) else {
            panic!("a rejection");
        };
        assert!(reason.to_string().contains("x y"), "{reason}");
    }
}
