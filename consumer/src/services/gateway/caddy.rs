//! The Caddy gateway: the plan as Caddy's JSON config, pushed through the admin
//! API with optimistic concurrency (`If-Match` on `POST /config/`; Caddy's ETag is
//! the FNV-1a hash of the config it serves), then probed on the health route.
//!
//! Caddy checks and provisions a new config before it swaps it in, and keeps
//! the old one when that fails: the rollback is Caddy's own. A refusal names a
//! route (`route 3: ...`); the resource that route came from is left out with
//! Caddy's message and the rest is pushed again.
//!
//! What stock Caddy cannot do is refused per resource rather than ignored:
//! rate limits (RateLimitPolicy, a ModelRoute's `requestsPerMinute`) need the
//! caddy-ratelimit module. Routes keep round-robin weights by repeating
//! upstreams; ModelRoute providers are tried in priority order on connection
//! errors (falling back on a 5xx answer is nginx only).

use std::collections::BTreeMap;
use std::time::Duration;

use changewire_schemas::gateway::{GatewaySpec, ModelRouteSpec, PathKind, RouteSpec};
use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::apply::{
    key_guards, Applied, Applier, ApplyError, ApplyResult, HealthProbe, KeyGuard, Secrets, Trigger,
    DIGEST_HEADER, HEALTH_PATH,
};
use super::desired::{Plan, Rejection, ResourceId};

/// Most resources left out of one apply on Caddy's word, and most retries of a
/// push another client's change overtook.
const MAX_REFUSED: usize = 20;
const MAX_RACES: usize = 3;
/// The name of the traffic server in Caddy's config.
const SERVER: &str = "changewire";

/// The `[gateway.caddy]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaddyConfig {
    /// The admin API (`http://127.0.0.1:2019`).
    pub admin_url: String,
    /// Where traffic is served (`:80`, `127.0.0.1:8080`).
    pub listen: String,
    /// Where the health route is served (the probe asks it).
    pub health_listen: std::net::SocketAddr,
    /// How long Caddy has to serve a pushed config.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
}

fn default_probe_timeout_ms() -> u64 {
    10_000
}

/// Applies plans to Caddy through its admin API.
pub struct CaddyGateway {
    config: CaddyConfig,
    secrets: Secrets,
    http: reqwest::Client,
    probe: HealthProbe,
}

/// A rendered config: the JSON, its digest, and which resource each route of
/// the traffic server came from.
struct Rendered {
    config: Value,
    digest: String,
    owners: Vec<ResourceId>,
    rejected: Vec<Rejection>,
}

impl CaddyGateway {
    /// The gateway `config` describes; API keys are read from `secrets`.
    pub fn new(config: &CaddyConfig, secrets: Secrets) -> Result<Self, ConfigError> {
        if !config.admin_url.starts_with("http://") && !config.admin_url.starts_with("https://") {
            return Err(ConfigError::invalid(
                "gateway.caddy.admin_url",
                "an http:// or https:// URL",
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| ConfigError::invalid("gateway.caddy", e.to_string()))?;
        let probe = HealthProbe::new(config.health_listen, config.probe_timeout_ms)
            .map_err(|e| ConfigError::invalid("gateway.caddy", e.to_string()))?;
        Ok(Self {
            config: config.clone(),
            secrets,
            http,
            probe,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.admin_url.trim_end_matches('/'))
    }

    /// Caddy's running config and its ETag.
    async fn running(&self) -> Result<(Value, String), ApplyError> {
        let unavailable =
            |e: reqwest::Error| ApplyError::Unavailable(format!("Caddy's admin API: {e}"));
        let response = self
            .http
            .get(self.url("/config/"))
            .send()
            .await
            .map_err(unavailable)?;
        if !response.status().is_success() {
            return Err(ApplyError::Unavailable(format!(
                "Caddy's admin API answered {}",
                response.status()
            )));
        }
        let body = response.bytes().await.map_err(unavailable)?;
        let etag = etag_of(&body);
        let config = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((config, etag))
    }

    /// Pushes `config` if Caddy still runs the config `etag` names: `Ok(None)`
    /// when taken, `Ok(Some(message))` when refused, `Err` for a lost race or
    /// an unreachable Caddy.
    async fn push(&self, config: &Value, etag: &str) -> Result<Result<(), Pushed>, ApplyError> {
        let response = self
            .http
            .post(self.url("/config/"))
            .header("If-Match", etag)
            .json(config)
            .send()
            .await
            .map_err(|e| ApplyError::Unavailable(format!("Caddy's admin API: {e}")))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Ok(match status.as_u16() {
            200..=299 => Ok(()),
            412 => Err(Pushed::Overtaken),
            400..=499 => Err(Pushed::Refused(body.trim().to_owned())),
            _ => {
                return Err(ApplyError::Unavailable(format!(
                    "Caddy answered {status}: {}",
                    body.trim()
                )))
            }
        })
    }
}

/// Why a push did not take.
enum Pushed {
    /// Another client changed the config since it was read.
    Overtaken,
    /// Caddy refused the config, with its message.
    Refused(String),
}

impl Applier for CaddyGateway {
    async fn apply(&self, plan: &Plan, trigger: Trigger) -> Result<Applied, ApplyError> {
        let mut plan = plan.clone();
        let mut refused = Vec::new();
        let mut races = 0;
        loop {
            let (running, etag) = self.running().await?;
            let rendered = render(&plan, &self.config, &self.secrets, running.get("admin"));
            if running == rendered.config {
                refused.extend(rendered.rejected);
                return Ok(Applied {
                    result: ApplyResult::Unchanged,
                    message: None,
                    rejected: refused,
                    config: rendered.digest,
                });
            }
            match self.push(&rendered.config, &etag).await? {
                Ok(()) => {
                    refused.extend(rendered.rejected);
                    if let Err(why) = self.probe.wait_for(&rendered.digest).await {
                        return Ok(Applied {
                            result: ApplyResult::Failed,
                            message: Some(why),
                            rejected: refused,
                            config: rendered.digest,
                        });
                    }
                    let drifted = trigger == Trigger::DriftCheck && !running.is_null();
                    return Ok(Applied {
                        result: if drifted {
                            ApplyResult::DriftRepaired
                        } else {
                            ApplyResult::Applied
                        },
                        message: drifted
                            .then(|| "the running config differed from the desired one".to_owned()),
                        rejected: refused,
                        config: rendered.digest,
                    });
                }
                Err(Pushed::Overtaken) if races < MAX_RACES => races += 1,
                Err(Pushed::Overtaken) => {
                    return Ok(failed(
                        "another client kept changing Caddy's config".into(),
                        refused,
                    ));
                }
                Err(Pushed::Refused(message)) => {
                    let owner = route_number(&message)
                        .and_then(|n| rendered.owners.get(n))
                        .cloned();
                    let Some(owner) = owner.filter(|_| refused.len() < MAX_REFUSED) else {
                        return Ok(failed(
                            format!(
                                "Caddy refused the config (it keeps the one it had): {message}"
                            ),
                            refused,
                        ));
                    };
                    refused.push(Rejection {
                        resource: owner.clone(),
                        reason: format!("Caddy: {message}"),
                    });
                    let (replanned, dangling) = plan.without(&owner);
                    refused.extend(dangling);
                    plan = replanned;
                }
            }
        }
    }
}

fn failed(message: String, rejected: Vec<Rejection>) -> Applied {
    Applied {
        result: ApplyResult::Failed,
        message: Some(message),
        rejected,
        config: String::new(),
    }
}

/// The route number in a refusal (`... route 3: ...`).
fn route_number(message: &str) -> Option<usize> {
    message.match_indices("route ").find_map(|(at, found)| {
        let rest = &message[at + found.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// Caddy's ETag of the config `body` it served at `/config/`: the FNV-1a hash
/// as eight hex digits.
fn etag_of(body: &[u8]) -> String {
    format!("\"/config/ {:08x}\"", fnv1a32(body))
}

/// FNV-1a, 32 bits.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The plan as Caddy's config; `admin` is kept as Caddy runs it.
fn render(plan: &Plan, config: &CaddyConfig, secrets: &Secrets, admin: Option<&Value>) -> Rendered {
    let (keys, mut rejected) = key_guards(plan, secrets);
    for (id, spec) in &plan.resources {
        let unenforceable = match spec {
            GatewaySpec::RateLimitPolicy(_) => "Caddy: rate limits need the caddy-ratelimit module, which stock Caddy lacks; not enforced",
            GatewaySpec::ModelRoute(model) if model.limits.as_ref().is_some_and(|l| l.requests_per_minute.is_some()) => {
                "Caddy: requestsPerMinute needs the caddy-ratelimit module, which stock Caddy lacks"
            }
            _ => continue,
        };
        rejected.push(Rejection {
            resource: id.clone(),
            reason: unenforceable.into(),
        });
    }
    let refused: Vec<&ResourceId> = rejected.iter().map(|r| &r.resource).collect();
    let served: Vec<&(ResourceId, GatewaySpec)> = plan
        .resources
        .iter()
        .filter(|(id, _)| !refused.contains(&id))
        .collect();
    let named_hosts: Vec<String> = {
        let mut hosts: Vec<String> = served
            .iter()
            .flat_map(|(_, spec)| match spec {
                GatewaySpec::Route(r) => r.hosts.clone(),
                GatewaySpec::ModelRoute(m) => m.hosts.clone(),
                _ => Vec::new(),
            })
            .map(|h| h.to_ascii_lowercase())
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    };
    let mut routes = Vec::new();
    let mut owners = Vec::new();
    // Exact paths first, then longer prefixes, then expressions, as nginx picks.
    let mut ordered: Vec<&(ResourceId, GatewaySpec)> = served.clone();
    ordered.sort_by_key(|(id, spec)| (precedence(spec), id.clone()));
    for (id, spec) in ordered {
        let key = (id.kind.as_str(), id.namespace.as_str(), id.name.as_str());
        let guard = keys.get(&key);
        let built = match spec {
            GatewaySpec::Route(route) => route_entries(route, &named_hosts, guard),
            GatewaySpec::ModelRoute(model) => model_entries(model, &named_hosts, guard),
            _ => continue,
        };
        for entry in built {
            routes.push(entry);
            owners.push(id.clone());
        }
    }
    let apps = |digest: &str| {
        json!({"http": {"servers": {
            SERVER: {"listen": [config.listen], "routes": routes, "automatic_https": {"disable": true}},
            "changewire-health": {"listen": [config.health_listen.to_string()], "automatic_https": {"disable": true}, "routes": [{
                "match": [{"path": [HEALTH_PATH]}],
                "handle": [{"handler": "static_response", "status_code": 200, "body": digest,
                    "headers": {DIGEST_HEADER: [digest]}}],
                "terminal": true}]},
        }}})
    };
    let digest = super::digest_of(apps("").to_string().as_bytes());
    let admin = admin
        .cloned()
        .unwrap_or_else(|| json!({"listen": admin_listen(&config.admin_url)}));
    Rendered {
        config: json!({"admin": admin, "apps": apps(&digest)}),
        digest,
        owners,
        rejected,
    }
}

fn admin_listen(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned()
}

fn precedence(spec: &GatewaySpec) -> (u8, std::cmp::Reverse<usize>) {
    match spec {
        GatewaySpec::Route(r) => match r.path.kind {
            PathKind::Exact => (0, std::cmp::Reverse(r.path.value.len())),
            PathKind::PathPrefix => (1, std::cmp::Reverse(r.path.value.len())),
            PathKind::RegularExpression => (2, std::cmp::Reverse(0)),
        },
        GatewaySpec::ModelRoute(m) => (1, std::cmp::Reverse(m.path.len())),
        _ => (3, std::cmp::Reverse(0)),
    }
}

/// Host matchers: the route's hosts, or (no hosts) every host no route names.
fn host_matcher(hosts: &[String], named: &[String], matcher: &mut serde_json::Map<String, Value>) {
    if !hosts.is_empty() {
        matcher.insert("host".into(), json!(hosts));
    } else if !named.is_empty() {
        matcher.insert("not".into(), json!([{"host": named}]));
    }
}

fn route_entries(route: &RouteSpec, named: &[String], guard: Option<&KeyGuard>) -> Vec<Value> {
    let mut matcher = serde_json::Map::new();
    host_matcher(&route.hosts, named, &mut matcher);
    let value = &route.path.value;
    match route.path.kind {
        PathKind::Exact => {
            matcher.insert("path".into(), json!([value]));
        }
        PathKind::PathPrefix if value.ends_with('/') => {
            matcher.insert("path".into(), json!([format!("{value}*")]));
        }
        PathKind::PathPrefix => {
            matcher.insert("path".into(), json!([value, format!("{value}/*")]));
        }
        PathKind::RegularExpression => {
            matcher.insert("path_regexp".into(), json!({"pattern": value}));
        }
    }
    if !route.methods.is_empty() {
        matcher.insert("method".into(), json!(route.methods));
    }
    let mut handle = Vec::new();
    let mut headers = serde_json::Map::new();
    for (field, rewrite) in [
        ("request", &route.request_headers),
        ("response", &route.response_headers),
    ] {
        if let Some(rewrite) = rewrite {
            let set: BTreeMap<&String, Vec<&String>> =
                rewrite.set.iter().map(|(k, v)| (k, vec![v])).collect();
            headers.insert(field.into(), json!({"set": set, "delete": rewrite.remove}));
        }
    }
    if !headers.is_empty() {
        headers.insert("handler".into(), json!("headers"));
        handle.push(Value::Object(headers));
    }
    let upstreams = weighted(
        route
            .upstreams
            .iter()
            .map(|u| (u.target.as_str(), u.weight)),
    );
    let attempts = route.retries.as_ref().map_or(1, |r| r.attempts);
    let mut proxy = json!({"handler": "reverse_proxy", "upstreams": upstreams,
        "load_balancing": {"selection_policy": {"policy": "round_robin"}, "retries": attempts - 1},
        "health_checks": passive()});
    if let Some(timeouts) = &route.timeouts {
        let mut transport = json!({"protocol": "http"});
        if let Some(ms) = timeouts.connect_ms {
            transport["dial_timeout"] = json!(format!("{ms}ms"));
        }
        if let Some(ms) = timeouts.response_ms {
            transport["response_header_timeout"] = json!(format!("{ms}ms"));
        }
        proxy["transport"] = transport;
    }
    handle.push(proxy);
    guarded(Value::Object(matcher), handle, guard)
}

fn model_entries(model: &ModelRouteSpec, named: &[String], guard: Option<&KeyGuard>) -> Vec<Value> {
    let mut matcher = serde_json::Map::new();
    host_matcher(&model.hosts, named, &mut matcher);
    matcher.insert("path".into(), json!([format!("{}*", model.path)]));
    matcher.insert("header".into(), json!({"X-Model": [model.model]}));
    let mut providers: Vec<_> = model.providers.iter().collect();
    providers.sort_by_key(|p| (p.priority, std::cmp::Reverse(p.weight)));
    let upstreams: Vec<Value> = providers
        .iter()
        .map(|p| json!({"dial": p.target}))
        .collect();
    let proxy = json!({"handler": "reverse_proxy", "upstreams": upstreams,
        "load_balancing": {"selection_policy": {"policy": "first"}, "retries": providers.len() - 1},
        "health_checks": passive()});
    guarded(Value::Object(matcher), vec![proxy], guard)
}

/// Passive health checks: an upstream that failed is skipped for a while, so a
/// retry goes to another one (without them `first` picks the same again).
fn passive() -> Value {
    json!({"passive": {"fail_duration": "10s", "max_fails": 1}})
}

/// The route's entries: with an API-key policy, first one answering 401 to a
/// request without a known key.
fn guarded(matcher: Value, handle: Vec<Value>, guard: Option<&KeyGuard>) -> Vec<Value> {
    let mut entries = Vec::new();
    if let Some(KeyGuard { header, keys, .. }) = guard {
        // `not` negates any of its sets: neither an excluded host nor a known key.
        let mut refuse = matcher.clone();
        let mut not = (matcher.get("not").and_then(Value::as_array).cloned()).unwrap_or_default();
        not.push(json!({"header": {header: keys}}));
        refuse["not"] = Value::Array(not);
        entries.push(json!({"match": [refuse], "handle": [{"handler": "static_response", "status_code": 401, "body": "missing or unknown API key\n"}], "terminal": true}));
    }
    entries.push(json!({"match": [matcher], "handle": handle, "terminal": true}));
    entries
}

/// Upstreams repeated by weight (divided by their greatest common divisor):
/// round robin over them gives each its share.
fn weighted<'a>(targets: impl Iterator<Item = (&'a str, u32)>) -> Vec<Value> {
    let targets: Vec<(&str, u32)> = targets.collect();
    let divisor = targets.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
    targets
        .iter()
        .flat_map(|(target, weight)| {
            std::iter::repeat_n(json!({"dial": target}), (weight / divisor) as usize)
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::gateway::testing::{id, spec};

    #[test]
    fn a_plan_renders_ordered_routes_host_exclusions_key_checks_and_refusals() {
        let keys = tempfile::tempdir().expect("a directory");
        std::fs::create_dir_all(keys.path().join("team/keys")).expect("created");
        std::fs::write(keys.path().join("team/keys/keys"), "k1\n").expect("written");
        let resources = vec![
            (
                id("AuthPolicy", "auth"),
                spec(
                    "AuthPolicy",
                    json!({"targetRef": {"kind": "Route", "name": "open"},
                "apiKeys": {"secretRef": {"name": "keys", "key": "keys"}}}),
                ),
            ),
            (
                id("ModelRoute", "limited"),
                spec(
                    "ModelRoute",
                    json!({"model": "m", "limits": {"requestsPerMinute": 5},
                "providers": [{"name": "p", "target": "127.0.0.1:1"}]}),
                ),
            ),
            (
                id("RateLimitPolicy", "limit"),
                spec(
                    "RateLimitPolicy",
                    json!({"targetRef": {"kind": "Route", "name": "shop"},
                "requests": 1, "per": "Second"}),
                ),
            ),
            (
                id("Route", "open"),
                spec(
                    "Route",
                    json!({"path": {"type": "PathPrefix", "value": "/open"},
                "upstreams": [{"target": "127.0.0.1:2", "weight": 2}, {"target": "127.0.0.1:3", "weight": 4}]}),
                ),
            ),
            (
                id("Route", "shop"),
                spec(
                    "Route",
                    json!({"hosts": ["shop.test"], "path": {"type": "Exact", "value": "/cart"},
                "upstreams": [{"target": "127.0.0.1:4"}]}),
                ),
            ),
        ];
        let plan = Plan {
            generation: 1,
            resources,
        };
        let config = CaddyConfig {
            admin_url: "http://127.0.0.1:2019".into(),
            listen: "127.0.0.1:8080".into(),
            health_listen: "127.0.0.1:8081".parse().expect("an address"),
            probe_timeout_ms: 1000,
        };
        let secrets = Secrets {
            dir: Some(keys.path().to_path_buf()),
        };
        let rendered = render(&plan, &config, &secrets, None);
        let refused: Vec<&str> = rendered
            .rejected
            .iter()
            .map(|r| r.resource.name.as_str())
            .collect();
        assert_eq!(
            refused,
            ["limited", "limit"],
            "what stock Caddy cannot enforce"
        );
        let routes = &rendered.config["apps"]["http"]["servers"][SERVER]["routes"];
        let owners: Vec<&str> = rendered.owners.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            owners,
            ["shop", "open", "open"],
            "exact paths first; a guarded route has two entries"
        );
        assert_eq!(
            routes[0]["match"][0],
            json!({"host": ["shop.test"], "path": ["/cart"]})
        );
        assert_eq!(
            routes[1]["match"][0]["not"],
            json!([{"host": ["shop.test"]}, {"header": {"X-Api-Key": ["k1"]}}]),
            "refused: not a named host's request, and without a known key"
        );
        assert_eq!(routes[1]["handle"][0]["status_code"], 401);
        assert_eq!(routes[2]["match"][0]["path"], json!(["/open", "/open/*"]));
        let dials: Vec<&Value> = (routes[2]["handle"][0]["upstreams"]
            .as_array()
            .expect("upstreams")
            .iter())
        .map(|u| &u["dial"])
        .collect();
        assert_eq!(
            dials,
            ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:3"],
            "weights 2:4 as 1:2"
        );
        assert_eq!(
            rendered.config["admin"],
            json!({"listen": "127.0.0.1:2019"})
        );
        let again = render(&plan, &config, &secrets, None);
        assert_eq!(
            (again.config, again.digest),
            (rendered.config.clone(), rendered.digest.clone())
        );
    }

    #[test]
    fn the_etag_is_caddys_fnv_hash_of_the_config() {
        // Measured against Caddy 2.6.2: this body was tagged "/config/ 767af58a".
        let body = br#"{"admin":{"listen":"127.0.0.1:22019"},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:28080"],"routes":[{"handle":[{"body":"hi","handler":"static_response"}]}]}}}}}"#;
        let mut with_newline = body.to_vec();
        with_newline.push(b'\n');
        assert_eq!(etag_of(&with_newline), "\"/config/ 767af58a\"");
        assert_eq!(
            etag_of(b"{\"n\":2}\n"),
            "\"/config/ 03b9f683\"",
            "leading zeros kept"
        );
        assert_eq!(
            route_number("provision http: server s: setting up route matchers: route 12: bad"),
            Some(12)
        );
        assert_eq!(weighted([("a:1", 30), ("b:1", 10)].into_iter()).len(), 4);
    }
}
