//! Silences: matchers over an alert's labels, until a time. An alert a silence
//! matches is not sent (receivers never see it; Alertmanager's own silences
//! still apply to what it gets). Kept in a JSON file in the state directory,
//! written whole and renamed into place, so a restart keeps them; managed through
//! a small HTTP API that needs a bearer token:
//!
//! - `GET /v1/silences`: the active ones;
//! - `POST /v1/silences` `{"matchers": {"alertname": "secret-burst", "actor":
//!   "ci-*"}, "duration_s": 3600, "comment": "...", "created_by": "..."}`: `201`
//!   with the silence (`*` in a value matches any run of characters);
//! - `DELETE /v1/silences/{id}`: `204`, or `404`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use changewire_schemas::http::{bearer_among, Bearer};
use changewire_schemas::time::rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::rules::glob;

/// One silence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// Label name to value (`*` globs); all must match.
    pub matchers: BTreeMap<String, String>,
    /// Until when, ms since the epoch.
    pub ends_at_ms: i64,
    /// Why.
    #[serde(default)]
    pub comment: String,
    /// Who.
    #[serde(default)]
    pub created_by: String,
}

impl Silence {
    fn matches(&self, labels: &BTreeMap<String, String>, now_ms: i64) -> bool {
        now_ms < self.ends_at_ms
            && (self.matchers.iter())
                .all(|(name, value)| labels.get(name).is_some_and(|l| glob(value, l)))
    }
}

/// The silences in force, and their file.
#[derive(Debug)]
pub struct Silences {
    path: PathBuf,
    list: RwLock<Vec<Silence>>,
}

impl Silences {
    /// Loads the silences kept in `path` (none when it does not exist yet).
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let list = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        Ok(Self {
            path,
            list: RwLock::new(list),
        })
    }

    /// The silence that matches `labels` now, if any.
    pub fn silencing(&self, labels: &BTreeMap<String, String>, now_ms: i64) -> Option<String> {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|s| s.matches(labels, now_ms))
            .map(|s| s.id.clone())
    }

    fn active(&self, now_ms: i64) -> Vec<Silence> {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .filter(|s| s.ends_at_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Changes the list and writes it (expired ones dropped) before answering.
    fn change(
        &self,
        now_ms: i64,
        edit: impl FnOnce(&mut Vec<Silence>) -> bool,
    ) -> std::io::Result<bool> {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let mut next = list.clone();
        next.retain(|s| s.ends_at_ms > now_ms);
        let changed = edit(&mut next);
        let temporary = self.path.with_extension("tmp");
        std::fs::write(&temporary, serde_json::to_vec_pretty(&next)?)?;
        std::fs::rename(&temporary, &self.path)?;
        *list = next;
        Ok(changed)
    }
}

/// What `POST /v1/silences` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSilence {
    matchers: BTreeMap<String, String>,
    duration_s: u64,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    created_by: String,
}

struct Api {
    silences: Arc<Silences>,
    tokens: Vec<String>,
}

/// The silences API over `silences`, for bearers of `tokens`.
pub fn router(silences: Arc<Silences>, tokens: Vec<String>) -> Router {
    let api = Arc::new(Api { silences, tokens });
    Router::new()
        .route("/v1/silences", get(list).post(create))
        .route("/v1/silences/{id}", delete(remove))
        .with_state(api)
}

/// A request refused, with why: a JSON error.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn failure(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal(status, reason.into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Api {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        match bearer_among(headers, &self.tokens) {
            Bearer::Accepted => Ok(()),
            Bearer::Missing => Err(failure(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required",
            )),
            Bearer::Unknown => Err(failure(StatusCode::UNAUTHORIZED, "unknown bearer token")),
        }
    }

    fn saved(&self, result: std::io::Result<bool>) -> Result<bool, Refusal> {
        result.map_err(|e| {
            tracing::error!(error = %e, "cannot write the silences");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the silences: {e}"),
            )
        })
    }
}

fn shown(silence: &Silence) -> serde_json::Value {
    json!({
        "id": silence.id, "matchers": silence.matchers, "ends_at": rfc3339(silence.ends_at_ms),
        "comment": silence.comment, "created_by": silence.created_by,
    })
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap) -> Result<Response, Refusal> {
    api.authorize(&headers)?;
    let active: Vec<_> = api.silences.active(now_ms()).iter().map(shown).collect();
    Ok(Json(json!({ "silences": active })).into_response())
}

async fn create(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refusal> {
    api.authorize(&headers)?;
    let asked: NewSilence = serde_json::from_slice(&body)
        .map_err(|e| failure(StatusCode::BAD_REQUEST, format!("not a silence: {e}")))?;
    if asked.matchers.is_empty() || asked.duration_s == 0 {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "give at least one matcher and a duration_s of at least 1",
        ));
    }
    let now = now_ms();
    let silence = Silence {
        id: uuid::Uuid::new_v4().to_string(),
        matchers: asked.matchers,
        ends_at_ms: now.saturating_add(asked.duration_s.saturating_mul(1000) as i64),
        comment: asked.comment,
        created_by: asked.created_by,
    };
    let added = silence.clone();
    api.saved(api.silences.change(now, |list| {
        list.push(added);
        true
    }))?;
    tracing::info!(id = %silence.id, matchers = ?silence.matchers, until = %rfc3339(silence.ends_at_ms), "silence added");
    Ok((StatusCode::CREATED, Json(shown(&silence))).into_response())
}

async fn remove(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Refusal> {
    api.authorize(&headers)?;
    let removed = api.saved(api.silences.change(now_ms(), |list| {
        let before = list.len();
        list.retain(|s| s.id != id);
        list.len() < before
    }))?;
    if !removed {
        return Err(failure(StatusCode::NOT_FOUND, format!("no silence {id}")));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silence_matches_every_matcher_until_it_ends() {
        let silence = Silence {
            id: "s".into(),
            matchers: BTreeMap::from([
                ("alertname".into(), "secret-*".into()),
                ("actor".into(), "ci-bot".into()),
            ]),
            ends_at_ms: 1_000,
            comment: String::new(),
            created_by: String::new(),
        };
        let labels = |name: &str, actor: &str| {
            BTreeMap::from([
                ("alertname".to_owned(), name.to_owned()),
                ("actor".to_owned(), actor.to_owned()),
            ])
        };
        assert!(silence.matches(&labels("secret-burst", "ci-bot"), 999));
        assert!(
            !silence.matches(&labels("secret-burst", "ci-bot"), 1_000),
            "ended"
        );
        assert!(!silence.matches(&labels("secret-burst", "mallory"), 999));
        assert!(!silence.matches(&labels("rbac-changed", "ci-bot"), 999));
        assert!(
            !silence.matches(&BTreeMap::new(), 999),
            "a missing label does not match"
        );
    }

    #[test]
    fn silences_survive_a_reopen_and_expired_ones_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("silences.json");
        let silences = Silences::open(path.clone()).expect("open");
        let silence = |id: &str, ends_at_ms| Silence {
            id: id.into(),
            matchers: BTreeMap::from([("alertname".into(), "a".into())]),
            ends_at_ms,
            comment: String::new(),
            created_by: String::new(),
        };
        silences
            .change(0, |list| {
                list.push(silence("old", 10));
                true
            })
            .expect("write");
        silences
            .change(20, |list| {
                list.push(silence("new", 100));
                true
            })
            .expect("write");
        let reopened = Silences::open(path).expect("reopen");
        let ids: Vec<String> = reopened.active(30).into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["new"]);
        let labels = BTreeMap::from([("alertname".to_owned(), "a".to_owned())]);
        assert_eq!(reopened.silencing(&labels, 30).as_deref(), Some("new"));
    }
}
