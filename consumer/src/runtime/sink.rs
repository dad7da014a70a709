//! The sink seam: what delivers a service's effects to the outside world.
//!
//! Each sink runs in a task of its own, over its queue in the outbox, in commit
//! order: effects with the same ordering key are delivered in emit order,
//! effects with different keys may overtake each other. What to do after a
//! failure is decided by [`Cursor`] (pure, unit-tested with paused time):
//! - [`SinkError::Transient`]: the effect's key waits (backoff by time, 0.1 s
//!   doubling to 30 s); after `service.give_up_after_s` it goes to the DLQ;
//! - [`SinkError::Permanent`]: to the DLQ at once, with the sink and the reason;
//! - [`SinkError::Unavailable`]: the whole sink waits (honouring a `Retry-After`)
//!   and retries without end; nothing is dead-lettered;
//! - [`SinkError::Fatal`]: the service stops (exit status 1); the outbox is
//!   durable, so the next start goes on from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::backoff::Backoff;
use changewire_schemas::diagnostics::report;
use tokio::time::Instant;

use super::dlq;
use super::metrics::ConsumerMetrics;
use super::outbox::{Outbox, Pending};
use super::store::Store;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a sink did not deliver an effect, by what the runtime should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// May succeed on another attempt: the effect's key waits, then the effect is
    /// dead-lettered after `service.give_up_after_s`.
    #[error("transient failure")]
    Transient(#[source] BoxError),
    /// Will never succeed (the receiver rejects this effect): dead-lettered now.
    #[error("rejected")]
    Permanent(#[source] BoxError),
    /// The receiver is down or refuses service: the sink waits, at least
    /// `retry_after` when the receiver said so, and retries without end.
    #[error("receiver unavailable")]
    Unavailable {
        /// Why.
        #[source]
        source: BoxError,
        /// How long the receiver asked to wait.
        retry_after: Option<Duration>,
    },
    /// The sink cannot go on: the service stops.
    #[error("fatal sink failure")]
    Fatal(#[source] BoxError),
}

impl SinkError {
    /// An unavailable receiver, with no wait asked for.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            source: source.into(),
            retry_after: None,
        }
    }

    fn class(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
            Self::Unavailable { .. } => "unavailable",
            Self::Fatal(_) => "fatal",
        }
    }
}

/// What became of one effect handed to [`Sink::deliver`].
#[derive(Debug)]
pub enum Delivery {
    /// It landed.
    Delivered,
    /// It was not tried (an earlier effect with its key failed first).
    NotAttempted,
    /// It failed.
    Failed(SinkError),
}

/// Delivers effects somewhere.
pub trait Sink: Send + Sync + 'static {
    /// Delivers `effects` (in commit order; keep the order of equal keys) and
    /// says what became of each, in the same order. `store` is the service's
    /// store, where a sink may keep state of its own (under a prefix naming it).
    fn deliver(
        &self,
        effects: &[Arc<Pending>],
        store: &Store,
    ) -> impl Future<Output = Vec<Delivery>> + Send;

    /// After a crash: which of `in_doubt` (loaded from the outbox, delivered or
    /// not before it) already landed, by idempotency key. By default none: the
    /// receiver is expected to drop repeated keys.
    fn reconcile(
        &self,
        in_doubt: &[Arc<Pending>],
        store: &Store,
    ) -> impl Future<Output = Result<HashSet<String>, SinkError>> + Send {
        let _ = (in_doubt, store);
        async { Ok(HashSet::new()) }
    }

    /// Most effects handed to one [`Sink::deliver`].
    fn max_chunk(&self) -> usize {
        1000
    }
}

/// What waits behind a failed effect: its key's later effects, or only itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Blocker {
    Key(Vec<u8>),
    Effect(u64),
}

fn blocker(pending: &Pending) -> Blocker {
    match &pending.effect.key {
        Some(key) => Blocker::Key(key.clone()),
        None => Blocker::Effect(pending.sequence),
    }
}

/// A key waiting for its retry.
#[derive(Debug)]
struct Block {
    until: Instant,
    backoff: Backoff,
    /// First failure: the give-up clock starts here.
    since: Instant,
}

/// The first retry's ceiling (waits are half to all of their ceiling: jitter).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A failing key's or receiver's retry delays; success resets them explicitly.
fn retry_backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX, Duration::MAX)
}

/// What to do with an effect after an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Landed: remove it.
    Done,
    /// Stays in the queue for a later attempt.
    Wait,
    /// Goes to the DLQ, with why.
    DeadLetter(String),
    /// The service stops, with why.
    Fatal(String),
}

/// A sink's retry state over its queue (pure: time comes in as arguments).
#[derive(Debug)]
pub(super) struct Cursor {
    blocked: HashMap<Blocker, Block>,
    /// The whole sink waits until then (unavailable receiver).
    paused_until: Option<Instant>,
    pause: Backoff,
    give_up_after: Duration,
    /// False for the DLQ's own sink: what it cannot write waits instead.
    can_dead_letter: bool,
}

impl Cursor {
    pub(super) fn new(give_up_after: Duration, can_dead_letter: bool) -> Self {
        Self {
            blocked: HashMap::new(),
            paused_until: None,
            pause: retry_backoff(),
            give_up_after,
            can_dead_letter,
        }
    }

    /// The next effects to try: up to `max` in sequence order, skipping every
    /// effect whose key waits (so a key's order holds); none while the sink waits.
    pub(super) fn chunk(
        &self,
        waiting: &BTreeMap<u64, Arc<Pending>>,
        now: Instant,
        max: usize,
    ) -> Vec<Arc<Pending>> {
        if self.paused_until.is_some_and(|until| until > now) {
            return Vec::new();
        }
        let waits = |p: &Pending| {
            self.blocked
                .get(&blocker(p))
                .is_some_and(|block| block.until > now)
        };
        waiting
            .values()
            .filter(|p| self.blocked.is_empty() || !waits(p))
            .take(max)
            .cloned()
            .collect()
    }

    /// When the next retry is due, if anything waits.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let keys = self.blocked.values().map(|b| b.until);
        keys.chain(self.paused_until).min()
    }

    /// Whether the sink as a whole waits for an unavailable receiver.
    pub(super) fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|until| until > now)
    }

    /// Takes the outcome of one attempt at `pending`.
    pub(super) fn outcome(
        &mut self,
        pending: &Pending,
        delivery: Delivery,
        now: Instant,
    ) -> Verdict {
        match delivery {
            Delivery::Delivered => {
                if !self.blocked.is_empty() {
                    self.blocked.remove(&blocker(pending));
                }
                self.paused_until = None;
                self.pause.reset();
                Verdict::Done
            }
            Delivery::NotAttempted => Verdict::Wait,
            Delivery::Failed(SinkError::Fatal(error)) => Verdict::Fatal(report(error.as_ref())),
            Delivery::Failed(SinkError::Unavailable { retry_after, .. }) => {
                self.pause_sink(retry_after, now);
                Verdict::Wait
            }
            Delivery::Failed(SinkError::Permanent(error)) if self.can_dead_letter => {
                self.blocked.remove(&blocker(pending));
                Verdict::DeadLetter(format!("rejected: {}", report(error.as_ref())))
            }
            Delivery::Failed(error) => self.retry_later(pending, &error, now),
        }
    }

    /// The whole sink waits: `retry_after` if the receiver asked, else a pause
    /// that doubles with each unavailable answer.
    pub(super) fn pause_sink(&mut self, retry_after: Option<Duration>, now: Instant) {
        let backoff = self.pause.next_delay_at(now);
        let wait = retry_after
            .unwrap_or(backoff)
            .clamp(RETRY_MIN / 2, RETRY_MAX * 10);
        self.paused_until = Some(now + wait);
    }

    /// Blocks `pending`'s key for a while, or gives up on it once it has failed
    /// for `give_up_after`.
    fn retry_later(&mut self, pending: &Pending, error: &SinkError, now: Instant) -> Verdict {
        let block = self.blocked.entry(blocker(pending)).or_insert(Block {
            until: now,
            backoff: retry_backoff(),
            since: now,
        });
        if self.can_dead_letter && now.duration_since(block.since) >= self.give_up_after {
            self.blocked.remove(&blocker(pending));
            return Verdict::DeadLetter(format!(
                "gave up after {:?}: {}",
                self.give_up_after,
                report(error)
            ));
        }
        block.until = now + block.backoff.next_delay_at(now);
        Verdict::Wait
    }
}

/// What every sink task shares.
pub(super) struct SinkShared {
    pub(super) outbox: Arc<Outbox>,
    pub(super) store: Store,
    pub(super) metrics: Arc<ConsumerMetrics>,
    pub(super) dlq: dlq::DeadLetters,
    pub(super) give_up_after: Duration,
}

/// A sink task: delivers `name`'s queue until the service stops; `Err` says why
/// the service must stop.
pub(super) async fn run_sink<S: Sink>(
    name: String,
    sink: S,
    shared: Arc<SinkShared>,
) -> Result<(), String> {
    let mut cursor = Cursor::new(shared.give_up_after, name != dlq::SINK);
    let mut failing = false;
    loop {
        reconcile(&name, &sink, &shared, &mut cursor).await?;
        let now = Instant::now();
        let chunk = match shared.outbox.queue(&name) {
            Some(queue) => cursor.chunk(&queue.waiting, now, sink.max_chunk()),
            None => return Err(format!("sink {name} has no queue")),
        };
        shared.metrics.observe_sink(&name, &shared.outbox);
        if chunk.is_empty() {
            let due = cursor.next_due();
            tokio::select! {
                () = shared.outbox.notified(&name) => {}
                () = sleep_until(due) => {}
            }
            continue;
        }
        let deliveries = sink.deliver(&chunk, &shared.store).await;
        let mut done = Vec::with_capacity(chunk.len());
        let mut last_error = None;
        let now = Instant::now();
        for (pending, delivery) in chunk.iter().zip(deliveries) {
            if let Delivery::Failed(error) = &delivery {
                shared.metrics.sink_failed(&name, error.class());
                last_error = Some(format!("{}: {}", error.class(), report(error)));
            }
            match cursor.outcome(pending, delivery, now) {
                Verdict::Done => done.push(pending.sequence),
                Verdict::Wait => {}
                Verdict::DeadLetter(reason) => dead_letter(&shared, pending, &name, &reason)?,
                Verdict::Fatal(reason) => return Err(format!("sink {name}: {reason}")),
            }
        }
        shared.metrics.sink_delivered(&name, done.len());
        let entries = shared.outbox.remove(&name, &done);
        shared.store.remove_outbox(&entries).map_err(|e| {
            format!(
                "sink {name}: cannot clear delivered effects: {}",
                report(&e)
            )
        })?;
        report_health(&name, &shared, &cursor, last_error, &mut failing);
    }
}

/// Moves `pending`, which `sink` rejected, to the DLQ's sink. The letter is
/// durable before the effect leaves its queue; a crash in between writes the
/// letter again under the same key, which the DLQ's sink finds and drops.
fn dead_letter(
    shared: &SinkShared,
    pending: &Pending,
    sink: &str,
    reason: &str,
) -> Result<(), String> {
    let letter = shared
        .dlq
        .rejected(pending, sink, reason, shared.outbox.sequence(1));
    let failed = |e: super::store::StoreError| {
        format!(
            "cannot dead-letter an effect of sink {sink}: {}",
            report(&e)
        )
    };
    shared.store.add_outbox(&letter).map_err(failed)?;
    shared.outbox.push(vec![letter], false)?;
    let done = shared.outbox.remove(sink, &[pending.sequence]);
    shared.store.remove_outbox(&done).map_err(failed)?;
    shared.metrics.dead_lettered_effects.inc();
    Ok(())
}

/// Puts a sink that waits for its receiver on `/health`, and takes it off again.
fn report_health(
    name: &str,
    shared: &SinkShared,
    cursor: &Cursor,
    last_error: Option<String>,
    failing: &mut bool,
) {
    if cursor.paused(Instant::now()) {
        let error = last_error.unwrap_or_else(|| "unavailable".into());
        if !*failing {
            tracing::warn!(sink = name, %error, "sink unavailable; effects wait in the outbox");
        }
        *failing = true;
        shared.metrics.set_sink_error(name, Some(error));
    } else if *failing {
        tracing::info!(sink = name, "sink delivering again");
        *failing = false;
        shared.metrics.set_sink_error(name, None);
    }
}

/// Drops the in-doubt effects (loaded at start) that already landed, retrying
/// while the sink cannot tell.
async fn reconcile<S: Sink>(
    name: &str,
    sink: &S,
    shared: &SinkShared,
    cursor: &mut Cursor,
) -> Result<(), String> {
    loop {
        let in_doubt: Vec<Arc<Pending>> = match shared.outbox.queue(name) {
            Some(queue) if queue.in_doubt => queue.waiting.values().cloned().collect(),
            _ => return Ok(()),
        };
        tracing::info!(
            sink = name,
            in_doubt = in_doubt.len(),
            "checking which effects interrupted by the last stop landed"
        );
        match sink.reconcile(&in_doubt, &shared.store).await {
            Ok(landed) => {
                let found: Vec<u64> = in_doubt
                    .iter()
                    .filter(|p| landed.contains(&p.idempotency_key))
                    .map(|p| p.sequence)
                    .collect();
                tracing::info!(
                    sink = name,
                    in_doubt = in_doubt.len(),
                    landed = found.len(),
                    "in-doubt effects checked; delivering the rest"
                );
                let entries = shared.outbox.remove(name, &found);
                shared
                    .store
                    .remove_outbox(&entries)
                    .map_err(|e| format!("sink {name}: {}", report(&e)))?;
                if let Some(mut queue) = shared.outbox.queue(name) {
                    queue.in_doubt = false;
                }
                return Ok(());
            }
            Err(SinkError::Fatal(error)) => {
                return Err(format!("sink {name}: {}", report(error.as_ref())))
            }
            Err(error) => {
                tracing::warn!(sink = name, error = %report(&error), "cannot tell which effects landed; retrying");
                shared
                    .metrics
                    .set_sink_error(name, Some(format!("reconciling: {}", report(&error))));
                cursor.pause_sink(None, Instant::now());
                sleep_until(cursor.next_due()).await;
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing;

    fn pending(sequence: u64, key: Option<&str>) -> Arc<Pending> {
        Arc::new(testing::pending(sequence, "s", key))
    }

    fn queue(pendings: &[Arc<Pending>]) -> BTreeMap<u64, Arc<Pending>> {
        pendings.iter().map(|p| (p.sequence, p.clone())).collect()
    }

    fn sequences(chunk: &[Arc<Pending>]) -> Vec<u64> {
        chunk.iter().map(|p| p.sequence).collect()
    }

    /// `due` lies within the jittered step of `ceiling` after `from`.
    fn assert_within(due: Option<Instant>, from: Instant, ceiling: Duration) {
        let due = due.expect("a retry is due") - from;
        assert!(
            due >= ceiling / 2 && due <= ceiling,
            "{due:?} not within the {ceiling:?} step"
        );
    }

    fn failed() -> Delivery {
        Delivery::Failed(SinkError::Transient("busy".into()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_key_waits_with_its_later_effects_while_other_keys_go_on() {
        let mut cursor = Cursor::new(Duration::from_secs(60), true);
        let all = [
            pending(1, Some("a")),
            pending(2, Some("b")),
            pending(3, Some("a")),
            pending(4, None),
        ];
        let waiting = queue(&all);
        let now = Instant::now();
        assert_eq!(
            sequences(&cursor.chunk(&waiting, now, 10)),
            vec![1, 2, 3, 4]
        );
        assert_eq!(cursor.outcome(&all[0], failed(), now), Verdict::Wait);
        assert_eq!(
            sequences(&cursor.chunk(&waiting, now, 10)),
            vec![2, 4],
            "key a waits"
        );
        assert_within(cursor.next_due(), now, RETRY_MIN);
        tokio::time::advance(RETRY_MIN).await;
        let later = Instant::now();
        assert_eq!(
            sequences(&cursor.chunk(&waiting, later, 10)),
            vec![1, 2, 3, 4]
        );
        assert_eq!(cursor.outcome(&all[0], failed(), later), Verdict::Wait);
        assert_within(cursor.next_due(), later, RETRY_MIN * 2);
        assert_eq!(
            cursor.outcome(&all[0], Delivery::Delivered, later),
            Verdict::Done
        );
        assert_eq!(cursor.next_due(), None, "delivered: nothing waits");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_go_to_the_dlq_after_the_time_not_a_count() {
        let mut cursor = Cursor::new(Duration::from_secs(5), true);
        let effect = pending(1, Some("a"));
        let start = Instant::now();
        for _ in 0..20 {
            assert_eq!(
                cursor.outcome(&effect, failed(), Instant::now()),
                Verdict::Wait
            );
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        assert!(Instant::now() - start < Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(1)).await;
        let verdict = cursor.outcome(&effect, failed(), Instant::now());
        assert!(
            matches!(verdict, Verdict::DeadLetter(ref why) if why.contains("busy")),
            "{verdict:?}"
        );
        let mut dlq = Cursor::new(Duration::from_secs(5), false);
        let rejected = Delivery::Failed(SinkError::Permanent("too large".into()));
        assert_eq!(
            dlq.outcome(&effect, rejected, Instant::now()),
            Verdict::Wait,
            "the DLQ's own sink never gives up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_receiver_pauses_the_sink_for_its_retry_after_and_never_dead_letters() {
        let mut cursor = Cursor::new(Duration::from_secs(1), true);
        let all = [pending(1, Some("a")), pending(2, Some("b"))];
        let waiting = queue(&all);
        let down = || {
            Delivery::Failed(SinkError::Unavailable {
                source: "503".into(),
                retry_after: Some(Duration::from_secs(3)),
            })
        };
        for _ in 0..5 {
            let now = Instant::now();
            assert_eq!(cursor.outcome(&all[0], down(), now), Verdict::Wait);
            assert!(cursor.paused(now));
            assert!(
                cursor.chunk(&waiting, now, 10).is_empty(),
                "every key waits"
            );
            assert_eq!(cursor.next_due(), Some(now + Duration::from_secs(3)));
            tokio::time::advance(Duration::from_secs(3)).await;
        }
        let now = Instant::now();
        assert_eq!(sequences(&cursor.chunk(&waiting, now, 10)), vec![1, 2]);
        assert_eq!(
            cursor.outcome(&all[0], Delivery::Delivered, now),
            Verdict::Done
        );
        assert!(!cursor.paused(now));
        let fatal = Delivery::Failed(SinkError::Fatal("fenced".into()));
        assert!(matches!(
            cursor.outcome(&all[1], fatal, now),
            Verdict::Fatal(_)
        ));
    }
}
