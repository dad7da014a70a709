//! The HTTP endpoints every changewire process serves: `/metrics` (Prometheus text,
//! bearer token when one is configured) and `/health` (JSON, 200 when healthy else
//! 503, no secrets, open for probes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

/// What a process exposes over HTTP.
pub trait Observable: Send + Sync + 'static {
    /// The Prometheus text exposition of every metric.
    fn encode_metrics(&self) -> String;
    /// What the health endpoint reports.
    fn health(&self) -> HealthReport;
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

/// The Prometheus text exposition of every metric in `registry`.
pub fn encode_registry(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
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
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
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

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
