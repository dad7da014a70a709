//! The forward service: POSTs each event, as JSON, to an HTTP endpoint, signed the
//! Standard Webhooks way, so a service in any language can subscribe to
//! changewire.
//!
//! The handler maps an event to a request body and emits it to the [`WEBHOOK`]
//! sink with the record's key as the ordering key: the runtime commits it in the
//! batch's outbox and the webhook sink posts it (see
//! [`crate::runtime::sinks::webhook`]: `webhook-id` is the idempotency key
//! `<event id>/webhook/0`, stable across retries and crashes; requests for
//! different keys run concurrently, one key's in order; an unavailable receiver
//! is retried without end, a rejection is dead-lettered). Delivery is
//! at-least-once; receivers drop repeated `webhook-id`s.

use changewire_schemas::ChangeEvent;
use serde_json::value::RawValue;

use crate::runtime::sinks::webhook::{WebhookConfig, WebhookSink};
use crate::runtime::{Context, Effect, Handler, HandlerError, Record, Sinks};

/// The name of forward's sink.
pub const WEBHOOK: &str = "webhook";

/// The `[forward]` section: where to post, and how.
pub type ForwardConfig = WebhookConfig;

/// The demo secret in config/forward.toml and docker-compose.yml: anyone can read
/// it, so a service signing with it is told to replace it.
pub const DEMO_SECRET: &str = "whsec_cmVwbGFjZS10aGlzLXdpdGgtYS1yZWFsLXNlY3JldA==";

/// The forward handler.
pub struct Forward;

impl Forward {
    /// A forward handler with its sink posting as `config` says.
    pub fn new(
        config: &ForwardConfig,
    ) -> Result<(Self, Sinks), changewire_schemas::settings::ConfigError> {
        let sink = WebhookSink::new(config, "forward")?;
        if config.secret == DEMO_SECRET {
            tracing::warn!("forward.secret is the published demo secret: receivers cannot tell changewire's requests from forged ones; set CHANGEWIRE_FORWARD__SECRET (FORWARD_SECRET for docker-compose)");
        }
        Ok((Self, Sinks::new().with(WEBHOOK, sink)))
    }
}

impl Handler for Forward {
    type Row = Box<RawValue>;

    async fn handle(
        &self,
        event: &ChangeEvent<Self::Row>,
        record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let body = serde_json::to_vec(event).map_err(HandlerError::permanent)?;
        let effect = Effect {
            key: record.key.clone(),
            ..Effect::new(body)
        };
        context.emit(WEBHOOK, effect)?;
        Ok(())
    }
}
