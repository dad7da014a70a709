//! The query indexes as sorted runs, as a log-structured merge tree keeps them:
//! each batch writes its events' index keys as one sorted run, in chunks of about
//! [`CHUNK_BYTES`] (keys prefix-compressed). Runs are tiered by size (tier 0
//! below [`TIER_KEYS`] keys, each tier [`FANOUT`] times the one below); the
//! oldest [`FANOUT`] consecutive runs of one tier are merged into one, unless that
//! would write more than [`MAX_MERGE_KEYS`]. The service merges on a thread of
//! its own and puts the merged run in place in a later batch's write
//! ([`super::merger`]). A lookup walks every run at once, merged in key order.
//!
//! Why: sled costs about ten microseconds per write whatever its size, and six
//! index keys per event made the index most of the audit's cost. Runs write a
//! batch's keys in a few chunks; each key is rewritten about once per tier.
//! Tiers go by size, not by count, so a slow stream of one-event batches ends in
//! runs as large as a busy one's.
//!
//! Runs cover consecutive ranges of the log, oldest first. The list of runs is
//! one value ([`RUNS`]); a run's chunks are kept by a [`Chunks`] store (a file
//! per run beside sled in the service, [`super::run_files`]), found by binary
//! search on their first keys, so a lookup reads a few chunks per run. Keys of pruned entries are dropped when their run is merged, and
//! runs wholly below the pruned point are dropped at once.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::bytes::read_u64;
use super::log::{indexed, Get, State};
use super::AuditError;
use crate::runtime::StoreError;

/// Key of the list of runs.
pub const RUNS: &[u8] = b"audit/runs";
/// Key of the id reserved for the merge under way, so a crash's leftovers of it
/// are found and dropped.
pub const MERGING: &[u8] = b"audit/merging";
/// Prefix of run fences: the first key of every [`FENCE_EVERY`]th chunk of a run,
/// so a lookup reads one fence and a few neighbouring chunks, not a binary
/// search's worth of chunks scattered over the run.
pub const FENCE: &[u8] = b"audit/fence/";
/// Chunks between two fence keys.
pub const FENCE_EVERY: u32 = 16;
/// A chunk is closed once it holds this many bytes: 8 kB halved a batch's chunk
/// writes against 4 kB; 16 kB made lookups read more than it saved.
pub const CHUNK_BYTES: usize = 8192;
/// A chunk's buffer: room for its last key past [`CHUNK_BYTES`] without growing.
const CHUNK_ROOM: usize = CHUNK_BYTES + 1024;
/// Runs of one tier merged into one.
pub const FANOUT: usize = 16;
/// Runs below this many keys are of tier 0.
pub const TIER_KEYS: u64 = 8_192;
/// No merge writes more keys than this (bounds a batch's write): larger runs
/// stay as they are.
pub const MAX_MERGE_KEYS: u64 = 2_097_152;

/// Where runs' chunks are kept, written once per run.
pub trait Chunks {
    /// Keeps run `id`'s chunks, durably, in place of any kept under that id.
    fn put_run(&self, id: u64, chunks: &[Vec<u8>]) -> Result<(), StoreError>;
    /// Chunk `n` of run `id`, if it is kept.
    fn chunk(&self, id: u64, n: u32) -> Result<Option<Vec<u8>>, StoreError>;
}

/// One sorted run of index keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Its id (chunk keys start with it).
    pub id: u64,
    /// How many keys it holds.
    pub keys: u64,
    /// How many chunks it has.
    pub chunks: u32,
    /// The first log index it covers.
    pub first: u64,
    /// One past the last log index it covers.
    pub end: u64,
    /// The earliest and latest change time of its keys (ms since the epoch).
    pub times: (u64, u64),
}

const RUN_BYTES: usize = 8 + 8 + 4 + 8 + 8 + 8 + 8;

impl Run {
    /// Its tier: 0 below [`TIER_KEYS`] keys, one more for each [`FANOUT`] times.
    pub fn tier(&self) -> u32 {
        let mut tier = 0;
        let mut bound = TIER_KEYS;
        while self.keys >= bound {
            tier += 1;
            bound = bound.saturating_mul(FANOUT as u64);
        }
        tier
    }
}

/// Every run, oldest first, and the next run's id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs {
    /// The id the next run gets.
    pub next_id: u64,
    /// The runs, oldest first.
    pub runs: Vec<Run>,
}

impl Runs {
    /// Reads the stored list (empty when none is stored).
    pub fn load(get: &Get<'_>) -> Result<Self, AuditError> {
        match get(RUNS)? {
            None => Ok(Self::default()),
            Some(value) => Self::decode(&value).ok_or(AuditError::Corrupt("the index run list")),
        }
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let (next_id, rest) = value.split_first_chunk::<8>()?;
        if rest.len() % RUN_BYTES != 0 {
            return None;
        }
        let runs = rest
            .chunks_exact(RUN_BYTES)
            .map(|run| Run {
                id: read_u64(run.get(0..8)),
                keys: read_u64(run.get(8..16)),
                chunks: u32::from_be_bytes(run[16..20].try_into().expect("4 bytes")),
                first: read_u64(run.get(20..28)),
                end: read_u64(run.get(28..36)),
                times: (read_u64(run.get(36..44)), read_u64(run.get(44..52))),
            })
            .collect();
        Some(Self {
            next_id: u64::from_be_bytes(*next_id),
            runs,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut value = self.next_id.to_be_bytes().to_vec();
        for run in &self.runs {
            value.extend_from_slice(&run.id.to_be_bytes());
            value.extend_from_slice(&run.keys.to_be_bytes());
            value.extend_from_slice(&run.chunks.to_be_bytes());
            value.extend_from_slice(&run.first.to_be_bytes());
            value.extend_from_slice(&run.end.to_be_bytes());
            value.extend_from_slice(&run.times.0.to_be_bytes());
            value.extend_from_slice(&run.times.1.to_be_bytes());
        }
        value
    }

    /// Takes the next run id.
    pub fn reserve_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// The runs that may hold keys changed in `from..to` (ms since the epoch).
    pub fn overlapping(&self, from: u64, to: u64) -> Vec<Run> {
        (self.runs.iter())
            .filter(|run| run.times.1 >= from && run.times.0 < to)
            .copied()
            .collect()
    }
}

/// The key of run `run`'s fence.
pub fn fence_key(run: u64) -> Vec<u8> {
    [FENCE, &run.to_be_bytes()[..]].concat()
}

/// Adds a run of `keys` (sorted, log range `first..end`) to `runs`: its chunks
/// to `chunks`, its fence in the batch's write ([`save`] writes the list).
pub fn add_run<'k>(
    context: &mut impl State,
    chunks: &dyn Chunks,
    runs: &mut Runs,
    keys: impl IntoIterator<Item = &'k [u8]>,
    span: (u64, u64),
) -> Result<(), StoreError> {
    let id = runs.reserve_id();
    let run = write_run(chunks, id, encode_chunks(keys), span, |key, value| {
        context.put(key, value);
    })?;
    runs.runs.push(run);
    Ok(())
}

/// Writes the list of runs.
pub fn save(context: &mut impl State, runs: &Runs) {
    context.put(RUNS.to_vec(), runs.encode());
}

/// The oldest [`FANOUT`] consecutive runs of one tier that together hold no
/// more than [`MAX_MERGE_KEYS`], if any: the next merge. Oldest, because runs
/// join a tier while a merge runs: those left over are then the newest ones,
/// next to the runs still to come, not stranded before the merged run.
pub fn due_merge(runs: &Runs) -> Option<&[Run]> {
    let last = runs.runs.len().checked_sub(FANOUT)?;
    (0..=last)
        .map(|at| &runs.runs[at..at + FANOUT])
        .find(|window| {
            let tier = window[0].tier();
            window.iter().all(|r| r.tier() == tier)
                && window.iter().map(|r| r.keys).sum::<u64>() <= MAX_MERGE_KEYS
        })
}

/// Consecutive runs merged into one whose chunks are written, not yet in place
/// of them.
#[derive(Debug)]
pub struct MergedRun {
    /// The ids of the runs it replaces, oldest first.
    replaces: Vec<u64>,
    /// The merged run.
    run: Run,
}

/// The keys of `window` (consecutive runs), read through `get` and `chunks`,
/// merged into one sorted run without those of entries below `pruned`.
pub fn merge(
    get: &Get<'_>,
    chunks: &dyn Chunks,
    window: &[Run],
    pruned: u64,
) -> Result<Encoded, AuditError> {
    let mut writer = ChunkWriter::default();
    Merged::new(get, chunks, window, (b"", &[0xff; 1]), false).for_each_key(|key| {
        if indexed(key) >= pruned {
            writer.push(key);
        }
        Ok(())
    })?;
    Ok(writer.finish())
}

/// The merge of `window` as run `id`: its chunks kept by `chunks`, its fence
/// handed to `put`.
pub fn merged_run(
    chunks: &dyn Chunks,
    id: u64,
    window: &[Run],
    encoded: Encoded,
    put: impl FnMut(Vec<u8>, Vec<u8>),
) -> Result<MergedRun, StoreError> {
    let (first, last) = (window.first(), window.last());
    let span = (first.map_or(0, |r| r.first), last.map_or(0, |r| r.end));
    Ok(MergedRun {
        replaces: window.iter().map(|r| r.id).collect(),
        run: write_run(chunks, id, encoded, span, put)?,
    })
}

/// Puts `merged` in place of the runs it replaces, in the batch's write, if they
/// are all still there (pruning may have dropped some meanwhile); whether it did.
pub fn install(context: &mut impl State, runs: &mut Runs, merged: MergedRun) -> bool {
    let Some(at) = (runs.runs.iter()).position(|r| Some(&r.id) == merged.replaces.first()) else {
        return false;
    };
    let count = merged.replaces.len();
    let ids = runs
        .runs
        .get(at..at + count)
        .map(|w| w.iter().map(|r| r.id));
    if !ids.is_some_and(|ids| ids.eq(merged.replaces.iter().copied())) {
        return false;
    }
    let replaced: Vec<Run> = runs.runs.drain(at..at + count).collect();
    drop_runs(context, &replaced);
    runs.runs.insert(at, merged.run);
    true
}

/// Removes the fence of run `id`, a merge not put in place (its file goes with
/// the next sweep, once no committed list names it).
pub fn drop_run_keys(context: &mut impl State, id: u64) {
    context.remove(fence_key(id));
}

/// Drops the runs that cover only entries below `pruned`; returns how many went.
pub fn drop_pruned(context: &mut impl State, pruned: u64) -> Result<usize, AuditError> {
    let mut runs = Runs::load(&|key: &[u8]| context.get(key))?;
    let (gone, kept): (Vec<Run>, Vec<Run>) = runs.runs.iter().partition(|r| r.end <= pruned);
    if !gone.is_empty() {
        drop_runs(context, &gone);
        runs.runs = kept;
        context.put(RUNS.to_vec(), runs.encode());
    }
    Ok(gone.len())
}

/// Run `id` of `encoded` keys covering `first..end`: its chunks kept by
/// `chunks`, its fence handed to `put`.
fn write_run(
    chunks: &dyn Chunks,
    id: u64,
    encoded: Encoded,
    (first, end): (u64, u64),
    mut put: impl FnMut(Vec<u8>, Vec<u8>),
) -> Result<Run, StoreError> {
    let count = encoded.chunks.len() as u32;
    let fence =
        (encoded.chunks.iter().step_by(FENCE_EVERY as usize)).filter_map(|chunk| first_key(chunk));
    put(fence_key(id), encode_fence(fence));
    chunks.put_run(id, &encoded.chunks)?;
    Ok(Run {
        id,
        keys: encoded.keys,
        chunks: count,
        first,
        end,
        times: encoded.times,
    })
}

/// Removes the fences of `runs` (their files go with the next sweep).
fn drop_runs(context: &mut impl State, runs: &[Run]) {
    for run in runs {
        context.remove(fence_key(run.id));
    }
}

/// Keys in the chunk format, unshared (a fence).
fn encode_fence<'k>(keys: impl Iterator<Item = &'k [u8]>) -> Vec<u8> {
    let mut fence = Vec::new();
    for key in keys {
        put_varint(&mut fence, 0);
        put_varint(&mut fence, key.len());
        fence.extend_from_slice(key);
    }
    fence
}

/// Sorted keys as chunks: each key is its length shared with the one before,
/// the length of the rest, and the rest (lengths as LEB128).
pub fn encode_chunks<'k>(keys: impl IntoIterator<Item = &'k [u8]>) -> Encoded {
    let mut writer = ChunkWriter::default();
    for key in keys {
        writer.push(key);
    }
    writer.finish()
}

/// Keys as chunks, and the span of their change times.
#[derive(Debug)]
pub struct Encoded {
    /// The chunks, in key order.
    pub chunks: Vec<Vec<u8>>,
    /// The earliest and latest change time of the keys.
    pub times: (u64, u64),
    /// How many keys there are.
    pub keys: u64,
}

struct ChunkWriter {
    chunks: Vec<Vec<u8>>,
    chunk: Vec<u8>,
    previous: Vec<u8>,
    times: (u64, u64),
    keys: u64,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            chunk: Vec::with_capacity(CHUNK_ROOM),
            previous: Vec::new(),
            times: (u64::MAX, 0),
            keys: 0,
        }
    }
}

impl ChunkWriter {
    fn push(&mut self, key: &[u8]) {
        let time = changed_at(key);
        self.times = (self.times.0.min(time), self.times.1.max(time));
        self.keys += 1;
        if self.chunk.len() >= CHUNK_BYTES {
            let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_ROOM));
            self.chunks.push(full);
            self.previous.clear();
        }
        let shared = (self.previous.iter().zip(key))
            .take_while(|(a, b)| a == b)
            .count();
        put_varint(&mut self.chunk, shared);
        put_varint(&mut self.chunk, key.len() - shared);
        self.chunk.extend_from_slice(&key[shared..]);
        self.previous.clear();
        self.previous.extend_from_slice(key);
    }

    fn finish(mut self) -> Encoded {
        if !self.chunk.is_empty() {
            self.chunks.push(self.chunk);
        }
        Encoded {
            chunks: self.chunks,
            times: self.times,
            keys: self.keys,
        }
    }
}

/// The change time in an index key (the 8 bytes before the log index).
fn changed_at(key: &[u8]) -> u64 {
    let end = key.len().saturating_sub(8);
    read_u64(key.get(end.saturating_sub(8)..end))
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= usize::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// The keys of a chunk, decoded into one buffer.
#[derive(Default)]
struct Keys {
    bytes: Vec<u8>,
    /// Where each key is in `bytes`.
    spans: Vec<(usize, usize)>,
}

impl Keys {
    fn decode(&mut self, mut chunk: &[u8]) -> Option<()> {
        self.bytes.clear();
        self.spans.clear();
        let mut previous = (0, 0);
        while !chunk.is_empty() {
            let shared = take_varint(&mut chunk)?;
            let rest = take_varint(&mut chunk)?;
            if shared > previous.1 {
                return None;
            }
            let start = self.bytes.len();
            self.bytes
                .extend_from_within(previous.0..previous.0 + shared);
            self.bytes.extend_from_slice(chunk.get(..rest)?);
            chunk = &chunk[rest..];
            previous = (start, shared + rest);
            self.spans.push(previous);
        }
        Some(())
    }

    fn key(&self, n: usize) -> &[u8] {
        let (start, length) = self.spans[n];
        &self.bytes[start..start + length]
    }
}

/// The first key of a chunk (stored whole).
fn first_key(mut chunk: &[u8]) -> Option<&[u8]> {
    let shared = take_varint(&mut chunk)?;
    let length = take_varint(&mut chunk)?;
    (shared == 0).then(|| chunk.get(..length)).flatten()
}

/// The keys of one run between two bounds, in either direction, a chunk at a time.
struct RunCursor<'a> {
    get: &'a Get<'a>,
    chunks: &'a dyn Chunks,
    run: Run,
    start: Vec<u8>,
    end: Vec<u8>,
    reverse: bool,
    /// The next chunk to read, if any.
    next: Option<u32>,
    /// The chunk being walked, and which of its keys are left, in walk order.
    keys: Keys,
    left: std::vec::IntoIter<usize>,
}

impl<'a> RunCursor<'a> {
    fn new(
        (get, chunks): (&'a Get<'a>, &'a dyn Chunks),
        run: Run,
        (start, end): (&[u8], &[u8]),
        reverse: bool,
    ) -> Self {
        Self {
            get,
            chunks,
            run,
            start: start.to_vec(),
            end: end.to_vec(),
            reverse,
            next: None,
            keys: Keys::default(),
            left: Vec::new().into_iter(),
        }
    }

    fn chunk(&self, n: u32) -> Result<Vec<u8>, AuditError> {
        (self.chunks.chunk(self.run.id, n)?).ok_or(AuditError::Corrupt("an index chunk"))
    }

    /// Whether a chunk starting with `first` comes before where the walk starts.
    fn before(&self, first: &[u8]) -> bool {
        if self.reverse {
            first < self.end.as_slice()
        } else {
            first <= self.start.as_slice()
        }
    }

    /// The chunks the first one to read is among, from the run's fence.
    fn fenced(&self) -> Result<(u32, u32), AuditError> {
        let corrupt = || AuditError::Corrupt("an index fence");
        let fence = (self.get)(&fence_key(self.run.id))?.ok_or_else(corrupt)?;
        let mut keys = Keys::default();
        keys.decode(&fence).ok_or_else(corrupt)?;
        let passed = (0..keys.spans.len())
            .take_while(|&n| self.before(keys.key(n)))
            .count() as u32;
        let low = passed.checked_sub(1).map_or(0, |p| p * FENCE_EVERY + 1);
        Ok((low, (passed * FENCE_EVERY).min(self.run.chunks)))
    }

    /// Finds the first chunk to read: the last whose first key is at most the
    /// bound the walk starts from.
    fn seek(&mut self) -> Result<(), AuditError> {
        let (mut low, mut high) = self.fenced()?;
        while low < high {
            let middle = low + (high - low) / 2;
            let chunk = self.chunk(middle)?;
            let first = first_key(&chunk).ok_or(AuditError::Corrupt("an index chunk"))?;
            if self.before(first) {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        self.next = match (low.checked_sub(1), self.reverse) {
            (Some(n), _) => Some(n),
            (None, false) if self.run.chunks > 0 => Some(0),
            (None, _) => None,
        };
        Ok(())
    }

    /// Reads chunks until one has keys within the bounds, or none is left.
    fn load_next(&mut self) -> Result<(), AuditError> {
        while self.left.len() == 0 {
            let Some(n) = self.next else { return Ok(()) };
            let chunk = self.chunk(n)?;
            self.keys
                .decode(&chunk)
                .ok_or(AuditError::Corrupt("an index chunk"))?;
            let count = self.keys.spans.len();
            let past_bound = match (count, self.reverse) {
                (0, _) => true,
                (_, true) => self.keys.key(0) < self.start.as_slice(),
                (_, false) => self.keys.key(count - 1) >= self.end.as_slice(),
            };
            self.next = match (past_bound, self.reverse) {
                (true, _) => None,
                (false, false) => (n + 1 < self.run.chunks).then_some(n + 1),
                (false, true) => n.checked_sub(1),
            };
            let (start, end) = (self.start.as_slice(), self.end.as_slice());
            let keys = &self.keys;
            // A chunk's keys are sorted: one wholly within the bounds (every
            // chunk of a merge) needs no key compared.
            let within = count > 0 && keys.key(0) >= start && keys.key(count - 1) < end;
            let mut left: Vec<usize> = if within {
                (0..count).collect()
            } else {
                (0..count)
                    .filter(|&k| keys.key(k) >= start && keys.key(k) < end)
                    .collect()
            };
            if self.reverse {
                left.reverse();
            }
            self.left = left.into_iter();
        }
        Ok(())
    }

    /// Moves the next key into `key` (its buffer reused); false when none is left.
    fn pop_into(&mut self, key: &mut Vec<u8>) -> Result<bool, AuditError> {
        self.load_next()?;
        let Some(n) = self.left.next() else {
            return Ok(false);
        };
        key.clear();
        key.extend_from_slice(self.keys.key(n));
        Ok(true)
    }
}

/// The next key of one run, ordered for a max-heap in the walk's direction.
struct Head {
    key: Vec<u8>,
    cursor: usize,
    reverse: bool,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        let order = self.key.cmp(&other.key);
        if self.reverse {
            order
        } else {
            order.reverse()
        }
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Head {}

/// The keys of every run in `start..end`, in order (or reversed), merged.
pub struct Merged<'a> {
    cursors: Vec<RunCursor<'a>>,
    heap: BinaryHeap<Head>,
    started: bool,
    failed: bool,
}

impl<'a> Merged<'a> {
    /// A walk over `runs` (their fences read through `get`, their chunks from
    /// `chunks`) between `bounds` (start included, end not).
    pub fn new(
        get: &'a Get<'a>,
        chunks: &'a dyn Chunks,
        runs: &[Run],
        bounds: (&[u8], &[u8]),
        reverse: bool,
    ) -> Self {
        Self {
            cursors: (runs.iter())
                .map(|run| RunCursor::new((get, chunks), *run, bounds, reverse))
                .collect(),
            heap: BinaryHeap::new(),
            started: false,
            failed: false,
        }
    }

    /// Puts `cursor`'s next key on the heap, in `buffer`.
    fn refill(&mut self, cursor: usize, mut buffer: Vec<u8>) -> Result<(), AuditError> {
        if self.cursors[cursor].pop_into(&mut buffer)? {
            let reverse = self.cursors[cursor].reverse;
            self.heap.push(Head {
                key: buffer,
                cursor,
                reverse,
            });
        }
        Ok(())
    }

    /// Seeks every run and takes its first key, on the first call only.
    fn start_once(&mut self) -> Result<(), AuditError> {
        if std::mem::replace(&mut self.started, true) {
            return Ok(());
        }
        for cursor in 0..self.cursors.len() {
            self.cursors[cursor].seek()?;
            self.refill(cursor, Vec::new())?;
        }
        Ok(())
    }

    /// Hands each key in turn to `visit`, without a copy of its own. Consecutive
    /// batches' keys rarely interleave within one index value, so a run's keys
    /// go on without the heap until another run's next key comes first.
    fn for_each_key(
        &mut self,
        mut visit: impl FnMut(&[u8]) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        self.start_once()?;
        while let Some(mut head) = self.heap.pop() {
            loop {
                visit(&head.key)?;
                if !self.cursors[head.cursor].pop_into(&mut head.key)? {
                    break;
                }
                if self.heap.peek().is_some_and(|next| *next > head) {
                    self.heap.push(head);
                    break;
                }
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Vec<u8>>, AuditError> {
        self.start_once()?;
        let Some(head) = self.heap.pop() else {
            return Ok(None);
        };
        let key = head.key.clone();
        self.refill(head.cursor, head.key)?;
        Ok(Some(key))
    }
}

impl Iterator for Merged<'_> {
    type Item = Result<Vec<u8>, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let step = self.step();
        self.failed = step.is_err();
        step.transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeSet, HashMap};

    use super::super::log::tests::Memory;
    use super::super::log::State;
    use super::*;

    /// The keys of a chunk; `None` when it does not parse.
    fn decode_chunk(chunk: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut keys = Keys::default();
        keys.decode(chunk)?;
        Some(
            (0..keys.spans.len())
                .map(|n| keys.key(n).to_vec())
                .collect(),
        )
    }

    fn key(field: u64, index: u64) -> Vec<u8> {
        let prefix = [b"r", format!("resource-{}", field % 37).as_bytes(), &[0]].concat();
        let ts = 1_000 + (index / 3) as i64;
        [prefix.as_slice(), &ts.to_be_bytes(), &index.to_be_bytes()].concat()
    }

    /// Chunks in memory.
    #[derive(Default)]
    struct MemoryChunks(RefCell<HashMap<u64, Vec<Vec<u8>>>>);

    impl Chunks for MemoryChunks {
        fn put_run(&self, id: u64, chunks: &[Vec<u8>]) -> Result<(), StoreError> {
            self.0.borrow_mut().insert(id, chunks.to_vec());
            Ok(())
        }

        fn chunk(&self, id: u64, n: u32) -> Result<Option<Vec<u8>>, StoreError> {
            let runs = self.0.borrow();
            Ok(runs.get(&id).and_then(|c| c.get(n as usize)).cloned())
        }
    }

    /// A store's state and its runs' chunks, in memory.
    #[derive(Default)]
    struct Stored {
        memory: Memory,
        chunks: MemoryChunks,
    }

    /// `batches` batches of `per_batch` events, five keys each.
    fn filled(batches: u64, per_batch: u64, pruned: u64) -> (Stored, BTreeSet<Vec<u8>>) {
        let (mut stored, mut all) = (Stored::default(), BTreeSet::new());
        for batch in 0..batches {
            let span = (batch * per_batch, (batch + 1) * per_batch);
            let mut keys: Vec<Vec<u8>> = (span.0..span.1)
                .flat_map(|i| (0..5).map(move |f| key(i * 5 + f, i)))
                .collect();
            keys.sort();
            all.extend(keys.iter().cloned());
            let Stored { memory, chunks } = &mut stored;
            let mut runs = Runs::load(&|k: &[u8]| memory.get(k)).expect("runs");
            let keys = keys.iter().map(Vec::as_slice);
            add_run(memory, chunks, &mut runs, keys, span).expect("adds");
            while let Some(window) = due_merge(&runs).map(<[Run]>::to_vec) {
                let merged = merged_in(&mut stored, &mut runs, &window, pruned);
                assert!(install(&mut stored.memory, &mut runs, merged), "in place");
            }
            save(&mut stored.memory, &runs);
        }
        (stored, all)
    }

    /// `window` merged, its run kept in `stored` under a new id.
    fn merged_in(stored: &mut Stored, runs: &mut Runs, window: &[Run], pruned: u64) -> MergedRun {
        let Stored { memory, chunks } = stored;
        let encoded = merge(&|k: &[u8]| memory.get(k), chunks, window, pruned).expect("merges");
        let mut writes = Vec::new();
        let merged = merged_run(chunks, runs.reserve_id(), window, encoded, |k, v| {
            writes.push((k, v))
        })
        .expect("writes");
        for (key, value) in writes {
            memory.put(key, value);
        }
        merged
    }

    fn walk(stored: &Stored, bounds: (&[u8], &[u8]), reverse: bool) -> Vec<Vec<u8>> {
        let get = |k: &[u8]| stored.memory.get(k);
        let runs = Runs::load(&get).expect("runs");
        Merged::new(&get, &stored.chunks, &runs.runs, bounds, reverse)
            .collect::<Result<_, _>>()
            .expect("walks")
    }

    #[test]
    fn runs_merge_in_tiers_and_walks_see_every_key_in_order() {
        // 273 batches of 2,000 keys: tier 0 runs merged into tier 1 (32,000
        // keys), those into tier 2 once sixteen of them are there.
        let (stored, all) = filled(273, 400, 0);
        let get = |k: &[u8]| stored.memory.get(k);
        let runs = Runs::load(&get).expect("runs");
        let tiers: Vec<u32> = runs.runs.iter().map(Run::tier).collect();
        assert!(
            tiers.windows(2).all(|w| w[0] >= w[1]),
            "{tiers:?}: older runs are larger"
        );
        assert!(
            runs.runs.len() < 2 * FANOUT,
            "{tiers:?}: merged as they filled"
        );
        assert_eq!(tiers.first(), Some(&2), "{tiers:?}");
        assert!(
            runs.runs.iter().any(|r| r.chunks > FENCE_EVERY),
            "runs span fences"
        );
        let fences = (stored.memory.0.keys()).filter(|k| k.starts_with(FENCE));
        assert_eq!(fences.count(), runs.runs.len(), "one fence per run");
        let everything = walk(&stored, (b"", &[0xff]), false);
        assert_eq!(everything, all.iter().cloned().collect::<Vec<_>>());
        for field in [0, 5, 36] {
            let prefix = [b"r", format!("resource-{field}").as_bytes(), &[0]].concat();
            let start = [prefix.as_slice(), &1_200i64.to_be_bytes()].concat();
            let end = [prefix.as_slice(), &1_700i64.to_be_bytes()].concat();
            let wanted: Vec<Vec<u8>> = all.range(start.clone()..end.clone()).cloned().collect();
            assert!(!wanted.is_empty());
            assert_eq!(walk(&stored, (&start, &end), false), wanted);
            let overlapping = runs.overlapping(1_200, 1_700);
            assert!(
                overlapping.len() < runs.runs.len(),
                "runs outside the times are skipped"
            );
            let chunks = &stored.chunks;
            let only: Vec<Vec<u8>> = Merged::new(&get, chunks, &overlapping, (&start, &end), false)
                .collect::<Result<_, _>>()
                .expect("walks");
            assert_eq!(only, wanted, "the skipped runs held none of it");
            let mut backwards = wanted.clone();
            backwards.reverse();
            assert_eq!(walk(&stored, (&start, &end), true), backwards);
        }
    }

    #[test]
    fn a_slow_stream_of_small_batches_keeps_few_runs() {
        let (stored, all) = filled(3_000, 1, 0);
        let runs = Runs::load(&|k: &[u8]| stored.memory.get(k)).expect("runs");
        assert!(runs.runs.len() < 2 * FANOUT, "{} runs", runs.runs.len());
        assert_eq!(walk(&stored, (b"", &[0xff]), false).len(), all.len());
    }

    #[test]
    fn pruned_keys_go_when_their_runs_merge_or_wholly_pruned_runs_are_dropped() {
        let (mut stored, all) = filled(2 * FANOUT as u64, 400, 100);
        let left = walk(&stored, (b"", &[0xff]), false);
        let expected: Vec<Vec<u8>> = all.iter().filter(|k| indexed(k) >= 100).cloned().collect();
        assert_eq!(left, expected, "the merges dropped keys below 100");
        let end = 2 * FANOUT as u64 * 400;
        let dropped = drop_pruned(&mut stored.memory, end).expect("drops");
        assert_eq!(dropped, 2, "both merged runs end at or below {end}");
        assert!(walk(&stored, (b"", &[0xff]), false).is_empty());
    }

    /// `count` runs of 10 keys each, none merged.
    fn unmerged(count: u64) -> (Stored, Runs) {
        let (mut stored, mut runs) = (Stored::default(), Runs::default());
        for batch in 0..count {
            let span = (batch * 10, batch * 10 + 10);
            let keys: Vec<Vec<u8>> = (span.0..span.1).map(|i| key(0, i)).collect();
            let Stored { memory, chunks } = &mut stored;
            let keys = keys.iter().map(Vec::as_slice);
            add_run(memory, chunks, &mut runs, keys, span).expect("adds");
        }
        (stored, runs)
    }

    #[test]
    fn a_merge_takes_the_oldest_runs_of_a_tier_so_none_is_stranded() {
        let (mut stored, mut runs) = unmerged(FANOUT as u64 + 2);
        let window = due_merge(&runs).expect("due").to_vec();
        assert_eq!(window, runs.runs[..FANOUT], "the oldest sixteen");
        let merged = merged_in(&mut stored, &mut runs, &window, 0);
        assert!(install(&mut stored.memory, &mut runs, merged));
        assert_eq!(runs.runs.len(), 3, "the two newest wait for more");
        assert_eq!(runs.runs[0].keys, 10 * FANOUT as u64, "merged first");
    }

    #[test]
    fn a_merge_is_not_put_in_place_of_runs_pruned_meanwhile() {
        let (mut stored, mut runs) = unmerged(FANOUT as u64);
        let window = due_merge(&runs).expect("due").to_vec();
        let merged = merged_in(&mut stored, &mut runs, &window, 0);
        runs.runs.remove(0);
        assert!(!install(&mut stored.memory, &mut runs, merged));
        assert_eq!(runs.runs, window[1..], "left as they were");
    }

    #[test]
    fn chunks_round_trip_long_and_shared_keys() {
        let keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![1; 300],
            vec![1; 301],
            [vec![1; 300], vec![2]].concat(),
        ];
        let encoded = encode_chunks(keys.iter().map(Vec::as_slice));
        assert_eq!(encoded.chunks.len(), 1);
        assert_eq!(decode_chunk(&encoded.chunks[0]), Some(keys));
        assert_eq!(
            decode_chunk(&[5, 1, 7]),
            None,
            "shares more than the key before"
        );
    }
}
