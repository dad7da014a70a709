//! Retention: entries older than `retention_days`, or beyond the newest
//! `max_entries`, are pruned from the log's start, a bounded number per tick, in
//! the tick's atomic write.
//!
//! Pruning removes an entry, its id and its index keys, and keeps every subtree
//! hash. So the pruned range still proves what it proved: inclusion and
//! consistency proofs for every entry and head keep working, and `verify` checks
//! the pruned range's stored leaf hashes against the signed heads. What the range
//! can no longer prove is its content: nobody can show what a pruned entry said.

use std::time::Duration;

use changewire_schemas::ChangeEvent;

use super::log::{entry_key, id_key, index_keys, read_u64, Entry, PRUNED, SIZE};
use crate::runtime::{Context, HandlerError};

/// Entries pruned per tick at most (bounds a tick's write).
pub const PRUNE_BUDGET: u64 = 5_000;

/// How long entries are kept, and how many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Entries logged longer ago go.
    pub max_age: Option<Duration>,
    /// Beyond this many entries, the oldest go.
    pub max_entries: Option<u64>,
}

impl Retention {
    /// Whether anything is ever pruned.
    pub fn prunes(&self) -> bool {
        self.max_age.is_some() || self.max_entries.is_some()
    }
}

/// Prunes what `retention` no longer keeps at `now_ms`, up to [`PRUNE_BUDGET`]
/// entries; returns how many went.
pub fn prune(
    context: &mut Context<'_>,
    retention: &Retention,
    now_ms: u64,
) -> Result<u64, HandlerError> {
    let size = read_u64(context.get(SIZE)?.as_deref());
    let first = read_u64(context.get(PRUNED)?.as_deref());
    let keep_from = retention
        .max_entries
        .map_or(0, |max| size.saturating_sub(max));
    let cutoff = (retention.max_age).map(|age| now_ms.saturating_sub(age.as_millis() as u64));
    let mut next = first;
    while next < size && next - first < PRUNE_BUDGET {
        let value = context.get(&entry_key(next))?;
        let entry = value.as_deref().and_then(Entry::decode);
        let expired = entry
            .as_ref()
            .zip(cutoff)
            .is_some_and(|(e, cutoff)| e.provenance.logged_ms < cutoff);
        if next >= keep_from && !expired {
            break;
        }
        if let Some(entry) = entry {
            forget(context, next, &entry);
        }
        context.remove(entry_key(next));
        next += 1;
    }
    if next > first {
        context.put(PRUNED, next.to_be_bytes().to_vec());
    }
    Ok(next - first)
}

/// Removes what points at the entry at `index`: its id and index keys.
fn forget(context: &mut Context<'_>, index: u64, entry: &Entry) {
    let Ok(event) = serde_json::from_slice::<ChangeEvent>(&entry.payload) else {
        return;
    };
    context.remove(id_key(event.id.as_str()));
    for key in index_keys(index, &event, entry) {
        context.remove(key);
    }
}
