//! The services `changewire-consumer` runs, each a [`crate::runtime::Handler`]:
//!
//! - [`dedup`]: republishes each distinct event exactly once;
//! - [`forward`]: POSTs each event to an HTTP endpoint, signed (Standard Webhooks).

pub mod dedup;
pub mod forward;
