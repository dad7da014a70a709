//! The fake API server's storage: typed resources, objects, one global resourceVersion
//! counter, and a bounded change log that serves watches and consistent list pages.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// The `reason` field (`NotFound`, `AlreadyExists`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} not found"))
    }

    /// The resourceVersion asked for is older than the change log keeps.
    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object the API server sends for this error.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code,
        })
    }
}

/// A servable resource type (a built-in kind or one registered by a CRD).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// Served version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural resource name (the URL segment).
    pub plural: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether `status` is a subresource (main updates keep the stored status).
    pub status_subresource: bool,
    /// Served from a CustomResourceDefinition (unstructured objects).
    pub custom: bool,
}

impl ResourceType {
    fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status_subresource: false,
            custom: false,
        }
    }

    fn with_status(self) -> Self {
        Self {
            status_subresource: true,
            ..self
        }
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn id(&self) -> ResourceId {
        (self.group.clone(), self.plural.clone())
    }
}

/// Changes as they are written.
pub type LiveChanges = broadcast::Receiver<Arc<Change>>;

/// `(group, plural)`: the identity of a resource across versions.
pub type ResourceId = (String, String);
/// `(namespace or "", name)`.
type ObjectKey = (String, String);

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// `ADDED`.
    Added,
    /// `MODIFIED`.
    Modified,
    /// `DELETED`.
    Deleted,
}

impl ChangeType {
    /// The watch event's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One write, as kept in the change log.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion the write created.
    pub rv: u64,
    /// The resource written.
    pub resource: ResourceId,
    /// Namespace ("" when cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub kind: ChangeType,
    /// The object after the write (for deletes: the last state, at the delete's version).
    pub object: Value,
    /// The object before the write.
    pub previous: Option<Value>,
}

/// Everything the fake server stores. Methods take `&mut self`; the server wraps it in
/// a mutex so every write gets the next resourceVersion atomically.
pub struct Store {
    rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<ResourceId, BTreeMap<ObjectKey, Value>>,
    log: VecDeque<Arc<Change>>,
    /// Changes at or below this version are compacted away.
    compacted: u64,
    max_log: usize,
    live: broadcast::Sender<Arc<Change>>,
}

impl Store {
    /// A store with the built-in kinds and a change log of `max_log` entries.
    pub fn new(max_log: usize) -> Self {
        let (live, _) = broadcast::channel(65_536);
        Self {
            rv: 1,
            types: builtin_types(),
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            compacted: 1,
            max_log,
            live,
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Every servable type.
    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    /// The type served at `group`/`version` under `plural`.
    pub fn resource_type(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Result<ResourceType, ApiError> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(&format!(
                    "the server could not find the requested resource ({group}/{version} {plural})"
                ))
            })
    }

    /// Forgets every change up to now: watches from older versions get 410 Gone.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    /// Creates `object`; `manager` is recorded in managedFields.
    pub fn create(
        &mut self,
        kind: &ResourceType,
        namespace: &str,
        mut object: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let name = object_name(&mut object)?;
        let key = (namespace.to_owned(), name.clone());
        if self
            .objects
            .get(&kind.id())
            .is_some_and(|o| o.contains_key(&key))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.plural),
            ));
        }
        let rv = self.rv + 1;
        let now = now();
        fill_type(&mut object, kind);
        let metadata = metadata_mut(&mut object)?;
        if kind.namespaced {
            metadata.insert("namespace".into(), namespace.into());
        }
        metadata.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        metadata.insert("resourceVersion".into(), rv.to_string().into());
        metadata.insert("creationTimestamp".into(), now.clone().into());
        metadata.insert("generation".into(), 1.into());
        metadata.remove("deletionTimestamp");
        record_manager(metadata, manager, &kind.api_version(), &now);
        fold_string_data(kind, &mut object);
        self.commit(kind, key, ChangeType::Added, object.clone(), None);
        if kind.group == "apiextensions.k8s.io" && kind.plural == "customresourcedefinitions" {
            return self.establish(kind, &name);
        }
        Ok(object)
    }

    /// Replaces an object (`status_only`: the status subresource). An update that changes
    /// nothing writes nothing, as the real server does.
    pub fn update(
        &mut self,
        kind: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        manager: &str,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let key = (namespace.to_owned(), name.to_owned());
        let current = self.get(kind, namespace, name)?;
        if let Some(sent) = object["metadata"]["resourceVersion"].as_str() {
            if sent
                != current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
            {
                return Err(ApiError::new(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", kind.plural)));
            }
        }
        fill_type(&mut object, kind);
        fold_string_data(kind, &mut object);
        let mut next = current.clone();
        if status_only {
            next["status"] = object["status"].take();
        } else {
            let status = current.get("status").cloned();
            let mut metadata = object["metadata"].take();
            for field in [
                "uid",
                "creationTimestamp",
                "generation",
                "namespace",
                "name",
                "managedFields",
                "resourceVersion",
            ] {
                metadata[field] = current["metadata"][field].clone();
            }
            next = object;
            next["metadata"] = metadata;
            if kind.status_subresource {
                match status {
                    Some(status) => next["status"] = status,
                    None => drop(next.as_object_mut().map(|o| o.remove("status"))),
                }
            }
            if spec_of(&next) != spec_of(&current) {
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                next["metadata"]["generation"] = generation.into();
            }
        }
        if next == current {
            return Ok(current);
        }
        let rv = self.rv + 1;
        let now = now();
        let metadata = metadata_mut(&mut next)?;
        metadata.insert("resourceVersion".into(), rv.to_string().into());
        record_manager(metadata, manager, &kind.api_version(), &now);
        self.commit(kind, key, ChangeType::Modified, next.clone(), Some(current));
        Ok(next)
    }

    /// Applies an RFC 7386 merge patch, then updates.
    pub fn merge_patch(
        &mut self,
        kind: &ResourceType,
        namespace: &str,
        name: &str,
        patch: &Value,
        manager: &str,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let mut object = self.get(kind, namespace, name)?;
        merge(&mut object, patch);
        if patch["metadata"]["resourceVersion"].is_null() {
            object["metadata"]
                .as_object_mut()
                .map(|m| m.remove("resourceVersion"));
        }
        self.update(kind, namespace, name, object, manager, status_only)
    }

    /// Deletes an object (no finalizers: at once). Deleting a CRD deletes its objects
    /// and stops serving its kind.
    pub fn delete(
        &mut self,
        kind: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut object = self.get(kind, namespace, name)?;
        if kind.plural == "customresourcedefinitions" {
            self.unregister(&object);
        }
        let rv = self.rv + 1;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let key = (namespace.to_owned(), name.to_owned());
        self.commit(kind, key, ChangeType::Deleted, object.clone(), None);
        Ok(object)
    }

    /// One object.
    pub fn get(&self, kind: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&kind.id())
            .and_then(|objects| objects.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&format!("{} \"{name}\"", kind.plural)))
    }

    /// The objects of `kind` (in `namespace`, or all when `None`) as they were at
    /// version `at`, sorted by namespace and name. Fails with 410 if `at` was compacted.
    pub fn snapshot(
        &self,
        kind: &ResourceType,
        namespace: Option<&str>,
        at: u64,
    ) -> Result<Vec<(ObjectKey, Value)>, ApiError> {
        if at < self.compacted && at != self.rv {
            return Err(ApiError::expired(format!(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list. (resourceVersion {at}, oldest {})", self.compacted)));
        }
        let mut objects = self.objects.get(&kind.id()).cloned().unwrap_or_default();
        for change in self.log.iter().rev().take_while(|c| c.rv > at) {
            if change.resource != kind.id() {
                continue;
            }
            let key = (
                change.namespace.clone(),
                change.object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            match (&change.kind, &change.previous) {
                (ChangeType::Added, _) => drop(objects.remove(&key)),
                (_, Some(previous)) => drop(objects.insert(key, previous.clone())),
                (_, None) => {}
            }
        }
        Ok(objects
            .into_iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
            .collect())
    }

    /// Changes after version `from` (all of them, across resources), and a receiver for
    /// the live ones that follow without gap. 410 if `from` was compacted.
    pub fn watch_from(&self, from: u64) -> Result<(Vec<Arc<Change>>, LiveChanges), ApiError> {
        if from < self.compacted {
            return Err(ApiError::expired(format!(
                "too old resource version: {from} ({})",
                self.compacted
            )));
        }
        let backlog = self.log.iter().filter(|c| c.rv > from).cloned().collect();
        Ok((backlog, self.live.subscribe()))
    }

    fn commit(
        &mut self,
        kind: &ResourceType,
        key: ObjectKey,
        change: ChangeType,
        object: Value,
        previous: Option<Value>,
    ) {
        self.rv += 1;
        let objects = self.objects.entry(kind.id()).or_default();
        let previous = match change {
            ChangeType::Deleted => objects.remove(&key),
            _ => objects.insert(key.clone(), object.clone()).or(previous),
        };
        let change = Arc::new(Change {
            rv: self.rv,
            resource: kind.id(),
            namespace: key.0,
            kind: change,
            object,
            previous,
        });
        self.log.push_back(change.clone());
        while self.log.len() > self.max_log {
            if let Some(dropped) = self.log.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        // No receivers is fine: nobody watches.
        let _ = self.live.send(change);
    }

    /// Registers the CRD's kind and marks it Established (a second write, as the
    /// real server's controller does).
    fn establish(&mut self, crd_type: &ResourceType, name: &str) -> Result<Value, ApiError> {
        let crd = self.get(crd_type, "", name)?;
        let spec = &crd["spec"];
        let group = spec["group"].as_str().unwrap_or_default();
        let names = &spec["names"];
        let version = spec["versions"]
            .as_array()
            .and_then(|versions| {
                versions
                    .iter()
                    .find(|v| v["served"].as_bool().unwrap_or(true))
            })
            .ok_or_else(|| {
                ApiError::new(
                    422,
                    "Invalid",
                    "spec.versions: at least one served version is required",
                )
            })?;
        let mut resource = ResourceType::new(
            group,
            version["name"].as_str().unwrap_or_default(),
            names["kind"].as_str().unwrap_or_default(),
            names["plural"].as_str().unwrap_or_default(),
            spec["scope"].as_str() != Some("Cluster"),
        );
        resource.status_subresource = version["subresources"]["status"].is_object();
        resource.custom = true;
        self.types.retain(|t| t.id() != resource.id());
        self.types.push(resource);
        let mut established = crd.clone();
        let now = now();
        established["status"] = json!({
            "acceptedNames": names,
            "storedVersions": [version["name"]],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now},
            ],
        });
        self.update(
            crd_type,
            "",
            name,
            established,
            "apiextensions-apiserver",
            true,
        )
    }

    fn unregister(&mut self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(kind) = self
            .types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
        else {
            return;
        };
        let keys: Vec<ObjectKey> = self
            .objects
            .get(&kind.id())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for (namespace, name) in keys {
            // The object exists: it was just listed.
            let _ = self.delete(&kind, &namespace, &name);
        }
        self.types.retain(|t| t.id() != kind.id());
    }
}

fn builtin_types() -> Vec<ResourceType> {
    vec![
        ResourceType::new("", "v1", "Namespace", "namespaces", false).with_status(),
        ResourceType::new("", "v1", "ConfigMap", "configmaps", true),
        ResourceType::new("", "v1", "Secret", "secrets", true),
        ResourceType::new("apps", "v1", "Deployment", "deployments", true).with_status(),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .with_status(),
    ]
}

/// RFC 3339 in seconds, as `metav1.Time` serializes.
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// RFC 3339 in microseconds, as `metav1.MicroTime` serializes.
pub(super) fn now_micros() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata is required"))
}

/// The object's name, generated from `generateName` when absent.
fn object_name(object: &mut Value) -> Result<String, ApiError> {
    let metadata = metadata_mut(object)?;
    if let Some(name) = metadata.get("name").and_then(Value::as_str) {
        return Ok(name.to_owned());
    }
    let prefix = metadata
        .get("generateName")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value: name or generateName is required",
            )
        })?;
    let name = format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..5]
    );
    metadata.insert("name".into(), name.clone().into());
    Ok(name)
}

fn fill_type(object: &mut Value, kind: &ResourceType) {
    object["apiVersion"] = kind.api_version().into();
    object["kind"] = kind.kind.clone().into();
}

/// Everything but metadata and status: what bumps `metadata.generation`.
fn spec_of(object: &Value) -> Value {
    let mut rest = object.clone();
    if let Some(map) = rest.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    rest
}

/// Keeps one managedFields entry per manager, stamped with the write's time.
fn record_manager(metadata: &mut Map<String, Value>, manager: &str, api_version: &str, time: &str) {
    let entries = metadata.entry("managedFields").or_insert_with(|| json!([]));
    if !entries.is_array() {
        *entries = json!([]);
    }
    let entries = entries.as_array_mut().expect("made an array above");
    entries.retain(|e| e["manager"].as_str() != Some(manager));
    entries.push(json!({
        "manager": manager, "operation": "Update", "apiVersion": api_version,
        "time": time, "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}},
    }));
}

/// Secrets: `stringData` is write-only; the server folds it into base64 `data`.
fn fold_string_data(kind: &ResourceType, object: &mut Value) {
    if !kind.group.is_empty() || kind.kind != "Secret" {
        return;
    }
    let Some(string_data) = object.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let mut data = object["data"].as_object().cloned().unwrap_or_default();
    for (key, value) in string_data.as_object().into_iter().flatten() {
        let text = value.as_str().unwrap_or_default();
        data.insert(
            key.clone(),
            base64::engine::general_purpose::STANDARD
                .encode(text)
                .into(),
        );
    }
    object["data"] = Value::Object(data);
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}
