//! A complete consumer service: counts events per table, and how often each event
//! id took effect. Copy it to subscribe a service of your own:
//!
//! ```sh
//! cargo run -p changewire-consumer --example count_events -- --config config/count.toml
//! ```
//!
//! The runtime gives the handler each new event once, with a [`Context`] whose
//! writes are committed atomically with the partition offset. This service
//! keeps state only; one that acts on the outside world emits effects with
//! `context.emit(sink, effect)` to sinks passed instead of `Sinks::new()`.

use std::path::PathBuf;

use anyhow::Context as _;
use changewire_consumer::config::ConsumerConfig;
use changewire_consumer::runtime::{self, Context, Handler, HandlerError, Record, Sinks};
use changewire_schemas::{ChangeEvent, Origin};
use clap::Parser;
use serde_json::value::RawValue;

/// Counts events; state keys `table/<schema.table>` and `applied/<event id>`.
struct CountEvents;

fn increment(context: &mut Context<'_>, key: String) -> Result<(), HandlerError> {
    let current = context
        .get(key.as_bytes())
        .map_err(HandlerError::from)?
        .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    context.put(key, (current + 1).to_string());
    Ok(())
}

impl Handler for CountEvents {
    // It reads no row: rows stay JSON text, which decodes faster.
    type Row = Box<RawValue>;

    async fn handle(
        &self,
        event: &ChangeEvent<Self::Row>,
        _record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let entity = match &event.source.origin {
            Origin::Postgresql(pg) => format!("{}.{}", pg.schema, pg.table),
            Origin::Kubernetes(k8s) => format!("{}/{}", k8s.group, k8s.kind),
        };
        increment(context, format!("table/{entity}"))?;
        increment(context, format!("applied/{}", event.id))
    }
}

/// Command-line flags.
#[derive(Parser)]
struct Args {
    /// TOML config file (see config/dedup.toml for the keys).
    #[arg(long, short)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let format =
        changewire_schemas::diagnostics::LogFormat::chosen(None).map_err(anyhow::Error::msg)?;
    changewire_schemas::diagnostics::init_logging(format);
    let args = Args::parse();
    let config = ConsumerConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let shutdown = runtime::stop_on_signals()?;
    let stats = runtime::run(&config.runtime(), CountEvents, Sinks::new(), shutdown).await?;
    tracing::info!(?stats, "stopped");
    Ok(())
}
