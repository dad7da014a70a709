//! A transaction of 1,000,000 rows streams through the producer binary in bounded
//! memory: events are published as they are decoded, not held until the commit.

use std::process::{Command, Stdio};
use std::time::Duration;

use changewire_tests::{
    peak_rss_kib, unique_name, workspace_binary, write_producer_config, Stack, TestConsumer,
};
use tokio::time::Instant;

use crate::pipeline::{database_with, wait_for_slot};

const ROWS: usize = 1_000_000;
/// Held as JSON, 1M events would take several hundred MiB.
const RSS_LIMIT_KIB: u64 = 200 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_streams_in_bounded_memory() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(
        &stack,
        "CREATE TABLE big (id bigint PRIMARY KEY, note text)",
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let prefix = unique_name("large");
    let slot = unique_name("slot");
    let config = write_producer_config(
        dir.path(),
        &stack,
        &prefix,
        "large",
        &db.url,
        &slot,
        "max_in_flight = 10000
topic_partitions = 3",
    )?;
    let mut producer = Command::new(workspace_binary("changewire-producer")?)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    wait_for_slot(&client, &slot).await?;

    client
        .execute(
            "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, $1::bigint) g",
            &[&(ROWS as i64)],
        )
        .await?;
    let end: String = changewire_tests::current_wal_lsn(&client).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut peak = 0;
    loop {
        peak = peak.max(peak_rss_kib(&producer.id().to_string()));
        let done: bool = changewire_tests::slot_confirmed(&client, &slot, &end).await?;
        if done {
            break;
        }
        anyhow::ensure!(producer.try_wait()?.is_none(), "the producer exited");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the transaction was not confirmed in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(peak_rss_kib(&producer.id().to_string()));
    producer.kill()?;
    producer.wait()?;
    eprintln!(
        "producer peak RSS while streaming {ROWS} rows in one transaction: {} MiB",
        peak / 1024
    );
    assert!(peak > 0, "could not read the producer's memory");
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {} MiB: the transaction was buffered",
        peak / 1024
    );

    let consumer = TestConsumer::from_beginning(&stack, &format!("{prefix}.large.public.big"))?;
    let mut count = 0;
    let complete = consumer
        .read_until(Duration::from_secs(120), |_| {
            count += 1;
            count == ROWS
        })
        .await?;
    assert!(complete, "{count} of {ROWS} events arrived");
    Ok(())
}
