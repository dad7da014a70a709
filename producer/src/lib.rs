//! The changewire producer. Data flows one way: a change source reads changes, they
//! are normalized into [`changewire_schemas::ChangeEvent`]s, and a lane of the
//! [`changewire_kafka::Publisher`] publishes them; the source checkpoints only what
//! Kafka acknowledged (a lane's marks).
//!
//! - [`config`]: the config file;
//! - [`source`]: the seam every change source is run behind;
//! - [`postgres`]: the PostgreSQL change source;
//! - [`kubernetes`]: the Kubernetes change source;
//! - [`checkpoint`]: the checkpoint seam (sled);
//! - [`clock`]: wall-clock time as events carry it;
//! - [`pattern`]: `*` name patterns of the configuration;
//! - [`metrics`]: Prometheus metrics and health state;
//! - [`redact`]: keyed hashes that stand in for secret values.

pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod kubernetes;
pub mod metrics;
pub mod pattern;
pub mod postgres;
pub mod redact;
pub mod source;
