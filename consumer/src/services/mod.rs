//! The services `changewire-consumer` runs, each a [`crate::runtime::Handler`]:
//!
//! - [`audit`]: a tamper-evident, queryable log of every event, with proofs;
//! - [`dedup`]: republishes each distinct event exactly once;
//! - [`forward`]: POSTs each event to an HTTP endpoint, signed (Standard Webhooks);
//! - [`siem`]: each event in a SIEM's format, delivered to it.

pub mod audit;
pub mod dedup;
pub mod forward;
pub mod siem;
