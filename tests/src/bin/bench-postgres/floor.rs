//! The Kafka floor of the producer benchmark: what writing, encoding and
//! publishing insert events through librdkafka and reading them back costs with
//! no database, and the best live time that leaves on two cores.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use changewire_kafka::{Lane, PublishMetrics, Publisher, Record};
use changewire_tests::{unique_name, Stack, TestConsumer};

use super::{
    encode, median, producer_kafka_config, CpuTimes, LiveRun, TheirLiveRun, MAX_IN_FLIGHT,
};

/// What writing, encoding and publishing insert events costs with no database,
/// then reading them back: the live phase's publisher settings, lane limit and
/// reader, one step after the other so that each one's CPU is its own.
pub struct KafkaFloor {
    /// From the first row's encoding until the broker acknowledged the last record.
    publish: (Duration, CpuTimes),
    /// From the consumer's start until it counted every record.
    read: (Duration, CpuTimes),
}

impl KafkaFloor {
    /// Measures the floor for `rows` records shaped like the live load's
    /// inserts on a fresh three-partition topic.
    pub async fn measure(stack: &Stack, rows: i64) -> anyhow::Result<Self> {
        let inserts = encode::Inserts::new()?;
        let topic = format!("{}.floor", unique_name("floor"));
        changewire_tests::create_topics(stack, &[&topic], 3).await?;
        let publisher = Publisher::for_source(&producer_kafka_config(stack)?)?;
        let mut lane = publisher
            .lane::<()>(PublishMetrics::default())
            .with_limit(MAX_IN_FLIGHT);
        // Connections and metadata first, as in the live phase.
        publish_acknowledged(&mut lane, &topic, &inserts, 0..1).await?;
        let expected = u64::try_from(rows)?;
        let published = measured(publish_acknowledged(
            &mut lane,
            &topic,
            &inserts,
            1..=expected,
        ))
        .await?;
        let read = measured(async {
            let consumer = TestConsumer::from_beginning(stack, &topic)?;
            let expected = usize::try_from(expected + 1)?;
            let read = consumer.count(expected, Duration::from_secs(600)).await?;
            ensure!(
                read == expected,
                "only {read} of {expected} records were readable"
            );
            anyhow::Ok(())
        })
        .await?;
        Ok(Self {
            publish: published,
            read,
        })
    }

    /// Prints the floor and the best live time it leaves: PostgreSQL's CPU with
    /// `pg_recvlogical` and the floor's, spread over both cores without loss (an
    /// optimistic bound: decoding pgoutput, scheduling and contention come on top).
    pub fn print(&self, live: &[(TheirLiveRun, LiveRun)], changes: i64) {
        let theirs = median(live.iter().map(|(t, _)| t.elapsed.as_secs_f64()).collect());
        let postgres = median(
            live.iter()
                .map(|(t, _)| t.postgres_cpu.as_secs_f64())
                .collect(),
        );
        let [publish, read] = [&self.publish, &self.read].map(|(_, cpu)| cpu.bench_and_broker());
        let best = (postgres + publish + read) / 2.0;
        println!();
        println!(
            "| Kafka floor: {changes} inserts, no PostgreSQL | elapsed | CPU s: bench / broker |"
        );
        println!("|---|---|---|");
        for (step, (elapsed, cpu)) in [
            (
                "rows written, encoded and published until all acknowledged",
                &self.publish,
            ),
            ("then read by a consumer", &self.read),
        ] {
            println!(
                "| {step} | {:.2} s | {:.1} / {:.1} |",
                elapsed.as_secs_f64(),
                cpu.bench.as_secs_f64(),
                cpu.broker.as_secs_f64()
            );
        }
        println!(
            "| best live time on 2 cores: (PostgreSQL {postgres:.1} + publish {publish:.1} + read {read:.1} CPU s) / 2 | {best:.2} s | ratio at most {:.2} (pg_recvlogical's median {theirs:.2} s) |",
            theirs / best
        );
    }
}

/// Encodes and publishes the inserts of `rows` to `topic` and waits until the
/// broker acknowledged them all.
async fn publish_acknowledged(
    lane: &mut Lane<()>,
    topic: &str,
    inserts: &encode::Inserts,
    rows: impl Iterator<Item = u64>,
) -> anyhow::Result<()> {
    for g in rows {
        let (value, key) = inserts.encode(g)?;
        lane.publish(&Record::keyed(topic, key.as_deref(), Some(&value)))
            .await?;
    }
    lane.mark(());
    lane.next_confirmed()
        .await
        .context("the lane closed before its mark")??;
    Ok(())
}

/// Runs `step`, returning how long it took and the CPU spent meanwhile.
async fn measured(
    step: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<(Duration, CpuTimes)> {
    let (cpu_before, started) = (CpuTimes::now(), Instant::now());
    step.await?;
    Ok((started.elapsed(), CpuTimes::now().since(&cpu_before)))
}
