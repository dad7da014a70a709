//! Verifying the log: recompute every leaf and subtree from the stored entries,
//! check each stored hash, the id index, and every signed head (signature, and its
//! root against the recomputed tree of its size). Names the first problem: which
//! record was altered, deleted or moved, or which signed range no longer matches.
//!
//! Stored hashes alone prove nothing (whoever alters an entry can rewrite them);
//! the signed heads are what an attacker cannot redo without the key, and their
//! copies in Kafka outlive the store. Entries after the last signed head are
//! checked against the stored hashes only, until the next head covers them.

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::head::SignedHead;
use super::log::{entry_key, id_key, node_key, read_u64, Entry, HEAD, PRUNED, SIZE};
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
    /// An entry sits at another index than the one its id was logged at.
    Moved {
        /// Where it is.
        index: u64,
        /// Where the id index says it was logged.
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

/// Recomputes the tree entry by entry (from stored leaf hashes below `pruned`),
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
    for index in 0..size {
        let stored = if index < pruned {
            pruned_leaf(store, index)?
        } else {
            store
                .get(&entry_key(index))?
                .map(|value| {
                    check_entry(store, index, &value, problems).map(|()| leaf_hash(&value))
                })
                .transpose()?
        };
        let leaf = match stored {
            Some(leaf) => leaf,
            None => {
                problems.push(Problem::Missing { index });
                // Stands in so later entries still line up.
                [0; 32]
            }
        };
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
    Ok(roots)
}

/// The stored hash of a pruned leaf.
fn pruned_leaf(store: &Store, index: u64) -> Result<Option<Hash>, StoreError> {
    let value = store.get(&node_key(0, index))?;
    Ok(value.and_then(|v| Hash::try_from(v.as_slice()).ok()))
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

fn check_entry(
    store: &Store,
    index: u64,
    value: &[u8],
    problems: &mut Vec<Problem>,
) -> Result<(), StoreError> {
    let event_id = Entry::decode(value)
        .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).ok())
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned));
    let stored_leaf = store.get(&node_key(0, index))?;
    if stored_leaf.as_deref() != Some(&leaf_hash(value)[..]) {
        problems.push(Problem::Altered { index, event_id });
        return Ok(());
    }
    if let Some(event_id) = event_id {
        let logged_at = read_u64(store.get(&id_key(&event_id))?.as_deref());
        if logged_at != index {
            problems.push(Problem::Moved {
                index,
                logged_at,
                event_id,
            });
        }
    }
    Ok(())
}

fn check_node(
    store: &Store,
    level: u32,
    position: u64,
    hash: &Hash,
    problems: &mut Vec<Problem>,
) -> Result<(), StoreError> {
    // Leaves are checked with their entries.
    if level > 0 && store.get(&node_key(level, position))?.as_deref() != Some(&hash[..]) {
        problems.push(Problem::HashAltered {
            level,
            index: position,
        });
    }
    Ok(())
}
