//! Sample events shared by the tests.

use changewire_schemas::{
    Actor, ActorVia, ChangeEvent, EventId, KubernetesOrigin, Op, Origin, PostgresOrigin,
    SnapshotMarker, Source, Transaction,
};
use serde_json::json;

/// An update of one Postgres row, with every optional block filled.
pub fn postgres_update(source: &str) -> ChangeEvent {
    ChangeEvent {
        id: EventId::postgres(source, 0x2A_0001_F00D, 3),
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
                lsn: 0x2A_0001_F00D,
                tx_id: Some(90_210),
                sequence: None,
            }),
        },
        before: Some(json!({"id": 1, "note": "émoji ✓", "amount": "10.50"})),
        after: Some(json!({"id": 1, "note": "paid", "amount": "10.50", "meta": {"k": [1, 2]}})),
        diff: None,
        actor: None,
        transaction: Some(Transaction {
            id: "90210:180388687885".into(),
            total_order: 3,
            data_collection_order: 1,
        }),
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
