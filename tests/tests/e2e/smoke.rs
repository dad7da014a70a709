//! The harness itself: events survive a trip through the real broker, and the stack's
//! PostgreSQL supports logical replication.

use std::time::Duration;

use changewire_producer::sink::{EventSink, KafkaSink, OutboundRecord};
use changewire_schemas::{Codec, FormatConfig, ValueFormat};
use changewire_tests::{connect, create_topics, unique_name, Stack, TestConsumer, TestDatabase};

use crate::fixtures;

#[tokio::test]
async fn change_events_round_trip_through_the_broker_in_json_and_avro() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let topic = unique_name("smoke");
    create_topics(&stack, &[&topic], 1).await?;
    let sink = KafkaSink::new(&stack.kafka_config())?;
    let avro_config = FormatConfig {
        value: ValueFormat::Avro,
        schema_registry: None,
    };
    let codecs = [Codec::json()?, Codec::from_config(&avro_config).await?];
    let events = [
        fixtures::postgres_update("smoke"),
        fixtures::kubernetes_create("smoke"),
    ];

    let mut sent = Vec::new();
    for codec in &codecs {
        for event in &events {
            let record = OutboundRecord {
                topic: topic.clone(),
                key: Some(event.id.as_str().as_bytes().to_vec()),
                value: Some(codec.encode(event)?),
                headers: vec![(
                    "cw-format".into(),
                    format!("{:?}", codec.format()).into_bytes(),
                )],
            };
            let delivered = sink.enqueue(&record)?.await?;
            sent.push(record);
            assert!(delivered.offset >= 0);
        }
    }

    let consumer = TestConsumer::from_beginning(&stack, &topic)?;
    let received = consumer
        .read_exactly(sent.len(), Duration::from_secs(30))
        .await?;
    let reader = Codec::json()?;
    for (record, (sent, expected)) in received.iter().zip(sent.iter().zip(events.iter().cycle())) {
        assert_eq!(record.key, sent.key);
        let sent_headers: Vec<_> = sent
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        assert_eq!(record.headers, sent_headers);
        assert_eq!(record.value, sent.value, "bytes changed in transit");
        let value = record.value.as_deref().expect("not a tombstone");
        assert_eq!(&reader.decode(value)?, expected);
    }
    assert_eq!(received[0].value.as_deref().map(|v| v[0]), Some(b'{'));
    assert_eq!(
        received[2].value.as_deref().map(|v| &v[..2]),
        Some(&[0xC3, 0x01][..])
    );
    Ok(())
}

#[tokio::test]
async fn test_databases_support_pgoutput_slots_and_are_dropped() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let db = TestDatabase::create(&stack).await?;
    let client = db.connect().await?;
    let slot = unique_name("slot");
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t")
        .await?;
    // A slot cannot be created in a transaction that wrote, so not in the batch above.
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    assert_eq!(wal_level, "logical");
    drop(client);

    let name = db.name.clone();
    drop(db);
    let admin = connect(&stack.pg_url).await?;
    let left = admin
        .query(
            "SELECT 1 FROM pg_database WHERE datname = $1 UNION ALL \
             SELECT 1 FROM pg_replication_slots WHERE slot_name = $2",
            &[&name, &slot],
        )
        .await?;
    assert!(left.is_empty(), "teardown left the database or slot behind");
    Ok(())
}
