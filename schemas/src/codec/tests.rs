use apache_avro::{from_avro_datum, to_avro_datum, to_value, GenericSingleObjectReader, Schema};
use proptest::prelude::*;
use serde_json::json;

use super::avro::AvroEvent;
use super::*;
use crate::envelope::*;
use crate::fixtures;

fn postgres_update() -> ChangeEvent {
    fixtures::postgres_update("shop")
}

fn kubernetes_delete() -> ChangeEvent {
    fixtures::kubernetes_delete("prod")
}

fn samples() -> Vec<ChangeEvent> {
    vec![postgres_update(), kubernetes_delete()]
}

fn avro_codec() -> Codec {
    Codec {
        format: ValueFormat::Avro,
        avro: AvroCodec::single_object().expect("schemas parse"),
    }
}

#[test]
fn json_round_trips() {
    let codec = Codec::json().expect("codec");
    for event in samples() {
        let bytes = codec.encode(&event).expect("encode");
        assert_eq!(codec.decode(&bytes).expect("decode"), event);
    }
}

/// Rows held as JSON text encode to the same event as rows held as values, in both
/// formats.
#[test]
fn rows_as_json_text_encode_like_rows_as_values() {
    let as_text = |row: &Option<serde_json::Value>| {
        row.as_ref()
            .map(|row| serde_json::value::to_raw_value(row).expect("a row"))
    };
    for codec in [Codec::json().expect("codec"), avro_codec()] {
        for event in samples() {
            let ChangeEvent {
                id,
                op,
                ts_ms,
                source,
                before,
                after,
                diff,
                actor,
                transaction,
            } = event.clone();
            let raw = ChangeEvent {
                id,
                op,
                ts_ms,
                source,
                before: as_text(&before),
                after: as_text(&after),
                diff,
                actor,
                transaction,
            };
            let bytes = codec.encode(&raw).expect("encode");
            assert_eq!(bytes, codec.encode(&event).expect("encode"));
            assert_eq!(codec.decode(&bytes).expect("decode"), event);
        }
    }
}

/// Numbers an f64 would round keep their digits through both codecs (rows, diffs).
#[test]
fn numbers_keep_their_digits_in_json_and_avro() {
    let digits = [
        "0.14285714285714285714",
        "123456789012345678901234567890",
        "1.000000000000000000001",
        "-0",
        // As PostgreSQL writes exponents (serde_json writes `1e400` back as `1e+400`).
        "1e+400",
    ];
    let document = format!(
        r#"{{"doc": [{}], "n": 9007199254740993}}"#,
        digits.join(", ")
    );
    let mut event = postgres_update();
    event.after = Some(serde_json::from_str(&document).unwrap());
    event.diff = Some(
        serde_json::from_str(&format!(
            r#"[{{"op": "replace", "path": "/doc/0", "value": {}}}]"#,
            digits[0]
        ))
        .unwrap(),
    );
    for codec in [Codec::json().unwrap(), avro_codec()] {
        let decoded = codec.decode(&codec.encode(&event).unwrap()).unwrap();
        let text = serde_json::to_string(&decoded.after).unwrap();
        for number in digits.iter().chain(&["9007199254740993"]) {
            assert!(text.contains(number), "{number} lost in {text}");
        }
        assert!(serde_json::to_string(&decoded.diff)
            .unwrap()
            .contains(digits[0]));
        assert_eq!(decoded, event);
    }
}

#[test]
fn json_uses_debezium_field_names() {
    let value = serde_json::to_value(postgres_update()).expect("serialize");
    assert_eq!(value["source"]["connector"], "postgresql");
    assert_eq!(value["source"]["txId"], 771);
    assert_eq!(value["source"]["lsn"], 0x16B_3748);
    assert_eq!(value["source"]["snapshot"], "false");
    assert_eq!(value["op"], "u");
    assert_eq!(value["transaction"]["total_order"], 2);
    let k8s = serde_json::to_value(kubernetes_delete()).expect("serialize");
    assert_eq!(k8s["source"]["connector"], "kubernetes");
    assert_eq!(k8s["source"]["objectName"], "checkout");
    assert_eq!(k8s["source"]["resourceVersion"], "4711");
    assert_eq!(k8s["actor"]["via"], "audit");
}

#[test]
fn avro_single_object_round_trips_and_is_framed_per_spec() {
    let codec = avro_codec();
    for event in samples() {
        let bytes = codec.encode(&event).expect("encode");
        assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC);
        assert_eq!(codec.decode(&bytes).expect("decode"), event);
        // An independent single-object reader must accept our framing.
        let schema = Schema::parse_str(CURRENT_SCHEMA).expect("schema");
        let reader = GenericSingleObjectReader::new(schema).expect("reader");
        reader
            .read_value(&mut bytes.as_slice())
            .expect("apache-avro reads our single-object bytes");
    }
}

#[test]
fn confluent_framed_bytes_with_an_unknown_id_are_a_typed_error() {
    let mut bytes = vec![CONFLUENT_MAGIC, 0, 0, 0, 42];
    bytes.extend_from_slice(&[2, b'x']);
    let error = avro_codec().decode(&bytes).expect_err("unknown id");
    assert!(
        matches!(error, CodecError::UnknownSchemaId(42)),
        "{error:?}"
    );
    assert!(!error.is_transient());
}

#[test]
fn json_that_is_not_an_event_is_rejected() {
    let codec = Codec::json().expect("codec");
    let error = codec
        .decode(br#"{"hello": "world"}"#)
        .expect_err("not an event");
    assert!(matches!(error, CodecError::Json(_)), "{error:?}");
    let error = codec.decode(b"").expect_err("empty");
    assert!(
        matches!(error, CodecError::UnknownFraming { first_byte: None }),
        "{error:?}"
    );
}

#[test]
fn a_source_block_must_have_its_connector_fields() {
    let codec = Codec::json().expect("codec");
    let mut event: serde_json::Value =
        serde_json::from_slice(&codec.encode(&postgres_update()).expect("encode")).expect("json");
    event["source"]["surplus"] = json!("ignored");
    let bytes = serde_json::to_vec(&event).expect("json");
    assert_eq!(codec.decode(&bytes).expect("decode"), postgres_update());

    event["source"]
        .as_object_mut()
        .expect("object")
        .remove("table");
    let error = codec
        .decode(&serde_json::to_vec(&event).expect("json"))
        .expect_err("no table");
    let reason = crate::diagnostics::report(&error);
    assert!(
        reason.contains("missing field `source.table` in a postgresql source"),
        "{reason}"
    );
    event["source"]["connector"] = json!("mysql");
    let error = codec
        .decode(&serde_json::to_vec(&event).expect("json"))
        .expect_err("unknown connector");
    let reason = crate::diagnostics::report(&error);
    assert!(reason.contains("unknown variant `mysql`"), "{reason}");
}

#[test]
fn lsn_beyond_avro_long_is_an_error_not_a_silent_clamp() {
    let mut event = postgres_update();
    if let Origin::Postgresql(pg) = &mut event.source.origin {
        pg.lsn = u64::MAX;
    }
    let error = avro_codec().encode(&event).expect_err("lsn too large");
    assert!(error.to_string().contains("source.lsn"), "{error}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = avro_codec().decode(&bytes);
    }

    /// Random tails behind each known header reach the Avro and JSON decoders proper.
    #[test]
    fn decoding_random_tails_behind_valid_headers_never_panics(
        header in 0usize..3,
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let codec = avro_codec();
        let mut bytes = match header {
            0 => codec.encode(&postgres_update()).expect("encode")[..10].to_vec(),
            1 => vec![CONFLUENT_MAGIC, 0, 0, 0, 1],
            _ => b"{\"id\":".to_vec(),
        };
        bytes.extend_from_slice(&tail);
        let _ = codec.decode(&bytes);
    }

    /// Flipping bytes of a valid message gives an error or a valid event, never a panic.
    #[test]
    fn corrupted_valid_messages_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let codec = avro_codec();
        let mut bytes = codec.encode(&kubernetes_delete()).expect("encode");
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = codec.decode(&bytes);
    }
}

/// Encodes `event` with `writer` and reads it back with `reader`.
fn read_across(writer: &Schema, reader: &Schema, event: &ChangeEvent) -> Result<(), String> {
    let value = to_value(AvroEvent::try_from(event).map_err(|e| e.to_string())?)
        .and_then(|v| v.resolve(writer))
        .map_err(|e| e.to_string())?;
    let datum = to_avro_datum(writer, value).map_err(|e| e.to_string())?;
    from_avro_datum(writer, &mut datum.as_slice(), Some(reader))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn every_released_schema_reads_current_data_and_the_reverse() {
    let current = Schema::parse_str(CURRENT_SCHEMA).expect("current schema");
    assert!(!RELEASED_SCHEMAS.is_empty());
    for (version, text) in RELEASED_SCHEMAS {
        let released = Schema::parse_str(text).expect("released schema");
        for event in samples() {
            read_across(&current, &released, &event)
                .unwrap_or_else(|e| panic!("{version} reader cannot read current data: {e}"));
            read_across(&released, &current, &event)
                .unwrap_or_else(|e| panic!("current reader cannot read {version} data: {e}"));
        }
    }
}

/// Negative control: the compatibility check above must catch a breaking change.
#[test]
fn compatibility_check_rejects_a_field_added_without_default() {
    let current = Schema::parse_str(CURRENT_SCHEMA).expect("current schema");
    let mut broken: serde_json::Value = serde_json::from_str(CURRENT_SCHEMA).expect("json");
    broken["fields"]
        .as_array_mut()
        .expect("fields")
        .push(json!({"name": "tenant", "type": "string"}));
    let broken = Schema::parse_str(&broken.to_string()).expect("broken schema parses");
    assert!(read_across(&current, &broken, &postgres_update()).is_err());
}
