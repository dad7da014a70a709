//! Redaction: secret values (configured Postgres columns, Kubernetes Secret data) are
//! replaced by a keyed hash before an event is encoded, so a change to a secret is
//! visible while its value never leaves.

use std::fmt;

use hmac::{Hmac, Mac};
use serde_json::Value as Json;
use sha2::Sha256;

use crate::pattern;

/// Prefix of every redacted value.
pub const REDACTED_PREFIX: &str = "hmac-sha256:";

/// Replaces values by `hmac-sha256:<hex>` of their JSON text, keyed.
#[derive(Clone)]
pub struct SecretHasher {
    key: Vec<u8>,
}

impl fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretHasher").finish_non_exhaustive()
    }
}

impl SecretHasher {
    /// A hasher keyed by `key` (keep it secret: it is what stops guessing).
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// The keyed hash that stands in for `value`. Equal values give equal hashes, so
    /// consumers still see whether a secret changed.
    pub fn hash(&self, value: &Json) -> Json {
        Json::String(self.hash_text(value.to_string().as_bytes()))
    }

    /// The keyed hash (`hmac-sha256:<hex>`) that stands in for a value whose compact
    /// JSON text is `json`.
    pub fn hash_text(&self, json: &[u8]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(json);
        let digest = mac.finalize().into_bytes();
        let hex = changewire_schemas::hex(&digest);
        format!("{REDACTED_PREFIX}{hex}")
    }
}

/// Hashes the values of Postgres columns matching `schema.table.column` patterns.
#[derive(Clone, Debug)]
pub struct Redactor {
    hasher: SecretHasher,
    patterns: Vec<String>,
}

impl Redactor {
    /// A redactor for `schema.table.column` patterns (`*` wildcard), keyed by `key`.
    pub fn new(key: &[u8], patterns: Vec<String>) -> Self {
        Self {
            hasher: SecretHasher::new(key),
            patterns,
        }
    }

    /// Whether `schema.table.column` is redacted.
    pub fn covers(&self, schema: &str, table: &str, column: &str) -> bool {
        let name = format!("{schema}.{table}.{column}");
        self.patterns.iter().any(|p| pattern::matches(p, &name))
    }

    /// The keyed hash that stands in for a redacted column's value, whose compact
    /// JSON text is `json`.
    pub fn hash_text(&self, json: &[u8]) -> String {
        self.hasher.hash_text(json)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hashes_are_keyed_stable_and_hide_the_value() {
        let redactor = Redactor::new(
            b"k1",
            vec!["public.users.password".into(), "*.*.ssn".into()],
        );
        let a = SecretHasher::new(b"k1").hash(&json!("hunter2"));
        assert_eq!(a, SecretHasher::new(b"k1").hash(&json!("hunter2")));
        assert_ne!(a, SecretHasher::new(b"k1").hash(&json!("hunter3")));
        assert_ne!(a, SecretHasher::new(b"k2").hash(&json!("hunter2")));
        assert_eq!(
            a,
            Json::String(redactor.hash_text(br#""hunter2""#)),
            "a column's hash is that of its JSON text"
        );
        let text = a.as_str().unwrap_or_default();
        assert!(text.starts_with(REDACTED_PREFIX) && !text.contains("hunter2"));
        assert!(redactor.covers("public", "users", "password"));
        assert!(redactor.covers("hr", "people", "ssn"));
        assert!(!redactor.covers("public", "users", "email"));
    }
}
