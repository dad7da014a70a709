//! The forward service against a real HTTP receiver on loopback that checks every
//! Standard Webhooks signature, fails some first attempts, and records order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use changewire_consumer::runtime::dlq::headers as dlq_headers;
use changewire_schemas::{ChangeEvent, Op};
use changewire_tests::{create_topics, unique_name, workspace_binary, Stack, TestConsumer};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::consumer::{
    event, last_offsets, publish_keyed, start_service, terminate, wait_for_committed,
};

pub const KEY: &[u8] = b"forward-test-signing-key";
const EVENTS: u64 = 60;
const KEYS: u64 = 4;
/// Always answered 500: dead-lettered after the attempts run out.
const ALWAYS_500: u64 = 17;
/// Answered 400: dead-lettered at once.
const REJECTED: u64 = 23;
/// How long a 500 is retried before the event is dead-lettered.
const GIVE_UP_AFTER_S: u64 = 3;

/// What the receiver saw.
#[derive(Default)]
struct Receiver {
    attempts: HashMap<String, u32>,
    /// Event numbers accepted (200), in arrival order.
    accepted: Vec<u64>,
    bad_signatures: u32,
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Verifies the signature the way the Standard Webhooks libraries do.
pub fn signed(headers: &HeaderMap, body: &[u8]) -> bool {
    let (id, timestamp) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    let fresh = timestamp
        .parse::<u64>()
        .is_ok_and(|t| t.abs_diff(unix_now()) < 300);
    fresh
        && header(headers, "webhook-signature")
            .split(' ')
            .any(|s| s == expected)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

async fn hook(
    State(receiver): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut receiver = receiver.lock().expect("receiver lock");
    if !signed(&headers, &body) {
        receiver.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = serde_json::from_slice::<ChangeEvent>(&body) else {
        return StatusCode::UNPROCESSABLE_ENTITY;
    };
    let number = event.source.ts_ms as u64;
    let attempts = receiver.attempts.entry(event.id.to_string()).or_default();
    *attempts += 1;
    let first = *attempts == 1;
    match number {
        ALWAYS_500 => StatusCode::INTERNAL_SERVER_ERROR,
        REJECTED => StatusCode::BAD_REQUEST,
        n if n % 5 == 0 && first => StatusCode::INTERNAL_SERVER_ERROR,
        n => {
            receiver.accepted.push(n);
            StatusCode::OK
        }
    }
}

/// Every event arrives signed; a first-attempt 500 is retried; per key the order
/// is the publishing order; an endpoint that always fails or rejects sends the
/// event to the DLQ with the status, and the events after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_posts_signed_events_in_key_order_with_retries_and_dlq() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let receiver = Arc::new(Mutex::new(Receiver::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (prefix, topic) = (unique_name("fwd"), unique_name("input"));
    create_topics(&stack, &[&topic], 2).await?;
    let codec = changewire_schemas::Codec::json()?;
    // The event's number rides in source.ts_ms so the receiver can tell them apart.
    let records = (0..EVENTS)
        .map(|n| {
            let mut event = event(n, Op::Create);
            event.source.ts_ms = n as i64;
            Ok((
                format!("key-{}", n % KEYS).into_bytes(),
                codec.encode(&event)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let last = last_offsets(&publish_keyed(&stack, &topic, records).await?);

    let dir = tempfile::tempdir()?;
    let group = unique_name("forward");
    let file = dir.path().join("forward.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
             [service]\nname = \"forward\"\ngroup_id = {group:?}\nsubscribe = [{topic:?}]\n\
             state_dir = {state:?}\ngive_up_after_s = {GIVE_UP_AFTER_S}\n\
             [forward]\nurl = {url:?}\nsecret = \"whsec_{secret}\"\n",
            brokers = stack.kafka_brokers,
            state = dir.path().join("state"),
            secret = STANDARD.encode(KEY),
        ),
    )?;
    let service = start_service(
        &workspace_binary("changewire-consumer")?,
        &file,
        &dir.path().join("forward.log"),
    )?;
    if let Err(error) = wait_for_committed(&stack, &group, &topic, &last).await {
        let log = std::fs::read_to_string(dir.path().join("forward.log"))?;
        anyhow::bail!("{error:#}\nservice log:\n{log}");
    }
    assert!(terminate(service)?.success(), "clean exit on SIGTERM");

    let seen = std::mem::take(&mut *receiver.lock().expect("receiver lock"));
    let receiver = seen;
    assert_eq!(receiver.bad_signatures, 0, "every request correctly signed");
    let mut accepted = receiver.accepted.clone();
    for key in 0..KEYS {
        let order: Vec<u64> = accepted
            .iter()
            .copied()
            .filter(|n| n % KEYS == key)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "key-{key} arrived in publishing order");
    }
    accepted.sort_unstable();
    let expected: Vec<u64> = (0..EVENTS)
        .filter(|n| ![ALWAYS_500, REJECTED].contains(n))
        .collect();
    assert_eq!(
        accepted, expected,
        "every other event accepted exactly once"
    );
    let attempts = |n: u64| {
        receiver
            .attempts
            .get(&event(n, Op::Create).id.to_string())
            .copied()
    };
    assert_eq!(attempts(10), Some(2), "a first-attempt 500 is retried once");
    // Waits of 0.1, 0.2, 0.4, 0.8 and 1.6 s fit in 3 s; the attempt after them
    // gives up.
    assert!(
        attempts(ALWAYS_500).is_some_and(|n| (5..=8).contains(&n)),
        "retried with backoff for give_up_after_s: {:?}",
        attempts(ALWAYS_500)
    );
    assert_eq!(attempts(REJECTED), Some(1), "a 400 is not retried");

    let dead = TestConsumer::from_beginning(&stack, &format!("{prefix}.dlq.forward"))?
        .read_exactly(2, Duration::from_secs(30))
        .await?;
    let reasons: Vec<String> = dead
        .iter()
        .filter_map(|r| r.header(dlq_headers::ERROR))
        .collect();
    // The two may come from different partitions, so in either order.
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("gave up after 3s") && r.contains("500")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("rejected") && r.contains("400")),
        "{reasons:?}"
    );
    Ok(())
}
