//! From pgoutput rows to envelope values: the relation cache and event building
//! (each column's JSON form is decided in [`super::encoding`]).
//!
//! Values arrive in PostgreSQL's text form, rendered by a session pinned to
//! `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC`, `bytea_output=hex`,
//! `extra_float_digits=3` and `search_path=pg_catalog` (see [`SESSION_OPTIONS`]) so
//! that snapshot reads and the stream render values identically, floats with their
//! shortest exact digits and OID-alias types (`regclass`, ...) schema-qualified.

use std::collections::HashMap;
use std::ops::Range;

use changewire_schemas::{
    ChangeEvent, EventId, Op, Origin, PostgresOrigin, SnapshotMarker, Source, Transaction,
};
use serde_json::value::RawValue;

use super::encoding::{write_string, Encoding};
use super::error::PostgresError;
use super::pgoutput::{Lsn, Relation, Value};
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
    /// Per column: its name as a JSON object member's start (`"name":`).
    members: Vec<Vec<u8>>,
    /// The key columns in name order, as the key object lists them.
    key_in_name_order: Vec<usize>,
}

/// A row written as JSON, and the message key taken from it.
#[derive(Debug)]
pub struct Row {
    /// The row: an object of column name to value.
    pub json: Box<RawValue>,
    /// The key columns' values (as published, so redacted ones hashed) as an object,
    /// or `None` for a table without a key.
    pub key: Option<Vec<u8>>,
}

impl Table {
    /// A table of `relation` published to `topic`, keyed by `key_columns`, whose
    /// columns are encoded by `encodings` and redacted where `redacted` says.
    pub fn new(
        relation: Relation,
        key_columns: Vec<usize>,
        topic: String,
        redactor: Option<Redactor>,
        redacted: Vec<bool>,
        encodings: Vec<Encoding>,
    ) -> Self {
        let members = (relation.columns.iter())
            .map(|column| {
                let mut member = Vec::with_capacity(column.name.len() + 3);
                write_string(&column.name, &mut member);
                member.push(b':');
                member
            })
            .collect();
        let mut key_in_name_order = key_columns.clone();
        key_in_name_order.sort_by(|&a, &b| relation.columns[a].name.cmp(&relation.columns[b].name));
        Self {
            relation,
            key_columns,
            topic,
            redactor,
            redacted,
            encodings,
            counters: OpCounters::default(),
            members,
            key_in_name_order,
        }
    }

    /// `schema.table`, as metrics and logs name it.
    pub fn label(&self) -> String {
        format!("{}.{}", self.relation.namespace, self.relation.name)
    }

    /// A row as a JSON object, column name to value, written once from the tuple's
    /// texts, with its key.
    pub fn row(&self, tuple: &[Value]) -> Result<Row, PostgresError> {
        let mut json = Vec::with_capacity(256);
        let mut spans = vec![0..0; self.members.len()];
        json.push(b'{');
        for (i, (member, value)) in self.members.iter().zip(tuple).enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(member);
            let start = json.len();
            self.write_value(i, value, &mut json);
            spans[i] = start..json.len();
        }
        json.push(b'}');
        let key = self.key(&json, &spans);
        let row_error = |source| PostgresError::RowJson {
            table: self.label(),
            source,
        };
        let text = String::from_utf8(json).map_err(|e| row_error(e.into()))?;
        let json = RawValue::from_string(text).map_err(|e| row_error(e.into()))?;
        Ok(Row { json, key })
    }

    /// Writes column `i`'s value, redacted when configured. Nulls and unchanged TOAST
    /// markers carry no secret and stay as they are.
    fn write_value(&self, i: usize, value: &Value, out: &mut Vec<u8>) {
        let start = out.len();
        self.encodings[i].write_json(value, out);
        let secret = matches!(value, Value::Text(_) | Value::Binary(_));
        if let (Some(redactor), Some(true), true) = (&self.redactor, self.redacted.get(i), secret) {
            let hash = redactor.hash_text(&out[start..]);
            out.truncate(start);
            write_string(&hash, out);
        }
    }

    /// The key object of a row written to `json`, column `i`'s value at `spans[i]`.
    fn key(&self, json: &[u8], spans: &[Range<usize>]) -> Option<Vec<u8>> {
        if self.key_in_name_order.is_empty() {
            return None;
        }
        let mut key = Vec::with_capacity(64);
        key.push(b'{');
        for (n, &i) in self.key_in_name_order.iter().enumerate() {
            if n > 0 {
                key.push(b',');
            }
            key.extend_from_slice(&self.members[i]);
            match spans.get(i).filter(|span| !span.is_empty()) {
                Some(span) => key.extend_from_slice(&json[span.clone()]),
                None => key.extend_from_slice(b"null"),
            }
        }
        key.push(b'}');
        Some(key)
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
    /// `xid:commit_lsn`, as every event of the transaction names it.
    id: String,
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
            id: format!("{xid}:{}", commit_lsn.0),
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
    /// Old row, if any.
    pub before: Option<Row>,
    /// New row, if any.
    pub after: Option<Row>,
    /// LSN of the change.
    pub lsn: Lsn,
}

/// An event of one table with its message key (the new row's, else the old one's).
#[derive(Debug)]
pub struct TableEvent {
    /// The event.
    pub event: ChangeEvent<Box<RawValue>>,
    /// Its message key; `None` for a table without a key and for truncates.
    pub key: Option<Vec<u8>>,
}

impl SourceInfo {
    /// Builds the event for one streamed change of `table` in `tx`.
    pub fn event(
        &self,
        table: &Table,
        tx: &mut TxContext,
        mut change: Change,
        now_ms: i64,
    ) -> TableEvent {
        let (total, in_table) = tx.next(table.relation.oid);
        // The key moves out of the row that has it; no copy per event.
        let key = (change.after.as_mut().or(change.before.as_mut())).and_then(|row| row.key.take());
        let event = ChangeEvent {
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
            before: change.before.map(|row| row.json),
            after: change.after.map(|row| row.json),
            diff: None,
            actor: None,
            transaction: Some(Transaction {
                id: tx.id.clone(),
                total_order: total,
                data_collection_order: in_table,
            }),
        };
        TableEvent { event, key }
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

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::postgres::pgoutput::Column;

    /// `accounts(zone text, id bigint, doc jsonb, "pass""word" text)` keyed by
    /// (zone, id), the last column redacted.
    fn accounts() -> Table {
        let column = |name: &str, type_oid| Column::new(name, type_oid, false);
        let relation = Relation {
            oid: 1,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: b'd',
            columns: vec![
                column("zone", 25),
                column("id", 20),
                column("doc", 3802),
                column("pass\"word", 25),
            ],
        };
        let encodings = relation
            .columns
            .iter()
            .map(|c| Encoding::of_base_type(c.type_oid))
            .collect();
        let redactor = Redactor::new(b"key", vec!["public.accounts.pass\"word".into()]);
        Table::new(
            relation,
            vec![0, 1],
            "t".into(),
            Some(redactor),
            vec![false, false, false, true],
            encodings,
        )
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn rows_are_objects_of_every_column_and_keys_list_key_columns_by_name() {
        let table = accounts();
        let tuple = [
            text("eu \"1\""),
            text("42"),
            text(r#"{"b": [1.50, {"a": null}]}"#),
            text("hunter2"),
        ];
        let row = table.row(&tuple).expect("a row");
        let parsed: Json = serde_json::from_str(row.json.get()).expect("JSON");
        let hash = table
            .redactor
            .as_ref()
            .expect("redactor")
            .hash_text(br#""hunter2""#);
        assert_eq!(
            parsed["pass\"word"],
            json!(hash),
            "the redacted value is hashed"
        );
        assert_eq!(parsed["doc"]["b"][0].to_string(), "1.50", "digits kept");
        assert_eq!(
            row.json.get(),
            format!(
                r#"{{"zone":"eu \"1\"","id":42,"doc":{{"b":[1.50,{{"a":null}}]}},"pass\"word":"{hash}"}}"#
            )
        );
        assert_eq!(
            String::from_utf8(row.key.expect("a key")).expect("UTF-8"),
            r#"{"id":42,"zone":"eu \"1\""}"#,
            "the key object lists its columns in name order"
        );
    }

    #[test]
    fn nulls_are_not_hashed_and_missing_key_values_are_null() {
        let table = accounts();
        let row = table.row(&[text("eu")]).expect("a row");
        assert_eq!(row.json.get(), r#"{"zone":"eu"}"#);
        assert_eq!(row.key.as_deref(), Some(&br#"{"id":null,"zone":"eu"}"#[..]));
        let row = table
            .row(&[Value::Null, Value::Null, Value::Null, Value::Null])
            .expect("a row");
        assert_eq!(
            row.json.get(),
            r#"{"zone":null,"id":null,"doc":null,"pass\"word":null}"#
        );
    }
}
