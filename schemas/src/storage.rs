//! Opening the sled databases the services keep their state in.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long opening waits for the database's lock.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Between two attempts.
const LOCK_POLL: Duration = Duration::from_millis(10);
/// sled's log segment for a new database. sled writes an item larger than a
/// quarter of a segment to a file of its own, and an item is a whole tree node
/// (up to 16 values) each time sled consolidates one: with its default of 512
/// KiB, nodes of the audit's 8-24 kB pages and chunks went to a new file
/// again and again. With 8 MiB they stay in the log (6% more audit events/s
/// per CPU second in the benchmark, see docs/benchmarks.md).
const SEGMENT_SIZE: usize = 8 << 20;
/// The file in which sled records a database's segment size (among others).
const SLED_CONFIG_FILE: &str = "conf";

/// Opens (or creates) the sled database in `dir`, waiting up to two seconds for
/// its lock: sled 0.34 releases the lock of a database dropped in this process
/// only when its flusher thread ends, a moment later (spacejam/sled#1234), so an
/// immediate reopen can find it still held. A lock held longer (another process
/// has the database open) fails with sled's error, which names the file.
///
/// A new database gets [`SEGMENT_SIZE`]; an existing one keeps the segment
/// size it was created with (sled refuses to open it with another).
pub fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    open_waiting(dir, LOCK_WAIT)
}

fn open_waiting(dir: &Path, wait: Duration) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + wait;
    let config = sled::Config::new()
        .path(dir)
        .segment_size(recorded_segment_size(dir).unwrap_or(SEGMENT_SIZE));
    loop {
        match config.open() {
            Err(error) if is_locked(&error) && Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL);
            }
            opened => return opened,
        }
    }
}

/// The segment size sled recorded for the database in `dir`, if it has one
/// (a line `segment_size: N` of its configuration file).
fn recorded_segment_size(dir: &Path) -> Option<usize> {
    let recorded = std::fs::read(dir.join(SLED_CONFIG_FILE)).ok()?;
    String::from_utf8_lossy(&recorded)
        .lines()
        .find_map(|line| line.strip_prefix("segment_size: ")?.trim().parse().ok())
}

/// sled reports a held lock as an I/O error of kind `Other` with this message.
fn is_locked(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_released_meanwhile_is_waited_for_and_one_held_on_is_reported() {
        let dir = tempfile::tempdir().expect("a directory");
        let held = open_sled(dir.path()).expect("opens");
        let error =
            open_waiting(dir.path(), Duration::from_millis(50)).expect_err("the lock is held");
        assert!(is_locked(&error), "{error}");
        let (opened, waiting) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        let opener = std::thread::spawn(move || {
            opened.send(()).expect("the test waits");
            open_sled(&path).map(|_| ())
        });
        waiting.recv().expect("the opener started");
        drop(held);
        opener
            .join()
            .expect("no panic")
            .expect("opened once released");
    }

    #[test]
    fn a_new_database_gets_large_segments_and_an_old_one_keeps_its_own() {
        let new = tempfile::tempdir().expect("a directory");
        drop(open_sled(new.path()).expect("opens"));
        assert_eq!(recorded_segment_size(new.path()), Some(SEGMENT_SIZE));

        let old = tempfile::tempdir().expect("a directory");
        let default_size = sled::Config::new().segment_size;
        assert_ne!(default_size, SEGMENT_SIZE);
        let db = sled::Config::new().path(old.path()).open().expect("opens");
        db.insert(b"kept", b"value").expect("written");
        db.flush().expect("flushed");
        drop(db);
        let reopened = open_sled(old.path()).expect("reopens with its own segment size");
        assert_eq!(
            reopened.get(b"kept").expect("read").as_deref(),
            Some(&b"value"[..])
        );
        assert_eq!(recorded_segment_size(old.path()), Some(default_size));
    }
}
