//! Elastic Common Schema (ECS 8.x) documents of change events.
//!
//! Field by field (docs/siem.md has the table):
//! - `@timestamp`: the change's time (`source.ts_ms`);
//! - `event.kind` `event`; `event.category` `iam` for RBAC objects, service
//!   accounts and Secrets, `database` for table rows, else `configuration`;
//!   `event.type` `creation` / `change` / `deletion` / `info` (snapshot reads);
//!   `event.action` `<kind>-<created|updated|deleted|read|truncated>`;
//!   `event.outcome` `success` (only applied changes are captured); `event.id` the
//!   event id; `event.created` when the producer emitted it; `event.dataset`
//!   `changewire.<source>`; `event.provider` `kubernetes` or `postgresql`;
//! - Kubernetes: `orchestrator.type` `kubernetes`, `orchestrator.cluster.name`,
//!   `orchestrator.namespace`, `orchestrator.resource.type` (the kind, lower case),
//!   `orchestrator.resource.name`, `orchestrator.api_version`;
//! - the actor: `user.name`, `user.roles` (its groups), `source.ip` (the first
//!   request address), `user_agent.original`;
//! - the rest under `changewire.*`: source name, op, diff, before, after, the
//!   actor's evidence, and the table, schema and database of row changes.

use changewire_schemas::{ChangeEvent, Op, Origin};
use serde_json::{json, Map, Value};

use super::{past_tense, provider};
use changewire_schemas::time::rfc3339;

/// The ECS version the documents follow.
pub const ECS_VERSION: &str = "8.11.0";

/// Kinds whose changes are identity and access management.
const IAM_KINDS: &[&str] = &[
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "ServiceAccount",
    "Secret",
];

/// The ECS document of `event`.
pub fn document(event: &ChangeEvent) -> Value {
    let mut document = json!({
        "@timestamp": rfc3339(event.source.ts_ms),
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": "event",
            "category": [category(event)],
            "type": [event_type(event.op)],
            "action": format!("{}-{}", thing(event).to_lowercase(), past_tense(event.op)),
            "outcome": "success",
            "id": event.id.as_str(),
            "created": rfc3339(event.ts_ms),
            "dataset": format!("changewire.{}", event.source.name),
            "provider": provider(event),
        },
        "changewire": changewire(event),
    });
    let fields = document.as_object_mut().expect("an object");
    if let Origin::Kubernetes(k8s) = &event.source.origin {
        let group_version = if k8s.group.is_empty() {
            k8s.version.clone()
        } else {
            format!("{}/{}", k8s.group, k8s.version)
        };
        fields.insert(
            "orchestrator".into(),
            json!({
                "type": "kubernetes",
                "cluster": { "name": k8s.cluster },
                "namespace": k8s.namespace,
                "resource": { "type": k8s.kind.to_lowercase(), "name": k8s.name },
                "api_version": group_version,
            }),
        );
    }
    if let Some(actor) = &event.actor {
        fields.insert("user".into(), user(actor));
        if let Some(ip) = actor.source_ips.first() {
            fields.insert("source".into(), json!({ "ip": ip }));
        }
        if let Some(agent) = &actor.user_agent {
            fields.insert("user_agent".into(), json!({ "original": agent }));
        }
    }
    document
}

fn user(actor: &changewire_schemas::Actor) -> Value {
    let mut user = Map::new();
    user.insert("name".into(), json!(actor.name));
    if !actor.groups.is_empty() {
        user.insert("roles".into(), json!(actor.groups));
    }
    Value::Object(user)
}

/// `iam`, `database` or `configuration`.
pub fn category(event: &ChangeEvent) -> &'static str {
    match &event.source.origin {
        Origin::Kubernetes(k8s) if IAM_KINDS.contains(&k8s.kind.as_str()) => "iam",
        Origin::Kubernetes(_) => "configuration",
        Origin::Postgresql(_) => "database",
    }
}

fn event_type(op: Op) -> &'static str {
    match op {
        Op::Create => "creation",
        Op::Update => "change",
        Op::Delete | Op::Truncate => "deletion",
        Op::Read => "info",
    }
}

/// What changed, by kind: the Kubernetes kind, or the table.
fn thing(event: &ChangeEvent) -> &str {
    match &event.source.origin {
        Origin::Kubernetes(k8s) => &k8s.kind,
        Origin::Postgresql(pg) => &pg.table,
    }
}

/// What has no ECS field: under `changewire.*`.
fn changewire(event: &ChangeEvent) -> Value {
    let mut fields = json!({
        "source": event.source.name,
        "op": event.op.code(),
        "diff": event.diff,
        "before": event.before,
        "after": event.after,
        "actor_via": event.actor.as_ref().map(|a| a.via),
    });
    if let Origin::Postgresql(pg) = &event.source.origin {
        fields["database"] = json!(pg.db);
        fields["schema"] = json!(pg.schema);
        fields["table"] = json!(pg.table);
    }
    fields
}

#[cfg(test)]
mod tests {
    use changewire_schemas::fixtures;

    use super::*;

    #[test]
    fn a_kubernetes_change_maps_to_ecs_fields() {
        let event = fixtures::kubernetes_create("prod");
        let document = document(&event);
        assert_eq!(document["event"]["kind"], "event");
        assert_eq!(document["event"]["category"], json!(["configuration"]));
        assert_eq!(document["event"]["type"], json!(["creation"]));
        assert_eq!(document["event"]["action"], "ratelimit-created");
        assert_eq!(document["event"]["id"], event.id.as_str());
        assert_eq!(document["orchestrator"]["namespace"], "edge");
        assert_eq!(document["orchestrator"]["resource"]["type"], "ratelimit");
        assert_eq!(document["orchestrator"]["resource"]["name"], "per-ip");
        assert_eq!(
            document["orchestrator"]["api_version"],
            "policy.example.com/v1"
        );
        assert_eq!(document["user"]["name"], "bob");
        assert_eq!(document["user"]["roles"], json!(["ops"]));
        assert_eq!(document["source"]["ip"], "192.0.2.4");
        assert_eq!(document["user_agent"]["original"], "kubectl");
        assert_eq!(
            document["changewire"]["diff"],
            event.diff.clone().unwrap_or_default()
        );
        assert!(document["@timestamp"].as_str().unwrap_or("").ends_with('Z'));
    }

    #[test]
    fn secrets_are_iam_and_rows_are_database() {
        let mut secret = fixtures::kubernetes_delete("prod");
        if let Origin::Kubernetes(k8s) = &mut secret.source.origin {
            k8s.kind = "Secret".into();
        }
        let document = document(&secret);
        assert_eq!(document["event"]["category"], json!(["iam"]));
        assert_eq!(document["event"]["type"], json!(["deletion"]));
        let row = super::document(&fixtures::postgres_update("shop"));
        assert_eq!(row["event"]["category"], json!(["database"]));
        assert_eq!(row["event"]["type"], json!(["change"]));
        assert_eq!(row["event"]["provider"], "postgresql");
        assert!(row.get("orchestrator").is_none());
        assert!(row["changewire"]["table"].is_string());
    }
}
