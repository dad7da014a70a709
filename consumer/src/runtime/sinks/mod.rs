//! Ready-made sinks: [`kafka::KafkaSink`] (topics, reconciled by reading the
//! output back), [`webhook::WebhookSink`] (Standard Webhooks) and
//! [`bulk::BulkSink`] (Elasticsearch-compatible `_bulk`).

pub mod bulk;
pub mod kafka;
pub mod webhook;
