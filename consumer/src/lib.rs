//! The changewire consumer runtime and the services built on it.
//!
//! - [`config`]: a service's config file.

pub mod config;
