//! How each column's values become JSON, decided once per relation from the catalog.
//!
//! Every value arrives in PostgreSQL's text form (see
//! [`SESSION_OPTIONS`](super::normalize::SESSION_OPTIONS)) and leaves either as that
//! text or as a JSON value that says exactly the same thing: numbers keep the digits
//! PostgreSQL wrote (serde_json's `arbitrary_precision`), never an f64's rounding.
//! Domains are encoded as their base type, arrays of any element type as nested
//! JSON arrays.

use changewire_schemas::hex;
use std::collections::HashMap;

use tokio_postgres::Client;

use super::pgoutput::Value;

/// jsonb documents nested deeper than this arrive as their text: every JSON reader
/// of events (serde_json's included) stops at 128 levels for the whole event, and a
/// consumer must never be handed an event it cannot decode.
pub const MAX_DOCUMENT_DEPTH: usize = 100;

/// Placeholder for a TOASTed value that did not change and was not sent (never a
/// silent null).
pub const UNCHANGED_TOAST: &str = "__changewire_unchanged_toast";

/// The JSON form of one column's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// `boolean`: `true` / `false`.
    Bool,
    /// `smallint`, `integer`, `bigint`, `oid`: a JSON number with PostgreSQL's digits.
    Integer,
    /// `real`, `double precision`: a JSON number with PostgreSQL's shortest exact
    /// digits; `NaN` and the infinities as strings.
    Float,
    /// `jsonb`: the document nested, numbers exactly as stored (its text when nested
    /// deeper than [`MAX_DOCUMENT_DEPTH`]).
    Jsonb,
    /// `bytea`: lowercase hex without the `\x` prefix.
    Bytea,
    /// Anything else (numeric, json, dates, ranges, enums, composites, ...): the text
    /// form, unchanged.
    Text,
    /// An array: nested JSON arrays of the element's encoding.
    Array {
        /// How the elements are encoded.
        element: Box<Encoding>,
        /// The element type's delimiter in the array literal (`;` for `box`).
        delimiter: char,
    },
}

/// Well-known type OIDs (pg_type.dat).
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const JSONB: u32 = 3802;
}

impl Encoding {
    /// The encoding of a base (non-domain, non-array) type.
    pub fn of_base_type(type_oid: u32) -> Self {
        match type_oid {
            oid::BOOL => Self::Bool,
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Self::Integer,
            oid::FLOAT4 | oid::FLOAT8 => Self::Float,
            oid::JSONB => Self::Jsonb,
            oid::BYTEA => Self::Bytea,
            _ => Self::Text,
        }
    }

    /// Writes one column value to `out` as JSON.
    pub fn write_json(&self, value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Null => out.extend_from_slice(b"null"),
            Value::UnchangedToast => write_string(UNCHANGED_TOAST, out),
            Value::Binary(bytes) => write_string(&hex(bytes), out),
            Value::Text(text) => self.write_text(text, out),
        }
    }

    fn write_text(&self, text: &str, out: &mut Vec<u8>) {
        match self {
            Self::Bool => match text {
                "t" => out.extend_from_slice(b"true"),
                "f" => out.extend_from_slice(b"false"),
                _ => write_string(text, out),
            },
            // PostgreSQL's integer and float output is JSON number text, except NaN
            // and the infinities, which stay strings.
            Self::Integer | Self::Float if is_json_number(text) => {
                out.extend_from_slice(text.as_bytes())
            }
            Self::Jsonb if write_document(text, out) => {}
            Self::Bytea => write_string(text.strip_prefix("\\x").unwrap_or(text), out),
            Self::Array { element, delimiter } => match parse_array(text, *delimiter) {
                Some(items) => write_array(element, &items, out),
                None => write_string(text, out),
            },
            _ => write_string(text, out),
        }
    }
}

/// Writes `text` as a JSON string.
pub fn write_string(text: &str, out: &mut Vec<u8>) {
    // Writing a string to a Vec cannot fail.
    serde_json::to_writer(out, text).unwrap_or_else(|_| unreachable!());
}

/// Whether `text` is a number as JSON's grammar has it (so it can be written as is).
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut at = usize::from(bytes.first() == Some(&b'-'));
    match bytes.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => {
            skip_digits(bytes, &mut at);
        }
        _ => return false,
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        if !skip_digits(bytes, &mut at) {
            return false;
        }
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        if !skip_digits(bytes, &mut at) {
            return false;
        }
    }
    at == bytes.len()
}

/// Moves `at` past ASCII digits; whether there was one.
fn skip_digits(bytes: &[u8], at: &mut usize) -> bool {
    let start = *at;
    while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
        *at += 1;
    }
    *at > start
}

/// Writes a jsonb document without the whitespace PostgreSQL puts between tokens;
/// `false` (and nothing written) when it nests deeper than [`MAX_DOCUMENT_DEPTH`].
/// Numbers keep their digits: they are copied, not parsed. PostgreSQL prints jsonb
/// from its parsed form, so the text is JSON; the row it ends up in is checked whole.
fn write_document(text: &str, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let (mut depth, mut in_string, mut escaped) = (0, false, false);
    for &byte in text.as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b' ' | b'\t' | b'\n' | b'\r' => continue,
                b'"' => in_string = true,
                b'[' | b'{' if depth == MAX_DOCUMENT_DEPTH => {
                    out.truncate(start);
                    return false;
                }
                b'[' | b'{' => depth += 1,
                b']' | b'}' => depth -= 1,
                _ => {}
            }
        }
        out.push(byte);
    }
    true
}

/// What the catalog says of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogType {
    /// For a domain, the type it constrains.
    pub domain_of: Option<u32>,
    /// For an array type (input function `array_in`), its element type.
    pub array_of: Option<u32>,
    /// The delimiter between this type's values in an array literal.
    pub delimiter: char,
}

/// The encodings of `type_oids` from the catalog entries of every type they reach.
/// A type missing from `catalog` (dropped meanwhile) is encoded as text.
pub fn resolve(type_oid: u32, catalog: &HashMap<u32, CatalogType>) -> Encoding {
    // Domains nest and arrays of domains exist; the depth bound guards a
    // corrupted catalog against looping.
    let mut current = type_oid;
    for _ in 0..32 {
        match catalog.get(&current) {
            Some(CatalogType {
                domain_of: Some(base),
                ..
            }) => current = *base,
            Some(CatalogType {
                array_of: Some(element),
                ..
            }) => {
                let delimiter = element_delimiter(*element, catalog);
                return Encoding::Array {
                    element: Box::new(resolve(*element, catalog)),
                    delimiter,
                };
            }
            _ => return Encoding::of_base_type(current),
        }
    }
    Encoding::Text
}

/// The delimiter of an array's elements: that of the element's base type.
fn element_delimiter(element: u32, catalog: &HashMap<u32, CatalogType>) -> char {
    catalog.get(&element).map_or(',', |t| t.delimiter)
}

/// Reads from `pg_type` every type `type_oids` reach (through domains and array
/// elements), as [`resolve`] needs them.
pub async fn load_catalog(
    client: &Client,
    type_oids: &[u32],
) -> Result<HashMap<u32, CatalogType>, tokio_postgres::Error> {
    let mut catalog = HashMap::new();
    let mut wanted: Vec<u32> = type_oids.to_vec();
    while !wanted.is_empty() {
        let rows = client
            .query(
                "SELECT oid, CASE WHEN typtype = 'd' THEN typbasetype END, \
                        CASE WHEN typinput = 'array_in'::regproc THEN typelem END, \
                        typdelim::text \
                 FROM pg_type WHERE oid = ANY($1)",
                &[&wanted],
            )
            .await?;
        wanted.clear();
        for row in rows {
            let entry = CatalogType {
                domain_of: row.get(1),
                array_of: row.get(2),
                delimiter: row.get::<_, String>(3).chars().next().unwrap_or(','),
            };
            for next in entry.domain_of.iter().chain(&entry.array_of) {
                if !catalog.contains_key(next) && !wanted.contains(next) {
                    wanted.push(*next);
                }
            }
            catalog.insert(row.get(0), entry);
        }
        wanted.retain(|oid| !catalog.contains_key(oid));
    }
    Ok(catalog)
}

/// A parsed array literal: nested arrays of optional element texts.
#[derive(Debug, PartialEq)]
enum ArrayItem {
    Null,
    Text(String),
    Array(Vec<ArrayItem>),
}

/// Writes a parsed array as nested JSON arrays of `element`'s encoding.
fn write_array(element: &Encoding, items: &[ArrayItem], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match item {
            ArrayItem::Null => out.extend_from_slice(b"null"),
            ArrayItem::Text(text) => element.write_text(text, out),
            ArrayItem::Array(inner) => write_array(element, inner, out),
        }
    }
    out.push(b']');
}

/// Parses PostgreSQL's array output (`{1,2}`, `{{"a b",NULL},{c,"d\"e"}}`). `None`
/// when malformed, and for an array whose lower bounds are not 1
/// (`[0:1]={5,6}`): nested JSON arrays cannot say where they start, so such a value
/// keeps its text.
fn parse_array(text: &str, delimiter: char) -> Option<Vec<ArrayItem>> {
    let mut chars = text.chars().peekable();
    let items = parse_array_level(&mut chars, delimiter)?;
    chars.next().is_none().then_some(items)
}

fn parse_array_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    delimiter: char,
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
            '{' => ArrayItem::Array(parse_array_level(chars, delimiter)?),
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
                    if c == delimiter || c == '}' {
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
            c if c == delimiter => continue,
            '}' => return Some(items),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value as Json};

    use super::*;

    fn written(encoding: &Encoding, value: Value) -> String {
        let mut out = Vec::new();
        encoding.write_json(&value, &mut out);
        String::from_utf8(out).expect("written JSON is UTF-8")
    }

    fn text(encoding: &Encoding, s: &str) -> Json {
        let written = written(encoding, Value::Text(s.into()));
        serde_json::from_str(&written).unwrap_or_else(|e| panic!("{written:?}: {e}"))
    }

    fn array_of(element: Encoding) -> Encoding {
        Encoding::Array {
            element: Box::new(element),
            delimiter: ',',
        }
    }

    #[test]
    fn scalars_map_to_json_types() {
        assert_eq!(text(&Encoding::Bool, "t"), json!(true));
        assert_eq!(
            text(&Encoding::Integer, "-9223372036854775808"),
            json!(i64::MIN)
        );
        assert_eq!(text(&Encoding::Float, "1.5"), json!(1.5));
        assert_eq!(text(&Encoding::Float, "NaN"), json!("NaN"));
        assert_eq!(text(&Encoding::Float, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            text(&Encoding::Text, "12345678901234567890.123"),
            json!("12345678901234567890.123")
        );
        assert_eq!(
            text(&Encoding::Jsonb, r#"{"a": [1, {"b": null}]}"#),
            json!({"a": [1, {"b": null}]})
        );
        assert_eq!(text(&Encoding::Bytea, "\\xdeadbeef"), json!("deadbeef"));
        assert_eq!(
            written(&Encoding::Text, Value::UnchangedToast),
            json!(UNCHANGED_TOAST).to_string()
        );
        assert_eq!(written(&Encoding::Integer, Value::Null), "null");
        assert_eq!(
            written(&Encoding::Bytea, Value::Binary(vec![0xde, 0xad])),
            r#""dead""#
        );
    }

    #[test]
    fn numbers_keep_the_digits_postgres_wrote() {
        for digits in [
            "0.14285714285714285714",
            "1.2857142857142857",
            "123456789012345678901234567890",
            "1.000000000000000000001",
            "-0",
            "1e+100",
            "4.9406564584124654e-324",
        ] {
            let document = format!(r#"{{"n": {digits}, "a": [{digits}]}}"#);
            assert_eq!(
                written(&Encoding::Jsonb, Value::Text(document)),
                format!(r#"{{"n":{digits},"a":[{digits}]}}"#)
            );
            assert_eq!(
                written(&Encoding::Float, Value::Text(digits.into())),
                digits
            );
        }
        assert_eq!(
            written(
                &Encoding::Integer,
                Value::Text("9223372036854775807".into())
            ),
            "9223372036854775807"
        );
    }

    /// JSON documents of every shape, numbers as digit strings of any length.
    fn documents() -> impl Strategy<Value = Json> {
        let number = "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?"
            .prop_map(|digits| Json::Number(digits.parse().expect("a JSON number")));
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            number,
            any::<String>().prop_map(Json::String),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Json::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|fields| Json::Object(fields.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// A document PostgreSQL prints with spaces is written as the compact JSON of
        /// the same value, byte for byte.
        #[test]
        fn documents_are_written_compact_and_exact(document in documents()) {
            let spaced = serde_json::to_string_pretty(&document).unwrap();
            prop_assert_eq!(
                written(&Encoding::Jsonb, Value::Text(spaced)),
                serde_json::to_string(&document).unwrap()
            );
        }

        /// Number texts are written as they are exactly when JSON reads them as numbers.
        #[test]
        fn number_texts_pass_as_json_numbers_exactly_when_json_says_so(
            text in "[-+]?[0-9.eE+-]{0,8}|NaN|-?Infinity"
        ) {
            let as_json = written(&Encoding::Float, Value::Text(text.clone()));
            if text.parse::<serde_json::Number>().is_ok() {
                prop_assert_eq!(as_json, text);
            } else {
                prop_assert_eq!(as_json, serde_json::to_string(&text).unwrap());
            }
        }
    }

    #[test]
    fn documents_nested_too_deep_for_readers_keep_their_text() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let deepest_nested = text(&Encoding::Jsonb, &nested(MAX_DOCUMENT_DEPTH));
        assert!(deepest_nested.is_array());
        for too_deep in [MAX_DOCUMENT_DEPTH + 1, 1000] {
            assert_eq!(
                text(&Encoding::Jsonb, &nested(too_deep)),
                Json::String(nested(too_deep))
            );
        }
    }

    #[test]
    fn arrays_nest_and_keep_element_types() {
        let ints = array_of(Encoding::Integer);
        let texts = array_of(Encoding::Text);
        assert_eq!(text(&ints, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(text(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            text(&texts, r#"{"a b","c\"d",NULL,"NULL",e}"#),
            json!(["a b", "c\"d", null, "NULL", "e"])
        );
        assert_eq!(text(&texts, "{}"), json!([]));
        assert_eq!(
            text(&array_of(Encoding::Jsonb), r#"{"{\"k\": 1}"}"#),
            json!([{"k": 1}])
        );
        assert_eq!(
            text(&ints, "[0:1]={5,6}"),
            json!("[0:1]={5,6}"),
            "bounds other than 1 keep the text"
        );
        assert_eq!(
            text(&ints, "{1,2"),
            json!("{1,2"),
            "malformed arrays keep their text"
        );
        let boxes = Encoding::Array {
            element: Box::new(Encoding::Text),
            delimiter: ';',
        };
        assert_eq!(
            text(&boxes, "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
    }

    #[test]
    fn domains_and_arrays_resolve_through_the_catalog() {
        let entry = |domain_of, array_of, delimiter| CatalogType {
            domain_of,
            array_of,
            delimiter,
        };
        let catalog = HashMap::from([
            (90_001, entry(Some(23), None, ',')),     // domain over integer
            (90_002, entry(Some(90_001), None, ',')), // domain over that domain
            (90_003, entry(None, Some(90_002), ',')), // array of the inner domain
            (90_004, entry(Some(90_003), None, ',')), // domain over that array
            (1020, entry(None, Some(603), ';')),      // box[]
            (603, entry(None, None, ';')),
        ]);
        assert_eq!(resolve(90_002, &catalog), Encoding::Integer);
        assert_eq!(resolve(90_004, &catalog), array_of(Encoding::Integer));
        assert_eq!(
            resolve(1020, &catalog),
            Encoding::Array {
                element: Box::new(Encoding::Text),
                delimiter: ';'
            }
        );
        assert_eq!(resolve(3802, &catalog), Encoding::Jsonb, "not in catalog");
        let looping = HashMap::from([(1, entry(Some(1), None, ','))]);
        assert_eq!(resolve(1, &looping), Encoding::Text);
    }
}
