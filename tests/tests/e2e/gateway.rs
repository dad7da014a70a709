//! The gateway service against real nginx and real Caddy on loopback: routes,
//! weights, rate limits, API keys, model fallbacks, refusals per resource,
//! stale changes, drift repair and SIGKILLs, checked with real HTTP requests.

use std::path::Path;
use std::time::Duration;

use changewire_consumer::config::{Assignment, ConsumerConfig};
use changewire_consumer::services::gateway::GatewayConfig;
use changewire_schemas::gateway::{GROUP, VERSION};
use changewire_schemas::{fixtures, ChangeEvent, EventId, Op, Origin};
use changewire_tests::gateway::{eventually, request, Caddy, NginxDir, Upstream};
use changewire_tests::servers::free_ports;
use changewire_tests::{create_topics, unique_name, workspace_binary, Stack, TestConsumer};
use serde_json::{json, Value};

use crate::consumer::{publish_keyed, service_config, start_service, terminate, write_config};

const TOKEN: &str = "gateway-status-token";

/// A change to the custom resource `kind` `team/<name>` (uid `<name>-uid`
/// unless given), at `generation`.
pub(crate) fn resource(
    kind: &str,
    name: &str,
    generation: i64,
    op: Op,
    spec: Value,
) -> ChangeEvent {
    let uid = format!("{name}-uid");
    let mut event = fixtures::kubernetes_create("k8s");
    let version = format!("{generation}{}", op.code());
    event.id = EventId::kubernetes("k8s", &uid, &version);
    event.op = op;
    event.source.ts_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    if let Origin::Kubernetes(origin) = &mut event.source.origin {
        origin.group = GROUP.into();
        origin.version = VERSION.into();
        origin.kind = kind.into();
        origin.namespace = Some("team".into());
        origin.name = name.into();
        origin.uid = uid.clone();
        origin.resource_version = version;
        origin.status_only = false;
    }
    let object = json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": kind,
        "metadata": {"name": name, "namespace": "team", "uid": uid, "generation": generation},
        "spec": spec});
    event.diff = None;
    (event.before, event.after) = match op {
        Op::Delete => (Some(object), None),
        _ => (None, Some(object)),
    };
    event
}

pub(crate) async fn publish(
    stack: &Stack,
    topic: &str,
    events: &[ChangeEvent],
) -> anyhow::Result<()> {
    let records = events
        .iter()
        .map(|e| {
            let key = e.id.as_str().rsplit_once(':').map_or("", |(k, _)| k);
            Ok((key.as_bytes().to_vec(), serde_json::to_vec(e)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    publish_keyed(stack, topic, records).await?;
    Ok(())
}

/// The gateway service's config: `gateway` is the `[gateway]` section's TOML.
pub(crate) fn gateway_config(
    stack: &Stack,
    prefix: &str,
    topics: &[&str],
    state: &Path,
    gateway: &str,
) -> anyhow::Result<ConsumerConfig> {
    let mut config = service_config(stack, prefix, topics[0], state);
    config.service.subscribe = topics.iter().map(|t| t.to_string()).collect();
    config.service.assignment = Assignment::Static;
    config.service.tick_interval_ms = Some(100);
    config.service.name = "gateway".into();
    let gateway: GatewayConfig = toml::from_str(gateway)?;
    config.gateway = Some(gateway);
    Ok(config)
}

/// The nginx section for `dir`, listening on fresh ports: the section, the
/// traffic URL, and one more free port (for the status API).
fn nginx_section(dir: &NginxDir) -> anyhow::Result<(String, String, u16)> {
    let [listen, health, spare] = free_ports()?;
    let section = format!(
        "[nginx]\ndir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\nhealth_listen = \"127.0.0.1:{health}\"\n",
        dir.path().display()
    );
    Ok((section, format!("http://127.0.0.1:{listen}"), spare))
}

/// The status API of a running gateway service, and its log (shown when a
/// wait fails).
struct StatusApi {
    client: reqwest::Client,
    url: String,
    log: std::path::PathBuf,
}

impl StatusApi {
    /// `name`'s state and reason now (empty when it has no status).
    async fn state_of(&self, name: &str) -> anyhow::Result<(String, String)> {
        let body: Value = (self.client.get(format!("{}/v1/status", self.url)))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let all = body["resources"].as_array().cloned().unwrap_or_default();
        let found = all.iter().find(|s| s["resource"]["name"] == name);
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Ok(found
            .map(|s| (text(&s["state"]), text(&s["reason"])))
            .unwrap_or_default())
    }

    /// Waits until `name` is in `state`; its reason.
    async fn wait_for(&self, name: &str, state: &str) -> anyhow::Result<String> {
        let mut reason = String::new();
        let waited = eventually(
            &format!("{name} {state}"),
            Duration::from_secs(60),
            async || {
                let (now, why) = self.state_of(name).await?;
                reason = why;
                Ok(now == state)
            },
        )
        .await;
        if let Err(error) = waited {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("{error}; the service's log ends:\n{}", tail.join("\n"));
        }
        Ok(reason)
    }
}

/// Shares of `count` GETs of `path` on `host` by the body (the upstream's name).
async fn spread(
    client: &reqwest::Client,
    url: &str,
    host: &str,
    path: &str,
    count: usize,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..count {
        let (status, body) =
            request(client, "GET", &format!("{url}{path}"), &[("Host", host)]).await?;
        *seen.entry(format!("{status} {body}")).or_default() += 1;
    }
    Ok(seen)
}

fn route(hosts: &[&str], path: &str, upstreams: &[(&Upstream, u32)]) -> Value {
    let upstreams: Vec<Value> = (upstreams.iter())
        .map(|(u, weight)| json!({"target": u.target, "weight": weight}))
        .collect();
    json!({"hosts": hosts, "path": {"type": "PathPrefix", "value": path}, "upstreams": upstreams})
}

/// `/private` answers 401 without a key and with an unknown one, and
/// `upstream`'s name with a key of the mounted Secret.
async fn guarded_by_keys(
    client: &reqwest::Client,
    url: &str,
    upstream: &str,
) -> anyhow::Result<()> {
    let private = format!("{url}/private");
    assert_eq!(request(client, "GET", &private, &[]).await?.0, 401);
    let wrong = request(client, "GET", &private, &[("X-Api-Key", "wrong")]).await?;
    assert_eq!(wrong.0, 401);
    let right = request(client, "GET", &private, &[("X-Api-Key", "key-two")]).await?;
    assert_eq!(right, (200, upstream.to_owned()));
    Ok(())
}

/// A POST to a model API at `url` asking for `model`.
async fn ask_model(
    client: &reqwest::Client,
    url: &str,
    model: &str,
) -> anyhow::Result<(u16, String)> {
    request(client, "POST", url, &[("X-Model", model)]).await
}

fn keys_dir(dir: &Path) -> anyhow::Result<()> {
    let secret = dir.join("team/api-keys");
    std::fs::create_dir_all(&secret)?;
    std::fs::write(secret.join("keys"), "key-one\nkey-two\n")?;
    Ok(())
}

#[tokio::test]
async fn nginx_serves_routes_policies_and_model_fallbacks_and_refuses_bad_resources_alone(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, state, secrets) = (
        unique_name("gw"),
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    keys_dir(secrets.path())?;
    let topic = format!("{prefix}.k8s.gateway");
    create_topics(&stack, &[&topic], 2).await?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let (failing, healthy) = (
        Upstream::start("failing").await?,
        Upstream::start("healthy").await?,
    );
    failing.answer(503);
    let nginx = NginxDir::new()?;
    let (section, url, api_port) = nginx_section(&nginx)?;
    let api = format!("http://127.0.0.1:{api_port}");
    let gateway = format!(
        "debounce_ms = 100\ndrift_check_s = 1\nsecrets_dir = \"{}\"\nlisten = \"127.0.0.1:{api_port}\"\napi_tokens = [\"{TOKEN}\"]\n{section}",
        secrets.path().display()
    );
    let config = gateway_config(&stack, &prefix, &[&topic], state.path(), &gateway)?;
    let path = write_config(state.path(), "gateway", &config)?;
    let log = state.path().join("gateway.log");
    let service = start_service(&workspace_binary("changewire-consumer")?, &path, &log)?;

    let events = vec![
        resource(
            "Route",
            "shop",
            1,
            Op::Create,
            route(&["shop.test"], "/api", &[(&a, 3), (&b, 1)]),
        ),
        resource(
            "Route",
            "limited",
            1,
            Op::Create,
            route(&[], "/limited", &[(&a, 1)]),
        ),
        resource(
            "RateLimitPolicy",
            "limit",
            1,
            Op::Create,
            json!({"targetRef": {"kind": "Route", "name": "limited"}, "requests": 2, "per": "Second"}),
        ),
        resource(
            "Route",
            "private",
            1,
            Op::Create,
            route(&[], "/private", &[(&b, 1)]),
        ),
        resource(
            "AuthPolicy",
            "keys",
            1,
            Op::Create,
            json!({"targetRef": {"kind": "Route", "name": "private"}, "apiKeys": {"secretRef": {"name": "api-keys", "key": "keys"}}}),
        ),
        resource(
            "ModelRoute",
            "gpt",
            1,
            Op::Create,
            json!({"model": "gpt-4o", "providers": [
            {"name": "first", "target": failing.target, "priority": 0}, {"name": "second", "target": healthy.target, "priority": 1}]}),
        ),
        resource(
            "Route",
            "bad-regex",
            1,
            Op::Create,
            json!({"path": {"type": "RegularExpression", "value": "^/(x"}, "upstreams": [{"target": a.target}]}),
        ),
        resource(
            "Route",
            "unknown-upstream",
            1,
            Op::Create,
            route(&[], "/nowhere", &[]),
        ),
    ];
    let mut events = events;
    if let Some(after) = events[7].after.as_mut() {
        after["spec"]["upstreams"] = json!([{"target": "no-such-host.invalid:80"}]);
    }
    publish(&stack, &topic, &events).await?;

    let client = reqwest::Client::new();
    let status = StatusApi {
        client: client.clone(),
        url: api.clone(),
        log,
    };
    status.wait_for("shop", "Programmed").await?;
    let clash = resource(
        "Route",
        "clash",
        1,
        Op::Create,
        route(&["shop.test"], "/api", &[(&b, 1)]),
    );
    publish(&stack, &topic, &[clash]).await?;
    let clash = status.wait_for("clash", "Rejected").await?;
    assert!(
        clash.contains("conflicts with Route/team/shop"),
        "the older route keeps its traffic: {clash}"
    );
    let shares = spread(&client, &url, "shop.test", "/api/items", 200).await?;
    let (to_a, to_b) = (
        shares.get("200 a").copied().unwrap_or(0),
        shares.get("200 b").copied().unwrap_or(0),
    );
    assert_eq!(to_a + to_b, 200, "{shares:?}");
    assert!(
        (130..=170).contains(&to_a),
        "weights 3:1 give a about 150 of 200: {shares:?}"
    );
    assert_eq!(
        request(
            &client,
            "GET",
            &format!("{url}/apix"),
            &[("Host", "shop.test")]
        )
        .await?
        .0,
        404,
        "a prefix matches whole segments"
    );

    let mut limited = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..20 {
        *limited
            .entry(
                request(&client, "GET", &format!("{url}/limited"), &[])
                    .await?
                    .0,
            )
            .or_default() += 1;
    }
    assert!(
        limited.get(&429).copied().unwrap_or(0) >= 10 && limited.contains_key(&200),
        "2 per second: {limited:?}"
    );

    guarded_by_keys(&client, &url, "b").await?;

    let answer = ask_model(&client, &format!("{url}/v1/chat/completions"), "gpt-4o").await?;
    assert_eq!(
        answer,
        (200, "healthy".to_owned()),
        "falls back when the first provider answers 503"
    );
    assert!(failing.hits() >= 1, "the first provider was tried");
    assert_eq!(
        ask_model(&client, &format!("{url}/v1/chat/completions"), "other")
            .await?
            .0,
        404
    );

    let regex = status.wait_for("bad-regex", "Rejected").await?;
    assert!(regex.contains("invalid regular expression"), "{regex}");
    let unknown = status.wait_for("unknown-upstream", "Rejected").await?;
    assert!(
        unknown.contains("nginx -t") && unknown.contains("host not found"),
        "{unknown}"
    );
    let unauthorized = client
        .get(format!("{api}/v1/status"))
        .send()
        .await?
        .status();
    assert_eq!(unauthorized, 401, "the status API needs a token");

    // Updates move traffic; a replayed older generation changes nothing; a
    // delete removes the route.
    publish(
        &stack,
        &topic,
        &[resource(
            "Route",
            "shop",
            2,
            Op::Update,
            route(&["shop.test"], "/api", &[(&b, 1)]),
        )],
    )
    .await?;
    eventually("shop moved to b", Duration::from_secs(30), async || {
        Ok(spread(&client, &url, "shop.test", "/api", 8)
            .await?
            .get("200 b")
            == Some(&8))
    })
    .await?;
    let mut stale = resource(
        "Route",
        "shop",
        1,
        Op::Update,
        route(&["shop.test"], "/api", &[(&a, 1)]),
    );
    stale.id = EventId::kubernetes("k8s", "shop-uid", "replayed");
    publish(
        &stack,
        &topic,
        &[
            stale,
            resource("Route", "private", 2, Op::Delete, json!({})),
        ],
    )
    .await?;
    eventually("private deleted", Duration::from_secs(30), async || {
        let private = format!("{url}/private");
        Ok(
            request(&client, "GET", &private, &[("X-Api-Key", "key-one")])
                .await?
                .0
                == 404,
        )
    })
    .await?;
    assert_eq!(
        spread(&client, &url, "shop.test", "/api", 8)
            .await?
            .get("200 b"),
        Some(&8),
        "the stale change was a no-op"
    );
    let policy = status.wait_for("keys", "Rejected").await?;
    assert!(
        policy.contains("does not exist"),
        "a policy whose route is gone: {policy}"
    );

    // Drift: a hand edit is reverted and reported.
    let rendered = std::fs::read_to_string(nginx.config())?;
    std::fs::write(nginx.config(), format!("{rendered}# edited by hand\n"))?;
    eventually("drift repaired", Duration::from_secs(30), async || {
        Ok(std::fs::read_to_string(nginx.config())? == rendered)
    })
    .await?;

    let consumer = TestConsumer::from_beginning(&stack, &format!("{prefix}.gateway.status"))?;
    let mut records: Vec<Value> = Vec::new();
    let repaired = consumer
        .read_until(Duration::from_secs(30), |record| {
            let value: Value = (record.value.as_deref())
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            let done = value["apply"]["result"] == "drift_repaired";
            records.push(value);
            done
        })
        .await?;
    assert!(repaired, "a drift_repaired outcome on the status topic");
    assert!(records.iter().any(|r| r["apply"]["result"] == "applied"));
    assert!(records.iter().any(|r| r["resource"]["state"] == "Rejected"));
    assert!(nginx.live_config_is_valid()?);
    terminate(service)?;
    Ok(())
}

#[tokio::test]
async fn sigkills_during_applies_leave_nginx_on_a_valid_config_and_the_next_start_converges(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, state) = (unique_name("gwk"), tempfile::tempdir()?);
    let topic = format!("{prefix}.k8s.gateway");
    create_topics(&stack, &[&topic], 1).await?;
    let upstream = Upstream::start("up").await?;
    let nginx = NginxDir::new()?;
    let (section, url, _) = nginx_section(&nginx)?;
    let gateway = format!("debounce_ms = 20\nmax_delay_ms = 50\n{section}");
    let config = gateway_config(&stack, &prefix, &[&topic], state.path(), &gateway)?;
    let path = write_config(state.path(), "gateway", &config)?;
    let (binary, log) = (
        workspace_binary("changewire-consumer")?,
        state.path().join("gateway.log"),
    );
    let client = reqwest::Client::new();
    let mut service = start_service(&binary, &path, &log)?;
    for round in 0..6 {
        let events: Vec<ChangeEvent> = (0..10)
            .map(|n| {
                resource(
                    "Route",
                    &format!("r{round}-{n}"),
                    1,
                    Op::Create,
                    route(&[], &format!("/r{round}-{n}"), &[(&upstream, 1)]),
                )
            })
            .collect();
        publish(&stack, &topic, &events).await?;
        // Kill as soon as the first route of the round is served: later ones are
        // still being applied.
        eventually(
            "a route of the round",
            Duration::from_secs(60),
            async || {
                let first = format!("{url}/r{round}-0");
                Ok(request(&client, "GET", &first, &[])
                    .await
                    .is_ok_and(|(s, _)| s == 200))
            },
        )
        .await?;
        drop(service);
        assert!(
            nginx.live_config_is_valid()?,
            "round {round}: the live config is valid after SIGKILL"
        );
        let (status, _) = request(&client, "GET", &format!("{url}/r{round}-0"), &[]).await?;
        assert_eq!(status, 200, "round {round}: nginx keeps serving");
        service = start_service(&binary, &path, &log)?;
    }
    eventually("every route served", Duration::from_secs(60), async || {
        for round in 0..6 {
            for n in 0..10 {
                if request(&client, "GET", &format!("{url}/r{round}-{n}"), &[])
                    .await?
                    .0
                    != 200
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })
    .await?;
    terminate(service)?;
    Ok(())
}

#[tokio::test]
async fn caddy_takes_routes_through_its_admin_api_and_refuses_what_it_cannot_enforce(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, state, secrets) = (
        unique_name("gwc"),
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    keys_dir(secrets.path())?;
    let topic = format!("{prefix}.k8s.gateway");
    create_topics(&stack, &[&topic], 1).await?;
    let [admin, listen, health, api_port, closed] = free_ports()?;
    let caddy = Caddy::start([admin, listen, health]).await?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let healthy = Upstream::start("healthy").await?;
    let api = format!("http://127.0.0.1:{api_port}");
    let gateway = format!(
        "debounce_ms = 100\ndrift_check_s = 1\nsecrets_dir = \"{}\"\nlisten = \"127.0.0.1:{api_port}\"\napi_tokens = [\"{TOKEN}\"]\n[caddy]\nadmin_url = \"{}\"\nlisten = \"{}\"\nhealth_listen = \"{}\"\n",
        secrets.path().display(), caddy.admin_url, caddy.listen, caddy.health_listen
    );
    let config = gateway_config(&stack, &prefix, &[&topic], state.path(), &gateway)?;
    let path = write_config(state.path(), "gateway", &config)?;
    let log = state.path().join("gateway.log");
    let service = start_service(&workspace_binary("changewire-consumer")?, &path, &log)?;
    let closed = format!("127.0.0.1:{closed}");
    publish(&stack, &topic, &[
        resource("Route", "shop", 1, Op::Create, route(&["shop.test"], "/api", &[(&a, 3), (&b, 1)])),
        resource("Route", "private", 1, Op::Create, route(&[], "/private", &[(&b, 1)])),
        resource("AuthPolicy", "keys", 1, Op::Create, json!({"targetRef": {"kind": "Route", "name": "private"}, "apiKeys": {"secretRef": {"name": "api-keys", "key": "keys"}}})),
        resource("RateLimitPolicy", "limit", 1, Op::Create, json!({"targetRef": {"kind": "Route", "name": "shop"}, "requests": 2, "per": "Second"})),
        resource("ModelRoute", "gpt", 1, Op::Create, json!({"model": "gpt-4o", "providers": [
            {"name": "down", "target": closed, "priority": 0}, {"name": "up", "target": healthy.target, "priority": 1}]})),
    ]).await?;
    let client = reqwest::Client::new();
    let status = StatusApi {
        client: client.clone(),
        url: api.clone(),
        log,
    };
    status.wait_for("shop", "Programmed").await?;
    let url = format!("http://{}", caddy.listen);
    let shares = spread(&client, &url, "shop.test", "/api/x", 200).await?;
    assert_eq!(
        shares.get("200 a").copied().unwrap_or(0),
        150,
        "round robin over a, a, a, b: {shares:?}"
    );
    guarded_by_keys(&client, &url, "b").await?;
    let answer = ask_model(&client, &format!("{url}/v1/chat"), "gpt-4o").await?;
    assert_eq!(
        answer,
        (200, "healthy".into()),
        "falls back past a provider that refuses connections"
    );
    let limit = status.wait_for("limit", "Rejected").await?;
    assert!(limit.contains("caddy-ratelimit"), "{limit}");

    // Someone replaces Caddy's config by hand: the drift check puts it back.
    let running = caddy.running().await?;
    let admin = running["admin"].clone();
    client
        .post(format!("{}/load", caddy.admin_url))
        .json(&json!({"admin": admin}))
        .send()
        .await?
        .error_for_status()?;
    eventually(
        "Caddy's config restored",
        Duration::from_secs(30),
        async || Ok(caddy.running().await? == running),
    )
    .await?;
    assert_eq!(
        request(
            &client,
            "GET",
            &format!("{url}/api/x"),
            &[("Host", "shop.test")]
        )
        .await?
        .0,
        200
    );
    terminate(service)?;
    Ok(())
}

#[tokio::test]
async fn a_reload_nginx_does_not_take_is_rolled_back_and_repaired_later() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let (prefix, state) = (unique_name("gwr"), tempfile::tempdir()?);
    let topic = format!("{prefix}.k8s.gateway");
    create_topics(&stack, &[&topic], 1).await?;
    let (a, b) = (Upstream::start("a").await?, Upstream::start("b").await?);
    let nginx = NginxDir::new()?;
    let (section, url, _) = nginx_section(&nginx)?;
    let section = section.replace("[nginx]\n", "[nginx]\nprobe_timeout_ms = 1000\n");
    let gateway = format!("debounce_ms = 50\ndrift_check_s = 2\n{section}");
    let config = gateway_config(&stack, &prefix, &[&topic], state.path(), &gateway)?;
    let path = write_config(state.path(), "gateway", &config)?;
    let service = start_service(
        &workspace_binary("changewire-consumer")?,
        &path,
        &state.path().join("gateway.log"),
    )?;
    let client = reqwest::Client::new();
    publish(
        &stack,
        &topic,
        &[resource(
            "Route",
            "shop",
            1,
            Op::Create,
            route(&[], "/shop", &[(&a, 1)]),
        )],
    )
    .await?;
    eventually("shop served by a", Duration::from_secs(60), async || {
        Ok(request(&client, "GET", &format!("{url}/shop"), &[])
            .await
            .is_ok_and(|r| r == (200, "a".into())))
    })
    .await?;
    let served = std::fs::read_to_string(nginx.config())?;

    // A stopped master takes no reload: the probe never sees the new config.
    let master = std::fs::read_to_string(nginx.path().join("nginx.pid"))?
        .trim()
        .to_owned();
    std::process::Command::new("kill")
        .args(["-STOP", &master])
        .status()?;
    publish(
        &stack,
        &topic,
        &[resource(
            "Route",
            "shop",
            2,
            Op::Update,
            route(&[], "/shop", &[(&b, 1)]),
        )],
    )
    .await?;
    let consumer = TestConsumer::from_beginning(&stack, &format!("{prefix}.gateway.status"))?;
    let mut outcome = Value::Null;
    let rolled_back = consumer
        .read_until(Duration::from_secs(60), |record| {
            outcome = (record.value.as_deref())
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            outcome["apply"]["result"] == "rolled_back"
        })
        .await?;
    std::process::Command::new("kill")
        .args(["-CONT", &master])
        .status()?;
    assert!(rolled_back, "a rolled_back outcome");
    let message = outcome["apply"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let served_digest = served
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("# config "))
        .unwrap_or("?");
    assert!(
        message.contains("did not answer config")
            && message.contains(&format!("rolled back to config {served_digest}")),
        "{message}"
    );
    assert!(nginx.live_config_is_valid()?);

    // Once nginx answers again, the drift check applies the desired config.
    eventually("shop served by b", Duration::from_secs(60), async || {
        Ok(request(&client, "GET", &format!("{url}/shop"), &[])
            .await
            .is_ok_and(|r| r == (200, "b".into())))
    })
    .await?;
    terminate(service)?;
    Ok(())
}
