//! The gateway service: Route, RateLimitPolicy, AuthPolicy and ModelRoute
//! changes (custom resources from the Kubernetes producer, rows of a routes
//! table from the Postgres producer) reconfigure nginx and Caddy.
//!
//! - `handle` keeps the desired state ([`desired`]): each resource's last
//!   accepted spec and version, committed with the offsets; stale or replayed
//!   changes are no-ops, a spec refused on its own is reported at once.
//! - `tick` debounces: once changes stop for `debounce_ms` (or `max_delay_ms`
//!   after the first), it builds a [`desired::Plan`] of every resource, reports
//!   what does not fit, and emits the plan to each gateway's sink ([`apply`]);
//!   every `drift_check_s` it asks the sinks to compare the running gateway with
//!   the plan. It publishes the sinks' outcomes to `<prefix>.gateway.status` and
//!   keeps each resource's status for the status API ([`status`]).
//! - The sinks apply ([`nginx`], [`caddy`]): never two applies to one gateway at
//!   once, the newest plan of a burst only, idempotently.

pub mod apply;
pub mod caddy;
pub mod desired;
pub mod nginx;
pub mod status;
#[cfg(test)]
mod testing;
pub mod write_back;

use std::path::PathBuf;
use std::time::SystemTime;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::time::epoch_ms;
use changewire_schemas::ChangeEvent;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::runtime::sinks::kafka::{KafkaSink, Oversized};
use crate::runtime::{
    ConsumerMetrics, Context, Effect, Handler, HandlerError, Record, RuntimeConfig, Sinks,
};
use apply::{GatewaySink, Order, Outcome, Secrets, OUTCOME};
use caddy::{CaddyConfig, CaddyGateway};
use desired::{
    change_of, check_alone, take, Definer, Limits, NotAChange, Plan, ResourceId, Stored, Taken,
    Version,
};
use nginx::{NginxConfig, NginxGateway};
use status::{ResourceState, ResourceStatus, LAST, STATUS};

/// The nginx gateway's sink name.
pub const NGINX: &str = "nginx";
/// The Caddy gateway's sink name.
pub const CADDY: &str = "caddy";
/// The status topic's sink name.
pub const STATUS_SINK: &str = "status";
/// The sink writing statuses back to custom resources.
pub const WRITE_BACK: &str = "status-write-back";

/// Each resource's stored record, by its key.
const RESOURCE: &str = "gateway/r/";
/// The ids of resources with a spec (what a plan is built from).
const INDEX: &str = "gateway/index";
/// When the desired state first and last changed since the last plan.
const DIRTY: &str = "gateway/dirty";
/// The last plan's generation.
const GENERATION: &str = "gateway/generation";
/// When drift was last checked.
const CHECKED: &str = "gateway/checked";

/// The `[gateway]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The API group of the custom resources.
    #[serde(default = "default_group")]
    pub group: String,
    /// Quiet time after a change before applying, in ms (a burst gives one apply).
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Longest wait after the first change of a burst, in ms.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Seconds between comparisons of the running gateways with the desired state.
    #[serde(default = "default_drift_check_s")]
    pub drift_check_s: u64,
    /// Upstream hosts routes may send traffic to: addresses, networks
    /// (`10.0.0.0/8`), host names, `*.suffix`; any when empty.
    #[serde(default)]
    pub allowed_upstreams: Vec<String>,
    /// Where Secrets holding API keys are mounted (`<dir>/<namespace>/<name>/<key>`).
    #[serde(default)]
    pub secrets_dir: Option<PathBuf>,
    /// The status topic; `<prefix>.gateway.status` when absent.
    #[serde(default)]
    pub status_topic: Option<String>,
    /// Where the status API listens; not served when absent.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer tokens of the status API: a list, or one comma-separated string.
    #[serde(default, deserialize_with = "changewire_schemas::settings::tokens")]
    pub api_tokens: Vec<String>,
    /// Configure a local nginx.
    #[serde(default)]
    pub nginx: Option<NginxConfig>,
    /// Configure Caddy through its admin API.
    #[serde(default)]
    pub caddy: Option<CaddyConfig>,
    /// Write each custom resource's status (conditions `Accepted` and
    /// `Programmed`) back to the API server.
    #[serde(default)]
    pub status_write_back: Option<write_back::WriteBackConfig>,
}

fn default_group() -> String {
    changewire_schemas::gateway::GROUP.into()
}

fn default_debounce_ms() -> u64 {
    200
}

fn default_max_delay_ms() -> u64 {
    1000
}

fn default_drift_check_s() -> u64 {
    30
}

impl GatewayConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nginx.is_none() && self.caddy.is_none() {
            return Err(ConfigError::invalid(
                "gateway",
                "configure a gateway: [gateway.nginx] or [gateway.caddy]",
            ));
        }
        if self.listen.is_some() && self.api_tokens.is_empty() {
            return Err(ConfigError::invalid(
                "gateway.api_tokens",
                "the status API (gateway.listen) needs at least one bearer token",
            ));
        }
        if self.debounce_ms == 0 || self.max_delay_ms < self.debounce_ms || self.drift_check_s == 0
        {
            return Err(ConfigError::invalid(
                "gateway",
                "debounce_ms at least 1, max_delay_ms at least debounce_ms, drift_check_s at least 1",
            ));
        }
        for allowed in &self.allowed_upstreams {
            if allowed.is_empty() || allowed.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "gateway.allowed_upstreams",
                    format!("{allowed:?} is not an address, network or host pattern"),
                ));
            }
        }
        Ok(())
    }

    /// The status topic.
    pub fn status_topic(&self, config: &RuntimeConfig) -> String {
        (self.status_topic.clone())
            .unwrap_or_else(|| format!("{}.gateway.status", config.topics.prefix))
    }

    fn gateways(&self) -> Vec<&'static str> {
        let nginx = self.nginx.as_ref().map(|_| NGINX);
        let caddy = self.caddy.as_ref().map(|_| CADDY);
        nginx.into_iter().chain(caddy).collect()
    }
}

/// A digest of a rendered config: the first 16 hex digits of its SHA-256.
pub fn digest_of(bytes: &[u8]) -> String {
    changewire_schemas::hex(&Sha256::digest(bytes)[..8])
}

/// The gateway handler.
pub struct Gateway {
    config: GatewayConfig,
    limits: Limits,
    gateways: Vec<&'static str>,
    status_topic: String,
    writes_back: bool,
    metrics: std::sync::Arc<ConsumerMetrics>,
}

/// When the desired state changed since the last plan (ms since the epoch).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Dirty {
    first_ms: i64,
    last_ms: i64,
}

impl Dirty {
    /// Whether a plan is due at `now`: changes stopped `debounce_ms` ago, or
    /// the first came `max_delay_ms` ago (a steady stream still gets applied).
    fn due(&self, now: i64, debounce_ms: u64, max_delay_ms: u64) -> bool {
        let quiet = now - self.last_ms >= debounce_ms as i64;
        let overdue = now - self.first_ms >= max_delay_ms as i64;
        quiet || overdue
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::fatal(format!("the state entry {key} cannot be read: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(value).map_err(HandlerError::fatal)
}

impl Gateway {
    /// The handler and its sinks: one per configured gateway, and the status topic.
    pub fn new(
        config: &RuntimeConfig,
        gateway: &GatewayConfig,
    ) -> Result<(Self, Sinks), ConfigError> {
        gateway.validate()?;
        let secrets = Secrets {
            dir: gateway.secrets_dir.clone(),
        };
        let status = KafkaSink::new(STATUS_SINK, config, Oversized::Reject)
            .map_err(|e| ConfigError::invalid("kafka", e.to_string()))?;
        let mut sinks = Sinks::new().with(STATUS_SINK, status);
        if let Some(nginx) = &gateway.nginx {
            let applier = NginxGateway::new(nginx, secrets.clone())?;
            sinks = sinks.with(NGINX, GatewaySink::new(NGINX, applier));
        }
        if let Some(caddy) = &gateway.caddy {
            let applier = CaddyGateway::new(caddy, secrets)?;
            sinks = sinks.with(CADDY, GatewaySink::new(CADDY, applier));
        }
        if let Some(write_back) = &gateway.status_write_back {
            sinks = sinks.with(WRITE_BACK, write_back::WriteBackSink::new(write_back)?);
        }
        let handler = Self {
            config: gateway.clone(),
            limits: Limits {
                allowed_upstreams: gateway.allowed_upstreams.clone(),
            },
            gateways: gateway.gateways(),
            status_topic: gateway.status_topic(config),
            writes_back: gateway.status_write_back.is_some(),
            metrics: std::sync::Arc::default(),
        };
        Ok((handler, sinks))
    }

    fn count(&self, event: &str, detail: &str) {
        self.metrics.count_handler_event(event, detail);
    }

    /// Records a resource's status and publishes it.
    fn report(
        &self,
        status: ResourceStatus,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let status = self.record(status, context)?;
        self.publish(
            &status.resource.to_string(),
            &serde_json::json!({"resource": status}),
            context,
        )
    }

    /// Records a resource's status (with the generation of the custom resource
    /// it describes) and, when that changed for a reader, writes it back to the
    /// custom resource.
    fn record(
        &self,
        mut status: ResourceStatus,
        context: &mut Context<'_>,
    ) -> Result<ResourceStatus, HandlerError> {
        let id = &status.resource;
        let resource = format!("{RESOURCE}{}", id.key());
        if let Some(bytes) = context.get(resource.as_bytes())? {
            if let Version::Kubernetes { generation, .. } =
                decode::<Stored>(&resource, &bytes)?.version
            {
                status.observed = Some(generation);
            }
        }
        let key = format!("{STATUS}{}", id.key());
        let previous = match context.get(key.as_bytes())? {
            Some(bytes) => Some(decode::<ResourceStatus>(&key, &bytes)?),
            None => None,
        };
        context.put(key.into_bytes(), encode(&status)?);
        let unchanged = previous.is_some_and(|p| write_back::same_to_a_reader(&status, &p));
        let written = self.writes_back && id.definer == Definer::Kubernetes;
        if written && !unchanged && status.state != ResourceState::Deleted {
            context.emit(WRITE_BACK, write_back::patch(&status))?;
        }
        Ok(status)
    }

    fn publish(
        &self,
        key: &str,
        record: &serde_json::Value,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let effect = Effect {
            destination: Some(self.status_topic.clone()),
            key: Some(key.as_bytes().to_vec()),
            ..Effect::new(encode(record)?)
        };
        context.emit(STATUS_SINK, effect)?;
        Ok(())
    }

    fn index(context: &Context<'_>) -> Result<Vec<ResourceId>, HandlerError> {
        match context.get(INDEX.as_bytes())? {
            Some(bytes) => decode(INDEX, &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// Keeps `id` in the index exactly when it has a spec.
    fn update_index(
        id: &ResourceId,
        has_spec: bool,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let mut index = Self::index(context)?;
        let position = index.binary_search(id);
        match (position, has_spec) {
            (Err(at), true) => index.insert(at, id.clone()),
            (Ok(at), false) => {
                index.remove(at);
            }
            _ => return Ok(()),
        }
        context.put(INDEX.as_bytes().to_vec(), encode(&index)?);
        Ok(())
    }

    fn mark_dirty(at_ms: i64, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let first_ms = match context.get(DIRTY.as_bytes())? {
            Some(bytes) => decode::<Dirty>(DIRTY, &bytes)?.first_ms,
            None => at_ms,
        };
        let dirty = Dirty {
            first_ms,
            last_ms: at_ms,
        };
        context.put(DIRTY.as_bytes().to_vec(), encode(&dirty)?);
        Ok(())
    }

    /// Builds the plan of every resource with a spec and sends it to each
    /// gateway; reports the resources that do not fit.
    fn send_plan(&self, now: i64, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let generation = match context.get(GENERATION.as_bytes())? {
            Some(bytes) => decode::<u64>(GENERATION, &bytes)? + 1,
            None => 1,
        };
        let mut resources = Vec::new();
        for id in Self::index(context)? {
            let key = format!("{RESOURCE}{}", id.key());
            let Some(bytes) = context.get(key.as_bytes())? else {
                continue;
            };
            let stored: Stored = decode(&key, &bytes)?;
            if let Some(spec) = stored.spec {
                resources.push((stored.since_ms, id, spec));
            }
        }
        resources.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let resources = resources
            .into_iter()
            .map(|(_, id, spec)| (id, spec))
            .collect();
        let (plan, rejected) = Plan::from_resources(generation, resources);
        tracing::info!(
            generation,
            resources = plan.resources.len(),
            rejected = rejected.len(),
            "gateway plan"
        );
        for rejection in rejected {
            let status = ResourceStatus::new(
                rejection.resource,
                ResourceState::Rejected,
                Some(rejection.reason),
                now,
            );
            self.report(
                ResourceStatus {
                    generation: Some(generation),
                    ..status
                },
                context,
            )?;
        }
        context.put(GENERATION.as_bytes().to_vec(), encode(&generation)?);
        context.remove(DIRTY.as_bytes().to_vec());
        self.send_order(&Order::Apply(plan), context)
    }

    fn send_order(&self, order: &Order, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let payload = encode(order)?;
        for gateway in &self.gateways {
            let effect = Effect {
                key: Some(b"apply".to_vec()),
                ..Effect::new(payload.clone())
            };
            context.emit(gateway, effect)?;
        }
        Ok(())
    }

    /// Publishes the outcomes the sinks wrote and the statuses they imply.
    fn publish_outcomes(&self, context: &mut Context<'_>) -> Result<(), HandlerError> {
        for (key, bytes) in context.scan_committed(OUTCOME.as_bytes())? {
            context.remove(key.clone());
            let shown = String::from_utf8_lossy(&key).into_owned();
            let outcome: Outcome = decode(&shown, &bytes)?;
            self.count(
                "apply",
                &format!("{}:{:?}", outcome.gateway, outcome.result),
            );
            for id in &outcome.served {
                self.record(ResourceStatus::programmed(id.clone(), &outcome), context)?;
            }
            for rejection in &outcome.rejected {
                let status = ResourceStatus::new(
                    rejection.resource.clone(),
                    ResourceState::Rejected,
                    Some(format!("{}: {}", outcome.gateway, rejection.reason)),
                    outcome.at_ms,
                );
                self.report(
                    ResourceStatus {
                        generation: Some(outcome.generation),
                        gateway: Some(outcome.gateway.clone()),
                        ..status
                    },
                    context,
                )?;
            }
            context.put(format!("{LAST}{}", outcome.gateway).into_bytes(), bytes);
            self.publish(
                &outcome.gateway,
                &serde_json::json!({"apply": outcome}),
                context,
            )?;
        }
        Ok(())
    }
}

impl Handler for Gateway {
    type Row = serde_json::Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let change = match change_of(event, &self.config.group) {
            Ok(change) => change,
            Err(NotAChange::Ignored(why)) => {
                tracing::debug!(event = %event.id, why, "not a gateway change");
                self.count("ignored", "not a gateway resource");
                return Ok(());
            }
            Err(NotAChange::Invalid(why)) => return Err(HandlerError::permanent(why)),
        };
        let key = format!("{RESOURCE}{}", change.id.key());
        let stored: Option<Stored> = match context.get(key.as_bytes())? {
            Some(bytes) => Some(decode(&key, &bytes)?),
            None => None,
        };
        let refusal = match &change.spec {
            Some(Ok(spec)) => check_alone(spec, &self.limits).err(),
            Some(Err(reason)) => Some(reason.clone()),
            None => None,
        };
        let accepted = match &change.spec {
            Some(Ok(spec)) if refusal.is_none() => Some(spec.clone()),
            _ => None,
        };
        let (record, changed) = match take(stored.as_ref(), &change, accepted) {
            Taken::Stale => {
                self.count("stale", &change.id.kind);
                return Ok(());
            }
            Taken::Stored(record, changed) => (*record, changed),
        };
        let now = epoch_ms(SystemTime::now());
        Self::update_index(&change.id, record.spec.is_some(), context)?;
        context.put(key.into_bytes(), encode(&record)?);
        if changed {
            Self::mark_dirty(now, context)?;
        }
        let status = match (&refusal, &change.spec) {
            (Some(reason), _) => {
                tracing::warn!(resource = %change.id, reason, "gateway resource refused");
                self.count("refused", &change.id.kind);
                ResourceStatus::new(
                    change.id,
                    ResourceState::Rejected,
                    Some(reason.clone()),
                    now,
                )
            }
            (None, None) => ResourceStatus::new(change.id, ResourceState::Deleted, None, now),
            (None, Some(_)) => {
                let status = ResourceStatus::new(change.id, ResourceState::Accepted, None, now);
                self.record(status, context)?;
                return Ok(());
            }
        };
        self.report(status, context)
    }

    async fn tick(&self, now: SystemTime, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let now = epoch_ms(now);
        self.publish_outcomes(context)?;
        if let Some(bytes) = context.get(DIRTY.as_bytes())? {
            let dirty: Dirty = decode(DIRTY, &bytes)?;
            if dirty.due(now, self.config.debounce_ms, self.config.max_delay_ms) {
                self.send_plan(now, context)?;
            }
        }
        let checked = match context.get(CHECKED.as_bytes())? {
            Some(bytes) => decode::<i64>(CHECKED, &bytes)?,
            None => 0,
        };
        if now - checked >= self.config.drift_check_s as i64 * 1000 {
            context.put(CHECKED.as_bytes().to_vec(), encode(&now)?);
            if checked > 0 {
                self.send_order(&Order::CheckDrift, context)?;
            }
        }
        Ok(())
    }

    fn metrics(&self) -> std::sync::Arc<ConsumerMetrics> {
        self.metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::Dirty;

    #[test]
    fn a_burst_is_applied_once_it_stops_or_once_it_has_lasted_too_long() {
        let (debounce, max_delay) = (100, 1000);
        let burst = Dirty {
            first_ms: 500,
            last_ms: 950,
        };
        assert!(!burst.due(1000, debounce, max_delay), "still changing");
        assert!(burst.due(1050, debounce, max_delay), "quiet for 100 ms");
        let steady = Dirty {
            first_ms: 0,
            last_ms: 1990,
        };
        assert!(!steady.due(999, debounce, max_delay));
        assert!(
            steady.due(1000, debounce, max_delay),
            "overdue: a stream never stops"
        );
    }
}
