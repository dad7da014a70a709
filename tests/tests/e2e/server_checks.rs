//! Servers the producer cannot use give clear, permanent errors.

use std::time::Duration;

use changewire_tests::servers::PrivatePostgres;
use changewire_tests::{connect, unique_name, Stack};

use crate::pipeline::{config, RunningSource};

async fn failure_of(stack: &Stack, url: &str, slot: Option<&str>) -> anyhow::Result<String> {
    let mut settings = config(url, "checks");
    if let Some(slot) = slot {
        settings.slot = Some(slot.to_owned());
    }
    let source = RunningSource::start(&stack.kafka_brokers, settings, &unique_name("checks"))?;
    // A permanent error ends the source by itself; stop() then returns it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !source.is_finished() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the source kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = source.stop().await.expect_err("the source must fail");
    Ok(format!("{error:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_instructions() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let postgres = PrivatePostgres::start_configured("wal_level = replica")?;
    let message = failure_of(&stack, &postgres.url("postgres"), None).await?;
    assert!(message.contains("wal_level is \"replica\""), "{message}");
    assert!(
        message.contains("wal_level = logical"),
        "says what to set: {message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_refused_with_instructions() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let postgres = PrivatePostgres::start_configured(
        "max_slot_wal_keep_size = 1MB\nmin_wal_size = 32MB\nmax_wal_size = 64MB",
    )?;
    let url = postgres.url("postgres");
    let client = connect(&url).await?;
    let slot = changewire_tests::create_pgoutput_slot(&client).await?;
    // Write WAL past the slot's allowance and checkpoint until the server gives up on it.
    let mut status = String::new();
    for round in 0..10 {
        client
            .batch_execute(&format!(
                "CREATE TABLE filler{round} AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
                 SELECT pg_switch_wal(); CHECKPOINT;"
            ))
            .await?;
        status = client
            .query_one(
                "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        if status == "lost" {
            break;
        }
    }
    anyhow::ensure!(
        status == "lost",
        "could not invalidate the slot (wal_status {status:?})"
    );
    let message = failure_of(&stack, &url, Some(&slot)).await?;
    assert!(
        message.contains(&slot) && message.contains("invalidated"),
        "{message}"
    );
    assert!(
        message.contains("drop the slot"),
        "says what to do: {message}"
    );
    Ok(())
}
