//! Normalizing Kubernetes objects: what is published of an object (managedFields
//! stripped, secrets hashed), how two published forms compare (noise, status-only),
//! who changed it (managedFields), and the event built from all that.

use changewire_schemas::topic::CORE_GROUP;
use changewire_schemas::{
    Actor, ActorVia, ChangeEvent, EventId, KubernetesOrigin, Op, Origin, SnapshotMarker, Source,
};
use serde_json::Value;

use crate::redact::SecretHasher;

/// The annotation `kubectl apply` keeps a full copy of the object in, secrets included.
const LAST_APPLIED: &str = "kubectl.kubernetes.io~1last-applied-configuration";

/// A watched kind, resolved against the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedKind {
    /// API group ("" for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural resource name.
    pub plural: String,
    /// Namespace to watch (`None`: all).
    pub namespace: Option<String>,
    /// Label selector.
    pub label_selector: Option<String>,
    /// Field selector.
    pub field_selector: Option<String>,
    /// Drop status-only updates.
    pub drop_status_only: bool,
    /// JSON pointers (with `*`) to hash.
    pub redact: Vec<String>,
    /// Topic of the kind's events.
    pub topic: String,
}

/// Separates the parts of a stored resume point (never in a resourceVersion or a
/// selector).
const RESUME_SEPARATOR: char = '\0';

impl WatchedKind {
    /// Where this watch keeps its objects: one scope per kind and namespace, so watches
    /// never synthesize deletes for objects another watch owns.
    pub fn scope(&self) -> String {
        let namespace = self.namespace.as_deref().unwrap_or("*");
        format!("{}/{}/{}", self.group, self.kind, namespace)
    }

    /// The resume point as stored: the resourceVersion, followed by the selectors
    /// the watch ran with when there are any.
    pub fn resume_token(&self, version: &str) -> String {
        match self.selectors() {
            Some(selectors) => format!("{version}{RESUME_SEPARATOR}{selectors}"),
            None => version.to_owned(),
        }
    }

    /// The version to resume from, if `token` was stored under this kind's current
    /// selectors: a watch resumed under other selectors would never hear of objects
    /// that left them (a list finds those gone and publishes their deletes).
    pub fn resumable_version(&self, token: &str) -> Option<String> {
        let (version, selectors) = match token.split_once(RESUME_SEPARATOR) {
            Some((version, selectors)) => (version, Some(selectors)),
            None => (token, None),
        };
        (selectors == self.selectors().as_deref()).then(|| version.to_owned())
    }

    fn selectors(&self) -> Option<String> {
        if self.label_selector.is_none() && self.field_selector.is_none() {
            return None;
        }
        let (labels, fields) = (
            self.label_selector.as_deref().unwrap_or_default(),
            self.field_selector.as_deref().unwrap_or_default(),
        );
        Some(format!("{labels}{RESUME_SEPARATOR}{fields}"))
    }

    /// `group/Kind`, the label of per-kind metrics.
    pub fn label(&self) -> String {
        let group = if self.group.is_empty() {
            CORE_GROUP
        } else {
            &self.group
        };
        format!("{group}/{}", self.kind)
    }

    fn is_secret(&self) -> bool {
        self.group.is_empty() && self.kind == "Secret"
    }

    /// Paths hashed in this kind's objects: configured ones, Secret data, and the
    /// last-applied annotation wherever something is hashed (it repeats the values).
    fn redacted_paths(&self) -> Vec<String> {
        let mut paths = self.redact.clone();
        if self.is_secret() {
            paths.extend(["/data/*".into(), "/stringData/*".into()]);
        }
        if !paths.is_empty() {
            paths.push(format!("/metadata/annotations/{LAST_APPLIED}"));
        }
        paths
    }

    /// The message key: `<group>/<kind>/<namespace>/<name>`.
    pub fn key(&self, object: &Value) -> String {
        let metadata = &object["metadata"];
        let group = if self.group.is_empty() {
            CORE_GROUP
        } else {
            &self.group
        };
        format!(
            "{group}/{}/{}/{}",
            self.kind,
            metadata["namespace"].as_str().unwrap_or_default(),
            metadata["name"].as_str().unwrap_or_default()
        )
    }
}

/// An object as it will be published, and who last wrote it according to managedFields.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// managedFields stripped, secrets hashed.
    pub object: Value,
    /// The newest managedFields entry's manager.
    pub actor: Option<Actor>,
    /// When that entry was written (ms since the epoch).
    pub changed_ms: Option<i64>,
}

/// Fills the type fields from the watched kind (list items of built-in kinds come
/// without them), strips managedFields (keeping the newest writer as the actor) and
/// hashes secrets.
pub fn prepare(kind: &WatchedKind, mut object: Value, hasher: Option<&SecretHasher>) -> Prepared {
    fill_type_fields(kind, &mut object);
    let managed = object["metadata"]
        .as_object_mut()
        .and_then(|m| m.remove("managedFields"));
    let newest = managed
        .as_ref()
        .and_then(Value::as_array)
        .and_then(|entries| {
            entries
                .iter()
                .max_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()))
        });
    let actor = newest.and_then(|entry| {
        Some(Actor {
            name: entry["manager"].as_str()?.to_owned(),
            via: ActorVia::ManagedFields,
            groups: Vec::new(),
            source_ips: Vec::new(),
            user_agent: None,
        })
    });
    let changed_ms = newest.and_then(|entry| parse_time(&entry["time"]));
    for path in kind.redacted_paths() {
        let segments: Vec<String> = path.split('/').skip(1).map(unescape).collect();
        hash_at(&mut object, &segments, hasher);
    }
    Prepared {
        object,
        actor,
        changed_ms,
    }
}

/// Sets `apiVersion` and `kind` where the server left them out, so an object reads
/// the same whether it was listed or watched.
fn fill_type_fields(kind: &WatchedKind, object: &mut Value) {
    let Some(fields) = object.as_object_mut() else {
        return;
    };
    let api_version = if kind.group.is_empty() {
        kind.version.clone()
    } else {
        format!("{}/{}", kind.group, kind.version)
    };
    for (field, value) in [("apiVersion", api_version), ("kind", kind.kind.clone())] {
        let missing = fields
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if missing {
            fields.insert(field.to_owned(), Value::String(value));
        }
    }
}

/// RFC 3339 text to ms since the epoch.
pub fn parse_time(value: &Value) -> Option<i64> {
    let timestamp: k8s_openapi::jiff::Timestamp = value.as_str()?.parse().ok()?;
    Some(timestamp.as_millisecond())
}

fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// Replaces the values under `segments` (`*` = every key or index) by their hash. With
/// no key configured, values are blanked: a secret never passes unhashed.
fn hash_at(value: &mut Value, segments: &[String], hasher: Option<&SecretHasher>) {
    let Some((first, rest)) = segments.split_first() else {
        *value = match hasher {
            Some(hasher) => hasher.hash(value),
            None => Value::String("<redacted>".into()),
        };
        return;
    };
    match value {
        Value::Object(map) if first == "*" => {
            map.values_mut().for_each(|v| hash_at(v, rest, hasher));
        }
        Value::Object(map) => {
            if let Some(v) = map.get_mut(first) {
                hash_at(v, rest, hasher);
            }
        }
        Value::Array(items) if first == "*" => {
            items.iter_mut().for_each(|v| hash_at(v, rest, hasher));
        }
        Value::Array(items) => {
            if let Some(v) = first.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                hash_at(v, rest, hasher);
            }
        }
        _ => {}
    }
}

/// How an update compares with what was last published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// Nothing but `metadata.resourceVersion` (or managedFields) changed.
    Noise,
    /// Only `status` changed.
    StatusOnly,
    /// Spec, metadata or other fields changed.
    Content,
}

/// Compares two published forms. The same resourceVersion is the same object state
/// (the server bumps it with every write), so it is noise whatever our rendering of
/// it: an event id (`uid` + `resourceVersion`) never names two contents. Type fields
/// are left out, as states stored by earlier versions may lack them.
pub fn compare(before: &Value, after: &Value) -> Difference {
    let version = before["metadata"]["resourceVersion"].as_str();
    if version.is_some() && version == after["metadata"]["resourceVersion"].as_str() {
        return Difference::Noise;
    }
    let without = |object: &Value, status: bool| {
        let mut object = object.clone();
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("resourceVersion");
        }
        if let Some(fields) = object.as_object_mut() {
            fields.remove("apiVersion");
            fields.remove("kind");
        }
        if status {
            object.as_object_mut().map(|o| o.remove("status"));
        }
        object
    };
    if without(before, false) == without(after, false) {
        Difference::Noise
    } else if without(before, true) == without(after, true) {
        Difference::StatusOnly
    } else {
        Difference::Content
    }
}

/// RFC 6902 patch from `before` to `after`, without the resourceVersion replacement
/// every write carries (`source.resourceVersion` has it).
fn diff(before: &Value, after: &Value) -> Value {
    let operations: Vec<Value> = json_patch::diff(before, after)
        .0
        .iter()
        .filter_map(|operation| serde_json::to_value(operation).ok())
        .filter(|operation| operation["path"] != "/metadata/resourceVersion")
        .collect();
    Value::Array(operations)
}

/// What the event builder needs besides the objects.
#[derive(Debug, Clone)]
pub struct EventContext<'a> {
    /// Source name.
    pub source: &'a str,
    /// Cluster name.
    pub cluster: &'a str,
    /// The producer's clock (ms since the epoch).
    pub now_ms: i64,
}

/// Builds the event for one change. Deletes get the id `k8s:<source>:<uid>:deleted`:
/// a delete synthesized after a relist has no resourceVersion of its own, and one id
/// per deleted uid lets consumers drop a watched delete republished after a crash.
pub fn event(
    context: &EventContext<'_>,
    kind: &WatchedKind,
    op: Op,
    before: Option<Value>,
    after: Option<&Prepared>,
    snapshot: SnapshotMarker,
    status_only: bool,
) -> ChangeEvent {
    let object = after
        .map(|p| &p.object)
        .or(before.as_ref())
        .cloned()
        .unwrap_or_default();
    let metadata = &object["metadata"];
    let uid = metadata["uid"].as_str().unwrap_or_default();
    let resource_version = metadata["resourceVersion"].as_str().unwrap_or_default();
    let id = match op {
        Op::Delete => EventId::kubernetes(context.source, uid, "deleted"),
        _ => EventId::kubernetes(context.source, uid, resource_version),
    };
    let diff = match (&before, after) {
        (Some(before), Some(after)) => Some(diff(before, &after.object)),
        _ => None,
    };
    let changed_ms = match op {
        Op::Delete => parse_time(&metadata["deletionTimestamp"]),
        _ => after
            .and_then(|p| p.changed_ms)
            .or_else(|| parse_time(&metadata["creationTimestamp"])),
    };
    ChangeEvent {
        id,
        op,
        ts_ms: context.now_ms,
        source: Source {
            name: context.source.to_owned(),
            ts_ms: changed_ms.unwrap_or(context.now_ms),
            snapshot,
            origin: Origin::Kubernetes(KubernetesOrigin {
                cluster: context.cluster.to_owned(),
                group: kind.group.clone(),
                version: kind.version.clone(),
                kind: kind.kind.clone(),
                namespace: metadata["namespace"].as_str().map(str::to_owned),
                name: metadata["name"].as_str().unwrap_or_default().to_owned(),
                uid: uid.to_owned(),
                resource_version: resource_version.to_owned(),
                status_only,
            }),
        },
        after: after.map(|p| p.object.clone()),
        before,
        diff,
        actor: after.and_then(|p| p.actor.clone()),
        transaction: None,
    }
}

/// A core kind watched in every namespace, publishing to topic `t` (for tests).
#[cfg(test)]
pub(super) fn core_kind(kind: &str, plural: &str) -> WatchedKind {
    WatchedKind {
        group: String::new(),
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        namespace: None,
        label_selector: None,
        field_selector: None,
        drop_status_only: false,
        redact: vec![],
        topic: "t".into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn secret_kind() -> WatchedKind {
        core_kind("Secret", "secrets")
    }

    #[test]
    fn a_resume_point_holds_only_under_the_selectors_it_was_stored_with() {
        let plain = secret_kind();
        let labelled = WatchedKind {
            label_selector: Some("team=a".into()),
            ..secret_kind()
        };
        let fielded = WatchedKind {
            field_selector: Some("team=a".into()),
            ..secret_kind()
        };
        assert_eq!(
            plain.resume_token("42"),
            "42",
            "as earlier versions stored it"
        );
        assert_eq!(plain.resumable_version("42").as_deref(), Some("42"));
        let token = labelled.resume_token("42");
        assert_eq!(labelled.resumable_version(&token).as_deref(), Some("42"));
        assert_eq!(plain.resumable_version(&token), None);
        assert_eq!(fielded.resumable_version(&token), None);
        assert_eq!(labelled.resumable_version("42"), None);
    }

    #[test]
    fn secrets_are_hashed_everywhere_they_appear_and_managed_fields_name_the_actor() {
        let hasher = SecretHasher::new(b"0123456789abcdef");
        let object = json!({
            "metadata": {"name": "db", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"},
                "managedFields": [
                    {"manager": "kubectl", "time": "2026-01-01T00:00:00Z"},
                    {"manager": "helm", "time": "2026-01-02T00:00:00Z"}]},
            "data": {"password": "aHVudGVyMg=="},
        });
        let prepared = prepare(&secret_kind(), object, Some(&hasher));
        let text = prepared.object.to_string();
        assert!(!text.contains("aHVudGVyMg"), "{text}");
        assert!(prepared.object["data"]["password"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:"));
        assert!(prepared.object["metadata"].get("managedFields").is_none());
        assert_eq!(prepared.actor.unwrap().name, "helm");
        assert_eq!(prepared.changed_ms, Some(1_767_312_000_000));
    }

    #[test]
    fn configured_paths_with_wildcards_are_hashed() {
        let mut kind = secret_kind();
        kind.kind = "Route".into();
        kind.redact = vec!["/spec/upstreams/*/apiKey".into()];
        let object = json!({"metadata": {}, "spec": {"upstreams": [{"apiKey": "k1", "host": "a"}, {"apiKey": "k2"}]}});
        let prepared = prepare(&kind, object, None);
        assert_eq!(prepared.object["spec"]["upstreams"][0]["host"], "a");
        assert!(!prepared.object.to_string().contains("k1"));
        assert!(!prepared.object.to_string().contains("k2"));
    }

    #[test]
    fn resource_version_changes_are_noise_and_status_changes_are_marked() {
        let a = json!({"metadata": {"resourceVersion": "1"}, "spec": {"x": 1}, "status": {"ready": false}});
        let mut b = a.clone();
        b["metadata"]["resourceVersion"] = "2".into();
        assert_eq!(compare(&a, &b), Difference::Noise);
        b["status"]["ready"] = true.into();
        assert_eq!(compare(&a, &b), Difference::StatusOnly);
        b["spec"]["x"] = 2.into();
        assert_eq!(compare(&a, &b), Difference::Content);
    }

    #[test]
    fn listed_objects_get_the_type_fields_watched_ones_carry() {
        let listed = json!({"metadata": {"name": "db", "resourceVersion": "7"}, "data": {}});
        let prepared = prepare(&secret_kind(), listed, None);
        assert_eq!(prepared.object["apiVersion"], "v1");
        assert_eq!(prepared.object["kind"], "Secret");
        let mut route = secret_kind();
        (route.group, route.kind) = ("gw.example.com".into(), "Route".into());
        let typed = json!({"apiVersion": "gw.example.com/v2", "kind": "Route", "metadata": {}});
        let prepared = prepare(&route, typed, None);
        assert_eq!(prepared.object["apiVersion"], "gw.example.com/v2", "kept");
        let untyped = prepare(&route, json!({"metadata": {}}), None);
        assert_eq!(untyped.object["apiVersion"], "gw.example.com/v1");
    }

    #[test]
    fn one_resource_version_is_one_state_and_type_fields_are_not_content() {
        let watched = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"resourceVersion": "5"}, "data": {"a": "1"}});
        let mut rendered_otherwise = watched.clone();
        rendered_otherwise["data"]["a"] = "2".into();
        assert_eq!(compare(&watched, &rendered_otherwise), Difference::Noise);
        let mut stored_untyped = watched.clone();
        stored_untyped.as_object_mut().unwrap().remove("kind");
        stored_untyped["metadata"]["resourceVersion"] = "4".into();
        assert_eq!(compare(&stored_untyped, &watched), Difference::Noise);
    }
}
