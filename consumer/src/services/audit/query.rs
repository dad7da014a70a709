//! Finding logged events: by resource, actor, op, source, time range and changed
//! JSON path, newest or oldest first, a page at a time.
//!
//! A query walks the most selective index its filters allow (resource, then
//! actor, source, op, else time) between its time bounds, across every index run
//! ([`super::runs`]), and checks every other filter on the entry. A page ends when it is full or after [`SCAN_BUDGET`]
//! index keys, so a filter that matches little never makes one request slow:
//! the page then comes back short, with a cursor to go on from.
//!
//! Cursors are opaque: the position to continue from and a digest of the filters,
//! signed with the service's key (HMAC-SHA-256). A cursor that was forged, altered
//! or made for other filters is refused, never followed.

use std::collections::VecDeque;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64;
use base64::Engine as _;
use changewire_schemas::{ChangeEvent, Op};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::bytes::read_u64;
use super::log::{indexed, page_of, records, Entry, IndexKind, Provenance, Resource, SIZE};
use super::run_files::RunFiles;
use super::runs::{Merged, Runs};
use super::AuditError;
use crate::runtime::{Store, StoreError};
use crate::services::changed::{changed_at, diff_touches, PathPattern};

/// Index keys one page reads at most.
pub const SCAN_BUDGET: usize = 20_000;

/// What to look for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Source name.
    pub source: Option<String>,
    /// `group/Kind` or table.
    pub kind: Option<String>,
    /// Namespace or schema (empty: cluster-scoped).
    pub namespace: Option<String>,
    /// Object name or row key.
    pub name: Option<String>,
    /// Actor name.
    pub actor: Option<String>,
    /// Operation.
    pub op: Option<Op>,
    /// Changed no earlier than this (ms since the epoch).
    pub from_ms: Option<i64>,
    /// Changed before this (ms since the epoch).
    pub to_ms: Option<i64>,
    /// A changed JSON path, dotted, `*` for any one segment and a trailing `*` for
    /// anything below (`spec.auth.*`).
    pub changed: Option<String>,
    /// Newest first (else oldest first).
    pub newest_first: bool,
}

/// One logged event as a query returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    /// Its position in the log.
    pub index: u64,
    /// The resource it changed.
    pub resource: Resource,
    /// Where it was read from.
    pub provenance: Provenance,
    /// The event.
    pub event: ChangeEvent,
}

/// A page of results.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The events found, in the order asked for.
    pub events: Vec<Found>,
    /// Where the next page starts, if the index has more.
    pub next_cursor: Option<String>,
}

/// Why a query could not run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The cursor is not one this service made for these filters.
    #[error("the cursor is invalid, altered, or was made for other filters")]
    BadCursor,
    /// The store failed, or holds what does not parse.
    #[error(transparent)]
    Log(#[from] AuditError),
}

impl From<StoreError> for QueryError {
    fn from(error: StoreError) -> Self {
        Self::Log(error.into())
    }
}

/// Runs queries against a store, signing cursors with `cursor_key`.
pub struct Finder<'a> {
    store: &'a Store,
    files: &'a RunFiles,
    cursor_key: &'a [u8],
}

impl<'a> Finder<'a> {
    /// A finder over `store`, reading its index runs through `files` (kept
    /// from query to query, so their files stay open).
    pub fn new(store: &'a Store, files: &'a RunFiles, cursor_key: &'a [u8]) -> Self {
        Self {
            store,
            files,
            cursor_key,
        }
    }

    /// The committed runs; files of runs no longer among them are closed.
    fn runs(&self) -> Result<Runs, AuditError> {
        let runs = Runs::load(&|key: &[u8]| self.store.get(key))?;
        (self.files).close_unless(|id| runs.runs.iter().any(|run| run.id == id));
        Ok(runs)
    }

    /// Up to `limit` events matching `filters`, after `cursor` if given.
    pub fn find(
        &self,
        filters: &Filters,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, QueryError> {
        let prefix = index_prefix(filters);
        let (mut start, mut end) = time_bounds(&prefix, filters);
        if let Some(cursor) = cursor {
            let position = self.open_cursor(cursor, filters)?;
            if filters.newest_first {
                end = [prefix.as_slice(), &position].concat();
            } else {
                start = [prefix.as_slice(), &position, &[0]].concat();
            }
        }
        let mut page = Page {
            events: Vec::new(),
            next_cursor: None,
        };
        let mut last = None;
        let mut pages = RecentPages::default();
        let changed = filters.changed.as_deref().map(PathPattern::parse);
        let get = |key: &[u8]| self.store.get(key);
        let (from, to) = (filters.from_ms, filters.to_ms);
        let runs = self.runs()?.overlapping(
            from.map_or(0, |ms| ms.max(0) as u64),
            to.map_or(u64::MAX, |ms| ms.max(0) as u64),
        );
        let keys = Merged::new(
            &get,
            self.files,
            &runs,
            (&start, &end),
            filters.newest_first,
        );
        for (read, key) in keys.enumerate() {
            let key = key?;
            let position = key[prefix.len()..].to_vec();
            if page.events.len() == limit || read == SCAN_BUDGET {
                page.next_cursor = last.map(|p: Vec<u8>| self.cursor(&p, filters));
                return Ok(page);
            }
            let index = indexed(&position);
            let found = self.load_from(&mut pages, index, changed.as_ref())?;
            if let Some(found) = found.filter(|f| matches(f, filters, changed.as_ref())) {
                page.events.push(found);
            }
            last = Some(position);
        }
        Ok(page)
    }

    /// Where the event `id` was logged, if it was (and was not pruned).
    pub fn locate(&self, id: &str) -> Result<Option<u64>, AuditError> {
        let prefix = IndexKind::Id.prefix(&[&[id]]);
        let end = [prefix.as_slice(), &[0xff; 17]].concat();
        let get = |key: &[u8]| self.store.get(key);
        let runs = self.runs()?;
        let mut keys = Merged::new(&get, self.files, &runs.runs, (&prefix, &end), false);
        Ok(keys.next().transpose()?.map(|key| indexed(&key)))
    }

    /// The entry at `index`, decoded; `None` when missing or not an event.
    pub fn load(&self, index: u64) -> Result<Option<Found>, StoreError> {
        self.load_from(&mut RecentPages::default(), index, None)
    }

    /// The entry at `index`, decoded, unless its diff shows it did not change
    /// `changed` (read without decoding the whole event: most entries a
    /// changed-path query reads are not what it looks for).
    fn load_from(
        &self,
        pages: &mut RecentPages,
        index: u64,
        changed: Option<&PathPattern>,
    ) -> Result<Option<Found>, StoreError> {
        let page = pages.read(self.store, index)?;
        let Some((_, value)) = records(page).find(|(at, _)| *at == index) else {
            return Ok(None);
        };
        let Some(entry) = Entry::decode(value) else {
            return Ok(None);
        };
        if changed.is_some_and(|pattern| unchanged_by_diff(&entry.payload, pattern)) {
            return Ok(None);
        }
        let Ok(event) = serde_json::from_slice::<ChangeEvent>(&entry.payload) else {
            return Ok(None);
        };
        Ok(Some(Found {
            index,
            resource: Resource::of(&event, &entry.provenance),
            provenance: entry.provenance,
            event,
        }))
    }

    /// The log's size.
    pub fn size(&self) -> Result<u64, StoreError> {
        Ok(read_u64(self.store.get(SIZE)?.as_deref()))
    }

    fn cursor(&self, position: &[u8], filters: &Filters) -> String {
        let body = [position, &filter_digest(filters)].concat();
        let tag = self.mac(&body);
        BASE64.encode([body.as_slice(), &tag].concat())
    }

    fn open_cursor(&self, cursor: &str, filters: &Filters) -> Result<Vec<u8>, QueryError> {
        let bytes = BASE64.decode(cursor).map_err(|_| QueryError::BadCursor)?;
        if bytes.len() != 16 + 32 + 32 {
            return Err(QueryError::BadCursor);
        }
        let (body, tag) = bytes.split_at(48);
        let mut mac = Hmac::<Sha256>::new_from_slice(self.cursor_key).expect("any key length");
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| QueryError::BadCursor)?;
        let (position, digest) = body.split_at(16);
        if digest != filter_digest(filters) {
            return Err(QueryError::BadCursor);
        }
        Ok(position.to_vec())
    }

    fn mac(&self, body: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.cursor_key).expect("any key length");
        mac.update(body);
        mac.finalize().into_bytes().to_vec()
    }
}

/// The entry pages read last (each with its first and last index): a query's
/// hits are often neighbours in the log, or in a few stretches of it (events of
/// several partitions interleave in the log, in change-time order).
#[derive(Default)]
struct RecentPages(VecDeque<(u64, u64, Vec<u8>)>);

/// Pages a query keeps decompressed.
const RECENT_PAGES: usize = 8;

impl RecentPages {
    /// The stored page holding the entry at `index` (empty when there is none).
    fn read(&mut self, store: &Store, index: u64) -> Result<&[u8], StoreError> {
        let holds = |(first, last, _): &(u64, u64, Vec<u8>)| (*first..=*last).contains(&index);
        let at = match self.0.iter().position(holds) {
            Some(at) => at,
            None => {
                let Some((first, page)) = page_of(store, index)? else {
                    return Ok(&[]);
                };
                let last = records(&page).last().map_or(first, |(last, _)| last);
                if self.0.len() == RECENT_PAGES {
                    self.0.pop_front();
                }
                self.0.push_back((first, last, page));
                self.0.len() - 1
            }
        };
        Ok(&self.0[at].2)
    }
}

/// Whether an encoded event's diff shows it did not change `pattern` (false
/// when it has no diff, a row's change: that needs the whole event).
fn unchanged_by_diff(payload: &[u8], pattern: &PathPattern) -> bool {
    #[derive(serde::Deserialize)]
    struct Diffed {
        #[serde(default)]
        diff: Option<serde_json::Value>,
    }
    let diff = serde_json::from_slice::<Diffed>(payload)
        .ok()
        .and_then(|d| d.diff);
    diff.and_then(|diff| diff_touches(&diff, pattern)) == Some(false)
}

/// The index a query walks, with its field.
fn index_prefix(filters: &Filters) -> Vec<u8> {
    if let (Some(source), Some(kind), Some(namespace), Some(name)) = (
        &filters.source,
        &filters.kind,
        &filters.namespace,
        &filters.name,
    ) {
        return IndexKind::Resource.prefix(&[&[source], &[kind], &[namespace], &[name]]);
    }
    match (&filters.actor, &filters.source, filters.op) {
        (Some(actor), _, _) => IndexKind::Actor.prefix(&[&[actor]]),
        (None, Some(source), _) => IndexKind::Source.prefix(&[&[source]]),
        (None, None, Some(op)) => IndexKind::Op.prefix(&[&[op.code()]]),
        (None, None, None) => IndexKind::Time.prefix(&[]),
    }
}

/// The key range of `prefix` between the filters' times.
fn time_bounds(prefix: &[u8], filters: &Filters) -> (Vec<u8>, Vec<u8>) {
    let from = filters.from_ms.unwrap_or(0).max(0) as u64;
    let start = [prefix, &from.to_be_bytes()].concat();
    let end = match filters.to_ms {
        Some(to) => [prefix, &(to.max(0) as u64).to_be_bytes()].concat(),
        None => [prefix, &[0xff; 17]].concat(),
    };
    (start, end)
}

/// Binds a cursor to its filters (and order).
fn filter_digest(filters: &Filters) -> [u8; 32] {
    Sha256::digest(format!("{filters:?}").as_bytes()).into()
}

/// Whether `found` passes every filter (`changed`: the changed-path filter's
/// pattern, split once per query).
fn matches(found: &Found, filters: &Filters, changed: Option<&PathPattern>) -> bool {
    let resource = &found.resource;
    let event = &found.event;
    let same = |wanted: &Option<String>, value: &str| wanted.as_deref().is_none_or(|w| w == value);
    same(&filters.source, &resource.source)
        && same(&filters.kind, &resource.kind)
        && same(&filters.namespace, &resource.namespace)
        && same(&filters.name, &resource.name)
        && filters.op.is_none_or(|op| op == event.op)
        && (filters.actor.as_deref())
            .is_none_or(|actor| event.actor.as_ref().is_some_and(|a| a.name == actor))
        && changed.is_none_or(|pattern| changed_at(event, pattern))
}
