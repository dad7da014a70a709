//! Opening the sled databases the services keep their state in.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long opening waits for the database's lock.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Between two attempts.
const LOCK_POLL: Duration = Duration::from_millis(10);

/// Opens (or creates) the sled database in `dir`, waiting up to two seconds for
/// its lock: sled 0.34 releases the lock of a database dropped in this process
/// only when its flusher thread ends, a moment later (spacejam/sled#1234), so an
/// immediate reopen can find it still held. A lock held longer (another process
/// has the database open) fails with sled's error, which names the file.
pub fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    open_waiting(dir, LOCK_WAIT)
}

fn open_waiting(dir: &Path, wait: Duration) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + wait;
    loop {
        match sled::open(dir) {
            Err(error) if is_locked(&error) && Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL);
            }
            opened => return opened,
        }
    }
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
}
