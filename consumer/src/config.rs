//! `changewire-consumer`'s configuration file (TOML, `CHANGEWIRE_*` environment
//! overrides): the runtime's sections ([`RuntimeConfig`]) and one service's.

use std::path::Path;

use changewire_schemas::http::HttpConfig;
use changewire_schemas::settings::{load_config, ConfigError, KafkaConfig};
use changewire_schemas::topic::TopicsConfig;
use serde::{Deserialize, Serialize};

pub use crate::runtime::config::{Assignment, ServiceConfig};
use crate::runtime::RuntimeConfig;
use crate::services::alert::AlertConfig;
use crate::services::audit::AuditConfig;
use crate::services::dedup::DedupConfig;
use crate::services::forward::ForwardConfig;
use crate::services::gateway::GatewayConfig;
use crate::services::siem::SiemConfig;

/// Everything `changewire-consumer` reads from its config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Kafka brokers and client properties (TLS/SASL pass through here).
    pub kafka: KafkaConfig,
    /// Topic naming (the DLQ is `<prefix>.dlq.<service>`).
    #[serde(default)]
    pub topics: TopicsConfig,
    /// `/metrics` and `/health`; not served when absent.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// Which service this process runs, how it owns partitions, where it keeps
    /// its state.
    pub service: ServiceConfig,
    /// Run the dedup service (`changewire-consumer` runs the one service whose
    /// section is present).
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// Run the forward (webhook) service.
    #[serde(default)]
    pub forward: Option<ForwardConfig>,
    /// Run the audit service.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Run a SIEM feed.
    #[serde(default)]
    pub siem: Option<SiemConfig>,
    /// Run the alert service.
    #[serde(default)]
    pub alert: Option<AlertConfig>,
    /// Run the gateway service.
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
}

impl ConsumerConfig {
    /// Loads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = load_config(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.runtime().validate()?;
        if let Some(forward) = &self.forward {
            forward.validate("forward")?;
        }
        if let Some(siem) = &self.siem {
            siem.validate()?;
        }
        if let Some(alert) = &self.alert {
            let rules = alert.validate()?;
            // A window counts one actor's or resource's changes across partitions.
            if AlertConfig::has_windows(&rules)
                && (self.service.assignment != Assignment::Static
                    || self.service.tick_interval_ms.is_none())
            {
                return Err(ConfigError::invalid(
                    "service",
                    "rules with a threshold need assignment = \"static\" and tick_interval_ms (windows close on ticks)",
                ));
            }
        }
        if let Some(gateway) = &self.gateway {
            gateway.validate()?;
            // Every replica applies every change: none may miss a partition.
            if self.service.assignment != Assignment::Static
                || self.service.partitions.is_some()
                || self.service.tick_interval_ms.is_none()
            {
                return Err(ConfigError::invalid(
                    "service",
                    "the gateway service reads every partition itself and debounces on ticks: set assignment = \"static\", no partitions list, and tick_interval_ms (docs/gateway.md)",
                ));
            }
        }
        if let Some(audit) = &self.audit {
            audit.validate()?;
            // A group could hand a partition to another instance mid-stream and
            // split one history across two logs.
            if self.service.assignment != Assignment::Static {
                return Err(ConfigError::invalid(
                    "service.assignment",
                    "the audit service owns its partitions: set assignment = \"static\" (docs/audit.md)",
                ));
            }
        }
        Ok(())
    }

    /// The consumer group this service joins.
    pub fn group_id(&self) -> String {
        self.runtime().group_id()
    }

    /// The sections the runtime reads.
    pub fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            http: self.http.clone(),
            service: self.service.clone(),
        }
    }
}
