//! Index merges next to the batches' writes, off their path. A merge of sixteen
//! batches' runs took some 60 ms inside one batch's write, and writing the merged
//! run as much again; the worker waited for that write at every sixteenth batch
//! (0.8 s of a million events' 6 s).
//!
//! Now a seal reserves a run id for the next merge due (in its batch's write,
//! under [`MERGING`]) and starts it on a thread of its own over runs already
//! committed. Once that batch is committed, the next seal lets the thread write
//! the merged run's chunks under the id (so no chunk is written under an id a
//! crash could hand out again). A later seal puts the run in place of the runs it
//! replaces, in its batch's atomic write. A merge that fails or whose runs were
//! pruned meanwhile, or the leftovers of one a crash cut short, are dropped by
//! id, and the merge is done again. After start, and after a seal or a prune
//! changed the run list, the next seal first deletes the run files the
//! committed store no longer lists (replaced, pruned, or left by a crash).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::bytes::read_u64;
use super::log::State;
use super::run_files::RunFiles;
use super::runs::{
    drop_run_keys, due_merge, install, merge, merged_run, MergedRun, Run, Runs, MERGING,
};
use super::AuditError;
use crate::runtime::{StateChanges, Store};

/// The merge under way, if any (one at a time), and whether run files may be
/// left to delete.
pub struct Merger {
    running: Mutex<Option<Running>>,
    /// Set at start and whenever the run list changes; the next seal, which sees
    /// that change committed, deletes what is no longer listed.
    sweep_due: AtomicBool,
}

impl Default for Merger {
    fn default() -> Self {
        Self {
            running: Mutex::default(),
            sweep_due: AtomicBool::new(true),
        }
    }
}

/// A merge on its thread.
struct Running {
    /// The id reserved for the merged run.
    id: u64,
    /// Lets the thread write the run's chunks (dropped: it gives up).
    release: Option<Sender<()>>,
    /// The merged run; `None` when the merge was abandoned unreleased.
    thread: JoinHandle<Result<Option<MergedRun>, AuditError>>,
}

impl Merger {
    /// In a seal, before the batch's own run is added to `runs` (the committed
    /// list): releases the merge started by the last seal, puts a finished merge
    /// in place, or else starts the next one due.
    pub fn step(
        &self,
        committed: &Store,
        context: &mut impl State,
        runs: &mut Runs,
        pruned: u64,
    ) -> Result<(), AuditError> {
        if self.sweep_due.swap(false, Ordering::Relaxed) {
            sweep(committed)?;
        }
        let mut running = self.running.lock().expect("not poisoned");
        if let Some(release) = running.as_mut().and_then(|r| r.release.take()) {
            // The batch that reserved its id is committed now.
            let _ = release.send(());
            return Ok(());
        }
        if let Some(done) = running.take_if(|r| r.thread.is_finished()) {
            let installed = match done.thread.join() {
                Ok(Ok(Some(merged))) => install(context, runs, merged),
                Ok(Ok(None)) => false,
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "an index merge failed; it is done again");
                    false
                }
                Err(_) => {
                    tracing::warn!("an index merge panicked; it is done again");
                    false
                }
            };
            self.forget(context, done.id, installed);
            return Ok(());
        }
        if running.is_some() {
            return Ok(());
        }
        if let Some(id) = context.get(MERGING)? {
            // Left by a crash or a stop: the merge is done again.
            self.forget(context, read_u64(Some(&id)), false);
            return Ok(());
        }
        if let Some(window) = due_merge(runs).map(<[Run]>::to_vec) {
            // An id spawning failed for stays unused: ids need only be unique.
            let id = runs.reserve_id();
            match start(committed.clone(), id, window, pruned) {
                Ok(merge) => {
                    context.put(MERGING.to_vec(), id.to_be_bytes().to_vec());
                    *running = Some(merge);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "could not start an index merge; it is tried again");
                }
            }
        }
        Ok(())
    }

    /// Has the next seal delete the files of runs a prune dropped.
    pub fn runs_pruned(&self) {
        self.sweep_due.store(true, Ordering::Relaxed);
    }

    /// Clears the reservation of merge `id`, dropping its run's keys unless it
    /// was put in place; either way some run's file is no longer listed.
    fn forget(&self, context: &mut impl State, id: u64, installed: bool) {
        if !installed {
            drop_run_keys(context, id);
        }
        context.remove(MERGING.to_vec());
        self.sweep_due.store(true, Ordering::Relaxed);
    }
}

/// Deletes the files of runs the committed store neither lists nor has a merge
/// under way for: their removal is committed, so no later read needs them.
fn sweep(committed: &Store) -> Result<(), AuditError> {
    let runs = Runs::load(&|key: &[u8]| committed.get(key))?;
    let merging = committed.get(MERGING)?.map(|id| read_u64(Some(&id)));
    let listed = |id: u64| Some(id) == merging || runs.runs.iter().any(|r| r.id == id);
    let removed = RunFiles::of(committed).sweep(listed)?;
    if removed > 0 {
        tracing::debug!(removed, "deleted the files of runs no longer listed");
    }
    Ok(())
}

/// Merges `window` on a thread of its own; once released, writes the merged run
/// as run `id` (its file durable at once, its fence with the next batch's
/// flush).
fn start(store: Store, id: u64, window: Vec<Run>, pruned: u64) -> std::io::Result<Running> {
    let (release, released) = channel();
    let thread = std::thread::Builder::new()
        .name("audit-merge".into())
        .spawn(move || {
            let files = RunFiles::of(&store);
            let encoded = merge(&|key: &[u8]| store.get(key), &files, &window, pruned)?;
            if released.recv().is_err() {
                return Ok(None);
            }
            let mut changes = StateChanges::default();
            let merged = merged_run(&files, id, &window, encoded, |key, value| {
                changes.put(key, value);
            })?;
            store.apply_lazily(changes)?;
            Ok(Some(merged))
        })?;
    Ok(Running {
        id,
        release: Some(release),
        thread,
    })
}

impl Drop for Merger {
    /// Stops the merge under way (unreleased, it gives up) and waits for it: it
    /// holds the store open.
    fn drop(&mut self) {
        if let Ok(Some(running)) = self.running.get_mut().map(Option::take) {
            drop(running.release);
            let _ = running.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::super::runs::{add_run, drop_pruned, save, Merged, FANOUT};
    use super::*;
    use crate::runtime::StoreError;

    /// A batch's changes over the committed store, as a seal sees them.
    struct Batch<'s> {
        store: &'s Store,
        changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    }

    impl<'s> Batch<'s> {
        fn new(store: &'s Store) -> Self {
            let changes = BTreeMap::new();
            Self { store, changes }
        }

        fn commit(self) {
            for (key, value) in self.changes {
                self.store
                    .put_state(&key, value.as_deref())
                    .expect("commits");
            }
        }
    }

    impl State for Batch<'_> {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            match self.changes.get(key) {
                Some(value) => Ok(value.clone()),
                None => self.store.get(key),
            }
        }

        fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
            self.changes.insert(key, Some(value));
        }

        fn remove(&mut self, key: Vec<u8>) {
            self.changes.insert(key, None);
        }
    }

    /// Commits [`FANOUT`] runs of 100 keys (one tier); their keys in order.
    fn committed_runs(store: &Store) -> Vec<Vec<u8>> {
        commit_runs(store, FANOUT as u64)
    }

    /// Commits `count` runs of 100 keys; their keys in order.
    fn commit_runs(store: &Store, count: u64) -> Vec<Vec<u8>> {
        let (mut batch, mut runs, mut all) = (Batch::new(store), Runs::default(), Vec::new());
        for n in 0..count {
            let span = (n * 100, n * 100 + 100);
            let keys: Vec<Vec<u8>> = (span.0..span.1)
                .map(|i| [&b"t\0"[..], &i.to_be_bytes(), &i.to_be_bytes()].concat())
                .collect();
            let files = RunFiles::of(store);
            add_run(
                &mut batch,
                &files,
                &mut runs,
                keys.iter().map(Vec::as_slice),
                span,
            )
            .expect("adds");
            all.extend(keys);
        }
        save(&mut batch, &runs);
        batch.commit();
        all
    }

    /// One seal's step of `merger`, committed; the runs after it.
    fn seal(merger: &Merger, store: &Store) -> Runs {
        let mut batch = Batch::new(store);
        let mut runs = Runs::load(&|k: &[u8]| batch.get(k)).expect("runs");
        merger.step(store, &mut batch, &mut runs, 0).expect("steps");
        save(&mut batch, &runs);
        batch.commit();
        runs
    }

    /// The ids of the runs there are files of.
    fn chunk_owners(store: &Store) -> Vec<u64> {
        let mut owners = RunFiles::of(store).ids().expect("lists");
        owners.sort();
        owners
    }

    #[test]
    fn a_merge_runs_on_its_own_thread_and_a_later_seal_puts_it_in_place() {
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("opens");
        let all = committed_runs(&store);
        let merger = Merger::default();
        assert_eq!(
            seal(&merger, &store).runs.len(),
            FANOUT,
            "started, not done"
        );
        assert!(
            store.get(MERGING).expect("reads").is_some(),
            "its id is reserved"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let runs = loop {
            let runs = seal(&merger, &store);
            if runs.runs.len() < FANOUT {
                break runs;
            }
            assert!(Instant::now() < deadline, "the merge never came in");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(runs.runs.len(), 1, "one run in place of the sixteen");
        assert_eq!(store.get(MERGING).expect("reads"), None);
        seal(&merger, &store);
        assert_eq!(
            chunk_owners(&store),
            vec![runs.runs[0].id],
            "the merged runs' files are gone once that is committed"
        );
        let (get, files) = (|k: &[u8]| store.get(k), RunFiles::of(&store));
        let walked: Vec<Vec<u8>> = Merged::new(&get, &files, &runs.runs, (b"", &[0xff]), false)
            .collect::<Result<_, _>>()
            .expect("walks");
        assert_eq!(walked, all);
    }

    #[test]
    fn a_merge_cut_short_by_a_crash_leaves_nothing_once_restarted() {
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("opens");
        committed_runs(&store);
        let before = chunk_owners(&store);
        let merger = Merger::default();
        seal(&merger, &store);
        seal(&merger, &store); // released: it writes its chunks
        drop(merger); // waits for the thread, which wrote them: the crash
        let reserved = read_u64(store.get(MERGING).expect("reads").as_deref());
        assert!(
            chunk_owners(&store).contains(&reserved),
            "{reserved}'s chunks were written"
        );

        let restarted = Merger::default();
        let runs = seal(&restarted, &store);
        assert_eq!(runs.runs.len(), FANOUT, "nothing was put in place");
        assert_eq!(store.get(MERGING).expect("reads"), None);
        seal(&restarted, &store);
        assert_eq!(chunk_owners(&store), before, "the leftovers went");
        assert!(
            store.get(MERGING).expect("reads").is_some(),
            "and the merge starts again"
        );
    }

    #[test]
    fn files_of_pruned_runs_go_with_the_seal_after_the_prune_says_so() {
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("opens");
        commit_runs(&store, 2);
        let merger = Merger::default();
        seal(&merger, &store);
        let both = chunk_owners(&store);
        assert_eq!(both.len(), 2);

        let mut batch = Batch::new(&store);
        assert_eq!(drop_pruned(&mut batch, 100).expect("drops"), 1);
        batch.commit();
        seal(&merger, &store);
        assert_eq!(
            chunk_owners(&store),
            both,
            "no sweep while nothing said one is due"
        );
        merger.runs_pruned();
        seal(&merger, &store);
        assert_eq!(
            chunk_owners(&store),
            both[1..],
            "the pruned run's file went"
        );
    }
}
