//! Audit benchmark:
//! `cargo run --release -p changewire-tests --bin bench-audit -- [EVENTS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 1. publishes EVENTS Kubernetes change events (default 1,000,000: 1,000
//!    resources, 50 actors, four ops, a month of change times, every tenth
//!    changing `spec.auth`) to a 3-partition topic;
//! 2. times the runtime's plain apply loop over it: the same runtime with a
//!    handler that applies nothing (reading, decoding, dedup ids, offsets, the
//!    batch's atomic write);
//! 3. times the audit service over it (in-process, its own store);
//! 4. repeats 2 and 3 once more (each with a new store), in turn;
//! 5. prints each round, both rates over the rounds and their ratio, the last
//!    audit store's size, then the latency
//!    (p50, p99) of four queries on that store, 200 runs each with varied
//!    parameters: one resource's history, one actor over a day, one op over a
//!    day, a changed-path filter over a day.

use std::time::{Duration, Instant};

use anyhow::ensure;
use changewire_consumer::runtime::{self, Sinks, Store};
use changewire_consumer::services::audit::pages::Pages;
use changewire_consumer::services::audit::query::{Filters, Finder};
use changewire_consumer::services::audit::run_files::RunFiles;
use changewire_consumer::services::audit::{Audit, AuditConfig};
use changewire_schemas::fixtures::kubernetes_create;
use changewire_schemas::{ChangeEvent, EventId, Op, Origin};
use changewire_tests::bench::{
    owning_partitions, published_topic, runtime_config, time_handler, Nothing,
};
use changewire_tests::{bench_events, cpu_time, Stack};
use serde_json::json;
use serde_json::value::RawValue;

const RESOURCES: u64 = 1_000;
const ACTORS: u64 = 50;
const DAY_MS: i64 = 86_400_000;
/// Change times start here and spread over 30 days.
const START_MS: i64 = 1_760_000_000_000;
const QUERY_RUNS: usize = 200;
/// Rounds of the plain loop and the audit, in turn: the machine's speed drifts
/// by 10-15% within a minute, and a ratio of one round each carries that drift.
const ROUNDS: usize = 2;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(1_000_000)?;
    let stack = Stack::from_env();
    let started = Instant::now();
    let (prefix, topic, bytes) =
        published_topic(&stack, "benchau", "k8s.policy.RateLimit", events, |n| {
            event(n, events)
        })
        .await?;
    println!(
        "published {events} events ({:.0} MB) in {:.1} s",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let mut plain = Phase::new("plain apply loop", None);
    let mut audit = Phase::new("audit service", Some(audit_config()));
    let mut audit_store = None;
    for _ in 0..ROUNDS {
        plain.run(&stack, &prefix, &topic, events).await?;
        audit_store = Some(audit.run(&stack, &prefix, &topic, events).await?);
    }
    let audit_state = audit_store.expect("at least one round");
    println!(
        "over {ROUNDS} rounds: plain {:.0} events/s, audit {:.0} events/s, {:.1} / {:.1} CPU s per round",
        plain.rate(events),
        audit.rate(events),
        plain.cpu_per_round(),
        audit.cpu_per_round()
    );
    println!(
        "ratio audit / plain: {:.2}",
        audit.rate(events) / plain.rate(events)
    );
    let store = Store::open(audit_state.path())?;
    let pages = Pages::of(&store).bytes_on_disk()?;
    let runs = RunFiles::of(&store).bytes_on_disk()?;
    println!(
        "audit store on disk: {:.0} MB (pages {:.0} MB and index runs {:.0} MB beside sled)",
        (store.size_on_disk()? + pages + runs) as f64 / 1e6,
        pages as f64 / 1e6,
        runs as f64 / 1e6
    );
    query_latencies(&store, events)?;
    Ok(())
}

/// One phase (the plain loop, or the audit when it has a config): its rounds'
/// time and CPU, added up.
struct Phase {
    name: &'static str,
    audit: Option<AuditConfig>,
    rounds: u32,
    took: Duration,
    cpu: Duration,
}

impl Phase {
    fn new(name: &'static str, audit: Option<AuditConfig>) -> Self {
        Self {
            name,
            audit,
            rounds: 0,
            took: Duration::ZERO,
            cpu: Duration::ZERO,
        }
    }

    /// Runs a round on a new store, prints and adds it; the store.
    async fn run(
        &mut self,
        stack: &Stack,
        prefix: &str,
        topic: &str,
        events: u64,
    ) -> anyhow::Result<tempfile::TempDir> {
        let state = tempfile::tempdir()?;
        let cpu = cpu_time("self");
        let took = time_run(
            stack,
            prefix,
            topic,
            state.path(),
            events,
            self.audit.clone(),
        )
        .await?;
        let cpu = cpu_time("self") - cpu;
        self.rounds += 1;
        println!(
            "round {}, {:<17} {:>5.1} s  {:>7.0} events/s  {:>5.1} CPU s",
            self.rounds,
            self.name,
            took.as_secs_f64(),
            events as f64 / took.as_secs_f64(),
            cpu.as_secs_f64()
        );
        self.took += took;
        self.cpu += cpu;
        Ok(state)
    }

    /// Events per second over every round.
    fn rate(&self, events: u64) -> f64 {
        (events * u64::from(self.rounds)) as f64 / self.took.as_secs_f64()
    }

    fn cpu_per_round(&self) -> f64 {
        self.cpu.as_secs_f64() / f64::from(self.rounds)
    }
}

/// Event `n` of `events`: one of [`RESOURCES`] RateLimits, by one of [`ACTORS`],
/// ops in turn, change times spread over 30 days; every tenth changes `spec.auth`.
fn event(n: u64, events: u64) -> ChangeEvent {
    let mut event = kubernetes_create("k8s");
    let resource = n % RESOURCES;
    event.id = EventId::kubernetes("k8s", &format!("uid-{resource}"), &n.to_string());
    event.op = [Op::Update, Op::Update, Op::Create, Op::Delete][(n % 4) as usize];
    event.source.ts_ms = START_MS + (n as i128 * 30 * DAY_MS as i128 / events as i128) as i64;
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.name = format!("limit-{resource}");
        k8s.namespace = Some(format!("team-{}", resource % 20));
        k8s.resource_version = n.to_string();
    }
    if let Some(actor) = event.actor.as_mut() {
        actor.name = format!("user-{}", n % ACTORS);
    }
    let path = if n.is_multiple_of(10) {
        "/spec/auth/mode"
    } else {
        "/spec/rps"
    };
    event.diff = Some(json!([{"op": "replace", "path": path, "value": n}]));
    event
}

fn audit_config() -> AuditConfig {
    toml::from_str(&format!(
        "signing_key = {:?}\nread_tokens = [\"bench\"]\nlisten = \"127.0.0.1:0\"\n",
        changewire_consumer::services::audit::DEMO_SIGNING_KEY
    ))
    .expect("a valid [audit] section")
}

/// Runs the runtime (audit when `audit` is given, else [`Nothing`]) until it read
/// every event, then stops it; the time from start to stop.
async fn time_run(
    stack: &Stack,
    prefix: &str,
    topic: &str,
    state: &std::path::Path,
    events: u64,
    audit: Option<AuditConfig>,
) -> anyhow::Result<Duration> {
    let config = owning_partitions(runtime_config(stack, prefix, "audit", topic, state));
    let (elapsed, applied) = match audit {
        Some(audit) => {
            runtime::ensure_topic(&config, &audit.heads_topic(&config), 1).await?;
            let (handler, sinks) = Audit::new(&config, &audit)?;
            time_handler(config, handler, sinks, events, |_| true).await?
        }
        None => {
            time_handler(
                config,
                Nothing::<Box<RawValue>>::decoding_rows_as(),
                Sinks::new(),
                events,
                |_| true,
            )
            .await?
        }
    };
    ensure!(applied == events, "applied {applied} of {events}");
    Ok(elapsed)
}

/// The filters of a query's `i`-th run.
type QueryOf = Box<dyn Fn(usize) -> Filters>;

/// p50 and p99 of four queries on the audit store.
fn query_latencies(store: &Store, events: u64) -> anyhow::Result<()> {
    let files = RunFiles::of(store);
    let finder = Finder::new(store, &files, b"bench");
    let day = |i: usize| {
        let from = START_MS + (i as i64 % 29) * DAY_MS;
        (Some(from), Some(from + DAY_MS))
    };
    let queries: [(&str, QueryOf); 4] = [
        (
            "one resource's history",
            Box::new(|i| Filters {
                source: Some("k8s".into()),
                kind: Some("policy.example.com/RateLimit".into()),
                namespace: Some(format!("team-{}", (i as u64 % RESOURCES) % 20)),
                name: Some(format!("limit-{}", i as u64 % RESOURCES)),
                ..Filters::default()
            }),
        ),
        (
            "one actor over a day",
            Box::new(move |i| {
                let (from_ms, to_ms) = day(i);
                Filters {
                    actor: Some(format!("user-{}", i as u64 % ACTORS)),
                    from_ms,
                    to_ms,
                    newest_first: true,
                    ..Filters::default()
                }
            }),
        ),
        (
            "one op over a day",
            Box::new(move |i| {
                let (from_ms, to_ms) = day(i);
                Filters {
                    op: Some(Op::Delete),
                    from_ms,
                    to_ms,
                    newest_first: true,
                    ..Filters::default()
                }
            }),
        ),
        (
            "changed spec.auth.* over a day",
            Box::new(move |i| {
                let (from_ms, to_ms) = day(i);
                Filters {
                    changed: Some("spec.auth.*".into()),
                    from_ms,
                    to_ms,
                    newest_first: true,
                    ..Filters::default()
                }
            }),
        ),
    ];
    println!("query latency on {events} events, {QUERY_RUNS} runs each, pages of 100:");
    for (name, filters) in &queries {
        let mut times = Vec::with_capacity(QUERY_RUNS);
        let mut found = 0;
        for i in 0..QUERY_RUNS {
            let started = Instant::now();
            found += finder.find(&filters(i), 100, None)?.events.len();
            times.push(started.elapsed());
        }
        times.sort();
        let percentile = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
        println!(
            "  {name:<32} p50 {:>7.2} ms  p99 {:>7.2} ms  ({:.0} events per page)",
            percentile(50).as_secs_f64() * 1e3,
            percentile(99).as_secs_f64() * 1e3,
            found as f64 / QUERY_RUNS as f64
        );
    }
    Ok(())
}
