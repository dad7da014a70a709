//! The initial snapshot: every published row as an `r` event, read inside the slot's
//! exported snapshot so it meets the stream with no gap and no overlap.

use std::time::{Duration, Instant};

use changewire_kafka::Lane;
use changewire_schemas::{ChangeEvent, EventId, Op, SnapshotMarker};
use prometheus_client::metrics::counter::Counter;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::catalog::Catalog;
use super::config::PostgresConfig;
use super::error::PostgresError;
use super::normalize::{SourceInfo, Table, TableEvent};
use super::output::Output;
use super::pgoutput::{Column, Lsn, Relation, Value};
use super::setup::quote_ident;
use crate::clock::now_ms;

/// One snapshot run.
pub(super) struct Snapshot<'a> {
    catalog: &'a Catalog,
    output: &'a Output,
    config: &'a PostgresConfig,
    consistent_point: Lsn,
    seq: u64,
    /// The latest event, held back so the very last one can be marked `last`.
    held: Option<(TableEvent, Table)>,
}

impl<'a> Snapshot<'a> {
    /// A snapshot of `config`'s tables at `consistent_point` (the slot's start).
    pub(super) fn new(
        catalog: &'a Catalog,
        output: &'a Output,
        config: &'a PostgresConfig,
        consistent_point: Lsn,
    ) -> Self {
        Self {
            catalog,
            output,
            config,
            consistent_point,
            seq: 0,
            held: None,
        }
    }

    /// Reads every published table in the exported snapshot `name` and waits until
    /// the sink acknowledged every event.
    pub(super) async fn run(mut self, name: &str) -> Result<(), PostgresError> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(PostgresError::SlotMismatch {
                slot: name.to_owned(),
                reason: "unexpected snapshot name".into(),
            });
        }
        let client = self.catalog.connect().await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{name}'"))
            .await?;
        let info = SourceInfo {
            name: self.config.name.clone(),
            db: client
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0),
        };
        let mut lane = self.output.lane();
        for relation in published_relations(&client, &self.config.publication_name()).await? {
            let table = self.catalog.describe(&client, relation).await?;
            self.read_table(&client, &info, &table, &mut lane).await?;
        }
        if let Some((mut event, table)) = self.held.take() {
            event.event.source.snapshot = SnapshotMarker::Last;
            self.output
                .publish(&mut lane, &table, &event, false)
                .await?;
        }
        lane.mark(());
        while let Some(done) = lane.next_confirmed().await {
            done?;
        }
        client.batch_execute("COMMIT").await?;
        tracing::info!(rows = self.seq, "snapshot complete");
        Ok(())
    }

    async fn read_table(
        &mut self,
        client: &Client,
        info: &SourceInfo,
        table: &Table,
        lane: &mut Lane<()>,
    ) -> Result<(), PostgresError> {
        let query = PageQuery::new(table, self.config.snapshot_chunk_rows);
        let mut after: Option<String> = None;
        let mut progress = self.progress(client, table).await?;
        loop {
            let rows = page_rows(client, &query.sql(after.as_deref())?).await?;
            let Some(last) = rows.last() else { break };
            let width = table.relation.columns.len();
            after = last.get(width).map(str::to_owned);
            for row in &rows {
                let tuple: Vec<Value> = (0..width)
                    .map(|i| {
                        row.get(i)
                            .map_or(Value::Null, |v| Value::Text(v.to_owned()))
                    })
                    .collect();
                self.emit(info, table, tuple, lane).await?;
            }
            progress.add(rows.len() as u64);
            if rows.len() < query.limit as usize {
                break;
            }
        }
        Ok(())
    }

    /// The progress of this snapshot's read of `table`, starting now, from the
    /// planner's row estimate.
    async fn progress(&self, client: &Client, table: &Table) -> Result<Progress, PostgresError> {
        let estimated: i64 = client
            .query_one(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = $1",
                &[&table.relation.oid],
            )
            .await?
            .get(0);
        let label = self.output.metrics().table(table.label());
        let metrics = self.output.metrics().shared();
        metrics
            .snapshot_rows_estimated
            .get_or_create(&label)
            .set(estimated.max(0));
        let counter = metrics.snapshot_rows.get_or_create(&label).clone();
        Ok(Progress::new(label.table, estimated, counter))
    }

    async fn emit(
        &mut self,
        info: &SourceInfo,
        table: &Table,
        tuple: Vec<Value>,
        lane: &mut Lane<()>,
    ) -> Result<(), PostgresError> {
        self.seq += 1;
        let now = now_ms();
        let row = table.row(&tuple)?;
        let event = ChangeEvent {
            id: EventId::postgres(&info.name, self.consistent_point.0, self.seq),
            op: Op::Read,
            ts_ms: now,
            source: info.source(
                table,
                self.consistent_point,
                None,
                now,
                SnapshotMarker::True,
            ),
            before: None,
            after: Some(row.json),
            diff: None,
            actor: None,
            transaction: None,
        };
        let event = TableEvent {
            event,
            key: row.key,
        };
        self.output.count(table, Op::Read);
        if let Some((event, table)) = self.held.replace((event, table.clone())) {
            self.output.publish(lane, &table, &event, false).await?;
        }
        Ok(())
    }
}

/// How far one table's snapshot is: rows read, of the planner's estimate, and how
/// fast; logged after every page and counted in `snapshot_rows{table}`.
struct Progress {
    table: String,
    estimated: Option<u64>,
    rows: u64,
    started: Instant,
    counter: Counter,
}

impl Progress {
    /// Progress of `table`, whose planner estimate is `estimated` (`reltuples`,
    /// negative when the table was never analyzed), counted in `counter`.
    fn new(table: String, estimated: i64, counter: Counter) -> Self {
        Self {
            table,
            estimated: u64::try_from(estimated).ok(),
            rows: 0,
            started: Instant::now(),
            counter,
        }
    }

    fn add(&mut self, rows: u64) {
        self.rows += rows;
        self.counter.inc_by(rows);
        let elapsed = self.started.elapsed();
        let (percent, rate) = summary(self.rows, self.estimated, elapsed);
        tracing::info!(
            table = %self.table,
            rows = self.rows,
            estimated = self.estimated,
            percent = percent.map(|p| format!("{p:.1}")),
            rows_per_second = rate.round() as u64,
            "snapshot progress"
        );
    }
}

/// Percent done (when an estimate exists; an estimate can be low, so capped at 100)
/// and rows per second.
fn summary(rows: u64, estimated: Option<u64>, elapsed: Duration) -> (Option<f64>, f64) {
    let percent = estimated
        .filter(|&total| total > 0)
        .map(|total| (rows as f64 * 100.0 / total as f64).min(100.0));
    let rate = rows as f64 / elapsed.as_secs_f64().max(1e-3);
    (percent, rate)
}

/// The rows of one page in the text format: the simple query protocol renders every
/// value with its type's output function, as pgoutput does (a cast to text would not:
/// `true` for `t`, `::1/128` for `::1`, `char(n)` without its padding).
async fn page_rows(client: &Client, sql: &str) -> Result<Vec<SimpleQueryRow>, PostgresError> {
    Ok(client
        .simple_query(sql)
        .await?
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect())
}

/// Keyset-paged queries over one table, ordered by primary key (or ctid without
/// one). Each page starts after the previous page's last row, found by its ctid,
/// which is stable inside the snapshot, so key values never need casting back.
struct PageQuery {
    first: String,
    next: String,
    limit: u32,
}

impl PageQuery {
    fn new(table: &Table, limit: u32) -> Self {
        let columns = &table.relation.columns;
        // Output columns get names of their own and input columns are qualified:
        // ORDER BY would otherwise bind `id` to the `c0` output.
        let values: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} AS c{i}", quote_ident(&c.name)))
            .collect();
        let from = format!(
            "{}.{}",
            quote_ident(&table.relation.namespace),
            quote_ident(&table.relation.name)
        );
        let select = format!(
            "SELECT {}, t.ctid AS row_ctid FROM {from} AS t",
            values.join(", ")
        );
        let (order, after) = if table.key_columns.is_empty() {
            ("t.ctid".to_owned(), "t.ctid > $1::tid".to_owned())
        } else {
            let key = |alias: &str| {
                table
                    .key_columns
                    .iter()
                    .map(|&i| format!("{alias}.{}", quote_ident(&columns[i].name)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let after = format!(
                "({}) > (SELECT {} FROM {from} AS p WHERE p.ctid = $1::tid)",
                key("t"),
                key("p")
            );
            (key("t"), after)
        };
        Self {
            first: format!("{select} ORDER BY {order} LIMIT {limit}"),
            next: format!("{select} WHERE {after} ORDER BY {order} LIMIT {limit}"),
            limit,
        }
    }

    /// The query of the page after the row at `ctid` (the first page without one).
    /// The ctid comes from the server; it is checked before it becomes a literal.
    fn sql(&self, after: Option<&str>) -> Result<String, PostgresError> {
        let Some(ctid) = after else {
            return Ok(self.first.clone());
        };
        let is_tid = ctid
            .strip_prefix('(')
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|pair| pair.split_once(','))
            .is_some_and(|(block, offset)| {
                [block, offset]
                    .iter()
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
        if !is_tid {
            return Err(PostgresError::UnexpectedCtid(ctid.to_owned()));
        }
        Ok(self.next.replace("$1", &format!("'{ctid}'")))
    }
}

/// The tables of `publication` as relations (columns in attribute order).
async fn published_relations(
    client: &Client,
    publication: &str,
) -> Result<Vec<Relation>, PostgresError> {
    let tables = client
        .query(
            "SELECT c.oid, t.schemaname::text, t.tablename::text, c.relreplident::text FROM pg_publication_tables t \
             JOIN pg_namespace n ON n.nspname = t.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename \
             WHERE t.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await?;
    let mut relations = Vec::with_capacity(tables.len());
    for table in tables {
        let oid: u32 = table.get(0);
        let columns = client
            .query(
                "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|c| Column {
                is_key: false,
                name: c.get(0),
                type_oid: c.get(1),
                type_modifier: c.get(2),
            })
            .collect();
        let identity: String = table.get(3);
        relations.push(Relation {
            oid,
            namespace: table.get(1),
            name: table.get(2),
            replica_identity: identity.bytes().next().unwrap_or(b'd'),
            columns,
        });
    }
    Ok(relations)
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn percent_follows_the_estimate_and_stops_at_100() {
        let second = Duration::from_secs(1);
        assert_eq!(summary(250, Some(1000), second), (Some(25.0), 250.0));
        assert_eq!(summary(1500, Some(1000), second).0, Some(100.0));
    }

    #[test]
    fn without_an_estimate_only_the_rate_is_known() {
        let (percent, rate) = summary(500, None, Duration::from_millis(500));
        assert_eq!(percent, None);
        assert_eq!(rate, 1000.0);
        assert_eq!(summary(10, Some(0), Duration::from_secs(1)).0, None);
    }
}
