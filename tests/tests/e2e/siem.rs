//! The SIEM feed against an Elasticsearch-compatible `_bulk` receiver on loopback:
//! it answers 503 for a while (the feed is SIGKILLed meanwhile), then partial
//! failures (429 items, and one document it rejects), then OK. Every event arrives
//! once, the rejected one is in the DLQ with the receiver's reason, and every
//! document follows the ECS field list shipped in tests/data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use changewire_consumer::runtime::dlq::headers as dlq_headers;
use changewire_schemas::{fixtures, ChangeEvent, EventId, Op, Origin};
use changewire_tests::{create_topics, read_to_end, unique_name, workspace_binary, Stack};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::consumer::{publish_keyed, start_service, terminate};

const EVENTS: u64 = 200;
const INDEX: &str = "changewire-ecs";
/// The document the receiver rejects (a mapping conflict, say).
const POISONED: u64 = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Down,
    Partial,
    Up,
}

/// What the receiver saw and holds.
struct Receiver {
    mode: Mode,
    refused: u64,
    partial_answers: u64,
    documents: BTreeMap<String, Value>,
    malformed: Vec<String>,
}

type Shared = Arc<Mutex<Receiver>>;

/// Answers one `_bulk` request as the current mode says, checking its shape.
async fn bulk(State(receiver): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut receiver = receiver.lock().expect("receiver lock");
    if receiver.mode == Mode::Down {
        receiver.refused += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "down",
        )
            .into_response();
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-ndjson") {
        receiver.malformed.push("content-type".into());
        return (StatusCode::BAD_REQUEST, "not ndjson").into_response();
    }
    let lines: Vec<&str> = body.lines().collect();
    let partial = receiver.mode == Mode::Partial;
    receiver.partial_answers += u64::from(partial);
    let mut items = Vec::new();
    for (position, pair) in lines.chunks(2).enumerate() {
        let action: Value = serde_json::from_str(pair[0]).unwrap_or_default();
        let document: Value =
            serde_json::from_str(pair.get(1).copied().unwrap_or("")).unwrap_or_default();
        let id = action["create"]["_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if action["create"]["_index"] != INDEX || id.is_empty() || !document.is_object() {
            receiver.malformed.push(pair[0].to_owned());
            items.push(json!({"create": {"status": 400, "error": {"type": "illegal_argument_exception", "reason": "bad action"}}}));
            continue;
        }
        let event_id = document["event"]["id"].as_str().unwrap_or_default();
        let status = if event_id.ends_with(&format!(":{POISONED}")) {
            items.push(json!({"create": {"_id": id, "status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse field [changewire.after]"}}}));
            continue;
        } else if partial && position % 2 == 1 {
            429
        } else if receiver.documents.contains_key(&id) {
            409
        } else {
            receiver.documents.insert(id.clone(), document);
            201
        };
        items.push(json!({"create": {"_id": id, "status": status}}));
    }
    Json(json!({"took": 1, "errors": true, "items": items})).into_response()
}

async fn start_receiver(receiver: Shared) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = Router::new()
        .route("/_bulk", post(bulk))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

/// Event `n`: a change of one of four kinds (two of them IAM), by an audited user.
pub(crate) fn event(n: u64) -> ChangeEvent {
    let mut event = fixtures::kubernetes_create("prod");
    event.id = EventId::kubernetes("prod", &format!("uid-{n}"), &n.to_string());
    event.op = [Op::Create, Op::Update, Op::Delete][(n % 3) as usize];
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.kind = ["ConfigMap", "Secret", "RoleBinding", "RateLimit"][(n % 4) as usize].into();
        k8s.name = format!("object-{n}");
    }
    event
}

/// Writes a feed's config; returns its path.
pub(crate) fn write_config(
    dir: &std::path::Path,
    stack: &Stack,
    (prefix, topic): (&str, &str),
    format: &str,
    transport: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("siem.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             [topics]\nprefix = {prefix:?}\n[service]\nname = \"siem\"\nassignment = \"static\"\n\
             subscribe = [{topic:?}]\nstate_dir = {state:?}\nresume_rewind = 10000\n\
             [siem]\nformat = {format:?}\n{transport}\n",
            brokers = stack.kafka_brokers,
            state = dir.join("state"),
        ),
    )?;
    Ok(path)
}

/// The `_bulk` transport to `url`.
fn elasticsearch(url: &str) -> String {
    format!("[siem.elasticsearch]\nurl = {url:?}\nindex = {INDEX:?}\nbatch_size = 50")
}

fn receiver(mode: Mode) -> Shared {
    Arc::new(Mutex::new(Receiver {
        mode,
        refused: 0,
        partial_answers: 0,
        documents: BTreeMap::new(),
        malformed: Vec::new(),
    }))
}

/// A new topic of `partitions` holding events 0..`count`: its prefix and name.
pub(crate) async fn published(
    stack: &Stack,
    name: &str,
    count: u64,
    partitions: i32,
) -> anyhow::Result<(String, String)> {
    let prefix = unique_name(name);
    let topic = format!("{prefix}.prod.core.ConfigMap");
    create_topics(stack, &[&topic], partitions).await?;
    let records = (0..count)
        .map(|n| Ok((n.to_string().into_bytes(), serde_json::to_vec(&event(n))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    publish_keyed(stack, &topic, records).await?;
    Ok((prefix, topic))
}

async fn wait_until(
    receiver: &Shared,
    what: &str,
    done: impl Fn(&Receiver) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done(&receiver.lock().expect("receiver lock")) {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecs_feed_rides_out_an_outage_and_partial_failures_and_loses_nothing(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, topic) = published(&stack, "siem", EVENTS, 2).await?;
    let receiver = receiver(Mode::Down);
    let url = start_receiver(receiver.clone()).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &stack,
        (&prefix, &topic),
        "ecs",
        &elasticsearch(&url),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("siem.log");
    let service = start_service(&program, &config, &log)?;
    wait_until(&receiver, "refused requests", |r| r.refused >= 2).await?;
    drop(service); // SIGKILL while the receiver is down
    let refused = receiver.lock().expect("receiver lock").refused;
    let service = start_service(&program, &config, &log)?;
    wait_until(&receiver, "refusals after the restart", |r| {
        r.refused > refused
    })
    .await?;
    receiver.lock().expect("receiver lock").mode = Mode::Partial;
    wait_until(&receiver, "partial answers", |r| r.partial_answers >= 3).await?;
    receiver.lock().expect("receiver lock").mode = Mode::Up;
    let result = check_delivered(&stack, &prefix, &receiver).await;
    if result.is_err() {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    terminate(service)?;
    result
}

async fn check_delivered(stack: &Stack, prefix: &str, receiver: &Shared) -> anyhow::Result<()> {
    wait_until(receiver, "every event but the rejected one", |r| {
        r.documents.len() as u64 == EVENTS - 1
    })
    .await?;
    let (receiver, malformed) = {
        let receiver = receiver.lock().expect("receiver lock");
        (receiver.documents.clone(), receiver.malformed.clone())
    };
    assert!(
        malformed.is_empty(),
        "requests of the wrong shape: {malformed:?}"
    );
    let arrived: BTreeSet<String> = (receiver.values())
        .filter_map(|d| d["event"]["id"].as_str().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = (0..EVENTS)
        .filter(|&n| n != POISONED)
        .map(|n| event(n).id.to_string())
        .collect();
    assert_eq!(
        arrived, expected,
        "each event once (ids are the idempotency keys)"
    );
    let fields = EcsFields::shipped()?;
    for document in receiver.values() {
        fields.check(document)?;
    }
    let dead = read_to_end(
        stack,
        &format!("{prefix}.dlq.siem"),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(dead.len(), 1, "only the rejected document is dead-lettered");
    let reason = dead[0].header(dlq_headers::ERROR).unwrap_or_default();
    assert!(reason.contains("mapper_parsing_exception"), "{reason}");
    let key = dead[0]
        .header(dlq_headers::IDEMPOTENCY_KEY)
        .unwrap_or_default();
    assert!(key.starts_with(&event(POISONED).id.to_string()), "{key}");
    Ok(())
}

/// The OCSF feed: audited changes as API Activity, the others (managedFields
/// actors, table rows) as Entity Management, each checked against the class
/// attributes shipped in tests/data/ocsf-1.1-classes.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ocsf_feed_classifies_changes_by_what_is_known_of_the_actor() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let prefix = unique_name("ocsf");
    let topic = format!("{prefix}.prod.core.ConfigMap");
    create_topics(&stack, &[&topic], 1).await?;
    let mut events: Vec<ChangeEvent> = (0..10).map(event).collect();
    for n in 10..20 {
        let mut unaudited = event(n);
        if let Some(actor) = unaudited.actor.as_mut() {
            actor.via = changewire_schemas::ActorVia::ManagedFields;
        }
        events.push(unaudited);
    }
    for n in 20..30 {
        let mut row = fixtures::postgres_update("shop");
        row.id = EventId::postgres("shop", 0x100 + n, 1);
        events.push(row);
    }
    let records = (events.iter().enumerate())
        .map(|(n, e)| Ok((n.to_string().into_bytes(), serde_json::to_vec(e)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    publish_keyed(&stack, &topic, records).await?;
    let receiver = receiver(Mode::Up);
    let url = start_receiver(receiver.clone()).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &stack,
        (&prefix, &topic),
        "ocsf",
        &elasticsearch(&url),
    )?;
    let program = workspace_binary("changewire-consumer")?;
    let service = start_service(&program, &config, &dir.path().join("siem.log"))?;
    wait_until(&receiver, "every event", |r| {
        r.documents.len() == events.len()
    })
    .await?;
    terminate(service)?;
    let classes: Value = serde_json::from_str(include_str!("../../data/ocsf-1.1-classes.json"))?;
    let documents = receiver.lock().expect("receiver lock").documents.clone();
    let mut by_class = BTreeMap::<u64, usize>::new();
    for document in documents.values() {
        check_ocsf(&classes, document)?;
        *by_class
            .entry(document["class_uid"].as_u64().unwrap_or(0))
            .or_default() += 1;
    }
    assert_eq!(by_class, BTreeMap::from([(3004, 20), (6003, 10)]));
    Ok(())
}

/// The NDJSON file feed: rotated by size, each event once across the files, with a
/// SIGKILL mid-stream (the restart finds what was written before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_feed_rotates_and_writes_each_event_once_across_a_sigkill() -> anyhow::Result<()> {
    const MANY: u64 = 600;
    const MAX_BYTES: u64 = 40_000;
    let stack = Stack::from_env();
    let (prefix, topic) = published(&stack, "siemf", MANY, 2).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("feed").join("ecs.ndjson");
    let transport = format!("[siem.file]\npath = {path:?}\nmax_bytes = {MAX_BYTES}\nkeep = 1000");
    let config = write_config(dir.path(), &stack, (&prefix, &topic), "ecs", &transport)?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("siem.log");
    let service = start_service(&program, &config, &log)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while feed_lines(&path)?.len() < 100 {
        anyhow::ensure!(Instant::now() < deadline, "nothing written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(service); // SIGKILL mid-stream
    let service = start_service(&program, &config, &log)?;
    // Done once every event is in the files and none is left oversized (a
    // file is past `max_bytes` only between a write and its rotation, or after
    // a crash until the restart rotates it). Read while the service writes, a
    // file can be read twice (renamed to `.1` between reading `<path>` and
    // `<path>.1`): the count is taken once it stops.
    let settled = || -> anyhow::Result<bool> {
        let unique = feed_ids(&path)?.into_iter().collect::<BTreeSet<_>>().len();
        let oversized = std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_BYTES);
        Ok(unique == MANY as usize && !oversized)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled()? && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(service)?;
    let ids = feed_ids(&path)?;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len() as u64, MANY, "every event");
    if ids.len() as u64 != MANY {
        let mut seen = BTreeSet::new();
        let twice: Vec<&String> = ids.iter().filter(|id| !seen.insert(*id)).take(5).collect();
        anyhow::bail!(
            "each once: {} lines for {MANY} events, written twice e.g. {twice:?}; the service's log:\n{}",
            ids.len(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let listing = |dir: &std::path::Path| -> Vec<(String, u64)> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().map_or(0, |m| m.len()),
                )
            })
            .collect()
    };
    assert!(
        std::path::Path::new(&rotated).exists(),
        "rotated by size: {:?}; the service's log:\n{}",
        listing(path.parent().unwrap_or(dir.path())),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Ok(())
}

/// The event ids of the feed file's lines and its rotations'.
fn feed_ids(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    Ok(feed_lines(path)?
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|d| d["event"]["id"].as_str().map(str::to_owned))
        .collect())
}

/// Every line of the feed file and its rotations.
fn feed_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for n in 0.. {
        let mut name = path.as_os_str().to_owned();
        if n > 0 {
            name.push(format!(".{n}"));
        }
        match std::fs::read_to_string(std::path::Path::new(&name)) {
            Ok(text) => lines.extend(text.lines().map(str::to_owned)),
            Err(_) if n > 0 => break,
            Err(_) => {}
        }
    }
    Ok(lines)
}

/// `document` is an event of a class the list has: every attribute known, the
/// required ones present, the uids consistent.
fn check_ocsf(classes: &Value, document: &Value) -> anyhow::Result<()> {
    let class_uid = document["class_uid"].as_u64().unwrap_or(0);
    let class = &classes["classes"][class_uid.to_string()];
    anyhow::ensure!(
        class.is_object(),
        "class {class_uid} is not in the list: {document}"
    );
    let listed = |key: &str| -> Vec<String> {
        class[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    for attribute in document.as_object().into_iter().flat_map(|o| o.keys()) {
        anyhow::ensure!(
            listed("attributes").contains(attribute),
            "{attribute} is not an attribute of {class_uid}"
        );
    }
    for required in listed("required") {
        anyhow::ensure!(
            !document[&required].is_null(),
            "{required} missing from {class_uid}: {document}"
        );
    }
    anyhow::ensure!(
        document["category_uid"] == class["category_uid"],
        "category of {class_uid}"
    );
    let activity = document["activity_id"].as_u64().unwrap_or(u64::MAX);
    anyhow::ensure!(
        class["activity_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(activity))),
        "activity {activity} of {class_uid}"
    );
    anyhow::ensure!(
        document["type_uid"].as_u64() == Some(class_uid * 100 + activity),
        "type_uid"
    );
    anyhow::ensure!(
        document["metadata"]["product"]["vendor_name"].is_string(),
        "metadata.product.vendor_name"
    );
    anyhow::ensure!(
        document["metadata"]["version"].is_string(),
        "metadata.version"
    );
    Ok(())
}

/// The ECS fields and allowed values the tests hold documents to.
struct EcsFields {
    types: BTreeMap<String, String>,
    allowed: BTreeMap<String, Vec<String>>,
}

impl EcsFields {
    fn shipped() -> anyhow::Result<Self> {
        let list: Value = serde_json::from_str(include_str!("../../data/ecs-8.11-fields.json"))?;
        let map = |v: &Value| -> BTreeMap<String, Value> {
            v.as_object()
                .map(|o| o.clone().into_iter().collect())
                .unwrap_or_default()
        };
        Ok(Self {
            types: (map(&list["fields"]).into_iter())
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            allowed: (map(&list["allowed_values"]).into_iter())
                .map(|(k, v)| {
                    (
                        k,
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect(),
                    )
                })
                .collect(),
        })
    }

    /// Every field outside `changewire.*` is an ECS field of its type, with an
    /// allowed value; the fields every event has are there.
    fn check(&self, document: &Value) -> anyhow::Result<()> {
        let mut leaves = Vec::new();
        flatten("", document, &mut leaves);
        for (path, value) in &leaves {
            if path.starts_with("changewire.") {
                continue;
            }
            let Some(kind) = self.types.get(path) else {
                anyhow::bail!("{path} is not an ECS field: {document}");
            };
            let values: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for value in values {
                let text = value
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("{path} is not text: {value}"))?;
                match kind.as_str() {
                    "date" => anyhow::ensure!(is_rfc3339(text), "{path}: {text} is not a date"),
                    "ip" => anyhow::ensure!(text.parse::<IpAddr>().is_ok(), "{path}: {text}"),
                    _ => {}
                }
                if let Some(allowed) = self.allowed.get(path) {
                    anyhow::ensure!(
                        allowed.iter().any(|a| a == text),
                        "{path}: {text} is not an allowed value"
                    );
                }
            }
        }
        for required in [
            "@timestamp",
            "ecs.version",
            "event.kind",
            "event.category",
            "event.type",
            "event.id",
        ] {
            anyhow::ensure!(
                leaves.iter().any(|(p, _)| p == required),
                "{required} missing: {document}"
            );
        }
        Ok(())
    }
}

/// Dotted paths of `value`'s leaves (arrays are leaves), nulls left out.
fn flatten<'a>(prefix: &str, value: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, inner, out);
            }
        }
        Value::Null => {}
        leaf => out.push((prefix.to_owned(), leaf)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_rfc3339(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 24
        && bytes[10] == b'T'
        && bytes[23] == b'Z'
        && text[..4].parse::<u32>().is_ok()
        && text[5..7]
            .parse::<u32>()
            .is_ok_and(|m| (1..=12).contains(&m))
        && text[8..10]
            .parse::<u32>()
            .is_ok_and(|d| (1..=31).contains(&d))
}

/// A Splunk HTTP Event Collector stand-in: checks the token, the channel and each
/// envelope, is busy while down, rejects the poisoned event by its number, and
/// acknowledges indexing on the second poll.
#[derive(Default)]
struct Collector {
    down: bool,
    busy_answers: u64,
    /// Event ids indexed, with how many times each came.
    indexed: BTreeMap<String, u64>,
    /// Envelope times by event id.
    times: BTreeMap<String, f64>,
    next_ack: u64,
    polls: BTreeMap<u64, u32>,
    malformed: Vec<String>,
}

type SharedCollector = Arc<Mutex<Collector>>;

const HEC_TOKEN: &str = "test-token";

async fn collect(
    State(collector): State<SharedCollector>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut collector = collector.lock().expect("collector lock");
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Splunk {HEC_TOKEN}"))
    {
        collector.malformed.push("authorization".into());
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"text": "Invalid token", "code": 4})),
        )
            .into_response();
    }
    if headers.get("x-splunk-request-channel").is_none() {
        collector.malformed.push("channel".into());
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"text": "Data channel is missing", "code": 10})),
        )
            .into_response();
    }
    if collector.down {
        collector.busy_answers += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"text": "Server is busy", "code": 9})),
        )
            .into_response();
    }
    let envelopes: Vec<Value> = serde_json::Deserializer::from_str(&body)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    for (number, envelope) in envelopes.iter().enumerate() {
        let shaped = envelope["time"].is_number()
            && ["host", "source", "sourcetype"]
                .iter()
                .all(|f| envelope[*f].is_string())
            && envelope["index"] == "security"
            && envelope["event"]["event"]["id"].is_string();
        if !shaped {
            collector.malformed.push(envelope.to_string());
        }
        let id = envelope["event"]["event"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if id.ends_with(&format!(":{POISONED}")) {
            let answer =
                json!({"text": "Invalid data format", "code": 6, "invalidEventNumber": number});
            return (StatusCode::BAD_REQUEST, Json(answer)).into_response();
        }
        *collector.indexed.entry(id.clone()).or_default() += 1;
        collector
            .times
            .insert(id, envelope["time"].as_f64().unwrap_or(-1.0));
    }
    collector.next_ack += 1;
    let ack = collector.next_ack;
    Json(json!({"text": "Success", "code": 0, "ackId": ack})).into_response()
}

async fn acknowledge(
    State(collector): State<SharedCollector>,
    Json(asked): Json<Value>,
) -> Response {
    let mut collector = collector.lock().expect("collector lock");
    let mut acks = serde_json::Map::new();
    for ack in asked["acks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
    {
        let polls = collector.polls.entry(ack).or_default();
        *polls += 1;
        acks.insert(ack.to_string(), json!(*polls >= 2));
    }
    Json(json!({ "acks": acks })).into_response()
}

/// The Splunk HEC feed with acknowledgements: busy while the feed is SIGKILLed,
/// then up; every event indexed, the invalid one dead-lettered with HEC's text,
/// each envelope's time the change's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_splunk_feed_waits_for_acknowledgements_and_rides_out_a_busy_collector(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, topic) = published(&stack, "hec", EVENTS, 2).await?;
    let collector = Arc::new(Mutex::new(Collector {
        down: true,
        ..Collector::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = Router::new()
        .route("/services/collector/event", post(collect))
        .route("/services/collector/ack", post(acknowledge))
        .with_state(collector.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let dir = tempfile::tempdir()?;
    let transport = format!(
        "[siem.splunk]\nurl = {url:?}\ntoken = {HEC_TOKEN:?}\nindex = \"security\"\nuse_ack = true\nbatch_size = 100"
    );
    let config = write_config(dir.path(), &stack, (&prefix, &topic), "ecs", &transport)?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("siem.log");
    let busy = |c: &SharedCollector| c.lock().expect("collector lock").busy_answers;
    let service = start_service(&program, &config, &log)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while busy(&collector) < 2 {
        anyhow::ensure!(Instant::now() < deadline, "the feed never tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(service); // SIGKILL while the collector is busy
    let service = start_service(&program, &config, &log)?;
    collector.lock().expect("collector lock").down = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while (collector.lock().expect("collector lock").indexed.len() as u64) < EVENTS - 1 {
        anyhow::ensure!(Instant::now() < deadline, "not every event was indexed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(service)?;
    let collector = std::mem::take(&mut *collector.lock().expect("collector lock"));
    assert!(collector.malformed.is_empty(), "{:?}", collector.malformed);
    let expected: BTreeSet<String> = (0..EVENTS)
        .filter(|&n| n != POISONED)
        .map(|n| event(n).id.to_string())
        .collect();
    assert_eq!(
        collector.indexed.keys().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    for n in [0, 42, 199] {
        let time = collector.times[&event(n).id.to_string()];
        assert_eq!(
            (time * 1000.0).round() as i64,
            event(n).source.ts_ms,
            "the change's time"
        );
    }
    assert!(
        collector.polls.values().all(|&p| p >= 2),
        "delivered only once acknowledged"
    );
    let dead = read_to_end(
        &stack,
        &format!("{prefix}.dlq.siem"),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(dead.len(), 1, "only the invalid event");
    let reason = dead[0].header(dlq_headers::ERROR).unwrap_or_default();
    assert!(reason.contains("Invalid data format"), "{reason}");
    Ok(())
}
