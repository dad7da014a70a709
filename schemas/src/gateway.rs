//! The gateway resource model: what the gateway service turns into nginx and
//! Caddy configuration. Group `gateway.changewire.dev`, version `v1alpha1`; the
//! CRD manifests are in `schemas/crds/`, the Postgres table for routes in
//! `schemas/sql/gateway_routes.sql`. Field names follow Kubernetes conventions
//! (camelCase); unknown fields are refused, so a typo is an error, not a silently
//! ignored setting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The API group of the gateway kinds.
pub const GROUP: &str = "gateway.changewire.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// The plural (the resource's path segment) of a gateway kind.
pub fn plural(kind: &str) -> String {
    match kind {
        "RateLimitPolicy" => "ratelimitpolicies".into(),
        "AuthPolicy" => "authpolicies".into(),
        other => format!("{}s", other.to_ascii_lowercase()),
    }
}

/// A gateway resource's spec, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum GatewaySpec {
    /// HTTP traffic to upstream servers.
    Route(RouteSpec),
    /// A request rate limit on a route or model route.
    RateLimitPolicy(RateLimitPolicySpec),
    /// Who may call a route or model route.
    AuthPolicy(AuthPolicySpec),
    /// An AI model name to provider endpoints.
    ModelRoute(ModelRouteSpec),
}

impl GatewaySpec {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Route(_) => "Route",
            Self::RateLimitPolicy(_) => "RateLimitPolicy",
            Self::AuthPolicy(_) => "AuthPolicy",
            Self::ModelRoute(_) => "ModelRoute",
        }
    }

    /// Reads the spec of a `kind` resource.
    pub fn from_spec(kind: &str, spec: serde_json::Value) -> Result<Self, String> {
        let parsed = match kind {
            "Route" => serde_json::from_value(spec).map(Self::Route),
            "RateLimitPolicy" => serde_json::from_value(spec).map(Self::RateLimitPolicy),
            "AuthPolicy" => serde_json::from_value(spec).map(Self::AuthPolicy),
            "ModelRoute" => serde_json::from_value(spec).map(Self::ModelRoute),
            other => return Err(format!("{other} is not a gateway kind")),
        };
        parsed.map_err(|e| format!("invalid {kind} spec: {e}"))
    }
}

/// `Route`: requests for some hosts and paths go to weighted upstream servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// Host names (`api.example.com`, `*.example.com`); any host when empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Which paths.
    pub path: PathMatch,
    /// HTTP methods; any when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Where requests go, by weight.
    pub upstreams: Vec<Upstream>,
    /// Connect and response timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Retries on another upstream.
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Request headers set or removed before proxying.
    #[serde(default)]
    pub request_headers: Option<HeaderRewrite>,
    /// Response headers set or removed before answering.
    #[serde(default)]
    pub response_headers: Option<HeaderRewrite>,
}

/// A path match (Gateway API's types).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: PathKind,
    /// The path, prefix or expression (RE2 syntax, matched against the path).
    pub value: String,
}

/// How a path is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PathKind {
    /// The whole path.
    Exact,
    /// Path segments from the start (`/api` matches `/api` and `/api/x`).
    PathPrefix,
    /// A regular expression, anchored by the user if they want it anchored.
    RegularExpression,
}

/// An upstream server and its share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upstream {
    /// `host:port`.
    pub target: String,
    /// Relative share (1 to 1000).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Timeouts in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Connecting to an upstream.
    #[serde(default)]
    pub connect_ms: Option<u64>,
    /// Waiting for the upstream's response.
    #[serde(default)]
    pub response_ms: Option<u64>,
}

/// Retries on the next upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Tries in all, the first included (1 to 10).
    pub attempts: u32,
    /// Whether a 5xx answer (not only a connection error or timeout) is retried.
    #[serde(default)]
    pub on_5xx: bool,
}

/// Headers to set and to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderRewrite {
    /// Header name to value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Header names.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Names the route or model route a policy applies to, in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `Route` or `ModelRoute`.
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// `RateLimitPolicy`: at most `requests` per `per` for each key, plus `burst`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// The route it limits.
    pub target_ref: TargetRef,
    /// Requests allowed per period.
    pub requests: u32,
    /// The period.
    pub per: RatePeriod,
    /// Requests above the rate let through at once before 429s.
    #[serde(default)]
    pub burst: u32,
    /// What one limit counts: the client's address, or a header's value.
    #[serde(default)]
    pub key: LimitKey,
}

/// A rate's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RatePeriod {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
}

/// What a rate limit is counted by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitKey {
    /// A request header's value (an API key, a tenant); the client's address
    /// when absent.
    #[serde(default)]
    pub header: Option<String>,
}

/// `AuthPolicy`: requests need an API key from a Secret, or a JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthPolicySpec {
    /// The route it guards.
    pub target_ref: TargetRef,
    /// API keys.
    #[serde(default)]
    pub api_keys: Option<ApiKeys>,
    /// JSON Web Tokens.
    #[serde(default)]
    pub jwt: Option<Jwt>,
}

/// API keys kept in a Secret: one key per line of the Secret's `key` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeys {
    /// The Secret, in the policy's namespace.
    pub secret_ref: SecretRef,
    /// The request header carrying the key.
    #[serde(default = "api_key_header")]
    pub header: String,
}

fn api_key_header() -> String {
    "X-Api-Key".into()
}

/// A Secret's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The Secret's name.
    pub name: String,
    /// The entry in its `data`.
    pub key: String,
}

/// JWT validation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwt {
    /// Expected `iss`.
    pub issuer: String,
    /// Accepted `aud` values.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the signing keys are.
    pub jwks_uri: String,
}

/// `ModelRoute`: requests naming a model (in the `X-Model` header) go to its
/// providers, by weight, falling back in priority order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRouteSpec {
    /// Host names; any host when empty.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The path prefix of the model API.
    #[serde(default = "model_path")]
    pub path: String,
    /// The model name clients ask for.
    pub model: String,
    /// Endpoints serving it.
    pub providers: Vec<Provider>,
    /// Limits per model.
    #[serde(default)]
    pub limits: Option<ModelLimits>,
}

fn model_path() -> String {
    "/v1/".into()
}

/// A provider endpoint of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    /// A name for status messages.
    pub name: String,
    /// `host:port`.
    pub target: String,
    /// Share among providers of the same priority.
    #[serde(default = "one")]
    pub weight: u32,
    /// 0 first; higher priorities are used when every lower one failed (5xx,
    /// refused, timed out).
    #[serde(default)]
    pub priority: u32,
}

/// Per-model limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelLimits {
    /// Requests per minute to this model, for all clients together.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute (needs the response's usage: not enforced by nginx or
    /// Caddy, so refused).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_route_reads_with_defaults_and_refuses_unknown_fields() {
        let spec = json!({"path": {"type": "PathPrefix", "value": "/api"},
            "upstreams": [{"target": "127.0.0.1:9000"}]});
        let GatewaySpec::Route(route) = GatewaySpec::from_spec("Route", spec.clone()).unwrap()
        else {
            panic!("a route")
        };
        assert_eq!(route.upstreams[0].weight, 1);
        assert!(route.hosts.is_empty());
        let mut typo = spec;
        typo["upstream"] = json!("x");
        let error = GatewaySpec::from_spec("Route", typo).unwrap_err();
        assert!(error.contains("unknown field `upstream`"), "{error}");
        assert!(GatewaySpec::from_spec("Gateway", json!({}))
            .unwrap_err()
            .contains("not a gateway kind"));
    }
}
