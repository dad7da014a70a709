//! Two instances of one service in one group, with a rebalance when the second
//! joins and another when it leaves: no event is lost, and none takes effect twice
//! within an instance.

use std::collections::BTreeSet;
use std::time::Duration;

use changewire_consumer::runtime::Store;
use changewire_schemas::http::HttpConfig;
use changewire_schemas::{Codec, EventId, Op};
use changewire_tests::servers::free_port;
use changewire_tests::{create_topics, unique_name, workspace_example, Stack};
use tokio::time::Instant;

use crate::consumer::{
    event, last_offsets, publish, service_config, start_service, terminate, wait_for_committed,
    write_config,
};

const PARTITIONS: i32 = 4;

/// The sum of an instance's metric samples whose line starts with `name` and
/// contains `label`.
pub async fn metric(port: u16, name: &str, label: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Polls an instance's metric until it reaches `at_least`.
pub async fn wait_for_metric(
    port: u16,
    name: &str,
    label: &str,
    at_least: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match metric(port, name, label).await {
            Ok(n) if n >= at_least => return Ok(()),
            _ => anyhow::ensure!(
                Instant::now() < deadline,
                "{name}{{{label}}} of the instance on :{port} stayed below {at_least}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const APPLIED: &str = "changewire_consumer_records_total";
pub const ASSIGNED: &str = "changewire_consumer_partitions_assigned";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_rebalance_without_loss_or_double_effects() -> anyhow::Result<()> {
    const HALF: u64 = 10_000;
    let stack = Stack::from_env();
    let (prefix, topic) = (unique_name("reb"), unique_name("input"));
    create_topics(&stack, &[&topic], PARTITIONS).await?;
    let codec = Codec::json()?;
    let encode = |range: std::ops::Range<u64>| {
        range
            .map(|n| codec.encode(&event(n, Op::Create)))
            .collect::<Result<Vec<_>, _>>()
    };
    publish(&stack, &topic, encode(0..HALF)?).await?;

    let dir = tempfile::tempdir()?;
    let program = workspace_example("count_events")?;
    let group = unique_name("group");
    let instance = |name: &str| -> anyhow::Result<(std::path::PathBuf, u16, std::path::PathBuf)> {
        let state = dir.path().join(format!("state-{name}"));
        let mut config = service_config(&stack, &prefix, &topic, &state);
        config.service.group_id = Some(group.clone());
        let port = free_port()?;
        config.http = Some(HttpConfig {
            listen: ([127, 0, 0, 1], port).into(),
            token: None,
        });
        Ok((write_config(dir.path(), name, &config)?, port, state))
    };
    let (file_a, port_a, state_a) = instance("a")?;
    let (file_b, port_b, state_b) = instance("b")?;
    let a = start_service(&program, &file_a, &dir.path().join("a.log"))?;
    wait_for_metric(port_a, APPLIED, "applied", 1).await?;
    // B joins: the group rebalances while A works.
    let b = start_service(&program, &file_b, &dir.path().join("b.log"))?;
    // Publish the second half once B owns partitions, so both have work after it.
    wait_for_metric(port_b, ASSIGNED, "", 1).await?;
    let landed = publish(&stack, &topic, encode(HALF..2 * HALF)?).await?;
    if let Err(error) = wait_for_metric(port_b, APPLIED, "applied", 1).await {
        for log in ["a.log", "b.log"] {
            let text = std::fs::read_to_string(dir.path().join(log))?;
            for line in text.lines().filter(|l| !l.contains("CONFWARN")) {
                eprintln!("{log}: {line}");
            }
        }
        return Err(error);
    }
    // B leaves: its partitions go back to A.
    assert!(terminate(b)?.success(), "B exits cleanly");
    let mut last = last_offsets(&landed);
    last.sort_unstable();
    wait_for_committed(&stack, &group, &topic, &last).await?;
    assert!(terminate(a)?.success(), "A exits cleanly");

    let mut union = BTreeSet::new();
    let mut per_instance = Vec::new();
    for state in [&state_a, &state_b] {
        let store = Store::open(state)?;
        let mut applied = 0;
        for n in 0..2 * HALF {
            let id = EventId::postgres("src", 0x100 + n, 1);
            match store.get(format!("applied/{id}").as_bytes())?.as_deref() {
                None => {}
                Some(b"1") => {
                    applied += 1;
                    union.insert(n);
                }
                Some(count) => anyhow::bail!(
                    "{id} applied {} times within one instance",
                    String::from_utf8_lossy(count)
                ),
            }
        }
        per_instance.push(applied);
    }
    assert!(
        per_instance.iter().all(|&n| n > 0),
        "both instances worked: {per_instance:?}"
    );
    assert_eq!(
        union.len() as u64,
        2 * HALF,
        "no event lost: {per_instance:?}"
    );
    Ok(())
}
