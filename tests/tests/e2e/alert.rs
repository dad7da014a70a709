//! The alert service against a real Prometheus Alertmanager (checked through its
//! own API and its webhook notification) and a webhook receiver that refuses at
//! first and checks every Standard Webhooks signature.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use changewire_schemas::{fixtures, ChangeEvent, EventId, Op, Origin};
use changewire_tests::alertmanager::Alertmanager;
use changewire_tests::servers::free_port;
use changewire_tests::{create_topics, unique_name, workspace_binary, Stack};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::consumer::{publish_keyed, start_service, terminate};
use crate::forward::{header, signed, KEY};
use crate::rebalance::{metric, wait_for_metric};

const RULES: &str = r#"
rules:
- name: auth-weakened
  severity: critical
  match:
    kinds: [RateLimit]
    transitions: [{path: spec.auth.required, from: true, to: false}]
  summary: "{actor} turned off auth on {resource}"
  runbook_url: https://runbooks.example.com/auth
  labels: {team: edge}
- name: secret-burst
  severity: warning
  match: {kinds: [Secret], ops: [update]}
  threshold: {count: 3, within_s: 20, per: actor}
  group_by: [rule, actor]
"#;

/// What the receivers saw.
#[derive(Default)]
struct Seen {
    /// Webhook requests refused so far (the first two are).
    refused: u32,
    bad_signatures: u32,
    /// Accepted webhook messages by webhook-id.
    messages: BTreeMap<String, Value>,
    /// Alertmanager's notifications.
    notifications: Vec<Value>,
}

type Shared = Arc<Mutex<Seen>>;

async fn hook(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut seen = seen.lock().expect("seen lock");
    if !signed(&headers, &body) {
        seen.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    if seen.refused < 2 {
        seen.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let message = serde_json::from_slice(&body).unwrap_or_default();
    seen.messages
        .insert(header(&headers, "webhook-id").to_owned(), message);
    StatusCode::OK
}

async fn notified(State(seen): State<Shared>, body: Bytes) -> StatusCode {
    let notification = serde_json::from_slice(&body).unwrap_or_default();
    seen.lock()
        .expect("seen lock")
        .notifications
        .push(notification);
    StatusCode::OK
}

async fn until(seen: &Shared, what: &str, done: impl Fn(&Seen) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done(&seen.lock().expect("seen lock")) {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A RateLimit update of `name` whose auth went from `before` to `after`.
fn auth_change(n: u64, name: &str, before: bool, after: bool) -> ChangeEvent {
    let mut event = fixtures::kubernetes_create("prod");
    event.id = EventId::kubernetes("prod", &format!("uid-{name}"), &n.to_string());
    event.op = Op::Update;
    event.source.ts_ms = now_ms();
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.name = name.into();
    }
    event.before = Some(json!({"spec": {"auth": {"required": before}}}));
    event.after = Some(json!({"spec": {"auth": {"required": after}}}));
    event.diff = Some(json!([{"op": "replace", "path": "/spec/auth/required", "value": after}]));
    event
}

/// Secret update `n` by mallory, now.
fn secret_update(n: u64) -> ChangeEvent {
    let mut event = fixtures::kubernetes_create("prod");
    event.id = EventId::kubernetes("prod", "uid-secret", &n.to_string());
    event.op = Op::Update;
    event.source.ts_ms = now_ms();
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.kind = "Secret".into();
        k8s.name = "db-password".into();
    }
    if let Some(actor) = &mut event.actor {
        actor.name = "mallory".into();
    }
    event
}

async fn publish(
    stack: &Stack,
    topic: &str,
    events: &[ChangeEvent],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let records = events
        .iter()
        .map(|e| Ok((e.id.as_str().as_bytes().to_vec(), serde_json::to_vec(e)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    publish_keyed(stack, topic, records).await
}

/// A rule on a value's transition fires to Alertmanager and a near miss does not;
/// a burst window filled across a SIGKILL fires once, through a webhook that
/// refuses at first (with a second SIGKILL while it refuses: still one alert),
/// and resolves when the window stops holding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_fire_to_alertmanager_and_a_webhook_across_a_sigkill() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let seen = Shared::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/am", post(notified))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let alertmanager = Alertmanager::start(&format!("{base}/am")).await?;

    let topic = unique_name("alert-in");
    create_topics(&stack, &[&topic], 2).await?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES)?;
    let name = unique_name("alert");
    let http_port = free_port()?;
    let config = dir.path().join("alert.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             [topics]\nprefix = {prefix:?}\n[service]\nname = {name:?}\nassignment = \"static\"\n\
             subscribe = [{topic:?}]\nstate_dir = {state:?}\ntick_interval_ms = 500\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [alert]\nrules_file = {rules:?}\nevent_url = \"https://audit.example.com/v1/events/{{id}}\"\n\
             [alert.routes]\ncritical = [\"alertmanager\"]\nwarning = [\"webhook\"]\n\
             [alert.alertmanager]\nurl = {am:?}\n\
             [alert.webhook]\nurl = \"{base}/hook\"\nsecret = \"whsec_{secret}\"\n",
            brokers = stack.kafka_brokers,
            prefix = unique_name("alertp"),
            state = dir.path().join("state"),
            am = alertmanager.url,
            secret = STANDARD.encode(KEY),
        ),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("alert.log");

    let weakened = auth_change(1, "per-ip", true, false);
    let near_miss = auth_change(2, "per-host", false, true);
    let first = [
        weakened.clone(),
        near_miss,
        secret_update(1),
        secret_update(2),
    ];
    publish(&stack, &topic, &first).await?;
    let service = start_service(&program, &config, &log)?;
    let handled = wait_for_metric(
        http_port,
        "changewire_consumer_records_total",
        "",
        first.len() as u64,
    )
    .await;
    if handled.is_err() {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    handled?;
    drop(service); // SIGKILL with two of the burst's three changes counted
    let service = start_service(&program, &config, &log)?;
    publish(&stack, &topic, &[secret_update(3)]).await?;
    until(&seen, "the burst alert's first refused delivery", |s| {
        s.refused >= 1
    })
    .await?;
    drop(service); // SIGKILL mid-delivery: the alert waits in the outbox
    let service = start_service(&program, &config, &log)?;
    let firing = |s: &Seen| {
        s.messages
            .values()
            .filter(|m| m["status"] == "firing")
            .count()
    };
    until(&seen, "the burst alert", |s| firing(s) >= 1).await?;
    publish(&stack, &topic, &[secret_update(4)]).await?;
    until(&seen, "the burst alert resolved", |s| {
        s.messages.values().any(|m| m["status"] == "resolved")
    })
    .await?;
    let result = check(&seen, &alertmanager, &weakened).await;
    if result.is_err() {
        eprintln!(
            "{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            alertmanager.log()
        );
    }
    terminate(service)?;
    result
}

async fn check(
    seen: &Shared,
    alertmanager: &Alertmanager,
    weakened: &ChangeEvent,
) -> anyhow::Result<()> {
    {
        let seen = seen.lock().expect("seen lock");
        assert_eq!(seen.bad_signatures, 0, "every request signed");
        assert_eq!(seen.refused, 2, "the first two were refused, then retried");
        let firing: Vec<&Value> = seen
            .messages
            .values()
            .filter(|m| m["status"] == "firing")
            .collect();
        assert_eq!(firing.len(), 1, "the burst fired once: {firing:?}");
        let burst = firing[0];
        assert_eq!(burst["rule"], "secret-burst");
        assert_eq!(
            burst["count"], 3,
            "the window kept its count across the SIGKILL"
        );
        assert_eq!(burst["actor"]["name"], "mallory");
        assert_eq!(burst["labels"]["actor"], "mallory");
        assert_eq!(burst["resource"], "Secret edge/db-password");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let alert = loop {
        let alerts = alertmanager.alerts().await?;
        let ours: Vec<Value> = alerts
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == "auth-weakened")
            .collect();
        if !ours.is_empty() {
            assert_eq!(ours.len(), 1, "the near miss raised nothing: {ours:?}");
            break ours[0].clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Alertmanager never held the alert"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["team"], "edge");
    assert_eq!(alert["labels"]["resource"], "RateLimit edge/per-ip");
    let annotations = &alert["annotations"];
    assert_eq!(
        annotations["summary"],
        "bob turned off auth on RateLimit edge/per-ip"
    );
    assert_eq!(annotations["actor"], "bob");
    assert_eq!(annotations["event_id"], weakened.id.as_str());
    assert_eq!(
        annotations["runbook_url"],
        "https://runbooks.example.com/auth"
    );
    let description = annotations["description"].as_str().unwrap_or_default();
    assert!(
        description.contains("spec.auth.required: true -> false"),
        "{description}"
    );
    assert!(annotations["diff"]
        .as_str()
        .unwrap_or_default()
        .contains("/spec/auth/required"));
    let url = alert["generatorURL"].as_str().unwrap_or_default();
    assert!(url.ends_with(weakened.id.as_str()), "{url}");
    until(seen, "Alertmanager's notification", |s| {
        s.notifications.iter().any(|n| {
            (n["alerts"].as_array().into_iter().flatten())
                .any(|a| a["labels"]["alertname"] == "auth-weakened")
        })
    })
    .await?;
    let names: BTreeSet<String> = (seen.lock().expect("seen lock").notifications.iter())
        .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["auth-weakened".to_owned()]),
        "only critical goes to Alertmanager"
    );
    Ok(())
}

/// Writes a webhook-only alert config for `rules`; returns its path.
fn webhook_config(
    dir: &std::path::Path,
    stack: &Stack,
    topic: &str,
    rules: &std::path::Path,
    url: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("alert.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
             [service]\nname = {name:?}\nsubscribe = [{topic:?}]\nstate_dir = {state:?}\n\
             assignment = \"static\"\ntick_interval_ms = 500\n[alert]\nrules_file = {rules:?}\n[alert.webhook]\nurl = {url:?}\nsecret = \"whsec_{secret}\"\n",
            brokers = stack.kafka_brokers,
            prefix = unique_name("alertr"),
            name = unique_name("alertr"),
            state = dir.join("state"),
            secret = STANDARD.encode(KEY),
        ),
    )?;
    Ok(config)
}

fn rule_for(name: &str, pattern: &str) -> String {
    format!("rules:\n- name: {name}\n  severity: warning\n  match: {{kinds: [RateLimit], names: [\"{pattern}\"]}}\n")
}

/// Waits until the service's log says `text`.
async fn logged(log: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(text)
    {
        anyhow::ensure!(Instant::now() < deadline, "the log never said {text:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A bad rules file at start stops the service with exit 2 naming the rule's
/// field and line; a bad reload keeps the rules in force, a good one replaces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_on_change_and_a_bad_file_keeps_the_rules_in_force() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let seen = Shared::default();
    seen.lock().expect("seen lock").refused = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let topic = unique_name("alert-reload");
    create_topics(&stack, &[&topic], 1).await?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yaml");
    let config = webhook_config(dir.path(), &stack, &topic, &rules, &url)?;
    let program = workspace_binary("changewire-consumer")?;

    std::fs::write(&rules, "rules:\n- name: broken\n  severity: urgent\n")?;
    let output = std::process::Command::new(&program)
        .arg("--config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("severity") && stderr.contains("line 3"),
        "{stderr}"
    );

    std::fs::write(&rules, rule_for("first", "a-*"))?;
    let log = dir.path().join("alert.log");
    let service = start_service(&program, &config, &log)?;
    let fired = |rule: &'static str| {
        move |s: &Seen| s.messages.values().filter(|m| m["rule"] == rule).count()
    };
    publish(&stack, &topic, &[auth_change(1, "a-1", true, false)]).await?;
    until(&seen, "the first rule's alert", |s| fired("first")(s) == 1).await?;

    std::fs::write(
        &rules,
        "rules:\n- name: first\n  severity: warning\n  match: {kinds: RateLimit}\n",
    )?;
    logged(&log, "alert rules not reloaded").await?;
    publish(&stack, &topic, &[auth_change(2, "a-2", true, false)]).await?;
    until(&seen, "the first rule, still in force", |s| {
        fired("first")(s) == 2
    })
    .await?;

    std::fs::write(&rules, rule_for("second", "b-*"))?;
    logged(&log, "alert rules reloaded").await?;
    publish(
        &stack,
        &topic,
        &[
            auth_change(3, "a-3", true, false),
            auth_change(4, "b-1", true, false),
        ],
    )
    .await?;
    until(&seen, "the second rule's alert", |s| {
        fired("second")(s) == 1
    })
    .await?;
    terminate(service)?;
    assert_eq!(
        fired("first")(&seen.lock().expect("seen lock")),
        2,
        "the replaced rule no longer fires"
    );
    Ok(())
}

/// `alert dry-run` over a file of events and over a topic says which rules fire
/// and why: the transition once, the near miss not, the burst once at its third
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_says_which_rules_would_fire_on_a_file_and_a_topic() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES)?;
    let weakened = auth_change(1, "per-ip", true, false);
    let mut events = vec![weakened.clone(), auth_change(2, "per-host", false, true)];
    events.extend((1..=4).map(secret_update));
    let start = now_ms();
    for (n, event) in events.iter_mut().enumerate() {
        event.source.ts_ms = start + n as i64; // the changes' order
    }
    let file = dir.path().join("events.ndjson");
    let lines: Vec<String> = events
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(&file, lines.join("\n") + "\nnot an event\n")?;
    let topic = unique_name("alert-dry");
    create_topics(&stack, &[&topic], 2).await?;
    publish(&stack, &topic, &events).await?;
    let config = webhook_config(
        dir.path(),
        &stack,
        &topic,
        &rules,
        "http://127.0.0.1:9/hook",
    )?;
    let program = workspace_binary("changewire-consumer")?;
    for source in [
        ["--events", file.to_str().unwrap_or_default()],
        ["--topic", topic.as_str()],
    ] {
        let output = std::process::Command::new(&program)
            .args(["alert", "dry-run", "--json", "--config"])
            .arg(&config)
            .args(source)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        let fired: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let rules: Vec<&str> = fired.iter().filter_map(|f| f["rule"].as_str()).collect();
        let mut sorted = rules.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            ["auth-weakened", "secret-burst"],
            "{source:?}: {fired:?}"
        );
        let auth = fired
            .iter()
            .find(|f| f["rule"] == "auth-weakened")
            .expect("fired");
        assert_eq!(auth["event_id"], weakened.id.as_str());
        let burst = fired
            .iter()
            .find(|f| f["rule"] == "secret-burst")
            .expect("fired");
        assert_eq!(
            burst["event_id"],
            secret_update(3).id.as_str(),
            "at the third change"
        );
        assert!(stderr.contains("6 events read"), "{stderr}");
    }
    Ok(())
}

/// What a Slack-compatible receiver saw: message texts; the first request is
/// answered 429.
#[derive(Default)]
struct SlackSeen {
    throttled: bool,
    texts: Vec<String>,
}

async fn slack(
    State(seen): State<Arc<Mutex<SlackSeen>>>,
    Json(body): Json<Value>,
) -> impl axum::response::IntoResponse {
    let mut seen = seen.lock().expect("slack lock");
    if !seen.throttled {
        seen.throttled = true;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "rate_limited",
        );
    }
    seen.texts
        .push(body["text"].as_str().unwrap_or_default().to_owned());
    (StatusCode::OK, [("retry-after", "0")], "ok")
}

async fn until_slack(
    seen: &Arc<Mutex<SlackSeen>>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&seen.lock().expect("slack lock").texts) {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Slack messages (after a 429), an `info` digest, a repeat interval per group,
/// and silences through the authenticated API: a silenced rule sends nothing
/// until its silence is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_digest_and_silences() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let seen = Arc::new(Mutex::new(SlackSeen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/services/T/B/X", listener.local_addr()?);
    let app = Router::new()
        .route("/services/T/B/X", post(slack))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let topic = unique_name("alert-slack");
    create_topics(&stack, &[&topic], 1).await?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        [
            rule_for("loud", "a-*"),
            rule_for("muted", "m-*").replace("rules:\n", ""),
            rule_for("fyi", "i-*")
                .replace("rules:\n", "")
                .replace("warning", "info"),
            rule_for("once", "r-*").replace("rules:\n", "")
                + "  group_by: [rule]\n  repeat_interval_s: 3600\n",
            rule_for("lowered", "u-*").replace("rules:\n", "").replace(
                "names: [\"u-*\"]}",
                "names: [\"u-*\"], transitions: [{path: spec.rps, decreased: true}]}",
            ),
        ]
        .concat(),
    )?;
    let api_port = free_port()?;
    let http_port = free_port()?;
    let config = dir.path().join("alert.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
             [service]\nname = {name:?}\nsubscribe = [{topic:?}]\nstate_dir = {state:?}\n\
             assignment = \"static\"\ntick_interval_ms = 300\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [alert]\nrules_file = {rules:?}\nlisten = \"127.0.0.1:{api_port}\"\napi_tokens = \"t1, t2\"\n\
             [alert.routes]\nwarning = [\"slack\"]\ninfo = [\"digest\"]\n\
             [alert.slack]\nurl = {url:?}\n[alert.digest]\nto = \"slack\"\ninterval_s = 2\n",
            brokers = stack.kafka_brokers,
            prefix = unique_name("alerts"),
            name = unique_name("alerts"),
            state = dir.path().join("state"),
        ),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("alert.log");
    let service = start_service(&program, &config, &log)?;
    let api = format!("http://127.0.0.1:{api_port}/v1/silences");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match http
            .post(&api)
            .json(&json!({"matchers": {"alertname": "muted"}, "duration_s": 3600}))
            .send()
            .await
        {
            Ok(response) => break response.status(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => return Err(error.into()),
        }
    };
    assert_eq!(
        refused,
        reqwest::StatusCode::UNAUTHORIZED,
        "a token is needed"
    );
    let created: Value = http
        .post(&api)
        .bearer_auth("t2")
        .json(&json!({"matchers": {"alertname": "muted"}, "duration_s": 3600, "comment": "maintenance", "created_by": "ops"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();

    let mut created = auth_change(20, "u-1", true, false);
    created.before = None; // a transition cannot be told without a before
    publish(&stack, &topic, &[created]).await?;
    let events: Vec<ChangeEvent> = ["a-1", "m-1", "i-1", "i-2", "r-1", "r-2"]
        .iter()
        .enumerate()
        .map(|(n, name)| auth_change(n as u64, name, true, false))
        .collect();
    publish(&stack, &topic, &events).await?;
    until_slack(&seen, "the loud alert and the digest", |texts| {
        texts.iter().any(|t| t.contains("[warning] loud"))
            && texts
                .iter()
                .any(|t| t.contains("changewire digest: 2 alerts"))
    })
    .await?;
    let listed: Value = http
        .get(&api)
        .bearer_auth("t1")
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(listed["silences"][0]["comment"], "maintenance");
    let deleted = http
        .delete(format!("{api}/{id}"))
        .bearer_auth("t1")
        .send()
        .await?
        .status();
    assert_eq!(deleted, reqwest::StatusCode::NO_CONTENT);
    publish(&stack, &topic, &[auth_change(9, "m-2", true, false)]).await?;
    until_slack(&seen, "the muted rule after its silence", |texts| {
        texts.iter().any(|t| t.contains("[warning] muted"))
    })
    .await?;
    let counted = |event: &'static str, rule: &'static str| {
        let label = format!("event=\"{event}\",detail=\"{rule}\"");
        async move {
            metric(
                http_port,
                "changewire_consumer_handler_events_total",
                &label,
            )
            .await
        }
    };
    let counts = [
        counted("fired", "loud").await?,
        counted("silenced", "muted").await?,
        counted("fired", "muted").await?,
        counted("held_back", "once").await?,
        counted("unevaluable", "lowered").await?,
    ];
    terminate(service)?;
    assert_eq!(
        counts,
        [1, 1, 1, 1, 1],
        "fired, silenced, fired after, held back, unevaluable"
    );
    let texts = seen.lock().expect("slack lock").texts.clone();
    let muted: Vec<&String> = texts.iter().filter(|t| t.contains("muted")).collect();
    assert_eq!(muted.len(), 1, "m-1 came while silenced: {texts:?}");
    assert!(
        muted[0].contains("m-2") || muted[0].contains("uid-m-2"),
        "{}",
        muted[0]
    );
    let once = texts
        .iter()
        .filter(|t| t.contains("[warning] once"))
        .count();
    assert_eq!(
        once, 1,
        "one group, one alert within repeat_interval_s: {texts:?}"
    );
    let digest = texts
        .iter()
        .find(|t| t.contains("digest"))
        .expect("a digest");
    assert_eq!(digest.matches("[info] fyi").count(), 2, "{digest}");
    Ok(())
}
