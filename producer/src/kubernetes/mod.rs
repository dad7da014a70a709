//! The Kubernetes change source.
//!
//! Data flows one way: kube-rs watchers (paginated list, watch from resourceVersion,
//! bookmarks, relist on 410 Gone, backoff) deliver objects of each watched kind;
//! [`object`] normalizes them (managedFields stripped, secrets hashed, noise dropped,
//! diffs computed); a lane of the publisher sends them; [`state`] keeps, per watch, the last
//! published form of every object, written only after Kafka acknowledged. That state
//! tells creates from updates and, after every relist or restart, which objects were
//! deleted while the producer was away.

pub mod audit;
pub mod config;
pub mod health;
pub mod object;
mod retry;
pub mod source;
pub mod state;

pub use audit::{Attributions, AuditConfig};
pub use config::{KindConfig, KubernetesConfig};
pub use source::{KubernetesError, KubernetesSource};
pub use state::{ObjectStore, SledObjects};
