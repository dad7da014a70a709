//! `changewire-consumer`: runs one consumer service.

use std::path::PathBuf;
use std::process::ExitCode;

use changewire_consumer::config::ConsumerConfig;
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
    if args.check {
        eprintln!(
            "changewire-consumer: configuration valid (service {}, group {})",
            config.service.name,
            config.group_id()
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "changewire-consumer: service {:?} is not available in this build",
        config.service.name
    );
    ExitCode::FAILURE
}
