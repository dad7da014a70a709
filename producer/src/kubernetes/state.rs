//! The object-state seam: the last published form of every watched object, by scope
//! and uid. Written only after Kafka acknowledged the events it reflects; read at
//! startup to tell creates from updates and to synthesize deletes missed while away.

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

/// Durable per-scope object state.
pub trait ObjectStore: Send + Sync + 'static {
    /// The objects of `scope`, and whether the scope ever completed a sync.
    fn load(&self, scope: &str) -> Result<(Objects, bool), StateError>;
    /// Writes (`Some`) or removes (`None`) objects and marks the scope synced, in one
    /// durable batch.
    fn apply(&self, scope: &str, writes: Vec<(String, Option<Value>)>) -> Result<(), StateError>;
    /// Forgets a scope (its kind is no longer served).
    fn clear(&self, scope: &str) -> Result<(), StateError>;
}

/// Object state in a sled tree; keys are `<scope>\0<uid>`, and `<scope>\0` marks a
/// scope that completed a sync.
pub struct SledObjects {
    tree: sled::Tree,
}

impl SledObjects {
    /// Uses the `kubernetes-objects` tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, StateError> {
        Ok(Self {
            tree: db.open_tree("kubernetes-objects")?,
        })
    }
}

fn prefix(scope: &str) -> Vec<u8> {
    let mut key = scope.as_bytes().to_vec();
    key.push(0);
    key
}

impl ObjectStore for SledObjects {
    fn load(&self, scope: &str) -> Result<(Objects, bool), StateError> {
        let prefix = prefix(scope);
        let mut objects = Objects::new();
        let mut synced = false;
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            let uid = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if uid.is_empty() {
                synced = true;
            } else {
                objects.insert(uid, serde_json::from_slice(&value)?);
            }
        }
        Ok((objects, synced))
    }

    fn apply(&self, scope: &str, writes: Vec<(String, Option<Value>)>) -> Result<(), StateError> {
        let prefix = prefix(scope);
        let mut batch = sled::Batch::default();
        batch.insert(prefix.clone(), &[][..]);
        for (uid, object) in writes {
            let mut key = prefix.clone();
            key.extend_from_slice(uid.as_bytes());
            match object {
                Some(object) => batch.insert(key, serde_json::to_vec(&object)?),
                None => batch.remove(key),
            }
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    fn clear(&self, scope: &str) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for key in self.tree.scan_prefix(prefix(scope)).keys() {
            batch.remove(key?);
        }
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scopes_are_kept_apart_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledObjects::open(&sled::open(dir.path()).unwrap()).unwrap();
            assert_eq!(store.load("g/K/a").unwrap(), (Objects::new(), false));
            store
                .apply(
                    "g/K/a",
                    vec![
                        ("u1".into(), Some(json!({"x": 1}))),
                        ("u2".into(), Some(json!(2))),
                    ],
                )
                .unwrap();
            store.apply("g/K/a", vec![("u2".into(), None)]).unwrap();
            store
                .apply("g/K/ab", vec![("u3".into(), Some(json!(3)))])
                .unwrap();
        }
        let store = SledObjects::open(&sled::open(dir.path()).unwrap()).unwrap();
        let (objects, synced) = store.load("g/K/a").unwrap();
        assert!(synced);
        assert_eq!(objects, Objects::from([("u1".into(), json!({"x": 1}))]));
        store.clear("g/K/a").unwrap();
        assert_eq!(store.load("g/K/a").unwrap(), (Objects::new(), false));
        assert_eq!(store.load("g/K/ab").unwrap().0.len(), 1);
    }
}
