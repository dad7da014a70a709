//! The pgoutput decoder against bytes a real PostgreSQL produced. The bytes come from
//! `pg_logical_slot_peek_binary_changes`, used here only as a test oracle: the
//! producer itself streams over the replication protocol.

use changewire_producer::postgres::pgoutput::{Decoder, Message, OldTuple, Value};
use changewire_tests::{Stack, TestDatabase};

/// Every pgoutput message in `slot`, decoded, with the given protocol version and options.
async fn peek(
    client: &tokio_postgres::Client,
    slot: &str,
    version: &str,
    options: &[&str],
) -> anyhow::Result<Vec<Message>> {
    let mut args = vec!["proto_version", version, "publication_names", "pub"];
    args.extend_from_slice(options);
    let placeholders: Vec<String> = (0..args.len()).map(|i| format!("${}", i + 2)).collect();
    let sql = format!(
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, {})",
        placeholders.join(", ")
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&slot];
    params.extend(
        args.iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    let mut decoder = Decoder::new();
    client
        .query(&sql, &params)
        .await?
        .iter()
        .map(|row| Ok(decoder.decode(row.get::<_, &[u8]>(0))?))
        .collect()
}

async fn database_with_slot() -> anyhow::Result<(TestDatabase, tokio_postgres::Client, String)> {
    let db = TestDatabase::create(&Stack::from_env()).await?;
    let client = db.connect().await?;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, note text, big text);
             ALTER TABLE t ALTER big SET STORAGE EXTERNAL;
             CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await?;
    let slot = changewire_tests::create_pgoutput_slot(&client).await?;
    Ok((db, client, slot))
}

#[tokio::test]
async fn protocol_v1_inserts_updates_deletes_truncate_and_toast() -> anyhow::Result<()> {
    let (_db, client, slot) = database_with_slot().await?;
    client
        .batch_execute(
            "INSERT INTO t VALUES (1, 'one', repeat('x', 10000)), (2, NULL, 'small');
             UPDATE t SET note = 'uno' WHERE id = 1;
             UPDATE t SET id = 3 WHERE id = 2;
             DELETE FROM t WHERE id = 3;
             TRUNCATE t;",
        )
        .await?;
    let messages = peek(&client, &slot, "1", &[]).await?;
    let changes: Vec<&Message> = messages
        .iter()
        .filter(|m| {
            !matches!(
                m,
                Message::Begin { .. } | Message::Commit { .. } | Message::Relation(_)
            )
        })
        .collect();
    let text = |s: &str| Value::Text(s.to_owned());
    let Message::Insert { new, .. } = changes[0] else {
        panic!("{:?}", changes[0])
    };
    assert_eq!(new[0], text("1"));
    assert_eq!(new[2], text(&"x".repeat(10_000)));
    let Message::Insert { new, .. } = changes[1] else {
        panic!("{:?}", changes[1])
    };
    assert_eq!(new[1], Value::Null);
    // The TOASTed column did not change: pgoutput marks it instead of resending it.
    let Message::Update { old: None, new, .. } = changes[2] else {
        panic!("{:?}", changes[2])
    };
    assert_eq!((&new[1], &new[2]), (&text("uno"), &Value::UnchangedToast));
    // A key change sends the old key.
    let Message::Update {
        old: Some(OldTuple::Key(old)),
        new,
        ..
    } = changes[3]
    else {
        panic!("{:?}", changes[3])
    };
    assert_eq!((&old[0], &new[0]), (&text("2"), &text("3")));
    let Message::Delete {
        old: OldTuple::Key(old),
        ..
    } = changes[4]
    else {
        panic!("{:?}", changes[4])
    };
    assert_eq!(old[0], text("3"));
    assert!(matches!(changes[5], Message::Truncate { relations, .. } if relations.len() == 1));
    assert_eq!(changes.len(), 6);

    let begins = messages
        .iter()
        .filter(|m| matches!(m, Message::Begin { .. }))
        .count();
    let commits: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Commit(c) => Some((c.commit_lsn, c.end_lsn)),
            _ => None,
        })
        .collect();
    // A simple-query batch runs as one transaction.
    assert_eq!((begins, commits.len()), (1, 1));
    assert!(commits.iter().all(|(commit, end)| commit < end));
    Ok(())
}

#[tokio::test]
async fn protocol_v2_streams_a_large_in_progress_transaction() -> anyhow::Result<()> {
    let (_db, client, slot) = database_with_slot().await?;
    client
        .batch_execute("ALTER TABLE t REPLICA IDENTITY FULL; INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 5000) g")
        .await?;
    // Exceeding logical_decoding_work_mem makes the server stream the transaction.
    client
        .batch_execute("SET logical_decoding_work_mem = '64kB'")
        .await?;
    let messages = peek(&client, &slot, "2", &["streaming", "on"]).await?;

    let starts = messages
        .iter()
        .filter(|m| matches!(m, Message::StreamStart { .. }))
        .count();
    let inserts = messages
        .iter()
        .filter(|m| matches!(m, Message::Insert { .. }))
        .count();
    assert!(
        starts >= 2,
        "expected several streamed blocks, got {starts}"
    );
    assert_eq!(inserts, 5000);
    assert!(
        matches!(messages.last(), Some(Message::StreamCommit { .. })),
        "{:?}",
        messages.last()
    );
    assert!(!messages.iter().any(|m| matches!(m, Message::Begin { .. })));
    Ok(())
}
