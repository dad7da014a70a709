//! The PostgreSQL change source: slot and publication set-up, the initial snapshot,
//! then the replication stream to the sink, confirming an LSN only after the sink
//! acknowledged every event at or below it.

use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use changewire_kafka::{Lane, Publisher};
use changewire_schemas::backoff::Backoff;
use changewire_schemas::diagnostics::report;
use changewire_schemas::{Codec, Op, TopicNames};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio_postgres::Client;

use super::catalog::{self, Catalog};
use super::config::{PostgresConfig, SnapshotMode};
use super::error::PostgresError;
use super::normalize::{Change, Relations, SourceInfo, TxContext, SESSION_OPTIONS};
use super::output::Output;
use super::pgoutput::{pg_micros_to_unix_ms, Decoder, Lsn, Message, OldTuple};
use super::setup::{self, quote_ident};
use super::snapshot::Snapshot;
use crate::checkpoint::CheckpointStore;
use crate::clock::now_ms;
use crate::metrics::{ProducerMetrics, SourceState};
use crate::source::{ChangeSource, SourceContext, SourceError};

/// How often the replication client reports the confirmed position.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// A session that ran this long before failing resets the reconnect backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// The first reconnect delay's ceiling (delays are half to all of it: 0.2-0.4 s).
const BACKOFF_FIRST: Duration = Duration::from_millis(400);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A committed position that may be confirmed once everything before it is acked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checkpoint {
    lsn: Lsn,
    commit_ms: i64,
}

/// Streams one PostgreSQL database to Kafka.
pub struct PostgresSource<C> {
    config: PostgresConfig,
    catalog: Catalog,
    output: Output,
    checkpoints: Arc<C>,
}

impl<C: CheckpointStore> PostgresSource<C> {
    /// A source for the `[postgres]` section.
    pub fn new(
        config: PostgresConfig,
        topics: TopicNames,
        codec: Arc<Codec>,
        publisher: Publisher,
        checkpoints: Arc<C>,
    ) -> Self {
        let metrics = Arc::<ProducerMetrics>::default().source(&config.name);
        let catalog = Catalog::new(config.clone(), topics, codec.clone(), publisher.clone());
        let output = Output::new(publisher, codec, metrics, config.max_in_flight);
        Self {
            config,
            catalog,
            output,
            checkpoints,
        }
    }

    /// Reports into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<ProducerMetrics>) -> Self {
        self.output = self.output.with_metrics(metrics.source(&self.config.name));
        self
    }

    /// The metrics this source reports into.
    pub fn metrics(&self) -> Arc<ProducerMetrics> {
        self.output.metrics().shared().clone()
    }

    /// Streams until `shutdown` turns true, reconnecting with backoff after transient
    /// failures (Postgres restarts, network errors, broker outages). Returns a
    /// permanent error, or `Ok` after a graceful shutdown that confirmed everything
    /// acknowledged.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), PostgresError> {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER);
        loop {
            self.output.metrics().set_state(SourceState::Starting);
            let error = match self.run_session(&mut shutdown).await {
                Ok(()) => {
                    self.output.metrics().set_state(SourceState::Stopped);
                    return Ok(());
                }
                Err(error) if error.is_transient() => error,
                Err(error) => {
                    self.output.metrics().set_state(SourceState::Stopped);
                    self.output.metrics().set_error(Some(report(&error)));
                    return Err(error);
                }
            };
            let delay = backoff.next_delay();
            tracing::warn!(error = %report(&error), retry_in = ?delay, "PostgreSQL source failed; reconnecting");
            self.output.metrics().set_state(SourceState::Reconnecting);
            self.output.metrics().set_error(Some(report(&error)));
            self.output.metrics().reconnects().inc();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut shutdown) => {
                    self.output.metrics().set_state(SourceState::Stopped);
                    return Ok(());
                }
            }
        }
    }

    async fn run_session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), PostgresError> {
        let client = self.catalog.connect().await?;
        setup::check_server(&client).await?;
        setup::ensure_publication(&client, &self.config).await?;
        setup::report_replica_identity(&client, &self.config.publication_name()).await?;
        let replication = self.open_replication(&client).await?;
        let info = SourceInfo {
            name: self.config.name.clone(),
            db: client
                .query_one("SELECT current_database()", &[])
                .await?
                .get(0),
        };
        self.output.metrics().set_state(SourceState::Streaming);
        self.output.metrics().set_error(None);
        Stream {
            catalog: &self.catalog,
            output: &self.output,
            config: &self.config,
            client: Arc::new(client),
            replication,
            info,
            decoder: Decoder::new(),
            relations: Relations::default(),
            tx: None,
            lane: self.output.lane(),
            confirmed: Lsn::default(),
        }
        .run(shutdown)
        .await
    }

    /// Opens the replication session: creates the slot (and snapshots) when needed,
    /// else resumes from the slot's confirmed position.
    async fn open_replication(&self, client: &Client) -> Result<ReplicationClient, PostgresError> {
        let slot = self.config.slot_name();
        let done_key = format!("postgres/{slot}/snapshot_done");
        let existing = setup::inspect_slot(client, &slot).await?;
        let snapshot_done = self.checkpoints.get(&done_key)?.is_some();
        let must_snapshot = match self.config.snapshot {
            SnapshotMode::Never => false,
            SnapshotMode::Always => true,
            SnapshotMode::Initial => existing.is_none() || !snapshot_done,
        };
        if existing.is_some() && !must_snapshot {
            tracing::info!(%slot, confirmed = ?existing.and_then(|s| s.confirmed_flush_lsn), "resuming from the replication slot");
            let mut replication = ReplicationClient::connect(self.replication_config()?).await?;
            replication.wait_started().await?;
            return Ok(replication);
        }
        if existing.is_some() {
            tracing::warn!(%slot, "the last snapshot did not complete (or snapshot = always): re-creating the slot to take a new one");
            setup::drop_slot(client, &slot).await?;
        }
        self.checkpoints.remove(&done_key)?;
        let mut replication = ReplicationClient::connect_gated(self.replication_config()?).await?;
        let mode = if must_snapshot { "export" } else { "nothing" };
        let rows = replication
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{mode}')",
                quote_ident(&slot)
            ))
            .await?;
        let field = |i: usize| {
            rows.first()
                .and_then(|row| row.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let consistent_point = field(1)
            .and_then(|text| parse_lsn(&text))
            .unwrap_or_default();
        tracing::info!(%slot, %consistent_point, "created replication slot");
        if let (true, Some(snapshot_name)) = (must_snapshot, field(2)) {
            // The exported snapshot lives while the replication session stays idle.
            self.output.metrics().set_state(SourceState::Snapshotting);
            Snapshot::new(&self.catalog, &self.output, &self.config, consistent_point)
                .run(&snapshot_name)
                .await?;
        }
        self.checkpoints
            .put(&done_key, consistent_point.to_string().as_bytes())?;
        replication.start().await?;
        replication.wait_started().await?;
        Ok(replication)
    }

    fn replication_config(&self) -> Result<ReplicationConfig, PostgresError> {
        let pg = self.config.connection()?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let mut config = ReplicationConfig::new(
            host,
            pg.get_user().unwrap_or_default(),
            password,
            pg.get_dbname().unwrap_or_default(),
            self.config.slot_name(),
            self.config.publication_name(),
        )
        .with_port(pg.get_ports().first().copied().unwrap_or(5432))
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(5))
        .with_options(SESSION_OPTIONS)
        .with_tls(self.config.tls.replication());
        config.application_name = Some("changewire".to_owned());
        Ok(config)
    }
}

impl ChangeSource for PostgresConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "PostgreSQL"
    }

    fn check(&self) -> BoxFuture<'_, Result<String, SourceError>> {
        Box::pin(async move { check(self).await.map_err(SourceError::from) })
    }

    fn run(self: Box<Self>, context: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let source = PostgresSource::new(
                *self,
                context.topics,
                context.codec,
                context.publisher,
                context.state,
            )
            .with_metrics(context.metrics);
            Ok(source.run(context.shutdown).await?)
        })
    }
}

/// Reads, every few seconds until dropped, how far the slot's confirmed position
/// trails the server's WAL, for the lag gauge. The replication stream cannot tell:
/// the walsender reports only what it has sent, and sends nothing while it decodes
/// changes of no interest.
struct LagProbe(tokio::task::JoinHandle<()>);

impl LagProbe {
    fn spawn(client: Arc<Client>, slot: String, lag_bytes: Gauge) -> Self {
        Self(tokio::spawn(async move {
            let mut interval = tokio::time::interval(LAG_PROBE_INTERVAL);
            loop {
                interval.tick().await;
                match tokio::time::timeout(LAG_PROBE_TIMEOUT, slot_lag(&client, &slot)).await {
                    Ok(Ok(Some(lag))) => {
                        lag_bytes.set(lag.max(0));
                    }
                    Ok(Ok(None)) => {
                        tracing::debug!(%slot, "the slot has no confirmed position yet")
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "cannot read the replication lag"),
                    Err(_) => tracing::debug!("reading the replication lag timed out"),
                }
            }
        }))
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// WAL bytes between the server's position and `slot`'s confirmed one.
async fn slot_lag(client: &Client, slot: &str) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END) - confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    row.try_get(0)
}

/// How often the slot's lag behind the server's WAL is read.
const LAG_PROBE_INTERVAL: Duration = Duration::from_secs(2);
const LAG_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `--check` found on the server: it is reachable with these settings and
/// ready for logical replication.
pub async fn check(config: &PostgresConfig) -> Result<String, PostgresError> {
    let client = catalog::connect(config).await?;
    setup::check_server(&client).await?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let tables = setup::selected_tables(&client, config).await?.len();
    Ok(format!(
        "PostgreSQL {version}, wal_level = logical, {tables} table(s) selected"
    ))
}

/// One replication session's state.
struct Stream<'a> {
    catalog: &'a Catalog,
    output: &'a Output,
    config: &'a PostgresConfig,
    client: Arc<Client>,
    replication: ReplicationClient,
    info: SourceInfo,
    decoder: Decoder,
    relations: Relations,
    tx: Option<TxContext>,
    lane: Lane<Checkpoint>,
    confirmed: Lsn,
}

impl Stream<'_> {
    async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), PostgresError> {
        // Its own task: the lag matters most when this loop waits (on a broker that
        // is down, say).
        let _lag_probe = LagProbe::spawn(
            self.client.clone(),
            self.config.slot_name(),
            self.output.metrics().lag_bytes(),
        );
        loop {
            tokio::select! {
                biased;
                () = stopped(shutdown) => return self.shut_down().await,
                Some(checkpoint) = self.lane.next_confirmed() => self.confirm(checkpoint?),
                event = self.replication.recv() => {
                    match event? {
                        Some(event) => self.handle(event).await?,
                        None => return Err(PostgresError::Replication(pgwire_replication::PgWireError::Task("replication stream ended".into()))),
                    }
                }
            }
        }
    }

    /// Confirms `checkpoint` to the server (monotonic).
    fn confirm(&mut self, checkpoint: Checkpoint) {
        if checkpoint.lsn > self.confirmed {
            self.confirmed = checkpoint.lsn;
            self.replication
                .update_applied_lsn(pgwire_replication::Lsn(checkpoint.lsn.0));
            let metrics = self.output.metrics();
            metrics
                .confirmed_lsn()
                .set(i64::try_from(checkpoint.lsn.0).unwrap_or(i64::MAX));
            metrics
                .lag_seconds()
                .set((now_ms() - checkpoint.commit_ms).max(0) as f64 / 1000.0);
        }
    }

    async fn handle(&mut self, event: ReplicationEvent) -> Result<(), PostgresError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                let commit_ms = pg_micros_to_unix_ms(commit_time_micros);
                self.tx = Some(TxContext::new(xid, Lsn(final_lsn.0), commit_ms));
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let message = self.decoder.decode(&data)?;
                self.handle_message(message, Lsn(wal_start.0)).await?;
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.tx = None;
                let checkpoint = Checkpoint {
                    lsn: Lsn(end_lsn.0),
                    commit_ms: pg_micros_to_unix_ms(commit_time_micros),
                };
                self.lane.mark(checkpoint);
            }
            // Between transactions with nothing in flight, everything up to the server's
            // position is published: confirm it so the slot advances even when only
            // unpublished tables change.
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.tx.is_none() && !self.lane.has_marks() && self.lane.in_flight() == 0 =>
            {
                // Caught up: nothing of the server's is waiting on us.
                self.confirm(Checkpoint {
                    lsn: Lsn(wal_end.0),
                    commit_ms: now_ms(),
                });
            }
            ReplicationEvent::KeepAlive { .. } => {}
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    async fn handle_message(&mut self, message: Message, lsn: Lsn) -> Result<(), PostgresError> {
        let (oid, op, old, new) = match message {
            Message::Relation(relation) => {
                let table = self.catalog.describe(&self.client, relation).await?;
                self.relations.insert(table);
                return Ok(());
            }
            Message::Insert { relation, new } => (relation, Op::Create, None, Some(new)),
            Message::Update { relation, old, new } => {
                (relation, Op::Update, old.map(old_tuple), Some(new))
            }
            Message::Delete { relation, old } => (relation, Op::Delete, Some(old_tuple(old)), None),
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    self.publish(oid, Op::Truncate, None, None, lsn).await?;
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        self.publish(oid, op, old, new, lsn).await
    }

    async fn publish(
        &mut self,
        oid: u32,
        op: Op,
        old: Option<Vec<super::pgoutput::Value>>,
        new: Option<Vec<super::pgoutput::Value>>,
        lsn: Lsn,
    ) -> Result<(), PostgresError> {
        let table = self
            .relations
            .get(oid)
            .ok_or(PostgresError::UnknownRelation(oid))?;
        let tx = self
            .tx
            .as_mut()
            .ok_or(PostgresError::UnknownRelation(oid))?;
        let change = Change {
            op,
            before: old.map(|t| table.row(&t)).transpose()?,
            after: new.map(|t| table.row(&t)).transpose()?,
            lsn,
        };
        let event = self.info.event(table, tx, change, now_ms());
        let tombstone = op == Op::Delete && self.config.tombstones;
        self.output.count(table, op);
        self.output
            .publish(&mut self.lane, table, &event, tombstone)
            .await?;
        while let Some(checkpoint) = self.lane.take_confirmed()? {
            self.confirm(checkpoint);
        }
        Ok(())
    }

    /// Stops reading, waits for every acknowledgement, confirms, and gives the client
    /// one status interval to report the final position before closing.
    async fn shut_down(mut self) -> Result<(), PostgresError> {
        tracing::info!(
            in_flight = self.lane.in_flight(),
            "shutting down: waiting for Kafka acknowledgements"
        );
        while let Some(checkpoint) = self.lane.next_confirmed().await {
            self.confirm(checkpoint?);
        }
        tokio::time::sleep(STATUS_INTERVAL + Duration::from_millis(200)).await;
        self.replication.stop();
        let _ = self.replication.shutdown().await;
        tracing::info!(confirmed = %self.confirmed, "PostgreSQL source stopped");
        Ok(())
    }
}

fn old_tuple(old: OldTuple) -> Vec<super::pgoutput::Value> {
    match old {
        OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
    }
}

/// Resolves once shutdown was requested (or its sender is gone). Returns `()` so no
/// watch guard is held across an await.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub(super) fn parse_lsn(text: &str) -> Option<Lsn> {
    let (high, low) = text.split_once('/')?;
    Some(Lsn(
        (u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?
    ))
}
