//! Ready-made sinks: [`alertmanager::AlertmanagerSink`] (Prometheus Alertmanager API v2),
//! [`kafka::KafkaSink`] (topics, reconciled by reading the
//! output back), [`webhook::WebhookSink`] (Standard Webhooks) and
//! [`bulk::BulkSink`] (Elasticsearch-compatible `_bulk`), [`hec::HecSink`]
//! (Splunk HTTP Event Collector), [`file::FileSink`] (NDJSON, rotated) and
//! [`syslog::SyslogSink`] (RFC 5424 over TCP or TLS), [`slack::SlackSink`]
//! (Slack-compatible incoming webhooks).

pub mod alertmanager;
pub mod bulk;
pub mod file;
pub mod hec;
pub mod kafka;
pub mod slack;
pub mod syslog;
pub mod webhook;
