//! The worker loop: polls, applies batches, writes them to sled (the next batch
//! is applied while the previous one's seal and write run, see
//! [`super::write`]), hands committed effects to the sinks, and keeps house
//! (settled offsets to Kafka, outbox flow control, the group watch). Nothing in
//! it waits for a sink or a retry: polling never stops, so the instance stays in
//! its group through any downstream outage.

use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::Codec;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::Offset;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::assign::{Assignment, ServiceContext};
use super::batch::Batch;
use super::config::{Assignment as Mode, RuntimeConfig};
use super::dlq::DeadLetters;
use super::gaps::Gaps;
use super::handler::{Handler, Record};
use super::ids::ProcessedIds;
use super::kafka::{self, GroupWatch, Mirror};
use super::metrics::{ConsumerMetrics, ServiceState, TopicPartition};
use super::outbox::Outbox;
use super::parking::Parking;
use super::shutdown::stopped;
use super::store::Store;
use super::write::{written, WriteJob, Writing};
use super::{RunStats, RuntimeError};

/// How often settled offsets go to Kafka and the outbox's size is looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// Housekeeping rounds between looks at the group.
const GROUP_WATCH_EVERY: u32 = 10;
/// Longest wait for a seek back to be made.
const SEEK_WAIT: Duration = Duration::from_secs(5);
/// How long a stopping service lets its sinks finish what they are delivering.
const SINK_GRACE: Duration = Duration::from_secs(2);

/// Reads batches, applies them through the handler and commits them.
pub(super) struct Worker<'a, H> {
    pub(super) config: &'a RuntimeConfig,
    pub(super) handler: H,
    pub(super) store: Store,
    pub(super) instance: String,
    pub(super) dlq: DeadLetters,
    pub(super) codec: Codec,
    pub(super) metrics: Arc<ConsumerMetrics>,
    pub(super) assignment: Arc<Assignment>,
    pub(super) outbox: Arc<Outbox>,
    /// The sinks effects may be emitted to (the DLQ's included).
    pub(super) sink_names: Arc<[String]>,
    pub(super) stats: RunStats,
    /// Event ids processed within the retention window.
    pub(super) processed: ProcessedIds,
    pub(super) parking: Parking,
    /// The previous batch, while its sled write runs next to the current batch.
    pub(super) writing: Option<Writing>,
    /// Whether fetching is paused because the outbox is full.
    pub(super) outbox_full: bool,
    /// Reads that started past the next offset expected, and the seeks back.
    pub(super) gaps: Gaps,
}

/// What starts a batch.
enum Input<'a> {
    Message(Result<BorrowedMessage<'a>, KafkaError>),
    Retry,
    Tick,
}

impl<H: Handler> Worker<'_, H> {
    /// Consumes until shutdown, or until a sink or the handler fails fatally.
    pub(super) async fn consume(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        fatal: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<(), RuntimeError> {
        let consumer = kafka::consumer(
            self.config,
            ServiceContext {
                store: self.store.clone(),
                instance: self.instance.clone(),
                assignment: self.assignment.clone(),
                outbox: self.outbox.clone(),
                metrics: self.metrics.clone(),
                rewind: self.config.service.resume_rewind,
            },
        )?;
        let started = self.start().await?;
        if !started.is_empty() {
            self.write(started);
            self.finish_write().await?;
        }
        self.metrics.set_state(ServiceState::Consuming);
        let mut mirror = Mirror::new(&self.instance);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        let mut group = GroupWatch::new(self.config);
        let mut rounds = 0u32;
        let mut ticks = self.config.service.tick_interval_ms.map(|ms| {
            let mut ticks = tokio::time::interval(Duration::from_millis(ms));
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks
        });
        let mut generation = self.assignment.generation();
        loop {
            let input = tokio::select! {
                biased;
                () = stopped(shutdown) => break,
                Some(reason) = fatal.recv() => return Err(RuntimeError::Fatal(reason)),
                written = written(&mut self.writing), if self.writing.as_ref().is_some_and(Writing::is_running) => {
                    written?;
                    self.finish_write().await?;
                    continue;
                }
                _ = housekeeping.tick() => {
                    self.metrics.beat();
                    rounds = rounds.wrapping_add(1);
                    self.housekeep(&consumer, &mut mirror)?;
                    if rounds.is_multiple_of(GROUP_WATCH_EVERY) {
                        self.watch_group(&consumer, &mut group).await?;
                    }
                    continue;
                }
                _ = next_tick(&mut ticks) => Input::Tick,
                () = sleep_until(self.parking.next_due()) => Input::Retry,
                message = consumer.recv() => Input::Message(message),
            };
            if self.assignment.generation() != generation {
                generation = self.assignment.generation();
                self.parking.retain_owned(&self.assignment.owned());
                self.gaps.repositioned();
            }
            let batch = match input {
                Input::Tick => self.tick().await?,
                Input::Retry => {
                    let records = self.unpark_due(&consumer);
                    self.apply(records).await?
                }
                Input::Message(first) => {
                    let records = self.collect_batch(first, &consumer).await;
                    self.apply(records).await?
                }
            };
            self.seek_back(&consumer);
            // The previous batch's write ran meanwhile.
            self.finish_write().await?;
            self.pause_parked(&consumer);
            if !batch.is_empty() {
                self.write(batch);
            }
            if self.parking.is_empty() && self.metrics.state() != ServiceState::Consuming {
                self.metrics.set_state(ServiceState::Consuming);
                self.metrics.set_error(None);
            }
        }
        self.finish_write().await?;
        self.let_sinks_finish().await;
        self.assignment.settlements().advance(self.outbox.oldest());
        if self.config.service.assignment == Mode::Group {
            mirror.mirror(&consumer, &self.assignment);
        }
        Ok(())
    }

    /// Starts the batch's write (its seal, then one atomic sled write) on a
    /// blocking thread.
    pub(super) fn write(&mut self, mut batch: Batch) {
        let segment = self.processed.segment(std::mem::take(&mut batch.processed));
        self.metrics.processed_ids.set(self.processed.len() as i64);
        let job = WriteJob {
            store: self.store.clone(),
            outbox: self.outbox.clone(),
            metrics: self.metrics.clone(),
            sinks: self.sink_names.clone(),
            segment,
        };
        self.writing = Some(Writing::start(batch, job));
    }

    /// Waits for the write under way, if any; its effects join their sinks'
    /// queues and its offsets wait for them to settle. Expires old ids too.
    pub(super) async fn finish_write(&mut self) -> Result<(), RuntimeError> {
        written(&mut self.writing).await?;
        let Some(done) = self.writing.take() else {
            return Ok(());
        };
        let last = done.effects.last().map(|p| p.sequence);
        self.outbox
            .push(done.effects, false)
            .map_err(|sink| RuntimeError::Fatal(format!("an effect for unknown sink {sink}")))?;
        self.assignment
            .settlements()
            .committed(last, done.batch.offsets.clone());
        let forgotten = self.processed.expire(&self.store)?;
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot ids older than the retention window");
        }
        Ok(())
    }

    /// Settles batches, mirrors their offsets (group mode), and pauses or resumes
    /// fetching by the outbox's size.
    fn housekeep(
        &mut self,
        consumer: &StreamConsumer<ServiceContext>,
        mirror: &mut Mirror,
    ) -> Result<(), RuntimeError> {
        self.assignment.settlements().advance(self.outbox.oldest());
        if self.config.service.assignment == Mode::Group {
            mirror.mirror(consumer, &self.assignment);
        }
        self.control_flow(consumer);
        self.look_for_stalls();
        self.seek_back(consumer);
        Ok(())
    }

    /// Partitions that lag, are not paused, and read nothing since they were
    /// positioned (see [`super::gaps`]).
    fn look_for_stalls(&mut self) {
        if self.outbox_full {
            return;
        }
        let paused = self.parking.paused();
        let owned = self.assignment.lock();
        for (key, next) in owned.iter() {
            let Some(next) = *next else { continue };
            let label = TopicPartition {
                topic: key.0.clone(),
                partition: key.1,
            };
            let lags = self
                .metrics
                .lag
                .get(&label)
                .is_some_and(|lag| lag.get() > 0);
            if lags && !paused.contains(key) {
                self.gaps.stalled(key, next);
            }
        }
    }

    /// Above the outbox's high mark every owned partition pauses (polling goes
    /// on); below half of it they resume, except those waiting for a retry.
    fn control_flow(&mut self, consumer: &StreamConsumer<ServiceContext>) {
        let service = &self.config.service;
        let (waiting, bytes) = self.outbox.load();
        let owned: Vec<_> = self.assignment.owned().into_iter().collect();
        if waiting >= service.outbox_high_mark || bytes >= service.outbox_max_bytes {
            if !self.outbox_full {
                tracing::warn!(
                    waiting,
                    bytes,
                    "the outbox is full: fetching pauses until the sinks catch up"
                );
                self.outbox_full = true;
                self.metrics.outbox_full.set(1);
            }
            // Again every round: partitions assigned meanwhile pause too.
            kafka::set_paused(consumer, &owned, true);
        } else if self.outbox_full
            && waiting <= service.outbox_high_mark / 2
            && bytes <= service.outbox_max_bytes / 2
        {
            tracing::info!(waiting, bytes, "the outbox drained: fetching resumes");
            self.outbox_full = false;
            self.metrics.outbox_full.set(0);
            let parked = self.parking.paused();
            let resumed: Vec<_> = owned.into_iter().filter(|k| !parked.contains(k)).collect();
            kafka::set_paused(consumer, &resumed, false);
        }
    }

    async fn watch_group(
        &mut self,
        consumer: &StreamConsumer<ServiceContext>,
        group: &mut GroupWatch,
    ) -> Result<(), RuntimeError> {
        if self.config.service.assignment != Mode::Group {
            return Ok(());
        }
        // An instance whose own sinks wait would suspect partitions that only
        // wait for the same outage.
        if !self.metrics.sinks_healthy() {
            return Ok(());
        }
        if group.check(&self.metrics, &self.assignment.owned()).await {
            kafka::rejoin(consumer, self.config)?;
        }
        Ok(())
    }

    /// The batch `first` starts: what else arrives within the linger, up to
    /// `max_batch`. Larger batches amortize the flush.
    async fn collect_batch(
        &self,
        first: Result<BorrowedMessage<'_>, KafkaError>,
        consumer: &StreamConsumer<ServiceContext>,
    ) -> Vec<Record> {
        let mut records = Vec::new();
        kafka::collect(first, &mut records);
        let linger = Instant::now() + self.config.batch_linger();
        while records.len() < self.config.service.max_batch {
            match consumer.recv().now_or_never() {
                Some(message) => kafka::collect(message, &mut records),
                None => match tokio::time::timeout_at(linger, consumer.recv()).await {
                    Ok(message) => kafka::collect(message, &mut records),
                    Err(_) => break,
                },
            }
        }
        records
    }

    /// Makes the seeks back decided since the last call (a read that started
    /// past the next offset expected, or a lagging partition that reads
    /// nothing: tansu serves a fetch from inside a record batch with the next
    /// batch, or nothing). One that fails is asked for again after the next
    /// batch; the partition's records are skipped meanwhile.
    fn seek_back(&mut self, consumer: &StreamConsumer<ServiceContext>) {
        for (key, target) in self.gaps.take_seeks() {
            let (topic, partition) = &key;
            self.metrics.rewinds.inc();
            tracing::info!(%topic, partition, target, "the partition's read started past the next offset expected, or gives nothing though it lags: seeking back");
            if let Err(error) = consumer.seek(topic, *partition, Offset::Offset(target), SEEK_WAIT)
            {
                tracing::warn!(%topic, partition, target, %error, "cannot seek back; trying again");
                self.gaps.seek_failed(key);
            }
        }
    }

    /// Pauses each newly parked partition and expects its failed record again.
    fn pause_parked(&mut self, consumer: &StreamConsumer<ServiceContext>) {
        let parked = self.parking.pause_new();
        if parked.is_empty() {
            return;
        }
        let mut owned = self.assignment.lock();
        for (key, offset) in &parked {
            if let Some(expected) = owned.get_mut(key) {
                *expected = Some(*offset);
            }
        }
        drop(owned);
        let keys: Vec<_> = parked.into_iter().map(|(key, _)| key).collect();
        kafka::set_paused(consumer, &keys, true);
    }

    /// The records of the partitions whose retry is due, their partitions
    /// resumed (unless the outbox is full).
    fn unpark_due(&mut self, consumer: &StreamConsumer<ServiceContext>) -> Vec<Record> {
        let (records, resumed) = self.parking.due(Instant::now());
        if !self.outbox_full {
            kafka::set_paused(consumer, &resumed, false);
        }
        records
    }

    /// On the way out: lets the sinks deliver for a moment; what is left stays
    /// in the outbox for the next start.
    async fn let_sinks_finish(&self) {
        let deadline = Instant::now() + SINK_GRACE;
        while self.outbox.load().0 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (waiting, _) = self.outbox.load();
        if waiting > 0 {
            tracing::info!(
                waiting,
                "effects not delivered yet stay in the outbox for the next start"
            );
        }
    }
}

async fn next_tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
