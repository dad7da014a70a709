//! From pgoutput rows to envelope values: the relation cache and event building
//! (each column's JSON form is decided in [`super::encoding`]).
//!
//! Values arrive in PostgreSQL's text form, rendered by a session pinned to
//! `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`, `bytea_output=hex`,
//! `extra_float_digits=3` and `search_path=pg_catalog` (see [`SESSION_OPTIONS`]) so
//! that snapshot reads and the stream render values identically, floats with their
//! shortest exact digits and OID-alias types (`regclass`, ...) schema-qualified.

use std::collections::HashMap;

use changewire_schemas::{
    ChangeEvent, EventId, Op, Origin, PostgresOrigin, SnapshotMarker, Source, Transaction,
};
use serde_json::{Map, Value as Json};

use super::encoding::Encoding;
use super::pgoutput::{Lsn, Relation, Tuple, Value};
use crate::metrics::OpCounters;
use crate::redact::Redactor;

/// Session settings for every connection whose values reach events.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 \
     -c timezone=UTC -c extra_float_digits=3 -c bytea_output=hex -c search_path=pg_catalog";

/// A published table as the stream describes it.
#[derive(Debug, Clone)]
pub struct Table {
    /// The latest Relation message.
    pub relation: Relation,
    /// Indices of the primary-key columns (or replica-identity columns).
    pub key_columns: Vec<usize>,
    /// Destination topic.
    pub topic: String,
    /// The redactor, when some of this table's columns are redacted.
    pub redactor: Option<Redactor>,
    /// Per column: whether its values are redacted.
    pub redacted: Vec<bool>,
    /// Per column: how its values become JSON.
    pub encodings: Vec<Encoding>,
    /// Its published-event counters.
    pub counters: OpCounters,
}

impl Table {
    /// `schema.table`, as metrics and logs name it.
    pub fn label(&self) -> String {
        format!("{}.{}", self.relation.namespace, self.relation.name)
    }

    /// A row as a JSON object, column name to value (the tuple's texts move into it).
    pub fn row(&self, tuple: Tuple) -> Json {
        let mut object = Map::with_capacity(tuple.len());
        for (i, (column, value)) in self.relation.columns.iter().zip(tuple).enumerate() {
            object.insert(column.name.clone(), self.value(i, value));
        }
        Json::Object(object)
    }

    /// Column `i`'s value as JSON, redacted when configured. Nulls and unchanged
    /// TOAST markers carry no secret and stay as they are.
    fn value(&self, i: usize, value: Value) -> Json {
        let secret = matches!(value, Value::Text(_) | Value::Binary(_));
        let json = self.encodings[i].into_json(value);
        match (&self.redactor, self.redacted.get(i)) {
            (Some(redactor), Some(true)) if secret => redactor.hash(&json),
            _ => json,
        }
    }

    /// The message key: the key columns of `row` (as published, so redacted key
    /// columns are hashed here too) as a JSON object, or `None` for a table without a
    /// key and for changes without a row (truncate).
    pub fn key(&self, row: Option<&Json>) -> Option<Vec<u8>> {
        let row = row?.as_object()?;
        if self.key_columns.is_empty() {
            return None;
        }
        let mut object = Map::new();
        for &i in &self.key_columns {
            let name = &self.relation.columns[i].name;
            let value = row.get(name).cloned().unwrap_or(Json::Null);
            object.insert(name.clone(), value);
        }
        serde_json::to_vec(&Json::Object(object)).ok()
    }
}

/// Tables seen on the stream, by OID.
#[derive(Debug, Default)]
pub struct Relations {
    tables: HashMap<u32, Table>,
}

impl Relations {
    /// Records (or replaces, after DDL) a table.
    pub fn insert(&mut self, table: Table) {
        self.tables.insert(table.relation.oid, table);
    }

    /// The table with this OID, if described.
    pub fn get(&self, oid: u32) -> Option<&Table> {
        self.tables.get(&oid)
    }
}

/// The open transaction: numbering of its events.
#[derive(Debug)]
pub struct TxContext {
    /// Transaction id.
    pub xid: u32,
    /// LSN of its commit record (known from Begin).
    pub commit_lsn: Lsn,
    /// Commit time, ms since epoch.
    pub commit_ms: i64,
    seq: u64,
    per_table: HashMap<u32, u64>,
}

impl TxContext {
    /// A transaction that begins.
    pub fn new(xid: u32, commit_lsn: Lsn, commit_ms: i64) -> Self {
        Self {
            xid,
            commit_lsn,
            commit_ms,
            seq: 0,
            per_table: HashMap::new(),
        }
    }

    /// Numbers the next event of `table`: (total order, order within the table).
    fn next(&mut self, table: u32) -> (u64, u64) {
        self.seq += 1;
        let in_table = self.per_table.entry(table).or_default();
        *in_table += 1;
        (self.seq, *in_table)
    }
}

/// What identifies the source in every event.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// Configured source name.
    pub name: String,
    /// Database name.
    pub db: String,
}

/// A change about to become an event.
#[derive(Debug)]
pub struct Change {
    /// Kind of change.
    pub op: Op,
    /// Old row (object), if any.
    pub before: Option<Json>,
    /// New row (object), if any.
    pub after: Option<Json>,
    /// LSN of the change.
    pub lsn: Lsn,
}

impl SourceInfo {
    /// Builds the event for one streamed change of `table` in `tx`.
    pub fn event(
        &self,
        table: &Table,
        tx: &mut TxContext,
        change: Change,
        now_ms: i64,
    ) -> ChangeEvent {
        let (total, in_table) = tx.next(table.relation.oid);
        ChangeEvent {
            id: EventId::postgres(&self.name, tx.commit_lsn.0, total),
            op: change.op,
            ts_ms: now_ms,
            source: self.source(
                table,
                change.lsn,
                Some(tx.xid),
                tx.commit_ms,
                SnapshotMarker::False,
            ),
            before: change.before,
            after: change.after,
            diff: None,
            actor: None,
            transaction: Some(Transaction {
                id: format!("{}:{}", tx.xid, tx.commit_lsn.0),
                total_order: total,
                data_collection_order: in_table,
            }),
        }
    }

    /// The `source` block.
    pub fn source(
        &self,
        table: &Table,
        lsn: Lsn,
        xid: Option<u32>,
        ts_ms: i64,
        snapshot: SnapshotMarker,
    ) -> Source {
        Source {
            name: self.name.clone(),
            ts_ms,
            snapshot,
            origin: Origin::Postgresql(PostgresOrigin {
                db: self.db.clone(),
                schema: table.relation.namespace.clone(),
                table: table.relation.name.clone(),
                lsn: lsn.0,
                tx_id: xid.map(i64::from),
                sequence: None,
            }),
        }
    }
}
