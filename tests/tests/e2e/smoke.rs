//! The harness itself: events survive a trip through the real broker, and the stack's
//! PostgreSQL supports logical replication.

use std::time::Duration;

use changewire_kafka::{PublishMetrics, Publisher, Record};
use changewire_schemas::{Codec, FormatConfig, ValueFormat};
use changewire_tests::{connect, create_topics, unique_name, Stack, TestConsumer, TestDatabase};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use changewire_schemas::fixtures;

#[tokio::test]
async fn change_events_round_trip_through_the_publisher_in_json_and_avro() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let topic = unique_name("smoke");
    create_topics(&stack, &[&topic], 3).await?;
    let metrics = PublishMetrics {
        delivery_seconds: Some(Histogram::new(exponential_buckets(0.001, 2.0, 8))),
        ..PublishMetrics::default()
    };
    let publisher = Publisher::new(&stack.kafka_config())?;
    let mut lane = publisher.lane::<usize>(metrics.clone());
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
            let key = format!("{}/{:?}", event.id, codec.format()).into_bytes();
            let value = codec.encode(event)?;
            let format = format!("{:?}", codec.format()).into_bytes();
            let record = Record {
                headers: &[("cw-format", Some(&format))],
                ..Record::keyed(&topic, Some(&key), Some(&value))
            };
            lane.publish(&record).await?;
            let headers = vec![("cw-format".to_owned(), Some(format))];
            sent.push((key, value, headers));
            lane.mark(sent.len());
        }
    }
    // Marks come back in order, each once every record before it is acknowledged.
    let mut confirmed = Vec::new();
    while let Some(mark) = lane.next_confirmed().await {
        confirmed.push(mark?);
    }
    assert_eq!(confirmed, (1..=sent.len()).collect::<Vec<_>>());
    assert_eq!(lane.in_flight(), 0);
    assert_eq!(metrics.in_flight.get(), 0);
    let mut text = String::new();
    let mut registry = Registry::default();
    registry.register("delivery", "", metrics.delivery_seconds.clone().unwrap());
    encode(&mut text, &registry)?;
    // Sampled: the lane's first record is always measured.
    assert!(text.contains("delivery_count 1\n"), "{text}");

    let consumer = TestConsumer::from_beginning(&stack, &topic)?;
    let mut received = consumer
        .read_exactly(sent.len(), Duration::from_secs(30))
        .await?;
    received.sort_by_key(|r| {
        sent.iter()
            .position(|(key, ..)| r.key.as_ref() == Some(key))
    });
    let reader = Codec::json()?;
    for (record, ((key, value, headers), expected)) in
        received.iter().zip(sent.iter().zip(events.iter().cycle()))
    {
        assert_eq!(record.key.as_ref(), Some(key));
        assert_eq!(&record.headers, headers);
        assert_eq!(
            record.value.as_ref(),
            Some(value),
            "bytes changed in transit"
        );
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

/// A lane with receipts says where each record landed, in publish order; a record
/// the client refuses fails alone and the lane goes on.
#[tokio::test]
async fn receipts_say_where_each_record_landed() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let topic = unique_name("receipts");
    create_topics(&stack, &[&topic], 1).await?;
    let mut kafka = stack.kafka_config();
    kafka
        .properties
        .insert("message.max.bytes".into(), "100000".into());
    let publisher = Publisher::new(&kafka)?;
    let mut lane = publisher
        .lane::<()>(PublishMetrics::default())
        .with_receipts();
    for value in [&b"one"[..], b"two"] {
        lane.publish(&Record::keyed(&topic, None, Some(value)))
            .await?;
    }
    let too_large = vec![b'x'; 200_000];
    let refused = lane
        .publish(&Record::keyed(&topic, None, Some(&too_large)))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    lane.publish(&Record::keyed(&topic, None, Some(b"three")))
        .await?;
    let landed: Vec<(i32, i64)> = lane
        .receipts()
        .await
        .into_iter()
        .map(|r| r.map(|l| (l.partition, l.offset)))
        .collect::<Result<_, _>>()?;
    assert_eq!(landed, [(0, 0), (0, 1), (0, 2)]);
    assert!(
        lane.receipts().await.is_empty(),
        "receipts are handed out once"
    );
    Ok(())
}
