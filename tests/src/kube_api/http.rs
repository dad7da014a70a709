//! The fake API server's HTTP surface: discovery, CRUD, paginated lists and watches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::audit::{AuditedWrite, Auditor, Requester};
use super::selector::Selector;
use super::store::{now_micros, ApiError, Change, ChangeType, ResourceType, Store};
use super::Shared;

type Params = Query<HashMap<String, String>>;

/// Where a request points.
struct Target {
    kind: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Every request lands here: the URL space is parsed by hand because its segments
/// (`namespaces/{ns}/{plural}` vs `{plural}/{name}`) depend on the resource type.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Params,
    body: Bytes,
) -> Response {
    let received = now_micros();
    let reply = route(&shared, &method, &uri, &headers, &params, &body);
    if let Some(auditor) = shared.auditor() {
        let (username, groups) = shared.authenticate(&headers);
        let requester = Requester {
            username,
            groups,
            source_ip: peer.ip().to_string(),
            user_agent: header(&headers, "user-agent").to_owned(),
        };
        audit_write(
            &shared, &auditor, &requester, &method, &uri, &body, &reply, received,
        );
    }
    match reply {
        Ok(Reply::Json(code, value)) => (code, axum::Json(value)).into_response(),
        Ok(Reply::Watch(request)) => watch(shared, *request),
        Err(error) => failure(&error),
    }
}

/// Queues the audit event of a write (reads are not audited here).
#[allow(clippy::too_many_arguments)]
fn audit_write(
    shared: &Shared,
    auditor: &Auditor,
    requester: &Requester,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    reply: &Result<Reply, ApiError>,
    received: String,
) {
    let verb = match method.as_str() {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => return,
    };
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => ("", *version, rest),
        ["apis", group, version, rest @ ..] if !rest.is_empty() => (*group, *version, rest),
        _ => return,
    };
    let Ok(target) = target(
        &shared.store.lock().expect("store lock"),
        group,
        version,
        rest,
    ) else {
        return;
    };
    let (code, response) = match reply {
        Ok(Reply::Json(code, value)) => (code.as_u16(), value.clone()),
        Ok(Reply::Watch(_)) => return,
        Err(error) => (error.code, error.status()),
    };
    let name = target
        .name
        .clone()
        .or_else(|| response["metadata"]["name"].as_str().map(str::to_owned));
    let mut object_ref = json!({"resource": target.kind.plural, "namespace": target.namespace, "name": name, "apiGroup": target.kind.group, "apiVersion": target.kind.version});
    if target.status {
        object_ref["subresource"] = "status".into();
    }
    auditor.record(AuditedWrite {
        requester,
        verb,
        request_uri: uri.to_string(),
        object_ref,
        code,
        request: serde_json::from_slice(body).ok(),
        response,
        received,
    });
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

enum Reply {
    Json(StatusCode, Value),
    Watch(Box<WatchRequest>),
}

fn failure(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(error.status())).into_response()
}

fn route(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let store = shared.store.lock().expect("store lock");
    let ok = |value| Ok(Reply::Json(StatusCode::OK, value));
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            return ok(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-changewire-fake", "platform": "linux/amd64"}),
            )
        }
        ["api"] => {
            return ok(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => return ok(group_list(&store)),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] => {
            return group_list(&store)["groups"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["name"] == *group))
                .cloned()
                .map_or_else(|| Err(ApiError::not_found(group)), ok)
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::not_found(uri.path())),
    };
    if rest.is_empty() {
        return ok(resource_list(&store, group, version));
    }
    let target = target(&store, group, version, rest)?;
    drop(store);
    let manager = manager(params, headers);
    let decode = || {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    };
    let mut store = shared.store.lock().expect("store lock");
    let namespace = target.namespace.clone().unwrap_or_default();
    match (method.as_str(), &target.name) {
        ("GET", None) if is_true(params.get("watch")) => {
            Ok(Reply::Watch(Box::new(WatchRequest::new(target, params)?)))
        }
        ("GET", None) => ok(list(&store, &target, params)?),
        ("POST", None) => {
            if target.kind.namespaced && target.namespace.is_none() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "create needs a namespace in the path",
                ));
            }
            let created = store.create(&target.kind, &namespace, decode()?, &manager)?;
            Ok(Reply::Json(StatusCode::CREATED, created))
        }
        ("GET", Some(name)) => ok(store.get(&target.kind, &namespace, name)?),
        ("PUT", Some(name)) => ok(store.update(
            &target.kind,
            &namespace,
            name,
            decode()?,
            &manager,
            target.status,
        )?),
        ("PATCH", Some(name)) => {
            let content_type = header(headers, "content-type");
            if !content_type.starts_with("application/merge-patch+json")
                && !content_type.starts_with("application/strategic-merge-patch+json")
            {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the fake API server supports merge patches, not {content_type}"),
                ));
            }
            ok(store.merge_patch(
                &target.kind,
                &namespace,
                name,
                &decode()?,
                &manager,
                target.status,
            )?)
        }
        ("DELETE", Some(name)) => ok(store.delete(&target.kind, &namespace, name)?),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    }
}

fn target(store: &Store, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, more @ ..] if *plural != "status" => {
            (Some(ns.to_string()), [&[*plural][..], more].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let kind = store.resource_type(group, version, rest[0])?;
    if namespace.is_some() && !kind.namespaced {
        return Err(ApiError::not_found(&format!(
            "{} is cluster-scoped",
            kind.plural
        )));
    }
    let status = match rest.get(2) {
        None => false,
        Some(&"status") => true,
        Some(other) => return Err(ApiError::not_found(&format!("subresource {other}"))),
    };
    Ok(Target {
        kind,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        status,
    })
}

/// The field manager: `fieldManager`, else the user agent's product name.
fn manager(params: &HashMap<String, String>, headers: &HeaderMap) -> String {
    params.get("fieldManager").cloned().unwrap_or_else(|| {
        let agent = header(headers, "user-agent");
        let product = agent.split('/').next().unwrap_or(agent);
        if product.is_empty() {
            "unknown"
        } else {
            product
        }
        .to_owned()
    })
}

fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "true" || v == "1")
}

fn group_list(store: &Store) -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for kind in store.types().iter().filter(|t| !t.group.is_empty()) {
        if groups.iter().any(|g| g["name"] == kind.group.as_str()) {
            continue;
        }
        let version = json!({"groupVersion": kind.api_version(), "version": kind.version});
        groups
            .push(json!({"name": kind.group, "versions": [version], "preferredVersion": version}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(store: &Store, group: &str, version: &str) -> Value {
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for kind in store
        .types()
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let singular = kind.kind.to_lowercase();
        resources.push(json!({"name": kind.plural, "singularName": singular, "namespaced": kind.namespaced, "kind": kind.kind, "verbs": verbs}));
        if kind.status_subresource {
            resources.push(json!({"name": format!("{}/status", kind.plural), "singularName": "", "namespaced": kind.namespaced, "kind": kind.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// A paginated, consistent list: every page is cut from the version of the first.
fn list(
    store: &Store,
    target: &Target,
    params: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let labels = Selector::labels(params.get("labelSelector").map_or("", String::as_str))?;
    let fields = Selector::fields(params.get("fieldSelector").map_or("", String::as_str))?;
    let (at, after) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => decode_continue(token)?,
        None => (store.resource_version(), None),
    };
    let limit = match params.get("limit") {
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("limit must be a number"))?,
        None => 0,
    };
    let matching: Vec<_> = store
        .snapshot(&target.kind, target.namespace.as_deref(), at)?
        .into_iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|after| key > after))
        .filter(|(_, object)| labels.matches(object) && fields.matches(object))
        .collect();
    let take = if limit == 0 {
        matching.len()
    } else {
        limit.min(matching.len())
    };
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if take < matching.len() {
        let last = &matching[take - 1].0;
        metadata["continue"] = encode_continue(at, last).into();
        metadata["remainingItemCount"] = (matching.len() - take).into();
    }
    let items: Vec<Value> = matching
        .into_iter()
        .take(take)
        .map(|(_, object)| list_item(&target.kind, object))
        .collect();
    Ok(
        json!({"kind": format!("{}List", target.kind.kind), "apiVersion": target.kind.api_version(), "metadata": metadata, "items": items}),
    )
}

/// An object as a list carries it: kube-apiserver encodes built-in kinds' items
/// without `apiVersion` and `kind` (the list names them once); custom resources are
/// unstructured and keep theirs.
fn list_item(kind: &ResourceType, mut object: Value) -> Value {
    if !kind.custom {
        if let Some(fields) = object.as_object_mut() {
            fields.remove("apiVersion");
            fields.remove("kind");
        }
    }
    object
}

fn encode_continue(at: u64, last: &(String, String)) -> String {
    let token = json!({"rv": at, "namespace": last.0, "name": last.1});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, Option<(String, String)>), ApiError> {
    let invalid = || ApiError::bad_request("continue key is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let token: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let at = token["rv"].as_u64().ok_or_else(invalid)?;
    let key = (
        token["namespace"].as_str().ok_or_else(invalid)?.to_owned(),
        token["name"].as_str().ok_or_else(invalid)?.to_owned(),
    );
    Ok((at, Some(key)))
}

/// A watch request's parameters.
struct WatchRequest {
    target: Target,
    from: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    labels: Selector,
    fields: Selector,
}

impl WatchRequest {
    fn new(target: Target, params: &HashMap<String, String>) -> Result<Self, ApiError> {
        let from =
            match params.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => None,
                Some(rv) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
            };
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800);
        Ok(Self {
            target,
            from,
            bookmarks: is_true(params.get("allowWatchBookmarks")),
            timeout: Duration::from_secs(timeout),
            labels: Selector::labels(params.get("labelSelector").map_or("", String::as_str))?,
            fields: Selector::fields(params.get("fieldSelector").map_or("", String::as_str))?,
        })
    }

    fn visible(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a watcher with this request sees for `change`, if any: objects that
    /// start or stop matching the selectors are ADDED or DELETED for it.
    fn event(&self, change: &Change) -> Option<Value> {
        let kind = &self.target.kind;
        if change.resource != (kind.group.clone(), kind.plural.clone()) {
            return None;
        }
        if self
            .target
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != change.namespace)
        {
            return None;
        }
        let now = self.visible(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.visible(p));
        let kind = match (change.kind, before, now) {
            (ChangeType::Modified, true, true) => ChangeType::Modified,
            (ChangeType::Modified, false, true) => ChangeType::Added,
            (ChangeType::Modified, true, false) => ChangeType::Deleted,
            (kind, _, true) => kind,
            (_, _, false) => return None,
        };
        Some(json!({"type": kind.as_str(), "object": change.object}))
    }

    fn bookmark(&self, rv: u64) -> Value {
        let kind = &self.target.kind;
        json!({"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}})
    }
}

fn line(value: &Value) -> Result<Bytes, std::io::Error> {
    let mut bytes = serde_json::to_vec(value).expect("JSON values serialize");
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

/// Starts a watch: backlog, then live changes, bookmarks, until timeout, client
/// disconnect or a dropped-connections hook (which aborts the connection mid-stream).
fn watch(shared: Arc<Shared>, request: WatchRequest) -> Response {
    let start = {
        let store = shared.store.lock().expect("store lock");
        match request.from {
            None => {
                let current = store.resource_version();
                store
                    .snapshot(
                        &request.target.kind,
                        request.target.namespace.as_deref(),
                        current,
                    )
                    .map(|objects| {
                        let added: Vec<Value> = objects
                            .into_iter()
                            .filter(|(_, o)| request.visible(o))
                            .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                            .collect();
                        let (_, live) = store
                            .watch_from(current)
                            .expect("the current version is never compacted");
                        (added, current, live)
                    })
            }
            Some(from) => store.watch_from(from).map(|(backlog, live)| {
                let events = backlog.iter().filter_map(|c| request.event(c)).collect();
                let last = backlog.last().map_or(from, |c| c.rv);
                (events, last, live)
            }),
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    match start {
        Ok((initial, rv, live)) => {
            tokio::spawn(stream_watch(shared, request, initial, rv, live, tx));
        }
        Err(gone) if shared.options().gone_as_http => return failure(&gone),
        Err(gone) => {
            let _ = tx.try_send(line(&json!({"type": "ERROR", "object": gone.status()})));
        }
    }
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("static response parts")
}

async fn stream_watch(
    shared: Arc<Shared>,
    request: WatchRequest,
    initial: Vec<Value>,
    mut rv: u64,
    mut live: broadcast::Receiver<Arc<Change>>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    shared.active_watches.fetch_add(1, Ordering::SeqCst);
    let _active = scopeguard(&shared);
    let mut drops = shared.drops.subscribe();
    for event in &initial {
        if tx.send(line(event)).await.is_err() {
            return;
        }
    }
    let deadline = Instant::now() + request.timeout;
    let mut bookmarks = tokio::time::interval(shared.options().bookmark_interval);
    bookmarks.tick().await;
    loop {
        let outgoing = tokio::select! {
            change = live.recv() => match change {
                Ok(change) => {
                    rv = change.rv;
                    match request.event(&change) {
                        Some(event) => line(&event),
                        None => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let gone = ApiError::expired(format!("too old resource version: {rv}"));
                    let _ = tx.send(line(&json!({"type": "ERROR", "object": gone.status()}))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = bookmarks.tick(), if request.bookmarks => line(&request.bookmark(rv)),
            _ = tokio::time::sleep_until(deadline) => return,
            _ = drops.changed() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "watch dropped by the test")),
            _ = tx.closed() => return,
        };
        let aborting = outgoing.is_err();
        if tx.send(outgoing).await.is_err() || aborting {
            return;
        }
    }
}

/// Decrements the active-watch count when the watch ends, however it ends.
fn scopeguard(shared: &Arc<Shared>) -> impl Drop + '_ {
    struct Guard<'a>(&'a Shared);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.active_watches.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Guard(shared)
}
