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
//! those keys when they are next merged (until then a query skips them). A
//! segment file of pages is deleted on the first tick after no kept page is in
//! it any more (disk space comes back a segment at a time).

use std::time::Duration;

use super::bytes::read_u64;
use super::log::{load_page, records, Entry, BLOCK, PRUNED, SIZE};
use super::pages::{committed_end, page_key, Pages, Place, ENTRIES};
use super::runs::drop_pruned;
use crate::runtime::{Context, HandlerError, Store, StoreError};

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
    let (mut pages, files) = (Vec::new(), Pages::of(context.committed()));
    let mut next = first;
    while next < first + BLOCK {
        let Some(place) = context.get(&page_key(next))? else {
            break;
        };
        let page = load_page(&files, &place)?;
        let after = records(&page).last().map(|(last, _)| last + 1);
        pages.push((next, page));
        match after {
            Some(after) if after > next => next = after,
            _ => break,
        }
    }
    Ok(pages)
}

/// Deletes the segment files that hold no page the committed store keeps;
/// returns how many went.
pub fn remove_pruned_segments(store: &Store) -> Result<usize, StoreError> {
    let first_kept = store.range(ENTRIES, &page_key(u64::MAX), false).next();
    let kept_from = match first_kept.transpose()? {
        Some((_, place)) => Place::decode(&place).map_or(0, |place| place.at),
        None => committed_end(store)?,
    };
    Pages::of(store).remove_before(kept_from)
}

/// When the newest entry of a stored page was logged.
fn newest_logged_ms(page: &[u8]) -> Option<u64> {
    let (_, value) = records(page).last()?;
    Entry::decode(value).map(|e| e.provenance.logged_ms)
}

#[cfg(test)]
mod tests {
    use super::super::pages::SEGMENT_BYTES;
    use super::*;

    #[test]
    fn a_segment_file_goes_once_no_kept_page_is_in_it() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("cw-prune-{}", std::process::id()));
        let store = Store::open(&dir)?;
        let files = Pages::of(&store);
        let page = vec![7; 1000];
        // Pages 0 and 100 in segment 0, 200 in segment 1, 300 in segment 2.
        let mut end = 0;
        for (first, at) in [
            (0, 0),
            (100, SEGMENT_BYTES - 1000),
            (200, SEGMENT_BYTES),
            (300, 2 * SEGMENT_BYTES),
        ] {
            if at > end {
                end = at;
            }
            for (key, value) in files.write(end, &[(first, page.clone())])? {
                store.put_state(&key, Some(&value))?;
            }
            end = committed_end(&store)?;
        }
        assert_eq!(
            remove_pruned_segments(&store)?,
            0,
            "every segment holds a kept page"
        );
        store.put_state(&page_key(0), None)?;
        assert_eq!(
            remove_pruned_segments(&store)?,
            0,
            "page 100 is still in segment 0"
        );
        store.put_state(&page_key(100), None)?;
        store.put_state(&page_key(200), None)?;
        assert_eq!(
            remove_pruned_segments(&store)?,
            2,
            "segments 0 and 1 hold no kept page"
        );
        let place = Place::decode(&store.get(&page_key(300))?.unwrap_or_default());
        assert_eq!(
            files.read(place.expect("kept"))?,
            page,
            "the kept page reads back"
        );
        store.put_state(&page_key(300), None)?;
        assert_eq!(
            remove_pruned_segments(&store)?,
            0,
            "the segment the next page goes to stays"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
