//! Each resource's status and each gateway's last apply, kept in the store and
//! served over HTTP (`GET /v1/status`, `GET /v1/status/{kind}/{namespace}/{name}`,
//! bearer tokens), the way Gateway API reports `Accepted` and `Programmed`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use changewire_schemas::http::{bearer_among, Bearer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::apply::Outcome;
use super::desired::ResourceId;
use crate::runtime::Store;

/// Each resource's status, by its key.
pub(super) const STATUS: &str = "gateway/status/";
/// Each gateway's last apply outcome.
pub(super) const LAST: &str = "gateway/last/";

/// Where a resource stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceState {
    /// Its spec was taken; the next apply will serve it.
    Accepted,
    /// A gateway serves it.
    Programmed,
    /// Refused, with the reason; an earlier accepted spec may still be served.
    Rejected,
    /// Deleted: no longer served once the next apply ran.
    Deleted,
}

/// A resource's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceStatus {
    /// Which resource.
    pub resource: ResourceId,
    /// Where it stands.
    pub state: ResourceState,
    /// Why, when rejected.
    #[serde(default)]
    pub reason: Option<String>,
    /// The gateway that programmed or rejected it.
    #[serde(default)]
    pub gateway: Option<String>,
    /// The plan's generation.
    #[serde(default)]
    pub generation: Option<u64>,
    /// The config digest serving it.
    #[serde(default)]
    pub config: Option<String>,
    /// The custom resource's `metadata.generation` this status describes.
    #[serde(default)]
    pub observed: Option<i64>,
    /// When (ms since the epoch).
    pub at_ms: i64,
}

impl ResourceStatus {
    /// A status without a gateway or generation.
    pub fn new(
        resource: ResourceId,
        state: ResourceState,
        reason: Option<String>,
        at_ms: i64,
    ) -> Self {
        Self {
            resource,
            state,
            reason,
            gateway: None,
            generation: None,
            config: None,
            observed: None,
            at_ms,
        }
    }

    /// Served by the apply `outcome` reports.
    pub fn programmed(resource: ResourceId, outcome: &Outcome) -> Self {
        Self {
            gateway: Some(outcome.gateway.clone()),
            generation: Some(outcome.generation),
            config: Some(outcome.config.clone()),
            ..Self::new(resource, ResourceState::Programmed, None, outcome.at_ms)
        }
    }
}

struct Api {
    store: Store,
    tokens: Vec<String>,
}

/// The status API over `store`.
pub fn router(store: Store, tokens: Vec<String>) -> Router {
    let api = Arc::new(Api { store, tokens });
    Router::new()
        .route("/v1/status", get(all))
        .route("/v1/status/{kind}/{namespace}/{name}", get(one))
        .with_state(api)
}

/// A request refused, with why: a JSON error.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn refuse(status: StatusCode, reason: &str) -> Refusal {
    Refusal(status, reason.to_owned())
}

impl Api {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        match bearer_among(headers, &self.tokens) {
            Bearer::Accepted => Ok(()),
            Bearer::Missing => Err(refuse(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required",
            )),
            Bearer::Unknown => Err(refuse(
                StatusCode::FORBIDDEN,
                "the bearer token is not accepted",
            )),
        }
    }

    fn values(&self, prefix: &str) -> Result<Vec<Value>, Refusal> {
        let entries = self.store.scan(prefix.as_bytes()).map_err(|e| {
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the store cannot be read: {e}"),
            )
        })?;
        Ok(entries
            .into_iter()
            .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
            .collect())
    }
}

async fn all(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(refused) = api.authorize(&headers) {
        return refused.into_response();
    }
    match (api.values(STATUS), api.values(LAST)) {
        (Ok(resources), Ok(applies)) => {
            Json(json!({ "resources": resources, "gateways": applies })).into_response()
        }
        (Err(e), _) | (_, Err(e)) => e.into_response(),
    }
}

async fn one(
    State(api): State<Arc<Api>>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = api.authorize(&headers) {
        return refused.into_response();
    }
    let statuses = match api.values(STATUS) {
        Ok(statuses) => statuses,
        Err(e) => return e.into_response(),
    };
    let matching: Vec<Value> = (statuses.into_iter())
        .filter(|s| {
            let id = &s["resource"];
            id["kind"] == kind.as_str()
                && id["namespace"] == namespace.as_str()
                && id["name"] == name.as_str()
        })
        .collect();
    if matching.is_empty() {
        return refuse(
            StatusCode::NOT_FOUND,
            &format!("no status for {kind}/{namespace}/{name}"),
        )
        .into_response();
    }
    Json(json!({ "statuses": matching })).into_response()
}
