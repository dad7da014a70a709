//! Test support for the runtime's unit tests: records, events, effects and a
//! worker over a temporary store, with a scripted handler. No broker: the
//! pieces under test (the batch pipeline, parking, the outbox, the cursor) do
//! not touch one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use changewire_schemas::{ChangeEvent, Codec, EventId};

use super::config::{RuntimeConfig, ServiceConfig};
use super::dlq::{self, DeadLetters};
use super::handler::{Context, Handler, HandlerError, Record, Seal};
use super::ids::ProcessedIds;
use super::outbox::{Effect, Outbox, Pending};
use super::store::Store;
use super::worker::Worker;
use super::RunStats;

/// A record of topic `t` with `payload`.
pub(super) fn record(partition: i32, offset: i64, payload: &[u8]) -> Record {
    Record {
        topic: "t".into(),
        partition,
        offset,
        key: None,
        headers: Vec::new(),
        payload: payload.to_vec(),
    }
}

/// The id of event number `n`.
pub(super) fn event_id(n: u64) -> String {
    EventId::postgres("src", 0x100 + n, 1).to_string()
}

/// A record holding event number `n` (a create), as JSON.
pub(super) fn event_record(partition: i32, offset: i64, n: u64) -> Record {
    let lsn = 0x100 + n;
    let event: ChangeEvent = serde_json::from_value(serde_json::json!({
        "id": event_id(n), "op": "c", "ts_ms": 1, "after": {"id": n},
        "source": {"name": "src", "ts_ms": 1, "connector": "postgresql", "db": "shop",
                   "schema": "public", "table": "orders", "lsn": lsn},
    }))
    .expect("an event");
    let payload = Codec::json()
        .and_then(|c| c.encode(&event))
        .expect("encodes");
    record(partition, offset, &payload)
}

/// An effect for `sink` numbered `sequence` (its own entry), with `key`.
pub(super) fn pending(sequence: u64, sink: &str, key: Option<&str>) -> Pending {
    Pending {
        sequence,
        entry: sequence,
        sink: sink.into(),
        idempotency_key: format!("{}/{sink}/0", event_id(sequence)),
        effect: Effect {
            destination: Some("cw.out".into()),
            key: key.map(|k| k.as_bytes().to_vec()),
            headers: vec![("h".into(), Some(b"v".to_vec())), ("absent".into(), None)],
            ..Effect::new(b"{\"x\":1}".to_vec())
        },
    }
}

/// What the scripted handler does with an event id, attempt after attempt
/// (applied, emitting one effect to sink `s`, once the script runs out).
#[derive(Default)]
pub(super) struct Scripted {
    script: Mutex<HashMap<String, VecDeque<&'static str>>>,
    /// Ids applied since the last seal.
    applied: Mutex<Vec<String>>,
}

impl Scripted {
    /// Event `n` fails with these classes, in turn.
    pub(super) fn fails(self, n: u64, classes: &[&'static str]) -> Self {
        let mut script = self.script.lock().expect("script");
        script.insert(event_id(n), classes.iter().copied().collect());
        drop(script);
        self
    }
}

impl Handler for Scripted {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let next = self
            .script
            .lock()
            .expect("script")
            .get_mut(event.id.as_str())
            .and_then(VecDeque::pop_front);
        match next {
            Some("transient") => Err(HandlerError::transient("busy")),
            Some("unavailable") => Err(HandlerError::unavailable("down")),
            Some("permanent") => Err(HandlerError::permanent("invalid")),
            Some(_) => Err(HandlerError::fatal("corrupt")),
            None => {
                context.put(format!("applied/{}", event.id), "1");
                context.emit("s", Effect::new(event.id.to_string().into_bytes()))?;
                self.applied
                    .lock()
                    .expect("applied")
                    .push(event.id.to_string());
                Ok(())
            }
        }
    }

    /// Notes what the last seal wrote.
    async fn tick(
        &self,
        _: std::time::SystemTime,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let sealed = context.get(b"sealed")?.unwrap_or_default();
        context.put("ticked", sealed);
        Ok(())
    }

    fn take_seal(&self) -> Option<Box<dyn Seal>> {
        let applied = std::mem::take(&mut *self.applied.lock().expect("applied"));
        Some(Box::new(Applied(applied)))
    }
}

/// The events a batch applied, as its seal has them.
struct Applied(Vec<String>);

/// Notes how many of the batch's applied events it sees as changed.
impl Seal for Applied {
    fn seal(self: Box<Self>, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let mut seen = 0;
        for id in &self.0 {
            seen += usize::from(context.get(format!("applied/{id}").as_bytes())?.is_some());
        }
        context.put("sealed", format!("{seen} of {}", self.0.len()));
        Ok(())
    }
}

/// A runtime configuration for tests (two attempts at transient failures).
pub(super) fn config(state: &std::path::Path) -> RuntimeConfig {
    let mut service = ServiceConfig::new("svc", vec!["t".into()], state.to_owned());
    service.max_attempts = 2;
    RuntimeConfig {
        kafka: serde_json::from_value(serde_json::json!({"brokers": "localhost:9092"}))
            .expect("kafka section"),
        topics: Default::default(),
        http: None,
        service,
    }
}

/// A worker over a store in `config`'s state dir, owning partitions 0 and 1
/// of topic `t`, its handler emitting to sink `s`.
pub(super) fn worker<H: Handler>(config: &RuntimeConfig, handler: H) -> Worker<'_, H> {
    let store = Store::open(&config.service.state_dir).expect("store");
    let sinks = vec!["s".to_owned(), dlq::SINK.to_owned()];
    let worker = Worker {
        config,
        handler,
        instance: "test".into(),
        processed: ProcessedIds::load(&store, config.retention(), 1000).expect("ids"),
        store,
        dlq: DeadLetters::new("cw.dlq.svc".into(), "svc".into()),
        codec: Codec::json().expect("codec"),
        metrics: Arc::default(),
        assignment: Arc::default(),
        outbox: Arc::new(Outbox::new(&sinks, None)),
        sink_names: sinks.into(),
        stats: RunStats::default(),
        parking: Default::default(),
        writing: None,
        outbox_full: false,
        gaps: Default::default(),
    };
    worker
        .assignment
        .take(vec![(("t".into(), 0), None), (("t".into(), 1), None)]);
    worker
}
