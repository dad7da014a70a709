//! The seam between the producer and its change sources. The producer builds one
//! [`SourceContext`] per configured source and runs each behind [`ChangeSource`], so
//! a second database or cluster is a `[[postgres]]` or `[[kubernetes]]` entry, not
//! code.

use std::sync::Arc;

use changewire_kafka::Publisher;
use changewire_schemas::{Codec, TopicNames};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::checkpoint::SledCheckpoints;
use crate::metrics::ProducerMetrics;

/// A source's failure as the producer sees it; each source has its own error type,
/// kept as the source of this box.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// What the producer hands a source it starts.
pub struct SourceContext {
    /// Topic naming.
    pub topics: TopicNames,
    /// The value codec.
    pub codec: Arc<Codec>,
    /// The Kafka publisher; a source publishes through its own lanes.
    pub publisher: Publisher,
    /// The producer's state database; a source keeps its state under its name.
    pub state: Arc<SledCheckpoints>,
    /// Metrics and health, shared by every source and labelled with its name.
    pub metrics: Arc<ProducerMetrics>,
    /// Turns true when the producer shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// A configured change source.
pub trait ChangeSource: Send + 'static {
    /// Its configured name, unique among the producer's sources.
    fn name(&self) -> &str;

    /// What it reads, for messages: `PostgreSQL`, `Kubernetes`.
    fn kind(&self) -> &'static str;

    /// `--check`: reaches its server and says what it found there.
    fn check(&self) -> BoxFuture<'_, Result<String, SourceError>>;

    /// Streams until shutdown (`Ok`) or a failure it cannot recover from.
    fn run(self: Box<Self>, context: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;
}
