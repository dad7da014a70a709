//! The audit service's HTTP API: queries, a resource's history, signed heads,
//! inclusion and consistency proofs, and verification. Every route needs a bearer
//! token: a read token for queries and proofs, an admin token for `verify`. Errors
//! are JSON, `{"error": "...", "parameter": "..."}`, with the parameter named when
//! one was wrong. The OpenAPI document (`openapi.json`, served at `/openapi.json`)
//! describes exactly these routes and parameters (a test keeps them equal).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use changewire_schemas::http::constant_time_eq;
use changewire_schemas::{hex, Op};
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::head::key_id;
use super::log::{entry_at, LogNodes, Quarantined, QUARANTINE};
use super::merkle::{consistency_proof, inclusion_proof, leaf_hash, root};
use super::query::{Filters, Finder, QueryError};
use super::run_files::RunFiles;
use super::verify::{signed_heads, verify};
use super::{AuditConfig, AuditError};
use crate::runtime::{Store, StoreError};

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The query parameters `GET /v1/events` takes.
pub const EVENT_PARAMETERS: &[&str] = &[
    "source",
    "kind",
    "namespace",
    "name",
    "actor",
    "op",
    "from",
    "to",
    "changed",
    "order",
    "limit",
    "cursor",
];

/// Which tokens may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Read,
    Admin,
}

/// What every request shares.
struct Api {
    store: Store,
    /// The store's index-run files, kept open from request to request.
    files: RunFiles,
    key: VerifyingKey,
    cursor_key: Vec<u8>,
    read_tokens: Vec<String>,
    admin_tokens: Vec<String>,
    max_page: usize,
}

/// An error answer.
struct Failure {
    status: StatusCode,
    error: String,
    parameter: Option<&'static str>,
}

impl Failure {
    fn bad(parameter: &'static str, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            parameter: Some(parameter),
        }
    }

    fn status(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            parameter: None,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(parameter) = self.parameter {
            body["parameter"] = json!(parameter);
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = header::HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        tracing::error!(error = %changewire_schemas::diagnostics::report(&error), "audit store failed");
        Failure::status(StatusCode::INTERNAL_SERVER_ERROR, "the audit store failed")
    }
}

impl From<AuditError> for Failure {
    fn from(error: AuditError) -> Self {
        tracing::error!(error = %changewire_schemas::diagnostics::report(&error), "audit log incomplete");
        Failure::status(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

impl From<QueryError> for Failure {
    fn from(error: QueryError) -> Self {
        match error {
            QueryError::BadCursor => Failure::bad("cursor", error.to_string()),
            QueryError::Log(error) => error.into(),
        }
    }
}

type Answer = Result<Json<Value>, Failure>;

/// The API's routes over `store`, with heads verified by `key`.
pub fn router(config: &AuditConfig, store: Store, key: VerifyingKey) -> Router {
    let cursor_key =
        Sha256::digest([b"changewire-audit-cursor\0", config.signing_key.as_bytes()].concat())
            .to_vec();
    let api = Arc::new(Api {
        files: RunFiles::of(&store),
        store,
        key,
        cursor_key,
        read_tokens: config.read_tokens.clone(),
        admin_tokens: config.admin_tokens.clone(),
        max_page: config.max_page,
    });
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/events/{id}", get(event))
        .route(
            "/v1/resources/{source}/{kind}/{namespace}/{name}/history",
            get(history),
        )
        .route("/v1/heads", get(heads))
        .route("/v1/proof/inclusion", get(inclusion))
        .route("/v1/proof/consistency", get(consistency))
        .route("/v1/verify", post(verify_log))
        .route("/v1/quarantine", get(quarantined))
        .route("/openapi.json", get(openapi))
        .with_state(api)
}

/// The paths [`router`] serves, as the OpenAPI document names them.
pub const PATHS: &[&str] = &[
    "/v1/events",
    "/v1/events/{id}",
    "/v1/resources/{source}/{kind}/{namespace}/{name}/history",
    "/v1/heads",
    "/v1/proof/inclusion",
    "/v1/proof/consistency",
    "/v1/verify",
    "/v1/quarantine",
    "/openapi.json",
];

impl Api {
    fn authorize(&self, headers: &HeaderMap, needed: Role) -> Result<(), Failure> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = presented else {
            return Err(Failure::status(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required",
            ));
        };
        let is = |tokens: &[String]| {
            tokens
                .iter()
                .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
        };
        let role = if is(&self.admin_tokens) {
            Role::Admin
        } else if is(&self.read_tokens) {
            Role::Read
        } else {
            return Err(Failure::status(
                StatusCode::UNAUTHORIZED,
                "unknown bearer token",
            ));
        };
        if role < needed {
            return Err(Failure::status(
                StatusCode::FORBIDDEN,
                "this needs an admin token",
            ));
        }
        Ok(())
    }

    fn finder(&self) -> Finder<'_> {
        Finder::new(&self.store, &self.files, &self.cursor_key)
    }

    /// The page size asked for, within the limit.
    fn limit(&self, asked: Option<&String>) -> Result<usize, Failure> {
        let Some(asked) = asked else {
            return Ok(self.max_page.min(100));
        };
        match asked.parse::<usize>() {
            Ok(limit) if (1..=self.max_page).contains(&limit) => Ok(limit),
            _ => Err(Failure::bad(
                "limit",
                format!("expected a number from 1 to {}", self.max_page),
            )),
        }
    }
}

/// Reads `GET /v1/events`'s parameters; unknown ones are refused by name.
fn filters(params: &HashMap<String, String>) -> Result<Filters, Failure> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !EVENT_PARAMETERS.contains(&k.as_str()))
    {
        return Err(Failure {
            status: StatusCode::BAD_REQUEST,
            error: format!(
                "unknown parameter {unknown:?}; known: {}",
                EVENT_PARAMETERS.join(", ")
            ),
            parameter: None,
        });
    }
    let text = |name: &str| params.get(name).cloned();
    let time = |name: &'static str| -> Result<Option<i64>, Failure> {
        params
            .get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| Failure::bad(name, "expected milliseconds since the epoch"))
            })
            .transpose()
    };
    let op = match params.get("op") {
        Some(code) => Some(
            Op::from_code(code)
                .ok_or_else(|| Failure::bad("op", "expected one of c, u, d, r, t"))?,
        ),
        None => None,
    };
    let newest_first = match params.get("order").map(String::as_str) {
        None | Some("newest") => true,
        Some("oldest") => false,
        Some(_) => return Err(Failure::bad("order", "expected newest or oldest")),
    };
    Ok(Filters {
        source: text("source"),
        kind: text("kind"),
        namespace: text("namespace"),
        name: text("name"),
        actor: text("actor"),
        op,
        from_ms: time("from")?,
        to_ms: time("to")?,
        changed: text("changed"),
        newest_first,
    })
}

async fn events(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    let filters = filters(&params)?;
    let limit = api.limit(params.get("limit"))?;
    let page = api
        .finder()
        .find(&filters, limit, params.get("cursor").map(String::as_str))?;
    Ok(Json(json!(page)))
}

async fn history(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path((source, kind, namespace, name)): Path<(String, String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    if let Some(unknown) = params
        .keys()
        .find(|k| !["limit", "cursor"].contains(&k.as_str()))
    {
        return Err(Failure::status(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {unknown:?}; known: limit, cursor"),
        ));
    }
    let filters = Filters {
        source: Some(source),
        kind: Some(kind),
        // `-` names no namespace: cluster-scoped objects.
        namespace: Some(if namespace == "-" {
            String::new()
        } else {
            namespace
        }),
        name: Some(name),
        newest_first: false,
        ..Filters::default()
    };
    let limit = api.limit(params.get("limit"))?;
    let page = api
        .finder()
        .find(&filters, limit, params.get("cursor").map(String::as_str))?;
    Ok(Json(json!(page)))
}

async fn event(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    let with_proof = match params.get("proof").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Failure::bad("proof", "expected true or false")),
    };
    let Some(index) = api.finder().locate(&id)? else {
        return Err(Failure::status(
            StatusCode::NOT_FOUND,
            format!("no event {id:?} in the log"),
        ));
    };
    let Some(found) = api.finder().load(index)? else {
        return Err(Failure::status(
            StatusCode::NOT_FOUND,
            format!("event {id:?} is indexed but its entry is gone"),
        ));
    };
    let mut body = json!(found);
    if with_proof {
        body["proof"] = inclusion_body(&api, index, None)?;
    }
    Ok(Json(body))
}

/// An inclusion proof of `index` in the tree of `size` leaves (default: the latest
/// signed head covering it, else the whole log).
fn inclusion_body(api: &Api, index: u64, size: Option<u64>) -> Result<Value, Failure> {
    let logged = api.finder().size()?;
    let head = signed_heads(&api.store)?
        .into_iter()
        .rfind(|h| h.size > index && size.is_none_or(|s| s == h.size));
    let size = size.or(head.as_ref().map(|h| h.size)).unwrap_or(logged);
    if index >= size || size > logged {
        return Err(Failure::bad(
            "size",
            format!("expected index < size <= {logged}"),
        ));
    }
    let get = |key: &[u8]| api.store.get(key);
    let nodes = LogNodes(&get);
    let entry = entry_at(&api.store, index)?.unwrap_or_default();
    Ok(json!({
        "index": index,
        "tree_size": size,
        // The stored entry itself, so a client hashes the leaf on its own.
        "entry": BASE64.encode(&entry),
        "leaf_hash": hex(&leaf_hash(&entry)),
        "path": inclusion_proof(&nodes, index, size)?.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        "root": hex(&root(&nodes, size)?),
        "head": head,
    }))
}

async fn heads(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.authorize(&headers, Role::Read)?;
    Ok(Json(json!({
        "public_key": hex(api.key.as_bytes()),
        "key_id": key_id(&api.key),
        "size": api.finder().size()?,
        "heads": signed_heads(&api.store)?,
    })))
}

fn number(params: &HashMap<String, String>, name: &'static str) -> Result<u64, Failure> {
    let value = params
        .get(name)
        .ok_or_else(|| Failure::bad(name, "required"))?;
    value
        .parse()
        .map_err(|_| Failure::bad(name, "expected a non-negative integer"))
}

async fn inclusion(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    let index = number(&params, "index")?;
    let size = params
        .contains_key("size")
        .then(|| number(&params, "size"))
        .transpose()?;
    Ok(Json(inclusion_body(&api, index, size)?))
}

async fn consistency(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    let (from, to) = (number(&params, "from")?, number(&params, "to")?);
    let size = api.finder().size()?;
    if from == 0 || from > to || to > size {
        return Err(Failure::bad(
            "from",
            format!("expected 1 <= from <= to <= {size}"),
        ));
    }
    let get = |key: &[u8]| api.store.get(key);
    let nodes = LogNodes(&get);
    Ok(Json(json!({
        "from": from,
        "to": to,
        "proof": consistency_proof(&nodes, from, to)?.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        "from_root": hex(&root(&nodes, from)?),
        "to_root": hex(&root(&nodes, to)?),
    })))
}

async fn verify_log(State(api): State<Arc<Api>>, headers: HeaderMap) -> Answer {
    api.authorize(&headers, Role::Admin)?;
    let store = api.store.clone();
    let key = api.key;
    let report = tokio::task::spawn_blocking(move || verify(&store, &key))
        .await
        .map_err(|e| Failure::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(
        json!({ "intact": report.is_intact(), "report": report }),
    ))
}

async fn quarantined(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Answer {
    api.authorize(&headers, Role::Read)?;
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "limit") {
        return Err(Failure::status(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter {unknown:?}; known: limit"),
        ));
    }
    let limit = api.limit(params.get("limit"))?;
    let end = [QUARANTINE, &[0xff; 9]].concat();
    let mut records = Vec::new();
    for entry in api.store.range(QUARANTINE, &end, true).take(limit) {
        let (_, value) = entry?;
        records.extend(serde_json::from_slice::<Quarantined>(&value).ok());
    }
    Ok(Json(json!({ "records": records })))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
