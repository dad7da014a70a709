//! The changewire producer. Data flows one way: a change source reads changes, they
//! are normalized into [`changewire_schemas::ChangeEvent`]s, and an [`sink::EventSink`]
//! publishes them; the source checkpoints only what the sink acknowledged.
//!
//! - [`config`]: the config file;
//! - [`postgres`]: the PostgreSQL change source;
//! - [`kubernetes`]: the Kubernetes change source;
//! - [`backoff`]: retry delays that reset once healthy;
//! - [`checkpoint`]: the checkpoint seam (sled);
//! - [`metrics`]: Prometheus metrics and health state;
//! - [`redact`]: keyed hashes that stand in for secret values;
//! - [`sink`]: the sink seam and its Kafka implementation.

pub mod backoff;
pub mod checkpoint;
pub mod config;
pub mod kubernetes;
pub mod metrics;
pub mod postgres;
pub mod redact;
pub mod sink;
