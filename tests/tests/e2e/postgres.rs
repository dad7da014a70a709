//! The PostgreSQL source end to end: real database, real broker.

use std::time::Duration;

use changewire_producer::postgres::setup::inspect_slot;
use changewire_producer::postgres::PostgresError;
use changewire_schemas::{ChangeEvent, Op, Origin, SnapshotMarker};
use changewire_tests::servers::PrivateBroker;
use changewire_tests::{unique_name, Stack};
use serde_json::json;
use tokio::time::Instant;

use crate::pipeline::{config, database_with, decode, RunningSource};

#[tokio::test]
async fn snapshot_then_stream_with_types_transactions_and_toast() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TYPE mood AS ENUM ('ok', 'great');
             CREATE TABLE items (
               id bigint PRIMARY KEY, note text, amount numeric(20,4), ratio float8, flag bool,
               tags text[], grid int[], doc jsonb, at timestamptz, day date, span interval,
               uid uuid, raw bytea, feeling mood, big text);
             ALTER TABLE items ALTER big SET STORAGE EXTERNAL;
             INSERT INTO items (id, note) VALUES (1, 'one'), (2, 'two'), (10, 'ten');",
    )
    .await?;
    let prefix = unique_name("pg");
    let mut source = RunningSource::start(&stack.kafka_brokers, config(&db.url, "shop"), &prefix)?;
    let topic = format!("{prefix}.shop.public.items");
    let consumer = source.consumer(&stack, &topic).await?;

    let snapshot = decode(&consumer.read_exactly(3, Duration::from_secs(30)).await?)?;
    assert!(snapshot.iter().all(|e| e.op == Op::Read));
    let markers: Vec<_> = snapshot.iter().map(|e| e.source.snapshot).collect();
    assert_eq!(
        markers,
        [
            SnapshotMarker::True,
            SnapshotMarker::True,
            SnapshotMarker::Last
        ]
    );
    let ids: Vec<_> = snapshot
        .iter()
        .map(|e| e.after.as_ref().map(|a| a["id"].clone()))
        .collect();
    assert_eq!(
        ids,
        [Some(json!(1)), Some(json!(2)), Some(json!(10))],
        "keyset pages in key order"
    );

    client
        .batch_execute(
            "BEGIN;
             INSERT INTO items VALUES (20, 'twenty', 12345678901234.5678, 0.5, true, '{a,\"b c\",NULL}',
               '{{1,2},{3,4}}', '{\"k\": [1, null]}', '2026-11-21 10:00:00+02', '2026-11-21', '1 day 2 hours',
               '6f1c2d3e-0000-4000-8000-000000000001', '\\xdeadbeef', 'great', repeat('z', 9000));
             UPDATE items SET note = 'uno' WHERE id = 1;
             COMMIT;
             UPDATE items SET note = 'veinte' WHERE id = 20;
             DELETE FROM items WHERE id = 2;",
        )
        .await?;
    let records = consumer.read_exactly(4, Duration::from_secs(30)).await?;
    let events = decode(&records)?;
    let [insert, update, toast_update, delete] = &events[..] else {
        unreachable!()
    };

    assert_eq!(insert.op, Op::Create);
    let after = insert.after.as_ref().expect("after");
    assert_eq!(
        after["amount"],
        json!("12345678901234.5678"),
        "numeric stays exact"
    );
    assert_eq!(after["ratio"], json!(0.5));
    assert_eq!(after["flag"], json!(true));
    assert_eq!(after["tags"], json!(["a", "b c", null]));
    assert_eq!(after["grid"], json!([[1, 2], [3, 4]]));
    assert_eq!(after["doc"], json!({"k": [1, null]}));
    assert_eq!(after["at"], json!("2026-11-21 08:00:00+00"), "UTC, ISO");
    assert_eq!(after["day"], json!("2026-11-21"));
    assert_eq!(after["span"], json!("P1DT2H"));
    assert_eq!(after["uid"], json!("6f1c2d3e-0000-4000-8000-000000000001"));
    assert_eq!(after["raw"], json!("deadbeef"));
    assert_eq!(after["feeling"], json!("great"), "enums as text");
    assert_eq!(after["big"].as_str().map(str::len), Some(9000));

    // Both changes of the first transaction share its commit LSN and are numbered.
    let (Some(t1), Some(t2)) = (&insert.transaction, &update.transaction) else {
        panic!("no transaction")
    };
    assert_eq!(t1.id, t2.id);
    assert_eq!((t1.total_order, t2.total_order), (1, 2));
    let commit_part = |e: &ChangeEvent| {
        e.id.as_str()
            .rsplit_once(':')
            .map(|(head, _)| head.to_owned())
    };
    assert_eq!(commit_part(insert), commit_part(update));
    assert!(insert.id.as_str().starts_with("pg:shop:") && insert.id.as_str().ends_with(":1"));
    let Origin::Postgresql(origin) = &insert.source.origin else {
        panic!("not postgres")
    };
    assert_eq!(
        (origin.schema.as_str(), origin.table.as_str()),
        ("public", "items")
    );
    assert!(origin.tx_id.is_some() && origin.lsn > 0);

    // The unchanged TOASTed column is marked, not nulled.
    let toast_after = toast_update.after.as_ref().expect("after");
    assert_eq!(toast_after["big"], json!("__changewire_unchanged_toast"));
    assert_eq!(toast_after["note"], json!("veinte"));

    // Without REPLICA IDENTITY FULL, a delete's before holds the key.
    assert_eq!(delete.op, Op::Delete);
    assert_eq!(
        delete.before.as_ref().map(|b| b["id"].clone()),
        Some(json!(2))
    );
    let key: serde_json::Value =
        serde_json::from_slice(records[3].key.as_deref().unwrap_or_default())?;
    assert_eq!(key, json!({"id": 2}), "the key is the primary key");

    source.stop().await?;
    Ok(())
}

/// Only unpublished tables change: the slot's confirmed position must still move,
/// or the server keeps WAL forever.
#[tokio::test]
async fn slot_advances_when_only_unpublished_tables_change() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE watched (id int PRIMARY KEY); CREATE TABLE noisy (id int PRIMARY KEY)",
    )
    .await?;
    let mut config = config(&db.url, "quiet");
    config.include = vec!["public.watched".into()];
    let slot = config.slot_name();
    let source =
        RunningSource::streaming(&stack.kafka_brokers, config, &unique_name("pg"), &client).await?;

    client
        .batch_execute("INSERT INTO noisy SELECT generate_series(1, 2000)")
        .await?;
    let target: String = changewire_tests::current_wal_lsn(&client).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let passed: bool = changewire_tests::slot_confirmed(&client, &slot, &target).await?;
        if passed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn did not reach {target}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    source.stop().await?;
    Ok(())
}

/// The WAL position of the server, in bytes.
async fn wal_position(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await?
        .get(0))
}

/// The lag gauge counts the server's WAL the slot has not confirmed, not what the
/// walsender sent: with the broker frozen no transaction is acknowledged, and the
/// gauge grows by what is written meanwhile.
#[tokio::test]
async fn replication_lag_counts_the_wal_the_slot_has_not_confirmed() -> anyhow::Result<()> {
    let broker = PrivateBroker::start_in_memory()?;
    let stack = Stack::with_brokers(broker.brokers());
    let (db, client) =
        database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY, note text)").await?;
    let prefix = unique_name("pg");
    let mut source = RunningSource::streaming(
        &stack.kafka_brokers,
        config(&db.url, "lag"),
        &prefix,
        &client,
    )
    .await?;
    // A first change creates the topic (which a frozen broker could not).
    client
        .batch_execute("INSERT INTO t VALUES (0, 'x')")
        .await?;
    let consumer = source
        .consumer(&stack, &format!("{prefix}.lag.public.t"))
        .await?;
    anyhow::ensure!(
        consumer.read(1, Duration::from_secs(30)).await?.len() == 1,
        "the first change never arrived"
    );

    broker.freeze()?;
    let before = wal_position(&client).await?;
    // Many transactions: the slot may confirm past one the walsender is still
    // decoding (its commit comes later), never past one sent and unacknowledged.
    for tx in 0..200 {
        client
            .execute(
                "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series($1, $1 + 99) g",
                &[&(1 + tx * 100)],
            )
            .await?;
    }
    let written = wal_position(&client).await? - before;
    // Other tests' WAL between `before` and the first insert may be confirmed.
    let expected = written * 9 / 10;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lag = 0;
    while lag < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "lag gauge {lag} never reached 90% of the {written} bytes written while frozen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        lag = source.metrics.source("lag").lag_bytes().get();
    }
    broker.thaw()?;
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn slot_in_use_gives_a_clear_transient_error() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let config = config(&db.url, "busy");
    let slot = config.slot_name();
    let source =
        RunningSource::streaming(&stack.kafka_brokers, config, &unique_name("pg"), &client).await?;

    let error = inspect_slot(&client, &slot)
        .await
        .expect_err("slot is active");
    let message = error.to_string();
    assert!(
        matches!(error, PostgresError::SlotInUse { .. }),
        "{message}"
    );
    assert!(
        message.contains(&slot) && message.contains("in use"),
        "{message}"
    );
    assert!(error.is_transient(), "another instance may release it");
    source.stop().await?;

    // After a graceful stop the slot is free again.
    assert!(inspect_slot(&client, &slot).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn redacted_columns_never_reach_kafka_and_changes_stay_visible() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE users (id int PRIMARY KEY, email text, password text, ssn text);
         CREATE TABLE tokens (token text PRIMARY KEY, owner text);",
    )
    .await?;
    let mut config = config(&db.url, "sec");
    config.redact = vec![
        "public.users.password".into(),
        "*.*.ssn".into(),
        "public.tokens.token".into(),
    ];
    config.redaction_key = Some("test-redaction-key-0123".into());
    let prefix = unique_name("pg");
    let mut source =
        RunningSource::streaming(&stack.kafka_brokers, config, &prefix, &client).await?;
    let topic = format!("{prefix}.sec.public.users");
    client
        .batch_execute(
            "INSERT INTO users VALUES (1, 'a@example.com', 'hunter2-secret', '123-45-6789');
             UPDATE users SET email = 'b@example.com' WHERE id = 1;
             UPDATE users SET password = 'correct-horse-battery' WHERE id = 1;",
        )
        .await?;
    let consumer = source.consumer(&stack, &topic).await?;
    let records = consumer.read_exactly(3, Duration::from_secs(30)).await?;
    for record in &records {
        let bytes =
            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned();
        for secret in ["hunter2-secret", "123-45-6789", "correct-horse-battery"] {
            assert!(
                !bytes.contains(secret),
                "secret {secret} reached the topic: {bytes}"
            );
        }
    }
    let events = decode(&records)?;
    let password = |e: &ChangeEvent| e.after.as_ref().map(|a| a["password"].clone());
    assert!(
        password(&events[0]).and_then(|p| p.as_str().map(|s| s.starts_with("hmac-sha256:")))
            == Some(true)
    );
    assert_eq!(
        events[0].after.as_ref().map(|a| a["email"].clone()),
        Some(json!("a@example.com"))
    );
    assert_eq!(
        password(&events[0]),
        password(&events[1]),
        "unchanged secret, same hash"
    );
    assert_ne!(
        password(&events[1]),
        password(&events[2]),
        "a changed secret is visible"
    );

    // A redacted key column is hashed in the message key too.
    client
        .batch_execute("INSERT INTO tokens VALUES ('tok-secret-4711', 'ops')")
        .await?;
    let tokens = source
        .consumer(&stack, &format!("{prefix}.sec.public.tokens"))
        .await?;
    let record = &tokens.read_exactly(1, Duration::from_secs(30)).await?[0];
    let key: serde_json::Value = serde_json::from_slice(record.key.as_deref().unwrap_or_default())?;
    let event = &decode(std::slice::from_ref(record))?[0];
    assert!(
        !String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
            .contains("tok-secret")
    );
    assert!(
        key["token"]
            .as_str()
            .is_some_and(|k| k.starts_with("hmac-sha256:")),
        "key {key}"
    );
    assert_eq!(key["token"], event.after.as_ref().unwrap()["token"]);
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn full_identity_tombstones_and_truncate() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE t (id int PRIMARY KEY, v text); ALTER TABLE t REPLICA IDENTITY FULL",
    )
    .await?;
    let mut config = config(&db.url, "full");
    config.tombstones = true;
    let prefix = unique_name("pg");
    let mut source =
        RunningSource::streaming(&stack.kafka_brokers, config, &prefix, &client).await?;
    client
        .batch_execute(
            "INSERT INTO t VALUES (1, 'a'), (2, 'b');
             UPDATE t SET v = 'c' WHERE id = 1;
             DELETE FROM t WHERE id = 2;
             TRUNCATE t;",
        )
        .await?;
    let consumer = source
        .consumer(&stack, &format!("{prefix}.full.public.t"))
        .await?;
    // 2 inserts, 1 update, 1 delete + its tombstone, 1 truncate.
    let records = consumer.read_exactly(6, Duration::from_secs(30)).await?;
    let tombstone = &records[4];
    assert_eq!(tombstone.value, None, "a tombstone follows the delete");
    assert_eq!(tombstone.key, records[3].key, "with the deleted row's key");
    let events = decode(&[&records[..4], &records[5..]].concat())?;
    assert_eq!(
        events[2].before,
        Some(json!({"id": 1, "v": "a"})),
        "FULL identity: whole old row"
    );
    assert_eq!(events[3].before, Some(json!({"id": 2, "v": "b"})));
    assert_eq!(events[4].op, Op::Truncate);
    assert_eq!(records[5].key, None, "truncate has no key");
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_slot_with_another_plugin_is_refused_with_a_clear_error() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let config = config(&db.url, "wrong");
    let slot = config.slot_name();
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slot],
        )
        .await?;
    let source = RunningSource::start(&stack.kafka_brokers, config, &unique_name("pg"))?;
    let error = source
        .stop()
        .await
        .expect_err("the source must refuse the slot");
    let message = format!("{error:#}");
    assert!(
        message.contains(&slot)
            && message.contains("test_decoding")
            && message.contains("pgoutput"),
        "{message}"
    );
    Ok(())
}

/// With a tiny producer queue every enqueue meets a full queue and has to wait for
/// acknowledgements, commit markers included: no record may be skipped.
#[tokio::test]
async fn a_full_producer_queue_delays_but_never_drops_events() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut kafka = stack.kafka_config();
    kafka
        .properties
        .insert("queue.buffering.max.messages".into(), "5".into());
    let config = config(&db.url, "tiny");
    let slot = config.slot_name();
    let prefix = unique_name("pg");
    let mut source =
        RunningSource::start_with(&kafka, changewire_schemas::Codec::json()?, config, &prefix)?;
    crate::pipeline::wait_for_slot(&client, &slot).await?;
    for first in (1..=2000).step_by(10) {
        client
            .execute(
                "INSERT INTO t SELECT generate_series($1::int, $1::int + 9)",
                &[&first],
            )
            .await?;
    }
    let seen = crate::pipeline::read_row_ids(
        &mut source,
        &stack,
        &format!("{prefix}.tiny.public.t"),
        2000,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(seen.len(), 2000);
    source.stop().await?;
    Ok(())
}

/// Rows written while the snapshot runs: each row shows up exactly once, as a
/// snapshot read or as a streamed create (never both, never neither), and replaying
/// the topic per key gives the table's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_concurrent_writes_meet_without_gap_or_overlap() -> anyhow::Result<()> {
    const BEFORE: i32 = 20_000;
    const DURING: i32 = 5_000;
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
         INSERT INTO t (id) SELECT generate_series(1, 20000);",
    )
    .await?;
    let mut config = config(&db.url, "meet");
    config.snapshot_chunk_rows = 500;
    // Far fewer than the snapshot's rows: the snapshot must wait for acknowledgements.
    config.max_in_flight = 100;
    let prefix = unique_name("pg");
    let mut source = RunningSource::start(&stack.kafka_brokers, config, &prefix)?;
    let writer = db.connect().await?;
    for batch in 0..DURING / 100 {
        let first = BEFORE + 1 + batch * 100;
        writer
            .batch_execute(&format!(
                "INSERT INTO t (id) SELECT generate_series({first}, {last});
                 UPDATE t SET n = n + 1 WHERE id % 50 = {m};",
                last = first + 99,
                m = batch % 50
            ))
            .await?;
    }
    let total: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    let expected: std::collections::HashMap<i64, i64> = client
        .query("SELECT id::bigint, n::bigint FROM t", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let consumer = source
        .consumer(&stack, &format!("{prefix}.meet.public.t"))
        .await?;
    let codec = changewire_schemas::Codec::json()?;
    let mut appearances: std::collections::HashMap<i64, u32> = std::collections::HashMap::new();
    let mut state: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    let mut ops: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    consumer
        .read_until(Duration::from_secs(90), |record| {
            let Some(event) = record.value.as_deref().and_then(|v| codec.decode(v).ok()) else {
                return false;
            };
            let after = event.after.unwrap_or_default();
            let (id, n) = (
                after["id"].as_i64().unwrap_or(-1),
                after["n"].as_i64().unwrap_or(-1),
            );
            if matches!(event.op, Op::Read | Op::Create) {
                *appearances.entry(id).or_default() += 1;
                *ops.entry(event.op.code()).or_default() += 1;
            }
            state.insert(id, n);
            state == expected
        })
        .await?;
    eprintln!("rows by how they arrived: {ops:?}");
    assert_eq!(appearances.len() as i64, total, "every row appears");
    let twice: Vec<_> = appearances
        .iter()
        .filter(|(_, &c)| c != 1)
        .take(5)
        .collect();
    assert!(
        twice.is_empty(),
        "rows seen both in the snapshot and the stream: {twice:?}"
    );
    assert_eq!(
        state, expected,
        "replaying the topic gives the table's final state"
    );
    source.stop().await?;
    Ok(())
}

/// With `format.value = "avro"` the same changes travel as Avro single-object
/// messages that any reader decodes to the same events.
#[tokio::test]
async fn avro_values_carry_the_same_events() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) =
        database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY, doc jsonb)").await?;
    let avro = changewire_schemas::FormatConfig {
        value: changewire_schemas::ValueFormat::Avro,
        schema_registry: None,
    };
    let codec = changewire_schemas::Codec::from_config(&avro).await?;
    let config = config(&db.url, "avro");
    let slot = config.slot_name();
    let prefix = unique_name("pg");
    let mut source = RunningSource::start_with(&stack.kafka_config(), codec, config, &prefix)?;
    crate::pipeline::wait_for_slot(&client, &slot).await?;
    client
        .batch_execute(r#"INSERT INTO t VALUES (1, '{"a": [1, 2]}'); UPDATE t SET doc = '{"a": null}' WHERE id = 1"#)
        .await?;
    let consumer = source
        .consumer(&stack, &format!("{prefix}.avro.public.t"))
        .await?;
    let records = consumer.read_exactly(2, Duration::from_secs(30)).await?;
    for record in &records {
        assert_eq!(
            record.value.as_deref().map(|v| &v[..2]),
            Some(&[0xC3, 0x01][..]),
            "single-object framing"
        );
    }
    let events = decode(&records)?;
    assert_eq!(events[0].op, Op::Create);
    assert_eq!(
        events[0].after,
        Some(json!({"id": 1, "doc": {"a": [1, 2]}}))
    );
    assert_eq!(events[1].after, Some(json!({"id": 1, "doc": {"a": null}})));
    assert!(events[1].transaction.is_some());
    source.stop().await?;
    Ok(())
}
