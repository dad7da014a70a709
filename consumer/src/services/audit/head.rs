//! Signed tree heads: the log's size, its root hash and a time, signed with the
//! service's ed25519 key. Published to Kafka as well as stored, so a copy exists
//! outside the store: whoever alters the store cannot alter what was signed.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use changewire_schemas::hex;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

/// What a signature covers starts with this, so it can mean nothing else.
const CONTEXT: &[u8] = b"changewire-audit-tree-head-v1\0";

/// A signed tree head, as stored, published and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// Leaves in the tree.
    pub size: u64,
    /// The tree's root hash, hex.
    pub root: String,
    /// When it was signed (ms since the epoch).
    pub timestamp_ms: u64,
    /// The signing key's id: hex of the first 8 bytes of SHA-256 of the public key.
    pub key_id: String,
    /// The ed25519 signature, base64.
    pub signature: String,
}

/// The bytes a head's signature covers.
fn signed_bytes(size: u64, root: &Hash, timestamp_ms: u64) -> Vec<u8> {
    [
        CONTEXT,
        &size.to_be_bytes(),
        root,
        &timestamp_ms.to_be_bytes(),
    ]
    .concat()
}

/// Reads a hex hash; `None` when it is not 64 hex digits.
pub fn parse_hash(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// The id of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

/// A signing key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("audit.signing_key must be the base64 of a 32-byte ed25519 seed")]
pub struct KeyError;

/// Signs tree heads.
pub struct HeadSigner {
    key: SigningKey,
}

impl HeadSigner {
    /// A signer from the base64 of a 32-byte seed.
    pub fn from_seed(seed: &str) -> Result<Self, KeyError> {
        let bytes = BASE64.decode(seed.trim()).map_err(|_| KeyError)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError)?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The public key heads verify with.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs the tree of `size` leaves with root `root` at `timestamp_ms`.
    pub fn sign(&self, size: u64, root: &Hash, timestamp_ms: u64) -> SignedHead {
        let signature = self.key.sign(&signed_bytes(size, root, timestamp_ms));
        SignedHead {
            size,
            root: hex(root),
            timestamp_ms,
            key_id: key_id(&self.verifying_key()),
            signature: BASE64.encode(signature.to_bytes()),
        }
    }
}

impl SignedHead {
    /// Whether `key` signed this head as it reads.
    pub fn is_signed_by(&self, key: &VerifyingKey) -> bool {
        let Some(root) = parse_hash(&self.root) else {
            return false;
        };
        let Some(signature) = BASE64
            .decode(&self.signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
        else {
            return false;
        };
        key.verify(
            &signed_bytes(self.size, &root, self.timestamp_ms),
            &signature,
        )
        .is_ok()
    }

    /// The root hash, if it reads as one.
    pub fn root_hash(&self) -> Option<Hash> {
        parse_hash(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn a_signed_head_verifies_and_any_change_breaks_it() {
        let signer = HeadSigner::from_seed(SEED).expect("a valid seed");
        let key = signer.verifying_key();
        let head = signer.sign(7, &[3; 32], 1_000);
        assert!(head.is_signed_by(&key));
        assert_eq!(head.root_hash(), Some([3; 32]));
        for forged in [
            SignedHead {
                size: 8,
                ..head.clone()
            },
            SignedHead {
                timestamp_ms: 999,
                ..head.clone()
            },
            SignedHead {
                root: hex(&[4; 32]),
                ..head.clone()
            },
        ] {
            assert!(!forged.is_signed_by(&key), "{forged:?}");
        }
        let other = HeadSigner::from_seed(&BASE64.encode([9u8; 32])).expect("valid");
        assert!(!head.is_signed_by(&other.verifying_key()));
    }

    #[test]
    fn seeds_that_are_not_32_bytes_of_base64_are_refused() {
        assert!(HeadSigner::from_seed("short").is_err());
        assert!(HeadSigner::from_seed(&BASE64.encode([1u8; 31])).is_err());
    }
}
