//! Index merges next to the batches' writes, off their path. A merge of sixteen
//! batches' runs took some 60 ms inside one batch's write, and the worker waited
//! for that write at every sixteenth batch (0.8 s of a million events' 6 s). Now
//! a seal starts a merge of runs already committed on a thread of its own, and a
//! later seal puts the merged run in place of them, in its batch's atomic write.
//! A crash loses only a merge not yet in place: it is done again.

use std::sync::Mutex;
use std::thread::JoinHandle;

use super::log::State;
use super::runs::{due_merge, install, merge, MergedRun, Runs};
use super::AuditError;
use crate::runtime::Store;

/// The merge under way, if any: one at a time.
#[derive(Default)]
pub struct Merger(Mutex<Option<JoinHandle<Result<MergedRun, AuditError>>>>);

impl Merger {
    /// In a seal, before the batch's own run is added to `runs` (the committed
    /// list): puts a finished merge in place, or else starts the next one due.
    /// A merge that failed (its runs were pruned meanwhile, say) is logged and
    /// left to be done again.
    pub fn step(&self, committed: &Store, context: &mut impl State, runs: &mut Runs, pruned: u64) {
        let mut running = self.0.lock().expect("not poisoned");
        if let Some(done) = running.take_if(|merge| merge.is_finished()) {
            match done.join() {
                // Its chunks are not committed yet: the next merge waits a batch.
                Ok(Ok(merged)) => {
                    if !install(context, runs, merged) {
                        tracing::debug!("an index merge's runs were pruned meanwhile");
                    }
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "an index merge failed; it is done again")
                }
                Err(_) => tracing::warn!("an index merge panicked; it is done again"),
            }
        }
        if running.is_some() {
            return;
        }
        let Some(window) = due_merge(runs) else {
            return;
        };
        let (store, window) = (committed.clone(), window.to_vec());
        let spawned = std::thread::Builder::new()
            .name("audit-merge".into())
            .spawn(move || merge(&|key: &[u8]| store.get(key), &window, pruned));
        match spawned {
            Ok(merge) => *running = Some(merge),
            Err(error) => {
                tracing::warn!(error = %error, "could not start an index merge; it is tried again")
            }
        }
    }
}

impl Drop for Merger {
    /// Waits for the merge under way: it holds the store open.
    fn drop(&mut self) {
        let running = self.0.get_mut().map(Option::take);
        if let Ok(Some(merge)) = running {
            let _ = merge.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::log::tests::Memory;
    use super::super::runs::{add_run, save, Merged, CHUNK, FANOUT};
    use super::*;

    /// [`FANOUT`] runs of 100 keys (one tier), committed to `store` and mirrored
    /// in memory; their keys in order.
    fn committed_runs(store: &Store) -> (Memory, Vec<Vec<u8>>) {
        let (mut memory, mut runs, mut all) = (Memory::default(), Runs::default(), Vec::new());
        for batch in 0..FANOUT as u64 {
            let span = (batch * 100, batch * 100 + 100);
            let keys: Vec<Vec<u8>> = (span.0..span.1)
                .map(|i| [&b"t\0"[..], &i.to_be_bytes(), &i.to_be_bytes()].concat())
                .collect();
            add_run(&mut memory, &mut runs, keys.iter().map(Vec::as_slice), span);
            all.extend(keys);
        }
        save(&mut memory, &runs);
        for (key, value) in &memory.0 {
            store.put_state(key, Some(value)).expect("stores");
        }
        (memory, all)
    }

    #[test]
    fn a_due_merge_runs_on_its_own_thread_and_a_later_seal_puts_it_in_place() {
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("opens");
        let (mut memory, all) = committed_runs(&store);
        let merger = Merger::default();
        let mut runs = Runs::load(&|k: &[u8]| memory.get(k)).expect("runs");
        merger.step(&store, &mut memory, &mut runs, 0);
        assert_eq!(runs.runs.len(), FANOUT, "the merge runs meanwhile");
        let deadline = Instant::now() + Duration::from_secs(30);
        while runs.runs.len() == FANOUT {
            assert!(Instant::now() < deadline, "the merge never came in");
            std::thread::sleep(Duration::from_millis(5));
            merger.step(&store, &mut memory, &mut runs, 0);
        }
        assert_eq!(runs.runs.len(), 1, "one run in place of the sixteen");
        save(&mut memory, &runs);
        let chunks = memory.0.keys().filter(|k| k.starts_with(CHUNK)).count();
        assert_eq!(
            chunks as u32, runs.runs[0].chunks,
            "the merged runs' chunks are gone"
        );
        let get = |k: &[u8]| memory.get(k);
        let walked: Vec<Vec<u8>> = Merged::new(&get, &runs.runs, (b"", &[0xff]), false)
            .collect::<Result<_, _>>()
            .expect("walks");
        assert_eq!(walked, all);
    }
}
