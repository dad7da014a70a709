//! The audit log's Merkle tree, as Certificate Transparency builds it (RFC 9162,
//! section 2.1): leaf hashes `SHA-256(0x00 || record)`, node hashes
//! `SHA-256(0x01 || left || right)`, the tree over `n` leaves split at the largest
//! power of two below `n`.
//!
//! Pure: hashes come from a [`Nodes`] source that holds the hash of every
//! *complete* subtree (`2^level` leaves starting at a multiple of `2^level`).
//! Every range the RFC's recursions ask for splits into such subtrees, so a root,
//! an inclusion proof or a consistency proof costs O(log n) lookups. Appending a
//! leaf completes at most one subtree per level ([`appended`]).

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(data);
    hasher.finalize().into()
}

/// The hash of an inner node over `left` and `right`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of an empty tree: the hash of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Where complete subtrees' hashes are read from.
pub trait Nodes {
    /// The error reading a hash.
    type Error;

    /// The hash of the complete subtree at `level` (`2^level` leaves) whose first
    /// leaf is `index << level`.
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// The complete subtrees a leaf appended at `index` completes, bottom up, given
/// `sibling(level, index)` for the left siblings it needs: `(level, index, hash)`.
pub fn appended<E>(
    index: u64,
    leaf: Hash,
    mut sibling: impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Vec<(u32, u64, Hash)>, E> {
    let mut completed = vec![(0, index, leaf)];
    let (mut level, mut position, mut hash) = (0u32, index, leaf);
    // A right child completes its parent.
    while position % 2 == 1 {
        let left = sibling(level, position - 1)?;
        hash = node_hash(&left, &hash);
        level += 1;
        position /= 2;
        completed.push((level, position, hash));
    }
    Ok(completed)
}

/// The largest power of two below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The hash of leaves `start..end` (RFC 9162's `MTH(D[start:end])`).
pub fn range_hash<N: Nodes>(nodes: &N, start: u64, end: u64) -> Result<Hash, N::Error> {
    let size = end - start;
    if size == 0 {
        return Ok(empty_root());
    }
    if size.is_power_of_two() && start.is_multiple_of(size) {
        return nodes.node(size.trailing_zeros(), start / size);
    }
    let k = split(size);
    let left = range_hash(nodes, start, start + k)?;
    let right = range_hash(nodes, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The root of the tree over the first `size` leaves.
pub fn root<N: Nodes>(nodes: &N, size: u64) -> Result<Hash, N::Error> {
    range_hash(nodes, 0, size)
}

/// The audit path of leaf `index` in the tree over the first `size` leaves
/// (RFC 9162's `PATH(m, D[n])`), from the leaf's sibling up.
pub fn inclusion_proof<N: Nodes>(nodes: &N, index: u64, size: u64) -> Result<Vec<Hash>, N::Error> {
    let mut path = Vec::new();
    inclusion(nodes, index, 0, size, &mut path)?;
    Ok(path)
}

fn inclusion<N: Nodes>(
    nodes: &N,
    index: u64,
    start: u64,
    end: u64,
    path: &mut Vec<Hash>,
) -> Result<(), N::Error> {
    let size = end - start;
    if size <= 1 {
        return Ok(());
    }
    let k = split(size);
    if index - start < k {
        inclusion(nodes, index, start, start + k, path)?;
        path.push(range_hash(nodes, start + k, end)?);
    } else {
        inclusion(nodes, index, start + k, end, path)?;
        path.push(range_hash(nodes, start, start + k)?);
    }
    Ok(())
}

/// The proof that the tree over the first `old` leaves is a prefix of the tree over
/// the first `new` (RFC 9162's `PROOF(m, D[n])`).
pub fn consistency_proof<N: Nodes>(nodes: &N, old: u64, new: u64) -> Result<Vec<Hash>, N::Error> {
    let mut proof = Vec::new();
    if old > 0 && old < new {
        subproof(nodes, old, 0, new, true, &mut proof)?;
    }
    Ok(proof)
}

fn subproof<N: Nodes>(
    nodes: &N,
    old: u64,
    start: u64,
    end: u64,
    whole: bool,
    proof: &mut Vec<Hash>,
) -> Result<(), N::Error> {
    let size = end - start;
    if old == size {
        if !whole {
            proof.push(range_hash(nodes, start, end)?);
        }
        return Ok(());
    }
    let k = split(size);
    if old <= k {
        subproof(nodes, old, start, start + k, whole, proof)?;
        proof.push(range_hash(nodes, start + k, end)?);
    } else {
        subproof(nodes, old - k, start + k, end, false, proof)?;
        proof.push(range_hash(nodes, start, start + k)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::convert::Infallible;

    use super::*;

    /// Complete subtrees as [`appended`] produces them, in memory.
    #[derive(Default)]
    struct Memory(HashMap<(u32, u64), Hash>);

    impl Nodes for Memory {
        type Error = Infallible;

        fn node(&self, level: u32, index: u64) -> Result<Hash, Infallible> {
            Ok(self.0[&(level, index)])
        }
    }

    fn tree(leaves: &[Vec<u8>]) -> Memory {
        let mut memory = Memory::default();
        for (index, data) in leaves.iter().enumerate() {
            let completed = appended(index as u64, leaf_hash(data), |level, index| {
                Ok::<_, Infallible>(memory.0[&(level, index)])
            })
            .expect("infallible");
            for (level, index, hash) in completed {
                memory.0.insert((level, index), hash);
            }
        }
        memory
    }

    /// RFC 9162's MTH, straight from its definition.
    fn reference_root(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = split(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn leaves(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("record {i}").into_bytes()).collect()
    }

    #[test]
    fn the_rfc_split_is_the_largest_power_of_two_below() {
        assert_eq!([2, 3, 4, 5, 8, 9].map(split), [1, 2, 2, 4, 4, 8]);
    }

    #[test]
    fn roots_match_the_definition_for_every_size_up_to_70() {
        let all = leaves(70);
        let memory = tree(&all);
        for size in 0..=70 {
            let root = root(&memory, size as u64).expect("infallible");
            assert_eq!(root, reference_root(&all[..size]), "size {size}");
        }
    }

    // Proofs are verified, by property tests, with RFC 9162's algorithms written
    // apart from this code: tests/tests/e2e/audit.rs.
    #[test]
    fn proofs_have_the_rfc_lengths() {
        let memory = tree(&leaves(7));
        // RFC 9162 2.1.5's example tree of 7 leaves.
        assert_eq!(inclusion_proof(&memory, 0, 7).expect("ok").len(), 3);
        assert_eq!(inclusion_proof(&memory, 6, 7).expect("ok").len(), 2);
        assert_eq!(consistency_proof(&memory, 3, 7).expect("ok").len(), 4);
        assert_eq!(consistency_proof(&memory, 4, 7).expect("ok").len(), 1);
        assert_eq!(consistency_proof(&memory, 6, 7).expect("ok").len(), 3);
        assert!(consistency_proof(&memory, 7, 7).expect("ok").is_empty());
    }
}
