//! How a processed event id is kept: the first 128 bits of its SHA-256, and the
//! segment (one committed batch's digests) it is stored in. Shared by the id set
//! and the store.

use sha2::{Digest as _, Sha256};

/// The 128-bit digest an id is kept as.
pub type IdDigest = u128;

/// The digest of `event_id`.
pub fn digest(event_id: &str) -> IdDigest {
    let hash = Sha256::digest(event_id.as_bytes());
    let mut first = [0; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_be_bytes(first)
}

/// One committed batch's ids, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Position among the store's segments (grows with every batch).
    pub sequence: u64,
    /// When the batch was committed (ms since the epoch); the ids expire together.
    pub at_ms: u64,
    /// The ids' digests.
    pub digests: Vec<IdDigest>,
}
