//! Open Cybersecurity Schema Framework (OCSF 1.1) events of change events.
//!
//! A change whose API actor is known (the Kubernetes audit log named the user)
//! is an **API Activity** (class 6003, category 6 Application Activity): who
//! called which API on what, from where. Any other change is an **Entity
//! Management** event (class 3004, category 3 Identity & Access Management): an
//! entity created, read, updated or deleted. `type_uid` is `class_uid * 100 +
//! activity_id`. What has no OCSF attribute goes under `unmapped.changewire`.

use changewire_schemas::{ActorVia, ChangeEvent, Op, Origin};
use serde_json::{json, Value};

use super::{entity_name, past_tense, provider, who};

/// The OCSF version the events follow.
pub const OCSF_VERSION: &str = "1.1.0";
/// API Activity.
pub const API_ACTIVITY: u32 = 6003;
/// Entity Management.
pub const ENTITY_MANAGEMENT: u32 = 3004;

/// The OCSF event of `event`.
pub fn event(event: &ChangeEvent) -> Value {
    let audited = event
        .actor
        .as_ref()
        .is_some_and(|a| a.via == ActorVia::Audit);
    let (class_uid, category_uid) = if audited {
        (API_ACTIVITY, 6)
    } else {
        (ENTITY_MANAGEMENT, 3)
    };
    let activity_id = activity(event.op);
    let mut document = json!({
        "class_uid": class_uid,
        "category_uid": category_uid,
        "activity_id": activity_id,
        "type_uid": class_uid * 100 + activity_id,
        "severity_id": 1,
        "status_id": 1,
        "time": event.source.ts_ms,
        "message": format!("{} {} {}", who(event), past_tense(event.op), entity_name(event)),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event.id.as_str(),
            "logged_time": event.ts_ms,
            "product": { "name": "changewire", "vendor_name": "changewire" },
        },
        "unmapped": { "changewire": {
            "source": event.source.name,
            "op": event.op.code(),
            "diff": event.diff,
            "before": event.before,
            "after": event.after,
        }},
    });
    let fields = document.as_object_mut().expect("an object");
    if let Some(actor) = &event.actor {
        let groups: Vec<Value> = actor.groups.iter().map(|g| json!({ "name": g })).collect();
        fields.insert(
            "actor".into(),
            json!({ "user": { "name": actor.name, "groups": groups } }),
        );
    }
    if audited {
        let actor = event.actor.as_ref().expect("audited: an actor");
        fields.insert(
            "api".into(),
            json!({ "operation": verb(event.op), "service": { "name": provider(event) } }),
        );
        fields.insert("cloud".into(), json!({ "provider": provider(event) }));
        fields.insert("resources".into(), json!([resource(event)]));
        fields.insert(
            "src_endpoint".into(),
            json!({ "ip": actor.source_ips.first() }),
        );
        if let Some(agent) = &actor.user_agent {
            fields.insert("http_request".into(), json!({ "user_agent": agent }));
        }
    } else {
        let entity = resource(event);
        fields.insert("entity".into(), entity.clone());
        if event.op != Op::Delete {
            fields.insert("entity_result".into(), entity);
        }
    }
    document
}

/// OCSF's activity ids of both classes: 1 create, 2 read, 3 update, 4 delete.
fn activity(op: Op) -> u32 {
    match op {
        Op::Create => 1,
        Op::Read => 2,
        Op::Update => 3,
        Op::Delete | Op::Truncate => 4,
    }
}

fn verb(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Read => "get",
        Op::Update => "update",
        Op::Delete => "delete",
        Op::Truncate => "truncate",
    }
}

/// The changed thing as an OCSF resource or managed entity.
fn resource(event: &ChangeEvent) -> Value {
    match &event.source.origin {
        Origin::Kubernetes(k8s) => json!({
            "name": k8s.name,
            "type": k8s.kind,
            "uid": k8s.uid,
            "version": k8s.resource_version,
            "data": { "namespace": k8s.namespace, "cluster": k8s.cluster, "group": k8s.group },
        }),
        Origin::Postgresql(pg) => json!({
            "name": format!("{}.{}", pg.schema, pg.table),
            "type": "table row",
            "data": { "database": pg.db, "row": event.after.as_ref().or(event.before.as_ref()) },
        }),
    }
}

#[cfg(test)]
mod tests {
    use changewire_schemas::fixtures;

    use super::*;

    #[test]
    fn an_audited_change_is_api_activity() {
        let change = fixtures::kubernetes_create("prod");
        let document = event(&change);
        assert_eq!(document["class_uid"], API_ACTIVITY);
        assert_eq!(document["category_uid"], 6);
        assert_eq!(document["activity_id"], 1);
        assert_eq!(document["type_uid"], 600_301);
        assert_eq!(document["actor"]["user"]["name"], "bob");
        assert_eq!(
            document["actor"]["user"]["groups"],
            json!([{"name": "ops"}])
        );
        assert_eq!(document["api"]["operation"], "create");
        assert_eq!(document["src_endpoint"]["ip"], "192.0.2.4");
        assert_eq!(document["resources"][0]["name"], "per-ip");
        assert_eq!(document["metadata"]["uid"], change.id.as_str());
        assert_eq!(document["time"], change.source.ts_ms);
    }

    #[test]
    fn other_changes_are_entity_management() {
        let row = fixtures::postgres_update("shop");
        let document = event(&row);
        assert_eq!(document["class_uid"], ENTITY_MANAGEMENT);
        assert_eq!(document["type_uid"], 300_403);
        assert!(document["entity"]["name"].is_string());
        assert!(document.get("api").is_none());
        let mut deleted = fixtures::kubernetes_delete("prod");
        deleted.actor = None;
        let document = event(&deleted);
        assert_eq!(
            (
                document["class_uid"].as_u64(),
                document["activity_id"].as_u64()
            ),
            (Some(3004), Some(4))
        );
        assert!(
            document.get("entity_result").is_none(),
            "nothing results from a delete"
        );
    }
}
