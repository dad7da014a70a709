//! Label and field selectors, as the API server parses them.
//!
//! Labels: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`, comma-separated
//! and all required. Fields: `metadata.name`, `metadata.namespace` with `=`, `==`, `!=`.

use serde_json::Value;

use super::store::ApiError;

/// One parsed requirement.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label or field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    requirements: Vec<Requirement>,
    fields: bool,
}

impl Selector {
    /// Parses a `labelSelector` query value.
    pub fn labels(text: &str) -> Result<Self, ApiError> {
        let requirements = split_outside_parens(text)
            .into_iter()
            .filter(|part| !part.trim().is_empty())
            .map(|part| label_requirement(part.trim()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            requirements,
            fields: false,
        })
    }

    /// Parses a `fieldSelector` query value.
    pub fn fields(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.into(), value.into())
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.into(), value.trim_start_matches('=').into())
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {part:?}"
                )));
            };
            let key = match &requirement {
                Requirement::Equals(key, _) | Requirement::NotEquals(key, _) => key,
                _ => unreachable!("field selectors are equality-based"),
            };
            if !matches!(key.as_str(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
            requirements.push(requirement);
        }
        Ok(Self {
            requirements,
            fields: true,
        })
    }

    /// Whether `object` satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| self.satisfies(r, object))
    }

    fn value_of<'a>(&self, key: &str, object: &'a Value) -> Option<&'a str> {
        let metadata = &object["metadata"];
        if self.fields {
            let field = key.strip_prefix("metadata.")?;
            // Cluster-scoped objects have no namespace: it compares as "".
            return Some(metadata[field].as_str().unwrap_or(""));
        }
        metadata["labels"][key].as_str()
    }

    fn satisfies(&self, requirement: &Requirement, object: &Value) -> bool {
        match requirement {
            Requirement::Equals(key, want) => self.value_of(key, object) == Some(want),
            Requirement::NotEquals(key, want) => self.value_of(key, object) != Some(want),
            Requirement::Exists(key) => self.value_of(key, object).is_some(),
            Requirement::Absent(key) => self.value_of(key, object).is_none(),
            Requirement::In(key, set) => self
                .value_of(key, object)
                .is_some_and(|v| set.iter().any(|s| s == v)),
            Requirement::NotIn(key, set) => self
                .value_of(key, object)
                .is_none_or(|v| set.iter().all(|s| s != v)),
        }
    }
}

fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn label_requirement(part: &str) -> Result<Requirement, ApiError> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::Absent(key.trim().into()));
    }
    for (operator, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = part.split_once(operator) {
            let values = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| ApiError::bad_request(format!("invalid label selector {part:?}")))?
                .split(',')
                .map(|v| v.trim().to_owned())
                .collect();
            let key = key.trim().to_owned();
            return Ok(if negated {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(
            key.trim().into(),
            value.trim().into(),
        ));
    }
    if let Some((key, value)) = part.split_once('=') {
        let value = value.trim_start_matches('=').trim();
        return Ok(Requirement::Equals(key.trim().into(), value.into()));
    }
    Ok(Requirement::Exists(part.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selectors_follow_the_api_grammar() {
        let web = object(json!({"app": "web", "tier": "front"}));
        let db = object(json!({"app": "db"}));
        let cases = [
            ("app=web", true, false),
            ("app==web,tier", true, false),
            ("app!=web", false, true),
            ("!tier", false, true),
            ("app in (web, db)", true, true),
            ("app notin (web),tier notin (x)", false, true),
            ("", true, true),
        ];
        for (text, on_web, on_db) in cases {
            let selector = Selector::labels(text).expect(text);
            assert_eq!(selector.matches(&web), on_web, "{text} on web");
            assert_eq!(selector.matches(&db), on_db, "{text} on db");
        }
    }

    #[test]
    fn field_selectors_know_name_and_namespace_only() {
        let selector = Selector::fields("metadata.namespace=ns,metadata.name!=b").unwrap();
        assert!(selector.matches(&object(json!({}))));
        assert!(Selector::fields("spec.x=1").is_err());
    }
}
