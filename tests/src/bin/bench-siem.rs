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
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use changewire_consumer::runtime::{self, ConsumerMetrics, SinkLabel};
use changewire_consumer::services::audit::{Audit, AuditConfig, DEMO_SIGNING_KEY};
use changewire_consumer::services::siem::{self, Siem, SiemConfig};
use changewire_schemas::fixtures::kubernetes_create;
use changewire_schemas::{ChangeEvent, EventId};
use changewire_tests::bench::{owning_partitions, published_topic, runtime_config, time_handler};
use changewire_tests::syslog::Rsyslog;
use changewire_tests::{bench_events, Stack};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(200_000)?;
    let stack = Stack::from_env();
    let (prefix, topic, _) =
        published_topic(&stack, "benchsiem", "k8s.core.ConfigMap", events, event).await?;
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
    let config = owning_partitions(runtime_config(stack, prefix, "siem", topic, state.path()));
    let feed = SinkLabel {
        sink: siem::FEED.into(),
    };
    let delivered =
        move |m: &ConsumerMetrics| m.effects_delivered.get_or_create(&feed).get() >= events;
    let (elapsed, _) = match service {
        Service::Audit(audit) => {
            runtime::ensure_topic(&config, &audit.heads_topic(&config), 1).await?;
            let (handler, sinks) = Audit::new(&config, &audit)?;
            time_handler(config, handler, sinks, events, |_| true).await?
        }
        Service::Siem(siem) => {
            let (handler, sinks) = Siem::new(&siem)?;
            time_handler(config, handler, sinks, events, delivered).await?
        }
    };
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
