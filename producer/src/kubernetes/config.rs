//! The `[kubernetes]` config section: which kinds to watch and how.

use std::fmt;

use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};

use super::audit::AuditConfig;
use crate::pattern;

/// The Kubernetes source.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Source name: in event ids, topic names and `source.name`.
    pub name: String,
    /// Cluster name for `source.cluster` (defaults to `name`).
    #[serde(default)]
    pub cluster: Option<String>,
    /// API server URL used without credentials (e.g. `kubectl proxy` or the fake API
    /// server). When unset, the usual discovery: `KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster service account.
    #[serde(default)]
    pub api_url: Option<String>,
    /// Kinds to watch.
    #[serde(default)]
    pub kinds: Vec<KindConfig>,
    /// Watch every CustomResourceDefinition's kind, started when the CRD becomes
    /// Established and stopped when it is deleted. Same as `crd_groups = ["*"]`.
    #[serde(default)]
    pub watch_all_crds: bool,
    /// Watch the kinds of CRDs whose group matches one of these patterns (`*` wildcard).
    #[serde(default)]
    pub crd_groups: Vec<String>,
    /// Drop status-only updates of kinds discovered through CRDs.
    #[serde(default)]
    pub drop_status_only: bool,
    /// Key of the keyed hash that replaces Secret data and `redact` paths (at least 16
    /// bytes; set it from `CHANGEWIRE_KUBERNETES__REDACTION_KEY`).
    #[serde(default)]
    pub redaction_key: Option<String>,
    /// Partitions of the topics the source creates.
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    /// Objects per list page.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Seconds a watch may stay silent (bookmarks count) before it is restarted.
    #[serde(default = "default_idle_timeout")]
    pub watch_idle_timeout_secs: u32,
    /// The audit webhook endpoint; without it actors come from managedFields only.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
}

/// One watched kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// API group; empty (the default) for the core group.
    #[serde(default)]
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Kind, e.g. `ConfigMap`.
    pub kind: String,
    /// Plural resource name; discovered from the API server when unset.
    #[serde(default)]
    pub plural: Option<String>,
    /// Namespaces to watch; empty watches all (and cluster-scoped kinds).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Label selector, e.g. `app=gateway,tier!=test`.
    #[serde(default)]
    pub label_selector: Option<String>,
    /// Field selector, e.g. `metadata.name=main`.
    #[serde(default)]
    pub field_selector: Option<String>,
    /// Drop updates that change only `status`.
    #[serde(default)]
    pub drop_status_only: bool,
    /// JSON pointers whose values are replaced by a keyed hash; `*` matches any one
    /// key or index (e.g. `/spec/upstreams/*/apiKey`).
    #[serde(default)]
    pub redact: Vec<String>,
}

impl fmt::Debug for KubernetesConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesConfig")
            .field("name", &self.name)
            .field("api_url", &self.api_url)
            .field("kinds", &self.kinds)
            .field("crd_groups", &self.crd_groups())
            .field(
                "redaction_key",
                &self.redaction_key.as_ref().map(|_| "<redacted>"),
            )
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

fn default_partitions() -> i32 {
    3
}

fn default_page_size() -> u32 {
    500
}

fn default_idle_timeout() -> u32 {
    290
}

impl KindConfig {
    /// Whether this is the core `Secret` kind, whose data is always redacted.
    pub fn is_secret(&self) -> bool {
        self.group.is_empty() && self.kind == "Secret"
    }
}

impl KubernetesConfig {
    /// `source.cluster`.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(&self.name)
    }

    /// Group patterns of CRDs to follow (`*` when `watch_all_crds`).
    pub fn crd_groups(&self) -> Vec<String> {
        if self.watch_all_crds {
            vec!["*".into()]
        } else {
            self.crd_groups.clone()
        }
    }

    /// Whether CRDs of `group` are followed.
    pub fn follows_crd_group(&self, group: &str) -> bool {
        self.crd_groups().iter().any(|p| pattern::matches(p, group))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(ConfigError::invalid(
                "kubernetes.name",
                "use letters, digits, '-' and '_'",
            ));
        }
        if self.kinds.is_empty() && self.crd_groups().is_empty() {
            return Err(ConfigError::invalid(
                "kubernetes",
                "nothing to watch: add [[kubernetes.kinds]] or watch_all_crds = true",
            ));
        }
        if self.topic_partitions < 1 || self.page_size == 0 || self.watch_idle_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "kubernetes",
                "topic_partitions, page_size and watch_idle_timeout_secs must be positive",
            ));
        }
        for kind in &self.kinds {
            if kind.version.is_empty() || kind.kind.is_empty() {
                return Err(ConfigError::invalid(
                    "kubernetes.kinds",
                    "every kind needs version and kind",
                ));
            }
            if let Some(bad) = kind.redact.iter().find(|p| !p.starts_with('/')) {
                return Err(ConfigError::invalid(
                    "kubernetes.kinds.redact",
                    format!("{bad:?} is not a JSON pointer (it must start with '/')"),
                ));
            }
        }
        let needs_key = self
            .kinds
            .iter()
            .any(|k| k.is_secret() || !k.redact.is_empty());
        if needs_key && self.redaction_key.as_deref().is_none_or(|k| k.len() < 16) {
            return Err(ConfigError::invalid("kubernetes.redaction_key", "Secrets or redact paths are watched: set a key of at least 16 bytes (CHANGEWIRE_KUBERNETES__REDACTION_KEY)"));
        }
        self.audit.as_ref().map_or(Ok(()), AuditConfig::validate)
    }
}
