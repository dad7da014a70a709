//! The index runs' chunks, a file per run beside the store, not in sled.
//!
//! A run is written once and deleted whole when a merge replaces it, so a file
//! of its own fits it: sled rewrote a tree node of chunks every few changes, and
//! every key went through it twice (its batch's run, then the merged one). A
//! file holds the run's chunks one after another, then where each ends (`u32`
//! each, big-endian) and how many there are (`u32`). It is durable before the
//! write that lists its run; a file whose run the committed store does not list
//! (replaced, pruned, or left by a crash) is deleted by the next seal
//! ([`RunFiles::sweep`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::pages::{io, numbered_files};
use super::runs::Chunks;
use crate::runtime::{Store, StoreError};

/// The directory, in the store's, of the run files.
pub const DIR: &str = "audit-runs";
/// Open run files a reader keeps.
const OPEN_FILES: usize = 256;

/// The run files of a store, with the ones read so far kept open.
pub struct RunFiles {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<RunFile>>>,
}

/// An open run file and where its chunks end.
struct RunFile {
    file: File,
    ends: Vec<u32>,
}

impl RunFiles {
    /// The run files of `store`.
    pub fn of(store: &Store) -> Self {
        Self::in_dir(store.dir())
    }

    /// The run files of the store in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.join(DIR),
            open: Mutex::default(),
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.run"))
    }

    /// Deletes the files of runs `keep` says no to; returns how many went.
    pub fn sweep(&self, keep: impl Fn(u64) -> bool) -> Result<usize, StoreError> {
        let mut removed = 0;
        for id in self.ids()? {
            if !keep(id) {
                std::fs::remove_file(self.path(id)).map_err(io)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The ids of the runs there are files of.
    pub fn ids(&self) -> Result<Vec<u64>, StoreError> {
        numbered_files(&self.dir, ".run", |n| u64::from_str_radix(n, 16).ok())
    }

    /// Bytes the run files take.
    pub fn bytes_on_disk(&self) -> Result<u64, StoreError> {
        let mut bytes = 0;
        for id in self.ids()? {
            bytes += std::fs::metadata(self.path(id)).map_err(io)?.len();
        }
        Ok(bytes)
    }

    /// Closes the open files of runs `listed` says no to (their files may be
    /// deleted: an open one would keep its space taken).
    pub fn close_unless(&self, listed: impl Fn(u64) -> bool) {
        (self.open.lock().expect("not poisoned")).retain(|id, _| listed(*id));
    }

    /// Run `id`'s file, opened once; `None` when there is none or it does not
    /// parse (an altered store).
    fn opened(&self, id: u64) -> Result<Option<Arc<RunFile>>, StoreError> {
        let mut open = self.open.lock().expect("not poisoned");
        if let Some(file) = open.get(&id) {
            return Ok(Some(file.clone()));
        }
        let file = match File::open(self.path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let Some(ends) = read_ends(&file)? else {
            return Ok(None);
        };
        if open.len() >= OPEN_FILES {
            open.clear();
        }
        let file = Arc::new(RunFile { file, ends });
        open.insert(id, file.clone());
        Ok(Some(file))
    }
}

/// Where a run file's chunks end, from its tail; `None` when it does not parse.
fn read_ends(file: &File) -> Result<Option<Vec<u32>>, StoreError> {
    let length = file.metadata().map_err(io)?.len();
    let mut count = [0; 4];
    if length < 4 || file.read_exact_at(&mut count, length - 4).is_err() {
        return Ok(None);
    }
    let count = u64::from(u32::from_be_bytes(count));
    let Some(table) = length.checked_sub(4 + 4 * count) else {
        return Ok(None);
    };
    let mut bytes = vec![0; 4 * count as usize];
    file.read_exact_at(&mut bytes, table).map_err(io)?;
    let ends: Vec<u32> = (bytes.chunks_exact(4))
        .map(|end| u32::from_be_bytes(end.try_into().expect("4 bytes")))
        .collect();
    let ordered = ends.windows(2).all(|w| w[0] <= w[1]);
    let within = ends.last().is_none_or(|&end| u64::from(end) <= table);
    Ok((ordered && within).then_some(ends))
}

impl Chunks for RunFiles {
    fn put_run(&self, id: u64, chunks: &[Vec<u8>]) -> Result<(), StoreError> {
        let total: usize = chunks.iter().map(Vec::len).sum();
        let mut bytes = Vec::with_capacity(total + 4 * chunks.len() + 4);
        let mut ends = Vec::with_capacity(4 * chunks.len() + 4);
        for chunk in chunks {
            bytes.extend_from_slice(chunk);
            ends.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        }
        bytes.extend_from_slice(&ends);
        bytes.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut file = (OpenOptions::new().create(true).write(true).truncate(true))
            .open(self.path(id))
            .map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_data().map_err(io)?;
        // The new file's name must be as durable as the write listing its run.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.open.lock().expect("not poisoned").remove(&id);
        Ok(())
    }

    fn chunk(&self, id: u64, n: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(run) = self.opened(id)? else {
            return Ok(None);
        };
        let n = n as usize;
        let Some(&end) = run.ends.get(n) else {
            return Ok(None);
        };
        let start = if n == 0 { 0 } else { run.ends[n - 1] };
        let mut chunk = vec![0; (end - start) as usize];
        run.file
            .read_exact_at(&mut chunk, u64::from(start))
            .map_err(io)?;
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_file_reads_back_chunk_by_chunk_and_unlisted_ones_are_swept() -> Result<(), StoreError>
    {
        let dir = tempfile::tempdir().expect("a directory");
        let files = RunFiles::in_dir(dir.path());
        let chunks = [b"first".to_vec(), Vec::new(), b"third chunk".to_vec()];
        files.put_run(7, &chunks)?;
        files.put_run(9, &chunks[..1])?;
        for (n, chunk) in chunks.iter().enumerate() {
            assert_eq!(files.chunk(7, n as u32)?.as_ref(), Some(chunk));
        }
        assert_eq!(files.chunk(7, 3)?, None, "past the last chunk");
        assert_eq!(files.chunk(8, 0)?, None, "no such run");

        files.put_run(7, &chunks[2..])?;
        assert_eq!(
            files.chunk(7, 0)?,
            Some(b"third chunk".to_vec()),
            "rewritten"
        );

        assert_eq!(files.sweep(|id| id == 9)?, 1);
        let mut ids = files.ids()?;
        ids.sort();
        assert_eq!(ids, [9]);
        assert_eq!(RunFiles::in_dir(dir.path()).chunk(7, 0)?, None, "swept");
        Ok(())
    }

    #[test]
    fn files_of_runs_no_longer_listed_are_closed() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("a directory");
        let files = RunFiles::in_dir(dir.path());
        for id in [1, 2] {
            files.put_run(id, &[b"chunk".to_vec()])?;
            files.chunk(id, 0)?;
        }
        let open = |files: &RunFiles| {
            let mut ids: Vec<u64> = files
                .open
                .lock()
                .expect("not poisoned")
                .keys()
                .copied()
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(open(&files), [1, 2], "kept open once read");
        files.close_unless(|id| id == 2);
        assert_eq!(open(&files), [2]);
        Ok(())
    }

    #[test]
    fn a_cut_run_file_reads_as_missing() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().expect("a directory");
        let files = RunFiles::in_dir(dir.path());
        files.put_run(1, &[b"chunk".to_vec()])?;
        let path = files.path(1);
        let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
        file.set_len(3).map_err(io)?;
        assert_eq!(RunFiles::in_dir(dir.path()).chunk(1, 0)?, None);
        Ok(())
    }
}
