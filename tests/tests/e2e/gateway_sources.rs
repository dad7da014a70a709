//! Routes from both producers reach a real nginx: rows of the shipped routes
//! table through the Postgres producer, Route custom resources (with the
//! shipped CRD) through the Kubernetes producer and the test API server.

use std::time::Duration;

use changewire_tests::gateway::{eventually, request, NginxDir, Upstream};
use changewire_tests::kube_api::FakeApiServer;
use changewire_tests::servers::free_ports;
use changewire_tests::{unique_name, workspace_binary, Stack, TestConsumer};
use figment::providers::{Format, Yaml};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{json, Value};

use crate::consumer::{start_service, terminate, write_config};
use crate::gateway::gateway_config;
use crate::kubernetes::{post, source_config, Running};
use crate::pipeline::{config, database_with, RunningSource};

/// A file of the repository.
fn shipped(path: &str) -> anyhow::Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Ok(std::fs::read_to_string(root.join(path))?)
}

fn spec(path: &str, upstream: &Upstream) -> Value {
    json!({"path": {"type": "PathPrefix", "value": path}, "upstreams": [{"target": upstream.target}]})
}

#[tokio::test]
async fn routes_from_a_postgres_table_and_from_custom_resources_reach_nginx() -> anyhow::Result<()>
{
    let stack = Stack::from_env();
    let (prefix, state) = (unique_name("gwp"), tempfile::tempdir()?);
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);

    let (db, client) = database_with(&stack, &shipped("schemas/sql/gateway_routes.sql")?).await?;
    let pg = RunningSource::streaming(
        &stack.kafka_brokers,
        config(&db.url, "pg"),
        &prefix,
        &client,
    )
    .await?;
    let fake = FakeApiServer::start().await?;
    let kube = fake.client()?;
    let mut k8s_config = source_config(&fake, vec![]);
    k8s_config.crd_groups = vec![changewire_schemas::gateway::GROUP.into()];
    let k8s_state = tempfile::tempdir()?;
    let k8s = Running::start(&stack, k8s_config, &prefix, k8s_state.path())?;
    let crd: Value =
        figment::Figment::from(Yaml::string(&shipped("schemas/crds/route.yaml")?)).extract()?;
    let crds: Api<DynamicObject> = Api::all_with(kube.clone(), &ApiResource::erase::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(&()));
    crds.create(&PostParams::default(), &serde_json::from_value(crd)?)
        .await?;
    let gvk = GroupVersionKind::gvk(changewire_schemas::gateway::GROUP, "v1alpha1", "Route");
    let routes: Api<DynamicObject> = Api::namespaced_with(
        kube.clone(),
        "team",
        &ApiResource::from_gvk_with_plural(&gvk, "routes"),
    );

    client
        .execute("INSERT INTO gateway_routes (namespace, name, spec) VALUES ('team', 'from-table', $1::text::jsonb)", &[&spec("/table", &a).to_string()])
        .await?;
    let web = json!({"apiVersion": "gateway.changewire.dev/v1alpha1", "kind": "Route",
        "metadata": {"name": "from-cluster", "namespace": "team"}, "spec": spec("/cluster", &b)});
    routes
        .create(&post("platform-team"), &serde_json::from_value(web)?)
        .await?;

    let table_topic = format!("{prefix}.pg.public.gateway_routes");
    let kind_topic = format!("{prefix}.k8s.gateway.changewire.dev.Route");
    for topic in [&table_topic, &kind_topic] {
        TestConsumer::once_created(&stack, topic, Duration::from_secs(30)).await?;
    }
    let nginx = NginxDir::new()?;
    let [listen, health] = free_ports()?;
    let gateway = format!(
        "debounce_ms = 50\n[nginx]\ndir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\nhealth_listen = \"127.0.0.1:{}\"\n[status_write_back]\napi_url = \"{}\"\n",
        nginx.path().display(),
        health,
        fake.url()
    );
    let service_config = gateway_config(
        &stack,
        &prefix,
        &[&table_topic, &kind_topic],
        state.path(),
        &gateway,
    )?;
    let path = write_config(state.path(), "gateway", &service_config)?;
    let service = start_service(
        &workspace_binary("changewire-consumer")?,
        &path,
        &state.path().join("gateway.log"),
    )?;
    let url = format!("http://127.0.0.1:{listen}");
    let http = reqwest::Client::new();
    let answers = |path: &'static str, expected: (u16, &'static str)| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            eventually(
                &format!("{path} answers {expected:?}"),
                Duration::from_secs(60),
                async || {
                    let got = request(&http, "GET", &format!("{url}{path}"), &[]).await;
                    // Only a proxied answer's body is compared (nginx's own 404 is a page).
                    Ok(got.is_ok_and(|(status, body)| {
                        status == expected.0 && (status != 200 || body == expected.1)
                    }))
                },
            )
            .await
        }
    };
    answers("/table/x", (200, "a")).await?;
    answers("/cluster/x", (200, "b")).await?;
    let condition = async |name: &str, kind: &str| -> anyhow::Result<Value> {
        let object = serde_json::to_value(routes.get(name).await?)?;
        let conditions = object["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(conditions
            .into_iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_default())
    };
    eventually(
        "Programmed written back",
        Duration::from_secs(30),
        async || Ok(condition("from-cluster", "Programmed").await?["status"] == "True"),
    )
    .await?;
    let accepted = condition("from-cluster", "Accepted").await?;
    assert_eq!(
        (
            accepted["status"].as_str(),
            accepted["observedGeneration"].as_i64()
        ),
        (Some("True"), Some(1))
    );

    // A bad regex: refused, written back as not accepted; the old spec stays served.
    let bad = json!({"spec": {"path": {"type": "RegularExpression", "value": "^/(x"}}});
    routes
        .patch(
            "from-cluster",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(bad),
        )
        .await?;
    eventually(
        "Accepted False written back",
        Duration::from_secs(30),
        async || {
            let accepted = condition("from-cluster", "Accepted").await?;
            Ok(accepted["status"] == "False" && accepted["observedGeneration"] == 2)
        },
    )
    .await?;
    let refused = condition("from-cluster", "Accepted").await?;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid regular expression"),
        "{refused}"
    );
    assert_eq!(refused["reason"], "Invalid");
    answers("/cluster/x", (200, "b")).await?;

    client
        .execute(
            "UPDATE gateway_routes SET spec = $1::text::jsonb WHERE name = 'from-table'",
            &[&spec("/table", &b).to_string()],
        )
        .await?;
    answers("/table/x", (200, "b")).await?;
    routes
        .delete("from-cluster", &DeleteParams::default())
        .await?;
    client
        .execute("DELETE FROM gateway_routes WHERE name = 'from-table'", &[])
        .await?;
    answers("/cluster/x", (404, "")).await?;
    answers("/table/x", (404, "")).await?;

    terminate(service)?;
    k8s.stop().await?;
    pg.stop().await
}
