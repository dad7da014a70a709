//! The SIEM feed service: every event in a SIEM's format, delivered to it.
//!
//! One feed per service (`[siem]`): its own consumer group, offsets and outbox, so
//! a SIEM that is down pauses that feed only, loses nothing, and catches up from
//! the outbox and its offsets when it is back; another feed, or the audit log, is
//! not held up by it (a sink of the audit service would share the audit outbox's
//! bound, and one SIEM's outage would end up pausing the log).
//!
//! - [`ecs`]: Elastic Common Schema documents; [`ocsf`]: OCSF events; [`cef`]:
//!   ArcSight CEF messages;
//! - transports: an Elasticsearch-compatible `_bulk` endpoint
//!   ([`crate::runtime::sinks::bulk`]), a Splunk HTTP Event Collector
//!   ([`crate::runtime::sinks::hec`]), an NDJSON file ([`crate::runtime::sinks::file`]),
//!   a syslog receiver over TCP or TLS ([`crate::runtime::sinks::syslog`]).
//!   CEF, a line of text, goes to syslog only; JSON formats go anywhere.

pub mod cef;
pub mod ecs;
pub mod ocsf;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::{ChangeEvent, Op, Origin};
use serde::{Deserialize, Serialize};

use crate::runtime::sinks::bulk::{BulkConfig, BulkSink};
use crate::runtime::sinks::file::{FileConfig, FileSink};
use crate::runtime::sinks::hec::{HecConfig, HecSink};
use crate::runtime::sinks::syslog::{SyslogConfig, SyslogSink};
use crate::runtime::sinks::TIME_HEADER;
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
    /// ArcSight Common Event Format 0 (syslog only).
    Cef,
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
    /// Send to a syslog receiver (RFC 5424 over TCP or TLS).
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
}

impl SiemConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sink().map(|_| ())
    }

    /// The feed's sink, for its one transport.
    fn sink(&self) -> Result<Sinks, ConfigError> {
        let sinks = Sinks::new();
        let transports = [
            self.elasticsearch.is_some(),
            self.file.is_some(),
            self.splunk.is_some(),
            self.syslog.is_some(),
        ];
        if transports.iter().filter(|t| **t).count() != 1 {
            return Err(ConfigError::invalid(
                "siem",
                "expected exactly one transport: [siem.elasticsearch], [siem.file], [siem.splunk] or [siem.syslog]",
            ));
        }
        if self.format == Format::Cef && self.syslog.is_none() {
            return Err(ConfigError::invalid(
                "siem.format",
                "cef is a syslog format: configure [siem.syslog], or use ecs or ocsf",
            ));
        }
        let sinks = if let Some(bulk) = &self.elasticsearch {
            sinks.with(FEED, BulkSink::new(bulk, "siem.elasticsearch")?)
        } else if let Some(file) = &self.file {
            sinks.with(FEED, FileSink::new(file, "siem.file")?)
        } else if let Some(hec) = &self.splunk {
            sinks.with(FEED, HecSink::new(hec, "siem.splunk")?)
        } else {
            let syslog = self.syslog.as_ref().expect("one transport");
            sinks.with(FEED, SyslogSink::new(syslog, "siem.syslog")?)
        };
        Ok(sinks)
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
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let payload = match self.format {
            Format::Ecs => serde_json::to_vec(&ecs::document(event)),
            Format::Ocsf => serde_json::to_vec(&ocsf::event(event)),
            Format::Cef => Ok(cef::message(event).into_bytes()),
        };
        let payload = payload.map_err(HandlerError::permanent)?;
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

/// Who made the change, as far as it is known.
fn who(event: &ChangeEvent) -> &str {
    event.actor.as_ref().map_or("someone", |a| a.name.as_str())
}

/// The changed thing in words: `RateLimit edge/per-ip`, `a row of public.orders`.
fn entity_name(event: &ChangeEvent) -> String {
    match &event.source.origin {
        Origin::Kubernetes(k8s) => match &k8s.namespace {
            Some(namespace) => format!("{} {namespace}/{}", k8s.kind, k8s.name),
            None => format!("{} {}", k8s.kind, k8s.name),
        },
        Origin::Postgresql(pg) => format!("a row of {}.{}", pg.schema, pg.table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> SiemConfig {
        serde_json::from_str(text).expect("a [siem] section")
    }

    #[test]
    fn a_feed_has_one_transport_and_cef_goes_to_syslog_only() {
        let syslog = r#""syslog": {"address": "127.0.0.1:601"}"#;
        let file = r#""file": {"path": "/tmp/feed.ndjson"}"#;
        assert!(config(&format!(r#"{{"format": "cef", {syslog}}}"#))
            .validate()
            .is_ok());
        assert!(config(&format!(r#"{{"format": "ecs", {syslog}}}"#))
            .validate()
            .is_ok());
        let error = config(&format!(r#"{{"format": "cef", {file}}}"#))
            .validate()
            .expect_err("CEF to a file");
        assert!(error.to_string().contains("[siem.syslog]"), "{error}");
        let error = config(&format!(r#"{{{syslog}, {file}}}"#))
            .validate()
            .expect_err("two transports");
        assert!(error.to_string().contains("exactly one"), "{error}");
        let error = config("{}").validate().expect_err("none");
        assert!(error.to_string().contains("exactly one"), "{error}");
    }
}
