//! `changewire-producer`: reads its config, checks the broker, and streams changes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use changewire_producer::config::ProducerConfig;
use std::sync::Arc;

use changewire_producer::checkpoint::SledCheckpoints;
use changewire_producer::postgres::PostgresSource;
use changewire_producer::sink::KafkaSink;
use changewire_schemas::diagnostics::report;
use changewire_schemas::http;
use changewire_schemas::Codec;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "changewire-producer",
    version,
    about = "Stream database and Kubernetes changes to Kafka"
)]
struct Args {
    /// TOML config file; `CHANGEWIRE_<SECTION>__<KEY>` variables override its keys.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the config and reach the broker, then exit.
    #[arg(long)]
    check: bool,
}

/// Exit status for configuration errors (distinct from runtime failures).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    changewire_schemas::diagnostics::init_logging();
    let args = Args::parse();
    let config = match ProducerConfig::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("changewire-producer: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(config, args.check).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("changewire-producer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ProducerConfig, check_only: bool) -> anyhow::Result<()> {
    tracing::info!(kafka = ?config.kafka, postgres = ?config.postgres, format = ?config.format.value, "starting");
    let codec = Codec::from_config(&config.format)
        .await
        .context("cannot set up the value codec")?;
    let sink = KafkaSink::new(&config.kafka).context("cannot create the Kafka producer")?;
    let brokers = sink
        .broker_count(Duration::from_secs(10))
        .with_context(|| format!("cannot reach Kafka at {}", config.kafka.brokers))?;
    tracing::info!(brokers, format = ?codec.format(), "Kafka reachable, configuration valid");
    if check_only {
        return Ok(());
    }
    let Some(postgres) = config.postgres else {
        anyhow::bail!(
            "nothing to stream: no change source is configured (add a [postgres] section)"
        )
    };
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let checkpoints = SledCheckpoints::open(&config.state_dir)
        .with_context(|| format!("cannot open checkpoints in {}", config.state_dir.display()))?;
    let names = config.topics.names()?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop.send(true);
    });
    let source = PostgresSource::new(
        postgres,
        names,
        Arc::new(codec),
        Arc::new(sink),
        Arc::new(checkpoints),
    );
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "serving /metrics and /health");
    let router = http::router(source.metrics(), config.http.token.clone());
    tokio::spawn(async move {
        if let Err(error) = http::serve(listener, router).await {
            tracing::error!(%error, "HTTP endpoint failed");
        }
    });
    source
        .run(shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(report(&e)))
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the producer");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
