//! PostgreSQL and broker restarts in the middle of a write load lose nothing. Each
//! test restarts a server of its own, so parallel tests are not disturbed.

use std::time::Duration;

use changewire_tests::servers::{PrivateBroker, PrivatePostgres};
use changewire_tests::{connect, unique_name, Stack, TestDatabase};

use crate::pipeline::{config, read_row_ids, write_rows, RunningSource};

const ROWS: i64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_load_loses_nothing() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let postgres = PrivatePostgres::start()?;
    connect(&postgres.url("postgres"))
        .await?
        .batch_execute("CREATE DATABASE app")
        .await?;
    let url = postgres.url("app");
    connect(&url)
        .await?
        .batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY, n int)")
        .await?;
    let prefix = unique_name("pgrestart");
    let mut source = RunningSource::start(&stack.kafka_brokers, config(&url, "app"), &prefix)?;

    let restart = async {
        tokio::task::block_in_place(|| postgres.restart())?;
        anyhow::Ok(())
    };
    write_rows(&url, "ledger", ROWS, 100, restart).await?;

    let seen = read_row_ids(
        &mut source,
        &stack,
        &format!("{prefix}.app.public.ledger"),
        ROWS,
        Duration::from_secs(90),
    )
    .await?;
    let stored: i64 = connect(&url)
        .await?
        .query_one("SELECT count(*) FROM ledger", &[])
        .await?
        .get(0);
    let missing: Vec<i64> = (1..=ROWS).filter(|r| !seen.contains(r)).collect();
    assert_eq!(stored, ROWS, "the writer did not commit every row");
    assert!(
        missing.is_empty(),
        "{} rows missing after a PostgreSQL restart: {:?}..{:?}",
        missing.len(),
        missing.first(),
        missing.last()
    );
    source.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_load_loses_nothing() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let mut broker = PrivateBroker::start()?;
    let brokers = broker.brokers();
    let db = TestDatabase::create(&stack).await?;
    db.connect()
        .await?
        .batch_execute("CREATE TABLE ledger (id bigint PRIMARY KEY, n int)")
        .await?;
    let prefix = unique_name("brokerrestart");
    let mut source = RunningSource::start(&brokers, config(&db.url, "app"), &prefix)?;

    let outage = async {
        broker.stop()?;
        // Writes keep coming while the broker is down; the source must hold them.
        tokio::time::sleep(Duration::from_secs(3)).await;
        broker.resume()
    };
    write_rows(&db.url, "ledger", ROWS, 100, outage).await?;

    let private = Stack {
        kafka_brokers: brokers,
        ..stack
    };
    let seen = read_row_ids(
        &mut source,
        &private,
        &format!("{prefix}.app.public.ledger"),
        ROWS,
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(
        seen.len() as i64,
        ROWS,
        "rows missing after a broker restart"
    );
    source.stop().await?;
    Ok(())
}
