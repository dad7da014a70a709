//! The CEF feed over syslog to a real rsyslog (TCP, and TLS with client
//! certificates). Every message rsyslog stored is parsed here as RFC 5424 with a
//! CEF message, independently of the code under test, and checked field by field.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use changewire_schemas::time::rfc3339;
use changewire_schemas::{ChangeEvent, Op, Origin};
use changewire_tests::certs::{TestCa, Usage};
use changewire_tests::servers::free_port;
use changewire_tests::syslog::{ReceiverTls, Rsyslog};
use changewire_tests::{workspace_binary, Stack};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::consumer::{publish_keyed, start_service, terminate};
use crate::siem::{event, published, write_config};

/// The feed's message size limit in these tests.
const LIMIT: usize = 2048;

/// One received message: RFC 5424 header fields and the CEF in it.
#[derive(Debug)]
struct Received {
    pri: u32,
    timestamp: String,
    app: String,
    header: Vec<String>,
    extension: BTreeMap<String, String>,
    raw: String,
}

/// Parses `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG` with a CEF MSG.
fn parse(line: &str) -> anyhow::Result<Received> {
    let rest = line
        .strip_prefix('<')
        .ok_or_else(|| anyhow::anyhow!("no PRI: {line}"))?;
    let (pri, rest) = rest
        .split_once(">1 ")
        .ok_or_else(|| anyhow::anyhow!("no version 1: {line}"))?;
    let fields: Vec<&str> = rest.splitn(7, ' ').collect();
    anyhow::ensure!(fields.len() == 7, "too few header fields: {line}");
    anyhow::ensure!(fields[3..6] == ["-", "-", "-"], "PROCID, MSGID, SD: {line}");
    let (header, extension) = parse_cef(fields[6])?;
    Ok(Received {
        pri: pri.parse()?,
        timestamp: fields[0].to_owned(),
        app: fields[2].to_owned(),
        header,
        extension,
        raw: line.to_owned(),
    })
}

/// The seven CEF header fields (unescaped) and the extension's pairs.
fn parse_cef(message: &str) -> anyhow::Result<(Vec<String>, BTreeMap<String, String>)> {
    let mut header = vec![String::new()];
    let mut chars = message.chars();
    while header.len() < 8 {
        match chars.next() {
            Some('\\') => header
                .last_mut()
                .expect("a field")
                .push(chars.next().unwrap_or('\\')),
            Some('|') => header.push(String::new()),
            Some(c) => header.last_mut().expect("a field").push(c),
            None => anyhow::bail!("a CEF header has 7 fields: {message}"),
        }
    }
    header.pop();
    anyhow::ensure!(header[0] == "CEF:0", "CEF version: {message}");
    Ok((header, parse_extension(chars.as_str())))
}

/// `key=value` pairs; a key is the word before an unescaped `=`.
fn parse_extension(text: &str) -> BTreeMap<String, String> {
    let mut pairs = BTreeMap::new();
    let mut key: Option<String> = None;
    let mut value = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => value.push('\n'),
                Some('r') => value.push('\r'),
                Some(other) => value.push(other),
                None => value.push('\\'),
            },
            '=' => {
                let split = value.rfind(' ');
                let next_key = split.map_or(value.clone(), |at| value[at + 1..].to_owned());
                if let Some(key) = key.take() {
                    pairs.insert(key, value[..split.unwrap_or(0)].to_owned());
                }
                key = Some(next_key);
                value.clear();
            }
            c => value.push(c),
        }
    }
    if let Some(key) = key {
        pairs.insert(key, value);
    }
    pairs
}

/// The received messages, once `expected` event ids are all among them.
async fn received_all(rsyslog: &Rsyslog, expected: usize) -> anyhow::Result<Vec<Received>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let messages = rsyslog.messages()?;
        let parsed = messages
            .iter()
            .map(|m| parse(m))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ids: std::collections::BTreeSet<&str> = parsed
            .iter()
            .filter_map(|m| m.extension.get("cs1").map(String::as_str))
            .collect();
        if ids.len() >= expected {
            return Ok(parsed);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {expected} events arrived; rsyslogd said: {}",
            ids.len(),
            rsyslog.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/health` on `port` until it answers 503 naming `text`.
async fn health_says(port: u16, text: &str, log: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
            let unhealthy = response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE;
            let body = response.text().await?;
            if unhealthy && body.contains(text) {
                return Ok(body);
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "/health never named {text:?}; the feed's log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Event `n` with a diff far longer than [`LIMIT`], full of characters CEF escapes.
fn oversized(n: u64) -> ChangeEvent {
    let mut event = event(n);
    let text = "key=value \\ path|pipe\n".repeat(400);
    event.diff =
        serde_json::from_value(json!([{"op": "add", "path": "/data/blob", "value": text}])).ok();
    event
}

/// Checks `message` against the event it names.
fn check(message: &Received, event: &ChangeEvent) -> anyhow::Result<()> {
    anyhow::ensure!(
        message.raw.len() <= LIMIT,
        "longer than the limit: {}",
        message.raw.len()
    );
    assert_eq!(message.pri, 16 * 8 + 5, "local0.notice");
    assert_eq!(message.app, "changewire");
    assert_eq!(message.timestamp, rfc3339(event.source.ts_ms));
    let Origin::Kubernetes(k8s) = &event.source.origin else {
        anyhow::bail!("a Kubernetes event");
    };
    let (verb, done) = match event.op {
        Op::Create => ("create", "created"),
        Op::Update => ("update", "updated"),
        _ => ("delete", "deleted"),
    };
    let severity = if ["Secret", "RoleBinding"].contains(&k8s.kind.as_str()) {
        "6"
    } else if event.op == Op::Delete {
        "5"
    } else {
        "3"
    };
    let expected_header = [
        "CEF:0".to_owned(),
        "changewire".into(),
        "changewire".into(),
        env!("CARGO_PKG_VERSION").into(),
        format!("kubernetes:{verb}"),
        format!("bob {done} {} edge/{}", k8s.kind, k8s.name),
        severity.into(),
    ];
    assert_eq!(message.header, expected_header);
    let field = |key: &str| message.extension.get(key).map(String::as_str);
    assert_eq!(field("rt"), Some(event.source.ts_ms.to_string().as_str()));
    assert_eq!(field("act"), Some(done));
    assert_eq!(field("suser"), Some("bob"));
    assert_eq!(field("src"), Some("192.0.2.4"));
    assert_eq!(
        (field("cs3Label"), field("cs4")),
        (Some("resource"), Some("prod"))
    );
    let diff = field("cs6").unwrap_or_default();
    if message.raw.ends_with("[truncated]") {
        assert!(diff.starts_with("[{\"op\":\"add\""), "the cut diff: {diff}");
    } else {
        let diff: Value = serde_json::from_str(diff)?;
        assert_eq!(Some(diff), event.diff.as_ref().map(|d| json!(d)));
    }
    Ok(())
}

/// Checks that every one of `events` arrived exactly once and as it should.
fn check_all(received: &[Received], events: &[ChangeEvent]) -> anyhow::Result<()> {
    let mut by_id = BTreeMap::<&str, Vec<&Received>>::new();
    for message in received {
        by_id
            .entry(message.extension.get("cs1").map_or("", String::as_str))
            .or_default()
            .push(message);
    }
    for event in events {
        let copies = by_id.get(event.id.as_str()).map_or(0, Vec::len);
        anyhow::ensure!(copies == 1, "{} arrived {copies} times", event.id);
        check(by_id[event.id.as_str()][0], event)?;
    }
    assert_eq!(received.len(), events.len(), "nothing else arrived");
    Ok(())
}

fn syslog_transport(port: u16, http_port: u16, tls: &str) -> String {
    format!(
        "[siem.syslog]\naddress = \"127.0.0.1:{port}\"\nmax_message_bytes = {LIMIT}\nbatch_size = 50\n{tls}\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\n"
    )
}

/// Over TCP: the receiver is down at first (the feed is SIGKILLed meanwhile),
/// then up, then SIGKILLed and back while more events come. Every event arrives
/// exactly once; the oversized one is cut to the limit with a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cef_feed_reaches_rsyslog_over_tcp_through_outages_and_a_sigkill() -> anyhow::Result<()>
{
    const FIRST: u64 = 200;
    let stack = Stack::from_env();
    let (prefix, topic) = published(&stack, "cef", FIRST, 2).await?;
    publish_keyed(
        &stack,
        &topic,
        vec![(b"big".to_vec(), serde_json::to_vec(&oversized(FIRST))?)],
    )
    .await?;
    let mut events: Vec<ChangeEvent> = (0..FIRST).map(event).chain([oversized(FIRST)]).collect();
    let mut rsyslog = Rsyslog::start(None)?;
    rsyslog.stop()?;
    let dir = tempfile::tempdir()?;
    let http_port = free_port()?;
    let transport = syslog_transport(rsyslog.tcp_port, http_port, "");
    let config = write_config(dir.path(), &stack, (&prefix, &topic), "cef", &transport)?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("siem.log");
    let service = start_service(&program, &config, &log)?;
    let body = health_says(http_port, "cannot connect", &log).await?;
    assert!(body.contains("sink feed"), "{body}");
    drop(service); // SIGKILL while the receiver is down
    let service = start_service(&program, &config, &log)?;
    rsyslog.resume()?;
    let received = received_all(&rsyslog, events.len()).await?;
    check_all(&received, &events)?;
    let cut = received
        .iter()
        .filter(|m| m.raw.ends_with("[truncated]"))
        .count();
    assert_eq!(cut, 1, "only the oversized event is cut");

    rsyslog.stop()?;
    let more: Vec<ChangeEvent> = (FIRST + 1..FIRST + 101).map(event).collect();
    let records = more
        .iter()
        .map(|e| Ok((e.id.as_str().as_bytes().to_vec(), serde_json::to_vec(e)?)));
    publish_keyed(&stack, &topic, records.collect::<anyhow::Result<_>>()?).await?;
    health_says(http_port, "cannot connect", &log).await?;
    rsyslog.resume()?;
    events.extend(more);
    let received = received_all(&rsyslog, events.len()).await?;
    let result = check_all(&received, &events);
    terminate(service)?;
    result
}

/// Over TLS with client certificates: a feed that does not trust the receiver's
/// CA, then one without a client certificate (the receiver hangs up after the
/// handshake), say so on `/health` and deliver nothing; with the right files
/// every event they held arrives, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cef_feed_uses_tls_client_certificates_and_reports_tls_failures() -> anyhow::Result<()>
{
    const EVENTS: u64 = 50;
    let stack = Stack::from_env();
    let (prefix, topic) = published(&stack, "ceftls", EVENTS, 1).await?;
    let certs = tempfile::tempdir()?;
    let ca = TestCa::new(certs.path())?;
    let (server_cert, server_key) = ca.issue("server", Usage::Server, certs.path())?;
    let (client_cert, client_key) = ca.issue("feed", Usage::Client, certs.path())?;
    let rogue_dir = tempfile::tempdir()?;
    let rogue = TestCa::new(rogue_dir.path())?;
    let rsyslog = Rsyslog::start(Some(ReceiverTls {
        ca: ca.cert.clone(),
        cert: server_cert,
        key: server_key,
    }))?;
    let tls_port = rsyslog.tls_port.expect("a TLS listener");
    let dir = tempfile::tempdir()?;
    let http_port = free_port()?;
    let program = workspace_binary("changewire-consumer")?;
    let log = dir.path().join("siem.log");
    let attempts = [
        (format!("[siem.syslog.tls]\nca_file = {:?}\n", rogue.cert), Some("TLS handshake with")),
        (format!("[siem.syslog.tls]\nca_file = {:?}\n", ca.cert), Some("closed the connection at once")),
        (
            format!(
                "[siem.syslog.tls]\nca_file = {:?}\ncert_file = {client_cert:?}\nkey_file = {client_key:?}\n",
                ca.cert
            ),
            None,
        ),
    ];
    for (tls, failure) in attempts {
        let transport = syslog_transport(tls_port, http_port, &tls);
        let config = write_config(dir.path(), &stack, (&prefix, &topic), "cef", &transport)?;
        let service = start_service(&program, &config, &log)?;
        if let Some(failure) = failure {
            health_says(http_port, failure, &log).await?;
            terminate(service)?;
            assert!(
                rsyslog.messages()?.is_empty(),
                "nothing arrived without trust both ways"
            );
            continue;
        }
        let received = received_all(&rsyslog, EVENTS as usize).await?;
        terminate(service)?;
        check_all(&received, &(0..EVENTS).map(event).collect::<Vec<_>>())?;
    }
    Ok(())
}
