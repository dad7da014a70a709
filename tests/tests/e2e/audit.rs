//! The audit service against the real broker, run as its binary: every event logged
//! once, queries over HTTP (auth, paging, bad input), proofs checked by an RFC 9162
//! verifier written here (not the service's), SIGKILL during ingest, and tampering
//! with the store found and located.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use changewire_consumer::runtime::Store;
use changewire_consumer::services::audit::log::{
    leaves_key, node_key, page_of, pages, push_record, records, stored_page, BLOCK_LEVEL, SIZE,
};
use changewire_consumer::services::audit::merkle::{
    appended, consistency_proof, inclusion_proof, leaf_hash, root, Nodes,
};
use changewire_consumer::services::audit::pages::{committed_end, Pages, DIR};
use changewire_consumer::services::audit::runs::Runs;
use changewire_consumer::services::audit::verify::{verify, Problem};
use changewire_schemas::{fixtures, ActorVia, ChangeEvent, EventId, Op, Origin};
use changewire_tests::servers::free_port;
use changewire_tests::{create_topics, unique_name, workspace_binary, Stack};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::consumer::{publish_keyed, start_service, terminate, KillOnDrop, RESUME_REWIND};

const SEED: [u8; 32] = [7; 32];
const READER: &str = "reader-token";
const ADMIN: &str = "admin-token";

/// One audit service process with its API.
struct Audit {
    process: Option<KillOnDrop>,
    base: String,
    http: reqwest::Client,
    log: PathBuf,
}

/// Writes the service's config; returns its path.
fn write_config(
    dir: &Path,
    stack: &Stack,
    (prefix, topic): (&str, &str),
    port: u16,
    extra: &str,
) -> PathBuf {
    let path = dir.join("audit.toml");
    let text = format!(
        "[kafka]\nbrokers = {brokers:?}\n[topics]\nprefix = {prefix:?}\n\
         [service]\nname = \"audit\"\nsubscribe = [{topic:?}]\nstate_dir = {state:?}\n\
         assignment = \"static\"\ntick_interval_ms = 200\nresume_rewind = {RESUME_REWIND}\n\
         [audit]\nsigning_key = {key:?}\nlisten = \"127.0.0.1:{port}\"\n\
         read_tokens = [{READER:?}]\nadmin_tokens = [{ADMIN:?}]\nmax_page = 500\n{extra}\n",
        brokers = stack.kafka_brokers,
        state = dir.join("state"),
        key = BASE64.encode(SEED),
    );
    std::fs::write(&path, text).expect("write the config");
    path
}

impl Audit {
    fn start(config: &Path, port: u16, log: &Path) -> anyhow::Result<Self> {
        let process = start_service(&workspace_binary("changewire-consumer")?, config, log)?;
        Ok(Self {
            process: Some(process),
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            log: log.to_owned(),
        })
    }

    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn read(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(path, Some(READER)).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(body)
    }

    /// Waits until a signed head covers `size` entries; returns the heads document.
    async fn wait_for_head(&self, size: u64) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, heads)) = self.get("/v1/heads", Some(READER)).await {
                let signed = heads["heads"].as_array().into_iter().flatten();
                if signed.filter_map(|h| h["size"].as_u64()).any(|s| s == size) {
                    return Ok(heads);
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                anyhow::bail!("no signed head of size {size} within 60 s; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.take() {
            terminate(process)?;
        }
        Ok(())
    }
}

/// A Kubernetes change of `name` in `namespace`, by `actor`, `n`-th of its kind.
fn k8s_event(n: u64, name: &str, actor: &str, op: Op, diff: Value) -> ChangeEvent {
    let mut event = fixtures::kubernetes_create("k8s");
    event.id = EventId::kubernetes("k8s", &format!("uid-{name}"), &n.to_string());
    event.op = op;
    event.source.ts_ms = 1_700_000_000_000 + n as i64;
    if let Origin::Kubernetes(k8s) = &mut event.source.origin {
        k8s.namespace = Some("prod".into());
        k8s.name = name.into();
        k8s.resource_version = n.to_string();
    }
    if let Some(a) = event.actor.as_mut() {
        a.name = actor.into();
        a.via = ActorVia::Audit;
    }
    event.diff = Some(diff);
    event
}

/// The test's events: updates of three RateLimits by alice and bob, every third
/// one touching `spec.auth`.
fn events(first: u64, count: u64) -> Vec<ChangeEvent> {
    (first..first + count)
        .map(|n| {
            let name = ["api", "web", "admin"][(n % 3) as usize];
            let actor = if n % 2 == 0 { "alice" } else { "bob" };
            let diff = if n % 3 == 0 {
                json!([{"op": "replace", "path": "/spec/auth/mode", "value": "none"}])
            } else {
                json!([{"op": "replace", "path": "/spec/rps", "value": n}])
            };
            k8s_event(n, name, actor, Op::Update, diff)
        })
        .collect()
}

async fn publish(stack: &Stack, topic: &str, events: &[ChangeEvent]) -> anyhow::Result<()> {
    let records = events
        .iter()
        .map(|e| Ok((e.id.to_string().into_bytes(), serde_json::to_vec(e)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    publish_keyed(stack, topic, records).await?;
    Ok(())
}

/// Every page of `query`, following cursors; the events' ids in order.
async fn all_pages(audit: &Audit, query: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?{query}&cursor={c}"),
            None => format!("/v1/events?{query}"),
        };
        let page = audit.read(&path).await?;
        let found = page["events"].as_array().cloned().unwrap_or_default();
        ids.extend(
            found
                .iter()
                .filter_map(|f| f["event"]["id"].as_str().map(str::to_owned)),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(ids),
        }
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn unhex(text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

/// RFC 9162 2.1.3.2: the root an inclusion proof leads to.
fn root_from_inclusion(
    index: u64,
    size: u64,
    leaf: [u8; 32],
    path: &[[u8; 32]],
) -> Option<[u8; 32]> {
    let (mut fnode, mut snode, mut r) = (index, size - 1, leaf);
    for p in path {
        if snode == 0 {
            return None;
        }
        if fnode % 2 == 1 || fnode == snode {
            r = sha256(&[&[1], p, &r]);
            while fnode % 2 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = sha256(&[&[1], &r, p]);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    (snode == 0).then_some(r)
}

/// RFC 9162 2.1.4.2: whether a consistency proof links the two roots.
fn consistent(
    old: u64,
    new: u64,
    old_root: [u8; 32],
    new_root: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    let mut path = proof.to_vec();
    if old.is_power_of_two() {
        path.insert(0, old_root);
    }
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode % 2 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode % 2 == 1 || fnode == snode {
            fr = sha256(&[&[1], c, &fr]);
            sr = sha256(&[&[1], c, &sr]);
            while fnode % 2 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = sha256(&[&[1], &sr, c]);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == old_root && sr == new_root
}

/// Checks a head's signature as documented: ed25519 over the context string, the
/// size, the root and the time.
fn signed(head: &Value, key: &VerifyingKey) -> bool {
    let size = head["size"].as_u64().unwrap_or_default();
    let time = head["timestamp_ms"].as_u64().unwrap_or_default();
    let root = unhex(head["root"].as_str().unwrap_or_default());
    let message = [
        &b"changewire-audit-tree-head-v1\0"[..],
        &size.to_be_bytes(),
        &root,
        &time.to_be_bytes(),
    ]
    .concat();
    let signature = BASE64.decode(head["signature"].as_str().unwrap_or_default());
    let signature = signature.ok().and_then(|s| Signature::from_slice(&s).ok());
    signature.is_some_and(|s| key.verify(&message, &s).is_ok())
}

/// A topic, a state directory, a port and the config of one test's service.
struct Setup {
    stack: Stack,
    topic: String,
    dir: tempfile::TempDir,
    port: u16,
    config: PathBuf,
}

async fn setup(name: &str, partitions: i32, extra: &str) -> anyhow::Result<Setup> {
    let stack = Stack::from_env();
    let prefix = unique_name(name);
    let topic = format!("{prefix}.k8s.policy.RateLimit");
    create_topics(&stack, &[&topic], partitions).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = write_config(dir.path(), &stack, (&prefix, &topic), port, extra);
    Ok(Setup {
        stack,
        topic,
        dir,
        port,
        config,
    })
}

impl Setup {
    fn start(&self) -> anyhow::Result<Audit> {
        Audit::start(&self.config, self.port, &self.dir.path().join("audit.log"))
    }
}

/// The root a signed head of `size` carries.
fn head_root(heads: &[Value], size: u64) -> [u8; 32] {
    let head = heads.iter().find(|h| h["size"].as_u64() == Some(size));
    unhex(head.and_then(|h| h["root"].as_str()).unwrap_or_default())
}

fn hashes(value: &Value) -> Vec<[u8; 32]> {
    let items = value.as_array().into_iter().flatten();
    items.filter_map(|h| h.as_str()).map(unhex).collect()
}

/// 150 events (10 of them published twice) in two rounds: each logged once; the
/// API answers queries, pages, history and proofs; bad input is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_logged_once_and_answers_come_with_proofs() -> anyhow::Result<()> {
    let setup = setup("au", 2, "").await?;
    let (stack, topic) = (&setup.stack, &setup.topic);
    let first = events(0, 100);
    publish(stack, topic, &first).await?;
    let audit = setup.start()?;
    audit.wait_for_head(100).await?;
    let second = events(100, 50);
    publish(stack, topic, &second).await?;
    publish(stack, topic, &first[..10]).await?;
    let heads = audit.wait_for_head(150).await?;
    let all: Vec<ChangeEvent> = first.into_iter().chain(second).collect();

    check_auth(&audit).await?;
    check_queries(&audit, &all).await?;
    check_bad_input(&audit).await?;
    check_proofs(&audit, &heads, &all).await?;
    check_openapi(&audit).await?;
    check_terminal(&audit)?;
    audit.stop()
}

/// Runs `changewire-consumer audit ...`; its exit status and standard output.
fn tool(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let output = std::process::Command::new(workspace_binary("changewire-consumer")?)
        .arg("audit")
        .args(args)
        .env_remove("CHANGEWIRE_AUDIT_TOKEN")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    Ok((
        output.status.code().unwrap_or(-1),
        format!("{stdout}{stderr}"),
    ))
}

/// The terminal tools answer from the running service.
fn check_terminal(audit: &Audit) -> anyhow::Result<()> {
    let remote = ["--url", audit.base.as_str(), "--token", READER];
    let (status, table) = tool(
        &[
            &["query"][..],
            &remote,
            &["--actor", "alice", "--limit", "5"],
        ]
        .concat(),
    )?;
    assert_eq!(status, 0, "{table}");
    let rows: Vec<&str> = table.lines().filter(|l| l.contains(" alice ")).collect();
    assert_eq!(rows.len(), 5, "{table}");
    assert!(
        rows.iter()
            .all(|r| r.contains("k8s:policy.example.com/RateLimit/prod/")),
        "{table}"
    );
    let (status, history) = tool(
        &[
            &["history"][..],
            &remote,
            &["k8s", "policy.example.com/RateLimit", "prod", "api"],
        ]
        .concat(),
    )?;
    assert_eq!(status, 0, "{history}");
    assert!(
        history
            .lines()
            .any(|l| l.trim_start().starts_with("~ /spec/auth/mode")),
        "{history}"
    );
    let (status, verdict) = tool(&["verify", "--url", &audit.base, "--token", ADMIN])?;
    assert_eq!(status, 0, "{verdict}");
    assert!(
        verdict.contains("intact: every entry matches every signed head"),
        "{verdict}"
    );
    let (status, refused) = tool(&["verify", "--url", &audit.base, "--token", READER])?;
    assert_eq!(status, 1, "a read token cannot verify: {refused}");
    Ok(())
}

async fn check_auth(audit: &Audit) -> anyhow::Result<()> {
    assert_eq!(audit.get("/v1/events", None).await?.0, 401, "no token");
    assert_eq!(
        audit.get("/v1/events", Some("nope")).await?.0,
        401,
        "unknown token"
    );
    let url = format!("{}/v1/verify", audit.base);
    let as_reader = audit.http.post(&url).bearer_auth(READER).send().await?;
    assert_eq!(as_reader.status(), 403, "verify needs an admin token");
    let report: Value = audit
        .http
        .post(&url)
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["report"]["size"], 150, "each event once: {report}");
    Ok(())
}

async fn check_queries(audit: &Audit, all: &[ChangeEvent]) -> anyhow::Result<()> {
    let ids_where = |keep: &dyn Fn(&ChangeEvent) -> bool| -> BTreeSet<String> {
        all.iter()
            .filter(|e| keep(e))
            .map(|e| e.id.to_string())
            .collect()
    };
    let alice = all_pages(audit, "actor=alice&limit=7").await?;
    let unique: BTreeSet<String> = alice.iter().cloned().collect();
    assert_eq!(unique.len(), alice.len(), "no event on two pages");
    let by_alice = |e: &ChangeEvent| e.actor.as_ref().is_some_and(|a| a.name == "alice");
    assert_eq!(unique, ids_where(&by_alice));
    let times: Vec<i64> = alice
        .iter()
        .filter_map(|id| all.iter().find(|e| e.id.as_str() == id))
        .map(|e| e.source.ts_ms)
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");

    let auth = all_pages(audit, "changed=spec.auth.*&limit=500").await?;
    let touches_auth = |e: &ChangeEvent| {
        e.diff
            .as_ref()
            .is_some_and(|d| d.to_string().contains("/spec/auth"))
    };
    assert_eq!(
        auth.into_iter().collect::<BTreeSet<_>>(),
        ids_where(&touches_auth)
    );

    let window = all_pages(audit, "from=1700000000010&to=1700000000020&order=oldest").await?;
    assert_eq!(window.len(), 10, "a half-open time range: {window:?}");

    let history = audit
        .read("/v1/resources/k8s/policy.example.com%2FRateLimit/prod/api/history?limit=500")
        .await?;
    let versions = history["events"].as_array().map_or(0, Vec::len);
    let of_api =
        |e: &ChangeEvent| matches!(&e.source.origin, Origin::Kubernetes(k) if k.name == "api");
    assert_eq!(
        versions,
        ids_where(&of_api).len(),
        "every version of one resource"
    );
    Ok(())
}

async fn check_bad_input(audit: &Audit) -> anyhow::Result<()> {
    for (query, parameter) in [
        ("limit=1000000", "limit"),
        ("limit=0", "limit"),
        ("op=x", "op"),
        ("from=yesterday", "from"),
        ("order=sideways", "order"),
        ("cursor=not-a-cursor", "cursor"),
    ] {
        let (status, body) = audit
            .get(&format!("/v1/events?{query}"), Some(READER))
            .await?;
        assert_eq!(
            (status, body["parameter"].as_str()),
            (400, Some(parameter)),
            "{query}: {body}"
        );
    }
    let (status, body) = audit.get("/v1/events?colour=red", Some(READER)).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("colour"),
        "{body}"
    );
    // A real cursor, altered or used with other filters, is refused.
    let page = audit.read("/v1/events?actor=alice&limit=2").await?;
    let cursor = page["next_cursor"].as_str().unwrap_or_default().to_owned();
    let mut altered = cursor.clone().into_bytes();
    altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
    for query in [
        format!("actor=alice&limit=2&cursor={}", String::from_utf8(altered)?),
        format!("actor=bob&limit=2&cursor={cursor}"),
    ] {
        let (status, body) = audit
            .get(&format!("/v1/events?{query}"), Some(READER))
            .await?;
        assert_eq!(
            (status, body["parameter"].as_str()),
            (400, Some("cursor")),
            "{body}"
        );
    }
    for value in [
        "%27%20OR%20%271%27%3D%271",
        "..%2F..%2Fetc%2Fpasswd",
        "%00",
        "%E2%80%AE",
    ] {
        let found = audit
            .read(&format!("/v1/events?name={value}&actor={value}"))
            .await?;
        assert_eq!(found["events"], json!([]), "{value}");
    }
    Ok(())
}

async fn check_proofs(audit: &Audit, heads: &Value, all: &[ChangeEvent]) -> anyhow::Result<()> {
    let key = VerifyingKey::from_bytes(&unhex(heads["public_key"].as_str().unwrap_or_default()))?;
    let signed_heads = heads["heads"].as_array().cloned().unwrap_or_default();
    assert!(
        signed_heads.iter().all(|h| signed(h, &key)),
        "{signed_heads:?}"
    );
    let event = &all[42];
    let body = audit
        .read(&format!("/v1/events/{}?proof=true", event.id))
        .await?;
    let proof = &body["proof"];
    let entry = BASE64.decode(proof["entry"].as_str().unwrap_or_default())?;
    assert!(
        entry.ends_with(&serde_json::to_vec(event)?),
        "the entry holds the record as published"
    );
    let (index, size) = (
        proof["index"].as_u64().unwrap_or(0),
        proof["tree_size"].as_u64().unwrap_or(0),
    );
    let root = root_from_inclusion(
        index,
        size,
        sha256(&[&[0], &entry]),
        &hashes(&proof["path"]),
    );
    let head = &proof["head"];
    assert_eq!(
        head["size"].as_u64(),
        Some(size),
        "the proof is against a signed head"
    );
    assert_eq!(root, Some(unhex(head["root"].as_str().unwrap_or_default())));

    let sizes: Vec<u64> = signed_heads
        .iter()
        .filter_map(|h| h["size"].as_u64())
        .collect();
    let (old, new) = (sizes[0], *sizes.last().unwrap_or(&0));
    assert!(old < new, "two heads at least: {sizes:?}");
    let body = audit
        .read(&format!("/v1/proof/consistency?from={old}&to={new}"))
        .await?;
    let root_of = |size: u64| head_root(&signed_heads, size);
    assert!(
        consistent(
            old,
            new,
            root_of(old),
            root_of(new),
            &hashes(&body["proof"])
        ),
        "{body}"
    );
    let (status, _) = audit
        .get(
            &format!("/v1/proof/consistency?from={new}&to={old}"),
            Some(READER),
        )
        .await?;
    assert_eq!(status, 400);
    Ok(())
}

async fn check_openapi(audit: &Audit) -> anyhow::Result<()> {
    let (status, served) = audit.get("/openapi.json", None).await?;
    assert_eq!(status, 200);
    let checked_in: Value =
        serde_json::from_str(changewire_consumer::services::audit::api::OPENAPI)?;
    assert_eq!(served, checked_in);
    let paths = served["paths"].as_object().cloned().unwrap_or_default();
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served_paths: BTreeSet<&str> = changewire_consumer::services::audit::api::PATHS
        .iter()
        .copied()
        .collect();
    assert_eq!(documented, served_paths);
    let samples = HashMap::from([
        ("{id}", "none"),
        ("{source}", "k8s"),
        ("{kind}", "core%2FConfigMap"),
        ("{namespace}", "-"),
        ("{name}", "x"),
    ]);
    for (path, operations) in &paths {
        let concrete = samples
            .iter()
            .fold(path.clone(), |p, (k, v)| p.replace(k, v));
        for method in operations.as_object().into_iter().flat_map(|o| o.keys()) {
            let url = format!("{}{concrete}", audit.base);
            let request = match method.as_str() {
                "post" => audit.http.post(url),
                _ => audit.http.get(url),
            };
            let response = request.bearer_auth(ADMIN).send().await?;
            let status = response.status().as_u16();
            // A 404 only as the documented JSON "no such event", never "no such route".
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(
                status != 404 || body.get("error").is_some(),
                "{method} {path}: {status}"
            );
        }
    }
    let events = &paths["/v1/events"]["get"]["parameters"];
    let names: BTreeSet<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let accepted: BTreeSet<&str> = changewire_consumer::services::audit::api::EVENT_PARAMETERS
        .iter()
        .copied()
        .collect();
    assert_eq!(
        names, accepted,
        "documented parameters are the accepted ones"
    );
    Ok(())
}

/// SIGKILL twice while 3,000 events stream in: each event is logged exactly once,
/// the log verifies, and the index (its runs merged meanwhile, some merges cut
/// short) lists each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_audit_service_logs_each_event_once() -> anyhow::Result<()> {
    const EVENTS: u64 = 3000;
    let setup = setup("auk", 2, "").await?;
    // Batches of 50: the index's runs merge (sixteen at a time) while it is killed.
    let config = std::fs::read_to_string(&setup.config)?;
    std::fs::write(
        &setup.config,
        config.replace("[service]\n", "[service]\nmax_batch = 50\n"),
    )?;
    let (stack, topic) = (&setup.stack, &setup.topic);
    publish(stack, topic, &events(0, EVENTS)).await?;
    for _ in 0..2 {
        let audit = setup.start()?;
        wait_for_some_heads(&audit).await?;
        drop(audit); // SIGKILL mid-ingest
    }
    let audit = setup.start()?;
    audit.wait_for_head(EVENTS).await?;
    let listed = all_pages(&audit, "limit=500").await?;
    let distinct: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(
        (listed.len(), distinct.len()),
        (EVENTS as usize, EVENTS as usize),
        "the time index lists each event once"
    );
    audit.stop()?;
    let store = Store::open(&setup.dir.path().join("state"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&SEED).verifying_key();
    let report = verify(&store, &key)?;
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.size, EVENTS, "each event exactly once");
    let runs = Runs::load(&|k: &[u8]| store.get(k))?;
    assert!(runs.runs.len() < (EVENTS / 50) as usize, "merged: {runs:?}");
    Ok(())
}

/// A store written in an older layout (pages inside sled) is refused at start,
/// with what to do, instead of being misread as a tampered log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_an_older_layout_is_refused_with_what_to_do() -> anyhow::Result<()> {
    let setup = setup("aul", 1, "").await?;
    let store = Store::open(&setup.dir.path().join("state"))?;
    store.put_state(b"audit/layout", Some(b"3"))?;
    drop(store);
    let mut audit = setup.start()?;
    let child = &mut audit.process.as_mut().expect("started").0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        anyhow::ensure!(Instant::now() < deadline, "still running after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&audit.log)?;
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("older layout") && log.contains("move its state directory aside"),
        "{log}"
    );
    Ok(())
}

/// Waits for a signed head of a size below everything (ingest under way).
async fn wait_for_some_heads(audit: &Audit) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok((200, heads)) = audit.get("/v1/heads", Some(READER)).await {
            if heads["heads"].as_array().is_some_and(|h| !h.is_empty()) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no head signed within 60 s")
}

/// Tampering with a stopped service's store, each way on a copy of it, is found
/// and located: a changed byte, a deleted entry, two swapped entries, a cut tail,
/// a segment file of pages cut short, and a changed entry whose hashes were rewritten to match (only the signed heads
/// can tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_the_store_is_found_and_located() -> anyhow::Result<()> {
    let setup = setup("aut", 1, "").await?;
    let (stack, topic) = (&setup.stack, &setup.topic);
    publish(stack, topic, &events(0, 50)).await?;
    let audit = setup.start()?;
    audit.wait_for_head(50).await?;
    audit.stop()?;
    let key = ed25519_dalek::SigningKey::from_bytes(&SEED).verifying_key();
    let original = setup.dir.path().join("state");

    let changed_byte = tampered(&original, |store| flip_last_byte(store, 10))?;
    assert!(matches!(
        first_problem(&changed_byte, &key)?,
        Problem::Altered { index: 10, .. }
    ));

    let deleted = tampered(&original, |store| {
        edit_page(store, 20, |entries| entries.retain(|(at, _)| *at != 20))
    })?;
    assert_eq!(
        first_problem(&deleted, &key)?,
        Problem::Missing { index: 20 }
    );

    // The first two entries of the first page.
    let swapped = tampered(&original, |store| {
        edit_page(store, 0, |entries| entries.swap(0, 1))
    })?;
    let problem = first_problem(&swapped, &key)?;
    assert!(
        matches!(
            problem,
            Problem::Moved {
                index: 0,
                logged_at: 1,
                ..
            }
        ),
        "{problem:?}"
    );

    let cut = tampered(&original, |store| {
        for (first, _) in pages(store, 0, 64)? {
            edit_page(store, first, |entries| entries.retain(|(at, _)| *at < 40))?;
        }
        store.put_state(SIZE, Some(&40u64.to_be_bytes()))
    })?;
    let problem = first_problem(&cut, &key)?;
    assert!(
        matches!(problem, Problem::Truncated { stored: 40, .. }),
        "{problem:?}"
    );

    // The pages' segment file short of its last byte: the last page is missing.
    let last_page = {
        let store = Store::open(&original)?;
        let stored = pages(&store, 0, 50)?;
        stored.last().map_or(0, |(first, _)| *first)
    };
    let cut_file = tampered(&original, |_| Ok(()))?;
    let segment = only_segment_file(&cut_file)?;
    let length = std::fs::metadata(&segment)?.len();
    (std::fs::OpenOptions::new().write(true).open(&segment)?).set_len(length - 1)?;
    assert_eq!(
        first_problem(&cut_file, &key)?,
        Problem::Missing { index: last_page }
    );

    let rehashed = tampered(&original, |store| {
        flip_last_byte(store, 10)?;
        rewrite_hashes(store, 50)
    })?;
    // Only a head signed before entry 10 came in may still match.
    let problem = first_problem(&rehashed, &key)?;
    assert!(
        matches!(problem, Problem::HeadMismatch { after, .. } if after <= 10),
        "{problem:?}"
    );
    assert!(
        verify(&Store::open(&original)?, &key)?.is_intact(),
        "the original is intact"
    );
    let config = setup.config.to_str().unwrap_or_default();
    let (status, verdict) = tool(&["verify", "--config", config])?;
    assert_eq!(status, 0, "{verdict}");
    tampered_in_place(&original)?;
    let (status, verdict) = tool(&["verify", "--config", config])?;
    assert_eq!(status, 1, "{verdict}");
    assert!(
        verdict.contains("NOT INTACT") && verdict.contains("\"index\":3"),
        "{verdict}"
    );
    Ok(())
}

/// The one segment file of pages of the store at `path`.
fn only_segment_file(path: &Path) -> anyhow::Result<PathBuf> {
    let files: Vec<PathBuf> = (std::fs::read_dir(path.join(DIR))?)
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(files.len() == 1, "one segment file: {files:?}");
    Ok(files[0].clone())
}

/// Changes a byte of entry 3 of the store at `path` itself.
fn tampered_in_place(path: &Path) -> anyhow::Result<()> {
    flip_last_byte(&Store::open(path)?, 3)?;
    Ok(())
}

type StoreResult = Result<(), changewire_consumer::runtime::StoreError>;

/// Rewrites the stored entries of the page holding `index` (as `(log index,
/// entry)`), changed by `change`.
fn edit_page(
    store: &Store,
    index: u64,
    change: impl FnOnce(&mut Vec<(u64, Vec<u8>)>),
) -> StoreResult {
    let (first, stored) = page_of(store, index)?.unwrap_or_default();
    let mut entries: Vec<(u64, Vec<u8>)> =
        records(&stored).map(|(at, v)| (at, v.to_vec())).collect();
    change(&mut entries);
    let mut value = Vec::new();
    for (at, entry) in &entries {
        push_record(&mut value, *at, entry);
    }
    // Written where the next page would go, and pointed at, as an attacker
    // with the disk would.
    let end = committed_end(store)?;
    for (key, value) in Pages::of(store).write(end, &[(first, stored_page(&value))])? {
        store.put_state(&key, Some(&value))?;
    }
    Ok(())
}

/// Changes the last byte of the entry at `index`.
fn flip_last_byte(store: &Store, index: u64) -> StoreResult {
    edit_page(store, index, |entries| {
        for (at, entry) in entries.iter_mut().filter(|(at, _)| *at == index) {
            let _ = at;
            *entry.last_mut().expect("an entry") ^= 1;
        }
    })
}

/// A copy of the store at `original`, changed by `change`.
fn tampered(
    original: &Path,
    change: impl FnOnce(&Store) -> Result<(), changewire_consumer::runtime::StoreError>,
) -> anyhow::Result<PathBuf> {
    let copy = original.with_file_name(unique_name("tampered"));
    copy_dir(original, &copy)?;
    let store = Store::open(&copy)?;
    change(&store)?;
    Ok(copy)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn first_problem(store: &Path, key: &VerifyingKey) -> anyhow::Result<Problem> {
    let report = verify(&Store::open(store)?, key)?;
    report
        .problems
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("nothing found: {report:?}"))
}

/// What an attacker with the disk but not the key would do: recompute every
/// stored hash from the entries.
fn rewrite_hashes(store: &Store, size: u64) -> StoreResult {
    let block = 1 << BLOCK_LEVEL;
    let mut nodes: HashMap<(u32, u64), [u8; 32]> = HashMap::new();
    let mut leaves: Vec<u8> = Vec::new();
    for (_, stored) in pages(store, 0, size)? {
        for (index, entry) in records(&stored) {
            let leaf = leaf_hash(entry);
            leaves.extend_from_slice(&leaf);
            let completed = appended(index, leaf, |level, i| {
                Ok::<_, std::convert::Infallible>(nodes[&(level, i)])
            })
            .expect("infallible");
            for (level, position, hash) in completed {
                nodes.insert((level, position), hash);
                if level >= BLOCK_LEVEL {
                    store.put_state(&node_key(level, position), Some(&hash))?;
                }
            }
        }
    }
    for (n, hashes) in leaves.chunks(32 * block as usize).enumerate() {
        store.put_state(&leaves_key(n as u64), Some(hashes))?;
    }
    Ok(())
}

/// Records that are not events, and an event without an id, are quarantined
/// with why (the log goes on); with `max_entries`, the oldest entries are pruned
/// while their hashes keep proving: the log verifies, and a consistency proof
/// from inside the pruned range still links two signed heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_quarantined_and_pruning_keeps_the_proofs() -> anyhow::Result<()> {
    // Entries are pruned a block (256) at a time: keeping 40 of 300 prunes one.
    let setup = setup("auq", 1, "max_entries = 40").await?;
    let (stack, topic) = (&setup.stack, &setup.topic);
    let audit = setup.start()?;
    let all = events(0, 300);
    publish(stack, topic, &all[..5]).await?;
    audit.wait_for_head(5).await?;
    let mut nameless = all[5].clone();
    nameless.id = EventId::from(String::new());
    let garbage = vec![
        (b"g1".to_vec(), b"not json".to_vec()),
        (b"g2".to_vec(), b"{\"id\": 1}".to_vec()),
        (b"g3".to_vec(), serde_json::to_vec(&nameless)?),
    ];
    publish_keyed(stack, topic, garbage).await?;
    publish(stack, topic, &all[5..]).await?;
    let heads = audit.wait_for_head(300).await?;

    let quarantine = audit.read("/v1/quarantine").await?;
    let reasons: Vec<&str> = quarantine["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 3, "{quarantine}");
    assert!(
        reasons.iter().any(|r| r.contains("lacks an id")),
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("undecodable"))
            .count(),
        2,
        "{reasons:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let url = format!("{}/v1/verify", audit.base);
        let body: Value = audit
            .http
            .post(&url)
            .bearer_auth(ADMIN)
            .send()
            .await?
            .json()
            .await?;
        if body["report"]["pruned"] == 256 || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(
        (
            report["report"]["pruned"].as_u64(),
            report["report"]["size"].as_u64()
        ),
        (Some(256), Some(300))
    );
    let kept = all_pages(&audit, "limit=500").await?;
    let newest: BTreeSet<String> = all[256..].iter().map(|e| e.id.to_string()).collect();
    assert_eq!(
        kept.into_iter().collect::<BTreeSet<_>>(),
        newest,
        "the first block is pruned, the rest kept"
    );
    let (status, _) = audit
        .get(&format!("/v1/events/{}", all[0].id), Some(READER))
        .await?;
    assert_eq!(status, 404, "a pruned event is gone");

    let signed_heads = heads["heads"].as_array().cloned().unwrap_or_default();
    let root_of = |size: u64| head_root(&signed_heads, size);
    let body = audit.read("/v1/proof/consistency?from=5&to=300").await?;
    assert!(
        consistent(5, 300, root_of(5), root_of(300), &hashes(&body["proof"])),
        "{body}"
    );
    audit.stop()
}

/// Complete subtrees as the service stores them, in memory.
struct Memory(HashMap<(u32, u64), [u8; 32]>);

impl Nodes for Memory {
    type Error = std::convert::Infallible;

    fn node(&self, level: u32, index: u64) -> Result<[u8; 32], Self::Error> {
        Ok(self.0[&(level, index)])
    }
}

/// The service's tree over `size` generated leaves, and those leaves' hashes.
fn memory_tree(size: u64) -> (Memory, Vec<[u8; 32]>) {
    let mut memory = Memory(HashMap::new());
    let mut leaves = Vec::new();
    for index in 0..size {
        let leaf = sha256(&[&[0], format!("record {index}").as_bytes()]);
        leaves.push(leaf);
        let completed = appended(index, leaf, |level, i| {
            Ok::<_, std::convert::Infallible>(memory.0[&(level, i)])
        })
        .expect("infallible");
        for (level, position, hash) in completed {
            memory.0.insert((level, position), hash);
        }
    }
    (memory, leaves)
}

proptest::proptest! {
    /// The service's inclusion proofs lead, by this file's RFC 9162 verifier, to
    /// the service's root.
    #[test]
    fn inclusion_proofs_verify_independently(size in 1u64..300, pick in proptest::prelude::any::<u64>()) {
        let (memory, leaves) = memory_tree(size);
        let index = pick % size;
        let proof = inclusion_proof(&memory, index, size).expect("infallible");
        let root = root(&memory, size).expect("infallible");
        proptest::prop_assert_eq!(root_from_inclusion(index, size, leaves[index as usize], &proof), Some(root));
    }

    /// The service's consistency proofs link its roots, by this file's verifier.
    #[test]
    fn consistency_proofs_verify_independently(new in 1u64..300, pick in proptest::prelude::any::<u64>()) {
        let (memory, _) = memory_tree(new);
        let old = 1 + pick % new;
        let proof = consistency_proof(&memory, old, new).expect("infallible");
        let (old_root, new_root) = (root(&memory, old).expect("ok"), root(&memory, new).expect("ok"));
        proptest::prop_assert!(old == new || consistent(old, new, old_root, new_root, &proof));
    }
}
