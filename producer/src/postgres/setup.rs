//! Server checks, the publication and the replication slot.

use tokio_postgres::Client;

use super::config::PostgresConfig;
use super::error::PostgresError;

/// A table by schema and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
}

impl TableName {
    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What is known about an existing slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Position the slot confirmed, as text.
    pub confirmed_flush_lsn: Option<String>,
}

/// Fails unless the server can do logical decoding.
pub async fn check_server(client: &Client) -> Result<(), PostgresError> {
    let level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if level != "logical" {
        return Err(PostgresError::WalLevel(level));
    }
    Ok(())
}

/// The user tables the config selects.
pub async fn selected_tables(
    client: &Client,
    config: &PostgresConfig,
) -> Result<Vec<TableName>, PostgresError> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .filter(|t| config.publishes(&t.schema, &t.name))
        .collect())
}

/// Creates the publication when missing and makes its table list match the config.
/// With no include/exclude patterns it is `FOR ALL TABLES`, so new tables follow.
pub async fn ensure_publication(
    client: &Client,
    config: &PostgresConfig,
) -> Result<(), PostgresError> {
    let name = config.publication_name();
    let all_tables = config.include.is_empty() && config.exclude.is_empty();
    let existing = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    if all_tables {
        match existing {
            Some(row) if row.get::<_, bool>(0) => {}
            Some(_) => {
                tracing::warn!(publication = %name, "publication lists tables but no patterns are configured: recreating it FOR ALL TABLES");
                client
                    .batch_execute(&format!(
                        "DROP PUBLICATION {0}; CREATE PUBLICATION {0} FOR ALL TABLES",
                        quote_ident(&name)
                    ))
                    .await?;
            }
            None => {
                client
                    .batch_execute(&format!(
                        "CREATE PUBLICATION {} FOR ALL TABLES",
                        quote_ident(&name)
                    ))
                    .await?;
                tracing::info!(publication = %name, "created publication FOR ALL TABLES");
            }
        }
        return Ok(());
    }
    let tables = selected_tables(client, config).await?;
    if tables.is_empty() {
        return Err(PostgresError::NoTables);
    }
    let list = tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    let sql = match existing {
        Some(row) if row.get::<_, bool>(0) => {
            format!(
                "DROP PUBLICATION {0}; CREATE PUBLICATION {0} FOR TABLE {list}",
                quote_ident(&name)
            )
        }
        Some(_) => format!("ALTER PUBLICATION {} SET TABLE {list}", quote_ident(&name)),
        None => format!("CREATE PUBLICATION {} FOR TABLE {list}", quote_ident(&name)),
    };
    client.batch_execute(&sql).await?;
    tracing::info!(publication = %name, tables = tables.len(), "publication matches the configured tables");
    Ok(())
}

/// Logs each published table's REPLICA IDENTITY: without FULL, `before` holds only
/// the key; without any identity, PostgreSQL rejects UPDATE and DELETE on it.
pub async fn report_replica_identity(
    client: &Client,
    publication: &str,
) -> Result<(), PostgresError> {
    let rows = client
        .query(
            "SELECT t.schemaname, t.tablename, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)) \
             FROM pg_publication_tables t \
             JOIN pg_namespace n ON n.nspname = t.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename \
             WHERE t.pubname = $1",
            &[&publication],
        )
        .await?;
    for row in rows {
        let (schema, table, identity, has_key): (String, String, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        match identity.as_str() {
            "f" => {}
            "n" => {
                tracing::warn!(%schema, %table, "REPLICA IDENTITY NOTHING: updates and deletes carry no old row")
            }
            _ if !has_key => {
                tracing::warn!(%schema, %table, "no primary key or replica identity index: PostgreSQL will reject UPDATE/DELETE on this published table; add a key or set REPLICA IDENTITY FULL")
            }
            _ => {
                tracing::warn!(%schema, %table, "REPLICA IDENTITY is not FULL: `before` of updates and deletes holds only the key columns")
            }
        }
    }
    Ok(())
}

/// The slot's state, or `None` when it does not exist. Fails when the slot cannot be
/// used: another process holds it, it was invalidated, or it is not ours to use.
pub async fn inspect_slot(client: &Client, slot: &str) -> Result<Option<SlotState>, PostgresError> {
    let Some(row) = client
        .query_opt(
            "SELECT plugin, database, active_pid, wal_status, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let (plugin, database, pid, wal_status): (
        Option<String>,
        Option<String>,
        Option<i32>,
        Option<String>,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let current_db: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    let mismatch = |reason: String| PostgresError::SlotMismatch {
        slot: slot.to_owned(),
        reason,
    };
    if plugin.as_deref() != Some("pgoutput") {
        return Err(mismatch(format!("it uses plugin {plugin:?}, not pgoutput")));
    }
    if database.as_deref() != Some(current_db.as_str()) {
        return Err(mismatch(format!(
            "it belongs to database {database:?}, not {current_db:?}"
        )));
    }
    if let Some(pid) = pid {
        return Err(PostgresError::SlotInUse {
            slot: slot.to_owned(),
            pid,
        });
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(PostgresError::SlotLost {
            slot: slot.to_owned(),
        });
    }
    Ok(Some(SlotState {
        confirmed_flush_lsn: row.get(4),
    }))
}

/// Drops an inactive slot (to re-snapshot from a new one).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), PostgresError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}
