//! The changewire consumer runtime and the services built on it.
//!
//! - [`config`]: a service's config file;
//! - [`runtime`]: offsets in sled with the service's state, idempotency, DLQ,
//!   retries; a service is a [`runtime::Handler`] passed to [`runtime::run`];
//! - [`services`]: the services `changewire-consumer` runs (dedup, forward).

pub mod config;
pub mod runtime;
pub mod services;
