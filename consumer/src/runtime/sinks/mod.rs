//! Ready-made sinks: [`alertmanager::AlertmanagerSink`] (Prometheus Alertmanager API v2),
//! [`kafka::KafkaSink`] (topics, reconciled by reading the
//! output back), [`webhook::WebhookSink`] (Standard Webhooks) and
//! [`bulk::BulkSink`] (Elasticsearch-compatible `_bulk`), [`hec::HecSink`]
//! (Splunk HTTP Event Collector), [`file::FileSink`] (NDJSON, rotated) and
//! [`syslog::SyslogSink`] (RFC 5424 over TCP or TLS), [`slack::SlackSink`]
//! (Slack-compatible incoming webhooks); and what they share: the event time an
//! effect carries ([`TIME_HEADER`]) and this machine's name.

pub mod alertmanager;
pub mod bulk;
pub mod file;
pub mod hec;
pub mod kafka;
pub mod slack;
pub mod syslog;
pub mod webhook;

use super::Pending;

/// The header the event's time (ms since the epoch) travels in.
pub const TIME_HEADER: &str = "changewire-time-ms";

/// This machine's name, or `changewire` when it cannot be read.
pub(crate) fn this_host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map_or_else(|_| "changewire".into(), |h| h.trim().to_owned())
}

/// The event's time (ms since the epoch) an effect carries in [`TIME_HEADER`];
/// now when it has none.
pub(crate) fn time_of(pending: &Pending) -> i64 {
    (pending.effect.headers.iter())
        .find(|(name, _)| name == TIME_HEADER)
        .and_then(|(_, value)| value.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        })
}
