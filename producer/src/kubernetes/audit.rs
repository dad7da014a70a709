//! Who made a change, from the API server's audit log: an HTTPS endpoint for the
//! audit webhook backend (`audit.k8s.io/v1` `EventList`), and the index the watch
//! looks changes up in by uid and resourceVersion.
//!
//! The API server sends audit events in batches, so one may arrive before or after
//! the watch delivers the change it caused: the watch waits up to `wait_ms` for the
//! missing ones, then falls back to managedFields.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use changewire_schemas::http::{require_bearer, tls_acceptor, TlsListener, TlsSetupError};
use changewire_schemas::settings::ConfigError;
use changewire_schemas::{Actor, ActorVia, ChangeEvent, Op, Origin};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use crate::metrics::SourceMetrics;

/// The `[kubernetes.audit]` section: the audit webhook endpoint.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Address to listen on (HTTPS).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain the endpoint presents.
    pub tls_cert: PathBuf,
    /// PEM PKCS#8 private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// Bearer token the API server must send (its webhook kubeconfig's `token`; at
    /// least 16 bytes; set it from `CHANGEWIRE_KUBERNETES__AUDIT__TOKEN`).
    pub token: String,
    /// How long a change waits for its audit event before managedFields is used.
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
    /// How long audit events are kept for changes the watch has not seen yet.
    #[serde(default = "default_retention_secs")]
    pub retention_secs: u64,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9443))
}

fn default_wait_ms() -> u64 {
    2_000
}

fn default_retention_secs() -> u64 {
    600
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("listen", &self.listen)
            .field("tls_cert", &self.tls_cert)
            .field("token", &"<redacted>")
            .field("wait_ms", &self.wait_ms)
            .finish_non_exhaustive()
    }
}

impl AuditConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.token.len() < 16 {
            return Err(ConfigError::invalid(
                "kubernetes.audit.token",
                "set a token of at least 16 bytes (CHANGEWIRE_KUBERNETES__AUDIT__TOKEN)",
            ));
        }
        if self.retention_secs * 1000 < self.wait_ms {
            return Err(ConfigError::invalid(
                "kubernetes.audit",
                "retention_secs must cover wait_ms",
            ));
        }
        Ok(())
    }
}

/// Audit events kept at most, whatever their age (bounds memory under a flood).
const MAX_ENTRIES: usize = 200_000;

/// What an audit event tells about one change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Change {
    /// The write that produced this resourceVersion of the object.
    Version {
        uid: String,
        resource_version: String,
    },
    /// The request that deleted the object.
    Deletion { uid: String },
}

/// Audit events by the change they caused, for a bounded time.
pub struct Attributions {
    entries: Mutex<Entries>,
    arrived: Notify,
    retention: Duration,
    wait: Duration,
    received: Counter,
    attributed: Counter,
    unattributed: Counter,
}

#[derive(Default)]
struct Entries {
    actors: HashMap<Change, Actor>,
    order: VecDeque<(Instant, Change)>,
}

impl Attributions {
    /// Per the `[kubernetes.audit]` section, counting in `metrics`.
    pub fn new(config: &AuditConfig, metrics: &SourceMetrics) -> Self {
        let [received, attributed, unattributed] = metrics.audit();
        Self {
            entries: Mutex::default(),
            arrived: Notify::new(),
            retention: Duration::from_secs(config.retention_secs),
            wait: Duration::from_millis(config.wait_ms),
            received,
            attributed,
            unattributed,
        }
    }

    /// Records the changes an audit `EventList` reports.
    pub fn record(&self, list: EventList) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for event in list.items {
            self.received.inc();
            let actor = event.actor();
            for change in event.changes() {
                entries.order.push_back((now, change.clone()));
                entries.actors.insert(change, actor.clone());
            }
        }
        entries.expire(now, self.retention);
        drop(entries);
        self.arrived.notify_waiters();
    }

    /// Fills `actor` of the live changes in `events` (read from the watch at `seen`)
    /// from their audit events, waiting until `seen + wait` for the missing ones.
    pub async fn attribute(&self, events: &mut [ChangeEvent], seen: Instant) {
        let deadline = tokio::time::Instant::from_std(seen + self.wait);
        let mut missing: Vec<usize> = (0..events.len())
            .filter(|&i| change_of(&events[i]).is_some())
            .collect();
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so an arrival in between is not missed.
            arrived.as_mut().enable();
            missing.retain(|&i| !self.fill(&mut events[i]));
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        self.unattributed.inc_by(missing.len() as u64);
    }

    /// Sets the event's actor if its audit event is here.
    fn fill(&self, event: &mut ChangeEvent) -> bool {
        let Some(change) = change_of(event) else {
            return true;
        };
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let actor = entries.actors.get(&change).or_else(|| match &change {
            // A delete whose response carried no resourceVersion.
            Change::Version { uid, .. } if event.op == Op::Delete => {
                entries.actors.get(&Change::Deletion { uid: uid.clone() })
            }
            _ => None,
        });
        match actor {
            Some(actor) => {
                event.actor = Some(actor.clone());
                self.attributed.inc();
                true
            }
            None => false,
        }
    }
}

impl Entries {
    fn expire(&mut self, now: Instant, retention: Duration) {
        while let Some((at, change)) = self.order.front() {
            if now.duration_since(*at) < retention && self.order.len() <= MAX_ENTRIES {
                break;
            }
            self.actors.remove(change);
            self.order.pop_front();
        }
    }
}

/// The change a Kubernetes event reports, for looking up its audit event.
fn change_of(event: &ChangeEvent) -> Option<Change> {
    let Origin::Kubernetes(origin) = &event.source.origin else {
        return None;
    };
    if event.op == Op::Read {
        return None;
    }
    Some(Change::Version {
        uid: origin.uid.clone(),
        resource_version: origin.resource_version.clone(),
    })
}

/// An `audit.k8s.io/v1` `EventList`, as much of it as attribution needs.
#[derive(Debug, Deserialize)]
pub struct EventList {
    #[serde(default)]
    items: Vec<AuditEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    stage: String,
    verb: String,
    user: UserInfo,
    #[serde(default)]
    source_i_ps: Vec<String>,
    #[serde(default)]
    user_agent: Option<String>,
    #[serde(default)]
    object_ref: Option<ObjectReference>,
    #[serde(default)]
    response_status: Option<ResponseStatus>,
    #[serde(default)]
    response_object: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ObjectReference {
    #[serde(default)]
    uid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponseStatus {
    #[serde(default)]
    code: u16,
}

impl AuditEvent {
    /// The authenticated user (not an impersonated one: who really asked).
    fn actor(&self) -> Actor {
        Actor {
            name: self.user.username.clone(),
            via: ActorVia::Audit,
            groups: self.user.groups.clone(),
            source_ips: self.source_i_ps.clone(),
            user_agent: self.user_agent.clone().filter(|a| !a.is_empty()),
        }
    }

    /// The changes a completed, successful write made: the object's new version
    /// (from the response object, present at level RequestResponse), and for a
    /// delete the deletion itself (uid from the response or objectRef).
    fn changes(&self) -> Vec<Change> {
        let writes = ["create", "update", "patch", "delete"];
        let succeeded = self
            .response_status
            .as_ref()
            .is_none_or(|s| (200..300).contains(&s.code));
        if self.stage != "ResponseComplete" || !writes.contains(&self.verb.as_str()) || !succeeded {
            return Vec::new();
        }
        let metadata = self
            .response_object
            .as_ref()
            .filter(|o| o["kind"] != "Status")
            .map(|o| &o["metadata"]);
        let field = |name: &str| metadata.and_then(|m| m[name].as_str()).map(str::to_owned);
        // objectRef's resourceVersion is the one the request named (the version it
        // replaced), so only the response tells the version the write produced.
        let uid = field("uid").or_else(|| self.object_ref.as_ref().and_then(|r| r.uid.clone()));
        let resource_version = field("resourceVersion");
        let Some(uid) = uid else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        if self.verb == "delete" {
            changes.push(Change::Deletion { uid: uid.clone() });
        }
        if let Some(resource_version) = resource_version {
            changes.push(Change::Version {
                uid,
                resource_version,
            });
        }
        changes
    }
}

/// The audit endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditServerError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The address cannot be listened on.
    #[error("cannot listen on kubernetes.audit.listen {address}")]
    Listen {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct Endpoint {
    attributions: Arc<Attributions>,
    token: Arc<str>,
}

/// Request bodies accepted (batches of full objects at level RequestResponse).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Serves the webhook (`POST /audit`, any path under it too) in the background;
/// returns the bound address.
pub async fn serve(
    config: &AuditConfig,
    attributions: Arc<Attributions>,
) -> Result<SocketAddr, AuditServerError> {
    let acceptor = tls_acceptor(&config.tls_cert, &config.tls_key)?;
    let listen_error = |source| AuditServerError::Listen {
        address: config.listen,
        source,
    };
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_error)?;
    let listener = TlsListener::new(tcp, acceptor).map_err(listen_error)?;
    let address = axum::serve::Listener::local_addr(&listener).map_err(listen_error)?;
    let router = Router::new()
        .route("/audit", post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Endpoint {
            attributions,
            token: Arc::from(config.token.as_str()),
        });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "audit endpoint failed");
        }
    });
    tracing::info!(%address, "serving the audit webhook at /audit (HTTPS)");
    Ok(address)
}

async fn receive(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = require_bearer(&headers, &endpoint.token) {
        return refused;
    }
    match serde_json::from_slice::<EventList>(&body) {
        Ok(list) => {
            endpoint.attributions.record(list);
            StatusCode::OK.into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "audit webhook body is not an audit.k8s.io/v1 EventList");
            (
                StatusCode::BAD_REQUEST,
                format!("not an audit.k8s.io/v1 EventList: {error}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(items: Value) -> EventList {
        serde_json::from_value(
            json!({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": items}),
        )
        .unwrap()
    }

    #[test]
    fn only_completed_successful_writes_count_and_deletes_are_kept_by_uid() {
        let event = |stage: &str, verb: &str, code: u16| {
            json!({"stage": stage, "verb": verb, "user": {"username": "alice", "groups": ["dev"]},
                   "sourceIPs": ["10.0.0.7"], "userAgent": "kubectl/v1.33",
                   "objectRef": {"resource": "configmaps", "namespace": "a", "name": "m"},
                   "responseStatus": {"code": code},
                   "responseObject": {"kind": "ConfigMap", "metadata": {"uid": "u1", "resourceVersion": "7"}}})
        };
        let parsed = list(json!([
            event("RequestReceived", "create", 200),
            event("ResponseComplete", "get", 200),
            event("ResponseComplete", "patch", 409),
            event("ResponseComplete", "update", 200),
            event("ResponseComplete", "delete", 200),
        ]));
        let changes: Vec<Vec<Change>> = parsed.items.iter().map(AuditEvent::changes).collect();
        let version = Change::Version {
            uid: "u1".into(),
            resource_version: "7".into(),
        };
        assert_eq!(changes[..3], [vec![], vec![], vec![]]);
        assert_eq!(changes[3], std::slice::from_ref(&version));
        assert_eq!(changes[4], [Change::Deletion { uid: "u1".into() }, version]);
        let actor = parsed.items[3].actor();
        assert_eq!(
            (
                actor.name.as_str(),
                actor.via,
                &actor.groups[..],
                &actor.source_ips[..]
            ),
            (
                "alice",
                ActorVia::Audit,
                &["dev".to_owned()][..],
                &["10.0.0.7".to_owned()][..]
            )
        );
    }

    #[test]
    fn metadata_level_events_use_the_object_reference() {
        let parsed = list(
            json!([{"stage": "ResponseComplete", "verb": "delete", "user": {"username": "bob"},
            "objectRef": {"uid": "u2"}, "responseStatus": {"code": 200}}]),
        );
        assert_eq!(
            parsed.items[0].changes(),
            [Change::Deletion { uid: "u2".into() }]
        );
    }

    #[test]
    fn old_entries_expire_and_the_map_stays_bounded() {
        let mut entries = Entries::default();
        let start = Instant::now();
        for i in 0..3 {
            let change = Change::Deletion { uid: i.to_string() };
            entries
                .order
                .push_back((start + Duration::from_secs(i), change.clone()));
            entries.actors.insert(
                change,
                Actor {
                    name: "x".into(),
                    via: ActorVia::Audit,
                    groups: vec![],
                    source_ips: vec![],
                    user_agent: None,
                },
            );
        }
        entries.expire(start + Duration::from_millis(1500), Duration::from_secs(1));
        assert_eq!(entries.actors.len(), 2);
        assert!(!entries
            .actors
            .contains_key(&Change::Deletion { uid: "0".into() }));
    }
}
