//! What the stream and the snapshot read tables through: catalog connections with
//! the session settings events are rendered in, and table descriptions (columns,
//! key, each column's encoding, and the table's topic, created when missing).

use std::future::Future;
use std::sync::Arc;

use changewire_kafka::{Publisher, TopicSpec};
use changewire_schemas::{Codec, TopicNames};
use tokio_postgres::{Client, NoTls};

use super::config::PostgresConfig;
use super::encoding;
use super::error::PostgresError;
use super::normalize::{Table, SESSION_OPTIONS};
use super::pgoutput::Relation;

/// Connects and describes tables for one source.
pub(super) struct Catalog {
    config: PostgresConfig,
    topics: TopicNames,
    codec: Arc<Codec>,
    publisher: Publisher,
}

impl Catalog {
    /// A catalog for `config`'s database, creating topics through `publisher`
    /// and preparing them in `codec`.
    pub(super) fn new(
        config: PostgresConfig,
        topics: TopicNames,
        codec: Arc<Codec>,
        publisher: Publisher,
    ) -> Self {
        Self {
            config,
            topics,
            codec,
            publisher,
        }
    }

    /// A catalog connection, with the session settings events are rendered in.
    pub(super) async fn connect(&self) -> Result<Client, PostgresError> {
        connect(&self.config).await
    }

    /// How `relation` maps to events: key columns, redaction, encodings, topic
    /// (created with its settings when missing, and prepared in the codec).
    pub(super) async fn describe(
        &self,
        client: &Client,
        relation: Relation,
    ) -> Result<Table, PostgresError> {
        let key_names: Vec<String> = client
            .query(
                "SELECT a.attname FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary",
                &[&relation.oid],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let key_columns: Vec<usize> = if key_names.is_empty() && relation.replica_identity != b'f' {
            (0..relation.columns.len())
                .filter(|&i| relation.columns[i].is_key)
                .collect()
        } else {
            (0..relation.columns.len())
                .filter(|&i| key_names.contains(&relation.columns[i].name))
                .collect()
        };
        let topic =
            self.topics
                .postgres_table(&self.config.name, &relation.namespace, &relation.name)?;
        let spec = TopicSpec::new(topic.clone(), self.config.topic_partitions);
        // Tombstones exist for compaction: they let it drop a deleted row's events.
        let spec = if self.config.tombstones {
            spec.compacted()
        } else {
            spec
        };
        self.publisher.ensure_topics(&[spec]).await?;
        self.codec.prepare_topic(&topic).await?;
        let redactor = self.config.redactor();
        let redacted = relation
            .columns
            .iter()
            .map(|c| {
                redactor
                    .as_ref()
                    .is_some_and(|r| r.covers(&relation.namespace, &relation.name, &c.name))
            })
            .collect();
        let type_oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        let catalog = encoding::load_catalog(client, &type_oids).await?;
        let encodings = type_oids
            .iter()
            .map(|&oid| encoding::resolve(oid, &catalog))
            .collect();
        Ok(Table::new(
            relation,
            key_columns,
            topic,
            redactor,
            redacted,
            encodings,
        ))
    }
}

/// A catalog connection to the server `config` names, with the session settings
/// events are rendered in.
pub async fn connect(config: &PostgresConfig) -> Result<Client, PostgresError> {
    let mut settings = config.connection()?;
    settings
        .options(SESSION_OPTIONS)
        .application_name("changewire");
    let client = match config.tls.connector()? {
        None => {
            let (client, connection) = settings.connect(NoTls).await?;
            drive(connection);
            client
        }
        Some(tls) => {
            settings.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, connection) = settings.connect(tls).await?;
            drive(connection);
            client
        }
    };
    Ok(client)
}

/// Runs a tokio-postgres connection in the background until it closes.
fn drive<C>(connection: C)
where
    C: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection ended");
        }
    });
}
