//! Sample events for tests and benchmarks, one set for every crate (enable the
//! `fixtures` feature outside this crate's own tests).

use serde_json::json;

use crate::envelope::{
    Actor, ActorVia, ChangeEvent, EventId, KubernetesOrigin, Op, Origin, PostgresOrigin,
    SnapshotMarker, Source, Transaction,
};

/// An update of one `public.orders` row in the database `shop`, with every optional
/// block filled (a diff, an actor, a transaction, a non-ASCII text).
pub fn postgres_update(source: &str) -> ChangeEvent {
    ChangeEvent {
        id: EventId::postgres(source, 0x16B_3748, 2),
        op: Op::Update,
        ts_ms: 1_763_769_600_123,
        source: Source {
            name: source.into(),
            ts_ms: 1_763_769_600_100,
            snapshot: SnapshotMarker::False,
            origin: Origin::Postgresql(PostgresOrigin {
                db: "shop".into(),
                schema: "public".into(),
                table: "orders".into(),
                lsn: 0x16B_3748,
                tx_id: Some(771),
                sequence: Some("[\"23803720\",\"23803720\"]".into()),
            }),
        },
        before: Some(json!({"id": 7, "status": "new", "total": "19.90", "note": "émoji ✓"})),
        after: Some(json!({"id": 7, "status": "paid", "total": "19.90", "tags": ["a", null]})),
        diff: Some(json!([{"op": "replace", "path": "/status", "value": "paid"}])),
        actor: Some(Actor {
            name: "app_rw".into(),
            via: ActorVia::Postgres,
            groups: vec![],
            source_ips: vec![],
            user_agent: None,
        }),
        transaction: Some(Transaction {
            id: "771:23803720".into(),
            total_order: 2,
            data_collection_order: 1,
        }),
    }
}

/// The deletion of one Kubernetes `HTTPRoute` (a status-only change's last
/// state), attributed via the audit log.
pub fn kubernetes_delete(source: &str) -> ChangeEvent {
    ChangeEvent {
        id: EventId::kubernetes(source, "6f1c-uid", "4711"),
        op: Op::Delete,
        ts_ms: 1_763_769_600_999,
        source: Source {
            name: source.into(),
            ts_ms: 1_763_769_600_500,
            snapshot: SnapshotMarker::Last,
            origin: Origin::Kubernetes(KubernetesOrigin {
                cluster: source.into(),
                group: "gateway.networking.k8s.io".into(),
                version: "v1".into(),
                kind: "HTTPRoute".into(),
                namespace: Some("edge".into()),
                name: "checkout".into(),
                uid: "6f1c-uid".into(),
                resource_version: "4711".into(),
                status_only: true,
            }),
        },
        before: Some(json!({"metadata": {"name": "checkout"}, "spec": {"hostnames": ["x"]}})),
        after: None,
        diff: None,
        actor: Some(Actor {
            name: "alice@example.com".into(),
            via: ActorVia::Audit,
            groups: vec!["system:authenticated".into()],
            source_ips: vec!["10.0.0.7".into()],
            user_agent: Some("kubectl/v1.31".into()),
        }),
        transaction: None,
    }
}

/// The creation of one Kubernetes custom resource, attributed via the audit log.
pub fn kubernetes_create(source: &str) -> ChangeEvent {
    ChangeEvent {
        id: EventId::kubernetes(source, "0b9f-uid", "812"),
        op: Op::Create,
        ts_ms: 1_763_769_601_000,
        source: Source {
            name: source.into(),
            ts_ms: 1_763_769_600_900,
            snapshot: SnapshotMarker::False,
            origin: Origin::Kubernetes(KubernetesOrigin {
                cluster: source.into(),
                group: "policy.example.com".into(),
                version: "v1".into(),
                kind: "RateLimit".into(),
                namespace: Some("edge".into()),
                name: "per-ip".into(),
                uid: "0b9f-uid".into(),
                resource_version: "812".into(),
                status_only: false,
            }),
        },
        before: None,
        after: Some(json!({"spec": {"rps": 100}})),
        diff: Some(json!([{"op": "add", "path": "/spec", "value": {"rps": 100}}])),
        actor: Some(Actor {
            name: "bob".into(),
            via: ActorVia::Audit,
            groups: vec!["ops".into()],
            source_ips: vec!["192.0.2.4".into()],
            user_agent: Some("kubectl".into()),
        }),
        transaction: None,
    }
}

/// A compact create event of a `public.orders` row whose id and LSN derive
/// from `n` (for benchmarks).
pub fn compact_event(n: u64) -> ChangeEvent {
    ChangeEvent {
        id: EventId::postgres("bench", 0x1000 + n, 1),
        op: Op::Create,
        ts_ms: 1_763_769_600_123,
        source: Source {
            name: "bench".into(),
            ts_ms: 1_763_769_600_100,
            snapshot: SnapshotMarker::False,
            origin: Origin::Postgresql(PostgresOrigin {
                db: "shop".into(),
                schema: "public".into(),
                table: "orders".into(),
                lsn: 0x1000 + n,
                tx_id: Some(n as i64),
                sequence: None,
            }),
        },
        before: None,
        after: Some(json!({"id": n, "note": "paid", "amount": "10.50"})),
        diff: None,
        actor: None,
        transaction: None,
    }
}
