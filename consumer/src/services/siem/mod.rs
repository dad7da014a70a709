//! The SIEM feed service: every event in a SIEM's format, delivered to it.
//!
//! One feed per service (`[siem]`): its own consumer group, offsets and outbox, so
//! a SIEM that is down pauses that feed only, loses nothing, and catches up from
//! the outbox and its offsets when it is back; another feed, or the audit log, is
//! not held up by it (a sink of the audit service would share the audit outbox's
//! bound, and one SIEM's outage would end up pausing the log).
//!
//! - [`ecs`]: Elastic Common Schema documents; [`ocsf`]: OCSF events;
//! - transports: an Elasticsearch-compatible `_bulk` endpoint
//!   ([`crate::runtime::sinks::bulk`]), a Splunk HTTP Event Collector
//!   ([`crate::runtime::sinks::hec`]), an NDJSON file ([`crate::runtime::sinks::file`]).

pub mod ecs;
pub mod ocsf;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::{ChangeEvent, Op, Origin};
use serde::{Deserialize, Serialize};

use crate::runtime::sinks::bulk::{BulkConfig, BulkSink};
use crate::runtime::sinks::file::{FileConfig, FileSink};
use crate::runtime::sinks::hec::{HecConfig, HecSink, TIME_HEADER};
use crate::runtime::{Context, Effect, Handler, HandlerError, Record, Sinks};

/// The name of the feed's sink.
pub const FEED: &str = "feed";

/// The format events are delivered in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Elastic Common Schema 8.x.
    #[default]
    Ecs,
    /// OCSF 1.1: API Activity, or Entity Management.
    Ocsf,
}

/// The `[siem]` section: one feed, with one transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiemConfig {
    /// The documents' format.
    #[serde(default)]
    pub format: Format,
    /// Deliver to an Elasticsearch-compatible `_bulk` endpoint.
    #[serde(default)]
    pub elasticsearch: Option<BulkConfig>,
    /// Append to an NDJSON file, rotated.
    #[serde(default)]
    pub file: Option<FileConfig>,
    /// Send to a Splunk HTTP Event Collector.
    #[serde(default)]
    pub splunk: Option<HecConfig>,
}

impl SiemConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sink().map(|_| ())
    }

    /// The feed's sink, for its one transport.
    fn sink(&self) -> Result<Sinks, ConfigError> {
        let sinks = Sinks::new();
        match (&self.elasticsearch, &self.file, &self.splunk) {
            (Some(bulk), None, None) => {
                Ok(sinks.with(FEED, BulkSink::new(bulk, "siem.elasticsearch")?))
            }
            (None, Some(file), None) => Ok(sinks.with(FEED, FileSink::new(file, "siem.file")?)),
            (None, None, Some(hec)) => Ok(sinks.with(FEED, HecSink::new(hec, "siem.splunk")?)),
            _ => Err(ConfigError::invalid(
                "siem",
                "expected exactly one transport: [siem.elasticsearch], [siem.file] or [siem.splunk]",
            )),
        }
    }
}

/// The SIEM feed handler.
pub struct Siem {
    format: Format,
}

impl Siem {
    /// The handler and its sink.
    pub fn new(config: &SiemConfig) -> Result<(Self, Sinks), ConfigError> {
        let sinks = config.sink()?;
        let handler = Self {
            format: config.format,
        };
        Ok((handler, sinks))
    }
}

impl Handler for Siem {
    async fn handle(
        &self,
        event: &ChangeEvent,
        _record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let document = match self.format {
            Format::Ecs => ecs::document(event),
            Format::Ocsf => ocsf::event(event),
        };
        let payload = serde_json::to_vec(&document).map_err(HandlerError::permanent)?;
        let time = event.source.ts_ms.to_string().into_bytes();
        let effect = Effect {
            headers: vec![(TIME_HEADER.to_owned(), Some(time))],
            ..Effect::new(payload)
        };
        context.emit(FEED, effect)?;
        Ok(())
    }
}

/// What happened, as a past tense: `created`, `updated`, ...
fn past_tense(op: Op) -> &'static str {
    match op {
        Op::Create => "created",
        Op::Update => "updated",
        Op::Delete => "deleted",
        Op::Read => "read",
        Op::Truncate => "truncated",
    }
}

/// Where the change came from: `kubernetes` or `postgresql`.
fn provider(event: &ChangeEvent) -> &'static str {
    match event.source.origin {
        Origin::Kubernetes(_) => "kubernetes",
        Origin::Postgresql(_) => "postgresql",
    }
}
