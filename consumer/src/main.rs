//! `changewire-consumer`: runs one consumer service (dedup or forward), chosen by
//! the section its config file has.

use std::path::PathBuf;
use std::process::ExitCode;

use changewire_consumer::config::ConsumerConfig;
use changewire_consumer::runtime::{self, RunStats};
use changewire_consumer::services::dedup::{Dedup, DedupConfig};
use changewire_consumer::services::forward::{Forward, ForwardConfig};
use changewire_schemas::diagnostics::report;
use changewire_schemas::diagnostics::LogFormat;
use changewire_schemas::settings::ConfigError;
use clap::Parser;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(
    name = "changewire-consumer",
    version,
    about = "Run a changewire consumer service"
)]
struct Args {
    /// TOML config file; `CHANGEWIRE_<SECTION>__<KEY>` variables override its keys.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the config, then exit.
    #[arg(long)]
    check: bool,
    /// Log lines as `text` or `json` (default: `CHANGEWIRE_LOG_FORMAT`, else text).
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
}

/// Exit status for configuration errors (distinct from runtime failures).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ConsumerConfig::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("changewire-consumer: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let service = match Service::from_config(&config) {
        Ok(service) => service,
        Err(error) => {
            eprintln!("changewire-consumer: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        eprintln!(
            "changewire-consumer: configuration valid ({} service {:?}, group {})",
            service.kind(),
            config.service.name,
            config.group_id()
        );
        return check_kafka(&config);
    }
    match LogFormat::chosen(args.log_format) {
        Ok(format) => changewire_schemas::diagnostics::init_logging(format),
        Err(error) => {
            eprintln!("changewire-consumer: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("changewire-consumer: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(service.run(&config)) {
        Ok(stats) => {
            tracing::info!(?stats, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %report(error.as_ref()), "stopped");
            ExitCode::FAILURE
        }
    }
}

/// Reaches the brokers the service will read from, as `--check` promises:
/// exit status 1 with the reason when they cannot be reached.
fn check_kafka(config: &ConsumerConfig) -> ExitCode {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let reached = runtime::client_config(&config.runtime())
        .create::<BaseConsumer>()
        .and_then(|client| client.fetch_metadata(None, std::time::Duration::from_secs(10)));
    match reached {
        Ok(metadata) => {
            eprintln!(
                "changewire-consumer: Kafka reachable at {} ({} brokers)",
                config.kafka.brokers,
                metadata.brokers().len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "changewire-consumer: cannot reach Kafka at {}: {error}",
                config.kafka.brokers
            );
            ExitCode::FAILURE
        }
    }
}

/// The service a config selects, by which section it has.
enum Service {
    Dedup(DedupConfig),
    Forward(ForwardConfig),
}

impl Service {
    fn from_config(config: &ConsumerConfig) -> Result<Self, ConfigError> {
        match (&config.dedup, &config.forward) {
            (Some(dedup), None) => Ok(Self::Dedup(dedup.clone())),
            (None, Some(forward)) => Ok(Self::Forward(forward.clone())),
            _ => Err(ConfigError::invalid(
                "dedup/forward",
                "expected exactly one service section: [dedup] or [forward]",
            )),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Dedup(_) => "dedup",
            Self::Forward(_) => "forward",
        }
    }

    async fn run(
        self,
        config: &ConsumerConfig,
    ) -> Result<RunStats, Box<dyn std::error::Error + Send + Sync>> {
        let shutdown = runtime::stop_on_signals()?;
        let config = config.runtime();
        Ok(match self {
            Self::Dedup(dedup) => {
                let (handler, sinks) = Dedup::new(&config, &dedup)?;
                runtime::run(&config, handler, sinks, shutdown).await?
            }
            Self::Forward(forward) => {
                let (handler, sinks) = Forward::new(&forward)?;
                runtime::run(&config, handler, sinks, shutdown).await?
            }
        })
    }
}
