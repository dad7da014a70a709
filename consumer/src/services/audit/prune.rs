//! Retention: blocks of entries older than `retention_days`, or beyond the newest
//! `max_entries`, are pruned from the log's start, whole blocks at a time, a
//! bounded number per tick, in the tick's atomic write.
//!
//! Pruning removes a block's entries and keeps its leaf hashes and every subtree
//! hash. So the pruned range still proves what it proved: inclusion and
//! consistency proofs for every entry and head keep working, and `verify` checks
//! the pruned range's stored leaf hashes against the signed heads. What the range
//! can no longer prove is its content: nobody can show what a pruned entry said.
//! Index runs that point only at pruned entries are dropped; the others lose
//! those keys when they are next merged (until then a query skips them).

use std::time::Duration;

use super::log::{page_key, read_page, read_u64, records, Entry, BLOCK, PRUNED, SIZE};
use super::runs::drop_pruned;
use crate::runtime::{Context, HandlerError};

/// Entries pruned per tick at most (bounds a tick's write).
pub const PRUNE_BUDGET: u64 = 8_192;

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

/// Prunes the whole blocks `retention` no longer keeps at `now_ms`, up to
/// [`PRUNE_BUDGET`] entries; returns how many entries went.
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
    while next + BLOCK <= size && next - first < PRUNE_BUDGET {
        let pages = block_pages(context, next)?;
        let newest = pages.last().and_then(|(_, page)| newest_logged_ms(page));
        let expired = newest.zip(cutoff).is_some_and(|(at, cutoff)| at < cutoff);
        if next + BLOCK > keep_from && !expired {
            break;
        }
        for (first, _) in pages {
            context.remove(page_key(first));
        }
        next += BLOCK;
    }
    if next > first {
        context.put(PRUNED, next.to_be_bytes().to_vec());
        drop_pruned(context, next).map_err(HandlerError::fatal)?;
    }
    Ok(next - first)
}

/// The pages of the block starting at `first`, with their first indexes: each
/// page starts after the last entry of the one before (a block starts a page),
/// so they are found by reads that see the batch still being written.
fn block_pages(context: &Context<'_>, first: u64) -> Result<Vec<(u64, Vec<u8>)>, HandlerError> {
    let mut pages = Vec::new();
    let mut next = first;
    while next < first + BLOCK {
        let Some(page) = context.get(&page_key(next))? else {
            break;
        };
        let page = read_page(&page);
        let after = records(&page).last().map(|(last, _)| last + 1);
        pages.push((next, page));
        match after {
            Some(after) if after > next => next = after,
            _ => break,
        }
    }
    Ok(pages)
}

/// When the newest entry of a stored page was logged.
fn newest_logged_ms(page: &[u8]) -> Option<u64> {
    let (_, value) = records(page).last()?;
    Entry::decode(value).map(|e| e.provenance.logged_ms)
}
