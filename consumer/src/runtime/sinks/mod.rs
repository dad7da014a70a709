//! Ready-made sinks: [`kafka::KafkaSink`] (topics, reconciled by reading the
//! output back) and [`webhook::WebhookSink`] (Standard Webhooks).

pub mod kafka;
pub mod webhook;
