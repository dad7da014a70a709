//! Verifying the log: recompute every leaf and subtree from the stored entries,
//! check each stored hash, that each entry sits where it was logged, and every
//! signed head (signature, and its root against the recomputed tree of its size). Names the first problem: which
//! record was altered, deleted or moved, or which signed range no longer matches.
//!
//! Stored hashes alone prove nothing (whoever alters an entry can rewrite them);
//! the signed heads are what an attacker cannot redo without the key, and their
//! copies in Kafka outlive the store. Entries after the last signed head are
//! checked against the stored hashes only, until the next head covers them.

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::bytes::read_u64;
use super::head::SignedHead;
use super::log::{
    leaves_key, node_key, pages, records, Entry, BLOCK, BLOCK_LEVEL, HEAD, PRUNED, SIZE,
};
use super::merkle::{appended, leaf_hash, node_hash, Hash};
use crate::runtime::{Store, StoreError};

/// One thing verification found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// An entry the log's size says exists is gone.
    Missing {
        /// Its index.
        index: u64,
    },
    /// An entry is not what was logged at its place (changed, or another entry
    /// moved there).
    Altered {
        /// Its index.
        index: u64,
        /// The event id it now holds, if it reads as an event.
        event_id: Option<String>,
    },
    /// An entry sits at another index than the one it was appended at (entries
    /// reordered).
    Moved {
        /// Where it is.
        index: u64,
        /// The index it was appended at, as stored with it.
        logged_at: u64,
        /// Its event id.
        event_id: String,
    },
    /// A stored subtree hash differs from the recomputed one (proofs served from
    /// it would not verify).
    HashAltered {
        /// Level of the subtree.
        level: u32,
        /// Its index on that level.
        index: u64,
    },
    /// A signed head does not verify with the service's key.
    BadSignature {
        /// The head's size.
        size: u64,
    },
    /// The recomputed tree differs from what a head signed: an entry in `after..size`
    /// changed (with its stored hashes rewritten to hide it).
    HeadMismatch {
        /// The head's size.
        size: u64,
        /// The size of the last head that still matched (0: none).
        after: u64,
    },
    /// A head signed more entries than the store holds: its tail was cut off.
    Truncated {
        /// Entries the head signed.
        signed: u64,
        /// Entries the store holds.
        stored: u64,
    },
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Entries in the log.
    pub size: u64,
    /// Signed heads checked.
    pub heads: usize,
    /// The largest size a valid signed head covers.
    pub signed_size: u64,
    /// Entries pruned from the start: their stored leaf hashes were checked
    /// against the heads, their content can no longer be.
    pub pruned: u64,
    /// The problems, in log order (empty: the log is intact).
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether nothing was found wrong.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// At most this many problems are listed (the first one is what matters).
const MAX_PROBLEMS: usize = 100;

/// Verifies the log in `store` against heads signed by `key`.
pub fn verify(store: &Store, key: &VerifyingKey) -> Result<Report, StoreError> {
    let size = read_u64(store.get(SIZE)?.as_deref());
    let pruned = read_u64(store.get(PRUNED)?.as_deref());
    let heads = signed_heads(store)?;
    let mut report = Report {
        size,
        heads: heads.len(),
        signed_size: 0,
        pruned,
        problems: Vec::new(),
    };
    let mut roots = recompute(store, (pruned, size), &heads, &mut report.problems)?;
    let mut after = 0;
    for head in &heads {
        if !head.is_signed_by(key) {
            report
                .problems
                .push(Problem::BadSignature { size: head.size });
            continue;
        }
        if head.size > size {
            report.problems.push(Problem::Truncated {
                signed: head.size,
                stored: size,
            });
            continue;
        }
        match roots.remove(&head.size) {
            Some(root) if Some(root) == head.root_hash() => {
                after = head.size;
                report.signed_size = head.size;
            }
            _ => report.problems.push(Problem::HeadMismatch {
                size: head.size,
                after,
            }),
        }
    }
    report.problems.truncate(MAX_PROBLEMS);
    Ok(report)
}

/// Every stored signed head, by size.
pub fn signed_heads(store: &Store) -> Result<Vec<SignedHead>, StoreError> {
    let mut heads: Vec<SignedHead> = (store.scan(HEAD)?.into_iter())
        .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
        .collect();
    heads.sort_by_key(|h| h.size);
    Ok(heads)
}

/// Recomputes the tree block by block (from stored leaf hashes below `pruned`),
/// noting problems; returns the recomputed root at each head's size.
fn recompute(
    store: &Store,
    (pruned, size): (u64, u64),
    heads: &[SignedHead],
    problems: &mut Vec<Problem>,
) -> Result<std::collections::HashMap<u64, Hash>, StoreError> {
    let wanted: std::collections::HashSet<u64> = heads.iter().map(|h| h.size).collect();
    let mut roots = std::collections::HashMap::new();
    // The last complete subtree of each level: the right edge of the tree.
    let mut frontier: Vec<Hash> = Vec::new();
    for block in 0..size.div_ceil(BLOCK) {
        let first = block * BLOCK;
        let span = (first, size.min(first + BLOCK));
        for (index, leaf) in (first..).zip(block_leaves(store, block, span, pruned, problems)?) {
            let completed = appended(index, leaf, |level, _| {
                Ok::<_, StoreError>(frontier[level as usize])
            })?;
            for (level, position, hash) in completed {
                if level as usize == frontier.len() {
                    frontier.push(hash);
                } else {
                    frontier[level as usize] = hash;
                }
                check_node(store, level, position, &hash, problems)?;
            }
            if wanted.contains(&(index + 1)) {
                roots.insert(index + 1, root_of(index + 1, &frontier));
            }
        }
    }
    Ok(roots)
}

/// The leaves of the block holding `first..end`: recomputed from its entries, or
/// as stored where an entry is pruned or gone (a zero hash where neither is).
fn block_leaves(
    store: &Store,
    block: u64,
    (first, end): (u64, u64),
    pruned: u64,
    problems: &mut Vec<Problem>,
) -> Result<Vec<Hash>, StoreError> {
    let stored = store.get(&leaves_key(block))?.unwrap_or_default();
    let stored_leaf = |index: u64| {
        let at = ((index - first) * 32) as usize;
        stored
            .get(at..at + 32)
            .map(|h| Hash::try_from(h).expect("32 bytes"))
    };
    let mut leaves: Vec<Option<Hash>> = (first..end).map(stored_leaf).collect();
    if first < pruned {
        for index in (first..end).filter(|i| leaves[(i - first) as usize].is_none()) {
            problems.push(Problem::Missing { index });
        }
    } else {
        let entries: Vec<u8> = (pages(store, first, end)?.into_iter())
            .flat_map(|(_, page)| page)
            .collect();
        for (index, leaf) in check_entries(&entries, (first, end), &stored_leaf, problems) {
            leaves[(index - first) as usize] = Some(leaf);
        }
    }
    Ok(leaves.into_iter().map(|l| l.unwrap_or([0; 32])).collect())
}

/// Checks a block's entries: each in its place (a gap is entries deleted, one out
/// of order moved) and matching its stored leaf hash. Returns the recomputed leaf
/// of each entry in its place.
fn check_entries(
    entries: &[u8],
    (first, end): (u64, u64),
    stored_leaf: &dyn Fn(u64) -> Option<Hash>,
    problems: &mut Vec<Problem>,
) -> Vec<(u64, Hash)> {
    let listed: Vec<(u64, &[u8])> = records(entries).collect();
    let mut leaves = Vec::new();
    let mut expected = first;
    for (n, (at, value)) in listed.iter().enumerate() {
        let event_id = event_id(value);
        let gap = *at > expected && listed[n + 1..].iter().all(|(later, _)| later > at);
        if *at == expected || (gap && *at < end) {
            problems.extend((expected..*at).map(|index| Problem::Missing { index }));
            let leaf = leaf_hash(value);
            if stored_leaf(*at) != Some(leaf) {
                problems.push(Problem::Altered {
                    index: *at,
                    event_id,
                });
            }
            leaves.push((*at, leaf));
            expected = at + 1;
        } else if expected < end {
            problems.push(Problem::Moved {
                index: expected,
                logged_at: *at,
                event_id: event_id.unwrap_or_default(),
            });
            expected += 1;
        }
    }
    problems.extend((expected..end).map(|index| Problem::Missing { index }));
    leaves
}

/// The event id an entry holds, if it reads as an event.
fn event_id(value: &[u8]) -> Option<String> {
    Entry::decode(value)
        .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).ok())
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
}

/// The root of the tree over `size` leaves from the right edge's subtrees.
fn root_of(size: u64, frontier: &[Hash]) -> Hash {
    let mut root: Option<Hash> = None;
    for (level, hash) in frontier.iter().enumerate() {
        if size & (1 << level) != 0 {
            root = Some(match root {
                None => *hash,
                Some(right) => node_hash(hash, &right),
            });
        }
    }
    root.unwrap_or_else(super::merkle::empty_root)
}

fn check_node(
    store: &Store,
    level: u32,
    position: u64,
    hash: &Hash,
    problems: &mut Vec<Problem>,
) -> Result<(), StoreError> {
    // Smaller subtrees are not stored: their leaves are checked with the entries.
    if level >= BLOCK_LEVEL && store.get(&node_key(level, position))?.as_deref() != Some(&hash[..])
    {
        problems.push(Problem::HashAltered {
            level,
            index: position,
        });
    }
    Ok(())
}
