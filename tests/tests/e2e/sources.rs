//! Several sources in one producer: a second database is configuration, not code.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use changewire_schemas::Codec;
use changewire_tests::servers::free_port;
use changewire_tests::{unique_name, workspace_binary, Stack, TestConsumer, TestDatabase};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tokio::time::Instant;

/// Two `[[postgres]]` entries stream their databases side by side, each under its
/// own name, slot and topics; the second's password comes from
/// `CHANGEWIRE_POSTGRES__<NAME>__PASSWORD` (its URL has a wrong one), and metrics
/// and health are kept per source. Topics are created with the `[topics]`
/// settings, compacted where the source promises tombstones.
#[tokio::test]
async fn one_producer_streams_two_databases_configured_as_a_list() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (orders, billing) = (
        TestDatabase::create(&stack).await?,
        TestDatabase::create(&stack).await?,
    );
    // Rows written before the producer starts arrive in each source's snapshot.
    for (db, rows) in [(&orders, 3), (&billing, 5)] {
        let client = db.connect().await?;
        client
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
            .await?;
        client
            .execute("INSERT INTO t SELECT generate_series(1, $1)", &[&rows])
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let (prefix, port) = (unique_name("multi"), free_port()?);
    let wrong_password = billing.url.replacen(":changewire@", ":wrong@", 1);
    anyhow::ensure!(
        wrong_password != billing.url,
        "the test URL carries a password"
    );
    let config = dir.path().join("producer.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
             settings = {{ \"retention.ms\" = \"3600000\" }}\n\
             [[postgres]]\nname = \"orders\"\nurl = {orders:?}\nslot = {slot_a:?}\n\
             tombstones = true\n\
             [[postgres]]\nname = \"billing-eu\"\nurl = {billing:?}\nslot = {slot_b:?}\n",
            state = dir.path().join("state"),
            brokers = stack.kafka_brokers,
            orders = orders.url,
            billing = wrong_password,
            slot_a = unique_name("slot"),
            slot_b = unique_name("slot"),
        ),
    )?;
    let mut producer = Command::new(workspace_binary("changewire-producer")?)
        .arg("--config")
        .arg(&config)
        .env("CHANGEWIRE_POSTGRES__BILLING_EU__PASSWORD", "changewire")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let result = check_both_stream(&stack, &prefix, port).await;
    producer.kill()?;
    producer.wait()?;
    result
}

async fn check_both_stream(stack: &Stack, prefix: &str, port: u16) -> anyhow::Result<()> {
    let codec = Codec::json()?;
    for (name, rows) in [("orders", 3), ("billing-eu", 5)] {
        let topic = format!("{prefix}.{name}.public.t");
        let consumer = TestConsumer::once_created(stack, &topic, Duration::from_secs(60)).await?;
        let records = consumer.read_exactly(rows, Duration::from_secs(60)).await?;
        for record in records {
            let event = codec.decode(record.value.as_deref().unwrap_or_default())?;
            assert_eq!(event.source.name, name, "{topic}");
        }
    }
    let metrics = scrape_until(port, |text| {
        text.contains(
            r#"changewire_producer_events_total{source="orders",table="public.t",op="r"} 3"#,
        ) && text.contains(
            r#"changewire_producer_events_total{source="billing-eu",table="public.t",op="r"} 5"#,
        )
    })
    .await?;
    for source in ["orders", "billing-eu"] {
        let lsn = format!("changewire_producer_confirmed_lsn{{source=\"{source}\"}}");
        assert!(metrics.contains(&lsn), "{lsn} missing:\n{metrics}");
    }
    let health: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await?
        .json()
        .await?;
    assert_eq!(health["state"], "streaming", "{health}");
    let orders = topic_settings(stack, &format!("{prefix}.orders.public.t")).await?;
    assert_eq!(
        orders.get("cleanup.policy").map(String::as_str),
        Some("compact")
    );
    assert_eq!(
        orders.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    let billing = topic_settings(stack, &format!("{prefix}.billing-eu.public.t")).await?;
    assert_eq!(
        billing.get("cleanup.policy"),
        None,
        "no tombstones, no compaction"
    );
    assert_eq!(
        billing.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    Ok(())
}

/// The settings the broker holds for `topic`.
async fn topic_settings(stack: &Stack, topic: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()?;
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await?;
    let resource = described.into_iter().next().context("no answer")??;
    Ok(resource
        .entries
        .into_iter()
        .filter_map(|entry| Some((entry.name, entry.value?)))
        .collect())
}

/// Scrapes `/metrics` until `done` holds (30 s at most).
async fn scrape_until(port: u16, done: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await?
            .text()
            .await?;
        if done(&text) {
            return Ok(text);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "metrics never showed both sources:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
