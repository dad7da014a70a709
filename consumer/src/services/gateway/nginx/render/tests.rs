use serde_json::json;

use super::*;
use crate::services::gateway::testing::{id, spec};

fn layout() -> Layout {
    Layout {
        listen: "127.0.0.1:8080".into(),
        health_listen: "127.0.0.1:8081".into(),
        dir: "/srv/gw".into(),
    }
}

fn plan(secrets_ok: bool) -> (Plan, Secrets, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a directory");
    if secrets_ok {
        let keys = dir.path().join("team/keys");
        std::fs::create_dir_all(&keys).expect("created");
        std::fs::write(keys.join("keys"), "k-one\n\nk-two\n").expect("written");
    }
    let resources = vec![
        (
            id("AuthPolicy", "auth"),
            spec(
                "AuthPolicy",
                json!({"targetRef": {"kind": "Route", "name": "shop"},
            "apiKeys": {"secretRef": {"name": "keys", "key": "keys"}}}),
            ),
        ),
        (
            id("ModelRoute", "gpt"),
            spec(
                "ModelRoute",
                json!({"model": "gpt-4o", "limits": {"requestsPerMinute": 60},
            "providers": [{"name": "a", "target": "127.0.0.1:9100", "weight": 2}, {"name": "b", "target": "127.0.0.1:9101", "priority": 1}]}),
            ),
        ),
        (
            id("RateLimitPolicy", "limit"),
            spec(
                "RateLimitPolicy",
                json!({"targetRef": {"kind": "Route", "name": "shop"},
            "requests": 5, "per": "Second", "burst": 2, "key": {"header": "X-Tenant"}}),
            ),
        ),
        (
            id("Route", "shop"),
            spec(
                "Route",
                json!({"hosts": ["Shop.example.com"], "path": {"type": "PathPrefix", "value": "/api"},
            "methods": ["GET", "POST"], "upstreams": [{"target": "127.0.0.1:9001", "weight": 3}, {"target": "127.0.0.1:9002"}],
            "retries": {"attempts": 2, "on5xx": true}, "requestHeaders": {"set": {"X-From": "gw"}, "remove": ["Cookie"]}}),
            ),
        ),
        (
            id("Route", "static"),
            spec(
                "Route",
                json!({"path": {"type": "RegularExpression", "value": "^/static/[a-z]+\\.css$"},
            "upstreams": [{"target": "127.0.0.1:9003"}]}),
            ),
        ),
    ];
    let plan = Plan {
        generation: 3,
        resources,
    };
    let secrets = Secrets {
        dir: Some(dir.path().to_path_buf()),
    };
    (plan, secrets, dir)
}

#[test]
fn a_plan_renders_servers_locations_policies_and_model_fallbacks() {
    let (plan, secrets, _dir) = plan(true);
    let rendered = render(&plan, &layout(), &secrets);
    assert!(rendered.rejected.is_empty(), "{:?}", rendered.rejected);
    let text = &rendered.text;
    for expected in [
        "upstream cw_r3 {\n        server 127.0.0.1:9001 weight=3;\n        server 127.0.0.1:9002 weight=1;",
        "server 127.0.0.1:9101 weight=1 backup;",
        "limit_req_zone $cw_k2 zone=cw_l2:1m rate=5r/s;",
        "map $http_x_api_key $cw_a0 {\n        default 0;\n        \"k-one\" 1;\n        \"k-two\" 1;",
        "server_name shop.example.com;",
        "location = /api {",
        "location ^~ /api/ {",
        "if ($request_method !~ ^(GET|POST)$) { return 405; }",
        "if ($cw_a0 = 0) { return 401",
        "limit_req zone=cw_l2 burst=2 nodelay;",
        "proxy_set_header X-From \"gw\";",
        "proxy_set_header Cookie \"\";",
        "proxy_next_upstream error timeout http_500 http_502 http_503 http_504;",
        "location ~ \"^/static/[a-z]+\\.css$\" {",
        "\"gpt-4o\" /__cw_m1;",
        "limit_req zone=cw_ml1 nodelay;",
        "proxy_next_upstream_tries 2;",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(text.contains(&format!(
        "add_header x-changewire-config {} always;",
        rendered.digest
    )));
    assert!(!text.contains(PLACEHOLDER));
    let shop_line = text
        .lines()
        .position(|l| l.contains("location ^~ /api/"))
        .expect("there")
        + 1;
    assert_eq!(rendered.owner(shop_line), Some(&id("Route", "shop")));
    let again = render(&plan, &layout(), &secrets);
    assert_eq!(
        (again.text, again.digest),
        (rendered.text.clone(), rendered.digest.clone()),
        "the same plan renders the same bytes"
    );
}

#[test]
fn a_guard_that_cannot_be_read_keeps_its_route_out() {
    let (plan, secrets, _dir) = plan(false);
    let rendered = render(&plan, &layout(), &secrets);
    let refused: Vec<(String, String)> = (rendered.rejected.iter())
        .map(|r| (r.resource.name.clone(), r.reason.clone()))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0]
            .1
            .contains("cannot read the keys of Secret team/keys"),
        "{refused:?}"
    );
    assert_eq!(refused[1].0, "shop");
    assert!(!rendered.text.contains("server_name shop.example.com;"));
    assert!(
        rendered.text.contains("location ~ \"^/static/"),
        "the others are served"
    );
}
