//! Alert benchmark:
//! `cargo run --release -p changewire-tests --bin bench-alert -- [EVENTS]`
//!
//! On the local stack (`scripts/stack up`), in one run:
//! 1. publishes EVENTS Kubernetes change events (default 1,000,000: 1,000
//!    RateLimits in 20 namespaces, 50 actors, four ops, every tenth changing
//!    `spec.auth`, each with its before and after) to a 3-partition topic;
//! 2. times the runtime's plain apply loop over it;
//! 3. times the alert service with 200 rules over it: 100 on kinds that never
//!    come (rejected on the kind), 40 on a namespace, a name pattern and a
//!    changed path, 20 on a number decreasing, 20 on actors and hours in a time
//!    zone, 20 windows per resource; alerts go to an Alertmanager stand-in on
//!    loopback that accepts everything;
//! 4. prints both rates, their ratio, and the alerts sent.

use std::time::Duration;

use axum::routing::post;
use axum::Router;
use changewire_consumer::runtime::{ConsumerMetrics, SinkLabel, Sinks};
use changewire_consumer::services::alert::{Alert, AlertConfig, ALERTMANAGER};
use changewire_schemas::fixtures::kubernetes_create;
use changewire_schemas::{ChangeEvent, EventId, Op, Origin};
use changewire_tests::bench::{
    owning_partitions, published_topic, runtime_config, time_handler, Nothing,
};
use changewire_tests::{bench_events, Stack};
use serde_json::{json, Value};

const RESOURCES: u64 = 1_000;
const ACTORS: u64 = 50;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = bench_events(1_000_000)?;
    let stack = Stack::from_env();
    let (prefix, topic, _) =
        published_topic(&stack, "benchal", "k8s.policy.RateLimit", events, event).await?;
    println!("published {events} events");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let alertmanager = format!("http://{}", listener.local_addr()?);
    let accept = Router::new().route("/api/v2/alerts", post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, accept).await });
    let dir = tempfile::tempdir()?;
    let rules_file = dir.path().join("rules.yaml");
    std::fs::write(&rules_file, rules())?;

    let plain_state = tempfile::tempdir()?;
    let config = owning_partitions(runtime_config(
        &stack,
        &prefix,
        "alert",
        &topic,
        plain_state.path(),
    ));
    let (plain, _) = time_handler(
        config,
        Nothing::<Value>::decoding_rows_as(),
        Sinks::new(),
        events,
        |_| true,
    )
    .await?;

    let alert_state = tempfile::tempdir()?;
    let alert: AlertConfig = toml::from_str(&format!(
        "rules_file = {rules_file:?}\n[alertmanager]\nurl = {alertmanager:?}\n"
    ))?;
    let config = owning_partitions(runtime_config(
        &stack,
        &prefix,
        "alert",
        &topic,
        alert_state.path(),
    ));
    let (handler, sinks) = Alert::new(&alert, alert_state.path())?;
    let label = SinkLabel {
        sink: ALERTMANAGER.into(),
    };
    let sent = |m: &ConsumerMetrics| m.effects_delivered.get_or_create(&label).get();
    let observed = std::sync::Arc::new(std::sync::Mutex::new(0));
    let seen = observed.clone();
    let (timed, _) = time_handler(config, handler, sinks, events, move |m| {
        *seen.lock().expect("count lock") = sent(m);
        true
    })
    .await?;

    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "plain apply loop:   {:>7.1} s  {:>9.0} events/s",
        plain.as_secs_f64(),
        rate(plain)
    );
    println!(
        "alert, 200 rules:   {:>7.1} s  {:>9.0} events/s",
        timed.as_secs_f64(),
        rate(timed)
    );
    println!("ratio alert / plain: {:.2}", rate(timed) / rate(plain));
    println!(
        "alerts delivered to Alertmanager by the end of the reading: {}",
        observed.lock().expect("count lock")
    );
    Ok(())
}

/// Event `n`: a change of one of [`RESOURCES`] RateLimits by one of [`ACTORS`].
fn event(n: u64) -> ChangeEvent {
    let mut event = kubernetes_create("k8s");
    let resource = n % RESOURCES;
    event.id = EventId::kubernetes("k8s", &format!("uid-{resource}"), &n.to_string());
    event.op = [Op::Update, Op::Update, Op::Create, Op::Delete][(n % 4) as usize];
    event.source.ts_ms = 1_760_000_000_000 + n as i64 * 10;
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.name = format!("limit-{resource}");
        k8s.namespace = Some(format!("team-{}", resource % 20));
    }
    if let Some(actor) = event.actor.as_mut() {
        actor.name = format!("user-{}", n % ACTORS);
    }
    let rps = (n % 7) as i64;
    event.before = Some(json!({"spec": {"rps": rps + 1, "auth": {"mode": "jwt"}}}));
    event.after = Some(json!({"spec": {"rps": rps, "auth": {"mode": "jwt"}}}));
    let path = if n.is_multiple_of(10) {
        "/spec/auth/mode"
    } else {
        "/spec/rps"
    };
    event.diff = Some(json!([{"op": "replace", "path": path, "value": rps}]));
    event
}

/// The 200 rules.
fn rules() -> String {
    let mut yaml = String::from("rules:\n");
    for i in 0..100 {
        yaml += &format!("- name: other-kind-{i}\n  severity: info\n  match: {{kinds: [Kind{i}], changed: [\"spec.*\"]}}\n");
    }
    for i in 0..40 {
        yaml += &format!(
            "- name: auth-{i}\n  severity: critical\n  match: {{kinds: [RateLimit], namespaces: [team-{}], names: [\"limit-{i}*\"], changed: [\"spec.auth.*\"]}}\n",
            i % 20
        );
    }
    for i in 0..20 {
        yaml += &format!("- name: rps-down-{i}\n  severity: warning\n  match:\n    kinds: [RateLimit]\n    names: [limit-{i}]\n    transitions: [{{path: spec.rps, decreased: true}}]\n");
    }
    for i in 0..20 {
        yaml += &format!("- name: actor-hours-{i}\n  severity: warning\n  match:\n    kinds: [RateLimit]\n    actor: {{in: [user-{i}]}}\n    ops: [delete]\n    names: [\"limit-{i}?\"]\n    outside_hours: {{from: \"08:00\", to: \"18:00\", timezone: Europe/Berlin}}\n");
    }
    for i in 0..20 {
        yaml += &format!("- name: burst-{i}\n  severity: critical\n  match: {{kinds: [RateLimit], ops: [delete], names: [limit-{i}]}}\n  threshold: {{count: 50, within_s: 3600, per: resource}}\n");
    }
    yaml
}
