//! Which paths a change touched: dotted patterns (`spec.auth.*`) over a
//! Kubernetes object's diff (RFC 6902 operations) or, for table rows, over the
//! columns whose values differ. The audit query's changed-path filter and the
//! alert rules' `changed` condition share it.

use changewire_schemas::{ChangeEvent, Op};

/// A dotted path pattern split into its segments once (`spec.auth.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(Vec<String>);

impl PathPattern {
    /// `pattern`'s segments.
    pub fn parse(pattern: &str) -> Self {
        Self(pattern.split('.').map(str::to_owned).collect())
    }
}

/// Whether `event` changed a path matching `pattern` (dotted; `*` is one segment,
/// a trailing `*` anything below; split once with [`PathPattern::parse`]). An
/// operation on an enclosing path counts when its value holds the path (or it
/// removed it). Without a diff (table rows), an update changed the paths where
/// `before` and `after` differ, and creates and deletes change every path their
/// object has.
pub fn changed_at(event: &ChangeEvent, pattern: &PathPattern) -> bool {
    let wanted = pattern.0.as_slice();
    if let Some(touched) = event.diff.as_ref().and_then(|d| diff_touches(d, pattern)) {
        return touched;
    }
    match (event.op, &event.before, &event.after) {
        (Op::Update, Some(before), Some(after)) => differs(before, after, wanted),
        (Op::Update, _, _) => false,
        (_, before, after) => after
            .as_ref()
            .or(before.as_ref())
            .is_some_and(|o| holds(o, wanted)),
    }
}

/// Whether a diff (RFC 6902 operations) touched a path matching `pattern`;
/// `None` when `diff` is not a list of operations.
pub fn diff_touches(diff: &serde_json::Value, pattern: &PathPattern) -> Option<bool> {
    let operations = diff.as_array()?;
    Some(operations.iter().any(|op| touches(op, &pattern.0)))
}

/// The first segment of `wanted`, and the rest.
fn first<S: AsRef<str>>(wanted: &[S]) -> Option<(&str, &[S])> {
    wanted.split_first().map(|(w, rest)| (w.as_ref(), rest))
}

/// Whether `before` and `after` differ somewhere `wanted` matches.
fn differs<S: AsRef<str>>(
    before: &serde_json::Value,
    after: &serde_json::Value,
    wanted: &[S],
) -> bool {
    let null = serde_json::Value::Null;
    match first(wanted) {
        None | Some(("*", [])) => before != after,
        Some(("*", rest)) => {
            let keys = |v: &serde_json::Value| {
                v.as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            let mut all = keys(before);
            all.extend(keys(after));
            all.iter().any(|k| {
                differs(
                    before.get(k).unwrap_or(&null),
                    after.get(k).unwrap_or(&null),
                    rest,
                )
            })
        }
        Some((segment, rest)) => differs(
            before.get(segment).unwrap_or(&null),
            after.get(segment).unwrap_or(&null),
            rest,
        ),
    }
}

/// Whether one JSON Patch operation changes something `wanted` matches.
fn touches<S: AsRef<str>>(operation: &serde_json::Value, wanted: &[S]) -> bool {
    let Some(path) = operation.get("path").and_then(|p| p.as_str()) else {
        return false;
    };
    let segments = json_pointer_segments(path);
    if path_matches(&segments, wanted) {
        return true;
    }
    let encloses = wanted.len() > segments.len()
        && (segments.iter().zip(wanted)).all(|(s, w)| w.as_ref() == "*" || w.as_ref() == s);
    encloses
        && operation
            .get("value")
            .is_none_or(|value| holds(value, &wanted[segments.len()..]))
}

/// Whether `value` has something at `wanted`.
fn holds<S: AsRef<str>>(value: &serde_json::Value, wanted: &[S]) -> bool {
    match first(wanted) {
        None => true,
        Some(("*", rest)) => match value {
            serde_json::Value::Object(map) => map.values().any(|v| holds(v, rest)),
            serde_json::Value::Array(items) => items.iter().any(|v| holds(v, rest)),
            _ => false,
        },
        Some((segment, rest)) => value.get(segment).is_some_and(|v| holds(v, rest)),
    }
}

fn json_pointer_segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn path_matches<S: AsRef<str>>(path: &[String], wanted: &[S]) -> bool {
    match (first(wanted), path.split_first()) {
        (Some(("*", [])), _) | (None, _) => true,
        (Some(_), None) => false,
        (Some((w, rest)), Some((p, path_rest))) => {
            (w == "*" || w == p) && path_matches(path_rest, rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn changed(event: &ChangeEvent, pattern: &str) -> bool {
        changed_at(event, &PathPattern::parse(pattern))
    }

    #[test]
    fn changed_paths_match_with_wildcards() {
        let path = json_pointer_segments("/spec/auth/mode");
        assert!(path_matches(&path, &["spec", "auth", "*"]));
        assert!(path_matches(&path, &["spec", "*", "mode"]));
        assert!(
            path_matches(&path, &["spec"]),
            "a prefix covers what is below"
        );
        assert!(!path_matches(&path, &["spec", "rate"]));
        assert!(!path_matches(
            &json_pointer_segments("/spec"),
            &["spec", "auth", "*"]
        ));
        let escaped = json_pointer_segments("/metadata/annotations/a~1b");
        assert!(path_matches(&escaped, &["metadata", "annotations", "a/b"]));
    }

    #[test]
    fn updates_match_on_their_diff_and_creates_on_their_object() {
        let mut event = changewire_schemas::fixtures::kubernetes_create("k8s");
        event.diff =
            Some(json!([{"op": "add", "path": "/spec", "value": {"auth": {"mode": "jwt"}}}]));
        assert!(
            changed(&event, "spec.auth.*"),
            "an add of the enclosing object"
        );
        assert!(!changed(&event, "spec.rate.*"));
        event.diff = None;
        event.after = Some(json!({"spec": {"auth": {"mode": "jwt"}}}));
        assert!(changed(&event, "spec.auth.*"), "a create without a diff");
        event.op = Op::Update;
        event.diff = Some(json!([{"op": "replace", "path": "/spec/rate", "value": 5}]));
        assert!(changed(&event, "spec.rate"));
        assert!(!changed(&event, "spec.auth.*"));
        // A row: no diff, before and after.
        event.diff = None;
        event.before = Some(json!({"id": 1, "status": "new", "total": "10.00"}));
        event.after = Some(json!({"id": 1, "status": "paid", "total": "10.00"}));
        assert!(changed(&event, "status"));
        assert!(changed(&event, "*"));
        assert!(!changed(&event, "total"));
    }
}
