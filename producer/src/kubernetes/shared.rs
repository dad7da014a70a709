//! What every watch of a Kubernetes source shares: the source's parts, the API
//! client, attribution and health; and what they resolve through the client.

use std::sync::Arc;

use changewire_kafka::Publisher;
use changewire_schemas::diagnostics::report;
use changewire_schemas::{Codec, TopicNames};
use kube::api::GroupVersionKind;
use tokio::sync::watch;

use super::audit::Attributions;
use super::config::{KindConfig, KubernetesConfig};
use super::error::KubernetesError;
use super::health::WatchHealth;
use super::object::WatchedKind;
use super::retry::watch_backoff;
use super::state::ObjectStore;
use crate::metrics::{SourceMetrics, SourceState};
use crate::redact::SecretHasher;

/// What every watch shares.
pub(super) struct Shared<O> {
    pub(super) config: KubernetesConfig,
    pub(super) names: TopicNames,
    pub(super) codec: Arc<Codec>,
    pub(super) publisher: Publisher,
    pub(super) objects: Arc<O>,
    pub(super) metrics: SourceMetrics,
    pub(super) secret_hasher: Option<SecretHasher>,
    pub(super) client: kube::Client,
    /// Audit events by change, when the audit webhook is on.
    pub(super) attributions: Option<Arc<Attributions>>,
    /// Which watches are failing, reported to `/health`.
    pub(super) health: Arc<WatchHealth>,
}

impl<O: ObjectStore> Shared<O> {
    /// Reconnecting, naming each failing watch, while any watch fails; else streaming.
    pub(super) fn report_health(&self) {
        let failing = self.health.failing(tokio::time::Instant::now());
        let metrics = &self.metrics;
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
    pub(super) async fn resolve(
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
        let topic = self
            .names
            .kubernetes_kind(&self.config.name, &config.group, &config.kind)?;
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
    pub(super) fn unserved_crd_kind(
        &self,
        scope: &str,
    ) -> Result<Option<WatchedKind>, KubernetesError> {
        let [group, kind, "*"] = scope.splitn(3, '/').collect::<Vec<_>>()[..] else {
            return Ok(None);
        };
        if group.is_empty() || !self.config.follows_crd_group(group) {
            return Ok(None);
        }
        let loaded = self.objects.load(scope)?;
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
            topic: self.names.kubernetes_kind(&self.config.name, group, kind)?,
        }))
    }
}
