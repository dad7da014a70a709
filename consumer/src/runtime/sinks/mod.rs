//! Ready-made sinks: [`kafka::KafkaSink`] (topics, reconciled by reading the
//! output back), [`webhook::WebhookSink`] (Standard Webhooks) and
//! [`bulk::BulkSink`] (Elasticsearch-compatible `_bulk`) and [`file::FileSink`]
//! (NDJSON, rotated).

pub mod bulk;
pub mod file;
pub mod kafka;
pub mod webhook;
