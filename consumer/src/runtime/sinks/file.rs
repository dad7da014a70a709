//! A file sink: effects' payloads as lines (NDJSON) appended to a file, rotated by
//! size, each chunk synced to disk before it counts as delivered.
//!
//! Rotation renames `<path>` to `<path>.1` (and `.1` to `.2`, ..., keeping `keep`
//! old files), then starts a new `<path>`. After a crash, effects in doubt whose
//! event id is already in the files (read newest first, until all are found)
//! count as delivered
//! (the event id is the idempotency key's start, and each line names it as
//! `"id"`), so a restart does not write them twice.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};

use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// A file sink's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file lines are appended to.
    pub path: PathBuf,
    /// Rotate once the file is larger than this.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`<path>.1` is the newest).
    #[serde(default = "default_keep")]
    pub keep: u32,
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_keep() -> u32 {
    10
}

impl FileConfig {
    /// Checks the settings; `section` names them in messages.
    pub fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        if self.max_bytes == 0 || self.keep == 0 {
            return Err(ConfigError::invalid(
                section,
                "max_bytes and keep must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Appends effects' payloads to a file.
pub struct FileSink {
    config: FileConfig,
    file: Mutex<Option<File>>,
}

impl FileSink {
    /// A sink writing as `config` says; `section` names it in messages.
    pub fn new(config: &FileConfig, section: &'static str) -> Result<Self, ConfigError> {
        config.validate(section)?;
        Ok(Self {
            config: config.clone(),
            file: Mutex::new(None),
        })
    }

    fn write(&self, effects: &[Arc<Pending>]) -> std::io::Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let file = match guard.as_mut() {
            Some(file) => file,
            None => guard.insert(open(&self.config.path)?),
        };
        let mut lines = Vec::new();
        for pending in effects {
            lines.extend_from_slice(&pending.effect.payload);
            lines.push(b'\n');
        }
        file.write_all(&lines)?;
        file.sync_data()?;
        if file.metadata()?.len() > self.config.max_bytes {
            *guard = None;
            rotate(&self.config.path, self.config.keep)?;
        }
        Ok(())
    }
}

/// Opens `path` to append, creating it (and its directory) when missing.
fn open(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// `<path>.N` for `N` = 1...
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    for n in (1..keep).rev() {
        let older = rotated(path, n);
        if older.exists() {
            std::fs::rename(&older, rotated(path, n + 1))?;
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// Event ids of the lines of `path` (none when it does not exist).
fn event_ids(path: &Path) -> std::io::Result<HashSet<String>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(error),
    };
    let mut ids = HashSet::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let Ok(document) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        // ECS names it event.id, OCSF metadata.uid, a plain event id.
        let id = [
            &document["event"]["id"],
            &document["metadata"]["uid"],
            &document["id"],
        ]
        .into_iter()
        .find_map(|v| v.as_str());
        ids.extend(id.map(str::to_owned));
    }
    Ok(ids)
}

/// The event id an idempotency key (`<event id>/<sink>/<n>`) starts with.
fn event_id(idempotency_key: &str) -> &str {
    let mut parts = idempotency_key.rsplitn(3, '/');
    let (_, _) = (parts.next(), parts.next());
    parts.next().unwrap_or(idempotency_key)
}

impl Sink for FileSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        // Writing and syncing block: off the runtime's worker where it can be.
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        let written = if multi_thread {
            tokio::task::block_in_place(|| self.write(effects))
        } else {
            self.write(effects)
        };
        match written {
            Ok(()) => effects.iter().map(|_| Delivery::Delivered).collect(),
            Err(error) => {
                let reason = format!("cannot write {}: {error}", self.config.path.display());
                effects
                    .iter()
                    .map(|_| Delivery::Failed(SinkError::unavailable(reason.clone())))
                    .collect()
            }
        }
    }

    async fn reconcile(
        &self,
        in_doubt: &[Arc<Pending>],
        _store: &Store,
    ) -> Result<HashSet<String>, SinkError> {
        let path = &self.config.path;
        // A chunk can take the file past `max_bytes` at once; a crash before the
        // rotation that follows left it oversized: finish that rotation first.
        let oversized = std::fs::metadata(path).is_ok_and(|m| m.len() > self.config.max_bytes);
        if oversized {
            rotate(path, self.config.keep).map_err(|e| {
                SinkError::unavailable(format!("cannot rotate {}: {e}", path.display()))
            })?;
        }
        let wanted: HashSet<&str> = in_doubt
            .iter()
            .map(|p| event_id(&p.idempotency_key))
            .collect();
        // Newest first, until every effect in doubt is found or no file is left.
        let mut written = HashSet::new();
        for n in 0..=self.config.keep {
            let file = if n == 0 {
                path.clone()
            } else {
                rotated(path, n)
            };
            if n > 0 && !file.exists() {
                break;
            }
            written.extend(event_ids(&file).map_err(SinkError::unavailable)?);
            if wanted.iter().all(|id| written.contains(*id)) {
                break;
            }
        }
        Ok((in_doubt.iter())
            .map(|p| p.idempotency_key.clone())
            .filter(|key| written.contains(event_id(key)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_left_oversized_by_a_crash_is_rotated_before_reconciling() {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("feed.ndjson");
        std::fs::write(&path, "x".repeat(200)).expect("written");
        std::fs::write(rotated(&path, 1), "older\n").expect("written");
        let config = FileConfig {
            path: path.clone(),
            max_bytes: 100,
            keep: 5,
        };
        let sink = FileSink::new(&config, "siem.file").expect("a sink");
        assert!(path.exists(), "a config check changes nothing");
        let store = Store::open(&dir.path().join("store")).expect("a store");
        sink.reconcile(&[], &store).await.expect("reconciled");
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_to_string(rotated(&path, 1)).ok(),
            Some("x".repeat(200))
        );
        assert_eq!(
            std::fs::read_to_string(rotated(&path, 2)).ok(),
            Some("older\n".into())
        );
        sink.reconcile(&[], &store).await.expect("reconciled");
        assert!(!rotated(&path, 3).exists(), "nothing more to rotate");
    }

    #[test]
    fn event_ids_are_read_from_idempotency_keys_and_lines() {
        assert_eq!(event_id("k8s:prod:uid-1:7/feed/0"), "k8s:prod:uid-1:7");
        assert_eq!(
            event_id("pg:shop:0/16B3A40:1/feed/0"),
            "pg:shop:0/16B3A40:1"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.ndjson");
        std::fs::write(
            &path,
            "{\"event\":{\"id\":\"a\"}}\n{\"metadata\":{\"uid\":\"b\"}}\nnot json\n",
        )
        .expect("write");
        let ids = event_ids(&path).expect("read");
        assert_eq!(ids, HashSet::from(["a".to_owned(), "b".to_owned()]));
        assert!(event_ids(&dir.path().join("missing"))
            .expect("none")
            .is_empty());
    }

    #[test]
    fn rotation_shifts_old_files_and_keeps_a_bounded_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("feed.ndjson");
        for generation in 0..4 {
            std::fs::write(&path, format!("{generation}\n")).expect("write");
            rotate(&path, 2).expect("rotate");
        }
        let read = |n| std::fs::read_to_string(rotated(&path, n)).unwrap_or_default();
        assert_eq!((read(1), read(2)), ("3\n".to_owned(), "2\n".to_owned()));
        assert!(!rotated(&path, 3).exists(), "only `keep` old files");
    }
}
