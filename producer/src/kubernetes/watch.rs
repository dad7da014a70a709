//! One watch per kind and namespace: list, watch, resume after restarts, and
//! restart from the last checkpoint after failures. The watch feeds the pure
//! [`Reconciler`]; its batches go to [`InFlight`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use changewire_schemas::diagnostics::report;
use futures::stream::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;

use super::error::KubernetesError;
use super::object::WatchedKind;
use super::publish::InFlight;
use super::reconcile::{Observed, Origin, Reconciler};
use super::retry::{watch_backoff, WatcherBackoff};
use super::shared::Shared;
use super::state::ObjectStore;
use crate::clock::now_ms;
use crate::metrics::KindLabel;

/// Why a watch is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Running,
    /// The producer shuts down.
    Shutdown,
    /// The kind's CRD was deleted: every object is gone.
    KindRemoved,
}

/// Deletes every stored object of a kind no CRD serves any more.
pub(super) async fn sweep_kind<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
) -> Result<(), KubernetesError> {
    let loaded = shared.objects.load(&kind.scope())?;
    let mut view = reconciler(shared, kind, loaded);
    delete_everything(shared, kind, &mut view, &mut InFlight::new(shared, kind)).await
}

/// Runs one watch until stopped; transient failures restart it (after a backoff)
/// from the state last checkpointed.
pub(super) async fn watch_scope<O: ObjectStore>(
    shared: Arc<Shared<O>>,
    kind: WatchedKind,
    mut stop: watch::Receiver<Stop>,
) -> Result<(), KubernetesError> {
    let label = shared.metrics.kind(kind.label());
    let scope = kind.scope();
    let mut backoff = watch_backoff().on_retry(shared.health.retry_hook(&scope));
    loop {
        match watch_once(&shared, &kind, &label, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() => {
                let metrics = shared.metrics.shared();
                metrics.watch_restarts.get_or_create(&label).inc();
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

fn reconciler<'a, O>(
    shared: &'a Shared<O>,
    kind: &'a WatchedKind,
    loaded: super::state::Loaded,
) -> Reconciler<'a> {
    let config = &shared.config;
    let origin = Origin {
        source: &config.name,
        cluster: config.cluster(),
    };
    Reconciler::new(kind, origin, shared.secret_hasher.as_ref(), loaded)
}

async fn watch_once<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
    label: &KindLabel,
    stop: &mut watch::Receiver<Stop>,
) -> Result<(), KubernetesError> {
    let scope = kind.scope();
    let loaded = shared.objects.load(&scope)?;
    let mut view = reconciler(shared, kind, loaded);
    let mut events = watch_events(shared, kind, view.resume().map(str::to_owned));
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
                        if view.observe(items, now_ms()).expired.is_some() {
                            break;
                        }
                    }
                    delete_everything(shared, kind, &mut view, &mut in_flight).await?;
                }
                return Ok(());
            }
            Some(confirmed) = in_flight.confirm_next() => confirmed?,
            items = events.next() => {
                let seen = Instant::now();
                let observed = view.observe(items.unwrap_or_default(), now_ms());
                let expired = report_observed(shared, kind, label, observed);
                in_flight.publish(view.take_batch(), seen).await?;
                let metrics = shared.metrics.shared();
                metrics.watched_objects.get_or_create(label).set(view.known() as i64);
                if let Some(error) = expired {
                    in_flight.drain().await?;
                    return Err(KubernetesError::Expired(error));
                }
            }
        }
    }
}

/// The watch's events: from the resume point if there is one, then kube's
/// watcher (list, then watch), in chunks.
fn watch_events<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
    resume: Option<String>,
) -> futures::stream::BoxStream<'static, Vec<Result<Event<DynamicObject>, watcher::Error>>> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&kind.group, &kind.version, &kind.kind),
        &kind.plural,
    );
    let api: Api<DynamicObject> = match &kind.namespace {
        Some(namespace) => Api::namespaced_with(shared.client.clone(), namespace, &resource),
        None => Api::all_with(shared.client.clone(), &resource),
    };
    let mut config = watcher::Config::default()
        .page_size(shared.config.page_size)
        .timeout(shared.config.watch_idle_timeout_secs);
    if let Some(labels) = &kind.label_selector {
        config = config.labels(labels);
    }
    if let Some(fields) = &kind.field_selector {
        config = config.fields(fields);
    }
    let resumed = match resume {
        Some(version) => resumed_watch(api.clone(), kind, shared, version).boxed(),
        None => futures::stream::empty().boxed(),
    };
    let backoff = watch_backoff().on_retry(shared.health.retry_hook(&kind.scope()));
    resumed
        .chain(watcher::watcher(api, config).backoff(WatcherBackoff(backoff)))
        .ready_chunks(512)
        .boxed()
}

/// Counts and reports what a chunk said besides its events; gives back the error
/// that requires starting the watch over, if any.
fn report_observed<O>(
    shared: &Shared<O>,
    kind: &WatchedKind,
    label: &KindLabel,
    observed: Observed,
) -> Option<watcher::Error> {
    let scope = kind.scope();
    let metrics = shared.metrics.shared();
    if observed.relists > 0 {
        metrics
            .relists
            .get_or_create(label)
            .inc_by(observed.relists);
    }
    for error in observed.interruptions.iter().chain(&observed.expired) {
        metrics.watch_restarts.get_or_create(label).inc();
        tracing::warn!(kind = %kind.label(), error = %report(error), "watch interrupted; the watcher resumes");
        shared.health.failed(&scope, report(error));
    }
    if observed.delivered {
        shared.health.recovered(&scope);
    }
    observed.expired
}

/// The kind is gone: publishes a delete for every object still known, then
/// forgets the scope.
async fn delete_everything<O: ObjectStore>(
    shared: &Shared<O>,
    kind: &WatchedKind,
    view: &mut Reconciler<'_>,
    in_flight: &mut InFlight<'_, O>,
) -> Result<(), KubernetesError> {
    view.delete_everything(now_ms());
    in_flight.publish(view.take_batch(), Instant::now()).await?;
    in_flight.drain().await?;
    Ok(shared.objects.clear(&kind.scope())?)
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
    let mut params = WatchParams::default().timeout(shared.config.watch_idle_timeout_secs);
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
