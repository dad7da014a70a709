use proptest::prelude::*;

use super::pgoutput::*;

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn text(out: &mut Vec<u8>, s: &str) {
    out.push(b't');
    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn relation_message(xid: Option<u32>) -> Vec<u8> {
    let mut m = vec![b'R'];
    if let Some(xid) = xid {
        m.extend_from_slice(&xid.to_be_bytes());
    }
    m.extend_from_slice(&16_384u32.to_be_bytes());
    string(&mut m, "public");
    string(&mut m, "orders");
    m.push(b'd');
    m.extend_from_slice(&2u16.to_be_bytes());
    m.push(1);
    string(&mut m, "id");
    m.extend_from_slice(&20u32.to_be_bytes());
    m.extend_from_slice(&(-1i32).to_be_bytes());
    m.push(0);
    string(&mut m, "note");
    m.extend_from_slice(&25u32.to_be_bytes());
    m.extend_from_slice(&(-1i32).to_be_bytes());
    m
}

fn update_message() -> Vec<u8> {
    let mut m = vec![b'U'];
    m.extend_from_slice(&16_384u32.to_be_bytes());
    m.push(b'K');
    m.extend_from_slice(&2u16.to_be_bytes());
    text(&mut m, "7");
    m.push(b'n');
    m.push(b'N');
    m.extend_from_slice(&2u16.to_be_bytes());
    text(&mut m, "7");
    m.push(b'u');
    m
}

#[test]
fn relation_and_update_with_key_and_unchanged_toast() {
    let mut decoder = Decoder::new();
    let Message::Relation(relation) = decoder.decode(&relation_message(None)).expect("relation")
    else {
        panic!("not a relation");
    };
    assert_eq!(
        (relation.namespace.as_str(), relation.name.as_str()),
        ("public", "orders")
    );
    assert!(relation.columns[0].is_key && !relation.columns[1].is_key);
    assert_eq!(relation.columns[1].type_oid, 25);

    let update = decoder.decode(&update_message()).expect("update");
    assert_eq!(
        update,
        Message::Update {
            relation: 16_384,
            old: Some(OldTuple::Key(vec![Value::Text("7".into()), Value::Null])),
            new: vec![Value::Text("7".into()), Value::UnchangedToast],
        }
    );
}

#[test]
fn changes_inside_a_stream_block_carry_the_xid() {
    let mut decoder = Decoder::new();
    let mut start = vec![b'S'];
    start.extend_from_slice(&900u32.to_be_bytes());
    start.push(1);
    assert_eq!(
        decoder.decode(&start),
        Ok(Message::StreamStart {
            xid: 900,
            first_segment: true
        })
    );
    assert_eq!(decoder.streaming_xid(), Some(900));
    assert!(matches!(
        decoder.decode(&relation_message(Some(900))),
        Ok(Message::Relation(_))
    ));
    assert_eq!(decoder.decode(b"E"), Ok(Message::StreamStop));
    assert_eq!(decoder.streaming_xid(), None);
    // Outside the block the same message without xid decodes again.
    assert!(matches!(
        decoder.decode(&relation_message(None)),
        Ok(Message::Relation(_))
    ));
}

#[test]
fn begin_converts_the_postgres_epoch() {
    let mut m = vec![b'B'];
    m.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
    m.extend_from_slice(&0i64.to_be_bytes()); // 2000-01-01T00:00:00Z
    m.extend_from_slice(&42u32.to_be_bytes());
    let begin = Decoder::new().decode(&m).expect("begin");
    assert_eq!(
        begin,
        Message::Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_ms: 946_684_800_000,
            xid: 42
        }
    );
    assert_eq!(Lsn(0x1_0000_0010).to_string(), "1/10");
}

#[test]
fn malformed_messages_are_typed_errors() {
    let mut decoder = Decoder::new();
    assert_eq!(decoder.decode(b""), Err(DecodeError::Empty));
    assert_eq!(decoder.decode(b"Z"), Err(DecodeError::UnknownTag('Z')));
    assert_eq!(
        decoder.decode(b"B\0\0"),
        Err(DecodeError::Truncated { tag: 'B' })
    );
    let mut update = update_message();
    update.push(0);
    assert!(matches!(
        decoder.decode(&update),
        Err(DecodeError::Malformed { tag: 'U', .. })
    ));
    let mut truncate = vec![b'T'];
    truncate.extend_from_slice(&u32::MAX.to_be_bytes());
    truncate.push(0);
    assert_eq!(
        decoder.decode(&truncate),
        Err(DecodeError::Truncated { tag: 'T' })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_payloads_never_panic(tag in prop::sample::select(b"BCORYIUDTMSEcAZ".to_vec()),
                                   body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut payload = vec![tag];
        payload.extend_from_slice(&body);
        let _ = Decoder::new().decode(&payload);
    }

    #[test]
    fn truncating_a_valid_message_is_an_error(cut in 1usize..40) {
        let message = update_message();
        let cut = cut.min(message.len() - 1);
        prop_assert!(Decoder::new().decode(&message[..cut]).is_err());
    }
}
