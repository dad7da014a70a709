//! The changewire consumer runtime and the services built on it.
//!
//! - [`config`]: a service's config file;
//! - [`runtime`]: offsets, state and an outbox of effects in sled; sinks that
//!   deliver the effects; DLQ, retries; a service is a [`runtime::Handler`] and
//!   its [`runtime::Sinks`], passed to [`runtime::run`];
//! - [`services`]: the services `changewire-consumer` runs (dedup, forward).

pub mod config;
pub mod runtime;
pub mod services;
