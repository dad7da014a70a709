//! The producer's `/metrics` and `/health` endpoints over real HTTP.

use std::time::Duration;

use changewire_schemas::http;
use changewire_tests::{unique_name, Stack};
use tokio::time::Instant;

use crate::pipeline::{config, database_with, RunningSource};

const TOKEN: &str = "metrics-token-for-tests";

/// Serves the source's endpoints on a free loopback port; returns the base URL.
async fn serve(source: &RunningSource) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = http::router(source.metrics.clone(), Some(TOKEN.to_owned()));
    tokio::spawn(http::serve(listener, router));
    Ok(base)
}

/// Polls `/health` until it answers 200 in `state` (a loaded machine may spend
/// a while healthy in the snapshot first); returns its body.
async fn healthy_body(
    http: &reqwest::Client,
    base: &str,
    state: &str,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = http.get(format!("{base}/health")).send().await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if status == 200 && body["state"] == state {
            return Ok(body);
        }
        anyhow::ensure!(Instant::now() < deadline, "never healthy: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_events_and_health_follows_the_source() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, client) = database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let source = RunningSource::streaming(
        &stack.kafka_brokers,
        config(&db.url, "ops"),
        &unique_name("pg"),
        &client,
    )
    .await?;
    let base = serve(&source).await?;
    let http = reqwest::Client::new();

    // The slot turns active a moment before the source records that it streams.
    let body = healthy_body(&http, &base, "streaming").await?;
    assert_eq!(body["last_error"], serde_json::Value::Null);

    let unauthorized = http.get(format!("{base}/metrics")).send().await?;
    assert_eq!(unauthorized.status(), 401, "metrics need the bearer token");
    let wrong = http
        .get(format!("{base}/metrics"))
        .bearer_auth("nope")
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);

    client
        .batch_execute("INSERT INTO t SELECT generate_series(1, 5); DELETE FROM t WHERE id = 1")
        .await?;
    let expected = [
        r#"changewire_producer_events_total{source="ops",table="public.t",op="c"} 5"#,
        r#"changewire_producer_events_total{source="ops",table="public.t",op="d"} 1"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = http
            .get(format!("{base}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .text()
            .await?;
        if expected.iter().all(|line| text.contains(line))
            && text.contains("changewire_producer_in_flight_events 0")
        {
            break text;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "metrics never showed the events:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Delivery time is sampled (one record in 64, the first of each lane included).
    let sampled: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("changewire_producer_kafka_delivery_seconds_count "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0);
    assert!((1..=6).contains(&sampled), "{text}");
    assert!(
        text.contains("changewire_producer_replication_lag_bytes{source=\"ops\"}"),
        "{text}"
    );
    let confirmed: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("changewire_producer_confirmed_lsn{source=\"ops\"} "))
        .and_then(|lsn| lsn.trim().parse().ok())
        .unwrap_or(0);
    assert!(confirmed > 0, "an LSN was confirmed:\n{text}");
    let version = format!(
        "changewire_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&version), "{text}");
    let sample = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    assert!(
        sample("process_resident_memory_bytes").is_some_and(|b| b > 1e6),
        "{text}"
    );
    assert!(
        sample("process_open_fds").is_some_and(|n| n >= 3.0),
        "{text}"
    );
    assert!(
        sample("process_cpu_seconds_total").is_some_and(|s| s > 0.0),
        "{text}"
    );
    assert!(
        text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1,
        "one end marker"
    );

    let metrics = source.metrics.clone();
    source.stop().await?;
    let router = http::router(metrics, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let after = format!("http://{}/health", listener.local_addr()?);
    tokio::spawn(http::serve(listener, router));
    let health = http.get(after).send().await?;
    assert_eq!(health.status(), 503, "a stopped source is not healthy");
    Ok(())
}

/// The snapshot reports each table's progress: rows read against the planner's
/// estimate, as metrics labelled by table (and in the log, per page).
#[tokio::test]
async fn snapshot_progress_is_reported_per_table() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (db, _client) = database_with(
        &stack,
        "CREATE TABLE big (id int PRIMARY KEY); INSERT INTO big SELECT generate_series(1, 3000); ANALYZE big;
         CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small VALUES (1), (2);",
    )
    .await?;
    let mut config = config(&db.url, "progress");
    config.snapshot_chunk_rows = 500;
    let source = RunningSource::start(&stack.kafka_brokers, config, &unique_name("pg"))?;
    let expected = [
        r#"changewire_producer_snapshot_rows_total{source="progress",table="public.big"} 3000"#,
        r#"changewire_producer_snapshot_rows_estimated{source="progress",table="public.big"} 3000"#,
        r#"changewire_producer_snapshot_rows_total{source="progress",table="public.small"} 2"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = http::Observable::encode_metrics(source.metrics.as_ref());
        if expected.iter().all(|line| text.contains(line)) {
            // Never analyzed: no estimate, so no percentage either.
            assert!(
                text.contains(
                    r#"changewire_producer_snapshot_rows_estimated{source="progress",table="public.small"} 0"#
                ),
                "{text}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no snapshot progress:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    source.stop().await?;
    Ok(())
}
