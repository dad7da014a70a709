//! The CRD follower: watches CustomResourceDefinitions and asks the supervisor to
//! watch the kinds of Established ones in the followed groups, and to drop the
//! kinds of deleted ones.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use changewire_schemas::diagnostics::report;
use futures::stream::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::{mpsc, watch};

use super::error::KubernetesError;
use super::object::WatchedKind;
use super::reconcile::is_http_gone;
use super::retry::{watch_backoff, WatcherBackoff};
use super::shared::Shared;
use super::state::ObjectStore;

/// The CRD follower's scope in health reports.
pub(super) const CRD_SCOPE: &str = "customresourcedefinitions";

/// What the CRD follower asks of the supervisor.
pub(super) enum Control {
    /// Watch this kind.
    Start(WatchedKind),
    /// The kind of this scope is gone.
    Remove(String),
    /// The first CRD list is in: stored kinds of followed groups that no CRD serves
    /// any more were deleted while the producer was down.
    Sweep,
}

/// Watches CRDs and asks the supervisor to watch the kinds of Established ones in the
/// followed groups, and to drop the kinds of deleted ones.
pub(super) async fn follow_crds<O: ObjectStore>(
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
        if served.contains_key(&name) || !established || !self.config.follows_crd_group(&spec.group)
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
            drop_status_only: self.config.drop_status_only,
            redact: Vec::new(),
            topic: self
                .names
                .kubernetes_kind(&self.config.name, &spec.group, &spec.names.kind)?,
        };
        served.insert(name, kind.scope());
        Ok(vec![Control::Start(kind)])
    }
}
