//! The object-state seam: the last published form of every watched object, by scope
//! and uid. Written only after Kafka acknowledged the events it reflects; read at
//! startup to tell creates from updates and to synthesize deletes missed while away.
//!
//! A create is also *reserved* before it is published: a crash between Kafka's
//! acknowledgement and the state write would otherwise leave an object on the topic
//! that the state does not know, and its delete (while the producer is down) would
//! never be synthesized.

use std::collections::HashMap;

use serde_json::Value;

/// A failed state read or write.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store failed.
    #[error("object state store failed")]
    Store(#[from] sled::Error),
    /// A stored object is not valid JSON (the state was written by something else).
    #[error("stored object state is corrupt")]
    Corrupt(#[from] serde_json::Error),
}

/// A scope's stored objects: uid to last published form.
pub type Objects = HashMap<String, Value>;

/// What is stored of a scope.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    /// Objects whose last published form is confirmed.
    pub objects: Objects,
    /// Creates reserved but not confirmed: maybe published, maybe not.
    pub unconfirmed: Objects,
    /// Whether the scope ever completed a sync.
    pub synced: bool,
    /// The resourceVersion of the last watch event the state reflects, if known:
    /// a restart watches from it instead of listing everything again.
    pub resume: Option<String>,
}

/// Durable per-scope object state.
pub trait ObjectStore: Send + Sync + 'static {
    /// What is stored of `scope`.
    fn load(&self, scope: &str) -> Result<Loaded, StateError>;
    /// Durably notes creates about to be published (cleared by [`ObjectStore::apply`]).
    fn reserve(&self, scope: &str, creates: &[(&str, &Value)]) -> Result<(), StateError>;
    /// Writes (`Some`) or removes (`None`) objects, clears their reservations,
    /// marks the scope synced and records its resume point (`None`: unknown), in
    /// one durable batch.
    fn apply(
        &self,
        scope: &str,
        writes: Vec<(String, Option<Value>)>,
        resume: Option<&str>,
    ) -> Result<(), StateError>;
    /// Forgets a scope (its kind is no longer served).
    fn clear(&self, scope: &str) -> Result<(), StateError>;
    /// Every scope that completed a sync and was not cleared.
    fn scopes(&self) -> Result<Vec<String>, StateError>;
}

/// Object state in a sled tree; keys are `<scope>\0<uid>`, `<scope>\0` marks a
/// scope that completed a sync (its value is the resume point, empty when unknown),
/// and `<scope>\x01<uid>` holds a reserved create.
pub struct SledObjects {
    tree: sled::Tree,
}

/// The tree of a version that had a single `[kubernetes]` section.
const UNNAMED_TREE: &str = "kubernetes-objects";

impl SledObjects {
    /// Uses the `kubernetes-objects/<source>` tree of `db`: each source's own.
    pub fn open(db: &sled::Db, source: &str) -> Result<Self, StateError> {
        Ok(Self {
            tree: db.open_tree(tree_name(source))?,
        })
    }

    /// Hands the state of a version with a single `[kubernetes]` section to
    /// `source` (the first configured), unless `source` already has state. Idempotent:
    /// a crash between copying and dropping copies nothing the second time.
    pub fn adopt_unnamed(db: &sled::Db, source: &str) -> Result<(), StateError> {
        if !db.tree_names().iter().any(|n| n == UNNAMED_TREE.as_bytes()) {
            return Ok(());
        }
        let unnamed = db.open_tree(UNNAMED_TREE)?;
        let named = db.open_tree(tree_name(source))?;
        if named.is_empty() && !unnamed.is_empty() {
            let mut batch = sled::Batch::default();
            for entry in unnamed.iter() {
                let (key, value) = entry?;
                batch.insert(key, value);
            }
            named.apply_batch(batch)?;
            named.flush()?;
            tracing::info!(
                source,
                objects = unnamed.len(),
                "object state of the single [kubernetes] section now belongs to this source"
            );
        }
        db.drop_tree(UNNAMED_TREE)?;
        db.flush()?;
        Ok(())
    }
}

fn tree_name(source: &str) -> String {
    format!("{UNNAMED_TREE}/{source}")
}

fn prefix(scope: &str) -> Vec<u8> {
    let mut key = scope.as_bytes().to_vec();
    key.push(0);
    key
}

fn reserved_prefix(scope: &str) -> Vec<u8> {
    let mut key = scope.as_bytes().to_vec();
    key.push(1);
    key
}

fn key(prefix: &[u8], uid: &str) -> Vec<u8> {
    [prefix, uid.as_bytes()].concat()
}

impl ObjectStore for SledObjects {
    fn load(&self, scope: &str) -> Result<Loaded, StateError> {
        let mut loaded = Loaded::default();
        for (prefix, objects) in [
            (prefix(scope), &mut loaded.objects),
            (reserved_prefix(scope), &mut loaded.unconfirmed),
        ] {
            for entry in self.tree.scan_prefix(&prefix) {
                let (key, value) = entry?;
                let uid = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                if uid.is_empty() {
                    loaded.synced = true;
                    loaded.resume = Some(String::from_utf8_lossy(&value).into_owned())
                        .filter(|rv| !rv.is_empty());
                } else {
                    objects.insert(uid, serde_json::from_slice(&value)?);
                }
            }
        }
        Ok(loaded)
    }

    fn reserve(&self, scope: &str, creates: &[(&str, &Value)]) -> Result<(), StateError> {
        let prefix = reserved_prefix(scope);
        let mut batch = sled::Batch::default();
        for (uid, object) in creates {
            batch.insert(key(&prefix, uid), serde_json::to_vec(object)?);
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    fn apply(
        &self,
        scope: &str,
        writes: Vec<(String, Option<Value>)>,
        resume: Option<&str>,
    ) -> Result<(), StateError> {
        let (prefix, reserved) = (prefix(scope), reserved_prefix(scope));
        let mut batch = sled::Batch::default();
        batch.insert(prefix.clone(), resume.unwrap_or_default().as_bytes());
        for (uid, object) in writes {
            // Only creates were reserved; removing absent keys would still cost writes.
            let reservation = key(&reserved, &uid);
            if self.tree.contains_key(&reservation)? {
                batch.remove(reservation);
            }
            match object {
                Some(object) => batch.insert(key(&prefix, &uid), serde_json::to_vec(&object)?),
                None => batch.remove(key(&prefix, &uid)),
            }
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    fn clear(&self, scope: &str) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for prefix in [prefix(scope), reserved_prefix(scope)] {
            for key in self.tree.scan_prefix(prefix).keys() {
                batch.remove(key?);
            }
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    fn scopes(&self) -> Result<Vec<String>, StateError> {
        let mut scopes = Vec::new();
        for key in self.tree.iter().keys() {
            // Only a scope's synced marker ends in the separator.
            if let Some(scope) = key?.strip_suffix(&[0]) {
                scopes.push(String::from_utf8_lossy(scope).into_owned());
            }
        }
        Ok(scopes)
    }
}

#[cfg(test)]
mod tests {
    use changewire_schemas::storage::open_sled;
    use serde_json::json;

    use super::*;

    #[test]
    fn scopes_are_kept_apart_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledObjects::open(&open_sled(dir.path()).unwrap(), "c").unwrap();
            assert_eq!(store.load("g/K/a").unwrap(), Loaded::default());
            store
                .reserve("g/K/a", &[("u1", &json!(0)), ("u4", &json!(4))])
                .unwrap();
            store
                .apply(
                    "g/K/a",
                    vec![
                        ("u1".into(), Some(json!({"x": 1}))),
                        ("u2".into(), Some(json!(2))),
                    ],
                    None,
                )
                .unwrap();
            store
                .apply("g/K/a", vec![("u2".into(), None)], Some("42"))
                .unwrap();
            store
                .apply("g/K/ab", vec![("u3".into(), Some(json!(3)))], None)
                .unwrap();
        }
        let db = open_sled(dir.path()).unwrap();
        assert!(
            SledObjects::open(&db, "other")
                .unwrap()
                .scopes()
                .unwrap()
                .is_empty(),
            "each source has its own state"
        );
        let store = SledObjects::open(&db, "c").unwrap();
        let loaded = store.load("g/K/a").unwrap();
        assert!(loaded.synced);
        assert_eq!(loaded.resume.as_deref(), Some("42"));
        assert_eq!(store.load("g/K/ab").unwrap().resume, None);
        assert_eq!(
            loaded.objects,
            Objects::from([("u1".into(), json!({"x": 1}))])
        );
        assert_eq!(
            loaded.unconfirmed,
            Objects::from([("u4".into(), json!(4))]),
            "applying u1 confirmed its reservation; u4's is left"
        );
        assert_eq!(store.scopes().unwrap(), ["g/K/a", "g/K/ab"]);
        store.clear("g/K/a").unwrap();
        assert_eq!(store.load("g/K/a").unwrap(), Loaded::default());
        assert_eq!(store.scopes().unwrap(), ["g/K/ab"]);
        assert_eq!(store.load("g/K/ab").unwrap().objects.len(), 1);
    }

    #[test]
    fn the_unnamed_state_goes_to_the_first_source_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_sled(dir.path()).unwrap();
        let unnamed = SledObjects {
            tree: db.open_tree(UNNAMED_TREE).unwrap(),
        };
        unnamed
            .apply(
                "v1/ConfigMap",
                vec![("u1".into(), Some(json!(1)))],
                Some("7"),
            )
            .unwrap();
        SledObjects::adopt_unnamed(&db, "first").unwrap();
        let first = SledObjects::open(&db, "first").unwrap();
        let loaded = first.load("v1/ConfigMap").unwrap();
        assert_eq!(loaded.objects, Objects::from([("u1".into(), json!(1))]));
        assert_eq!(loaded.resume.as_deref(), Some("7"));
        assert!(!db.tree_names().iter().any(|n| n == UNNAMED_TREE.as_bytes()));
        first.clear("v1/ConfigMap").unwrap();
        SledObjects::adopt_unnamed(&db, "first").unwrap();
        assert!(first.scopes().unwrap().is_empty(), "adopted only once");
    }
}
