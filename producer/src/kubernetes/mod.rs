//! The Kubernetes change source.
//!
//! Data flows one way: kube-rs watchers (paginated list, watch from resourceVersion,
//! bookmarks, relist on 410 Gone, backoff) deliver objects of each watched kind
//! (`watch`); `reconcile` turns them into events and state writes, pure, with
//! [`object`] normalizing each object (managedFields stripped, secrets hashed, noise
//! dropped, diffs computed); `publish` sends a batch through a lane of the
//! publisher; [`state`] keeps, per watch, the last published form of every object,
//! written only after Kafka acknowledged. That state tells creates from updates
//! and, after every relist or restart, which objects were deleted while the
//! producer was away.
//!
//! - [`source`]: errors, the source and its supervisor, `--check`;
//! - `crds`: the CRD follower; `retry`: the shared backoff for watches;
//! - [`health`]: which watches fail; [`audit`]: the audit webhook and attribution;
//! - [`config`]: the `[kubernetes]` section.

pub mod audit;
pub mod config;
mod crds;
pub mod error;
pub mod health;
pub mod object;
mod publish;
mod reconcile;
mod retry;
mod shared;
pub mod source;
pub mod state;
mod watch;

pub use audit::{Attributions, AuditConfig};
pub use config::{KindConfig, KubernetesConfig};
pub use error::KubernetesError;
pub use source::KubernetesSource;
pub use state::{ObjectStore, SledObjects};
