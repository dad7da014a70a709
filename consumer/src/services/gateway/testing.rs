//! Test support for the gateway's unit tests: resource ids and specs.

use changewire_schemas::gateway::GatewaySpec;

use super::desired::{Definer, ResourceId};

/// The custom resource `kind` `team/<name>`.
pub(crate) fn id(kind: &str, name: &str) -> ResourceId {
    ResourceId {
        definer: Definer::Kubernetes,
        kind: kind.into(),
        namespace: "team".into(),
        name: name.into(),
    }
}

/// A `kind` spec read from JSON.
pub(crate) fn spec(kind: &str, spec: serde_json::Value) -> GatewaySpec {
    GatewaySpec::from_spec(kind, spec).expect("a spec")
}
