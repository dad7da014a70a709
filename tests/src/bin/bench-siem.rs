//! SIEM feed benchmark:
//! `cargo run --release -p changewire-tests --bin bench-siem -- [EVENTS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 1. publishes EVENTS Kubernetes change events (default 200,000) to a 3-partition
//!    topic;
//! 2. times the audit service's ingest of them (the baseline the issue asks for);
//! 3. times an ECS feed to each transport on loopback until every document is
//!    delivered: an Elasticsearch-compatible `_bulk` receiver and a Splunk HEC
//!    receiver with acknowledgements (both in this process, answering at once),
//!    and an NDJSON file; then a CEF feed over syslog (TCP, octet counting) to a
//!    receiver in this process that reads and drops, and to a real rsyslogd
//!    writing to a file;
//! 4. prints events/s per feed and its ratio to the audit ingest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use axum::routing::post;
use axum::{Json, Router};
use changewire_consumer::config::{Assignment, ConsumerConfig, ServiceConfig};
use changewire_consumer::runtime::{self, ConsumerMetrics, SinkLabel};
use changewire_consumer::services::audit::{Audit, AuditConfig, DEMO_SIGNING_KEY};
use changewire_consumer::services::siem::{self, Siem, SiemConfig};
use changewire_schemas::fixtures::kubernetes_create;
use changewire_schemas::topic::TopicsConfig;
use changewire_schemas::{ChangeEvent, EventId};
use changewire_tests::syslog::Rsyslog;
use changewire_tests::{bench_events, create_topics, publish_events, unique_name, Stack};
use serde_json::{json, Value};
use tokio::sync::watch;

const PARTITIONS: i32 = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(200_000)?;
    let stack = Stack::from_env();
    let prefix = unique_name("benchsiem");
    let topic = format!("{prefix}.k8s.core.ConfigMap");
    create_topics(&stack, &[&topic], PARTITIONS).await?;
    publish_events(&stack, &topic, events, event).await?;
    println!("published {events} events");

    let audit = toml::from_str::<AuditConfig>(&format!(
        "signing_key = {DEMO_SIGNING_KEY:?}\nread_tokens = [\"bench\"]\n"
    ))?;
    let audit_time = run(&stack, (&prefix, &topic), events, Service::Audit(audit)).await?;
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "audit ingest:        {:>7.1} s  {:>9.0} events/s",
        audit_time.as_secs_f64(),
        rate(audit_time)
    );

    let bulk = serve(Router::new().route("/_bulk", post(bulk))).await?;
    let hec = serve(
        Router::new()
            .route("/services/collector/event", post(hec_event))
            .route("/services/collector/ack", post(hec_ack)),
    )
    .await?;
    let drain = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let drain_address = drain.local_addr()?;
    tokio::spawn(drain_syslog(drain));
    let rsyslog = Rsyslog::start(None)?;
    let dir = tempfile::tempdir()?;
    let feeds = [
        (
            "_bulk (ECS)",
            format!("format = \"ecs\"\n[elasticsearch]\nurl = \"http://{bulk}\"\nindex = \"ecs\""),
        ),
        (
            "Splunk HEC (ECS, acks)",
            format!(
                "format = \"ecs\"\n[splunk]\nurl = \"http://{hec}\"\ntoken = \"t\"\nuse_ack = true"
            ),
        ),
        (
            "NDJSON file (ECS)",
            format!(
                "format = \"ecs\"\n[file]\npath = {:?}",
                dir.path().join("ecs.ndjson")
            ),
        ),
        (
            "syslog TCP (CEF)",
            format!("format = \"cef\"\n[syslog]\naddress = \"{drain_address}\""),
        ),
        (
            "rsyslogd TCP (CEF)",
            format!(
                "format = \"cef\"\n[syslog]\naddress = \"127.0.0.1:{}\"",
                rsyslog.tcp_port
            ),
        ),
    ];
    for (name, transport) in feeds {
        let siem: SiemConfig = toml::from_str(&format!("{transport}\n"))?;
        let time = run(
            &stack,
            (&prefix, &topic),
            events,
            Service::Siem(Box::new(siem)),
        )
        .await?;
        println!(
            "{name:<22} {:>7.1} s  {:>9.0} events/s  ratio to the audit ingest {:.2}",
            time.as_secs_f64(),
            rate(time),
            rate(time) / rate(audit_time)
        );
    }
    Ok(())
}

enum Service {
    Audit(AuditConfig),
    Siem(Box<SiemConfig>),
}

/// Runs `service` in this process over the topic until it has read every event
/// (and, for a feed, delivered every document); the time from start to stop.
async fn run(
    stack: &Stack,
    (prefix, topic): (&str, &str),
    events: u64,
    service: Service,
) -> anyhow::Result<Duration> {
    let state = tempfile::tempdir()?;
    let config = ConsumerConfig {
        kafka: stack.kafka_config(),
        topics: TopicsConfig {
            prefix: prefix.to_owned(),
            ..TopicsConfig::default()
        },
        http: None,
        service: ServiceConfig {
            max_batch: 5_000,
            resume_rewind: 10_000,
            tick_interval_ms: Some(1_000),
            assignment: Assignment::Static,
            ..ServiceConfig::new(
                &unique_name("bench"),
                vec![topic.to_owned()],
                state.path().to_owned(),
            )
        },
        dedup: None,
        forward: None,
        audit: None,
        siem: None,
        alert: None,
    }
    .runtime();
    let metrics = Arc::new(ConsumerMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let observed = metrics.clone();
    let started = Instant::now();
    let feed = SinkLabel {
        sink: siem::FEED.into(),
    };
    let delivered = |m: &ConsumerMetrics| m.effects_delivered.get_or_create(&feed).get();
    let (task, needs_delivery) = match service {
        Service::Audit(audit) => {
            runtime::ensure_topic(&config, &audit.heads_topic(&config), 1).await?;
            let (handler, sinks) = Audit::new(&config, &audit)?;
            let task = tokio::spawn(async move {
                runtime::run_observed(&config, handler, sinks, shutdown, observed).await
            });
            (task, false)
        }
        Service::Siem(siem) => {
            let (handler, sinks) = Siem::new(&siem)?;
            let task = tokio::spawn(async move {
                runtime::run_observed(&config, handler, sinks, shutdown, observed).await
            });
            (task, true)
        }
    };
    while metrics.records_read() < events || (needs_delivery && delivered(&metrics) < events) {
        ensure!(
            !task.is_finished(),
            "the service stopped early: {:?}",
            task.await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    task.await??;
    Ok(elapsed)
}

/// Event `n`: a change of one of 1,000 objects.
fn event(n: u64) -> ChangeEvent {
    let mut event = kubernetes_create("k8s");
    event.id = EventId::kubernetes("k8s", &format!("uid-{}", n % 1000), &n.to_string());
    event
}

/// Reads every syslog connection to the end, dropping what it reads.
async fn drain_syslog(listener: tokio::net::TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move { tokio::io::copy(&mut socket, &mut tokio::io::sink()).await });
    }
}

async fn serve(router: Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(address)
}

/// Accepts every document of a `_bulk` request.
async fn bulk(body: String) -> Json<Value> {
    let items: Vec<Value> = (0..body.lines().count() / 2)
        .map(|_| json!({"create": {"status": 201}}))
        .collect();
    Json(json!({"took": 0, "errors": false, "items": items}))
}

/// Accepts every event, with an ackId.
async fn hec_event(_body: String) -> Json<Value> {
    Json(json!({"text": "Success", "code": 0, "ackId": 1}))
}

/// Every ack is indexed.
async fn hec_ack(Json(asked): Json<Value>) -> Json<Value> {
    let acks: serde_json::Map<String, Value> = (asked["acks"].as_array().into_iter().flatten())
        .filter_map(Value::as_u64)
        .map(|ack| (ack.to_string(), json!(true)))
        .collect();
    Json(json!({ "acks": acks }))
}
