//! Every PostgreSQL type arrives exactly: each event's values are compared with what
//! the database itself renders (each type's output function, `array_dims`, `unnest`) under the
//! documented session settings and the type table in docs/postgres.md, which this file restates
//! independently of the producer's encoder. Snapshot reads, streamed inserts and both
//! sides of REPLICA IDENTITY FULL updates are all checked.

use std::collections::HashMap;
use std::time::Duration;

use changewire_schemas::{ChangeEvent, Op};
use changewire_tests::{unique_name, Stack};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Number, Value};

use crate::pipeline::{config, database_with, decode, RunningSource};

/// The session settings docs/postgres.md documents for rendered values.
const DOCUMENTED_SESSION: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = iso_8601; \
     SET timezone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = hex; \
     SET search_path = pg_catalog;";

/// What an unchanged TOASTed value arrives as (docs/postgres.md).
const UNCHANGED_TOAST: &str = "__changewire_unchanged_toast";

/// jsonb documents nested deeper than this arrive as their text (docs/postgres.md).
const MAX_DOCUMENT_DEPTH: usize = 100;

/// A column's documented JSON form.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The text form, as a string.
    Text,
    /// A number with exactly PostgreSQL's digits.
    Number,
    /// A number with PostgreSQL's digits; NaN and infinities as strings.
    Float,
    /// `true` / `false`.
    Bool,
    /// Lowercase hex without `\x`.
    Hex,
    /// The jsonb document nested (its text when nested too deep).
    Document,
    /// Nested arrays of the element's form; its text when a lower bound is not 1.
    Array(&'static Expect),
}

/// One column of a sweep: its type, form and the SQL values of its rows (NULL
/// where a row has no value of its own).
struct Column {
    ty: &'static str,
    expect: Expect,
    values: &'static [&'static str],
}

const fn col(ty: &'static str, expect: Expect, values: &'static [&'static str]) -> Column {
    Column { ty, expect, values }
}

/// What the database says of one value: its text, and for arrays their dimensions
/// and element texts in storage order.
#[derive(Debug, Default)]
struct Rendered {
    text: Option<String>,
    dims: Option<String>,
    elements: Vec<Option<String>>,
}

fn expected(expect: Expect, rendered: &Rendered) -> Value {
    let Some(text) = &rendered.text else {
        return Value::Null;
    };
    match expect {
        Expect::Array(element) => expected_array(element, text, rendered),
        scalar => expected_scalar(scalar, text),
    }
}

fn expected_scalar(expect: Expect, text: &str) -> Value {
    let string = || Value::String(text.to_owned());
    match expect {
        Expect::Text | Expect::Array(_) => string(),
        Expect::Number => Value::Number(text.parse().expect("integer text is a JSON number")),
        Expect::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => string(),
            _ => Value::Number(text.parse().expect("finite float text is a JSON number")),
        },
        Expect::Bool => Value::Bool(text == "t"),
        Expect::Hex => Value::String(text.strip_prefix("\\x").expect("hex bytea").to_owned()),
        Expect::Document if nesting_depth(text) > MAX_DOCUMENT_DEPTH => string(),
        Expect::Document => serde_json::from_str(text).expect("jsonb text parses"),
    }
}

fn expected_array(element: &Expect, text: &str, rendered: &Rendered) -> Value {
    let Some(dims) = &rendered.dims else {
        return Value::Array(Vec::new());
    };
    // "[1:2][1:3]" -> [(1, 2), (1, 3)]
    let bounds: Vec<(i64, i64)> = dims
        .trim_matches(|c| c == '[' || c == ']')
        .split("][")
        .map(|dim| {
            let (lower, upper) = dim.split_once(':').expect("lower:upper");
            (lower.parse().unwrap(), upper.parse().unwrap())
        })
        .collect();
    if bounds.iter().any(|(lower, _)| *lower != 1) {
        return Value::String(text.to_owned());
    }
    let sizes: Vec<usize> = bounds.iter().map(|(_, upper)| *upper as usize).collect();
    let mut leaves = rendered.elements.iter().map(|e| match e {
        None => Value::Null,
        Some(text) => expected_scalar(*element, text),
    });
    nest(&sizes, &mut leaves)
}

fn nest(sizes: &[usize], leaves: &mut impl Iterator<Item = Value>) -> Value {
    match sizes.split_first() {
        None => leaves
            .next()
            .expect("as many elements as the dimensions say"),
        Some((size, inner)) => Value::Array((0..*size).map(|_| nest(inner, leaves)).collect()),
    }
}

/// Nesting depth of JSON text (brackets outside strings).
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for c in text.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') | (false, _, '"') => in_string = !in_string,
            (false, _, '[' | '{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, ']' | '}') => depth -= 1,
            _ => {}
        }
    }
    deepest
}

/// Runs `columns` through the producer (half the rows snapshotted, half streamed, then
/// all updated under REPLICA IDENTITY FULL) and checks every value of every event.
async fn sweep(setup: &str, columns: &[Column]) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let definitions: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("c{i} {}", c.ty))
        .collect();
    let (db, client) = database_with(
        &stack,
        &format!(
            "{setup} CREATE TABLE t (id int PRIMARY KEY, touched bool NOT NULL DEFAULT false, {});
             ALTER TABLE t REPLICA IDENTITY FULL;",
            definitions.join(", ")
        ),
    )
    .await?;
    let rows = columns.iter().map(|c| c.values.len()).max().unwrap_or(0);
    let insert = |row: usize| {
        let values: Vec<&str> = columns
            .iter()
            .map(|c| c.values.get(row).copied().unwrap_or("NULL"))
            .collect();
        let names: Vec<String> = (0..columns.len()).map(|i| format!("c{i}")).collect();
        format!(
            "INSERT INTO t (id, {}) VALUES ({row}, {});",
            names.join(", "),
            values.join(", ")
        )
    };
    let snapshotted: String = (0..rows / 2).map(insert).collect();
    client.batch_execute(&snapshotted).await?;

    let prefix = unique_name("types");
    let mut source = RunningSource::streaming(
        &stack.kafka_brokers,
        config(&db.url, "db"),
        &prefix,
        &client,
    )
    .await?;
    let consumer = source
        .consumer(&stack, &format!("{prefix}.db.public.t"))
        .await?;
    let streamed: String = (rows / 2..rows).map(insert).collect();
    client.batch_execute(&streamed).await?;
    let rendered = render(&db, columns).await?;
    client.batch_execute("UPDATE t SET touched = true").await?;

    let events = decode(
        &consumer
            .read_exactly(2 * rows, Duration::from_secs(60))
            .await?,
    )?;
    let ops: Vec<Op> = events.iter().map(|e| e.op).collect();
    assert_eq!(ops.iter().filter(|op| **op == Op::Read).count(), rows / 2);
    assert_eq!(
        ops.iter().filter(|op| **op == Op::Create).count(),
        rows - rows / 2
    );
    assert_eq!(ops.iter().filter(|op| **op == Op::Update).count(), rows);
    for event in &events {
        for (side, row) in [("after", &event.after), ("before", &event.before)] {
            if let Some(row) = row {
                check_row(event, side, row, columns, &rendered);
            }
        }
    }
    source.stop().await?;
    Ok(())
}

/// SQL for `expression` rendered by its type's output function, as the stream and
/// the snapshot send it (a cast to text differs for some types: `true`, `::1/128`).
/// `num_nulls` tells a NULL from a composite whose fields are all NULL.
fn output(expression: &str) -> String {
    format!("CASE WHEN num_nulls({expression}) = 1 THEN NULL ELSE format('%s', {expression}) END")
}

/// Every value of `t` as the database renders it, by row id and column.
async fn render(
    db: &changewire_tests::TestDatabase,
    columns: &[Column],
) -> anyhow::Result<HashMap<i32, Vec<Rendered>>> {
    let client = db.connect().await?;
    client.batch_execute(DOCUMENTED_SESSION).await?;
    let selected: Vec<String> = (0..columns.len())
        .map(|i| {
            format!(
                "{text}, {dims}, {elements}",
                text = output(&format!("c{i}")),
                dims = match columns[i].expect {
                    Expect::Array(_) => format!("array_dims(c{i})"),
                    _ => "NULL::text".into(),
                },
                elements = match columns[i].expect {
                    Expect::Array(_) => format!(
                        // unnest in the select list keeps a composite element whole.
                        "(SELECT json_agg({}) FROM (SELECT unnest(c{i}) AS e) u)::text",
                        output("e")
                    ),
                    _ => "NULL::text".into(),
                }
            )
        })
        .collect();
    let query = format!("SELECT id, {} FROM public.t", selected.join(", "));
    let mut rendered = HashMap::new();
    for row in client.query(&query, &[]).await? {
        let values = (0..columns.len())
            .map(|i| {
                let elements: Option<String> = row.get(3 + 3 * i);
                Rendered {
                    text: row.get(1 + 3 * i),
                    dims: row.get(2 + 3 * i),
                    elements: elements
                        .map(|json| serde_json::from_str(&json).expect("json_agg output"))
                        .unwrap_or_default(),
                }
            })
            .collect();
        rendered.insert(row.get(0), values);
    }
    Ok(rendered)
}

fn check_row(
    event: &ChangeEvent,
    side: &str,
    row: &Value,
    columns: &[Column],
    rendered: &HashMap<i32, Vec<Rendered>>,
) {
    let id = row["id"].as_i64().expect("id") as i32;
    for (i, column) in columns.iter().enumerate() {
        let want = expected(column.expect, &rendered[&id][i]);
        let got = &row[format!("c{i}")];
        assert!(
            // Equal as values and as text (the digits of numbers included).
            got == &want && serde_json::to_string(got).ok() == serde_json::to_string(&want).ok(),
            "{} {side} row {id}, {} column: got {got}, want {want} (database text: {:?})",
            event.op.code(),
            column.ty,
            rendered[&id][i].text,
        );
    }
}

#[tokio::test]
async fn numbers_arrive_with_the_digits_postgres_holds() -> anyhow::Result<()> {
    sweep(
        "",
        &[
            col("smallint", Expect::Number, &["-32768", "32767", "0"]),
            col("integer", Expect::Number, &["-2147483648", "2147483647"]),
            col(
                "bigint",
                Expect::Number,
                &["-9223372036854775808", "9223372036854775807"],
            ),
            col("oid", Expect::Number, &["4294967295", "0"]),
            col(
                "numeric",
                Expect::Text,
                &[
                    "(repeat('9', 500) || '.' || repeat('1', 500))::numeric",
                    "'NaN'",
                    "'Infinity'",
                    "'-Infinity'",
                    "0.000000000000000000001",
                    "'-1e-130'",
                ],
            ),
            col("numeric(6,3)", Expect::Text, &["1.5", "-0"]),
            col(
                "real",
                Expect::Float,
                &[
                    "'NaN'",
                    "'Infinity'",
                    "'-Infinity'",
                    "'-0'",
                    "'1e-45'",
                    "'3.4028235e38'",
                    "0.1",
                ],
            ),
            col(
                "double precision",
                Expect::Float,
                &[
                    "'NaN'",
                    "'-Infinity'",
                    "'-0'",
                    "'4.9e-324'",
                    "'1.7976931348623157e308'",
                    "1/3.0",
                    "0.1",
                ],
            ),
            col("money", Expect::Text, &["'-92233720368547758.08'", "12.34"]),
            col("boolean", Expect::Bool, &["true", "false"]),
        ],
    )
    .await
}

#[tokio::test]
async fn dates_times_and_intervals_arrive_as_documented_text() -> anyhow::Result<()> {
    sweep(
        "",
        &[
            col(
                "date",
                Expect::Text,
                &[
                    "'4713-01-01 BC'",
                    "'5874897-12-31'",
                    "'infinity'",
                    "'-infinity'",
                    "'1969-12-31'",
                ],
            ),
            col(
                "timestamp",
                Expect::Text,
                &[
                    "'1900-01-01 00:00:00.000001'",
                    "'2262-04-12 00:00:00'",
                    "'294276-12-31 23:59:59.999999'",
                    "'4713-01-01 00:00:00 BC'",
                    "'infinity'",
                ],
            ),
            col(
                "timestamptz",
                Expect::Text,
                &[
                    "'1969-12-31 23:59:59.5+05:30'",
                    "'2300-01-01 00:00:00-08'",
                    "'-infinity'",
                ],
            ),
            col(
                "time",
                Expect::Text,
                &["'00:00:00'", "'23:59:59.999999'", "'24:00:00'"],
            ),
            col(
                "timetz",
                Expect::Text,
                &["'12:00:00+05:30'", "'23:59:59-15:59'"],
            ),
            col(
                "interval",
                Expect::Text,
                &[
                    "'-1 year -2 months 3 days 04:05:06.7'",
                    "'178000000 years'",
                    "'0'",
                    "'-00:00:00.000001'",
                ],
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn arrays_of_every_kind_nest_with_their_elements_forms() -> anyhow::Result<()> {
    sweep(
        "CREATE TYPE mood AS ENUM ('ok', 'great');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE TYPE pair AS (n integer, s text);",
        &[
            col(
                "integer[]",
                Expect::Array(&Expect::Number),
                &[
                    "'{1,NULL,3}'",
                    "'{{1,2},{3,4}}'",
                    "'{}'",
                    "'[0:1]={5,6}'",
                    "'{{{1}},{{2}}}'",
                ],
            ),
            col(
                "text[]",
                Expect::Array(&Expect::Text),
                &[
                    r#"'{"a,b","c\"d","e\\f",NULL,"NULL",""," lead"}'"#,
                    "ARRAY['x']",
                ],
            ),
            col(
                "numeric[]",
                Expect::Array(&Expect::Text),
                &["'{1.50,NaN,NULL}'"],
            ),
            col(
                "float8[]",
                Expect::Array(&Expect::Float),
                &["'{NaN,-Infinity,0.1,-0}'"],
            ),
            col("bool[]", Expect::Array(&Expect::Bool), &["'{t,f,NULL}'"]),
            col(
                "jsonb[]",
                Expect::Array(&Expect::Document),
                &[r#"ARRAY['{"a": 0.14285714285714285714}'::jsonb, 'null', NULL]"#],
            ),
            col(
                "json[]",
                Expect::Array(&Expect::Text),
                &[r#"ARRAY['{"b":  1, "b": 2}'::json]"#],
            ),
            col(
                "bytea[]",
                Expect::Array(&Expect::Hex),
                &[r"ARRAY['\xdead'::bytea, '']"],
            ),
            col(
                "timestamptz[]",
                Expect::Array(&Expect::Text),
                &["ARRAY['2000-01-01 00:00:00+00'::timestamptz, 'infinity']"],
            ),
            col(
                "box[]",
                Expect::Array(&Expect::Text),
                &["ARRAY[box '((1,1),(0,0))', box '((2,2),(1,1))']"],
            ),
            col("mood[]", Expect::Array(&Expect::Text), &["'{ok,great}'"]),
            col(
                "posint[]",
                Expect::Array(&Expect::Number),
                &["ARRAY[1, 2]::posint[]"],
            ),
            col(
                "pair[]",
                Expect::Array(&Expect::Text),
                &["ARRAY[ROW(1, 'x y')::pair, NULL]"],
            ),
            col(
                "int4range[]",
                Expect::Array(&Expect::Text),
                &["ARRAY['[1,5)'::int4range, 'empty']"],
            ),
            col(
                "uuid[]",
                Expect::Array(&Expect::Text),
                &["'{6f1c2d3e-0000-4000-8000-000000000001}'"],
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn ranges_and_multiranges_arrive_as_text() -> anyhow::Result<()> {
    sweep(
        "",
        &[
            col(
                "int4range",
                Expect::Text,
                &["'[1,5)'", "'empty'", "'(,)'", "'[3,3]'"],
            ),
            col("int8range", Expect::Text, &["'[-9223372036854775808,0)'"]),
            col("numrange", Expect::Text, &["'[1.5,2.25]'", "'(,0.1)'"]),
            col("tsrange", Expect::Text, &["'[2000-01-01,infinity)'"]),
            col(
                "tstzrange",
                Expect::Text,
                &["'[2000-01-01 00:00+02,2000-01-02)'"],
            ),
            col("daterange", Expect::Text, &["'[2000-01-01,2000-01-05]'"]),
            col("int4multirange", Expect::Text, &["'{[1,3),[5,7)}'", "'{}'"]),
            col(
                "datemultirange",
                Expect::Text,
                &["'{[2000-01-01,2000-02-01)}'"],
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn bytes_and_bit_strings_arrive_exactly() -> anyhow::Result<()> {
    sweep(
        "",
        &[
            col(
                "bytea",
                Expect::Hex,
                &[
                    r"'\x'",
                    r"'\x00ff10'",
                    "decode(repeat('ab', 5000), 'hex')",
                    "'plain text'",
                ],
            ),
            col("bit(8)", Expect::Text, &["B'10101010'", "B'00000000'"]),
            col("varbit", Expect::Text, &["B''", "B'1'"]),
        ],
    )
    .await
}

#[tokio::test]
async fn user_defined_and_extension_types_arrive_as_their_base_or_text() -> anyhow::Result<()> {
    sweep(
        "CREATE EXTENSION hstore; CREATE EXTENSION ltree; CREATE EXTENSION citext;
         CREATE TYPE mood AS ENUM ('ok', 'great');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE DOMAIN document AS jsonb;
         CREATE DOMAIN label AS text;
         CREATE TYPE pair AS (n integer, s text);",
        &[
            col("mood", Expect::Text, &["'ok'", "'great'"]),
            col("posint", Expect::Number, &["1", "2147483647"]),
            col(
                "document",
                Expect::Document,
                &[r#"'{"x": 1.10, "y": [1e2]}'"#],
            ),
            col("label", Expect::Text, &["'hello'"]),
            col(
                "pair",
                Expect::Text,
                &[r#"ROW(1, 'a "q"')"#, "ROW(NULL, NULL)"],
            ),
            col("hstore", Expect::Text, &[r#"'"a"=>"1", "b"=>NULL'"#]),
            col("ltree", Expect::Text, &["'Top.Science.Astronomy'"]),
            col("citext", Expect::Text, &["'MiXeD'"]),
        ],
    )
    .await
}

#[tokio::test]
async fn geometric_network_and_other_builtin_types_arrive_as_text() -> anyhow::Result<()> {
    sweep(
        "",
        &[
            col("point", Expect::Text, &["'(1.5,-2)'", "'(0.1,1e300)'"]),
            col("line", Expect::Text, &["'{1,-1,0}'"]),
            col("lseg", Expect::Text, &["'[(0,0),(1,1)]'"]),
            col("box", Expect::Text, &["'((1,1),(0,0))'"]),
            col(
                "path",
                Expect::Text,
                &["'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"],
            ),
            col("polygon", Expect::Text, &["'((0,0),(1,1),(1,0))'"]),
            col("circle", Expect::Text, &["'<(0,0),1.5>'"]),
            col("inet", Expect::Text, &["'192.168.0.1/24'", "'::1'"]),
            col("cidr", Expect::Text, &["'10.0.0.0/8'"]),
            col("macaddr", Expect::Text, &["'08:00:2b:01:02:03'"]),
            col("macaddr8", Expect::Text, &["'08:00:2b:01:02:03:04:05'"]),
            col(
                "uuid",
                Expect::Text,
                &["'6f1c2d3e-0000-4000-8000-000000000001'"],
            ),
            col("xml", Expect::Text, &[r#"'<a b="c">d &amp; e</a>'"#]),
            col("tsvector", Expect::Text, &["'a fat cat'"]),
            col("tsquery", Expect::Text, &["'fat & (rat | cat)'"]),
            col("pg_lsn", Expect::Text, &["'16/B374D848'"]),
            col("char(3)", Expect::Text, &["'a'"]),
            col("varchar(5)", Expect::Text, &["'ünï'"]),
            col("\"char\"", Expect::Text, &["'x'"]),
            col("name", Expect::Text, &["'a name'"]),
            // Rendered through search_path: pinned, so always schema-qualified.
            col("regclass", Expect::Text, &["'t'", "'pg_class'"]),
            col("regtype", Expect::Text, &["'integer'", "'public.t'"]),
        ],
    )
    .await
}

/// JSON text of documents PostgreSQL accepts: numbers of any size and precision,
/// strings of any characters but NUL, nesting.
fn json_document() -> impl Strategy<Value = String> {
    let number = proptest::string::string_regex(
        "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,40})?([eE][+-]?[0-9]{1,3})?",
    )
    .expect("number pattern");
    let leaf = prop_oneof![
        4 => number,
        2 => json_string(),
        1 => Just("true".to_owned()),
        1 => Just("false".to_owned()),
        1 => Just("null".to_owned()),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(|items| format!("[{}]", items.join(", "))),
            vec((json_string(), inner), 0..8).prop_map(|fields| {
                let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{ {} }}", fields.join(" ,\n"))
            }),
        ]
    })
}

/// A JSON string literal of up to 12 characters, any but NUL.
fn json_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[^\\x00]{0,12}")
        .expect("string pattern")
        .prop_map(|s| serde_json::to_string(&s).expect("strings serialize"))
}

/// Documents the issue named, plus edge cases: what an f64 would round, deep
/// nesting on both sides of the documented limit, a large document, escapes, and
/// what only `json` keeps (duplicate keys, whitespace, key order).
fn literal_documents() -> Vec<String> {
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let large: Vec<String> = (0..3000)
        .map(|i| format!(r#"{{"k{i}": 0.{i}000000000000000000001}}"#))
        .collect();
    vec![
        r#"{"frac": 0.14285714285714285714}"#.into(),
        r#"{"v": 1.2857142857142857}"#.into(),
        "123456789012345678901234567890".into(),
        "1.000000000000000000001".into(),
        "[1e400, -1E-400, 0.0, -0, 1.50, 1e2, 9007199254740993]".into(),
        r#""\u00e9\ud83d\ude00\n\t\"\\\/""#.into(),
        "true".into(),
        "null".into(),
        "{}".into(),
        "[]".into(),
        r#"{"b": 1, "a": {"b": [{"c": 1}]}, "b": 2}"#.into(),
        r#"{ "spaced" :   [ 1 ,2 ] }"#.into(),
        nested(MAX_DOCUMENT_DEPTH),
        nested(MAX_DOCUMENT_DEPTH + 1),
        nested(1000),
        format!("[{}]", large.join(",")),
    ]
}

/// The documents of the issue, edge cases and generated ones, as jsonb and as json,
/// through the real broker: jsonb nested with every number as stored, json as its
/// exact text.
#[tokio::test]
async fn json_documents_and_their_numbers_arrive_exactly() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE docs (id int PRIMARY KEY, touched bool NOT NULL DEFAULT false, j jsonb, t json);
         ALTER TABLE docs REPLICA IDENTITY FULL;",
    )
    .await?;
    let mut documents = literal_documents();
    let mut runner = TestRunner::deterministic();
    let strategy = json_document();
    for _ in 0..300 {
        documents.push(
            strategy
                .new_tree(&mut runner)
                .expect("a document")
                .current(),
        );
    }
    let insert = "INSERT INTO docs (id, j, t) VALUES ($1, $2::text::jsonb, $2::text::json)";
    let half = documents.len() / 2;
    for (id, document) in documents.iter().enumerate().take(half) {
        client.execute(insert, &[&(id as i32), document]).await?;
    }
    let prefix = unique_name("json");
    let mut source = RunningSource::streaming(
        &stack.kafka_brokers,
        config(&db.url, "db"),
        &prefix,
        &client,
    )
    .await?;
    let consumer = source
        .consumer(&stack, &format!("{prefix}.db.public.docs"))
        .await?;
    for (id, document) in documents.iter().enumerate().skip(half) {
        client.execute(insert, &[&(id as i32), document]).await?;
    }
    client
        .execute("UPDATE docs SET touched = true", &[])
        .await?;

    let stored: HashMap<i32, (String, String)> = client
        .query("SELECT id, j::text, t::text FROM docs", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let events = decode(
        &consumer
            .read_exactly(2 * documents.len(), Duration::from_secs(90))
            .await?,
    )?;
    for event in &events {
        for (side, row) in [("after", &event.after), ("before", &event.before)] {
            let Some(row) = row else { continue };
            let id = row["id"].as_i64().expect("id") as i32;
            let (jsonb_text, json_text) = &stored[&id];
            // An update's unchanged value stored out of line is not sent again by
            // PostgreSQL (its `before` is checked).
            let toasted = |column: &str, text: &str| {
                let marked =
                    side == "after" && event.op == Op::Update && row[column] == UNCHANGED_TOAST;
                assert!(
                    !marked || text.len() > 2000,
                    "{column} of row {id} marked unchanged"
                );
                marked
            };
            if !toasted("j", jsonb_text) {
                let want = expected_scalar(Expect::Document, jsonb_text);
                assert_eq!(
                    serde_json::to_string(&row["j"])?,
                    serde_json::to_string(&want)?,
                    "jsonb of row {id} ({})",
                    event.op.code()
                );
            }
            if !toasted("t", json_text) {
                assert_eq!(
                    row["t"],
                    Value::String(json_text.clone()),
                    "json of row {id}"
                );
            }
        }
    }
    let exact: Value = serde_json::from_str(r#"{"frac": 0.14285714285714285714}"#)?;
    let first = events
        .iter()
        .find(|e| e.after.as_ref().is_some_and(|a| a["id"] == 0))
        .expect("row 0");
    assert_eq!(first.after.as_ref().unwrap()["j"], exact);
    assert_eq!(
        first.after.as_ref().unwrap()["j"]["frac"],
        Value::Number("0.14285714285714285714".parse::<Number>()?)
    );
    source.stop().await?;
    Ok(())
}
