//! Phase 0 of the producer benchmark: the CPU one change costs from its decoded
//! tuple to encoded bytes and key, as the producer does it (each row written as JSON
//! text once) against the baseline of building each row as a `serde_json::Value`
//! first (what the producer did before), alternating in the same run.

use std::hint::black_box;
use std::time::Duration;

use changewire_producer::postgres::encoding::Encoding;
use changewire_producer::postgres::normalize::{Change, SourceInfo, Table, TxContext};
use changewire_producer::postgres::pgoutput::{Column, Lsn, Relation, Value};
use changewire_schemas::{ChangeEvent, Codec, EventId, Op, Transaction};
use serde_json::{Map, Number, Value as Json};

use super::median;

/// Changes per timed round; rounds alternate between the two ways.
const PER_ROUND: usize = 200_000;
const ROUNDS: usize = 3;

/// CPU per change (ns) of the producer's way and of the baseline: medians of
/// [`ROUNDS`] alternating rounds.
pub struct EncodeCost {
    /// Row written once as JSON text.
    pub ours_ns: f64,
    /// Row built as a `serde_json::Value`, then serialized.
    pub baseline_ns: f64,
}

/// Measures both ways on rows shaped like the benchmark's table.
pub fn measure() -> anyhow::Result<EncodeCost> {
    let inserts = Inserts::new()?;
    let (table, info, codec) = (&inserts.table, &inserts.info, &inserts.codec);
    let tuples: Vec<Vec<Value>> = (1..=1000).map(tuple).collect();
    let (mut ours, mut baseline) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(per_change(|i| {
            let tuple = &tuples[i % tuples.len()];
            black_box(inserts.encode_tuple(tuple, i as u64)?);
            Ok(())
        })?);
        baseline.push(per_change(|i| {
            let tuple = &tuples[i % tuples.len()];
            let (row, key) = value_row(table, tuple);
            let event = value_event(info, table, i as u64, row);
            black_box((codec.encode(&event)?, key));
            Ok(())
        })?);
    }
    Ok(EncodeCost {
        ours_ns: median(ours),
        baseline_ns: median(baseline),
    })
}

/// An encoded event and its message key.
pub type EncodedRecord = (Vec<u8>, Option<Vec<u8>>);

/// Inserts into the bench table, encoded the producer's way.
pub struct Inserts {
    info: SourceInfo,
    table: Table,
    codec: Codec,
}

impl Inserts {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            info: SourceInfo {
                name: "bench".into(),
                db: "bench".into(),
            },
            table: bench_table(),
            codec: Codec::json()?,
        })
    }

    /// Row `g` as the live load inserts it: its tuple built as pgoutput's decoder
    /// builds it, then written, encoded and keyed as the producer does.
    pub fn encode(&self, g: u64) -> anyhow::Result<EncodedRecord> {
        self.encode_tuple(&tuple(g), g)
    }

    /// `tuple` inserted at `lsn`, encoded with its key.
    fn encode_tuple(&self, tuple: &[Value], lsn: u64) -> anyhow::Result<EncodedRecord> {
        let mut tx = TxContext::new(7, Lsn(lsn), 0);
        let change = Change {
            op: Op::Create,
            before: None,
            after: Some(self.table.row(tuple)?),
            lsn: Lsn(lsn),
        };
        let event = self.info.event(&self.table, &mut tx, change, 0);
        Ok((self.codec.encode(&event.event)?, event.key))
    }
}

/// `bench(id bigint PRIMARY KEY, n int, note text, doc jsonb)`.
fn bench_table() -> Table {
    let column = |name: &str, type_oid| Column::new(name, type_oid, name == "id");
    let relation = Relation {
        oid: 1,
        namespace: "public".into(),
        name: "bench".into(),
        replica_identity: b'd',
        columns: vec![
            column("id", 20),
            column("n", 23),
            column("note", 25),
            column("doc", 3802),
        ],
    };
    let encodings = (relation.columns.iter())
        .map(|c| Encoding::of_base_type(c.type_oid))
        .collect();
    Table::new(
        relation,
        vec![0],
        "t".into(),
        None,
        vec![false; 4],
        encodings,
    )
}

/// A row as the load writes it, in PostgreSQL's text forms.
fn tuple(g: u64) -> Vec<Value> {
    vec![
        Value::Text(g.to_string()),
        Value::Text("0".into()),
        Value::Text(format!("{:032x}", u128::from(g) * 0x9e37_79b9_7f4a_7c15)),
        Value::Text(format!(
            r#"{{"id": {g}, "price": {}.0000{g}, "ratio": {}.142857142857142857}}"#,
            g,
            g / 7
        )),
    ]
}

/// CPU time per call of `change` over [`PER_ROUND`] calls, in ns.
fn per_change(mut change: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let before = changewire_tests::cpu_time("self");
    for i in 0..PER_ROUND {
        change(i)?;
    }
    let spent: Duration = changewire_tests::cpu_time("self").saturating_sub(before);
    Ok(spent.as_nanos() as f64 / PER_ROUND as f64)
}

/// The baseline's row: a `Value` object (numbers exact, the document parsed), and
/// its key object serialized.
fn value_row(table: &Table, tuple: &[Value]) -> (Json, Vec<u8>) {
    let mut row = Map::new();
    for (column, value) in table.relation.columns.iter().zip(tuple) {
        let Value::Text(text) = value else {
            unreachable!("the bench rows are texts")
        };
        let json = match column.type_oid {
            20 | 23 => text.parse::<Number>().map_or(Json::Null, Json::Number),
            3802 => serde_json::from_str(text).unwrap_or(Json::Null),
            _ => Json::String(text.clone()),
        };
        row.insert(column.name.clone(), json);
    }
    let key: Map<String, Json> = [("id".to_owned(), row["id"].clone())].into_iter().collect();
    let key = serde_json::to_vec(&key).unwrap_or_default();
    (Json::Object(row), key)
}

/// The baseline's event: the same envelope, holding a `Value` row.
fn value_event(info: &SourceInfo, table: &Table, seq: u64, row: Json) -> ChangeEvent {
    let source = info.source(table, Lsn(seq), Some(7), 0, Default::default());
    ChangeEvent {
        id: EventId::postgres(&info.name, seq, 1),
        op: Op::Create,
        ts_ms: 0,
        source,
        before: None,
        after: Some(row),
        diff: None,
        actor: None,
        transaction: Some(Transaction {
            id: format!("7:{seq}"),
            total_order: 1,
            data_collection_order: 1,
        }),
    }
}
