//! The Kubernetes source against the fake API server and the real broker: every
//! change with before/after/diff, CRDs picked up live, deletes missed while away
//! synthesized exactly once, and Secret values never published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use changewire_kafka::Publisher;
use changewire_producer::kubernetes::{
    AuditConfig, KindConfig, KubernetesConfig, KubernetesError, KubernetesSource, SledObjects,
};
use changewire_producer::metrics::ProducerMetrics;
use changewire_schemas::storage::open_sled;
use changewire_schemas::{ActorVia, ChangeEvent, Codec, Op, Origin, TopicNames};
use changewire_tests::certs::{TestCa, Usage};
use changewire_tests::kube_api::{AuditLevel, AuditWebhook, FakeApiServer};
use changewire_tests::servers::free_port;
use changewire_tests::{unique_name, Stack, TestConsumer};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const KEY: &str = "redaction-key-for-tests";

/// The source's config for `kinds` on `fake`.
pub fn source_config(fake: &FakeApiServer, kinds: Vec<KindConfig>) -> KubernetesConfig {
    let text = format!(
        "name = \"k8s\"\napi_url = \"{}\"\nredaction_key = \"{KEY}\"\n",
        fake.url()
    );
    let mut config: KubernetesConfig = toml::from_str(&text).expect("valid config");
    config.kinds = kinds;
    config
}

/// A watched kind of the core group.
pub fn core_kind(kind: &str) -> KindConfig {
    KindConfig {
        group: String::new(),
        version: "v1".into(),
        kind: kind.into(),
        plural: None,
        namespaces: vec![],
        label_selector: None,
        field_selector: None,
        drop_status_only: false,
        redact: vec![],
    }
}

/// A Kubernetes source running in this process on a state directory that outlives it.
pub(crate) struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), KubernetesError>>,
    pub(crate) metrics: Arc<ProducerMetrics>,
    /// The source's configured name, which its metrics carry.
    name: String,
}

impl Running {
    pub(crate) fn start(
        stack: &Stack,
        config: KubernetesConfig,
        prefix: &str,
        state: &std::path::Path,
    ) -> anyhow::Result<Self> {
        crate::pipeline::log_to_test_output();
        let objects = SledObjects::open(&open_sled(state)?, &config.name)?;
        let name = config.name.clone();
        let source = KubernetesSource::new(
            config,
            TopicNames::new(prefix)?,
            Arc::new(Codec::json()?),
            Publisher::for_source(&stack.kafka_config())?,
            Arc::new(objects),
        );
        let metrics = source.metrics();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(source.run(shutdown));
        Ok(Self {
            stop,
            task,
            metrics,
            name,
        })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task).await???;
        Ok(())
    }

    /// Waits until `changewire_producer_kubernetes_relists_total{kind="<kind>"}` shows at least `n`.
    pub(crate) async fn wait_for_relists(&self, kind: &str, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while relists(self, kind) < n {
            anyhow::ensure!(!self.task.is_finished(), "the source stopped");
            anyhow::ensure!(Instant::now() < deadline, "no relist #{n} of {kind}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Waits until `n` events of `op` for `kind` are acknowledged (events read from
    /// the watch but not yet published when the source stops are not).
    pub(crate) async fn wait_for_published(
        &self,
        kind: &str,
        op: Op,
        n: u64,
    ) -> anyhow::Result<()> {
        let name = format!(
            "changewire_producer_events_total{{source=\"{}\",kind=\"{kind}\",op=\"{}\"}}",
            self.name,
            op.code()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while counter(self, &name) < n {
            anyhow::ensure!(!self.task.is_finished(), "the source stopped");
            anyhow::ensure!(Instant::now() < deadline, "never published {n} of {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// Reads events of `topic` (waiting for it to exist) until `done` holds for all read.
pub(crate) async fn events_until(
    stack: &Stack,
    topic: &str,
    done: impl Fn(&[ChangeEvent]) -> bool,
) -> anyhow::Result<Vec<ChangeEvent>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let consumer = TestConsumer::once_created(stack, topic, Duration::from_secs(30)).await?;
    let mut events = Vec::new();
    while !done(&events) {
        let left = deadline.saturating_duration_since(Instant::now());
        let records = consumer.read(1, left.min(Duration::from_secs(1))).await?;
        for record in records {
            events.push(serde_json::from_slice(&record.value.unwrap_or_default())?);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "events so far: {:#?}",
            summary(&events)
        );
    }
    Ok(events)
}

pub(crate) fn summary(events: &[ChangeEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {} {}", e.op.code(), name(e), e.id))
        .collect()
}

pub(crate) fn name(event: &ChangeEvent) -> String {
    match &event.source.origin {
        Origin::Kubernetes(k8s) => k8s.name.clone(),
        Origin::Postgresql(_) => String::new(),
    }
}

fn origin(event: &ChangeEvent) -> &changewire_schemas::KubernetesOrigin {
    match &event.source.origin {
        Origin::Kubernetes(k8s) => k8s,
        Origin::Postgresql(_) => panic!("not a Kubernetes event"),
    }
}

pub(crate) fn config_map(name: &str, value: &str) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "data": {"k": value}}),
    )?)
}

/// Each event's object name and op, sorted (events read per partition come in no
/// overall order).
pub(crate) fn names_and_ops(events: &[ChangeEvent]) -> Vec<(String, Op)> {
    let mut all: Vec<(String, Op)> = events.iter().map(|e| (name(e), e.op)).collect();
    all.sort_by_key(|(name, op)| (name.clone(), op.code()));
    all
}

fn labelled_config_map(name: &str, team: &str) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"team": team}}, "data": {"k": "1"}}),
    )?)
}

pub(crate) fn post(manager: &str) -> PostParams {
    PostParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn config_map_changes_arrive_with_before_after_diff_and_actor() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    maps.create(&post("seed"), &config_map("existing", "0")?)
        .await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let source = Running::start(
        &stack,
        source_config(&fake, vec![core_kind("ConfigMap")]),
        &prefix,
        state.path(),
    )?;
    source.wait_for_relists("core/ConfigMap", 1).await?;

    maps.create(&post("alice-tool"), &config_map("app", "v1")?)
        .await?;
    let patch = json!({"data": {"k": "v2", "added": "x"}});
    maps.patch(
        "app",
        &PatchParams {
            field_manager: Some("bob-tool".into()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    maps.delete("app", &DeleteParams::default()).await?;

    let topic = format!("{prefix}.k8s.core.ConfigMap");
    let events = events_until(&stack, &topic, |e| e.len() >= 4).await?;
    let ops: Vec<(Op, String)> = events.iter().map(|e| (e.op, name(e))).collect();
    assert_eq!(
        ops,
        [
            (Op::Read, "existing".into()),
            (Op::Create, "app".into()),
            (Op::Update, "app".into()),
            (Op::Delete, "app".into())
        ]
    );
    assert_eq!(
        events[0].source.snapshot.as_str(),
        "last",
        "the only listed object ends the snapshot"
    );
    let (created, updated, deleted) = (&events[1], &events[2], &events[3]);
    assert_eq!(
        created.actor.as_ref().map(|a| a.name.as_str()),
        Some("alice-tool")
    );
    assert!(
        created.after.as_ref().unwrap()["metadata"]
            .get("managedFields")
            .is_none(),
        "managedFields are stripped"
    );
    assert_eq!(updated.before.as_ref().unwrap()["data"]["k"], "v1");
    assert_eq!(updated.after.as_ref().unwrap()["data"]["k"], "v2");
    let diff = updated.diff.as_ref().unwrap().as_array().unwrap().clone();
    assert!(
        diff.contains(&json!({"op": "replace", "path": "/data/k", "value": "v2"})),
        "{diff:?}"
    );
    assert!(
        diff.contains(&json!({"op": "add", "path": "/data/added", "value": "x"})),
        "{diff:?}"
    );
    assert_eq!(
        updated.actor.as_ref().map(|a| a.name.as_str()),
        Some("bob-tool")
    );
    let uid = &origin(created).uid;
    assert_eq!(
        created.id.as_str(),
        format!("k8s:k8s:{uid}:{}", origin(created).resource_version)
    );
    assert_eq!(deleted.id.as_str(), format!("k8s:k8s:{uid}:deleted"));
    assert!(deleted.after.is_none() && deleted.before.as_ref().unwrap()["data"]["k"] == "v2");
    source.stop().await
}

#[tokio::test]
async fn deletes_while_stopped_and_while_cut_off_are_synthesized_exactly_once() -> anyhow::Result<()>
{
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    for name in ["a", "b", "c", "d", "e"] {
        maps.create(&post("seed"), &config_map(name, "1")?).await?;
    }
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let config = source_config(&fake, vec![core_kind("ConfigMap")]);
    let source = Running::start(&stack, config.clone(), &prefix, state.path())?;
    source
        .wait_for_published("core/ConfigMap", Op::Read, 5)
        .await?;
    source.stop().await?;

    // While the producer is down: a delete, a delete + re-create, an update.
    maps.delete("a", &DeleteParams::default()).await?;
    maps.delete("b", &DeleteParams::default()).await?;
    maps.create(&post("seed"), &config_map("b", "reborn")?)
        .await?;
    maps.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await?;
    let source = Running::start(&stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;

    // While the API server is unreachable, with the change log compacted: the watch
    // resumes from a version answered with 410 (in-stream ERROR), and relists.
    fake.pause().await;
    maps_direct_delete(&fake, "d")?;
    fake.compact();
    fake.resume().await?;
    source.wait_for_relists("core/ConfigMap", 2).await?;
    // The same with 410 answered as an HTTP status.
    fake.set_options(|o| o.gone_as_http = true);
    fake.pause().await;
    maps_direct_delete(&fake, "e")?;
    fake.compact();
    fake.resume().await?;
    source.wait_for_relists("core/ConfigMap", 3).await?;

    let topic = format!("{prefix}.k8s.core.ConfigMap");
    let deletes_of = |events: &[ChangeEvent], n: &str| {
        events
            .iter()
            .filter(|e| e.op == Op::Delete && name(e) == n)
            .count()
    };
    let events = events_until(&stack, &topic, |events| {
        ["a", "b", "d", "e"]
            .iter()
            .all(|n| deletes_of(events, n) == 1)
    })
    .await?;
    source.stop().await?;
    let events = read_all_after(&stack, &topic, events).await?;
    for n in ["a", "b", "d", "e"] {
        assert_eq!(deletes_of(&events, n), 1, "{n}: {:#?}", summary(&events));
    }
    assert_eq!(deletes_of(&events, "c"), 0);
    let b: Vec<&ChangeEvent> = events.iter().filter(|e| name(e) == "b").collect();
    let ops: Vec<Op> = b.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        [Op::Read, Op::Delete, Op::Create],
        "{:#?}",
        summary(&events)
    );
    assert_ne!(
        origin(b[1]).uid,
        origin(b[2]).uid,
        "a re-create is a new object"
    );
    let c_update = events
        .iter()
        .find(|e| name(e) == "c" && e.op == Op::Update)
        .expect("c's update");
    assert_eq!(c_update.after.as_ref().unwrap()["data"]["k"], "2");
    Ok(())
}

/// Deletes through the store while the server is paused (no client can reach it).
fn maps_direct_delete(fake: &FakeApiServer, name: &str) -> anyhow::Result<()> {
    let mut store = fake.store();
    let kind = store
        .resource_type("", "v1", "configmaps")
        .map_err(|e| anyhow::anyhow!(e.message))?;
    store
        .delete(&kind, "default", name)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(())
}

/// `events` plus whatever else the topic holds (read to its end markers).
pub(crate) async fn read_all_after(
    stack: &Stack,
    topic: &str,
    events: Vec<ChangeEvent>,
) -> anyhow::Result<Vec<ChangeEvent>> {
    let records = changewire_tests::read_to_end(stack, topic, Duration::from_secs(30)).await?;
    let all: Vec<ChangeEvent> = records
        .iter()
        .map(|r| serde_json::from_slice(r.value.as_deref().unwrap_or_default()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        all.len() >= events.len(),
        "read {} after {}",
        all.len(),
        events.len()
    );
    Ok(all)
}

#[tokio::test]
async fn secret_values_never_reach_the_topic_but_their_changes_do() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let secrets: Api<Secret> = Api::namespaced(fake.client()?, "default");
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let source = Running::start(
        &stack,
        source_config(&fake, vec![core_kind("Secret")]),
        &prefix,
        state.path(),
    )?;
    source.wait_for_relists("core/Secret", 1).await?;
    let applied = r#"{"stringData":{"password":"hunter2-plain"}}"#;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied}},
        "stringData": {"password": "hunter2-plain"},
        "data": {"token": "dG9rZW4tc2VjcmV0"},
    }))?;
    secrets.create(&post("kubectl"), &secret).await?;
    secrets
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": "hunter3-plain"}})),
        )
        .await?;

    let topic = format!("{prefix}.k8s.core.Secret");
    let events = events_until(&stack, &topic, |e| e.len() >= 2).await?;
    source.stop().await?;
    let records = changewire_tests::read_to_end(&stack, &topic, Duration::from_secs(30)).await?;
    let everything: Vec<u8> = records
        .iter()
        .flat_map(|r| r.value.clone().unwrap_or_default())
        .collect();
    let text = String::from_utf8_lossy(&everything);
    for secret in [
        "hunter2-plain",
        "hunter3-plain",
        "aHVudGVyMi1wbGFpbg",
        "aHVudGVyMy1wbGFpbg",
        "dG9rZW4tc2VjcmV0",
        "token-secret",
    ] {
        assert!(!text.contains(secret), "{secret} reached the topic: {text}");
    }
    let update = &events[1];
    assert_eq!(update.op, Op::Update);
    let hash = |e: &Option<Value>| {
        e.as_ref().unwrap()["data"]["password"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(hash(&update.after).starts_with("hmac-sha256:"));
    assert_ne!(
        hash(&update.before),
        hash(&update.after),
        "a changed secret shows as a changed hash"
    );
    assert_eq!(
        update.before.as_ref().unwrap()["data"]["token"],
        update.after.as_ref().unwrap()["data"]["token"]
    );
    Ok(())
}

pub(crate) fn route_crd(group: &str) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("routes.{group}")},
        "spec": {"group": group, "scope": "Namespaced",
            "names": {"plural": "routes", "singular": "route", "kind": "Route", "listKind": "RouteList"},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
    })
}

#[tokio::test]
async fn a_new_crd_is_watched_live_and_status_only_updates_are_marked() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let client = fake.client()?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let mut config = source_config(&fake, vec![]);
    config.crd_groups = vec!["*.example.com".into()];
    let source = Running::start(&stack, config, &prefix, state.path())?;

    let group = format!("{}.example.com", unique_name("gw").replace('_', "-"));
    let crds: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &kube::api::ApiResource::erase::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(&()));
    crds.create(
        &PostParams::default(),
        &serde_json::from_value(route_crd(&group))?,
    )
    .await?;
    source
        .wait_for_relists("{group}/Route".replace("{group}", &group).as_str(), 1)
        .await?;
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(&group, "v1", "Route"),
        "routes",
    );
    let routes: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &resource);
    let route = json!({"apiVersion": format!("{group}/v1"), "kind": "Route", "metadata": {"name": "checkout"}, "spec": {"host": "shop.example.com", "upstream": "checkout:8080"}});
    routes
        .create(&post("gateway-operator"), &serde_json::from_value(route)?)
        .await?;
    routes
        .patch_status(
            "checkout",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": true}})),
        )
        .await?;
    routes
        .patch(
            "checkout",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"upstream": "checkout:9090"}})),
        )
        .await?;
    crds.delete(&format!("routes.{group}"), &DeleteParams::default())
        .await?;

    let topic = format!("{prefix}.k8s.{group}.Route");
    let events = events_until(&stack, &topic, |e| e.iter().any(|e| e.op == Op::Delete)).await?;
    let ops: Vec<(Op, bool)> = events
        .iter()
        .map(|e| (e.op, origin(e).status_only))
        .collect();
    assert_eq!(
        ops,
        [
            (Op::Create, false),
            (Op::Update, true),
            (Op::Update, false),
            (Op::Delete, false)
        ],
        "{:#?}",
        summary(&events)
    );
    assert_eq!(
        events[1].diff,
        Some(json!([{"op": "add", "path": "/status", "value": {"ready": true}}]))
    );
    source.stop().await
}

#[tokio::test]
async fn the_fake_api_server_pages_consistently_filters_and_expires_old_versions(
) -> anyhow::Result<()> {
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    for i in 0..5 {
        let mut map = config_map(&format!("m{i}"), "x")?;
        map.metadata.labels = Some(
            [(
                "tier".to_string(),
                if i % 2 == 0 { "web" } else { "db" }.to_string(),
            )]
            .into(),
        );
        maps.create(&PostParams::default(), &map).await?;
    }
    let first = maps
        .list(&kube::api::ListParams::default().limit(2))
        .await?;
    maps.delete("m4", &DeleteParams::default()).await?;
    let token = first.metadata.continue_.clone().expect("more pages");
    let rest = maps
        .list(
            &kube::api::ListParams::default()
                .limit(10)
                .continue_token(&token),
        )
        .await?;
    let names: Vec<String> = first
        .items
        .iter()
        .chain(&rest.items)
        .filter_map(|m| m.metadata.name.clone())
        .collect();
    assert_eq!(
        names,
        ["m0", "m1", "m2", "m3", "m4"],
        "pages come from the first page's version"
    );
    let web = maps
        .list(&kube::api::ListParams::default().labels("tier=web"))
        .await?;
    assert_eq!(web.items.len(), 2);
    fake.compact();
    let expired = maps
        .list(&kube::api::ListParams::default().continue_token(&token))
        .await;
    assert!(matches!(expired, Err(kube::Error::Api(status)) if status.code == 410));
    let mut counts = HashMap::new();
    for t in fake.store().types() {
        *counts.entry(t.namespaced).or_insert(0) += 1;
    }
    assert!(counts[&true] >= 3 && counts[&false] >= 2);
    Ok(())
}

/// The `changewire-producer` binary watching ConfigMaps on `fake`.
fn write_binary_config(
    dir: &std::path::Path,
    stack: &Stack,
    fake: &FakeApiServer,
    prefix: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("producer.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[kafka]\nbrokers = {:?}\n[topics]\nprefix = {prefix:?}\n\
             [kubernetes]\nname = \"k8s\"\napi_url = {:?}\n[[kubernetes.kinds]]\nversion = \"v1\"\nkind = \"ConfigMap\"\n",
            dir.join("state"),
            stack.kafka_brokers,
            fake.url(),
        ),
    )?;
    Ok(path)
}

/// The producer binary is SIGKILLed three times while objects are created, updated
/// and deleted; afterwards every object's final state and every delete is on the topic.
#[tokio::test]
async fn sigkill_loop_loses_no_object_change() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    let (prefix, dir) = (unique_name("k8s"), tempfile::tempdir()?);
    let config = write_binary_config(dir.path(), &stack, &fake, &prefix)?;
    let program = changewire_tests::workspace_binary("changewire-producer")?;
    let log = dir.path().join("producer.log");
    maps.create(&post("writer"), &config_map("seed", "1")?)
        .await?;
    let mut producer = crate::consumer::start_service(&program, &config, &log)?;
    let topic = format!("{prefix}.k8s.core.ConfigMap");
    let mut deleted = Vec::new();
    for round in 0..4 {
        // Each round starts once the (restarted) producer published the last round's
        // final object, so every kill lands while it streams.
        let previous = if round == 0 {
            "seed".to_owned()
        } else {
            format!("m{}-149", round - 1)
        };
        events_until(&stack, &topic, |events| {
            events.iter().any(|e| name(e) == previous)
        })
        .await?;
        for i in 0..150 {
            let name = format!("m{round}-{i}");
            maps.create(&post("writer"), &config_map(&name, "1")?)
                .await?;
            if i % 3 == 0 {
                maps.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"data": {"k": "2"}})),
                )
                .await?;
            }
            if i % 5 == 0 {
                let gone = maps.delete(&name, &DeleteParams::default()).await?;
                deleted.push(
                    gone.left()
                        .and_then(|m| m.metadata.uid)
                        .expect("deleted at once"),
                );
            }
            if i == 75 && round < 3 {
                // Mid-round, while the producer works through the changes.
                drop(producer);
                producer = crate::consumer::start_service(&program, &config, &log)?;
            }
        }
    }
    let live: HashMap<String, String> = maps
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .map(|m| {
            (
                m.metadata.uid.unwrap_or_default(),
                m.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect();
    // Every live object's final version is on the topic, and every deleted object
    // that was published is deleted there (one never seen needs no delete).
    let covered = |events: &[ChangeEvent]| {
        let seen: HashMap<&str, &str> = events
            .iter()
            .filter(|e| e.op != Op::Delete)
            .map(|e| (origin(e).uid.as_str(), origin(e).resource_version.as_str()))
            .collect();
        let gone: std::collections::HashSet<&str> = events
            .iter()
            .filter(|e| e.op == Op::Delete)
            .map(|e| origin(e).uid.as_str())
            .collect();
        live.iter()
            .all(|(uid, rv)| seen.get(uid.as_str()) == Some(&rv.as_str()))
            && deleted
                .iter()
                .filter(|uid| seen.contains_key(uid.as_str()))
                .all(|uid| gone.contains(uid.as_str()))
    };
    let result = events_until(&stack, &topic, covered).await;
    crate::consumer::terminate(producer)?;
    if let Err(error) = result {
        let events = changewire_tests::read_to_end(&stack, &topic, Duration::from_secs(30)).await?;
        let events: Vec<ChangeEvent> = events
            .iter()
            .map(|r| serde_json::from_slice(r.value.as_deref().unwrap_or_default()))
            .collect::<Result<_, _>>()?;
        let published = |uid: &str, rv: Option<&str>| {
            events.iter().any(|e| {
                origin(e).uid == uid
                    && rv.is_none_or(|rv| origin(e).resource_version == rv)
                    && (rv.is_some() || e.op == Op::Delete)
            })
        };
        let stale: Vec<_> = live
            .iter()
            .filter(|(uid, rv)| !published(uid, Some(rv)))
            .collect();
        let undeleted: Vec<_> = deleted
            .iter()
            .filter(|uid| events.iter().any(|e| origin(e).uid == **uid) && !published(uid, None))
            .collect();
        anyhow::bail!(
            "{error:#}: {} events; live objects without their final version: {stale:?}; published objects without their delete: {undeleted:?}\nproducer log:\n{}",
            events.len(),
            std::fs::read_to_string(&log)?
        );
    }
    let runs = std::fs::read_to_string(&log)?.matches("watching").count();
    println!("producer runs that started watching: {runs} of 4");
    Ok(())
}

/// The source with its audit webhook on a fresh port and certificate; the fake API
/// server sends its audit events there (batch mode, RequestResponse level).
struct Audited {
    url: String,
    ca_pem: Vec<u8>,
    _certs: tempfile::TempDir,
}

const AUDIT_TOKEN: &str = "audit-webhook-token-for-tests";

fn with_audit(config: &mut KubernetesConfig, wait_ms: u64) -> anyhow::Result<Audited> {
    let certs = tempfile::tempdir()?;
    let ca = TestCa::new(certs.path())?;
    ca.issue("server", Usage::Server, certs.path())?;
    let port = free_port()?;
    config.audit = Some(AuditConfig {
        listen: format!("127.0.0.1:{port}").parse()?,
        tls_cert: certs.path().join("server.crt"),
        tls_key: certs.path().join("server.key"),
        token: AUDIT_TOKEN.into(),
        wait_ms,
        retention_secs: 600,
    });
    Ok(Audited {
        url: format!("https://127.0.0.1:{port}/audit"),
        ca_pem: std::fs::read(&ca.cert)?,
        _certs: certs,
    })
}

#[tokio::test]
async fn audit_webhook_names_the_authenticated_user_and_unaudited_changes_fall_back(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    fake.add_user("alice-token", "alice@example.com", &["platform-admins"]);
    let mut config = source_config(&fake, vec![core_kind("ConfigMap")]);
    let audit = with_audit(&mut config, 3_000)?;
    fake.send_audit_to(AuditWebhook {
        url: audit.url.clone(),
        token: AUDIT_TOKEN.into(),
        ca_pem: audit.ca_pem.clone(),
        batch_max_wait: Duration::from_millis(300),
        level: AuditLevel::RequestResponse,
    })?;
    let (prefix, state) = (unique_name("k8s_audit"), tempfile::tempdir()?);
    let source = Running::start(&stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&audit.ca_pem)?)
        .build()?;
    let refused = https
        .post(&audit.url)
        .bearer_auth("wrong-token")
        .json(&json!({"items": []}))
        .send()
        .await?;
    assert_eq!(refused.status(), 401, "a wrong token is refused");
    let malformed = https
        .post(&audit.url)
        .bearer_auth(AUDIT_TOKEN)
        .body("{not json")
        .send()
        .await?;
    assert_eq!(malformed.status(), 400, "{}", malformed.text().await?);

    let maps: Api<ConfigMap> = Api::namespaced(fake.client_as("alice-token")?, "default");
    maps.create(&post("alice-tool"), &config_map("audited", "v1")?)
        .await?;
    let patch = json!({"data": {"k": "v2"}});
    maps.patch("audited", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    maps.delete("audited", &DeleteParams::default()).await?;
    // Written past the API: no audit event, so the managedFields actor stays.
    let kind = fake
        .store()
        .resource_type("", "v1", "configmaps")
        .map_err(|e| anyhow::anyhow!(e.message))?;
    fake.store()
        .create(
            &kind,
            "default",
            json!({"metadata": {"name": "unaudited"}, "data": {"k": "x"}}),
            "direct-writer",
        )
        .map_err(|e| anyhow::anyhow!(e.message))?;

    let topic = format!("{prefix}.k8s.core.ConfigMap");
    let events = events_until(&stack, &topic, |e| e.len() >= 4).await?;
    let (audited, unaudited): (Vec<_>, Vec<_>) = events.iter().partition(|e| name(e) == "audited");
    let ops: Vec<Op> = audited.iter().map(|e| e.op).collect();
    assert_eq!(ops, [Op::Create, Op::Update, Op::Delete]);
    for event in &audited {
        let actor = event.actor.as_ref().expect("an actor");
        assert_eq!(
            (actor.name.as_str(), actor.via),
            ("alice@example.com", ActorVia::Audit),
            "{}",
            event.id
        );
        assert!(
            actor.groups.contains(&"platform-admins".to_owned()),
            "{actor:?}"
        );
        assert_eq!(actor.source_ips, ["127.0.0.1"]);
        assert_eq!(
            actor.user_agent.as_deref(),
            Some("kubectl/v1.33.0 (linux/amd64) kubernetes/fake")
        );
    }
    let fallback = unaudited[0].actor.as_ref().expect("an actor");
    assert_eq!(
        (fallback.name.as_str(), fallback.via),
        ("direct-writer", ActorVia::ManagedFields)
    );

    use changewire_schemas::http::Observable;
    let metrics = source.metrics.encode_metrics();
    for line in [
        "changewire_producer_kubernetes_audit_attributed_total{source=\"k8s\"} 3",
        "changewire_producer_kubernetes_audit_unattributed_total{source=\"k8s\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    source.stop().await
}

/// Against a real cluster (`KUBECONFIG`; run with `--run-ignored ignored-only`): in a
/// namespace of its own, a ConfigMap's create, update and delete arrive in order,
/// and a Secret's value never reaches its topic. The namespace is deleted afterwards.
#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG"]
async fn real_cluster_config_map_and_secret_changes() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let stack = Stack::from_env();
    let client = kube::Client::try_default().await?;
    let namespace = unique_name("changewire-test").replace('_', "-");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &post("changewire-test"),
            &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
        )
        .await?;
    let result = real_cluster_changes(&stack, client, &namespace).await;
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await?;
    result
}

async fn real_cluster_changes(
    stack: &Stack,
    client: kube::Client,
    namespace: &str,
) -> anyhow::Result<()> {
    let mut kinds = vec![core_kind("ConfigMap"), core_kind("Secret")];
    for kind in &mut kinds {
        kind.namespaces = vec![namespace.to_owned()];
    }
    let mut config: KubernetesConfig =
        toml::from_str(&format!("name = \"k8s\"\nredaction_key = \"{KEY}\"\n"))?;
    config.kinds = kinds;
    let (prefix, state) = (unique_name("k8s_real"), tempfile::tempdir()?);
    let source = Running::start(stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;
    source.wait_for_relists("core/Secret", 1).await?;

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    maps.create(&post("changewire-test"), &config_map("real", "v1")?)
        .await?;
    maps.patch(
        "real",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v2"}})),
    )
    .await?;
    maps.delete("real", &DeleteParams::default()).await?;
    let secret_value = format!("real-secret-{}", unique_name("v"));
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    secrets
        .create(
            &post("changewire-test"),
            &serde_json::from_value(
                json!({"metadata": {"name": "s"}, "stringData": {"password": secret_value}}),
            )?,
        )
        .await?;

    let maps_topic = format!("{prefix}.k8s.core.ConfigMap");
    let events = events_until(stack, &maps_topic, |e| e.iter().any(|e| e.op == Op::Delete)).await?;
    let ops: Vec<Op> = events
        .iter()
        .filter(|e| name(e) == "real")
        .map(|e| e.op)
        .collect();
    assert_eq!(ops, [Op::Create, Op::Update, Op::Delete]);
    let secrets_topic = format!("{prefix}.k8s.core.Secret");
    let secret_events =
        events_until(stack, &secrets_topic, |e| e.iter().any(|e| name(e) == "s")).await?;
    let text = serde_json::to_string(&secret_events)?;
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&secret_value);
    assert!(
        !text.contains(&secret_value) && !text.contains(&encoded),
        "a Secret value reached the topic"
    );
    source.stop().await
}

fn crd_api(client: &kube::Client) -> Api<kube::api::DynamicObject> {
    Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(&()),
    )
}

/// Creates the Route CRD of `group`, waits until `source` watches it, then creates
/// routes named `names`.
async fn routes_of_new_crd(
    fake: &FakeApiServer,
    source: &Running,
    group: &str,
    names: &[&str],
) -> anyhow::Result<()> {
    let client = fake.client()?;
    crd_api(&client)
        .create(
            &PostParams::default(),
            &serde_json::from_value(route_crd(group))?,
        )
        .await?;
    source
        .wait_for_relists(&format!("{group}/Route"), 1)
        .await?;
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(group, "v1", "Route"),
        "routes",
    );
    let routes: Api<kube::api::DynamicObject> = Api::namespaced_with(client, "default", &resource);
    for name in names {
        let route = json!({"apiVersion": format!("{group}/v1"), "kind": "Route", "metadata": {"name": name}, "spec": {"host": "shop.example.com"}});
        routes
            .create(&post("gateway-operator"), &serde_json::from_value(route)?)
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_crd_deleted_while_the_producer_is_down_has_its_objects_deleted_once(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let mut config = source_config(&fake, vec![]);
    config.crd_groups = vec!["*.example.com".into()];
    let group = format!("{}.example.com", unique_name("gone").replace('_', "-"));
    let topic = format!("{prefix}.k8s.{group}.Route");

    let source = Running::start(&stack, config.clone(), &prefix, state.path())?;
    routes_of_new_crd(&fake, &source, &group, &["a", "b"]).await?;
    events_until(&stack, &topic, |e| e.len() >= 2).await?;
    source.stop().await?;

    crd_api(&fake.client()?)
        .delete(&format!("routes.{group}"), &DeleteParams::default())
        .await?;
    let source = Running::start(&stack, config.clone(), &prefix, state.path())?;
    let events = events_until(&stack, &topic, |e| e.len() >= 4).await?;
    // Read per partition: the deletes are not necessarily the last two read.
    let mut deleted: Vec<String> = events
        .iter()
        .filter(|e| e.op == Op::Delete)
        .map(name)
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["a", "b"]);
    source.stop().await?;

    // Once swept, the kind is forgotten: another restart publishes nothing more for it.
    let source = Running::start(&stack, config, &prefix, state.path())?;
    let later = format!("{}.example.com", unique_name("later").replace('_', "-"));
    routes_of_new_crd(&fake, &source, &later, &["c"]).await?;
    events_until(&stack, &format!("{prefix}.k8s.{later}.Route"), |e| {
        !e.is_empty()
    })
    .await?;
    source.stop().await?;
    let all = changewire_tests::read_to_end(&stack, &topic, Duration::from_secs(30)).await?;
    assert_eq!(all.len(), 4, "no delete is published twice");
    Ok(())
}

/// Reads the `changewire_producer_kubernetes_relists_total` of `kind`.
fn relists(source: &Running, kind: &str) -> u64 {
    counter(
        source,
        &format!(
            "changewire_producer_kubernetes_relists_total{{source=\"{}\",kind=\"{kind}\"}}",
            source.name
        ),
    )
}

/// The value of the counter `name` (with its labels), 0 before it exists.
fn counter(source: &Running, name: &str) -> u64 {
    use changewire_schemas::http::Observable;
    let needle = format!("{name} ");
    source
        .metrics
        .encode_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A restart under another label selector lists instead of resuming: an object that
/// left the selector gets its delete, one that entered it its create.
#[tokio::test]
async fn a_restart_under_other_selectors_lists_instead_of_resuming() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    maps.create(&post("w"), &labelled_config_map("x", "a")?)
        .await?;
    maps.create(&post("w"), &labelled_config_map("y", "b")?)
        .await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let topic = format!("{prefix}.k8s.core.ConfigMap");
    let selecting = |team: &str| {
        let mut kind = core_kind("ConfigMap");
        kind.label_selector = Some(format!("team={team}"));
        source_config(&fake, vec![kind])
    };

    let source = Running::start(&stack, selecting("a"), &prefix, state.path())?;
    events_until(&stack, &topic, |e| !e.is_empty()).await?;
    // A watch event after the list, so a resume point is stored.
    let patch = json!({"data": {"k": "2"}});
    maps.patch("x", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    events_until(&stack, &topic, |e| e.len() >= 2).await?;
    source.stop().await?;

    let source = Running::start(&stack, selecting("b"), &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;
    let events = events_until(&stack, &topic, |e| e.len() >= 4).await?;
    assert_eq!(
        names_and_ops(&events),
        [
            ("x".into(), Op::Delete),
            ("x".into(), Op::Read),
            ("x".into(), Op::Update),
            ("y".into(), Op::Create)
        ]
    );
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_restart_resumes_the_watch_without_listing_until_the_version_expired(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let config = source_config(&fake, vec![core_kind("ConfigMap")]);
    let topic = format!("{prefix}.k8s.core.ConfigMap");

    let source = Running::start(&stack, config.clone(), &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;
    maps.create(&post("w"), &config_map("a", "1")?).await?;
    maps.create(&post("w"), &config_map("b", "1")?).await?;
    events_until(&stack, &topic, |e| e.len() >= 2).await?;
    source.stop().await?;

    // While down: an update, a delete, a create.
    let patch = json!({"data": {"k": "2"}});
    maps.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    maps.delete("b", &DeleteParams::default()).await?;
    maps.create(&post("w"), &config_map("c", "1")?).await?;
    let source = Running::start(&stack, config.clone(), &prefix, state.path())?;
    let events = events_until(&stack, &topic, |e| e.len() >= 5).await?;
    assert_eq!(
        names_and_ops(&events),
        [
            ("a".into(), Op::Create),
            ("a".into(), Op::Update),
            ("b".into(), Op::Create),
            ("b".into(), Op::Delete),
            ("c".into(), Op::Create)
        ]
    );
    assert_eq!(
        relists(&source, "core/ConfigMap"),
        0,
        "resumed from the stored version, no list"
    );
    source.stop().await?;

    // The stored version compacted away: the restart lists, and still misses nothing.
    maps.patch("c", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    fake.compact();
    let source = Running::start(&stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;
    events_until(&stack, &topic, |e| {
        e.iter().any(|e| e.op == Op::Update && name(e) == "c")
    })
    .await?;
    source.stop().await?;
    let all = changewire_tests::read_to_end(&stack, &topic, Duration::from_secs(30)).await?;
    assert_eq!(all.len(), 6, "nothing published twice");
    Ok(())
}
