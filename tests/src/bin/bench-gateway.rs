//! Gateway benchmark:
//! `cargo run --release -p changewire-tests --bin bench-gateway -- [ROUTES] [CHANGES]`
//!
//! On the local stack (`scripts/stack up`), with nginx and Caddy installed, in
//! one run:
//! 1. loads ROUTES routes (default 1,000): half as rows of the routes table
//!    (through the Postgres producer), half as Route custom resources on the
//!    test API server (through the Kubernetes producer), each `/r<i>` to
//!    upstream `old`; the gateway service (in this process) serves them on one
//!    nginx and one Caddy;
//! 2. makes CHANGES changes (default 200) one at a time, alternately a row
//!    commit and a custom-resource write, each moving one route to upstream
//!    `new`, and takes the time from the commit (or the API server's answer)
//!    until nginx and until Caddy serve it;
//! 3. the baseline, same run and same 1,000-route configs: applying one change
//!    by hand, without changewire (nginx: edit the file, `nginx -t`, `nginx -s
//!    reload`, until served; Caddy: `POST /config/` of the edited config, until
//!    served), 20 times each;
//! 4. prints p50 and p99 of each, and the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use changewire_consumer::runtime::{self, AssignmentMode};
use changewire_consumer::services::gateway::{Gateway, GatewayConfig};
use changewire_kafka::Publisher;
use changewire_producer::checkpoint::SledCheckpoints;
use changewire_producer::kubernetes::{KubernetesConfig, KubernetesSource, SledObjects};
use changewire_producer::postgres::{PostgresConfig, PostgresSource, SnapshotMode};
use changewire_schemas::storage::open_sled;
use changewire_schemas::{Codec, TopicNames};
use changewire_tests::bench::runtime_config;
use changewire_tests::gateway::{Caddy, NginxDir, Upstream};
use changewire_tests::kube_api::FakeApiServer;
use changewire_tests::servers::free_ports;
use changewire_tests::{unique_name, Stack, TestConsumer, TestDatabase};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{json, Value};
use tokio::sync::watch;

const GROUP: &str = changewire_schemas::gateway::GROUP;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arg = |n: usize, default: usize| {
        std::env::args()
            .nth(n)
            .map_or(Ok(default), |a| a.parse::<usize>())
    };
    let (routes, changes) = (arg(1, 1_000)?, arg(2, 200)?);
    ensure!(changes <= routes, "CHANGES may be at most ROUTES");
    changewire_schemas::diagnostics::init_logging(Default::default());
    let stack = Stack::from_env();
    let prefix = unique_name("benchgw");
    let (old, new) = (Upstream::start("old").await?, Upstream::start("new").await?);
    let spec = |i: usize, upstream: &Upstream| json!({"path": {"type": "PathPrefix", "value": format!("/r{i}")}, "upstreams": [{"target": upstream.target}]});

    // Routes: even numbers in the table, odd ones in the cluster.
    let db = TestDatabase::create(&stack).await?;
    let sql = db.connect().await?;
    sql.batch_execute(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/sql/gateway_routes.sql"
    ))?)
    .await?;
    for i in (0..routes).step_by(2) {
        sql.execute(
            "INSERT INTO gateway_routes (name, spec) VALUES ($1, $2::text::jsonb)",
            &[&format!("r{i}"), &spec(i, &old).to_string()],
        )
        .await?;
    }
    let fake = FakeApiServer::start().await?;
    let kube = fake.client()?;
    let crd: Value = serde_json::from_str(&yaml_to_json("schemas/crds/route.yaml")?)?;
    let crds: Api<DynamicObject> = Api::all_with(kube.clone(), &ApiResource::erase::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(&()));
    crds.create(&PostParams::default(), &serde_json::from_value(crd)?)
        .await?;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "Route"),
        "routes",
    );
    let crs: Api<DynamicObject> = Api::namespaced_with(kube.clone(), "default", &resource);
    for i in (1..routes).step_by(2) {
        let route = json!({"apiVersion": format!("{GROUP}/v1alpha1"), "kind": "Route", "metadata": {"name": format!("r{i}")}, "spec": spec(i, &old)});
        crs.create(&PostParams::default(), &serde_json::from_value(route)?)
            .await?;
    }

    let (stop, shutdown) = watch::channel(false);
    let states = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let names = TopicNames::new(&prefix)?;
    let postgres = PostgresSource::new(
        pg_config(&db.url),
        names.clone(),
        Arc::new(Codec::json()?),
        Publisher::for_source(&stack.kafka_config())?,
        Arc::new(SledCheckpoints::open(states[0].path())?),
    );
    let k8s_config: KubernetesConfig = toml::from_str(&format!(
        "name = \"k8s\"\napi_url = \"{}\"\ncrd_groups = [\"{GROUP}\"]\n",
        fake.url()
    ))?;
    let kubernetes = KubernetesSource::new(
        k8s_config,
        names,
        Arc::new(Codec::json()?),
        Publisher::for_source(&stack.kafka_config())?,
        Arc::new(SledObjects::open(&open_sled(states[1].path())?, "k8s")?),
    );
    let pg_shutdown = shutdown.clone();
    let pg_task = tokio::spawn(async move { postgres.run(pg_shutdown).await });
    let k8s_task = tokio::spawn(kubernetes.run(shutdown.clone()));
    let topics = [
        format!("{prefix}.pg.public.gateway_routes"),
        format!("{prefix}.k8s.{GROUP}.Route"),
    ];
    for topic in &topics {
        TestConsumer::once_created(&stack, topic, Duration::from_secs(120)).await?;
    }

    let nginx = NginxDir::new()?;
    let [admin, caddy_listen, caddy_health, nginx_listen, nginx_health] = free_ports()?;
    let caddy = Caddy::start([admin, caddy_listen, caddy_health]).await?;
    let gateway: GatewayConfig = toml::from_str(&format!(
        "debounce_ms = 50\nmax_delay_ms = 200\ndrift_check_s = 3600\n[nginx]\ndir = \"{}\"\nlisten = \"127.0.0.1:{nginx_listen}\"\nhealth_listen = \"127.0.0.1:{nginx_health}\"\n[caddy]\nadmin_url = \"{}\"\nlisten = \"{}\"\nhealth_listen = \"{}\"\n",
        nginx.path().display(), caddy.admin_url, caddy.listen, caddy.health_listen
    ))?;
    let mut config = runtime_config(&stack, &prefix, "gateway", &topics[0], states[2].path());
    config.service.subscribe = topics.to_vec();
    config.service.assignment = AssignmentMode::Static;
    config.service.tick_interval_ms = Some(50);
    config.service.batch_linger_ms = 5;
    // librdkafka waits up to 500 ms for a fetch to fill by default: most of a
    // change's latency, as config/gateway.toml says.
    config
        .kafka
        .properties
        .insert("fetch.wait.max.ms".into(), "10".into());
    runtime::ensure_topic(&config, &gateway.status_topic(&config), 1).await?;
    let (handler, sinks) = Gateway::new(&config, &gateway)?;
    let service = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { runtime::run(&config, handler, sinks, shutdown).await }
    });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let targets = [
        format!("http://127.0.0.1:{nginx_listen}"),
        format!("http://{}", caddy.listen),
    ];
    let started = Instant::now();
    for target in &targets {
        for i in [routes - 2, routes - 1] {
            served(&http, target, i, "old", Duration::from_secs(300))
                .await
                .with_context(|| format!("initial load on {target}"))?;
        }
    }
    println!(
        "routes                       {routes} ({} in the table, {} custom resources)",
        routes.div_ceil(2),
        routes / 2
    );
    println!(
        "initial load served in       {:.1} s (both gateways)",
        started.elapsed().as_secs_f64()
    );

    let (mut by_nginx, mut by_caddy) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let committed = if i % 2 == 0 {
            sql.execute(
                "UPDATE gateway_routes SET spec = $1::text::jsonb WHERE name = $2",
                &[&spec(i, &new).to_string(), &format!("r{i}")],
            )
            .await?;
            Instant::now()
        } else {
            crs.patch(
                &format!("r{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec(i, &new)})),
            )
            .await?;
            Instant::now()
        };
        by_nginx.push(
            served(&http, &targets[0], i, "new", Duration::from_secs(30))
                .await?
                .duration_since(committed),
        );
        by_caddy.push(
            served(&http, &targets[1], i, "new", Duration::from_secs(30))
                .await?
                .duration_since(committed),
        );
    }

    let by_hand_nginx = nginx_by_hand(&nginx, &http, &targets[0], &old, &new, routes).await?;
    let by_hand_caddy = caddy_by_hand(&caddy, &http, &targets[1], &new, routes).await?;
    let _ = stop.send(true);
    service.await??;
    pg_task.await??;
    k8s_task.await??;

    let (n50, n99) = percentiles(&mut by_nginx);
    let (c50, c99) = percentiles(&mut by_caddy);
    let (hn50, hn99) = percentiles(&mut by_hand_nginx.clone());
    let (hc50, hc99) = percentiles(&mut by_hand_caddy.clone());
    println!(
        "changes                      {changes} (half row commits, half custom-resource writes)"
    );
    println!(
        "commit to served, nginx      p50 {:.0} ms, p99 {:.0} ms",
        ms(n50),
        ms(n99)
    );
    println!(
        "commit to served, Caddy      p50 {:.0} ms, p99 {:.0} ms (measured after nginx served)",
        ms(c50),
        ms(c99)
    );
    println!(
        "by hand, nginx (baseline)    p50 {:.0} ms, p99 {:.0} ms (edit, nginx -t, reload, served)",
        ms(hn50),
        ms(hn99)
    );
    println!(
        "by hand, Caddy (baseline)    p50 {:.0} ms, p99 {:.0} ms (POST /config/, served)",
        ms(hc50),
        ms(hc99)
    );
    println!(
        "ratio to by hand, p50        nginx {:.1}x, Caddy {:.1}x",
        ms(n50) / ms(hn50),
        ms(c50) / ms(hc50)
    );
    println!(
        "target p99 < 1 s             nginx {}, Caddy {}",
        met(n99),
        met(c99)
    );
    Ok(())
}

fn pg_config(url: &str) -> PostgresConfig {
    PostgresConfig {
        name: "pg".into(),
        url: url.into(),
        password: None,
        slot: Some(unique_name("slot")),
        publication: None,
        include: vec![],
        exclude: vec![],
        snapshot: SnapshotMode::Initial,
        snapshot_chunk_rows: 1_000,
        tombstones: false,
        topic_partitions: 1,
        redact: vec![],
        redaction_key: None,
        tls: Default::default(),
        max_in_flight: 10_000,
    }
}

/// A shipped YAML file as JSON text (the CRD has only maps, lists and scalars).
fn yaml_to_json(path: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )?;
    let value: Value = serde_norway::from_str(&text)?;
    Ok(value.to_string())
}

/// Polls `GET /r<i>` every 2 ms until upstream `name` answers; when it did.
async fn served(
    http: &reqwest::Client,
    target: &str,
    i: usize,
    name: &str,
    within: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let answer = http.get(format!("{target}/r{i}")).send().await;
        if let Ok(response) = answer {
            if response.status().is_success() && response.text().await? == name {
                return Ok(Instant::now());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "/r{i} on {target} never answered {name}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One route moved by hand in the running nginx config, 20 times.
async fn nginx_by_hand(
    nginx: &NginxDir,
    http: &reqwest::Client,
    target: &str,
    old: &Upstream,
    new: &Upstream,
    routes: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for round in 0..20 {
        let i = routes - 1 - round;
        let text = std::fs::read_to_string(nginx.config())?;
        let block = format!(
            "upstream cw_r{} {{\n        server {} ",
            route_index(&text, i)?,
            old.target
        );
        ensure!(text.contains(&block), "route {i}'s upstream block");
        let started = Instant::now();
        std::fs::write(
            nginx.config(),
            text.replace(&block, &block.replace(&old.target, &new.target)),
        )?;
        for args in [&["-t", "-q"][..], &["-s", "reload"][..]] {
            let status = std::process::Command::new("nginx")
                .arg("-p")
                .arg(nginx.path())
                .arg("-c")
                .arg(nginx.config())
                .args(args)
                .status()?;
            ensure!(status.success(), "nginx {args:?}");
        }
        times.push(
            served(http, target, i, "new", Duration::from_secs(30))
                .await?
                .duration_since(started),
        );
    }
    Ok(times)
}

/// The `cw_r<n>` index nginx's rendered config gives route `/r<i>`.
fn route_index(text: &str, i: usize) -> anyhow::Result<usize> {
    let location = format!("location ^~ /r{i}/ {{");
    let at = text.find(&location).context("the route's location")?;
    let pass = text[at..]
        .find("proxy_pass http://cw_r")
        .context("its proxy_pass")?
        + at
        + "proxy_pass http://cw_r".len();
    Ok(text[pass..].split(';').next().unwrap_or_default().parse()?)
}

/// One route moved by hand through Caddy's admin API, 20 times.
async fn caddy_by_hand(
    caddy: &Caddy,
    http: &reqwest::Client,
    target: &str,
    new: &Upstream,
    routes: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for round in 0..20 {
        let i = routes - 1 - round;
        let mut config = caddy.running().await?;
        let path = json!(format!("/r{i}"));
        let list = config
            .pointer_mut("/apps/http/servers/changewire/routes")
            .and_then(Value::as_array_mut)
            .context("Caddy's routes")?;
        let route = (list.iter_mut())
            .find(|r| r.pointer("/match/0/path/0") == Some(&path))
            .context("the route in Caddy's config")?;
        let proxy = route["handle"]
            .as_array_mut()
            .and_then(|h| h.last_mut())
            .context("its proxy")?;
        proxy["upstreams"] = json!([{"dial": new.target}]);
        let started = Instant::now();
        http.post(format!("{}/config/", caddy.admin_url))
            .json(&config)
            .send()
            .await?
            .error_for_status()?;
        times.push(
            served(http, target, i, "new", Duration::from_secs(30))
                .await?
                .duration_since(started),
        );
    }
    Ok(times)
}

fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn met(p99: Duration) -> &'static str {
    if p99 < Duration::from_secs(1) {
        "met"
    } else {
        "not met"
    }
}
