use changewire_schemas::{fixtures, EventId};
use serde_json::json;

use super::*;
use crate::services::gateway::testing::id;

fn route(hosts: &[&str], path: &str) -> GatewaySpec {
    let spec = json!({"hosts": hosts, "path": {"type": "PathPrefix", "value": path},
        "upstreams": [{"target": "127.0.0.1:9001", "weight": 2}]});
    GatewaySpec::from_spec("Route", spec).expect("a route")
}

fn model(path: &str, name: &str) -> GatewaySpec {
    let spec = json!({"path": path, "model": name,
        "providers": [{"name": "a", "target": "127.0.0.1:9100"}]});
    GatewaySpec::from_spec("ModelRoute", spec).expect("a model route")
}

fn policy(kind: &str, target: &str) -> GatewaySpec {
    let spec = match kind {
        "RateLimitPolicy" => json!({"targetRef": {"kind": "Route", "name": target},
            "requests": 5, "per": "Second"}),
        _ => json!({"targetRef": {"kind": "Route", "name": target},
            "apiKeys": {"secretRef": {"name": "keys", "key": "keys"}}}),
    };
    GatewaySpec::from_spec(kind, spec).expect("a policy")
}

fn k8s(uid: &str, generation: i64, spec: Option<GatewaySpec>) -> Change {
    Change {
        id: id("Route", "shop"),
        version: Version::Kubernetes {
            uid: uid.into(),
            generation,
        },
        spec: spec.map(Ok),
        at_ms: generation,
    }
}

fn stored(taken: Taken) -> Stored {
    match taken {
        Taken::Stored(stored, _) => *stored,
        Taken::Stale => panic!("unexpectedly stale"),
    }
}

#[test]
fn older_generations_replays_and_dead_incarnations_are_stale() {
    let (v1, v2) = (route(&[], "/a"), route(&[], "/b"));
    let first = stored(take(
        None,
        &k8s("u1", 1, Some(v1.clone())),
        Some(v1.clone()),
    ));
    let second = stored(take(
        Some(&first),
        &k8s("u1", 2, Some(v2.clone())),
        Some(v2.clone()),
    ));
    assert_eq!(second.spec, Some(v2.clone()));
    let old = k8s("u1", 1, Some(v1.clone()));
    assert_eq!(take(Some(&second), &old, Some(v1.clone())), Taken::Stale);
    let replay = k8s("u1", 2, Some(v2.clone()));
    assert_eq!(take(Some(&second), &replay, Some(v2.clone())), Taken::Stale);

    let deleted = stored(take(Some(&second), &k8s("u1", 2, None), None));
    assert_eq!(deleted.spec, None);
    assert_eq!(
        take(
            Some(&deleted),
            &k8s("u1", 3, Some(v1.clone())),
            Some(v1.clone())
        ),
        Taken::Stale,
        "a change of a deleted incarnation"
    );
    let reborn = take(Some(&deleted), &k8s("u2", 1, Some(v1.clone())), Some(v1));
    assert!(
        matches!(reborn, Taken::Stored(_, true)),
        "a new uid is a new object"
    );
}

#[test]
fn rows_order_by_lsn_then_position_in_the_transaction() {
    let row = |lsn, order| Change {
        id: id("Route", "shop"),
        version: Version::Postgres { lsn, order },
        spec: Some(Ok(route(&[], "/a"))),
        at_ms: 1,
    };
    let spec = Some(route(&[], "/a"));
    let first = stored(take(None, &row(100, 2), spec.clone()));
    assert_eq!(take(Some(&first), &row(100, 2), spec.clone()), Taken::Stale);
    assert_eq!(take(Some(&first), &row(90, 9), spec.clone()), Taken::Stale);
    assert!(matches!(
        take(Some(&first), &row(100, 3), spec.clone()),
        Taken::Stored(_, false)
    ));
    let delete = Change {
        spec: None,
        ..row(120, 1)
    };
    assert!(
        matches!(take(Some(&first), &delete, None), Taken::Stored(s, true) if s.spec.is_none())
    );
}

#[test]
fn a_refused_spec_moves_the_version_on_and_keeps_the_last_accepted_one() {
    let good = route(&[], "/a");
    let first = stored(take(
        None,
        &k8s("u1", 1, Some(good.clone())),
        Some(good.clone()),
    ));
    let mut bad = k8s("u1", 2, None);
    bad.spec = Some(Err("invalid".into()));
    let Taken::Stored(kept, changed) = take(Some(&first), &bad, None) else {
        panic!("taken")
    };
    assert!(!changed);
    assert_eq!(kept.spec, Some(good));
    assert_eq!(
        kept.version,
        Version::Kubernetes {
            uid: "u1".into(),
            generation: 2
        }
    );
}

#[test]
fn specs_are_checked_alone_with_reasons() {
    let limits = Limits {
        allowed_upstreams: vec!["10.0.0.0/8".into(), "*.svc.cluster.local".into()],
    };
    let with = |patch: serde_json::Value| {
        let mut spec = json!({"path": {"type": "PathPrefix", "value": "/a"},
            "upstreams": [{"target": "10.1.2.3:80"}]});
        for (key, value) in patch.as_object().expect("an object") {
            spec[key] = value.clone();
        }
        check_alone(
            &GatewaySpec::from_spec("Route", spec).expect("parses"),
            &limits,
        )
    };
    assert_eq!(with(json!({})), Ok(()));
    let shop = json!([{"target": "shop.team.svc.cluster.local:8080"}]);
    assert_eq!(with(json!({"upstreams": shop})), Ok(()));
    let cases = [
        (
            json!({"path": {"type": "RegularExpression", "value": "^/(a"}}),
            "invalid regular expression",
        ),
        (
            json!({"upstreams": [{"target": "192.168.1.1:80"}]}),
            "not among the allowed upstreams",
        ),
        (
            json!({"upstreams": [{"target": "evil.cluster.local:80"}]}),
            "not among the allowed upstreams",
        ),
        (
            json!({"upstreams": [{"target": "10.0.0.1"}]}),
            "not host:port",
        ),
        (json!({"upstreams": []}), "at least one"),
        (
            json!({"path": {"type": "Exact", "value": "/a;b"}}),
            "must start with /",
        ),
        (json!({"hosts": ["bad host"]}), "is not a host name"),
        (json!({"methods": ["get"]}), "not an HTTP method"),
        (
            json!({"requestHeaders": {"set": {"X-A": "a\nb"}}}),
            "control character",
        ),
        (
            json!({"upstreams": [{"target": "10.0.0.1:80", "weight": 0}]}),
            "1 to 1000",
        ),
    ];
    for (patch, reason) in cases {
        let error = with(patch.clone()).expect_err(&patch.to_string());
        assert!(error.contains(reason), "{patch}: {error}");
    }
    let jwt = json!({"targetRef": {"kind": "Route", "name": "a"},
        "jwt": {"issuer": "i", "jwksUri": "https://i/jwks"}});
    let jwt = GatewaySpec::from_spec("AuthPolicy", jwt).expect("parses");
    assert!(check_alone(&jwt, &limits).unwrap_err().contains("JWT"));
    let tokens = json!({"model": "m", "providers": [{"name": "p", "target": "10.0.0.1:80"}],
        "limits": {"tokensPerMinute": 1000}});
    let tokens = GatewaySpec::from_spec("ModelRoute", tokens).expect("parses");
    assert!(check_alone(&tokens, &limits)
        .unwrap_err()
        .contains("tokensPerMinute"));
}

#[test]
fn a_plan_leaves_out_conflicts_and_dangling_policies_and_keeps_the_rest() {
    let resources = BTreeMap::from([
        (id("Route", "a"), route(&["shop.example.com"], "/api")),
        (id("Route", "b"), route(&["SHOP.example.com"], "/api")),
        (id("Route", "c"), route(&[], "/api")),
        (id("Route", "d"), route(&[], "/v1/")),
        (id("ModelRoute", "gpt"), model("/v1/", "gpt")),
        (id("ModelRoute", "llama"), model("/llm/", "llama")),
        (id("ModelRoute", "mistral"), model("/llm/", "mistral")),
        (id("ModelRoute", "llama-again"), model("/llm/", "llama")),
        (
            id("RateLimitPolicy", "limit-a"),
            policy("RateLimitPolicy", "a"),
        ),
        (
            id("RateLimitPolicy", "limit-a2"),
            policy("RateLimitPolicy", "a"),
        ),
        (id("AuthPolicy", "auth-a"), policy("AuthPolicy", "a")),
        (id("AuthPolicy", "auth-gone"), policy("AuthPolicy", "gone")),
        (id("AuthPolicy", "auth-b"), policy("AuthPolicy", "b")),
    ]);
    let (plan, rejected) = Plan::from_resources(7, resources.into_iter().collect());
    let served: Vec<String> = plan
        .resources
        .iter()
        .map(|(id, _)| id.name.clone())
        .collect();
    assert_eq!(
        served,
        ["auth-a", "gpt", "llama", "mistral", "limit-a", "a", "c"],
        "ids in order (kind first)"
    );
    let reasons: BTreeMap<String, String> = rejected
        .into_iter()
        .map(|r| (r.resource.name, r.reason))
        .collect();
    assert!(
        reasons["b"].contains("conflicts with Route/team/a"),
        "{reasons:?}"
    );
    assert!(reasons["llama-again"].contains("conflicts with ModelRoute/team/llama"));
    assert!(reasons["limit-a2"].contains("another RateLimitPolicy"));
    assert!(reasons["auth-gone"].contains("does not exist"));
    assert!(reasons["auth-b"].contains("does not exist or is not served"));
    assert!(reasons["d"].contains("conflicts with ModelRoute/team/gpt"));
    assert_eq!(reasons.len(), 6);
}

#[test]
fn the_older_of_two_conflicting_routes_keeps_its_traffic() {
    let (older, newer) = (id("Route", "zeta"), id("Route", "alpha"));
    let resources = vec![
        (older.clone(), route(&[], "/api")),
        (newer, route(&[], "/api")),
    ];
    let (plan, rejected) = Plan::from_resources(1, resources);
    assert_eq!(plan.resources.len(), 1);
    assert_eq!(plan.resources[0].0, older);
    assert!(rejected[0]
        .reason
        .contains("conflicts with Route/team/zeta"));
}

#[test]
fn events_of_both_producers_read_as_changes() {
    let mut event = fixtures::kubernetes_create("k8s");
    if let Origin::Kubernetes(origin) = &mut event.source.origin {
        origin.group = changewire_schemas::gateway::GROUP.into();
        origin.kind = "Route".into();
    }
    event.after = Some(json!({"metadata": {"generation": 4},
        "spec": {"path": {"type": "Exact", "value": "/x"}, "upstreams": [{"target": "127.0.0.1:1"}]}}));
    let change = change_of(&event, changewire_schemas::gateway::GROUP).expect("a change");
    assert!(matches!(
        change.version,
        Version::Kubernetes { generation: 4, .. }
    ));
    assert!(matches!(change.spec, Some(Ok(GatewaySpec::Route(_)))));
    assert!(matches!(
        change_of(&event, "other.example.com"),
        Err(NotAChange::Ignored(_))
    ));

    let mut row = fixtures::postgres_update("pg");
    row.id = EventId::postgres("pg", 1, 1);
    row.after = Some(json!({"namespace": "team", "name": "shop", "spec": {"bad": 1}}));
    let change = change_of(&row, "any").expect("a change");
    assert_eq!(change.id.to_string(), "Route/team/shop (postgres)");
    assert!(matches!(&change.spec, Some(Err(e)) if e.contains("unknown field `bad`")));
    row.after = Some(json!({"id": 1}));
    assert!(
        matches!(change_of(&row, "any"), Err(NotAChange::Invalid(e)) if e.contains("no text column `name`"))
    );
}
