//! The Kubernetes source after expiry and outages: listed objects read like watched
//! ones (a relist republishes nothing), watches recover from a 410 as fast after an
//! outage or after several 410s as the first time, the CRD follower relists on an
//! HTTP 410, and `/health` tells an API-server outage.

use std::collections::HashSet;
use std::time::Duration;

use changewire_producer::metrics::SourceState;
use changewire_schemas::{ChangeEvent, Op};
use changewire_tests::kube_api::{FakeApiServer, Options};
use changewire_tests::{unique_name, Stack, TestConsumer};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

use crate::kubernetes::{
    config_map, core_kind, events_until, name, names_and_ops, post, read_all_after, route_crd,
    source_config, summary, Running,
};

/// Makes every open watch's version too old: one write nobody watches (a
/// Namespace), compaction, then every watch connection cut.
fn expire_every_watch(fake: &FakeApiServer) -> anyhow::Result<()> {
    {
        let mut store = fake.store();
        let namespace = json!({"metadata": {"name": unique_name("bump").replace('_', "-")}});
        let namespaces = store.resource_type("", "v1", "namespaces");
        namespaces
            .and_then(|kind| store.create(&kind, "", namespace, "test"))
            .map_err(|error| anyhow::anyhow!("writing a namespace: {error:?}"))?;
        store.compact();
    }
    fake.drop_watches();
    Ok(())
}

/// A fake API server that answers a watch from an expired version with an HTTP 410
/// (as kube-apiserver may), not an in-stream ERROR event.
async fn fake_answering_expiry_as_http() -> anyhow::Result<FakeApiServer> {
    let options = Options {
        gone_as_http: true,
        ..Options::default()
    };
    FakeApiServer::start_with(options, "127.0.0.1:0".parse()?).await
}

fn secret(name: &str) -> anyhow::Result<Secret> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "data": {"k": "c2VjcmV0"}}),
    )?)
}

/// Reads `topic` until the event of `name` with `op` arrives; fails after `timeout`.
async fn wait_for_event(
    consumer: &TestConsumer,
    name_wanted: &str,
    op: Op,
    timeout: Duration,
) -> anyhow::Result<ChangeEvent> {
    let mut found = None;
    consumer
        .read_until(timeout, |record| {
            let event: Option<ChangeEvent> = record
                .value
                .as_deref()
                .and_then(|v| serde_json::from_slice(v).ok());
            found = event.filter(|e| e.op == op && name(e) == name_wanted);
            found.is_some()
        })
        .await?;
    found.ok_or_else(|| {
        anyhow::anyhow!("no {} event of {name_wanted} within {timeout:?}", op.code())
    })
}

/// Time from expiring every watch until a Secret created right after it is published.
async fn recovery_from_expiry(
    fake: &FakeApiServer,
    secrets: &Api<Secret>,
    consumer: &TestConsumer,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    expire_every_watch(fake)?;
    let probe = unique_name("probe").replace('_', "-");
    secrets.create(&post("test"), &secret(&probe)?).await?;
    wait_for_event(consumer, &probe, Op::Create, Duration::from_secs(60)).await?;
    Ok(started.elapsed())
}

/// Polls the source's health until it is `state`.
async fn wait_for_state(
    source: &Running,
    state: SourceState,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while source.metrics.state() != state {
        anyhow::ensure!(
            Instant::now() < deadline,
            "health still {:?} ({:?}) after {timeout:?}",
            source.metrics.state(),
            source.metrics.last_error()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn listed_objects_carry_their_type_and_a_relist_republishes_nothing() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let maps: Api<ConfigMap> = Api::namespaced(fake.client()?, "default");
    let secrets: Api<Secret> = Api::namespaced(fake.client()?, "default");
    maps.create(&post("seed"), &config_map("listed", "1")?)
        .await?;
    secrets.create(&post("seed"), &secret("listed")?).await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let kinds = vec![core_kind("ConfigMap"), core_kind("Secret")];
    let source = Running::start(&stack, source_config(&fake, kinds), &prefix, state.path())?;
    let (map_topic, secret_topic) = (
        format!("{prefix}.k8s.core.ConfigMap"),
        format!("{prefix}.k8s.core.Secret"),
    );
    for (topic, kind) in [(&map_topic, "ConfigMap"), (&secret_topic, "Secret")] {
        let events = events_until(&stack, topic, |e| !e.is_empty()).await?;
        let after = events[0].after.as_ref().expect("after");
        assert_eq!(events[0].op, Op::Read);
        assert_eq!(
            (&after["apiVersion"], &after["kind"]),
            (&json!("v1"), &json!(kind))
        );
    }

    let patch = json!({"data": {"k": "2"}});
    maps.patch("listed", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    maps.create(&post("w"), &config_map("watched", "1")?)
        .await?;
    // Events read per partition come in no overall order: found by op and name.
    let events = events_until(&stack, &map_topic, |e| e.iter().any(|e| e.op == Op::Update)).await?;
    let update = events
        .iter()
        .find(|e| e.op == Op::Update)
        .expect("the update");
    let diff = update
        .diff
        .as_ref()
        .and_then(|d| d.as_array())
        .expect("a diff");
    assert!(diff.contains(&json!({"op": "replace", "path": "/data/k", "value": "2"})));
    assert!(
        diff.iter()
            .all(|op| op["path"] != "/apiVersion" && op["path"] != "/kind"),
        "type fields are not a change: {diff:?}"
    );

    expire_every_watch(&fake)?;
    source.wait_for_relists("core/ConfigMap", 2).await?;
    source.wait_for_relists("core/Secret", 2).await?;
    maps.create(&post("w"), &config_map("marker", "1")?).await?;
    let events = events_until(&stack, &map_topic, |e| {
        e.iter().any(|e| name(e) == "marker")
    })
    .await?;
    let events = read_all_after(&stack, &map_topic, events).await?;
    assert_eq!(
        names_and_ops(&events),
        [
            ("listed".into(), Op::Read),
            ("listed".into(), Op::Update),
            ("marker".into(), Op::Create),
            ("watched".into(), Op::Create)
        ],
        "the relist found nothing new: {:#?}",
        summary(&events)
    );
    let secrets_read =
        changewire_tests::read_to_end(&stack, &secret_topic, Duration::from_secs(30)).await?;
    assert_eq!(
        secrets_read.len(),
        1,
        "the relisted Secret is not republished"
    );
    let ids: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), events.len(), "every id names one content");
    source.stop().await
}

/// A quiet kind (no events while healthy) recovers from a 410 after an API-server
/// outage as fast as it did before the outage: the delays grown during the outage
/// were reset once the watch ran healthy again.
#[tokio::test]
async fn a_quiet_kind_recovers_from_expiry_after_an_outage_as_fast_as_before() -> anyhow::Result<()>
{
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let secrets: Api<Secret> = Api::namespaced(fake.client()?, "default");
    // Listed first, so the first sync is stored and later objects are creates.
    secrets.create(&post("seed"), &secret("seed")?).await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let kinds = vec![core_kind("ConfigMap"), core_kind("Secret")];
    let source = Running::start(&stack, source_config(&fake, kinds), &prefix, state.path())?;
    source.wait_for_relists("core/Secret", 1).await?;
    let topic = format!("{prefix}.k8s.core.Secret");
    let consumer = TestConsumer::once_created(&stack, &topic, Duration::from_secs(30)).await?;
    let healthy = recovery_from_expiry(&fake, &secrets, &consumer).await?;

    // The outage: long enough for the watches' delays to grow past 8 s.
    fake.pause().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    fake.resume().await?;
    wait_for_state(&source, SourceState::Streaming, Duration::from_secs(60)).await?;
    // Healthy watching for a while (reset after 5 s healthy).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after_outage = recovery_from_expiry(&fake, &secrets, &consumer).await?;
    assert!(
        after_outage <= healthy * 3 + Duration::from_secs(3),
        "recovery took {after_outage:?} after the outage, {healthy:?} before it"
    );
    source.stop().await
}

/// The source's own restarts (an expired version answered as HTTP 410) do not slow
/// down from one expiry to the next when the watch ran healthy between them.
#[tokio::test]
async fn repeated_expiries_with_healthy_gaps_recover_as_fast_as_the_first() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = fake_answering_expiry_as_http().await?;
    let secrets: Api<Secret> = Api::namespaced(fake.client()?, "default");
    secrets.create(&post("seed"), &secret("seed")?).await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let config = source_config(&fake, vec![core_kind("Secret")]);
    let source = Running::start(&stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/Secret", 1).await?;
    let topic = format!("{prefix}.k8s.core.Secret");
    let consumer = TestConsumer::once_created(&stack, &topic, Duration::from_secs(30)).await?;
    let mut recoveries = Vec::new();
    for _ in 0..6 {
        recoveries.push(recovery_from_expiry(&fake, &secrets, &consumer).await?);
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let bound = recoveries[0] * 3 + Duration::from_millis(2500);
    assert!(
        recoveries.iter().all(|r| *r <= bound),
        "recoveries {recoveries:?} (bound {bound:?})"
    );
    source.stop().await
}

/// The CRD follower's version expires and the server answers the re-watch with an
/// HTTP 410: it lists again, so a CRD created afterwards is followed.
#[tokio::test]
async fn the_crd_follower_lists_again_when_its_version_expired() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = fake_answering_expiry_as_http().await?;
    let client = fake.client()?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let mut config = source_config(&fake, vec![]);
    config.crd_groups = vec!["*.example.com".into()];
    let source = Running::start(&stack, config, &prefix, state.path())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.active_watches() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the CRD follower never watched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    expire_every_watch(&fake)?;
    let group = format!("{}.example.com", unique_name("gw").replace('_', "-"));
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(&()),
    );
    crds.create(
        &PostParams::default(),
        &serde_json::from_value(route_crd(&group))?,
    )
    .await?;
    source
        .wait_for_relists(&format!("{group}/Route"), 1)
        .await?;
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(&group, "v1", "Route"),
        "routes",
    );
    let routes: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let route = json!({"apiVersion": format!("{group}/v1"), "kind": "Route", "metadata": {"name": "r"}, "spec": {}});
    routes
        .create(&post("op"), &serde_json::from_value(route)?)
        .await?;
    let topic = format!("{prefix}.k8s.{group}.Route");
    events_until(&stack, &topic, |e| e.iter().any(|e| e.op == Op::Create)).await?;
    source.stop().await
}

/// `/health` says reconnecting, naming the failing watches, while the API server is
/// down, and streaming again once it is back.
#[tokio::test]
async fn health_reports_an_api_server_outage_and_the_recovery() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let (prefix, state) = (unique_name("k8s"), tempfile::tempdir()?);
    let config = source_config(&fake, vec![core_kind("ConfigMap")]);
    let source = Running::start(&stack, config, &prefix, state.path())?;
    source.wait_for_relists("core/ConfigMap", 1).await?;
    wait_for_state(&source, SourceState::Streaming, Duration::from_secs(10)).await?;

    fake.pause().await;
    wait_for_state(&source, SourceState::Reconnecting, Duration::from_secs(10)).await?;
    let error = source.metrics.last_error().unwrap_or_default();
    assert!(
        error.contains("/ConfigMap/"),
        "the failing watch is named: {error}"
    );

    fake.resume().await?;
    wait_for_state(&source, SourceState::Streaming, Duration::from_secs(45)).await?;
    assert_eq!(source.metrics.last_error(), None);
    source.stop().await
}
