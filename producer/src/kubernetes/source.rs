//! The Kubernetes change source: one watch per kind and namespace, a follower that
//! starts and stops watches as CRDs come and go, and the publish-then-checkpoint loop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use changewire_kafka::{Lane, PublishError, Publisher, Record, TopicSpec};
use changewire_schemas::diagnostics::report;
use changewire_schemas::topic::TopicNameError;
use changewire_schemas::{ChangeEvent, Codec, CodecError, Op, SnapshotMarker, TopicNames};
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::audit::{self, Attributions, AuditServerError};
use super::config::{KindConfig, KubernetesConfig};
use super::health::WatchHealth;
use super::object::{compare, event, prepare, Difference, EventContext, WatchedKind};
use super::retry::{watch_backoff, WatcherBackoff};
use super::state::{Loaded, ObjectStore, Objects, SledObjects, StateError};
use crate::clock::now_ms;
use crate::metrics::{KindLabel, ProducerMetrics, SourceMetrics, SourceState};
use crate::redact::SecretHasher;
use crate::source::{ChangeSource, SourceContext, SourceError};

/// A Kubernetes source failure.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("cannot configure the Kubernetes client")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The API server does not serve a configured kind.
    #[error("the API server does not serve {0}")]
    UnknownKind(String, #[source] kube::Error),
    /// An API call failed (server down, network).
    #[error("Kubernetes API request failed")]
    Api(#[source] kube::Error),
    /// The watch must start over with a fresh list (410 Gone answered as HTTP status).
    #[error("the watch resumed from an expired resourceVersion")]
    Expired(#[source] watcher::Error),
    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// An event could not be encoded.
    #[error("cannot encode an event")]
    Codec(#[from] CodecError),
    /// The object state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A kind's name makes no valid topic.
    #[error(transparent)]
    Topic(#[from] TopicNameError),
    /// The audit webhook endpoint cannot start.
    #[error(transparent)]
    Audit(#[from] AuditServerError),
}

impl KubernetesError {
    /// Whether retrying may succeed (the server or broker comes back).
    pub fn is_transient(&self) -> bool {
        match self {
            KubernetesError::Api(_) | KubernetesError::Expired(_) => true,
            KubernetesError::Codec(error) => error.is_transient(),
            KubernetesError::Publish(error) => error.is_transient(),
            _ => false,
        }
    }
}

/// Records a watch may have in flight before it stops reading (bounds memory while
/// the broker is slow or down).
const MAX_IN_FLIGHT: usize = 50_000;

/// How often watch failures are summarized into the source's health.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The CRD follower's scope in health reports.
const CRD_SCOPE: &str = "customresourcedefinitions";

/// Why a watch is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// The producer shuts down.
    Shutdown,
    /// The kind's CRD was deleted: every object is gone.
    KindRemoved,
}

/// What the CRD follower asks of the supervisor.
enum Control {
    Start(WatchedKind),
    Remove(String),
    /// The first CRD list is in: stored kinds of followed groups that no CRD serves
    /// any more were deleted while the producer was down.
    Sweep,
}

/// What every watch shares: the source's parts and the client.
struct Shared<O> {
    source: KubernetesSource<O>,
    secret_hasher: Option<SecretHasher>,
    client: kube::Client,
    /// Audit events by change, when the audit webhook is on.
    attributions: Option<Arc<Attributions>>,
    /// Which watches are failing, reported to `/health`.
    health: Arc<WatchHealth>,
}

/// Streams changes of the configured kinds to the sink.
pub struct KubernetesSource<O> {
    config: KubernetesConfig,
    names: TopicNames,
    codec: Arc<Codec>,
    publisher: Publisher,
    objects: Arc<O>,
    metrics: SourceMetrics,
}

impl<O: ObjectStore> KubernetesSource<O> {
    /// A source publishing through `publisher`, keeping object state in `objects`.
    pub fn new(
        config: KubernetesConfig,
        names: TopicNames,
        codec: Arc<Codec>,
        publisher: Publisher,
        objects: Arc<O>,
    ) -> Self {
        let metrics = Arc::<ProducerMetrics>::default().source(&config.name);
        Self {
            config,
            names,
            codec,
            publisher,
            objects,
            metrics,
        }
    }

    /// Shares `metrics` (e.g. with another source in the same process).
    pub fn with_metrics(mut self, metrics: Arc<ProducerMetrics>) -> Self {
        self.metrics = metrics.source(&self.config.name);
        self
    }

    /// The source's metrics.
    pub fn metrics(&self) -> Arc<ProducerMetrics> {
        self.metrics.shared().clone()
    }

    /// Runs until `shutdown` turns true or a permanent error.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), KubernetesError> {
        let metrics = self.metrics.clone();
        let result = self.supervise(&mut shutdown).await;
        metrics.set_state(SourceState::Stopped);
        if let Err(error) = &result {
            metrics.set_error(Some(report(error)));
        }
        result
    }

    /// Starts a watch per kind (and the CRD follower), then restarts, adds and
    /// removes watches as they end and as CRDs come and go. The source moves into
    /// what every watch shares.
    async fn supervise(self, shutdown: &mut watch::Receiver<bool>) -> Result<(), KubernetesError> {
        let attributions = match &self.config.audit {
            Some(audit) => {
                let attributions = Arc::new(Attributions::new(audit, &self.metrics));
                audit::serve(audit, attributions.clone()).await?;
                Some(attributions)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            attributions,
            client: self.client().await?,
            secret_hasher: self
                .config
                .redaction_key
                .as_deref()
                .map(|key| SecretHasher::new(key.as_bytes())),
            health: Arc::default(),
            source: self,
        });
        let source = &shared.source;
        let mut kinds = Vec::new();
        for kind in &source.config.kinds {
            kinds.extend(shared.resolve(kind, shutdown).await?);
        }
        let mut supervisor = Supervisor {
            watches: HashMap::new(),
            tasks: JoinSet::new(),
        };
        for kind in kinds {
            supervisor.start(&shared, kind).await?;
        }
        let (control, mut requests) = mpsc::channel(64);
        if !source.config.crd_groups().is_empty() {
            let (follower, stopped) = (shared.clone(), shutdown.clone());
            supervisor.tasks.spawn(async move {
                (
                    "crds".to_owned(),
                    follow_crds(follower, control, stopped).await,
                )
            });
        }
        source.metrics.set_state(SourceState::Streaming);
        let mut health_check = tokio::time::interval(HEALTH_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return supervisor.stop_all().await,
                _ = health_check.tick() => shared.report_health(),
                Some(request) = requests.recv() => match request {
                    Control::Start(kind) => supervisor.start(&shared, kind).await?,
                    Control::Remove(scope) => {
                        supervisor.remove(&scope);
                        shared.health.recovered(&scope);
                    }
                    Control::Sweep => supervisor.sweep(&shared)?,
                },
                Some(done) = supervisor.tasks.join_next() => {
                    let (scope, result) = done.expect("watch tasks do not panic");
                    supervisor.watches.remove(&scope);
                    result?;
                }
            }
        }
    }

    async fn client(&self) -> Result<kube::Client, KubernetesError> {
        client(&self.config).await
    }
}

/// A client for the API server `config` names (else the kubeconfig or in-cluster
/// configuration).
async fn client(config: &KubernetesConfig) -> Result<kube::Client, KubernetesError> {
    let settings = match &config.api_url {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| KubernetesError::Config(Box::new(e)))?,
        ),
        None => kube::Config::infer()
            .await
            .map_err(|e| KubernetesError::Config(Box::new(e)))?,
    };
    kube::Client::try_from(settings).map_err(|e| KubernetesError::Config(Box::new(e)))
}

/// What `--check` found: the API server answers with these settings.
pub async fn check(config: &KubernetesConfig) -> Result<String, KubernetesError> {
    let version = client(config)
        .await?
        .apiserver_version()
        .await
        .map_err(KubernetesError::Api)?;
    Ok(format!("Kubernetes API server {}", version.git_version))
}

impl ChangeSource for KubernetesConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "Kubernetes"
    }

    fn check(&self) -> BoxFuture<'_, Result<String, SourceError>> {
        Box::pin(async move { check(self).await.map_err(SourceError::from) })
    }

    fn run(self: Box<Self>, context: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let objects = SledObjects::open(context.state.db(), &self.name)?;
            let source = KubernetesSource::new(
                *self,
                context.topics,
                context.codec,
                context.publisher,
                Arc::new(objects),
            )
            .with_metrics(context.metrics);
            Ok(source.run(context.shutdown).await?)
        })
    }
}

/// The running watches, by scope.
struct Supervisor {
    watches: HashMap<String, watch::Sender<Stop>>,
    tasks: JoinSet<(String, Result<(), KubernetesError>)>,
}

impl Supervisor {
    async fn start<O: ObjectStore>(
        &mut self,
        shared: &Arc<Shared<O>>,
        kind: WatchedKind,
    ) -> Result<(), KubernetesError> {
        let scope = kind.scope();
        if self.watches.contains_key(&scope) {
            return Ok(());
        }
        shared
            .source
            .publisher
            .ensure_topics(&[TopicSpec::new(
                kind.topic.clone(),
                shared.source.config.topic_partitions,
            )])
            .await?;
        shared.source.codec.prepare_topic(&kind.topic).await?;
        tracing::info!(kind = %kind.label(), namespace = kind.namespace.as_deref().unwrap_or("*"), topic = %kind.topic, "watching");
        let (stop, stopped) = watch::channel(Stop::Running);
        self.watches.insert(scope.clone(), stop);
        let shared = shared.clone();
        self.tasks
            .spawn(async move { (scope, watch_scope(shared, kind, stopped).await) });
        Ok(())
    }

    /// Publishes the deletes of stored CRD kinds no watch serves, then forgets them.
    fn sweep<O: ObjectStore>(&mut self, shared: &Arc<Shared<O>>) -> Result<(), KubernetesError> {
        for scope in shared.source.objects.scopes()? {
            if self.watches.contains_key(&scope) {
                continue;
            }
            let Some(kind) = shared.unserved_crd_kind(&scope)? else {
                continue;
            };
            tracing::info!(
                scope,
                "kind deleted while the producer was down: its objects are deleted"
            );
            let shared = shared.clone();
            self.tasks
                .spawn(async move { (scope, sweep_kind(&shared, &kind).await) });
        }
        Ok(())
    }

    fn remove(&mut self, scope: &str) {
        if let Some(stop) = self.watches.get(scope) {
            tracing::info!(scope, "kind no longer served: its objects are deleted");
            let _ = stop.send(Stop::KindRemoved);
        }
    }

    async fn stop_all(mut self) -> Result<(), KubernetesError> {
        for stop in self.watches.values() {
            let _ = stop.send(Stop::Shutdown);
        }
        // The CRD follower watches `shutdown` itself.
        while let Some(done) = self.tasks.join_next().await {
            done.expect("watch tasks do not panic").1?;
        }
        Ok(())
    }
}

impl<O: ObjectStore> Shared<O> {
    /// Reconnecting, naming each failing watch, while any watch fails; else streaming.
    fn report_health(&self) {
        let failing = self.health.failing(tokio::time::Instant::now());
        let metrics = &self.source.metrics;
        if failing.is_empty() {
            metrics.set_state(SourceState::Streaming);
            metrics.set_error(None);
        } else {
            metrics.set_state(SourceState::Reconnecting);
            metrics.set_error(Some(failing.join("; ")));
        }
    }

    /// The watches one configured kind needs (one per namespace), its plural found by
    /// discovery when not configured. Retries while the API server is unreachable.
    async fn resolve(
        &self,
        config: &KindConfig,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Vec<WatchedKind>, KubernetesError> {
        let gvk = GroupVersionKind::gvk(&config.group, &config.version, &config.kind);
        let mut backoff = watch_backoff();
        let plural = loop {
            if let Some(plural) = &config.plural {
                break plural.clone();
            }
            match kube::discovery::pinned_kind(&self.client, &gvk).await {
                Ok((resource, _)) => break resource.plural,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    let name = format!("{}/{} {}", config.group, config.version, config.kind);
                    return Err(KubernetesError::UnknownKind(name, kube::Error::Api(status)));
                }
                Err(error) => {
                    tracing::warn!(error = %report(&error), kind = %config.kind, "discovery failed; retrying");
                    if backoff.wait(shutdown).await {
                        return Ok(Vec::new());
                    }
                }
            }
        };
        let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().cloned().map(Some).collect()
        };
        let topic = self.source.names.kubernetes_kind(
            &self.source.config.name,
            &config.group,
            &config.kind,
        )?;
        Ok(namespaces
            .into_iter()
            .map(|namespace| WatchedKind {
                group: config.group.clone(),
                version: config.version.clone(),
                kind: config.kind.clone(),
                plural: plural.clone(),
                namespace,
                label_selector: config.label_selector.clone(),
                field_selector: config.field_selector.clone(),
                drop_status_only: config.drop_status_only,
                redact: config.redact.clone(),
                topic: topic.clone(),
            })
            .collect())
    }

    /// The kind of a stored CRD scope (`<group>/<Kind>/*`) of a followed group, its
    /// version taken from a stored object; `None` for other scopes.
    fn unserved_crd_kind(&self, scope: &str) -> Result<Option<WatchedKind>, KubernetesError> {
        let [group, kind, "*"] = scope.splitn(3, '/').collect::<Vec<_>>()[..] else {
            return Ok(None);
        };
        if group.is_empty() || !self.source.config.follows_crd_group(group) {
            return Ok(None);
        }
        let loaded = self.source.objects.load(scope)?;
        let version = loaded
            .objects
            .values()
            .chain(loaded.unconfirmed.values())
            .find_map(|o| {
                o["apiVersion"]
                    .as_str()?
                    .rsplit_once('/')
                    .map(|(_, v)| v.to_owned())
            })
            .unwrap_or_default();
        Ok(Some(WatchedKind {
            group: group.to_owned(),
            version,
            kind: kind.to_owned(),
            plural: String::new(),
            namespace: None,
            label_selector: None,
            field_selector: None,
            drop_status_only: false,
            redact: Vec::new(),
            topic: self
                .source
                .names
                .kubernetes_kind(&self.source.config.name, group, kind)?,
        }))
    }

    fn context(&self) -> EventContext<'_> {
        EventContext {
            source: &self.source.config.name,
            cluster: self.source.config.cluster(),
            now_ms: now_ms(),
        }
    }

    /// Publishes one event of `kind` to `lane`, keyed by the object.
    async fn publish(
        &self,
        lane: &mut Lane<Confirmed>,
        kind: &WatchedKind,
        change: &ChangeEvent,
    ) -> Result<(), KubernetesError> {
        let object = change.after.as_ref().or(change.before.as_ref());
        let key = kind.key(object.unwrap_or(&Value::Null));
        let value = self.source.codec.encode(change)?;
        let record = Record::keyed(&kind.topic, Some(key.as_bytes()), Some(&value));
        Ok(lane.publish(&record).await?)
    }

    /// Writes the state a batch justifies, now that all of its events are acknowledged.
    fn confirm(&self, kind: &WatchedKind, confirmed: Confirmed) -> Result<(), KubernetesError> {
        for op in confirmed.ops {
            self.source
                .metrics
                .count_kind_event(kind.label(), op.code());
        }
        if !confirmed.writes.is_empty() || confirmed.resume.is_some() {
            let resume = confirmed.resume.map(|version| kind.resume_token(&version));
            self.source
                .objects
                .apply(&kind.scope(), confirmed.writes, resume.as_deref())?;
        }
        Ok(())
    }
}

/// A batch whose events are all acknowledged: the state writes it justifies.
struct Confirmed {
    ops: Vec<Op>,
    writes: Vec<(String, Option<Value>)>,
    resume: Option<String>,
}

/// Events published, each batch followed by a mark that comes back (in order) once
/// everything published before it is acknowledged. Reading the watch goes on
/// meanwhile, so a slow acknowledgement makes the next batch bigger, not later.
struct InFlight<'a, O> {
    shared: &'a Shared<O>,
    kind: &'a WatchedKind,
    lane: Lane<Confirmed>,
}

impl<'a, O: ObjectStore> InFlight<'a, O> {
    fn new(shared: &'a Shared<O>, kind: &'a WatchedKind) -> Self {
        Self {
            shared,
            kind,
            lane: shared
                .source
                .publisher
                .lane(shared.source.metrics.shared().publish_metrics())
                .with_limit(MAX_IN_FLIGHT),
        }
    }

    /// Queues a batch's events (read from the watch at `seen`), then its marker.
    async fn publish(&mut self, mut batch: Batch, seen: Instant) -> Result<(), KubernetesError> {
        if let Some(attributions) = &self.shared.attributions {
            attributions.attribute(&mut batch.events, seen).await;
        }
        if !batch.creates.is_empty() {
            let creates: Vec<(&str, &Value)> = batch
                .creates
                .iter()
                .filter_map(|&i| match &batch.writes[i] {
                    (uid, Some(object)) => Some((uid.as_str(), object)),
                    (_, None) => None,
                })
                .collect();
            let scope = self.kind.scope();
            self.shared.source.objects.reserve(&scope, &creates)?;
        }
        for change in &batch.events {
            self.shared
                .publish(&mut self.lane, self.kind, change)
                .await?;
            while let Some(confirmed) = self.lane.take_confirmed()? {
                self.shared.confirm(self.kind, confirmed)?;
            }
        }
        self.lane.mark(Confirmed {
            ops: batch.events.iter().map(|e| e.op).collect(),
            writes: batch.writes,
            resume: batch.resume,
        });
        Ok(())
    }

    /// Waits until everything published is acknowledged and its state written.
    async fn drain(&mut self) -> Result<(), KubernetesError> {
        while let Some(confirmed) = self.lane.next_confirmed().await {
            self.shared.confirm(self.kind, confirmed?)?;
        }
        Ok(())
    }
}

/// Events of one round and the state writes they justify once acknowledged.
#[derive(Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    writes: Vec<(String, Option<Value>)>,
    /// Objects new to the state, reserved before their events are published.
    /// (Indexes of their writes.)
    creates: Vec<usize>,
    /// The resume point once the batch is in: the last watch event's version.
    resume: Option<String>,
}

/// One watch's view: what was published of each object, and the pending batch.
struct ScopeView<'a, O> {
    shared: &'a Shared<O>,
    kind: &'a WatchedKind,
    label: KindLabel,
    /// The kind's scope, naming it in health reports.
    scope: String,
    published: Objects,
    /// Creates a crash left unconfirmed: if gone at the relist, they get a delete.
    unconfirmed: Objects,
    /// The version of the last watch event taken since the last list, if any.
    resume: Option<String>,
    batch: Batch,
    /// Objects of a list in progress.
    listing: Option<Vec<DynamicObject>>,
    /// No sync of this scope completed yet: listed objects are snapshot reads.
    first_sync: bool,
}

impl<'a, O: ObjectStore> ScopeView<'a, O> {
    fn new(shared: &'a Shared<O>, kind: &'a WatchedKind, loaded: Loaded) -> Self {
        let resume = loaded.resume.and_then(|token| {
            let version = kind.resumable_version(&token);
            if version.is_none() {
                tracing::info!(kind = %kind.label(), "the selectors changed since the last run; listing");
            }
            version
        });
        Self {
            shared,
            kind,
            label: shared.source.metrics.kind(kind.label()),
            scope: kind.scope(),
            published: loaded.objects,
            unconfirmed: loaded.unconfirmed,
            resume,
            batch: Batch::default(),
            listing: None,
            first_sync: !loaded.synced,
        }
    }

    /// Turns watcher output into events of the pending batch. Returns the error that
    /// requires starting the watch over, if any.
    fn take(
        &mut self,
        items: Vec<Result<Event<DynamicObject>, watcher::Error>>,
    ) -> Option<watcher::Error> {
        let mut expired = None;
        // Whether the chunk's last outcome was data (the watch is healthy) rather
        // than an error: one health update per chunk, not per event.
        let mut delivered = false;
        for item in items {
            match item {
                Ok(Event::Init) => {
                    // Until a watch event follows the list, there is no point to
                    // resume from that the state reflects exactly.
                    self.resume = None;
                    self.shared
                        .source
                        .metrics
                        .shared()
                        .relists
                        .get_or_create(&self.label)
                        .inc();
                    self.listing = Some(Vec::new());
                }
                Ok(Event::InitApply(object)) => {
                    self.listing.get_or_insert_with(Vec::new).push(object)
                }
                Ok(Event::InitDone) => {
                    let listed = self.listing.take().unwrap_or_default();
                    self.reconcile(listed, self.first_sync);
                    self.first_sync = false;
                    delivered = true;
                }
                Ok(Event::Apply(object)) => {
                    delivered = true;
                    self.resume.clone_from(&object.metadata.resource_version);
                    self.apply(object, false)
                }
                Ok(Event::Delete(object)) => {
                    delivered = true;
                    self.resume.clone_from(&object.metadata.resource_version);
                    let uid = object.metadata.uid.clone().unwrap_or_default();
                    self.delete(
                        &uid,
                        Some(serde_json::to_value(&object).expect("objects serialize")),
                    );
                }
                Err(error) => {
                    self.shared
                        .source
                        .metrics
                        .shared()
                        .watch_restarts
                        .get_or_create(&self.label)
                        .inc();
                    tracing::warn!(kind = %self.kind.label(), error = %report(&error), "watch interrupted; the watcher resumes");
                    self.shared.health.failed(&self.scope, report(&error));
                    delivered = false;
                    // kube's watcher relists on an in-stream 410 but retries an HTTP 410
                    // forever with the same version: start over instead.
                    if is_http_gone(&error) {
                        expired = Some(error);
                    }
                }
            }
        }
        if delivered {
            self.shared.health.recovered(&self.scope);
        }
        expired
    }

    /// A create or update seen by the watch (or listed), unless it is noise.
    fn apply(&mut self, object: DynamicObject, snapshot: bool) {
        let Some(uid) = object.metadata.uid.clone() else {
            tracing::warn!(name = ?object.metadata.name, "object without uid ignored");
            return;
        };
        let raw = serde_json::to_value(&object).expect("objects serialize");
        let prepared = prepare(self.kind, raw, self.shared.secret_hasher.as_ref());
        // Present again: published below as a create (its old one may be lost).
        self.unconfirmed.remove(&uid);
        let (op, before, status_only) = match self.published.get(&uid) {
            None if snapshot => (Op::Read, None, false),
            None => (Op::Create, None, false),
            Some(previous) => match compare(previous, &prepared.object) {
                Difference::Noise => return,
                Difference::StatusOnly if self.kind.drop_status_only => return,
                difference => (
                    Op::Update,
                    Some(previous.clone()),
                    difference == Difference::StatusOnly,
                ),
            },
        };
        let marker = if snapshot {
            SnapshotMarker::True
        } else {
            SnapshotMarker::False
        };
        let before_is_none = before.is_none();
        let change = event(
            &self.shared.context(),
            self.kind,
            op,
            before,
            Some(&prepared),
            marker,
            status_only,
        );
        self.published.insert(uid.clone(), prepared.object.clone());
        if before_is_none {
            self.batch.creates.push(self.batch.writes.len());
        }
        self.batch.writes.push((uid, Some(prepared.object)));
        self.batch.events.push(change);
    }

    /// A delete: watched, or synthesized for an object missing from a relist.
    fn delete(&mut self, uid: &str, last_seen: Option<Value>) {
        let (known, reserved) = (self.published.remove(uid), self.unconfirmed.remove(uid));
        let before = match (known.or(reserved), last_seen) {
            (Some(published), _) => published,
            (None, Some(object)) => {
                prepare(self.kind, object, self.shared.secret_hasher.as_ref()).object
            }
            (None, None) => return,
        };
        let change = event(
            &self.shared.context(),
            self.kind,
            Op::Delete,
            Some(before),
            None,
            SnapshotMarker::False,
            false,
        );
        self.batch.writes.push((uid.to_owned(), None));
        self.batch.events.push(change);
    }

    /// After a (re)list: deletes for what vanished first (so a delete precedes the
    /// create of a same-named successor), then creates and updates.
    fn reconcile(&mut self, listed: Vec<DynamicObject>, first_sync: bool) {
        let present: HashSet<&str> = listed
            .iter()
            .filter_map(|o| o.metadata.uid.as_deref())
            .collect();
        let mut vanished: Vec<(String, String)> = self
            .published
            .iter()
            .chain(self.unconfirmed.iter())
            .filter(|(uid, _)| !present.contains(uid.as_str()))
            .map(|(uid, object)| (self.kind.key(object), uid.clone()))
            .collect();
        vanished.sort();
        vanished.dedup();
        for (_, uid) in vanished {
            self.delete(&uid, None);
        }
        let mut listed = listed;
        listed.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        for object in listed {
            self.apply(object, first_sync);
        }
        if first_sync {
            if let Some(last) = self
                .batch
                .events
                .iter_mut()
                .rev()
                .find(|e| e.op == Op::Read)
            {
                last.source.snapshot = SnapshotMarker::Last;
            }
        }
    }

    /// The pending batch, with the resume point it brings the state to.
    fn take_batch(&mut self) -> Batch {
        let mut batch = std::mem::take(&mut self.batch);
        batch.resume.clone_from(&self.resume);
        batch
    }

    /// The kind is gone: publishes a delete for every object still known, then
    /// forgets the scope.
    async fn delete_everything(
        &mut self,
        in_flight: &mut InFlight<'_, O>,
    ) -> Result<(), KubernetesError> {
        let mut uids: Vec<String> = self
            .published
            .keys()
            .chain(self.unconfirmed.keys())
            .cloned()
            .collect();
        uids.sort();
        uids.dedup();
        for uid in uids {
            self.delete(&uid, None);
        }
        in_flight.publish(self.take_batch(), Instant::now()).await?;
        in_flight.drain().await?;
        Ok(self.shared.source.objects.clear(&self.kind.scope())?)
    }
}

/// Deletes every stored object of a kind no CRD serves any more.
async fn sweep_kind<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
) -> Result<(), KubernetesError> {
    let loaded = shared.source.objects.load(&kind.scope())?;
    let mut view = ScopeView::new(shared, kind, loaded);
    view.delete_everything(&mut InFlight::new(shared, kind))
        .await
}

/// Runs one watch until stopped; transient failures restart it (after a backoff)
/// from the state last checkpointed.
async fn watch_scope<O: ObjectStore>(
    shared: Arc<Shared<O>>,
    kind: WatchedKind,
    mut stop: watch::Receiver<Stop>,
) -> Result<(), KubernetesError> {
    let label = shared.source.metrics.kind(kind.label());
    let scope = kind.scope();
    let mut backoff = watch_backoff().on_retry(shared.health.retry_hook(&scope));
    loop {
        match watch_once(&shared, &kind, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() => {
                shared
                    .source
                    .metrics
                    .shared()
                    .watch_restarts
                    .get_or_create(&label)
                    .inc();
                shared.health.failed(&scope, report(&error));
                tracing::warn!(kind = %kind.label(), error = %report(&error), "watch failed; restarting from the last checkpoint");
                let mut stopped = shutdown_of(&stop);
                if backoff.wait(&mut stopped).await {
                    return Ok(());
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// A receiver that turns true when `stop` asks for anything.
fn shutdown_of(stop: &watch::Receiver<Stop>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*stop.borrow() != Stop::Running);
    let mut stop = stop.clone();
    tokio::spawn(async move {
        while *stop.borrow_and_update() == Stop::Running {
            if stop.changed().await.is_err() {
                return;
            }
        }
        let _ = tx.send(true);
    });
    rx
}

async fn watch_once<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(), KubernetesError> {
    let scope = kind.scope();
    let loaded = shared.source.objects.load(&scope)?;
    let mut view = ScopeView::new(shared, kind, loaded);
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&kind.group, &kind.version, &kind.kind),
        &kind.plural,
    );
    let api: Api<DynamicObject> = match &kind.namespace {
        Some(namespace) => Api::namespaced_with(shared.client.clone(), namespace, &resource),
        None => Api::all_with(shared.client.clone(), &resource),
    };
    let mut config = watcher::Config::default()
        .page_size(shared.source.config.page_size)
        .timeout(shared.source.config.watch_idle_timeout_secs);
    if let Some(labels) = &kind.label_selector {
        config = config.labels(labels);
    }
    if let Some(fields) = &kind.field_selector {
        config = config.fields(fields);
    }
    let resumed = match view.resume.clone() {
        Some(version) => resumed_watch(api.clone(), kind, shared, version).boxed(),
        None => futures::stream::empty().boxed(),
    };
    let mut events = resumed
        .chain(watcher::watcher(api, config).backoff(WatcherBackoff(
            watch_backoff().on_retry(shared.health.retry_hook(&scope)),
        )))
        .ready_chunks(512)
        .boxed();
    let mut in_flight = InFlight::new(shared, kind);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                in_flight.drain().await?;
                if *stop.borrow() == Stop::KindRemoved {
                    // The CRD's objects were deleted before it: take those deletes
                    // from the watch first, then synthesize the rest.
                    while let Ok(Some(items)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
                        if view.take(items).is_some() {
                            break;
                        }
                    }
                    view.delete_everything(&mut in_flight).await?;
                }
                return Ok(());
            }
            Some(confirmed) = in_flight.lane.next_confirmed() => {
                shared.confirm(kind, confirmed?)?;
            }
            items = events.next() => {
                let seen = Instant::now();
                let expired = view.take(items.unwrap_or_default());
                in_flight.publish(view.take_batch(), seen).await?;
                shared
                    .source
                    .metrics.shared().watched_objects
                    .get_or_create(&view.label)
                    .set(view.published.len() as i64);
                if let Some(error) = expired {
                    in_flight.drain().await?;
                    return Err(KubernetesError::Expired(error));
                }
            }
        }
    }
}

/// After a restart: the watch from the stored resume point, so the changes made
/// meanwhile arrive as events without listing everything. It ends at its first
/// error or at the server's timeout; kube's watcher (list, then watch) takes over.
fn resumed_watch<O: ObjectStore>(
    api: Api<DynamicObject>,
    kind: &WatchedKind,
    shared: &Shared<O>,
    version: String,
) -> impl futures::Stream<Item = Result<Event<DynamicObject>, watcher::Error>> + Send + 'static {
    let mut params = WatchParams::default().timeout(shared.source.config.watch_idle_timeout_secs);
    if let Some(labels) = &kind.label_selector {
        params = params.labels(labels);
    }
    if let Some(fields) = &kind.field_selector {
        params = params.fields(fields);
    }
    let label = kind.label();
    tracing::info!(kind = %label, resource_version = %version, "resuming the watch");
    futures::stream::once(async move { api.watch(&params, &version).await })
        .filter_map(move |started| {
            let label = label.clone();
            async move {
                started
                    .inspect_err(|error| tracing::info!(kind = %label, error = %report(error), "cannot resume the watch; listing"))
                    .ok()
            }
        })
        .flatten()
        .take_while(|event| {
            let go_on = matches!(
                event,
                Ok(WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Deleted(_) | WatchEvent::Bookmark(_))
            );
            match event {
                Ok(WatchEvent::Error(status)) => {
                    tracing::info!(code = status.code, reason = %status.reason, "resumed watch ended; listing")
                }
                Err(error) => {
                    tracing::info!(error = %report(error), "resumed watch ended; listing")
                }
                _ => {}
            }
            std::future::ready(go_on)
        })
        .filter_map(|event| {
            std::future::ready(match event {
                Ok(WatchEvent::Added(object) | WatchEvent::Modified(object)) => {
                    Some(Ok(Event::Apply(object)))
                }
                Ok(WatchEvent::Deleted(object)) => Some(Ok(Event::Delete(object))),
                _ => None,
            })
        })
}

fn is_http_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

/// Watches CRDs and asks the supervisor to watch the kinds of Established ones in the
/// followed groups, and to drop the kinds of deleted ones.
async fn follow_crds<O: ObjectStore>(
    shared: Arc<Shared<O>>,
    control: mpsc::Sender<Control>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KubernetesError> {
    let crd_watch = || {
        let api: Api<CustomResourceDefinition> = Api::all(shared.client.clone());
        let backoff = WatcherBackoff(watch_backoff().on_retry(shared.health.retry_hook(CRD_SCOPE)));
        watcher::watcher(api, watcher::Config::default())
            .backoff(backoff)
            .boxed()
    };
    let mut events = crd_watch();
    let mut served: HashMap<String, String> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut swept = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = shutdown.changed() => return Ok(()),
        };
        if matches!(&event, Some(Ok(_))) {
            shared.health.recovered(CRD_SCOPE);
        }
        let requests = match event {
            Some(Ok(Event::Init)) => {
                listed = Some(HashSet::new());
                Vec::new()
            }
            Some(Ok(Event::InitApply(crd))) => {
                let name = crd.metadata.name.clone().unwrap_or_default();
                listed.get_or_insert_with(HashSet::new).insert(name);
                shared.crd_started(&crd, &mut served)?
            }
            Some(Ok(Event::Apply(crd))) => shared.crd_started(&crd, &mut served)?,
            Some(Ok(Event::Delete(crd))) => served
                .remove(&crd.metadata.name.unwrap_or_default())
                .map(Control::Remove)
                .into_iter()
                .collect(),
            Some(Ok(Event::InitDone)) => {
                let listed = listed.take().unwrap_or_default();
                let gone: Vec<String> = served
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                let mut requests: Vec<Control> = gone
                    .into_iter()
                    .filter_map(|name| served.remove(&name))
                    .map(Control::Remove)
                    .collect();
                if !swept {
                    swept = true;
                    requests.push(Control::Sweep);
                }
                requests
            }
            Some(Err(error)) => {
                shared.health.failed(CRD_SCOPE, report(&error));
                if is_http_gone(&error) {
                    // kube's watcher would retry the expired version forever.
                    tracing::warn!(error = %report(&error), "CRD watch expired; listing again");
                    events = crd_watch();
                } else {
                    tracing::warn!(error = %report(&error), "CRD watch interrupted; the watcher resumes");
                }
                Vec::new()
            }
            None => return Ok(()),
        };
        for request in requests {
            if control.send(request).await.is_err() {
                return Ok(());
            }
        }
    }
}

impl<O: ObjectStore> Shared<O> {
    /// The watch to start for an Established CRD of a followed group, if not started.
    fn crd_started(
        &self,
        crd: &CustomResourceDefinition,
        served: &mut HashMap<String, String>,
    ) -> Result<Vec<Control>, KubernetesError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let spec = &crd.spec;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if served.contains_key(&name)
            || !established
            || !self.source.config.follows_crd_group(&spec.group)
        {
            return Ok(Vec::new());
        }
        let Some(version) = spec
            .versions
            .iter()
            .find(|v| v.storage)
            .or_else(|| spec.versions.iter().find(|v| v.served))
        else {
            return Ok(Vec::new());
        };
        let kind = WatchedKind {
            group: spec.group.clone(),
            version: version.name.clone(),
            kind: spec.names.kind.clone(),
            plural: spec.names.plural.clone(),
            namespace: None,
            label_selector: None,
            field_selector: None,
            drop_status_only: self.source.config.drop_status_only,
            redact: Vec::new(),
            topic: self.source.names.kubernetes_kind(
                &self.source.config.name,
                &spec.group,
                &spec.names.kind,
            )?,
        };
        served.insert(name, kind.scope());
        Ok(vec![Control::Start(kind)])
    }
}
