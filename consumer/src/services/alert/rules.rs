//! Alert rules: the YAML file's shape, its checks, and what one event matches.
//! Pure: no state, no I/O beyond reading the file; windows live in
//! the handler ([`super::Alert`]).

use std::collections::BTreeMap;
use std::path::Path;

use changewire_schemas::{ChangeEvent, Op, Origin};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::services::changed::{changed_at, PathPattern};

/// Why a rules file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file cannot be read.
    #[error("cannot read rules file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse into rules (the message names the field, line
    /// and column).
    #[error("rules file {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why, where.
        source: serde_norway::Error,
    },
    /// A rule parses but cannot work.
    #[error("rules file {path}: rule {rule:?}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The rule's name.
        rule: String,
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// How urgent an alert is; routes pick receivers by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Page someone.
    Critical,
    /// Tell the team.
    Warning,
    /// For the record.
    Info,
}

impl Severity {
    /// Its name, as in the rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Warning => "warning",
            Self::Info => "info",
        }
    }
}

/// A rules file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// The rules, evaluated in order; every matching rule fires.
    pub rules: Vec<Rule>,
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name; the alert's `alertname`.
    pub name: String,
    /// How urgent.
    pub severity: Severity,
    /// What an event must be to count.
    #[serde(default, rename = "match")]
    pub conditions: Conditions,
    /// Fire only when this many matching events come within a window.
    #[serde(default)]
    pub threshold: Option<Threshold>,
    /// Extra labels of the alert.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// One line; `{actor}`, `{resource}`, `{op}`, `{rule}`, `{source}` and
    /// `{count}` are filled in.
    #[serde(default)]
    pub summary: Option<String>,
    /// Where the on-call person reads what to do.
    #[serde(default)]
    pub runbook_url: Option<String>,
    /// What makes two alerts of this rule one (`rule`, `actor`, `resource`,
    /// `namespace`, `source`); default: the rule and the resource.
    #[serde(default = "default_group_by")]
    pub group_by: Vec<GroupBy>,
    /// After an alert of a group, the next one of that group waits this long.
    #[serde(default)]
    pub repeat_interval_s: u64,
}

fn default_group_by() -> Vec<GroupBy> {
    vec![GroupBy::Rule, GroupBy::Resource]
}

/// A part of the group key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// The rule's name.
    Rule,
    /// Who made the change.
    Actor,
    /// The changed object or row.
    Resource,
    /// Its namespace or schema.
    Namespace,
    /// The changewire source.
    Source,
}

/// The conditions of a rule; all given ones must hold (lists: any of).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// changewire source names.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Kubernetes kinds or table names.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Namespaces or schemas.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Object names (or a row's key), `*` matching any run of characters.
    #[serde(default)]
    pub names: Vec<String>,
    /// `create`, `update`, `delete`, `read`, `truncate`.
    #[serde(default)]
    pub ops: Vec<OpName>,
    /// Dotted paths (`spec.auth.*`), any of which changed.
    #[serde(default)]
    pub changed: Vec<String>,
    /// `changed`, split once when the file is read.
    #[serde(skip)]
    changed_at: Vec<PathPattern>,
    /// Value changes, all of which happened.
    #[serde(default)]
    pub transitions: Vec<Transition>,
    /// Who made the change.
    #[serde(default)]
    pub actor: Option<ActorCondition>,
    /// Only outside these hours.
    #[serde(default)]
    pub outside_hours: Option<Hours>,
}

/// An op as the rules file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpName {
    /// `c`.
    Create,
    /// `u`.
    Update,
    /// `d`.
    Delete,
    /// `r` (snapshot).
    Read,
    /// `t`.
    Truncate,
}

impl OpName {
    fn is(self, op: Op) -> bool {
        matches!(
            (self, op),
            (Self::Create, Op::Create)
                | (Self::Update, Op::Update)
                | (Self::Delete, Op::Delete)
                | (Self::Read, Op::Read)
                | (Self::Truncate, Op::Truncate)
        )
    }
}

/// A value at `path` that changed in a given way between `before` and `after`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    /// Dotted path into the object or row.
    pub path: String,
    /// The value before (absent: any).
    #[serde(default)]
    pub from: Option<Value>,
    /// The value after (absent: any).
    #[serde(default)]
    pub to: Option<Value>,
    /// The number went down.
    #[serde(default)]
    pub decreased: bool,
    /// The number went up.
    #[serde(default)]
    pub increased: bool,
}

/// Conditions on the actor.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorCondition {
    /// One of these users.
    #[serde(default, rename = "in")]
    pub any_of: Vec<String>,
    /// None of these users (an unknown actor is none of them).
    #[serde(default)]
    pub not_in: Vec<String>,
    /// In one of these groups.
    #[serde(default)]
    pub groups_in: Vec<String>,
    /// In none of these groups.
    #[serde(default)]
    pub groups_not_in: Vec<String>,
}

/// Allowed hours: a change outside them matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    /// Start, `HH:MM`.
    pub from: String,
    /// End, `HH:MM` (exclusive).
    pub to: String,
    /// Allowed days (`mon` ... `sun`); default Monday to Friday.
    #[serde(default = "weekdays")]
    pub days: Vec<String>,
    /// IANA time zone (`Europe/Berlin`); default UTC.
    #[serde(default = "utc")]
    pub timezone: String,
}

fn weekdays() -> Vec<String> {
    ["mon", "tue", "wed", "thu", "fri"]
        .map(String::from)
        .to_vec()
}

fn utc() -> String {
    "UTC".to_owned()
}

/// N matching events within a window, counted per actor or per resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// How many.
    pub count: u32,
    /// Within how many seconds.
    pub within_s: u64,
    /// Counted per `actor` or per `resource`.
    pub per: Per,
}

/// What a window counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One window per actor.
    Actor,
    /// One window per resource.
    Resource,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl RulesFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and checks `text`; `path` names it in messages.
    pub fn parse(text: &str, path: &str) -> Result<Self, RulesError> {
        let mut file: Self = serde_norway::from_str(text).map_err(|source| RulesError::Parse {
            path: path.to_owned(),
            source,
        })?;
        for rule in &mut file.rules {
            let conditions = &mut rule.conditions;
            conditions.changed_at = conditions
                .changed
                .iter()
                .map(|p| PathPattern::parse(p))
                .collect();
        }
        let mut names = std::collections::HashSet::new();
        for rule in &file.rules {
            let invalid = |field, reason: String| RulesError::Invalid {
                path: path.to_owned(),
                rule: rule.name.clone(),
                field,
                reason,
            };
            if rule.name.is_empty() || !names.insert(rule.name.as_str()) {
                return Err(invalid("name", "must be set and unique".into()));
            }
            if let Some(threshold) = &rule.threshold {
                if threshold.count < 2 || threshold.within_s == 0 {
                    return Err(invalid(
                        "threshold",
                        "count must be at least 2 and within_s at least 1".into(),
                    ));
                }
            }
            if let Some(hours) = &rule.conditions.outside_hours {
                hours
                    .check()
                    .map_err(|reason| invalid("match.outside_hours", reason))?;
            }
            for transition in &rule.conditions.transitions {
                let given = [
                    transition.from.is_some() || transition.to.is_some(),
                    transition.decreased,
                    transition.increased,
                ];
                if given.iter().filter(|g| **g).count() != 1 {
                    return Err(invalid(
                        "match.transitions",
                        format!("{}: give from/to, decreased or increased", transition.path),
                    ));
                }
            }
        }
        Ok(file)
    }
}

impl Hours {
    fn minutes(text: &str) -> Option<u32> {
        let (h, m) = text.split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    }

    fn check(&self) -> Result<(), String> {
        for time in [&self.from, &self.to] {
            Self::minutes(time).ok_or_else(|| format!("{time:?} is not HH:MM"))?;
        }
        if let Some(day) = self.days.iter().find(|d| !DAYS.contains(&d.as_str())) {
            return Err(format!("unknown day {day:?}: one of {DAYS:?}"));
        }
        jiff::tz::TimeZone::get(&self.timezone)
            .map(|_| ())
            .map_err(|e| format!("time zone {:?}: {e}", self.timezone))
    }

    /// Whether `ms` (since the epoch) is outside the allowed hours.
    fn outside(&self, ms: i64) -> bool {
        let Ok(zone) = jiff::tz::TimeZone::get(&self.timezone) else {
            return false;
        };
        let Ok(at) = jiff::Timestamp::from_millisecond(ms) else {
            return false;
        };
        let local = zone.to_datetime(at);
        let day = DAYS[local.weekday().to_monday_zero_offset() as usize];
        let minute = local.hour() as u32 * 60 + local.minute() as u32;
        let (from, to) = (Self::minutes(&self.from), Self::minutes(&self.to));
        let within = from
            .zip(to)
            .is_some_and(|(from, to)| from <= minute && minute < to);
        !(self.days.iter().any(|d| d == day) && within)
    }
}

/// What a change was to: its source, kind or table, namespace or schema, name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject<'a> {
    /// The changewire source.
    pub source: &'a str,
    /// Kind or table.
    pub kind: &'a str,
    /// Namespace or schema ("" for cluster-scoped objects).
    pub namespace: &'a str,
    /// Object name, or the row's key as JSON.
    pub name: String,
}

impl<'a> Subject<'a> {
    /// The subject of `event`.
    pub fn of(event: &'a ChangeEvent) -> Self {
        match &event.source.origin {
            Origin::Kubernetes(k8s) => Self {
                source: &event.source.name,
                kind: &k8s.kind,
                namespace: k8s.namespace.as_deref().unwrap_or(""),
                name: k8s.name.clone(),
            },
            Origin::Postgresql(pg) => Self {
                source: &event.source.name,
                kind: &pg.table,
                namespace: &pg.schema,
                name: row_name(event),
            },
        }
    }

    /// `Kind namespace/name`, or `schema.table row`.
    pub fn resource(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A row's name: its `id` column, else the whole row, as JSON.
fn row_name(event: &ChangeEvent) -> String {
    let row = event.after.as_ref().or(event.before.as_ref());
    match row.and_then(|r| r.get("id")) {
        Some(id) => id.to_string(),
        None => row.map(Value::to_string).unwrap_or_default(),
    }
}

/// Why a rule matched: the lines an alert shows.
pub type Reasons = Vec<String>;

impl Rule {
    /// Whether `event`, about `subject` (its [`Subject::of`], made once for all
    /// rules), matches; why, if it does.
    pub fn matches(&self, event: &ChangeEvent, subject: &Subject<'_>) -> Option<Reasons> {
        if !self.concerns(event, subject) {
            return None;
        }
        let c = &self.conditions;
        let mut reasons = Vec::new();
        if !c.changed.is_empty() {
            // Split when the file was read; a rule made otherwise splits here.
            let split = |i: usize, text: &str| match c.changed_at.get(i) {
                Some(pattern) => changed_at(event, pattern),
                None => changed_at(event, &PathPattern::parse(text)),
            };
            let hit: Vec<&String> = (c.changed.iter().enumerate())
                .filter(|(i, text)| split(*i, text))
                .map(|(_, text)| text)
                .collect();
            if hit.is_empty() {
                return None;
            }
            reasons.extend(hit.iter().map(|p| format!("changed {p}")));
        }
        for transition in &c.transitions {
            reasons.push(transition.happened(event)?);
        }
        if let Some(actor) = &c.actor {
            reasons.push(actor.holds(event)?);
        }
        if let Some(hours) = &c.outside_hours {
            if !hours.outside(event.source.ts_ms) {
                return None;
            }
            reasons.push(format!(
                "outside {}-{} {}",
                hours.from, hours.to, hours.timezone
            ));
        }
        Some(reasons)
    }
}

impl Rule {
    /// Whether `event` is about what the rule watches: its source, kind,
    /// namespace, name and op.
    pub fn concerns(&self, event: &ChangeEvent, subject: &Subject<'_>) -> bool {
        let c = &self.conditions;
        let listed =
            |list: &[String], value: &str| list.is_empty() || list.iter().any(|v| v == value);
        listed(&c.sources, subject.source)
            && listed(&c.kinds, subject.kind)
            && listed(&c.namespaces, subject.namespace)
            && (c.names.is_empty() || c.names.iter().any(|p| glob(p, &subject.name)))
            && (c.ops.is_empty() || c.ops.iter().any(|o| o.is(event.op)))
    }

    /// What `event` lacks that a condition needs, if anything: such an event
    /// does not match and is counted, not taken for a near miss.
    pub fn unevaluable(&self, event: &ChangeEvent) -> Option<&'static str> {
        let c = &self.conditions;
        let object = |v: &Option<Value>| v.as_ref().is_some_and(Value::is_object);
        let rows = object(&event.before) && object(&event.after);
        if !c.transitions.is_empty() && !rows {
            return Some("transitions need a before and an after");
        }
        if !c.changed.is_empty()
            && event.diff.is_none()
            && event.before.is_none()
            && event.after.is_none()
        {
            return Some("changed needs a diff or a row");
        }
        let named = c
            .actor
            .as_ref()
            .is_some_and(|a| !a.any_of.is_empty() || !a.groups_in.is_empty());
        if named && event.actor.is_none() {
            return Some("actor conditions need an actor");
        }
        None
    }
}

impl ActorCondition {
    fn holds(&self, event: &ChangeEvent) -> Option<String> {
        let name = event.actor.as_ref().map(|a| a.name.as_str());
        let groups: &[String] = event.actor.as_ref().map_or(&[], |a| &a.groups);
        let in_group = |list: &[String]| groups.iter().any(|g| list.contains(g));
        let ok = (self.any_of.is_empty()
            || name.is_some_and(|n| self.any_of.iter().any(|a| a == n)))
            && name.is_none_or(|n| !self.not_in.iter().any(|a| a == n))
            && (self.groups_in.is_empty() || in_group(&self.groups_in))
            && !in_group(&self.groups_not_in);
        ok.then(|| format!("by {}", name.unwrap_or("an unknown actor")))
    }
}

impl Transition {
    /// The change at `path`, if it is the one asked for.
    fn happened(&self, event: &ChangeEvent) -> Option<String> {
        let at = |object: &Option<Value>| {
            let value = object.as_ref()?;
            self.path
                .split('.')
                .try_fold(value, |v, segment| v.get(segment))
                .cloned()
        };
        let (before, after) = (at(&event.before), at(&event.after));
        if before == after {
            return None;
        }
        let number = |v: &Option<Value>| v.as_ref().and_then(number_of);
        let holds = if self.decreased || self.increased {
            let (b, a) = (number(&before)?, number(&after)?);
            (self.decreased && a < b) || (self.increased && a > b)
        } else {
            (self.from.is_none() || self.from == before) && (self.to.is_none() || self.to == after)
        };
        let shown = |v: &Option<Value>| v.as_ref().map_or("(absent)".to_owned(), Value::to_string);
        holds.then(|| format!("{}: {} -> {}", self.path, shown(&before), shown(&after)))
    }
}

/// A JSON number, or a string holding one (numeric columns arrive as text).
fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use changewire_schemas::fixtures;
    use serde_json::json;

    use super::*;

    fn rule(yaml: &str) -> Rule {
        let file = RulesFile::parse(
            &format!("rules:\n- name: r\n  severity: warning\n{yaml}"),
            "test.yaml",
        )
        .expect("a valid rule");
        file.rules.into_iter().next().expect("one rule")
    }

    /// A RateLimit update by bob (group ops) whose `spec.auth.required` went
    /// from true to false and `spec.rps` from 100 to 50.
    fn weakened() -> ChangeEvent {
        let mut event = fixtures::kubernetes_create("prod");
        event.op = Op::Update;
        event.before = Some(json!({"spec": {"auth": {"required": true}, "rps": 100}}));
        event.after = Some(json!({"spec": {"auth": {"required": false}, "rps": 50}}));
        event.diff = Some(json!([
            {"op": "replace", "path": "/spec/auth/required", "value": false},
            {"op": "replace", "path": "/spec/rps", "value": 50}
        ]));
        event
    }

    #[test]
    fn subject_conditions_fire_and_near_misses_do_not() {
        let event = weakened();
        for (yaml, fires) in [
            ("  match: {sources: [prod]}", true),
            ("  match: {sources: [staging]}", false),
            ("  match: {kinds: [RateLimit], namespaces: [edge]}", true),
            (
                "  match: {kinds: [RateLimit], namespaces: [default]}",
                false,
            ),
            ("  match: {names: [\"per-*\"]}", true),
            ("  match: {names: [\"*-host\"]}", false),
            ("  match: {ops: [update, delete]}", true),
            ("  match: {ops: [create]}", false),
        ] {
            assert_eq!(
                rule(yaml).matches(&event, &Subject::of(&event)).is_some(),
                fires,
                "{yaml}"
            );
        }
    }

    #[test]
    fn changed_paths_and_transitions_say_what_matched() {
        let event = weakened();
        let reasons = rule("  match: {changed: [\"spec.auth.*\", \"metadata.labels.*\"]}")
            .matches(&event, &Subject::of(&event))
            .expect("spec.auth changed");
        assert_eq!(reasons, ["changed spec.auth.*"]);
        assert!(rule("  match: {changed: [\"spec.tls.*\"]}")
            .matches(&event, &Subject::of(&event))
            .is_none());
        let transition =
            "  match:\n    transitions: [{path: spec.auth.required, from: true, to: false}]";
        assert_eq!(
            rule(transition)
                .matches(&event, &Subject::of(&event))
                .expect("true -> false"),
            ["spec.auth.required: true -> false"]
        );
        let back = "  match:\n    transitions: [{path: spec.auth.required, from: false, to: true}]";
        assert!(
            rule(back).matches(&event, &Subject::of(&event)).is_none(),
            "the other direction"
        );
        let down = "  match:\n    transitions: [{path: spec.rps, decreased: true}]";
        assert_eq!(
            rule(down)
                .matches(&event, &Subject::of(&event))
                .expect("100 -> 50"),
            ["spec.rps: 100 -> 50"]
        );
        let up = "  match:\n    transitions: [{path: spec.rps, increased: true}]";
        assert!(
            rule(up).matches(&event, &Subject::of(&event)).is_none(),
            "it went down"
        );
    }

    #[test]
    fn actor_conditions_use_names_and_groups() {
        let event = weakened();
        for (yaml, fires) in [
            ("  match: {actor: {in: [bob]}}", true),
            ("  match: {actor: {in: [alice]}}", false),
            ("  match: {actor: {not_in: [ci-bot]}}", true),
            ("  match: {actor: {not_in: [bob]}}", false),
            ("  match: {actor: {groups_in: [ops]}}", true),
            ("  match: {actor: {groups_not_in: [ops]}}", false),
        ] {
            assert_eq!(
                rule(yaml).matches(&event, &Subject::of(&event)).is_some(),
                fires,
                "{yaml}"
            );
        }
        let mut unknown = weakened();
        unknown.actor = None;
        assert!(rule("  match: {actor: {not_in: [bob]}}")
            .matches(&unknown, &Subject::of(&unknown))
            .is_some());
        assert!(rule("  match: {actor: {in: [bob]}}")
            .matches(&unknown, &Subject::of(&unknown))
            .is_none());
    }

    #[test]
    fn hours_are_local_to_the_time_zone() {
        // 2025-11-22T00:00Z: a Saturday; 01:00 on Saturday in Berlin.
        let event = weakened();
        let weekday_hours = "  match:\n    outside_hours: {from: \"08:00\", to: \"18:00\", timezone: Europe/Berlin}";
        assert!(
            rule(weekday_hours)
                .matches(&event, &Subject::of(&event))
                .is_some(),
            "a Saturday night"
        );
        let every_day = "  match:\n    outside_hours: {from: \"00:30\", to: \"02:00\", days: [sat], timezone: Europe/Berlin}";
        assert!(
            rule(every_day)
                .matches(&event, &Subject::of(&event))
                .is_none(),
            "01:00 in Berlin is inside"
        );
        let utc = "  match:\n    outside_hours: {from: \"00:30\", to: \"02:00\", days: [sat]}";
        assert!(
            rule(utc).matches(&event, &Subject::of(&event)).is_some(),
            "00:00 UTC is outside"
        );
    }

    #[test]
    fn rows_match_by_table_schema_and_changed_columns() {
        let row = fixtures::postgres_update("shop");
        let Origin::Postgresql(pg) = &row.source.origin else {
            panic!("a row");
        };
        let (table, schema) = (pg.table.clone(), pg.schema.clone());
        let yaml = format!("  match: {{kinds: [{table}], namespaces: [{schema}], changed: [status], names: [\"7\"]}}");
        assert!(rule(&yaml).matches(&row, &Subject::of(&row)).is_some());
        assert!(rule("  match: {changed: [total]}")
            .matches(&row, &Subject::of(&row))
            .is_none());
    }

    #[test]
    fn events_lacking_what_a_condition_needs_are_unevaluable() {
        let transition = rule("  match:\n    transitions: [{path: spec.rps, decreased: true}]");
        let mut created = weakened();
        created.before = None;
        assert_eq!(
            transition.unevaluable(&created),
            Some("transitions need a before and an after")
        );
        assert_eq!(transition.unevaluable(&weakened()), None);
        let actor = rule("  match: {actor: {in: [bob]}}");
        let mut anonymous = weakened();
        anonymous.actor = None;
        assert!(actor.unevaluable(&anonymous).is_some());
        assert_eq!(
            rule("  match: {actor: {not_in: [bob]}}").unevaluable(&anonymous),
            None
        );
        let kinds = rule("  match: {kinds: [Secret]}");
        assert!(!kinds.concerns(&weakened(), &Subject::of(&weakened())));
    }

    #[test]
    fn odd_events_do_not_match_and_do_not_panic() {
        let mut event = weakened();
        event.before = None;
        event.after = Some(json!("not an object"));
        event.diff = Some(json!({"not": "a patch"}));
        let transition = "  match:\n    transitions: [{path: spec.rps, decreased: true}]";
        assert!(rule(transition)
            .matches(&event, &Subject::of(&event))
            .is_none());
        assert!(rule("  match: {changed: [\"spec.*\"]}")
            .matches(&event, &Subject::of(&event))
            .is_none());
    }

    #[test]
    fn bad_rules_name_the_rule_field_and_line() {
        let error = RulesFile::parse("rules:\n- name: a\n  severity: urgent\n", "r.yaml")
            .expect_err("severity");
        let text = changewire_schemas::diagnostics::report(&error);
        assert!(
            text.contains("severity") && text.contains("line 3"),
            "{text}"
        );
        let error = RulesFile::parse(
            "rules:\n- name: a\n  severity: info\n  match: {kinds: [A], colour: red}\n",
            "r.yaml",
        )
        .expect_err("unknown field");
        let text = changewire_schemas::diagnostics::report(&error);
        assert!(text.contains("colour"), "{text}");
        let error = RulesFile::parse(
            "rules:\n- name: a\n  severity: info\n  threshold: {count: 1, within_s: 60, per: actor}\n",
            "r.yaml",
        )
        .expect_err("count 1");
        assert!(
            error.to_string().contains("rule \"a\": threshold"),
            "{error}"
        );
        let error = RulesFile::parse(
            "rules:\n- name: a\n  severity: info\n  match:\n    outside_hours: {from: \"8\", to: \"18:00\"}\n",
            "r.yaml",
        )
        .expect_err("hour format");
        assert!(error.to_string().contains("match.outside_hours"), "{error}");
        let error = RulesFile::parse(
            "rules:\n- name: a\n  severity: info\n- name: a\n  severity: info\n",
            "r.yaml",
        )
        .expect_err("duplicate names");
        assert!(error.to_string().contains("unique"), "{error}");
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("prod-*", "prod-api"));
        assert!(glob("*-api", "prod-api"));
        assert!(glob("p*d*i", "prod-api"));
        assert!(!glob("prod-*", "staging-api"));
        assert!(!glob("a*a", "a"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
    }
}
