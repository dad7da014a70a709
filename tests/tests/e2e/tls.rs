//! TLS to PostgreSQL: a server that accepts only TLS, verified against its CA.

use std::time::Duration;

use changewire_producer::postgres::tls::{TlsMode, TlsSettings};
use changewire_tests::servers::PrivatePostgres;
use changewire_tests::{unique_name, Stack};

use crate::pipeline::{config, read_row_ids, RunningSource};

/// A plain client for set-up: the server only accepts TLS, so tests verify with the CA.
async fn tls_client(url: &str, ca: &std::path::Path) -> anyhow::Result<tokio_postgres::Client> {
    let settings = TlsSettings {
        mode: TlsMode::VerifyFull,
        ca_file: Some(ca.to_owned()),
        ..Default::default()
    };
    let connector = settings.connector()?.expect("TLS is on");
    let mut config: tokio_postgres::Config = url.parse()?;
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(connector).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_verified_tls_and_refuses_an_unknown_ca() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let postgres = PrivatePostgres::start_with_tls()?;
    let ca = postgres.ca_file.clone().expect("TLS server");
    // Without TLS the server refuses the connection (pg_hba has hostssl only).
    assert!(changewire_tests::connect(&postgres.url("postgres"))
        .await
        .is_err());
    tls_client(&postgres.url("postgres"), &ca)
        .await?
        .batch_execute("CREATE DATABASE app")
        .await?;
    let url = postgres.url("app");
    let client = tls_client(&url, &ca).await?;
    client
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, n int)")
        .await?;

    let mut settings = config(&url, "tls");
    settings.tls = TlsSettings {
        mode: TlsMode::VerifyFull,
        ca_file: Some(ca.clone()),
        ..Default::default()
    };
    let prefix = unique_name("tls");
    let mut source = RunningSource::start(&stack.kafka_brokers, settings, &prefix)?;
    client
        .batch_execute("INSERT INTO t (id) SELECT generate_series(1, 100)")
        .await?;
    let seen = read_row_ids(
        &mut source,
        &stack,
        &format!("{prefix}.tls.public.t"),
        100,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(seen.len(), 100);
    // Both the walsender and the catalog session of the source use TLS.
    let sessions = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'changewire'",
            &[],
        )
        .await?;
    let (encrypted, plain): (i64, i64) = (sessions.get(0), sessions.get(1));
    assert_eq!(plain, 0);
    assert!(
        encrypted >= 2,
        "expected the catalog and replication sessions over TLS, got {encrypted}"
    );
    source.stop().await?;

    // A CA that did not sign the server's certificate is refused.
    let stranger = PrivatePostgres::start_with_tls()?;
    let mut settings = config(&url, "tls2");
    settings.tls = TlsSettings {
        mode: TlsMode::VerifyFull,
        ca_file: stranger.ca_file.clone(),
        ..Default::default()
    };
    let source = RunningSource::start(&stack.kafka_brokers, settings, &unique_name("tls"))?;
    let error = tokio::time::timeout(Duration::from_secs(30), source.stop())
        .await?
        .expect_err("unknown CA");
    let message = format!("{error:#}").to_lowercase();
    assert!(
        message.contains("certificate") || message.contains("tls"),
        "{message}"
    );
    Ok(())
}
