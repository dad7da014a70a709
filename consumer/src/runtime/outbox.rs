//! The outbox the runtime owns: effects committed with their batch, waiting for
//! their sink to deliver them.
//!
//! Every effect gets a sequence number when its batch is sealed (one counter for
//! every sink, so a sequence orders effects in commit order). A batch's effects
//! are written to sled as one *entry* (keyed by the batch's first sequence) in
//! the batch's write: one key per batch, not per effect, keeps sled's work per
//! event small. Once the write is durable the effects join their sinks' queues
//! here; each sink's task delivers from its queue and removes what landed; an
//! entry is removed from sled (lazily) once every effect in it is gone. At start
//! the queues are loaded from sled: those effects are *in doubt* (delivered or
//! not before a crash).
//!
//! A batch *settles* once every effect it emitted is gone from the queues: only
//! then may its offsets be handed to Kafka ([`Settlements`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::types::{Header, PartitionKey};

/// Something a sink is to do, as a handler describes it. Each sink reads the
/// fields it needs (a Kafka sink: all of them; a webhook sink: key and payload).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// Where to: a topic for a Kafka sink; unused by a webhook sink.
    pub destination: Option<String>,
    /// A partition of the destination; by key when absent.
    pub partition: Option<i32>,
    /// The ordering key: effects with the same key are delivered in emit order.
    /// Effects without one are delivered in any order.
    pub key: Option<Vec<u8>>,
    /// Headers (Kafka headers; HTTP sinks may ignore them).
    pub headers: Vec<Header>,
    /// The body.
    pub payload: Vec<u8>,
}

impl Effect {
    /// An effect with `payload` and nothing else set.
    pub fn new(payload: Vec<u8>) -> Self {
        Self {
            payload,
            ..Self::default()
        }
    }

    /// Bytes it holds (for the outbox's size bound).
    fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// An effect in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Position in commit order.
    pub sequence: u64,
    /// The sled entry holding it (its batch's first sequence).
    pub entry: u64,
    /// The sink that delivers it.
    pub sink: String,
    /// Stable across re-handling: receivers drop repeats by it.
    pub idempotency_key: String,
    /// What to do.
    pub effect: Effect,
}

/// Format version of a stored effect.
const ENTRY_VERSION: u8 = 1;
/// Format version of a stored entry: a batch's effects.
const BATCH_VERSION: u8 = 2;

/// A batch's effects as one stored entry: a version byte, the count, then each
/// effect length-prefixed (their sequences follow the entry's).
pub(super) fn encode_entry(effects: &[Arc<Pending>]) -> Vec<u8> {
    let mut out = vec![BATCH_VERSION];
    out.extend_from_slice(&(effects.len() as u32).to_be_bytes());
    for pending in effects {
        put(&mut out, &pending.encode());
    }
    out
}

/// The effects of the entry stored under `entry`, `None` if the bytes are not one.
pub(super) fn decode_entry(entry: u64, bytes: &[u8]) -> Option<Vec<Pending>> {
    let mut reader = Reader(bytes.strip_prefix(&[BATCH_VERSION])?);
    let count = u32::from_be_bytes(reader.0.get(..4)?.try_into().ok()?);
    reader.0 = &reader.0[4..];
    let mut effects = Vec::with_capacity(count.min(100_000) as usize);
    for (sequence, _) in (entry..).zip(0..count) {
        effects.push(Pending::decode(sequence, entry, reader.field()?)?);
    }
    reader.0.is_empty().then_some(effects)
}

impl Pending {
    /// Length-prefixed fields after a version byte; optional fields are preceded
    /// by a presence byte.
    fn encode(&self) -> Vec<u8> {
        let effect = &self.effect;
        let mut out = Vec::with_capacity(effect.size() + 128);
        out.push(ENTRY_VERSION);
        put(&mut out, self.sink.as_bytes());
        put(&mut out, self.idempotency_key.as_bytes());
        put_optional(&mut out, effect.destination.as_ref().map(String::as_bytes));
        put_optional(
            &mut out,
            effect
                .partition
                .map(i32::to_be_bytes)
                .as_ref()
                .map(|p| &p[..]),
        );
        put_optional(&mut out, effect.key.as_deref());
        put(&mut out, &(effect.headers.len() as u32).to_be_bytes());
        for (name, value) in &effect.headers {
            put(&mut out, name.as_bytes());
            put_optional(&mut out, value.as_deref());
        }
        put(&mut out, &effect.payload);
        out
    }

    /// The effect numbered `sequence` in `entry`, `None` if the bytes are not one.
    fn decode(sequence: u64, entry: u64, bytes: &[u8]) -> Option<Self> {
        let mut reader = Reader(bytes.strip_prefix(&[ENTRY_VERSION])?);
        let sink = reader.string()?;
        let idempotency_key = reader.string()?;
        let destination = reader
            .optional()?
            .map(|d| String::from_utf8(d.to_vec()))
            .transpose()
            .ok()?;
        let partition = match reader.optional()? {
            Some(bytes) => Some(i32::from_be_bytes(bytes.try_into().ok()?)),
            None => None,
        };
        let key = reader.optional()?.map(<[u8]>::to_vec);
        let count = u32::from_be_bytes(reader.field()?.try_into().ok()?);
        let mut headers = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            headers.push((reader.string()?, reader.optional()?.map(<[u8]>::to_vec)));
        }
        let payload = reader.field()?.to_vec();
        reader.0.is_empty().then_some(Self {
            sequence,
            entry,
            sink,
            idempotency_key,
            effect: Effect {
                destination,
                partition,
                key,
                headers,
                payload,
            },
        })
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => {
            out.push(1);
            put(out, bytes);
        }
        None => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn field(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        let value = self.0.get(4..4 + len)?;
        self.0 = &self.0[4 + len..];
        Some(value)
    }

    fn optional(&mut self) -> Option<Option<&'a [u8]>> {
        let (&present, rest) = self.0.split_first()?;
        self.0 = rest;
        match present {
            0 => Some(None),
            1 => self.field().map(Some),
            _ => None,
        }
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
}

/// One sink's waiting effects, by sequence.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) waiting: BTreeMap<u64, Arc<Pending>>,
    /// Loaded at start: may have landed before a crash.
    pub(super) in_doubt: bool,
}

/// Every sink's queue, with the totals the flow control reads.
pub(super) struct Outbox {
    queues: HashMap<String, (Mutex<Queue>, Notify)>,
    /// Per stored entry, how many of its effects still wait.
    entries: Mutex<HashMap<u64, usize>>,
    next_sequence: AtomicU64,
    waiting: AtomicUsize,
    bytes: AtomicUsize,
}

impl Outbox {
    /// Empty queues for `sinks`; sequences continue after `last_sequence`.
    pub(super) fn new(sinks: &[String], last_sequence: Option<u64>) -> Self {
        Self {
            queues: sinks
                .iter()
                .map(|s| (s.clone(), (Mutex::default(), Notify::new())))
                .collect(),
            entries: Mutex::default(),
            next_sequence: AtomicU64::new(last_sequence.map_or(0, |s| s + 1)),
            waiting: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Numbers a batch's effects, in emit order.
    pub(super) fn sequence(&self, count: usize) -> u64 {
        self.next_sequence.fetch_add(count as u64, Ordering::SeqCst)
    }

    /// The last sequence handed out, if any.
    pub(super) fn last_sequence(&self) -> Option<u64> {
        self.next_sequence.load(Ordering::SeqCst).checked_sub(1)
    }

    /// Adds effects whose write is durable (or that were loaded at start, then
    /// `in_doubt`), and wakes their sinks. `Err` names a sink not run here.
    pub(super) fn push(&self, pendings: Vec<Arc<Pending>>, in_doubt: bool) -> Result<(), String> {
        if let Some(unknown) = pendings.iter().find(|p| !self.queues.contains_key(&p.sink)) {
            return Err(unknown.sink.clone());
        }
        let mut entries = lock(&self.entries);
        for pending in &pendings {
            *entries.entry(pending.entry).or_default() += 1;
        }
        drop(entries);
        for pending in pendings {
            let (queue, notify) = self
                .queues
                .get(&pending.sink)
                .ok_or_else(|| pending.sink.clone())?;
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.bytes
                .fetch_add(pending.effect.size(), Ordering::SeqCst);
            let mut queue = lock(queue);
            queue.in_doubt |= in_doubt;
            queue.waiting.insert(pending.sequence, pending);
            drop(queue);
            notify.notify_one();
        }
        Ok(())
    }

    /// Removes delivered (or dead-lettered) effects of `sink`; returns the
    /// stored entries nothing waits in any more (to remove from sled).
    #[must_use]
    pub(super) fn remove(&self, sink: &str, sequences: &[u64]) -> Vec<u64> {
        let Some((queue, _)) = self.queues.get(sink) else {
            return Vec::new();
        };
        let mut removed = Vec::with_capacity(sequences.len());
        let mut queue = lock(queue);
        for sequence in sequences {
            if let Some(pending) = queue.waiting.remove(sequence) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                self.bytes
                    .fetch_sub(pending.effect.size(), Ordering::SeqCst);
                removed.push(pending.entry);
            }
        }
        drop(queue);
        let mut entries = lock(&self.entries);
        let mut done = Vec::new();
        for entry in removed {
            if let Some(left) = entries.get_mut(&entry) {
                *left -= 1;
                if *left == 0 {
                    entries.remove(&entry);
                    done.push(entry);
                }
            }
        }
        done
    }

    /// `sink`'s queue.
    pub(super) fn queue(&self, sink: &str) -> Option<MutexGuard<'_, Queue>> {
        self.queues.get(sink).map(|(queue, _)| lock(queue))
    }

    /// Resolves when `sink` gets new effects.
    pub(super) async fn notified(&self, sink: &str) {
        match self.queues.get(sink) {
            Some((_, notify)) => notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The oldest sequence waiting in any queue.
    pub(super) fn oldest(&self) -> Option<u64> {
        self.queues
            .values()
            .filter_map(|(queue, _)| lock(queue).waiting.keys().next().copied())
            .min()
    }

    /// Effects waiting, and their bytes.
    pub(super) fn load(&self) -> (usize, usize) {
        (
            self.waiting.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Committed batches in order, each with the offsets it moved and the last
/// sequence it emitted: which offsets may go to Kafka.
#[derive(Default)]
pub(super) struct Settlements {
    batches: VecDeque<(Option<u64>, HashMap<PartitionKey, i64>)>,
    settled: HashMap<PartitionKey, i64>,
}

impl Settlements {
    /// A committed batch: `last` is the last sequence its effects took (none if it
    /// emitted nothing).
    pub(super) fn committed(&mut self, last: Option<u64>, offsets: HashMap<PartitionKey, i64>) {
        if !offsets.is_empty() {
            self.batches.push_back((last, offsets));
        }
    }

    /// Settles the batches, oldest first, whose effects are all gone from the
    /// outbox (`oldest` waiting sequence beyond their last, or nothing waiting).
    pub(super) fn advance(&mut self, oldest: Option<u64>) {
        while let Some((last, _)) = self.batches.front() {
            let delivered = match (last, oldest) {
                (None, _) | (_, None) => true,
                (Some(last), Some(oldest)) => *last < oldest,
            };
            if !delivered {
                break;
            }
            let Some((_, offsets)) = self.batches.pop_front() else {
                break;
            };
            for (key, next) in offsets {
                let entry = self.settled.entry(key).or_insert(next);
                *entry = (*entry).max(next);
            }
        }
    }

    /// The offset up to which `key`'s batches settled.
    pub(super) fn settled(&self, key: &PartitionKey) -> Option<i64> {
        self.settled.get(key).copied()
    }

    /// Forgets a partition this instance no longer owns (a later owner moves it).
    pub(super) fn forget(&mut self, key: &PartitionKey) {
        self.settled.remove(key);
        for (_, offsets) in &mut self.batches {
            offsets.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing;

    fn pending(sequence: u64, sink: &str) -> Pending {
        testing::pending(sequence, sink, Some("k"))
    }

    #[test]
    fn entries_round_trip_and_keep_absent_header_values_absent() {
        let full = pending(7, "kafka");
        let bare = Pending {
            sequence: 8,
            effect: Effect::new(vec![]),
            ..full.clone()
        };
        let encoded = encode_entry(&[Arc::new(full.clone()), Arc::new(bare.clone())]);
        assert_eq!(decode_entry(7, &encoded), Some(vec![full, bare]));
        let truncated = &encoded[..encoded.len() - 1];
        assert_eq!(decode_entry(7, truncated), None, "truncated");
        assert_eq!(decode_entry(7, &[1, 0, 0]), None, "unknown version");
    }

    #[test]
    fn a_batch_settles_once_every_effect_up_to_its_last_is_gone() {
        let outbox = Outbox::new(&["a".into(), "b".into()], None);
        let mut settlements = Settlements::default();
        let key: PartitionKey = ("t".into(), 0);
        let first = outbox.sequence(2);
        outbox
            .push(
                vec![
                    Arc::new(pending(first, "a")),
                    Arc::new(Pending {
                        entry: first,
                        ..pending(first + 1, "b")
                    }),
                ],
                false,
            )
            .expect("known sinks");
        settlements.committed(Some(first + 1), HashMap::from([(key.clone(), 10)]));
        settlements.committed(None, HashMap::from([(key.clone(), 20)]));
        settlements.advance(outbox.oldest());
        assert_eq!(settlements.settled(&key), None, "nothing delivered");
        assert!(
            outbox.remove("b", &[first + 1]).is_empty(),
            "a waits in the entry"
        );
        settlements.advance(outbox.oldest());
        assert_eq!(settlements.settled(&key), None, "a still waits");
        assert_eq!(
            outbox.remove("a", &[first]),
            vec![first],
            "its entry is done"
        );
        settlements.advance(outbox.oldest());
        assert_eq!(
            settlements.settled(&key),
            Some(20),
            "the batch behind settles too"
        );
        assert_eq!(outbox.load(), (0, 0));
        assert_eq!(
            outbox.push(vec![Arc::new(pending(9, "c"))], false),
            Err("c".into())
        );
    }
}
