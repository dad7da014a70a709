//! The changewire producer. Data flows one way: a change source reads changes, they
//! are normalized into [`changewire_schemas::ChangeEvent`]s, and an [`sink::EventSink`]
//! publishes them; the source checkpoints only what the sink acknowledged.
//!
//! - [`config`]: the config file;
//! - [`postgres`]: the PostgreSQL source (so far: the pgoutput decoder);
//! - [`sink`]: the sink seam and its Kafka implementation.

pub mod config;
pub mod postgres;
pub mod sink;
