//! The services `changewire-consumer` runs, each a [`crate::runtime::Handler`]:
//!
//! - [`alert`]: rules over events, alerts to Alertmanager and signed webhooks;
//! - [`audit`]: a tamper-evident, queryable log of every event, with proofs;
//! - [`dedup`]: republishes each distinct event exactly once;
//! - [`forward`]: POSTs each event to an HTTP endpoint, signed (Standard Webhooks);
//! - [`gateway`]: Route and policy changes reconfigure nginx and Caddy;
//! - [`changed`]: which paths a change touched (audit filters, alert rules);
//! - [`siem`]: each event in a SIEM's format, delivered to it.

pub mod alert;
pub mod audit;
pub mod changed;
pub mod dedup;
pub mod forward;
pub mod gateway;
pub mod siem;
