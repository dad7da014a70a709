//! A syslog sink: each effect's payload as the MSG of an RFC 5424 message, sent
//! over TCP with octet-counting framing (RFC 6587), optionally over TLS
//! (RFC 5425) with a client certificate.
//!
//! `<PRI>1 <time> <host> <app> - - - <payload>`: PRI from the configured facility
//! and severity, the time from the effect's `changewire-time-ms` header (RFC 3339,
//! UTC, milliseconds). A message longer than `max_message_bytes` is cut to fit, at
//! a character boundary and never inside an escape (`\`), and ends with
//! `[truncated]`; a frame is never split.
//!
//! Syslog over TCP has no acknowledgements: a chunk counts as delivered once
//! written and flushed. Before each chunk the connection is checked for a receiver
//! that hung up (it is then replaced), and a chunk whose write fails is sent again
//! whole on a new connection, so a restart of the receiver may repeat messages
//! (each names its event id) but does not drop any that were written after the
//! receiver closed the connection. What a receiver had read but not yet stored
//! when it died is beyond what the protocol can tell.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::time::rfc3339;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;
use tokio_native_tls::TlsStream;

use super::{this_host, time_of};
use crate::runtime::{Delivery, Pending, Sink, SinkError, Store};

/// What ends a message cut to the size limit.
pub const TRUNCATED: &str = "[truncated]";

/// RFC 5424's smallest message size every receiver must accept.
const MIN_MESSAGE_BYTES: usize = 480;

/// Syslog facilities by name, in code order (RFC 5424, 6.2.1).
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

/// Syslog severities by name, in code order.
const SEVERITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// A syslog sink's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// The receiver, `host:port` (6514 is syslog over TLS, 601 over TCP).
    pub address: String,
    /// Connect with TLS (RFC 5425).
    #[serde(default)]
    pub tls: Option<SyslogTlsConfig>,
    /// Facility of every message: `kern` ... `local7`.
    #[serde(default = "default_facility")]
    pub facility: String,
    /// Severity of every message: `emerg` ... `debug`.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// APP-NAME of every message.
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// HOSTNAME of every message (default: this machine's name).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Longest message (without its frame's length prefix); longer ones are cut.
    /// rsyslog accepts 8 KiB unless its `maxMessageSize` says more.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Messages per write.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Timeout of connecting (with the TLS handshake) and of each write, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// After connecting, how long to watch for a receiver that closes the
    /// connection at once (one refusing the client certificate does so only
    /// after the handshake) before sending to it, in ms.
    #[serde(default = "default_refusal_wait_ms")]
    pub refusal_wait_ms: u64,
}

/// TLS settings of a syslog sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogTlsConfig {
    /// CA certificates (PEM) the receiver's certificate must chain to; default:
    /// the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The client certificate (PEM), for receivers that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM, PKCS#8: `BEGIN PRIVATE KEY`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the receiver's certificate must carry; default: the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_facility() -> String {
    "local0".to_owned()
}

fn default_severity() -> String {
    "notice".to_owned()
}

fn default_app_name() -> String {
    "changewire".to_owned()
}

fn default_max_message_bytes() -> usize {
    8192
}

fn default_batch_size() -> usize {
    500
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_refusal_wait_ms() -> u64 {
    200
}

impl SyslogConfig {
    /// Checks the settings; `section` names them in messages. Returns PRI.
    pub fn validate(&self, section: &'static str) -> Result<u8, ConfigError> {
        let code = |names: &[&str], name: &str, what: &str| {
            let position = names.iter().position(|n| *n == name);
            position.ok_or_else(|| {
                ConfigError::invalid(
                    section,
                    format!("unknown {what} {name:?}: one of {names:?}"),
                )
            })
        };
        let facility = code(&FACILITIES, &self.facility, "facility")?;
        let severity = code(&SEVERITIES, &self.severity, "severity")?;
        if !self.address.contains(':') {
            return Err(ConfigError::invalid(
                section,
                format!("address {:?} is not host:port", self.address),
            ));
        }
        let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&self.app_name) || self.app_name.len() > 48 {
            return Err(ConfigError::invalid(
                section,
                "app_name must be 1 to 48 printable ASCII characters without spaces",
            ));
        }
        if self.hostname.as_deref().is_some_and(|h| !printable(h)) {
            return Err(ConfigError::invalid(
                section,
                "hostname must be printable ASCII without spaces",
            ));
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES
            || self.batch_size == 0
            || self.timeout_ms == 0
        {
            return Err(ConfigError::invalid(
                section,
                format!("max_message_bytes must be at least {MIN_MESSAGE_BYTES}; batch_size and timeout_ms at least 1"),
            ));
        }
        Ok((facility * 8 + severity) as u8)
    }

    fn host(&self) -> &str {
        let host = self.address.rsplit_once(':').map_or("", |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Why a chunk did not reach the receiver.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    /// No TCP connection.
    #[error("cannot connect to {address}")]
    Connect {
        /// The receiver.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificates, protocol).
    #[error("TLS handshake with {address} failed")]
    Tls {
        /// The receiver.
        address: String,
        /// Why.
        #[source]
        source: native_tls::Error,
    },
    /// Writing to the connection failed.
    #[error("cannot write to {address}")]
    Write {
        /// The receiver.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The receiver closed the connection right after it was opened.
    #[error("{address} closed the connection at once (does it require a client certificate, or refuse this one?)")]
    Refused {
        /// The receiver.
        address: String,
        /// The error reading showed, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Connecting or writing took longer than `timeout_ms`.
    #[error("{what} {address} timed out")]
    Timeout {
        /// Connecting to or writing to.
        what: &'static str,
        /// The receiver.
        address: String,
    },
}

/// What a connection reads and writes through.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// A connection to the receiver.
enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(stream) => stream.get_ref().get_ref().get_ref(),
        }
    }

    fn stream(&mut self) -> &mut dyn Stream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(stream) => stream.as_mut(),
        }
    }

    /// Whether the receiver hung up (end of stream or an error pending). Peeks,
    /// so TLS records the receiver sent (session tickets) stay for the TLS layer.
    fn hung_up(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            self.tcp().peek(&mut byte).now_or_never(),
            Some(Ok(0) | Err(_))
        )
    }
}

/// Sends effects to a syslog receiver.
pub struct SyslogSink {
    config: SyslogConfig,
    pri: u8,
    hostname: String,
    tls: Option<(tokio_native_tls::TlsConnector, String)>,
    connection: Mutex<Option<Connection>>,
}

impl SyslogSink {
    /// A sink sending as `config` says; `section` names it in messages. Reads the
    /// TLS files now, so a missing or malformed one stops the start.
    pub fn new(config: &SyslogConfig, section: &'static str) -> Result<Self, ConfigError> {
        let pri = config.validate(section)?;
        let tls = match &config.tls {
            Some(tls) => {
                let name = (tls.server_name.clone()).unwrap_or_else(|| config.host().to_owned());
                Some((tls_connector(tls, section)?, name))
            }
            None => None,
        };
        Ok(Self {
            pri,
            hostname: (config.hostname.clone()).unwrap_or_else(this_host),
            tls,
            config: config.clone(),
            connection: Mutex::new(None),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    async fn connect(&self) -> Result<Connection, SyslogError> {
        let address = &self.config.address;
        let timed_out = |what| SyslogError::Timeout {
            what,
            address: address.clone(),
        };
        let tcp = timeout(self.timeout(), TcpStream::connect(address))
            .await
            .map_err(|_| timed_out("connecting to"))?
            .map_err(|source| SyslogError::Connect {
                address: address.clone(),
                source,
            })?;
        tcp.set_nodelay(true).ok();
        let Some((connector, name)) = &self.tls else {
            return Ok(Connection::Plain(tcp));
        };
        let stream = timeout(self.timeout(), connector.connect(name, tcp))
            .await
            .map_err(|_| timed_out("TLS handshake with"))?
            .map_err(|source| SyslogError::Tls {
                address: address.clone(),
                source,
            })?;
        Ok(Connection::Tls(Box::new(stream)))
    }

    /// Fails when the receiver closes `connection` within `refusal_wait_ms`.
    /// Reads (through TLS, which handles the records a receiver may send after
    /// the handshake); a syslog receiver sends no data of its own.
    async fn check_kept(&self, connection: &mut Connection) -> Result<(), SyslogError> {
        let wait = Duration::from_millis(self.config.refusal_wait_ms);
        let mut buffer = [0u8; 256];
        let refused = |source| SyslogError::Refused {
            address: self.config.address.clone(),
            source,
        };
        match timeout(wait, connection.stream().read(&mut buffer)).await {
            Err(_) | Ok(Ok(1..)) => Ok(()),
            Ok(Ok(0)) => Err(refused(None)),
            Ok(Err(error)) => Err(refused(Some(error))),
        }
    }

    /// The frames of `effects`, one after another.
    fn frames(&self, effects: &[Arc<Pending>]) -> Vec<u8> {
        let mut frames = Vec::new();
        for pending in effects {
            let header = format!(
                "<{}>1 {} {} {} - - - ",
                self.pri,
                rfc3339(time_of(pending)),
                self.hostname,
                self.config.app_name
            );
            let message = fit(
                &header,
                &pending.effect.payload,
                self.config.max_message_bytes,
            );
            if message.len() < header.len() + pending.effect.payload.len() {
                tracing::warn!(effect = %pending.idempotency_key, bytes = pending.effect.payload.len(), limit = self.config.max_message_bytes, "syslog message cut to the size limit");
            }
            frames.extend_from_slice(format!("{} ", message.len()).as_bytes());
            frames.extend_from_slice(&message);
        }
        frames
    }

    async fn send(&self, effects: &[Arc<Pending>]) -> Result<(), SyslogError> {
        let mut connection = self.connection.lock().await;
        if connection.as_ref().is_some_and(Connection::hung_up) {
            tracing::info!(address = %self.config.address, "syslog receiver closed the connection; reconnecting");
            *connection = None;
        }
        if connection.is_none() {
            let mut opened = self.connect().await?;
            self.check_kept(&mut opened).await?;
            *connection = Some(opened);
        }
        let frames = self.frames(effects);
        let writer = connection.as_mut().expect("connected above").stream();
        let written = timeout(self.timeout(), async {
            writer.write_all(&frames).await?;
            writer.flush().await
        })
        .await;
        let failed = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(source)) => SyslogError::Write {
                address: self.config.address.clone(),
                source,
            },
            Err(_) => SyslogError::Timeout {
                what: "writing to",
                address: self.config.address.clone(),
            },
        };
        *connection = None;
        Err(failed)
    }
}

/// Reads the TLS files into a connector.
fn tls_connector(
    tls: &SyslogTlsConfig,
    section: &'static str,
) -> Result<tokio_native_tls::TlsConnector, ConfigError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            ConfigError::invalid(section, format!("cannot read {}: {e}", path.display()))
        })
    };
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(ca_file) = &tls.ca_file {
        let ca = native_tls::Certificate::from_pem(&read(ca_file)?).map_err(|e| {
            ConfigError::invalid(
                section,
                format!("{}: not a PEM certificate: {e}", ca_file.display()),
            )
        })?;
        builder
            .disable_built_in_roots(true)
            .add_root_certificate(ca);
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?).map_err(|e| {
                ConfigError::invalid(section, format!("{} and {}: not a PEM certificate and PKCS#8 key (BEGIN PRIVATE KEY): {e}", cert.display(), key.display()))
            })?;
            builder.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(ConfigError::invalid(
                section,
                "tls.cert_file and tls.key_file go together",
            ))
        }
    }
    let connector = builder
        .build()
        .map_err(|e| ConfigError::invalid(section, format!("TLS: {e}")))?;
    Ok(connector.into())
}

/// `header` then `payload`, cut to at most `limit` bytes with [`TRUNCATED`] at
/// the end when it does not fit: at a UTF-8 boundary, never after a lone escaping
/// backslash.
fn fit(header: &str, payload: &[u8], limit: usize) -> Vec<u8> {
    let mut message = header.as_bytes().to_vec();
    if header.len() + payload.len() <= limit {
        message.extend_from_slice(payload);
        return message;
    }
    let mut keep = limit.saturating_sub(header.len() + TRUNCATED.len());
    while keep > 0 && payload.get(keep).is_some_and(|b| b & 0xC0 == 0x80) {
        keep -= 1;
    }
    let backslashes = payload[..keep]
        .iter()
        .rev()
        .take_while(|b| **b == b'\\')
        .count();
    keep -= backslashes % 2;
    message.extend_from_slice(&payload[..keep]);
    message.extend_from_slice(TRUNCATED.as_bytes());
    message
}

impl Sink for SyslogSink {
    async fn deliver(&self, effects: &[Arc<Pending>], _store: &Store) -> Vec<Delivery> {
        match self.send(effects).await {
            Ok(()) => effects.iter().map(|_| Delivery::Delivered).collect(),
            Err(error) => {
                let error = Arc::new(error);
                effects
                    .iter()
                    .map(|_| Delivery::Failed(SinkError::unavailable(Shared(error.clone()))))
                    .collect()
            }
        }
    }

    fn max_chunk(&self) -> usize {
        self.config.batch_size
    }
}

/// One error reported for every effect of a chunk.
#[derive(Debug)]
struct Shared(Arc<SyslogError>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SyslogConfig {
        serde_json::from_str(r#"{"address": "127.0.0.1:601"}"#).expect("config")
    }

    #[test]
    fn pri_comes_from_facility_and_severity() {
        assert_eq!(config().validate("siem.syslog").ok(), Some(16 * 8 + 5));
        let audit = SyslogConfig {
            facility: "audit".into(),
            severity: "info".into(),
            ..config()
        };
        assert_eq!(audit.validate("siem.syslog").ok(), Some(13 * 8 + 6));
        let wrong = SyslogConfig {
            facility: "local9".into(),
            ..config()
        };
        let error = wrong.validate("siem.syslog").expect_err("unknown facility");
        assert!(error.to_string().contains("local9"), "{error}");
    }

    #[test]
    fn long_messages_are_cut_to_the_limit_with_a_marker() {
        let header = "<133>1 - h a - - - ";
        assert_eq!(
            fit(header, b"short", 100),
            format!("{header}short").into_bytes()
        );
        let payload = "é".repeat(300);
        let cut = fit(header, payload.as_bytes(), 500);
        assert!(cut.len() <= 500);
        let text = String::from_utf8(cut).expect("cut at a character boundary");
        assert!(
            text.starts_with(header) && text.ends_with(TRUNCATED),
            "{text}"
        );
    }

    #[test]
    fn a_cut_never_leaves_a_lone_escaping_backslash() {
        let payload = "ab\\=".repeat(200);
        for limit in 480..490 {
            let cut = fit("", payload.as_bytes(), limit);
            let kept = &cut[..cut.len() - TRUNCATED.len()];
            let trailing = kept.iter().rev().take_while(|b| **b == b'\\').count();
            assert_eq!(
                trailing % 2,
                0,
                "limit {limit}: {}",
                String::from_utf8_lossy(kept)
            );
            assert!(cut.len() <= limit);
        }
    }

    #[test]
    fn the_host_of_the_address_names_the_tls_server() {
        assert_eq!(config().host(), "127.0.0.1");
        let v6 = SyslogConfig {
            address: "[::1]:6514".into(),
            ..config()
        };
        assert_eq!(v6.host(), "::1");
    }
}
