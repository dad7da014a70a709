//! The HTTP endpoints every changewire process serves: `/metrics` (Prometheus text,
//! bearer token when one is configured), `/health` and its alias `/readyz` (JSON,
//! 200 when the process does its job right now else 503, no secrets: a readiness
//! probe), and `/livez` (200 while the process's main loop runs, even through an
//! outage of what it talks to: a liveness probe); and the parts other endpoints share: the
//! bearer-token check and a TLS listener for HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_native_tls::{TlsAcceptor, TlsStream};

/// What a process exposes over HTTP.
pub trait Observable: Send + Sync + 'static {
    /// The Prometheus text exposition of every metric.
    fn encode_metrics(&self) -> String;
    /// What the health endpoint reports.
    fn health(&self) -> HealthReport;
    /// Whether the process's main loop still runs (the liveness probe); by
    /// default, answering at all.
    fn alive(&self) -> bool {
        true
    }
}

/// What a process is doing (a state enum of its own) and its latest failure it has
/// not recovered from: the parts of `/health` that change at run time.
#[derive(Debug)]
pub struct Status<S> {
    state: Mutex<S>,
    last_error: Mutex<Option<String>>,
}

impl<S: Copy> Status<S> {
    /// Starts in `state`, without an error.
    pub fn new(state: S) -> Self {
        Self {
            state: Mutex::new(state),
            last_error: Mutex::new(None),
        }
    }

    /// Records what the process is doing.
    pub fn set(&self, state: S) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// What the process is doing.
    pub fn get(&self) -> S {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the latest failure, or `None` once recovered.
    pub fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The latest failure, if not recovered since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The Prometheus text exposition of every metric in `registry`, followed by
/// the build and process metrics every changewire process exposes.
pub fn encode_registry(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    let mut text = match text.strip_suffix("# EOF\n") {
        Some(body) => body.to_owned(),
        None => text,
    };
    text.push_str(&process_metrics());
    text.push_str("# EOF\n");
    text
}

/// `changewire_build_info{version}`, and the process's resident memory, open
/// file descriptors and CPU time, read from `/proc/self` (absent elsewhere).
fn process_metrics() -> String {
    let mut text = format!(
        "# HELP changewire_build_info The running changewire version.\n\
         # TYPE changewire_build_info gauge\n\
         changewire_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    // Linux's fixed units: statm counts 4 KiB pages, stat counts 1/100 s ticks.
    let rss = read_proc("statm", |t| {
        t.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    if let Some(pages) = rss {
        text.push_str(&gauge(
            "process_resident_memory_bytes",
            "Resident memory in bytes.",
            pages * 4096,
        ));
    }
    let fds = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count() as u64);
    if let Ok(fds) = fds {
        text.push_str(&gauge("process_open_fds", "Open file descriptors.", fds));
    }
    let ticks = read_proc("stat", |t| {
        // The fields after the command name, which may hold spaces, in parentheses.
        let fields: Vec<&str> = t.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    });
    if let Some(ticks) = ticks {
        text.push_str(&format!(
            "# HELP process_cpu_seconds User and system CPU time.\n\
             # TYPE process_cpu_seconds counter\n\
             process_cpu_seconds_total {}\n",
            ticks as f64 / 100.0
        ));
    }
    text
}

fn read_proc<T>(file: &str, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    parse(&std::fs::read_to_string(format!("/proc/self/{file}")).ok()?)
}

fn gauge(name: &str, help: &str, value: u64) -> String {
    format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n")
}

/// The body of `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// Whether the process does its job right now (200 rather than 503).
    #[serde(skip)]
    pub healthy: bool,
    /// What it is doing, in one lower-case word.
    pub state: &'static str,
    /// The latest failure it has not recovered from.
    pub last_error: Option<String>,
}

/// The `[http]` configuration section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; loopback by default.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token `/metrics` requires (set it from `CHANGEWIRE_HTTP__TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<dyn Observable>,
    token: Option<Arc<str>>,
}

/// The router serving `/metrics` and `/health`.
pub fn router(metrics: Arc<dyn Observable>, token: Option<String>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/readyz", get(health))
        .route("/livez", get(live))
        .with_state(AppState {
            metrics,
            token: token.map(Arc::from),
        })
}

/// Serves `router` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.token {
        if let Err(refused) = require_bearer(&headers, token) {
            return refused;
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode_metrics(),
    )
        .into_response()
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let report = state.metrics.health();
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

async fn live(State(state): State<AppState>) -> StatusCode {
    if state.metrics.alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Checks the request's `Authorization: Bearer` token; the error is the 401 to answer.
#[allow(clippy::result_large_err)] // the error is the response itself, built once
pub fn require_bearer(headers: &HeaderMap, token: &str) -> Result<(), Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return Ok(());
    }
    Err((
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong bearer token\n",
    )
        .into_response())
}

/// A request's bearer token, against the tokens an API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token none of the accepted ones equals.
    Unknown,
    /// One of the accepted tokens (compared in constant time).
    Accepted,
}

/// Which [`Bearer`] case the request's token is among `tokens`.
pub fn bearer_among(headers: &HeaderMap, tokens: &[String]) -> Bearer {
    let presented = (headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Bearer::Missing,
        Some(p)
            if tokens
                .iter()
                .any(|t| constant_time_eq(t.as_bytes(), p.as_bytes())) =>
        {
            Bearer::Accepted
        }
        Some(_) => Bearer::Unknown,
    }
}

/// The server side of TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate chain and key do not make an identity.
    #[error(
        "the certificate and key are unusable (the key must be PEM PKCS#8, \"BEGIN PRIVATE KEY\")"
    )]
    Identity(#[source] native_tls::Error),
}

/// A TLS acceptor from a PEM certificate chain and a PEM PKCS#8 private key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsSetupError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?)
        .map_err(TlsSetupError::Identity)?;
    let acceptor = native_tls::TlsAcceptor::new(identity).map_err(TlsSetupError::Identity)?;
    Ok(TlsAcceptor::from(acceptor))
}

/// A listener for [`axum::serve`] that yields TLS connections. Handshakes run in
/// their own tasks (a slow or broken client holds up nobody) and are bounded in time.
pub struct TlsListener {
    local: SocketAddr,
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Accepts on `listener`, handshaking with `acceptor`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (ready, handshaken) = mpsc::channel(64);
        let acceptor = Arc::new(acceptor);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = ready.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), ready.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => drop(ready.send((tls, peer)).await),
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, handshaken })
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(connection) => connection,
            // The accept task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
