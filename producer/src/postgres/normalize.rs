//! From pgoutput rows to envelope values: the relation cache, type mapping to JSON,
//! and event building.
//!
//! Values arrive in PostgreSQL's text form, rendered by a session pinned to
//! `DateStyle=ISO`, `IntervalStyle=iso_8601`, `TimeZone=UTC` and
//! `extra_float_digits=3` (see [`SESSION_OPTIONS`]) so that snapshot reads and the
//! stream render values identically.

use std::collections::HashMap;

use changewire_schemas::{
    ChangeEvent, EventId, Op, Origin, PostgresOrigin, SnapshotMarker, Source, Transaction,
};
use serde_json::{Map, Number, Value as Json};

use super::pgoutput::{Lsn, Relation, Tuple, Value};
use crate::redact::Redactor;

/// Session settings for every connection whose values reach events.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c timezone=UTC -c extra_float_digits=3";

/// Placeholder for a TOASTed value that did not change and was not sent (never a
/// silent null).
pub const UNCHANGED_TOAST: &str = "__changewire_unchanged_toast";

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
}

impl Table {
    /// A row as a JSON object, column name to value.
    pub fn row(&self, tuple: &Tuple) -> Json {
        let mut object = Map::with_capacity(tuple.len());
        for (i, (column, value)) in self.relation.columns.iter().zip(tuple).enumerate() {
            object.insert(column.name.clone(), self.value(i, column.type_oid, value));
        }
        Json::Object(object)
    }

    /// Column `i`'s value as JSON, redacted when configured. Nulls and unchanged
    /// TOAST markers carry no secret and stay as they are.
    fn value(&self, i: usize, type_oid: u32, value: &Value) -> Json {
        let json = to_json(type_oid, value);
        match (&self.redactor, self.redacted.get(i), value) {
            (Some(redactor), Some(true), Value::Text(_) | Value::Binary(_)) => redactor.hash(&json),
            _ => json,
        }
    }

    /// The message key: the key columns of `tuple` as a JSON object, or `None` for a
    /// table without a key and for changes without a row (truncate).
    pub fn key(&self, tuple: &[Value]) -> Option<Vec<u8>> {
        if self.key_columns.is_empty() || tuple.is_empty() {
            return None;
        }
        let mut object = Map::new();
        for &i in &self.key_columns {
            let column = &self.relation.columns[i];
            let value = tuple
                .get(i)
                .map_or(Json::Null, |v| to_json(column.type_oid, v));
            object.insert(column.name.clone(), value);
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

/// Well-known type OIDs (pg_type.dat).
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const JSONB: u32 = 3802;
}

/// Element type of the built-in array types, by array OID.
fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        199 => oid::JSON,
        3807 => oid::JSONB,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        // Arrays of types whose JSON form is their text: text, varchar, bpchar, name,
        // numeric, uuid, date, time, timestamp(tz), interval, inet, cidr.
        1009 | 1015 | 1014 | 1003 | 1231 | 2951 | 1182 | 1183 | 1115 | 1185 | 1187 | 1041 | 651 => {
            25
        }
        _ => return None,
    })
}

/// One column value as JSON. Numbers that JSON cannot hold exactly (numeric, NaN,
/// infinities) stay strings; json/jsonb nest; unknown types keep their text form.
pub fn to_json(type_oid: u32, value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::UnchangedToast => Json::String(UNCHANGED_TOAST.to_owned()),
        Value::Binary(bytes) => Json::String(hex(bytes)),
        Value::Text(text) => text_to_json(type_oid, text),
    }
}

fn text_to_json(type_oid: u32, text: &str) -> Json {
    let fallback = || Json::String(text.to_owned());
    match type_oid {
        oid::BOOL => Json::Bool(text == "t"),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text
            .parse::<i64>()
            .map(Json::from)
            .unwrap_or_else(|_| fallback()),
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Json::Number)
            .unwrap_or_else(fallback),
        oid::JSON | oid::JSONB => serde_json::from_str(text).unwrap_or_else(|_| fallback()),
        oid::BYTEA => Json::String(text.strip_prefix("\\x").unwrap_or(text).to_owned()),
        other => match array_element(other) {
            Some(element) => parse_array(text)
                .map(|array| array_to_json(element, &array))
                .unwrap_or_else(fallback),
            None => fallback(),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A parsed array literal: nested arrays of optional element texts.
#[derive(Debug, PartialEq)]
enum ArrayItem {
    Null,
    Text(String),
    Array(Vec<ArrayItem>),
}

fn array_to_json(element: u32, items: &[ArrayItem]) -> Json {
    Json::Array(
        items
            .iter()
            .map(|item| match item {
                ArrayItem::Null => Json::Null,
                ArrayItem::Text(t) => text_to_json(element, t),
                ArrayItem::Array(inner) => array_to_json(element, inner),
            })
            .collect(),
    )
}

/// Parses PostgreSQL's array output (`{1,2}`, `{{"a b",NULL},{c,"d\"e"}}`), skipping
/// a leading dimension decoration (`[0:1]={...}`). `None` when malformed.
fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let body = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let mut chars = body.chars().peekable();
    let items = parse_array_level(&mut chars)?;
    chars.next().is_none().then_some(items)
}

fn parse_array_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
) -> Option<Vec<ArrayItem>> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(items);
    }
    loop {
        let item = match chars.peek()? {
            '{' => ArrayItem::Array(parse_array_level(chars)?),
            '"' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        '\\' => text.push(chars.next()?),
                        '"' => break,
                        c => text.push(c),
                    }
                }
                ArrayItem::Text(text)
            }
            _ => {
                let mut text = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    text.push(c);
                    chars.next();
                }
                if text == "NULL" {
                    ArrayItem::Null
                } else {
                    ArrayItem::Text(text)
                }
            }
        };
        items.push(item);
        match chars.next()? {
            ',' => continue,
            '}' => return Some(items),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn text(oid: u32, s: &str) -> Json {
        to_json(oid, &Value::Text(s.into()))
    }

    #[test]
    fn scalars_map_to_json_types() {
        assert_eq!(text(oid::BOOL, "t"), json!(true));
        assert_eq!(text(oid::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(text(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(text(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(
            text(1700, "12345678901234567890.123"),
            json!("12345678901234567890.123")
        );
        assert_eq!(
            text(oid::JSONB, r#"{"a": [1, {"b": null}]}"#),
            json!({"a": [1, {"b": null}]})
        );
        assert_eq!(text(oid::BYTEA, "\\xdeadbeef"), json!("deadbeef"));
        assert_eq!(to_json(25, &Value::UnchangedToast), json!(UNCHANGED_TOAST));
        assert_eq!(to_json(25, &Value::Null), Json::Null);
    }

    #[test]
    fn arrays_nest_and_keep_element_types() {
        assert_eq!(text(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(text(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            text(1009, r#"{"a b","c\"d",NULL,"NULL",e}"#),
            json!(["a b", "c\"d", null, "NULL", "e"])
        );
        assert_eq!(text(1007, "[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(text(1009, "{}"), json!([]));
        assert_eq!(text(3807, r#"{"{\"k\": 1}"}"#), json!([{"k": 1}]));
        assert_eq!(
            text(1007, "{1,2"),
            json!("{1,2"),
            "malformed arrays keep their text"
        );
    }
}
