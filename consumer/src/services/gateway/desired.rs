//! The desired state (pure): gateway resources read from change events, which
//! change is stale, and which resources a gateway can serve together.
//!
//! A resource is checked twice. Alone, when its event arrives ([`check_alone`]):
//! a spec that does not parse, a bad regular expression, an upstream outside the
//! allowed ones, a feature no renderer supports; such a change is refused and the
//! resource keeps its last accepted spec. Then with the others, before each apply
//! ([`Plan::from_resources`]): two routes on the same host and path, a policy
//! naming a route that does not exist, two policies of one kind on one route.
//! The resource that loses is left out of the plan and reported; the others are
//! served.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use changewire_schemas::gateway::{
    GatewaySpec, ModelRouteSpec, PathKind, PathMatch, RouteSpec, TargetRef,
};
use changewire_schemas::{ChangeEvent, Op, Origin};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a resource was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Definer {
    /// A custom resource in a cluster.
    Kubernetes,
    /// A row of a routes table.
    Postgres,
}

/// A gateway resource's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceId {
    /// Where it was defined.
    pub definer: Definer,
    /// Its kind.
    pub kind: String,
    /// Its namespace (a routes row's `namespace` column).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let definer = match self.definer {
            Definer::Kubernetes => "",
            Definer::Postgres => " (postgres)",
        };
        write!(f, "{}/{}/{}{definer}", self.kind, self.namespace, self.name)
    }
}

impl ResourceId {
    /// The state key suffix: unique, ordered like the ids.
    pub fn key(&self) -> String {
        let definer = match self.definer {
            Definer::Kubernetes => "k",
            Definer::Postgres => "p",
        };
        format!("{definer}/{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Orders the changes of one resource, to tell a stale or replayed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// A custom resource: its uid and `metadata.generation` (which grows with
    /// every spec change; `resourceVersion` is opaque and not compared).
    Kubernetes {
        /// The object's uid (a delete and re-create gives a new one).
        uid: String,
        /// Its generation.
        generation: i64,
    },
    /// A row: its change's commit LSN and order within the transaction.
    Postgres {
        /// Commit LSN.
        lsn: u64,
        /// Position in the transaction.
        order: u64,
    },
}

/// What the store keeps of one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The version of the last change taken.
    pub version: Version,
    /// The last accepted spec; none once deleted.
    pub spec: Option<GatewaySpec>,
    /// Uids of deleted incarnations: their replayed changes are stale.
    #[serde(default)]
    pub dead_uids: Vec<String>,
    /// When this incarnation was first taken (ms since the epoch, the change's
    /// time): the older resource wins a conflict.
    #[serde(default)]
    pub since_ms: i64,
}

/// Most deleted incarnations remembered per resource.
const DEAD_UIDS: usize = 16;

/// A change to a gateway resource, read from an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Which resource.
    pub id: ResourceId,
    /// Its version.
    pub version: Version,
    /// The new spec (`Err`: why it cannot be read); none for a delete.
    pub spec: Option<Result<GatewaySpec, String>>,
    /// When it was made (the source's time, ms since the epoch).
    pub at_ms: i64,
}

/// Why an event is not a change to a gateway resource this service takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAChange {
    /// Not for this service (another kind, a status-only update): skipped.
    #[error("{0}")]
    Ignored(String),
    /// Meant for it, but missing what identifies the resource: dead-lettered.
    #[error("{0}")]
    Invalid(String),
}

/// Reads the change an event makes to a gateway resource. `group` is the API
/// group of the kinds (custom resources of other groups are ignored).
pub fn change_of(event: &ChangeEvent, group: &str) -> Result<Change, NotAChange> {
    match &event.source.origin {
        Origin::Kubernetes(origin) => {
            if origin.group != group {
                return Err(NotAChange::Ignored(format!(
                    "{} is not in {group}",
                    origin.group
                )));
            }
            if origin.status_only {
                return Err(NotAChange::Ignored("a status-only update".into()));
            }
            let id = ResourceId {
                definer: Definer::Kubernetes,
                kind: origin.kind.clone(),
                namespace: origin.namespace.clone().unwrap_or_default(),
                name: origin.name.clone(),
            };
            let object = event.after.as_ref().or(event.before.as_ref());
            let generation = object
                .and_then(|o| o.pointer("/metadata/generation"))
                .and_then(Value::as_i64)
                .or_else(|| origin.resource_version.parse().ok())
                .unwrap_or(0);
            let version = Version::Kubernetes {
                uid: origin.uid.clone(),
                generation,
            };
            let spec = (event.op != Op::Delete).then(|| {
                let spec = (event.after.as_ref())
                    .and_then(|a| a.get("spec"))
                    .cloned()
                    .ok_or_else(|| "the object has no spec".to_owned())?;
                GatewaySpec::from_spec(&origin.kind, spec)
            });
            Ok(Change {
                id,
                version,
                spec,
                at_ms: event.source.ts_ms,
            })
        }
        Origin::Postgresql(origin) => {
            let row = event
                .after
                .as_ref()
                .or(event.before.as_ref())
                .ok_or_else(|| NotAChange::Invalid("a row change without a row".into()))?;
            let text = |column: &str| row.get(column).and_then(Value::as_str).map(str::to_owned);
            let name = text("name").ok_or_else(|| {
                NotAChange::Invalid(format!(
                    "{}.{} has no text column `name`: not a routes table (schemas/sql/gateway_routes.sql)",
                    origin.schema, origin.table
                ))
            })?;
            let id = ResourceId {
                definer: Definer::Postgres,
                kind: "Route".into(),
                namespace: text("namespace").unwrap_or_else(|| "default".into()),
                name,
            };
            let order = event.transaction.as_ref().map_or(0, |t| t.total_order);
            let version = Version::Postgres {
                lsn: origin.lsn,
                order,
            };
            let spec = (event.op != Op::Delete).then(|| {
                let spec = (event.after.as_ref())
                    .and_then(|a| a.get("spec"))
                    .cloned()
                    .ok_or_else(|| "the row has no `spec` column".to_owned())?;
                GatewaySpec::from_spec("Route", spec)
            });
            Ok(Change {
                id,
                version,
                spec,
                at_ms: event.source.ts_ms,
            })
        }
    }
}

/// What taking a change does to the stored resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// The change is older than what is stored (or replays it): nothing changes.
    Stale,
    /// Stored: the new record, and whether the desired state changed.
    Stored(Box<Stored>, bool),
}

/// Takes `change` (its spec already checked) over `stored`. A refused spec
/// moves the version on but keeps the last accepted spec.
pub fn take(stored: Option<&Stored>, change: &Change, accepted: Option<GatewaySpec>) -> Taken {
    if let Some(stored) = stored {
        if is_stale(stored, &change.version, change.spec.is_none()) {
            return Taken::Stale;
        }
    }
    let mut dead_uids = stored.map(|s| s.dead_uids.clone()).unwrap_or_default();
    let previous = stored.and_then(|s| s.spec.clone());
    let spec = match (&change.spec, accepted) {
        (None, _) => {
            if let Version::Kubernetes { uid, .. } = &change.version {
                dead_uids.push(uid.clone());
                let excess = dead_uids.len().saturating_sub(DEAD_UIDS);
                dead_uids.drain(..excess);
            }
            None
        }
        (Some(_), Some(accepted)) => Some(accepted),
        (Some(_), None) => previous.clone(),
    };
    let changed = spec != previous;
    let since_ms = match stored {
        Some(stored) if previous.is_some() && stored.since_ms > 0 => stored.since_ms,
        _ => change.at_ms,
    };
    let record = Stored {
        version: change.version.clone(),
        spec,
        dead_uids,
        since_ms,
    };
    Taken::Stored(Box::new(record), changed)
}

fn is_stale(stored: &Stored, version: &Version, delete: bool) -> bool {
    match (&stored.version, version) {
        (
            Version::Kubernetes {
                uid: old_uid,
                generation: old,
            },
            Version::Kubernetes { uid, generation },
        ) => {
            if stored.dead_uids.contains(uid) {
                return true;
            }
            // Another uid is a new incarnation; the same one orders by generation
            // (a delete carries the last generation: only an older one is stale).
            uid == old_uid && (generation < old || (generation == old && !delete))
        }
        (Version::Postgres { lsn: old, order: o }, Version::Postgres { lsn, order }) => {
            (lsn, order) <= (old, o)
        }
        // One name defined in two places is a conflict, found in the plan.
        _ => false,
    }
}

/// Limits on what a resource may name, from the service's config.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Upstream hosts allowed: addresses or networks (`10.0.0.0/8`), host names,
    /// `*.suffix` patterns. Any when empty.
    pub allowed_upstreams: Vec<String>,
}

/// Checks a spec on its own; the reason it cannot be served.
pub fn check_alone(spec: &GatewaySpec, limits: &Limits) -> Result<(), String> {
    match spec {
        GatewaySpec::Route(route) => check_route(route, limits),
        GatewaySpec::ModelRoute(model) => check_model_route(model, limits),
        GatewaySpec::RateLimitPolicy(policy) => {
            check_target(&policy.target_ref)?;
            if policy.requests == 0 {
                return Err("requests must be at least 1".into());
            }
            if let Some(header) = &policy.key.header {
                check_header_name(header)?;
            }
            Ok(())
        }
        GatewaySpec::AuthPolicy(policy) => {
            check_target(&policy.target_ref)?;
            if policy.jwt.is_some() {
                return Err("jwt: JWT validation needs a module neither nginx nor Caddy ships with; use apiKeys".into());
            }
            let keys = policy
                .api_keys
                .as_ref()
                .ok_or("an AuthPolicy needs apiKeys")?;
            check_header_name(&keys.header)?;
            check_name("apiKeys.secretRef.name", &keys.secret_ref.name)?;
            check_name("apiKeys.secretRef.key", &keys.secret_ref.key)
        }
    }
}

fn check_route(route: &RouteSpec, limits: &Limits) -> Result<(), String> {
    route.hosts.iter().try_for_each(|h| check_host(h))?;
    check_path(&route.path)?;
    for method in &route.methods {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("method {method:?} is not an HTTP method"));
        }
    }
    if route.upstreams.is_empty() {
        return Err("upstreams: at least one is needed".into());
    }
    for upstream in &route.upstreams {
        check_upstream(&upstream.target, limits)?;
        check_weight(upstream.weight)?;
    }
    if let Some(retries) = &route.retries {
        if !(1..=10).contains(&retries.attempts) {
            return Err("retries.attempts must be 1 to 10".into());
        }
    }
    for rewrite in [&route.request_headers, &route.response_headers]
        .into_iter()
        .flatten()
    {
        for (name, value) in &rewrite.set {
            check_header_name(name)?;
            if value.chars().any(|c| c.is_control() || "\"\\$".contains(c)) {
                return Err(format!(
                    "header {name}: the value has a control character, a quote, \\ or $"
                ));
            }
        }
        rewrite
            .remove
            .iter()
            .try_for_each(|n| check_header_name(n))?;
    }
    Ok(())
}

fn check_model_route(model: &ModelRouteSpec, limits: &Limits) -> Result<(), String> {
    model.hosts.iter().try_for_each(|h| check_host(h))?;
    check_path(&PathMatch {
        kind: PathKind::PathPrefix,
        value: model.path.clone(),
    })?;
    if model.model.is_empty() || !model.model.chars().all(model_name_char) {
        return Err(format!(
            "model {:?}: letters, digits and . _ : / - only",
            model.model
        ));
    }
    if model.providers.is_empty() {
        return Err("providers: at least one is needed".into());
    }
    for provider in &model.providers {
        check_upstream(&provider.target, limits)
            .map_err(|e| format!("provider {}: {e}", provider.name))?;
        check_weight(provider.weight)?;
    }
    if model
        .limits
        .as_ref()
        .is_some_and(|l| l.tokens_per_minute.is_some())
    {
        return Err("limits.tokensPerMinute needs the responses' token counts, which nginx and Caddy do not read; use requestsPerMinute".into());
    }
    Ok(())
}

fn model_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._:/-".contains(c)
}

fn check_target(target: &TargetRef) -> Result<(), String> {
    if target.kind != "Route" && target.kind != "ModelRoute" {
        return Err(format!(
            "targetRef.kind {:?}: Route or ModelRoute",
            target.kind
        ));
    }
    check_name("targetRef.name", &target.name)
}

fn check_name(field: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!("{field} {name:?} is not a valid name"))
    }
}

fn check_weight(weight: u32) -> Result<(), String> {
    if (1..=1000).contains(&weight) {
        Ok(())
    } else {
        Err(format!("weight {weight}: 1 to 1000"))
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!("host {host:?} is not a host name"))
    }
}

fn check_header_name(name: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.is_empty() && name.chars().all(token) {
        Ok(())
    } else {
        Err(format!("header name {name:?} is not a token"))
    }
}

fn check_path(path: &PathMatch) -> Result<(), String> {
    match path.kind {
        PathKind::Exact | PathKind::PathPrefix => {
            let printable = path.value.chars().all(|c| c.is_ascii_graphic());
            if !path.value.starts_with('/')
                || !printable
                || path.value.contains(['{', '}', ';', '"', '\\'])
            {
                return Err(format!(
                    "path {:?} must start with / and have no spaces, quotes, braces, ; or \\",
                    path.value
                ));
            }
            Ok(())
        }
        PathKind::RegularExpression => {
            regex::Regex::new(&path.value)
                .map_err(|e| format!("path: invalid regular expression: {e}"))?;
            if path.value.contains(['"', '\n', '\r']) {
                return Err("path: a regular expression with quotes or line breaks".into());
            }
            Ok(())
        }
    }
}

/// Checks an upstream target (`host:port`) against the allowed ones.
fn check_upstream(target: &str, limits: &Limits) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("upstream {target:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("upstream {target:?}: bad port"));
    }
    if host.parse::<IpAddr>().is_err() {
        check_host(host).map_err(|_| format!("upstream {target:?}: bad host"))?;
    }
    if limits.allowed_upstreams.is_empty()
        || limits.allowed_upstreams.iter().any(|a| allows(a, host))
    {
        Ok(())
    } else {
        Err(format!(
            "upstream {target:?} is not among the allowed upstreams ({})",
            limits.allowed_upstreams.join(", ")
        ))
    }
}

/// Whether an allowed-upstreams entry admits `host`.
fn allows(allowed: &str, host: &str) -> bool {
    if let Some(suffix) = allowed.strip_prefix("*.") {
        return host.len() > suffix.len() + 1
            && host.ends_with(suffix)
            && host[..host.len() - suffix.len()].ends_with('.');
    }
    if let Some((network, bits)) = allowed.split_once('/') {
        let (Ok(network), Ok(bits), Ok(address)) = (
            network.parse::<IpAddr>(),
            bits.parse::<u32>(),
            host.parse::<IpAddr>(),
        ) else {
            return false;
        };
        return in_network(address, network, bits);
    }
    allowed.eq_ignore_ascii_case(host)
}

fn in_network(address: IpAddr, network: IpAddr, bits: u32) -> bool {
    let (address, network, width) = match (address, network) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u32::from(a) as u128, u32::from(n) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let shift = width - bits;
    bits == 0 || (address >> shift) == (network >> shift)
}

/// Who serves each (host, path): the route, and the model when a ModelRoute.
type PathOwners = BTreeMap<(String, PathMatch), Vec<(ResourceId, Option<String>)>>;

/// A resource left out of a plan, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Which.
    pub resource: ResourceId,
    /// Why.
    pub reason: String,
}

/// What a gateway is to serve: the resources that fit together, in id order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Counts applies: the health route of a rendered config answers with it.
    pub generation: u64,
    /// The resources served.
    pub resources: Vec<(ResourceId, GatewaySpec)>,
}

impl Plan {
    /// The plan of `generation` from every stored resource (each accepted
    /// alone), oldest first, and the ones left out because they do not fit
    /// with the others: as in Gateway API, the older resource wins a conflict,
    /// so a new route never takes traffic from one already served.
    pub fn from_resources(
        generation: u64,
        resources: Vec<(ResourceId, GatewaySpec)>,
    ) -> (Self, Vec<Rejection>) {
        let mut rejected = Vec::new();
        // (host, path) to the route serving it, and the model when a ModelRoute.
        let mut taken: PathOwners = BTreeMap::new();
        let mut names: BTreeMap<(String, String, String), ResourceId> = BTreeMap::new();
        let mut kept = Vec::new();
        let (routes, policies): (Vec<_>, Vec<_>) = resources.into_iter().partition(|(_, spec)| {
            matches!(spec, GatewaySpec::Route(_) | GatewaySpec::ModelRoute(_))
        });
        for (id, spec) in routes {
            let named = (id.kind.clone(), id.namespace.clone(), id.name.clone());
            if let Some(other) = names.get(&named) {
                rejected.push(conflict(
                    &id,
                    other,
                    "has the same kind, namespace and name",
                ));
                continue;
            }
            let (claims, model) = path_claims(&spec);
            let clash = |(_, other_model): &(ResourceId, Option<String>)| {
                model.is_none() || other_model.is_none() || *other_model == model
            };
            let other = (claims.iter())
                .filter_map(|c| taken.get(c))
                .find_map(|owners| owners.iter().find(|o| clash(o)));
            if let Some((other, _)) = other {
                rejected.push(conflict(&id, other, "serves the same host and path"));
                continue;
            }
            for claim in claims {
                taken
                    .entry(claim)
                    .or_default()
                    .push((id.clone(), model.clone()));
            }
            names.insert(named, id.clone());
            kept.push((id, spec));
        }
        let mut guarded: BTreeSet<(String, String, String, &'static str)> = BTreeSet::new();
        for (id, spec) in policies {
            let target = match &spec {
                GatewaySpec::RateLimitPolicy(p) => &p.target_ref,
                GatewaySpec::AuthPolicy(p) => &p.target_ref,
                _ => unreachable!("routes were partitioned out"),
            };
            let named = (
                target.kind.clone(),
                id.namespace.clone(),
                target.name.clone(),
            );
            if !names.contains_key(&named) {
                rejected.push(Rejection {
                    resource: id.clone(),
                    reason: format!(
                        "targetRef names {} {}/{}, which does not exist or is not served",
                        target.kind, id.namespace, target.name
                    ),
                });
                continue;
            }
            let (kind, namespace, name) = named;
            if !guarded.insert((kind, namespace, name, spec.kind())) {
                rejected.push(Rejection {
                    resource: id.clone(),
                    reason: format!(
                        "another {} already applies to {} {}",
                        spec.kind(),
                        target.kind,
                        target.name
                    ),
                });
                continue;
            }
            kept.push((id, spec));
        }
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        let plan = Self {
            generation,
            resources: kept,
        };
        (plan, rejected)
    }

    /// This plan without `refused` (a gateway would not take it), re-checked:
    /// the plan, and the policies left dangling by the removal.
    pub fn without(self, refused: &ResourceId) -> (Self, Vec<Rejection>) {
        let rest = (self.resources.into_iter())
            .filter(|(id, _)| id != refused)
            .collect();
        Self::from_resources(self.generation, rest)
    }
}

fn conflict(id: &ResourceId, other: &ResourceId, what: &str) -> Rejection {
    Rejection {
        resource: id.clone(),
        reason: format!("conflicts with {other}: {what}"),
    }
}

/// The (host, path) pairs a route serves, and the model of a ModelRoute.
fn path_claims(spec: &GatewaySpec) -> (Vec<(String, PathMatch)>, Option<String>) {
    let (hosts, path, model) = match spec {
        GatewaySpec::Route(route) => (&route.hosts, route.path.clone(), None),
        GatewaySpec::ModelRoute(model) => (
            &model.hosts,
            PathMatch {
                kind: PathKind::PathPrefix,
                value: model.path.clone(),
            },
            Some(model.model.clone()),
        ),
        _ => return (Vec::new(), None),
    };
    let any = [String::new()];
    let hosts: &[String] = if hosts.is_empty() { &any } else { hosts };
    let claims = (hosts.iter())
        .map(|h| (h.to_ascii_lowercase(), path.clone()))
        .collect();
    (claims, model)
}

#[cfg(test)]
mod tests;
