//! Errors of the PostgreSQL source, classed transient (reconnect and retry) or
//! permanent (an operator must act).

use changewire_schemas::topic::TopicNameError;
use changewire_schemas::CodecError;

use super::pgoutput::DecodeError;
use changewire_kafka::PublishError;

/// Why the PostgreSQL source stopped.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// The server is not configured for logical decoding.
    #[error("wal_level is {0:?}; logical replication needs wal_level = logical (set it in postgresql.conf and restart PostgreSQL)")]
    WalLevel(String),
    /// Another process streams from the slot.
    #[error("replication slot {slot:?} is in use by another process (pid {pid}); is another producer running with this slot?")]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// Backend pid holding it.
        pid: i32,
    },
    /// The server removed WAL the slot still needed.
    #[error("replication slot {slot:?} was invalidated (wal_status = lost): changes since its last confirmed position are gone; drop the slot and restart to take a new snapshot")]
    SlotLost {
        /// Slot name.
        slot: String,
    },
    /// The slot exists but cannot be used by this source.
    #[error("replication slot {slot:?} cannot be used: {reason}")]
    SlotMismatch {
        /// Slot name.
        slot: String,
        /// Why.
        reason: String,
    },
    /// The configuration cannot be used.
    #[error("invalid configuration")]
    Config(#[from] changewire_schemas::settings::ConfigError),
    /// The checkpoint store failed.
    #[error("checkpoint store failed")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// TLS could not be set up (bad certificate or key).
    #[error("cannot set up TLS to PostgreSQL")]
    Tls(#[from] native_tls::Error),
    /// A certificate or key file could not be read.
    #[error("cannot read {path}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The include/exclude patterns select no table.
    #[error("no table matches postgres.include / postgres.exclude")]
    NoTables,
    /// A query on an ordinary connection failed.
    #[error("PostgreSQL query failed")]
    Query(#[from] tokio_postgres::Error),
    /// The replication session failed.
    #[error("replication stream failed")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// The replication stream carried a message that does not decode.
    #[error("cannot decode the replication stream")]
    Decode(#[from] DecodeError),
    /// The snapshot read a row position that is not `(block,offset)`.
    #[error("the snapshot read a row position {0:?} that is not (block,offset)")]
    UnexpectedCtid(String),
    /// A change refers to a table the stream never described.
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// Publishing failed.
    #[error("publishing to Kafka failed")]
    Publish(#[from] PublishError),
    /// An event could not be encoded.
    #[error("cannot encode an event")]
    Codec(#[from] CodecError),
    /// A row of `table` was not written as JSON: a changewire defect, never the data.
    #[error("a row of {table} did not come out as JSON (a changewire bug: please report it)")]
    RowJson {
        /// `schema.table`.
        table: String,
        /// What the check found.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A table name does not make a valid topic.
    #[error("invalid topic name")]
    Topic(#[from] TopicNameError),
    /// Creating a topic failed.
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic {
        /// Topic name.
        topic: String,
        /// Broker's answer.
        reason: String,
    },
}

impl PostgresError {
    /// Whether reconnecting later may succeed.
    pub fn is_transient(&self) -> bool {
        use pgwire_replication::PgWireError as W;
        match self {
            PostgresError::SlotInUse { .. } | PostgresError::CreateTopic { .. } => true,
            PostgresError::Query(error) => is_connection_failure(error),
            PostgresError::Replication(error) => {
                matches!(error, W::Io(_) | W::Task(_) | W::Server(_) | W::Protocol(_))
            }
            PostgresError::Publish(error) => error.is_transient(),
            PostgresError::Codec(error) => error.is_transient(),
            _ => false,
        }
    }
}

/// Connection-level failures: I/O errors, a closed connection, or SQLSTATEs of the
/// connection (08), operator-intervention (57P) and resource (53) classes. Query
/// and type errors are permanent: retrying them would loop forever.
fn is_connection_failure(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        let code = code.code();
        return code.starts_with("08") || code.starts_with("57P") || code.starts_with("53");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}
