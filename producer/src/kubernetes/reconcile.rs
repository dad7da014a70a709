//! Reconciliation of one watch's objects, pure: watcher output in, events and the
//! state writes they justify out (as kube-runtime's `Writer::apply_watcher_event`
//! keeps a store). No I/O and no clock: the caller publishes the batch, writes the
//! state once Kafka acknowledged it, and hands in the time.

use std::collections::HashSet;

use changewire_schemas::{ChangeEvent, Op, SnapshotMarker};
use kube::api::DynamicObject;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;

use super::object::{compare, event, prepare, Difference, EventContext, WatchedKind};
use super::state::{Loaded, Objects};
use crate::redact::SecretHasher;

/// Events of one round and the state writes they justify once acknowledged.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) events: Vec<ChangeEvent>,
    pub(super) writes: Vec<(String, Option<Value>)>,
    /// Objects new to the state, reserved before their events are published.
    /// (Indexes of their writes.)
    pub(super) creates: Vec<usize>,
    /// The resume point once the batch is in: the last watch event's version.
    pub(super) resume: Option<String>,
}

impl Batch {
    /// The creates to reserve before publishing: `(uid, object)`.
    pub(super) fn reservations(&self) -> Vec<(&str, &Value)> {
        (self.creates.iter())
            .filter_map(|&i| match &self.writes[i] {
                (uid, Some(object)) => Some((uid.as_str(), object)),
                (_, None) => None,
            })
            .collect()
    }
}

/// What a chunk of watcher output said besides its events.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// Lists that started (initial, after 410 Gone, after restarts).
    pub(super) relists: u64,
    /// Errors the watcher recovers from by itself.
    pub(super) interruptions: Vec<watcher::Error>,
    /// The chunk's last outcome was data rather than an error: the watch is healthy.
    pub(super) delivered: bool,
    /// An HTTP 410 the watcher would retry forever: the watch must start over
    /// (an interruption too).
    pub(super) expired: Option<watcher::Error>,
}

/// Names the events of a watch carry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin<'a> {
    /// The source's name.
    pub(super) source: &'a str,
    /// The cluster's name.
    pub(super) cluster: &'a str,
}

/// One watch's view: what was published of each object, and the pending batch.
pub(super) struct Reconciler<'a> {
    kind: &'a WatchedKind,
    origin: Origin<'a>,
    hasher: Option<&'a SecretHasher>,
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

impl<'a> Reconciler<'a> {
    /// Starts from what is stored of the kind's scope.
    pub(super) fn new(
        kind: &'a WatchedKind,
        origin: Origin<'a>,
        hasher: Option<&'a SecretHasher>,
        loaded: Loaded,
    ) -> Self {
        let resume = loaded.resume.and_then(|token| {
            let version = kind.resumable_version(&token);
            if version.is_none() {
                tracing::info!(kind = %kind.label(), "the selectors changed since the last run; listing");
            }
            version
        });
        Self {
            kind,
            origin,
            hasher,
            published: loaded.objects,
            unconfirmed: loaded.unconfirmed,
            resume,
            batch: Batch::default(),
            listing: None,
            first_sync: !loaded.synced,
        }
    }

    /// The version to resume watching from, if the state reflects one exactly.
    pub(super) fn resume(&self) -> Option<&str> {
        self.resume.as_deref()
    }

    /// Objects known to be present.
    pub(super) fn known(&self) -> usize {
        self.published.len()
    }

    /// Turns watcher output into events of the pending batch, at `now_ms`.
    pub(super) fn observe(
        &mut self,
        items: Vec<Result<Event<DynamicObject>, watcher::Error>>,
        now_ms: i64,
    ) -> Observed {
        let mut observed = Observed::default();
        for item in items {
            // A list in progress says nothing yet; its end, or any watch event, does.
            if matches!(
                item,
                Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))
            ) {
                observed.delivered = true;
            } else if item.is_err() {
                observed.delivered = false;
            }
            match item {
                Ok(Event::Init) => {
                    // Until a watch event follows the list, there is no point to
                    // resume from that the state reflects exactly.
                    self.resume = None;
                    observed.relists += 1;
                    self.listing = Some(Vec::new());
                }
                Ok(Event::InitApply(object)) => {
                    self.listing.get_or_insert_with(Vec::new).push(object)
                }
                Ok(Event::InitDone) => {
                    let listed = self.listing.take().unwrap_or_default();
                    self.relisted(listed, now_ms);
                    self.first_sync = false;
                }
                Ok(Event::Apply(object)) => {
                    self.resume.clone_from(&object.metadata.resource_version);
                    self.apply(object, false, now_ms)
                }
                Ok(Event::Delete(object)) => {
                    self.resume.clone_from(&object.metadata.resource_version);
                    let uid = object.metadata.uid.clone().unwrap_or_default();
                    let last_seen = serde_json::to_value(&object).expect("objects serialize");
                    self.delete(&uid, Some(last_seen), now_ms);
                }
                Err(error) if is_http_gone(&error) => observed.expired = Some(error),
                Err(error) => observed.interruptions.push(error),
            }
        }
        observed
    }

    /// The kind is gone: a delete for every object still known.
    pub(super) fn delete_everything(&mut self, now_ms: i64) {
        let mut uids: Vec<String> = (self.published.keys())
            .chain(self.unconfirmed.keys())
            .cloned()
            .collect();
        uids.sort();
        uids.dedup();
        for uid in uids {
            self.delete(&uid, None, now_ms);
        }
    }

    /// The pending batch, with the resume point it brings the state to.
    pub(super) fn take_batch(&mut self) -> Batch {
        let mut batch = std::mem::take(&mut self.batch);
        batch.resume.clone_from(&self.resume);
        batch
    }

    fn context(&self, now_ms: i64) -> EventContext<'a> {
        EventContext {
            source: self.origin.source,
            cluster: self.origin.cluster,
            now_ms,
        }
    }

    /// A create or update seen by the watch (or listed), unless it is noise.
    fn apply(&mut self, object: DynamicObject, snapshot: bool, now_ms: i64) {
        let Some(uid) = object.metadata.uid.clone() else {
            tracing::warn!(name = ?object.metadata.name, "object without uid ignored");
            return;
        };
        let raw = serde_json::to_value(&object).expect("objects serialize");
        let prepared = prepare(self.kind, raw, self.hasher);
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
        let is_new = before.is_none();
        let context = self.context(now_ms);
        let change = event(
            &context,
            self.kind,
            op,
            before,
            Some(&prepared),
            marker,
            status_only,
        );
        self.published.insert(uid.clone(), prepared.object.clone());
        if is_new {
            self.batch.creates.push(self.batch.writes.len());
        }
        self.batch.writes.push((uid, Some(prepared.object)));
        self.batch.events.push(change);
    }

    /// A delete: watched, or synthesized for an object missing from a relist.
    fn delete(&mut self, uid: &str, last_seen: Option<Value>, now_ms: i64) {
        let (known, reserved) = (self.published.remove(uid), self.unconfirmed.remove(uid));
        let before = match (known.or(reserved), last_seen) {
            (Some(published), _) => published,
            (None, Some(object)) => prepare(self.kind, object, self.hasher).object,
            (None, None) => return,
        };
        let context = self.context(now_ms);
        let change = event(
            &context,
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
    fn relisted(&mut self, mut listed: Vec<DynamicObject>, now_ms: i64) {
        let present: HashSet<&str> = (listed.iter())
            .filter_map(|o| o.metadata.uid.as_deref())
            .collect();
        let mut vanished: Vec<(String, String)> = (self.published.iter())
            .chain(self.unconfirmed.iter())
            .filter(|(uid, _)| !present.contains(uid.as_str()))
            .map(|(uid, object)| (self.kind.key(object), uid.clone()))
            .collect();
        vanished.sort();
        vanished.dedup();
        for (_, uid) in vanished {
            self.delete(&uid, None, now_ms);
        }
        listed.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let snapshot = self.first_sync;
        for object in listed {
            self.apply(object, snapshot, now_ms);
        }
        if snapshot {
            let last_read = (self.batch.events.iter_mut().rev()).find(|e| e.op == Op::Read);
            if let Some(last) = last_read {
                last.source.snapshot = SnapshotMarker::Last;
            }
        }
    }
}

/// kube's watcher relists on an in-stream 410 but retries an HTTP 410 forever with
/// the same version.
pub(super) fn is_http_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::object::core_kind;
    use super::*;

    fn config_maps() -> WatchedKind {
        core_kind("ConfigMap", "configmaps")
    }

    const ORIGIN: Origin<'static> = Origin {
        source: "k8s",
        cluster: "c",
    };

    fn object(uid: &str, name: &str, version: &str, value: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": version},
            "data": {"k": value},
        }))
        .expect("a valid object")
    }

    fn synced(objects: &[DynamicObject]) -> Loaded {
        let kind = config_maps();
        Loaded {
            objects: (objects.iter())
                .map(|o| {
                    let raw = serde_json::to_value(o).expect("serializes");
                    let uid = o.metadata.uid.clone().expect("a uid");
                    (uid, prepare(&kind, raw, None).object)
                })
                .collect(),
            synced: true,
            ..Loaded::default()
        }
    }

    fn ops(batch: &Batch) -> Vec<(Op, String)> {
        (batch.events.iter())
            .map(|e| {
                let object = e.after.as_ref().or(e.before.as_ref()).expect("an object");
                (
                    e.op,
                    object["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    fn list(objects: Vec<DynamicObject>) -> Vec<Result<Event<DynamicObject>, watcher::Error>> {
        let applies = objects.into_iter().map(|o| Ok(Event::InitApply(o)));
        std::iter::once(Ok(Event::Init))
            .chain(applies)
            .chain([Ok(Event::InitDone)])
            .collect()
    }

    fn failed(code: u16) -> watcher::Error {
        let status =
            serde_json::from_value(json!({"code": code, "status": "Failure"})).expect("a status");
        watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn a_first_list_is_a_snapshot_whose_last_read_is_marked_last() {
        let kind = config_maps();
        let mut view = Reconciler::new(&kind, ORIGIN, None, Loaded::default());
        let listed = vec![object("u2", "b", "7", "2"), object("u1", "a", "7", "1")];
        let observed = view.observe(list(listed), 1_000);
        assert_eq!((observed.relists, observed.delivered), (1, true));
        let batch = view.take_batch();
        assert_eq!(
            ops(&batch),
            [(Op::Read, "a".into()), (Op::Read, "b".into())]
        );
        let markers: Vec<_> = batch.events.iter().map(|e| e.source.snapshot).collect();
        assert_eq!(markers, [SnapshotMarker::True, SnapshotMarker::Last]);
        assert_eq!(batch.reservations().len(), 2, "new objects are reserved");
        assert_eq!(batch.resume, None, "a list gives no exact resume point");
        assert_eq!(view.known(), 2);
    }

    #[test]
    fn watch_events_create_update_and_delete_and_move_the_resume_point() {
        let kind = config_maps();
        let mut view = Reconciler::new(&kind, ORIGIN, None, synced(&[]));
        let items = vec![
            Ok(Event::Apply(object("u1", "a", "5", "1"))),
            Ok(Event::Apply(object("u1", "a", "6", "2"))),
            // Only the resourceVersion moved: noise, no event.
            Ok(Event::Apply(object("u1", "a", "7", "2"))),
            Ok(Event::Delete(object("u1", "a", "8", "2"))),
        ];
        view.observe(items, 1_000);
        let batch = view.take_batch();
        let expected = [Op::Create, Op::Update, Op::Delete].map(|op| (op, "a".to_owned()));
        assert_eq!(ops(&batch), expected);
        assert_eq!(
            batch.events[1].before.as_ref().expect("a before")["data"]["k"],
            "1"
        );
        assert_eq!(batch.writes.last(), Some(&("u1".to_owned(), None)));
        assert_eq!(batch.resume.as_deref(), Some("8"));
        assert_eq!(view.known(), 0);
    }

    #[test]
    fn a_relist_deletes_what_vanished_before_creating_its_successor() {
        let kind = config_maps();
        let old = object("old", "a", "3", "1");
        let mut view = Reconciler::new(&kind, ORIGIN, None, synced(&[old]));
        view.observe(list(vec![object("new", "a", "9", "1")]), 1_000);
        let batch = view.take_batch();
        assert_eq!(
            ops(&batch),
            [(Op::Delete, "a".into()), (Op::Create, "a".into())]
        );
        let ids: HashSet<String> = batch.events.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids.len(), 2, "two contents, two ids");
    }

    #[test]
    fn an_unconfirmed_create_gone_at_the_relist_gets_a_delete() {
        let kind = config_maps();
        let mut loaded = synced(&[]);
        loaded.unconfirmed = synced(&[object("u1", "a", "3", "1")]).objects;
        let mut view = Reconciler::new(&kind, ORIGIN, None, loaded);
        view.observe(list(vec![]), 1_000);
        assert_eq!(ops(&view.take_batch()), [(Op::Delete, "a".into())]);
        view.observe(list(vec![]), 2_000);
        assert!(view.take_batch().events.is_empty(), "deleted once");
    }

    #[test]
    fn an_http_410_asks_for_a_restart_and_other_errors_do_not() {
        let kind = config_maps();
        let mut view = Reconciler::new(&kind, ORIGIN, None, synced(&[]));
        let observed = view.observe(vec![Err(failed(500))], 1_000);
        assert_eq!(observed.interruptions.len(), 1);
        assert!(observed.expired.is_none() && !observed.delivered);
        let items = vec![
            Ok(Event::Apply(object("u1", "a", "5", "1"))),
            Err(failed(410)),
        ];
        let observed = view.observe(items, 1_000);
        assert!(observed.expired.is_some());
        assert!(!observed.delivered, "the chunk ended in an error");
        assert_eq!(ops(&view.take_batch()), [(Op::Create, "a".into())]);
    }

    #[test]
    fn a_resume_point_stored_under_other_selectors_is_not_used() {
        let kind = config_maps();
        let labelled = WatchedKind {
            label_selector: Some("team=a".into()),
            ..config_maps()
        };
        let loaded = || Loaded {
            resume: Some(kind.resume_token("42")),
            ..synced(&[])
        };
        assert_eq!(
            Reconciler::new(&kind, ORIGIN, None, loaded()).resume(),
            Some("42")
        );
        assert_eq!(
            Reconciler::new(&labelled, ORIGIN, None, loaded()).resume(),
            None
        );
    }
}
