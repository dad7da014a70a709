//! The services `changewire-consumer` runs, each a [`crate::runtime::Handler`]:
//!
//! - [`audit`]: a tamper-evident, queryable log of every event, with proofs;
//! - [`dedup`]: republishes each distinct event exactly once;
//! - [`forward`]: POSTs each event to an HTTP endpoint, signed (Standard Webhooks).

pub mod audit;
pub mod dedup;
pub mod forward;
