//! `changewire-consumer`: runs one consumer service (dedup, forward or audit),
//! chosen by the section its config file has.

use std::path::PathBuf;
use std::process::ExitCode;

use changewire_consumer::config::ConsumerConfig;
use changewire_consumer::runtime::{self, RunStats};
use changewire_consumer::services::alert::dry_run::AlertCommand;
use changewire_consumer::services::alert::{self, Alert, AlertConfig};
use changewire_consumer::services::audit::cli::AuditCommand;
use changewire_consumer::services::audit::{self, Audit, AuditConfig};
use changewire_consumer::services::dedup::{Dedup, DedupConfig};
use changewire_consumer::services::forward::{Forward, ForwardConfig};
use changewire_consumer::services::gateway::{self, Gateway, GatewayConfig};
use changewire_consumer::services::siem::{Siem, SiemConfig};
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
    #[arg(long, short, required = false)]
    config: Option<PathBuf>,
    /// Validate the config, then exit.
    #[arg(long)]
    check: bool,
    /// Log lines as `text` or `json` (default: `CHANGEWIRE_LOG_FORMAT`, else text).
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// A tool instead of a service.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Tools.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The audit log from a terminal: query, history, verify.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Alert rules from a terminal: dry-run.
    #[command(subcommand)]
    Alert(AlertCommand),
}

/// Exit status for configuration errors (distinct from runtime failures).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::Audit(command)) => return run_tool(audit::cli::run(command)),
        Some(Command::Alert(command)) => return run_tool(alert::dry_run::run(command)),
        None => {}
    }
    let Some(path) = args.config else {
        eprintln!("changewire-consumer: --config <FILE> is required to run a service");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match ConsumerConfig::load(&path) {
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

/// Runs a tool to its end: exit status 0, 1 when it found a problem or failed.
fn run_tool(
    tool: impl std::future::Future<Output = Result<bool, Box<dyn std::error::Error + Send + Sync>>>,
) -> ExitCode {
    let outcome = tokio::runtime::Runtime::new()
        .map_err(|e| e.to_string())
        .and_then(|runtime| runtime.block_on(tool).map_err(|e| report(e.as_ref())));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("changewire-consumer: {error}");
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
enum Service<'a> {
    Dedup(&'a DedupConfig),
    Forward(&'a ForwardConfig),
    Audit(&'a AuditConfig),
    Siem(&'a SiemConfig),
    Alert(&'a AlertConfig),
    Gateway(&'a GatewayConfig),
}

impl<'a> Service<'a> {
    fn from_config(config: &'a ConsumerConfig) -> Result<Self, ConfigError> {
        let sections = [
            config.dedup.as_ref().map(Self::Dedup),
            config.forward.as_ref().map(Self::Forward),
            config.audit.as_ref().map(Self::Audit),
            config.siem.as_ref().map(Self::Siem),
            config.alert.as_ref().map(Self::Alert),
            config.gateway.as_ref().map(Self::Gateway),
        ];
        let mut present = sections.into_iter().flatten();
        match (present.next(), present.next()) {
            (Some(service), None) => Ok(service),
            _ => Err(ConfigError::invalid(
                "dedup/forward/audit/siem/alert/gateway",
                "expected exactly one service section: [dedup], [forward], [audit], [siem], [alert] or [gateway]",
            )),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Dedup(_) => "dedup",
            Self::Forward(_) => "forward",
            Self::Audit(_) => "audit",
            Self::Siem(_) => "siem",
            Self::Alert(_) => "alert",
            Self::Gateway(_) => "gateway",
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
                let (handler, sinks) = Dedup::new(&config, dedup)?;
                runtime::run(&config, handler, sinks, shutdown).await?
            }
            Self::Forward(forward) => {
                let (handler, sinks) = Forward::new(forward)?;
                runtime::run(&config, handler, sinks, shutdown).await?
            }
            Self::Audit(audit) => run_audit(&config, audit, shutdown).await?,
            Self::Siem(siem) => {
                let (handler, sinks) = Siem::new(siem)?;
                runtime::run(&config, handler, sinks, shutdown).await?
            }
            Self::Alert(alert) => {
                let (handler, sinks) = Alert::new(alert, &config.service.state_dir)?;
                tokio::spawn(handler.rules_watcher());
                if let Some(listen) = alert.listen {
                    let listener = tokio::net::TcpListener::bind(listen).await?;
                    tracing::info!(listen = %listener.local_addr()?, "serving the silences API");
                    let router =
                        alert::silences::router(handler.silences(), alert.api_tokens.clone());
                    tokio::spawn(changewire_schemas::http::serve(listener, router));
                }
                runtime::run(&config, handler, sinks, shutdown).await?
            }
            Self::Gateway(gateway) => run_gateway(&config, gateway, shutdown).await?,
        })
    }
}

/// The gateway service, with its status API on the store the runtime writes.
async fn run_gateway(
    config: &runtime::RuntimeConfig,
    gateway: &GatewayConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunStats, Box<dyn std::error::Error + Send + Sync>> {
    let store = runtime::open_store(config)?;
    runtime::ensure_topic(config, &gateway.status_topic(config), 1).await?;
    let (handler, sinks) = Gateway::new(config, gateway)?;
    let api = match gateway.listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(listen = %listener.local_addr()?, "serving the gateway status API");
            let router = gateway::status::router(store.clone(), gateway.api_tokens.clone());
            Some(tokio::spawn(changewire_schemas::http::serve(
                listener, router,
            )))
        }
        None => None,
    };
    let result = runtime::run_on(config, store, handler, sinks, shutdown).await;
    if let Some(api) = api {
        api.abort();
    }
    Ok(result?)
}

/// The audit service: its query API on the store the runtime writes.
async fn run_audit(
    config: &runtime::RuntimeConfig,
    audit: &AuditConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunStats, Box<dyn std::error::Error + Send + Sync>> {
    let store = runtime::open_store(config)?;
    runtime::ensure_topic(config, &audit.heads_topic(config), 1).await?;
    let (handler, sinks) = Audit::new(config, audit)?;
    let listener = tokio::net::TcpListener::bind(audit.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving the audit API");
    let router = audit::api::router(audit, store.clone(), handler.verifying_key());
    let api = tokio::spawn(changewire_schemas::http::serve(listener, router));
    let result = runtime::run_on(config, store, handler, sinks, shutdown).await;
    api.abort();
    Ok(result?)
}
