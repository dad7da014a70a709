//! A plan as one whole nginx configuration (pure but for reading API keys).
//!
//! - A `server` per host named by some route, and a default server for routes
//!   without hosts (so, as in nginx, a host's routes are all it serves).
//! - A Route is a `location` (`= path`, `^~ prefix` and `^~ prefix/`, `~ regex`)
//!   proxying to its `upstream` block; its policies are a `limit_req` zone and an
//!   API-key `map` checked in the location.
//! - ModelRoutes sharing a host and path are one location that sends each model
//!   (the `X-Model` header) to an internal location of its own: its providers'
//!   upstream (priority 0 first, the others as `backup`), its limits, its policies.
//! - A health server answers `/changewire-health` with the config's digest, so a
//!   probe tells which config the workers run.
//!
//! The text is a function of the plan (and the mounted keys) only: the same plan
//! renders the same bytes, which makes applies idempotent. Which lines each
//! resource wrote is kept, to map an `nginx -t` error to the resource.

use std::collections::BTreeMap;
use std::path::PathBuf;

use changewire_schemas::gateway::{
    GatewaySpec, ModelRouteSpec, PathKind, RateLimitPolicySpec, RatePeriod, RouteSpec,
};

use crate::services::gateway::apply::{
    key_guards, KeyGuard, Secrets, Target, DIGEST_HEADER, HEALTH_PATH,
};
use crate::services::gateway::desired::{Plan, Rejection, ResourceId};

/// Where the rendered config listens and keeps its files.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The traffic listener (`127.0.0.1:8080`, `80`).
    pub listen: String,
    /// The health listener the probe asks.
    pub health_listen: String,
    /// nginx's prefix: pid file, logs, temporary files.
    pub dir: PathBuf,
}

const PLACEHOLDER: &str = "@CHANGEWIRE_DIGEST@";

/// A rendered config.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The file's text.
    pub text: String,
    /// Its digest (what the health route answers).
    pub digest: String,
    /// Lines (1-based, inclusive) each resource wrote.
    pub owners: Vec<(usize, usize, ResourceId)>,
    /// Resources left out: keys that cannot be read (and, failing closed, the
    /// routes they guard).
    pub rejected: Vec<Rejection>,
}

impl Rendered {
    /// The resource that wrote line `line`.
    pub fn owner(&self, line: usize) -> Option<&ResourceId> {
        (self.owners.iter())
            .find(|(first, last, _)| (*first..=*last).contains(&line))
            .map(|(_, _, id)| id)
    }
}

/// Lines being written, with who wrote them.
#[derive(Default)]
struct Out {
    lines: Vec<String>,
    owners: Vec<(usize, usize, ResourceId)>,
}

impl Out {
    fn line(&mut self, depth: usize, text: impl AsRef<str>) {
        self.lines
            .push(format!("{}{}", "    ".repeat(depth), text.as_ref()));
    }

    fn owned(&mut self, id: &ResourceId, write: impl FnOnce(&mut Self)) {
        let first = self.lines.len() + 1;
        write(self);
        if self.lines.len() >= first {
            self.owners.push((first, self.lines.len(), id.clone()));
        }
    }
}

/// The policies guarding one route, and the keys of its API-key policy.
#[derive(Default, Clone)]
struct Guards<'a> {
    limit: Option<(usize, &'a RateLimitPolicySpec)>,
    auth: Option<KeyGuard>,
}

/// Each route's policies.
type GuardMap<'a> = BTreeMap<Target<'a>, Guards<'a>>;

/// A route-like resource and its place in the plan (names its blocks).
struct Served<'a> {
    index: usize,
    id: &'a ResourceId,
    guards: Guards<'a>,
}

/// Renders `plan`.
pub fn render(plan: &Plan, layout: &Layout, secrets: &Secrets) -> Rendered {
    let (guards, rejected) = guards(plan, secrets);
    let refused: Vec<&ResourceId> = rejected.iter().map(|r| &r.resource).collect();
    let mut routes = Vec::new();
    let mut models = Vec::new();
    for (index, (id, spec)) in plan.resources.iter().enumerate() {
        if refused.contains(&id) {
            continue;
        }
        let key = (id.kind.as_str(), id.namespace.as_str(), id.name.as_str());
        let served = Served {
            index,
            id,
            guards: guards.get(&key).cloned().unwrap_or_default(),
        };
        match spec {
            GatewaySpec::Route(route) => routes.push((served, route)),
            GatewaySpec::ModelRoute(model) => models.push((served, model)),
            _ => {}
        }
    }
    let mut out = Out::default();
    header(&mut out, layout);
    for (served, route) in &routes {
        out.owned(served.id, |out| {
            upstream(out, &format!("cw_r{}", served.index), route_servers(route));
            guard_blocks(out, &served.guards);
        });
    }
    for (served, model) in &models {
        out.owned(served.id, |out| {
            upstream(out, &format!("cw_m{}", served.index), model_servers(model));
            guard_blocks(out, &served.guards);
            model_limit_block(out, served.index, model);
        });
    }
    let model_groups = model_groups(&mut out, &models);
    for (host, default) in server_hosts(&routes, &models) {
        out.line(1, "server {");
        let default_server = if default { " default_server" } else { "" };
        out.line(2, format!("listen {}{default_server};", layout.listen));
        out.line(
            2,
            format!("server_name {};", if default { "_" } else { host.as_str() }),
        );
        for (served, route) in routes.iter().filter(|(_, r)| serves(&r.hosts, &host)) {
            out.owned(served.id, |out| route_locations(out, served, route));
        }
        for ((group_host, path), group) in &model_groups {
            if *group_host == host {
                out.line(2, format!("location ^~ {path} {{"));
                out.line(
                    3,
                    format!("if ($cw_g{group} = \"\") {{ return 404 \"unknown model\\n\"; }}"),
                );
                out.line(3, format!("rewrite ^ $cw_g{group}$uri last;"));
                out.line(2, "}");
            }
        }
        for (served, model) in models.iter().filter(|(_, m)| serves(&m.hosts, &host)) {
            out.owned(served.id, |out| model_location(out, served, model));
        }
        out.line(1, "}");
    }
    health_server(&mut out, layout);
    out.line(0, "}");
    let text = out.lines.join("\n") + "\n";
    let digest = crate::services::gateway::digest_of(text.as_bytes());
    Rendered {
        text: text.replace(PLACEHOLDER, &digest),
        digest,
        owners: out.owners,
        rejected,
    }
}

/// Each route's policies by the route's (kind, namespace, name); API-key
/// policies whose keys cannot be read are refused, and so are their routes:
/// a route is never served without the policy meant to guard it.
fn guards<'a>(plan: &'a Plan, secrets: &Secrets) -> (GuardMap<'a>, Vec<Rejection>) {
    let (keys, rejected) = key_guards(plan, secrets);
    let mut guards: GuardMap<'a> = keys
        .into_iter()
        .map(|(target, auth)| {
            (
                target,
                Guards {
                    limit: None,
                    auth: Some(auth),
                },
            )
        })
        .collect();
    for (index, (id, spec)) in plan.resources.iter().enumerate() {
        if let GatewaySpec::RateLimitPolicy(policy) = spec {
            let target = (
                policy.target_ref.kind.as_str(),
                id.namespace.as_str(),
                policy.target_ref.name.as_str(),
            );
            guards.entry(target).or_default().limit = Some((index, policy));
        }
    }
    (guards, rejected)
}

fn header(out: &mut Out, layout: &Layout) {
    let dir = layout.dir.display();
    out.line(
        0,
        "# Rendered by changewire's gateway service: edits are reverted (drift repair).",
    );
    out.line(0, format!("# config {PLACEHOLDER}"));
    out.line(0, "worker_processes 1;");
    out.line(0, format!("pid {dir}/nginx.pid;"));
    out.line(0, format!("error_log {dir}/error.log warn;"));
    out.line(0, "events { worker_connections 1024; }");
    out.line(0, "http {");
    out.line(1, "access_log off;");
    out.line(1, format!("root {dir}/empty;"));
    for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        out.line(1, format!("{temp}_temp_path {dir}/tmp/{temp};"));
    }
    out.line(1, "server_names_hash_bucket_size 128;");
    out.line(1, "map_hash_bucket_size 128;");
    out.line(1, "proxy_http_version 1.1;");
    out.line(1, "limit_req_status 429;");
}

fn route_servers(route: &RouteSpec) -> Vec<String> {
    (route.upstreams.iter())
        .map(|u| format!("server {} weight={};", u.target, u.weight))
        .collect()
}

fn model_servers(model: &ModelRouteSpec) -> Vec<String> {
    let first = model
        .providers
        .iter()
        .map(|p| p.priority)
        .min()
        .unwrap_or(0);
    (model.providers.iter())
        .map(|p| {
            let backup = if p.priority > first { " backup" } else { "" };
            format!("server {} weight={}{backup};", p.target, p.weight)
        })
        .collect()
}

fn upstream(out: &mut Out, name: &str, servers: Vec<String>) {
    out.line(1, format!("upstream {name} {{"));
    for server in servers {
        out.line(2, server);
    }
    out.line(2, "keepalive 16;");
    out.line(1, "}");
}

/// A header's nginx variable (`X-Api-Key` to `$http_x_api_key`).
fn header_variable(name: &str) -> String {
    format!("$http_{}", name.to_ascii_lowercase().replace('-', "_"))
}

fn guard_blocks(out: &mut Out, guards: &Guards<'_>) {
    if let Some((index, policy)) = guards.limit {
        let key = match &policy.key.header {
            // Requests without the header count by address, not as unlimited.
            Some(header) => {
                out.line(
                    1,
                    format!("map {} $cw_k{index} {{", header_variable(header)),
                );
                out.line(2, "\"\" $binary_remote_addr;");
                out.line(2, format!("default {};", header_variable(header)));
                out.line(1, "}");
                format!("$cw_k{index}")
            }
            None => "$binary_remote_addr".into(),
        };
        let per = match policy.per {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "m",
        };
        out.line(
            1,
            format!(
                "limit_req_zone {key} zone=cw_l{index}:1m rate={}r/{per};",
                policy.requests
            ),
        );
    }
    if let Some(KeyGuard {
        index,
        header,
        keys,
    }) = &guards.auth
    {
        out.line(
            1,
            format!("map {} $cw_a{index} {{", header_variable(header)),
        );
        out.line(2, "default 0;");
        for key in keys {
            out.line(2, format!("\"{key}\" 1;"));
        }
        out.line(1, "}");
    }
}

fn model_limit_block(out: &mut Out, index: usize, model: &ModelRouteSpec) {
    if let Some(rpm) = model.limits.as_ref().and_then(|l| l.requests_per_minute) {
        out.line(
            1,
            format!(
                "map $http_x_model $cw_mk{index} {{ default \"\"; \"{0}\" \"{0}\"; }}",
                model.model
            ),
        );
        out.line(
            1,
            format!("limit_req_zone $cw_mk{index} zone=cw_ml{index}:1m rate={rpm}r/m;"),
        );
    }
}

/// One `map` per (host, path) of model routes: model name to its internal
/// location. Returns the groups' numbers by (host, path).
fn model_groups(
    out: &mut Out,
    models: &[(Served<'_>, &ModelRouteSpec)],
) -> BTreeMap<(String, String), usize> {
    let mut groups: BTreeMap<(String, String), Vec<(&str, usize)>> = BTreeMap::new();
    for (served, model) in models {
        for host in hosts_of(&model.hosts) {
            groups
                .entry((host, model.path.clone()))
                .or_default()
                .push((&model.model, served.index));
        }
    }
    let mut numbers = BTreeMap::new();
    for (number, (key, members)) in groups.into_iter().enumerate() {
        out.line(1, format!("map $http_x_model $cw_g{number} {{"));
        out.line(2, "default \"\";");
        for (model, index) in members {
            out.line(2, format!("\"{model}\" /__cw_m{index};"));
        }
        out.line(1, "}");
        numbers.insert(key, number);
    }
    numbers
}

/// The servers to write: each host some route names, then the default server
/// (`""`, true).
fn server_hosts(
    routes: &[(Served<'_>, &RouteSpec)],
    models: &[(Served<'_>, &ModelRouteSpec)],
) -> Vec<(String, bool)> {
    let named = routes.iter().flat_map(|(_, r)| &r.hosts);
    let named = named.chain(models.iter().flat_map(|(_, m)| &m.hosts));
    let mut hosts: Vec<String> = named.map(|h| h.to_ascii_lowercase()).collect();
    hosts.sort();
    hosts.dedup();
    let mut servers: Vec<(String, bool)> = hosts.into_iter().map(|h| (h, false)).collect();
    servers.push((String::new(), true));
    servers
}

fn hosts_of(hosts: &[String]) -> Vec<String> {
    if hosts.is_empty() {
        vec![String::new()]
    } else {
        hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
    }
}

fn serves(hosts: &[String], host: &str) -> bool {
    hosts_of(hosts).iter().any(|h| h == host)
}

fn route_locations(out: &mut Out, served: &Served<'_>, route: &RouteSpec) {
    let path = &route.path.value;
    let heads = match route.path.kind {
        PathKind::Exact => vec![format!("= {path}")],
        PathKind::RegularExpression => vec![format!("~ \"{path}\"")],
        // `/api` matches `/api` and `/api/...`, not `/apis`.
        PathKind::PathPrefix if path.ends_with('/') => vec![format!("^~ {path}")],
        PathKind::PathPrefix => vec![format!("= {path}"), format!("^~ {path}/")],
    };
    for head in heads {
        out.line(2, format!("location {head} {{"));
        if !route.methods.is_empty() {
            let methods = route.methods.join("|");
            out.line(
                3,
                format!("if ($request_method !~ ^({methods})$) {{ return 405; }}"),
            );
        }
        guard_lines(out, &served.guards);
        proxy_lines(out, route);
        out.line(3, format!("proxy_pass http://cw_r{};", served.index));
        out.line(2, "}");
    }
}

fn guard_lines(out: &mut Out, guards: &Guards<'_>) {
    if let Some(KeyGuard { index, .. }) = &guards.auth {
        out.line(
            3,
            format!("if ($cw_a{index} = 0) {{ return 401 \"missing or unknown API key\\n\"; }}"),
        );
    }
    if let Some((index, policy)) = guards.limit {
        // nginx refuses `burst=0`: no burst is written as none.
        let burst = match policy.burst {
            0 => String::new(),
            burst => format!(" burst={burst}"),
        };
        out.line(3, format!("limit_req zone=cw_l{index}{burst} nodelay;"));
    }
}

fn proxy_lines(out: &mut Out, route: &RouteSpec) {
    out.line(3, "proxy_set_header Host $host;");
    out.line(3, "proxy_set_header Connection \"\";");
    if let Some(rewrite) = &route.request_headers {
        for (name, value) in &rewrite.set {
            out.line(3, format!("proxy_set_header {name} \"{value}\";"));
        }
        for name in &rewrite.remove {
            out.line(3, format!("proxy_set_header {name} \"\";"));
        }
    }
    if let Some(rewrite) = &route.response_headers {
        for (name, value) in &rewrite.set {
            out.line(3, format!("proxy_hide_header {name};"));
            out.line(3, format!("add_header {name} \"{value}\" always;"));
        }
        for name in &rewrite.remove {
            out.line(3, format!("proxy_hide_header {name};"));
        }
    }
    if let Some(timeouts) = &route.timeouts {
        if let Some(ms) = timeouts.connect_ms {
            out.line(3, format!("proxy_connect_timeout {ms}ms;"));
        }
        if let Some(ms) = timeouts.response_ms {
            out.line(3, format!("proxy_read_timeout {ms}ms;"));
        }
    }
    match &route.retries {
        Some(retries) => {
            let on_5xx = if retries.on_5xx {
                " http_500 http_502 http_503 http_504"
            } else {
                ""
            };
            out.line(3, format!("proxy_next_upstream error timeout{on_5xx};"));
            out.line(
                3,
                format!("proxy_next_upstream_tries {};", retries.attempts),
            );
        }
        None => out.line(3, "proxy_next_upstream off;"),
    }
}

fn model_location(out: &mut Out, served: &Served<'_>, model: &ModelRouteSpec) {
    let index = served.index;
    out.line(2, format!("location ^~ /__cw_m{index}/ {{"));
    out.line(3, "internal;");
    guard_lines(out, &served.guards);
    if model
        .limits
        .as_ref()
        .and_then(|l| l.requests_per_minute)
        .is_some()
    {
        out.line(3, format!("limit_req zone=cw_ml{index} nodelay;"));
    }
    out.line(3, format!("rewrite ^/__cw_m{index}(/.*)$ $1 break;"));
    out.line(3, "proxy_set_header Host $host;");
    out.line(3, "proxy_set_header Connection \"\";");
    // Fall back to the next provider on errors and 5xx, POSTs included (a
    // completion request is not applied twice by a provider that failed it).
    out.line(
        3,
        "proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;",
    );
    out.line(
        3,
        format!("proxy_next_upstream_tries {};", model.providers.len()),
    );
    out.line(3, format!("proxy_pass http://cw_m{index};"));
    out.line(2, "}");
}

fn health_server(out: &mut Out, layout: &Layout) {
    out.line(1, "server {");
    out.line(2, format!("listen {};", layout.health_listen));
    out.line(2, format!("location = {HEALTH_PATH} {{"));
    out.line(3, "default_type text/plain;");
    out.line(
        3,
        format!("add_header {DIGEST_HEADER} {PLACEHOLDER} always;"),
    );
    out.line(3, format!("return 200 \"{PLACEHOLDER}\\n\";"));
    out.line(2, "}");
    out.line(1, "}");
}

#[cfg(test)]
mod tests;
