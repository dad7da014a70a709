//! Applying plans to a gateway: the [`Applier`] seam (nginx and Caddy implement
//! it) and [`GatewaySink`], the runtime sink that drives one.
//!
//! The handler emits a plan (the whole desired state) or a drift check; the sink
//! applies the newest plan of each chunk (a burst gives one apply, and applies to
//! one gateway never overlap: a sink delivers one chunk at a time), keeps that
//! plan for drift checks, and writes the outcome to the store under
//! `gateway/outcome/`, where the handler's next tick publishes it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use changewire_schemas::gateway::GatewaySpec;
use serde::{Deserialize, Serialize};

use super::desired::{Plan, Rejection, ResourceId};
use crate::runtime::{Delivery, Pending, Sink, SinkError};
use crate::runtime::{Store, StoreError};

/// Outcomes waiting for the handler, by gateway and time.
pub(super) const OUTCOME: &str = "gateway/outcome/";
/// The newest plan each gateway was asked to serve (drift checks apply it again,
/// so a plan that was rolled back is retried).
const PLAN: &str = "gateway/plan/";

/// Why an apply ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The desired state changed.
    Change,
    /// A periodic comparison of the running gateway with the desired state.
    DriftCheck,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyResult {
    /// The gateway runs the new config.
    Applied,
    /// It already ran it: nothing was touched.
    Unchanged,
    /// It ran something else (edited by hand, restarted on an old config): the
    /// desired config was applied again.
    DriftRepaired,
    /// The new config failed once live; the last good one was restored.
    RolledBack,
    /// The gateway refused every candidate; it keeps the config it had.
    Failed,
}

/// The outcome of one apply, as published to the status topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The gateway (its sink name: `nginx`, `caddy`).
    pub gateway: String,
    /// The plan's generation.
    pub generation: u64,
    /// Why it ran.
    pub trigger: Trigger,
    /// What it did.
    pub result: ApplyResult,
    /// Details: the validator's or the probe's message.
    #[serde(default)]
    pub message: Option<String>,
    /// Resources now served.
    pub served: Vec<ResourceId>,
    /// Resources the gateway refused, with its reason (left out; the others
    /// are served).
    pub rejected: Vec<Rejection>,
    /// A digest of the config now running.
    pub config: String,
    /// When it finished (ms since the epoch).
    pub at_ms: i64,
    /// How long it took.
    pub took_ms: u64,
}

/// What an [`Applier`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// What it did.
    pub result: ApplyResult,
    /// Details.
    pub message: Option<String>,
    /// Resources it left out, with why.
    pub rejected: Vec<Rejection>,
    /// A digest of the config now running.
    pub config: String,
}

/// Why an apply could not be carried out at all.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The gateway cannot be reached or run (admin API down, binary missing):
    /// retried without end.
    #[error("gateway unavailable: {0}")]
    Unavailable(String),
    /// Local files cannot be written: retried without end too, since every
    /// later plan would fail the same way.
    #[error("cannot write the gateway's files")]
    Io(#[source] std::io::Error),
}

/// A gateway that takes whole plans.
pub trait Applier: Send + Sync + 'static {
    /// Makes the gateway serve `plan` (when `trigger` is a drift check, only if
    /// it serves something else). Idempotent: a plan the gateway already serves
    /// changes nothing.
    fn apply(
        &self,
        plan: &Plan,
        trigger: Trigger,
    ) -> impl Future<Output = Result<Applied, ApplyError>> + Send;
}

/// What the handler emits to a gateway sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Serve this plan.
    Apply(Plan),
    /// Compare the gateway with the last plan applied; re-apply on drift.
    CheckDrift,
}

/// Asks a gateway's health route which config its workers run (the rendered
/// config answers its digest in a header).
pub struct HealthProbe {
    url: String,
    http: reqwest::Client,
    timeout: std::time::Duration,
}

impl HealthProbe {
    /// A probe of the health route on `listen`, waiting up to `timeout_ms`.
    pub fn new(listen: std::net::SocketAddr, timeout_ms: u64) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            // A pooled connection may stay with an old worker after a reload.
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Self {
            url: format!("http://{listen}{HEALTH_PATH}"),
            http,
            timeout: std::time::Duration::from_millis(timeout_ms),
        })
    }

    /// Whether the workers run config `digest` now; what they run if not.
    pub async fn serves(&self, digest: &str) -> Result<(), String> {
        let response =
            (self.http.get(&self.url).send().await).map_err(|e| format!("{}: {e}", self.url))?;
        let running = (response.headers().get(DIGEST_HEADER))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if running == digest {
            Ok(())
        } else {
            Err(format!("it runs config {running:?}"))
        }
    }

    /// Asks until the workers run config `digest`, or says why not once the
    /// time is up.
    pub async fn wait_for(&self, digest: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let last = match self.serves(digest).await {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the health route did not answer config {digest} within {} ms ({last})",
                    self.timeout.as_millis()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The path of the health route every rendered config serves.
pub const HEALTH_PATH: &str = "/changewire-health";
/// The response header carrying the running config's digest.
pub const DIGEST_HEADER: &str = "x-changewire-config";

/// API keys mounted as files: `<dir>/<namespace>/<secret>/<key>`, one key per
/// line. Secret values are redacted before they reach Kafka, so keys never
/// travel in events: they are mounted where the gateway runs.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// The directory; no keys can be read when absent.
    pub dir: Option<PathBuf>,
}

impl Secrets {
    /// The keys of `namespace`'s Secret `name`, entry `key`.
    pub fn api_keys(&self, namespace: &str, name: &str, key: &str) -> Result<Vec<String>, String> {
        let dir = self.dir.as_ref().ok_or_else(|| {
            "API keys need gateway.secrets_dir (where Secrets are mounted)".to_owned()
        })?;
        let path = dir.join(namespace).join(name).join(key);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read the keys of Secret {namespace}/{name} ({}): {e}",
                path.display()
            )
        })?;
        let keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        let printable = |k: &String| {
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c))
        };
        if keys.is_empty() || !keys.iter().all(printable) {
            return Err(format!(
                "Secret {namespace}/{name} key {key}: one or more API keys, one per line, of letters, digits and -._~+/="
            ));
        }
        Ok(keys)
    }
}

/// A route's (kind, namespace, name), as a policy's `targetRef` names it.
pub type Target<'a> = (&'a str, &'a str, &'a str);

/// The API keys guarding a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGuard {
    /// The AuthPolicy's place in the plan (names its config blocks).
    pub index: usize,
    /// The request header carrying the key.
    pub header: String,
    /// The keys.
    pub keys: Vec<String>,
}

/// The mounted keys of every AuthPolicy in `plan`, by the route each guards.
/// A policy whose keys cannot be read is refused, and so is its route: a
/// route is never served without the policy meant to guard it.
pub fn key_guards<'a>(
    plan: &'a Plan,
    secrets: &Secrets,
) -> (BTreeMap<Target<'a>, KeyGuard>, Vec<Rejection>) {
    let mut guards = BTreeMap::new();
    let mut rejected = Vec::new();
    let mut closed = Vec::new();
    for (index, (id, spec)) in plan.resources.iter().enumerate() {
        let GatewaySpec::AuthPolicy(policy) = spec else {
            continue;
        };
        let target = (
            policy.target_ref.kind.as_str(),
            id.namespace.as_str(),
            policy.target_ref.name.as_str(),
        );
        let found = policy.api_keys.as_ref().map_or_else(
            || Err("no apiKeys".to_owned()),
            |k| {
                let keys =
                    secrets.api_keys(&id.namespace, &k.secret_ref.name, &k.secret_ref.key)?;
                Ok(KeyGuard {
                    index,
                    header: k.header.clone(),
                    keys,
                })
            },
        );
        match found {
            Ok(guard) => {
                guards.insert(target, guard);
            }
            Err(reason) => {
                let why = format!(
                    "its AuthPolicy {} cannot be applied ({reason}); not served without it",
                    id.name
                );
                closed.push((target, why));
                rejected.push(Rejection {
                    resource: id.clone(),
                    reason,
                });
            }
        }
    }
    for ((kind, namespace, name), reason) in closed {
        let route = (plan.resources.iter())
            .find(|(id, _)| id.kind == kind && id.namespace == namespace && id.name == name);
        if let Some((id, _)) = route {
            rejected.push(Rejection {
                resource: id.clone(),
                reason,
            });
        }
    }
    (guards, rejected)
}

/// Delivers [`Order`]s to one gateway.
pub struct GatewaySink<A> {
    name: String,
    applier: A,
}

impl<A: Applier> GatewaySink<A> {
    /// A sink named `name` (the gateway's name in outcomes) over `applier`.
    pub fn new(name: &str, applier: A) -> Self {
        Self {
            name: name.to_owned(),
            applier,
        }
    }

    /// The plan to apply for `orders` (the newest plan, kept; a drift check
    /// alone checks the newest one kept), and why.
    fn plan_for(
        &self,
        orders: &[Order],
        store: &Store,
    ) -> Result<Option<(Plan, Trigger)>, SinkError> {
        let stored = |e: StoreError| SinkError::Fatal(Box::new(e));
        let key = format!("{PLAN}{}", self.name);
        if let Some(plan) = orders.iter().rev().find_map(|o| match o {
            Order::Apply(plan) => Some(plan.clone()),
            Order::CheckDrift => None,
        }) {
            let bytes = serde_json::to_vec(&plan).map_err(|e| SinkError::Fatal(Box::new(e)))?;
            store
                .put_state(key.as_bytes(), Some(&bytes))
                .map_err(stored)?;
            return Ok(Some((plan, Trigger::Change)));
        }
        let applied = store.get(key.as_bytes()).map_err(stored)?;
        Ok(applied
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .map(|plan| (plan, Trigger::DriftCheck)))
    }

    async fn run(&self, orders: &[Order], store: &Store) -> Result<(), SinkError> {
        let Some((plan, trigger)) = self.plan_for(orders, store)? else {
            return Ok(());
        };
        let started = Instant::now();
        let applied = self
            .applier
            .apply(&plan, trigger)
            .await
            .map_err(SinkError::unavailable)?;
        if trigger == Trigger::DriftCheck && applied.result == ApplyResult::Unchanged {
            return Ok(());
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let rejected_ids: Vec<&ResourceId> = applied.rejected.iter().map(|r| &r.resource).collect();
        let served = match applied.result {
            ApplyResult::Failed | ApplyResult::RolledBack => Vec::new(),
            _ => (plan.resources.iter())
                .map(|(id, _)| id.clone())
                .filter(|id| !rejected_ids.contains(&id))
                .collect(),
        };
        let outcome = Outcome {
            gateway: self.name.clone(),
            generation: plan.generation,
            trigger,
            result: applied.result,
            message: applied.message,
            served,
            rejected: applied.rejected,
            config: applied.config,
            at_ms,
            took_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(gateway = %self.name, generation = plan.generation, result = ?outcome.result, message = outcome.message.as_deref().unwrap_or_default(), rejected = outcome.rejected.len(), took_ms = outcome.took_ms, "gateway apply");
        let stored = |e: StoreError| SinkError::Fatal(Box::new(e));
        let key = format!("{OUTCOME}{}/{:020}", self.name, now_nanos());
        let value = serde_json::to_vec(&outcome).map_err(|e| SinkError::Fatal(Box::new(e)))?;
        store
            .put_state(key.as_bytes(), Some(&value))
            .map_err(stored)
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl<A: Applier> Sink for GatewaySink<A> {
    async fn deliver(&self, effects: &[Arc<Pending>], store: &Store) -> Vec<Delivery> {
        let orders: Result<Vec<Order>, _> = effects
            .iter()
            .map(|p| serde_json::from_slice(&p.effect.payload))
            .collect();
        let result = match orders {
            Ok(orders) => self.run(&orders, store).await,
            Err(error) => Err(SinkError::Permanent(Box::new(error))),
        };
        match result {
            Ok(()) => effects.iter().map(|_| Delivery::Delivered).collect(),
            Err(error) => {
                let mut deliveries = vec![Delivery::Failed(error)];
                deliveries.extend(effects.iter().skip(1).map(|_| Delivery::NotAttempted));
                deliveries
            }
        }
    }
}
