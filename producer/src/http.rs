//! The producer's HTTP endpoints: `/metrics` (Prometheus text, bearer token when one
//! is configured) and `/health` (JSON; 200 while snapshotting or streaming, 503
//! otherwise, no secrets, open for probes).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::metrics::{ProducerMetrics, SourceState};

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
    metrics: Arc<ProducerMetrics>,
    token: Option<Arc<str>>,
}

/// The router serving `/metrics` and `/health`.
pub fn router(metrics: Arc<ProducerMetrics>, token: Option<String>) -> Router {
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
        state.metrics.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
struct Health {
    state: &'static str,
    last_error: Option<String>,
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let source = state.metrics.state();
    let status = match source {
        SourceState::Streaming | SourceState::Snapshotting => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        Json(Health {
            state: source.as_str(),
            last_error: state.metrics.last_error(),
        }),
    )
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
