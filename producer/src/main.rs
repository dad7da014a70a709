//! `changewire-producer`: reads its config, checks the broker, and streams changes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use changewire_producer::config::ProducerConfig;
use std::sync::Arc;

use changewire_kafka::Publisher;
use changewire_producer::checkpoint::SledCheckpoints;
use changewire_producer::kubernetes::SledObjects;
use changewire_producer::metrics::ProducerMetrics;
use changewire_producer::source::{ChangeSource, SourceContext};
use changewire_schemas::diagnostics::report;
use changewire_schemas::diagnostics::LogFormat;
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
    /// Log lines as `text` or `json` (default: `CHANGEWIRE_LOG_FORMAT`, else text).
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
}

/// Exit status for configuration errors (distinct from runtime failures).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match LogFormat::chosen(args.log_format) {
        Ok(format) => changewire_schemas::diagnostics::init_logging(format),
        Err(error) => {
            eprintln!("changewire-producer: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
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
    tracing::info!(kafka = ?config.kafka, postgres = ?config.postgres, kubernetes = ?config.kubernetes, format = ?config.format.value, "starting");
    let codec = Codec::from_config(&config.format)
        .await
        .context("cannot set up the value codec")?;
    let metrics = Arc::new(ProducerMetrics::default());
    let publisher = Publisher::for_source(&config.kafka)
        .context("cannot create the Kafka producer")?
        .with_topic_settings(&config.topics);
    let brokers = publisher
        .broker_count(Duration::from_secs(10))
        .with_context(|| format!("cannot reach Kafka at {}", config.kafka.brokers))?;
    tracing::info!(brokers, format = ?codec.format(), "Kafka reachable, configuration valid");
    let sources = config.sources();
    if check_only {
        for source in &sources {
            report_check(source.as_ref()).await?;
        }
        return Ok(());
    }
    if sources.is_empty() {
        anyhow::bail!("nothing to stream: no change source is configured (add a [postgres] or [kubernetes] section)")
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
    let state =
        Arc::new(SledCheckpoints::open(&config.state_dir).with_context(|| {
            format!("cannot open checkpoints in {}", config.state_dir.display())
        })?);
    if let Some(first) = config.kubernetes.first() {
        SledObjects::adopt_unnamed(state.db(), &first.name)
            .context("cannot move the Kubernetes object state to its source")?;
    }
    let topics = config.topics.names()?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop.send(true);
    });
    let codec = Arc::new(codec);
    serve_http(&config, metrics.clone()).await?;
    let mut running = tokio::task::JoinSet::new();
    for source in sources {
        let context = SourceContext {
            topics: topics.clone(),
            codec: codec.clone(),
            publisher: publisher.clone(),
            state: state.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        };
        let (kind, name) = (source.kind(), source.name().to_owned());
        running.spawn(async move {
            let result = source.run(context).await;
            result.map_err(|e| anyhow::anyhow!("{kind} source {name:?}: {}", report(e.as_ref())))
        });
    }
    // One source failing stops the producer: a half-working producer would look healthy.
    while let Some(result) = running.join_next().await {
        result??;
    }
    Ok(())
}

/// Logs what one source's check found; a server that accepts connections but
/// never answers fails it too.
async fn report_check(source: &dyn ChangeSource) -> anyhow::Result<()> {
    const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
    let (kind, name) = (source.kind(), source.name());
    let found = match tokio::time::timeout(CHECK_TIMEOUT, source.check()).await {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            anyhow::bail!(
                "the {kind} check failed for source {name:?}: {}",
                report(error.as_ref())
            )
        }
        Err(_) => anyhow::bail!(
            "the {kind} check failed for source {name:?}: no answer within {CHECK_TIMEOUT:?}"
        ),
    };
    tracing::info!(source = name, "{found}");
    Ok(())
}

/// Serves `/metrics` and `/health` in the background.
async fn serve_http(config: &ProducerConfig, metrics: Arc<ProducerMetrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics and /health");
    let router = http::router(metrics, config.http.token.clone());
    tokio::spawn(async move {
        if let Err(error) = http::serve(listener, router).await {
            tracing::error!(%error, "HTTP endpoint failed");
        }
    });
    Ok(())
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
