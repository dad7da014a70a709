//! The Kubernetes change source: its errors, its parts, and the supervisor that
//! runs a watch per kind and namespace ([`super::watch`]) and starts and stops them
//! as CRDs come and go ([`super::crds`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use changewire_kafka::{Publisher, TopicSpec};
use changewire_schemas::diagnostics::report;
use changewire_schemas::{Codec, TopicNames};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::audit::{self, Attributions};
use super::config::KubernetesConfig;
use super::crds::{follow_crds, Control};
use super::error::KubernetesError;
use super::object::WatchedKind;
use super::shared::Shared;
use super::state::{ObjectStore, SledObjects};
use super::watch::{sweep_kind, watch_scope, Stop};
use crate::metrics::{ProducerMetrics, SourceMetrics, SourceState};
use crate::redact::SecretHasher;
use crate::source::{ChangeSource, SourceContext, SourceError};

/// How often watch failures are summarized into the source's health.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

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
            secret_hasher: (self.config.redaction_key.as_deref())
                .map(|key| SecretHasher::new(key.as_bytes())),
            health: Arc::default(),
            config: self.config,
            names: self.names,
            codec: self.codec,
            publisher: self.publisher,
            objects: self.objects,
            metrics: self.metrics,
        });
        let mut kinds = Vec::new();
        for kind in &shared.config.kinds {
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
        if !shared.config.crd_groups().is_empty() {
            let (follower, stopped) = (shared.clone(), shutdown.clone());
            supervisor.tasks.spawn(async move {
                (
                    "crds".to_owned(),
                    follow_crds(follower, control, stopped).await,
                )
            });
        }
        shared.metrics.set_state(SourceState::Streaming);
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
            .publisher
            .ensure_topics(&[TopicSpec::new(
                kind.topic.clone(),
                shared.config.topic_partitions,
            )])
            .await?;
        shared.codec.prepare_topic(&kind.topic).await?;
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
        for scope in shared.objects.scopes()? {
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
