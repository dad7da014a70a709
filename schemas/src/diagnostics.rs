//! Error reports for logs and command-line output.

/// `error` with its chain of causes on one line: `outer: cause: root cause`.
pub fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The environment variable that chooses the log format (`text` or `json`) when
/// no `--log-format` flag does.
pub const LOG_FORMAT_VAR: &str = "CHANGEWIRE_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: one line per event, colours on a terminal.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("expected text or json, got {other:?}")),
        }
    }
}

impl LogFormat {
    /// `flag` if given, else `CHANGEWIRE_LOG_FORMAT`, else text.
    pub fn chosen(flag: Option<LogFormat>) -> Result<Self, String> {
        match (flag, std::env::var(LOG_FORMAT_VAR)) {
            (Some(format), _) => Ok(format),
            (None, Ok(text)) => text.parse().map_err(|e| format!("{LOG_FORMAT_VAR}: {e}")),
            (None, Err(_)) => Ok(Self::Text),
        }
    }
}

/// Logs to stderr in `format`, filtered by `RUST_LOG`, default `info`: what
/// every changewire binary does at start.
pub fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
