//! The PostgreSQL change source: logical replication with pgoutput, from slot and
//! publication set-up through the initial snapshot to the confirmed stream.
//!
//! - [`config`]: the `[postgres]` section;
//! - [`setup`]: server checks, publication and slot;
//! - [`pgoutput`]: the message decoder;
//! - [`encoding`]: each column type's JSON form, exact, resolved from the catalog;
//! - [`normalize`]: relation cache, event building;
//! - [`error`]: the source's errors, transient or permanent;
//! - [`source`]: the replication loop with confirm-after-ack (a publisher lane's
//!   marks), and `--check`;
//! - [`tls`]: TLS settings for both kinds of session;
//! - `catalog`: catalog connections and table descriptions, for the stream and the
//!   snapshot; `output`: where both publish their events;
//! - `snapshot`: the initial snapshot from the slot's exported snapshot.

mod catalog;
pub mod config;
pub mod encoding;
pub mod error;
pub mod normalize;
mod output;
pub mod pgoutput;
pub mod setup;
mod snapshot;
pub mod source;
pub mod tls;

pub use config::{PostgresConfig, SnapshotMode};
pub use error::PostgresError;
pub use source::PostgresSource;

#[cfg(test)]
mod tests;
