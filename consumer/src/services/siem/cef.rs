//! ArcSight Common Event Format (CEF 0) messages of change events, for syslog.
//!
//! `CEF:0|changewire|changewire|<version>|<provider>:<op>|<what happened>|<severity>|<extension>`
//! (docs/siem.md has the table):
//! - the signature id names the source type and operation (`kubernetes:update`);
//!   the name says who did what to which object; severity 6 for identity and
//!   access changes (RBAC, service accounts, Secrets), 5 for deletes, else 3;
//! - the extension has `rt` (the change's time, ms since the epoch), `cat`
//!   (`configuration`, `iam` or `database`, as in ECS), `act` (`created`, ...),
//!   `outcome`, the actor as `suser`, `spriv` (its groups), `src` (its first IPv4
//!   address) or `c6a2` (IPv6), `requestClientApplication` (its user agent), and
//!   custom strings: `cs1` the event id, `cs2` the changewire source, `cs3` the
//!   resource, `cs4` the cluster or database, `cs5` the API version or schema, and
//!   last, as it is the longest, `cs6` the diff as JSON (or the row or object
//!   itself when there is no diff), so a message cut to the receiver's size limit
//!   loses the end of the diff first.
//!
//! Escaping follows the CEF specification: `\` and `|` in header fields, `\`, `=`,
//! and line breaks (`\n`, `\r`) in extension values; line breaks in header fields
//! become spaces.

use std::fmt::Write as _;
use std::net::IpAddr;

use changewire_schemas::{ChangeEvent, Op, Origin};

use super::ecs::category;
use super::{entity_name, past_tense, provider, who};

/// The product version in the header.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The CEF message of `event`.
pub fn message(event: &ChangeEvent) -> String {
    let mut message = String::from("CEF:0|changewire|changewire|");
    for field in [
        VERSION,
        &format!("{}:{}", provider(event), verb(event.op)),
        &format!(
            "{} {} {}",
            who(event),
            past_tense(event.op),
            entity_name(event)
        ),
        &severity(event).to_string(),
    ] {
        push_header(&mut message, field);
        message.push('|');
    }
    let mut extension = Extension(message);
    extension.push("rt", &event.source.ts_ms.to_string());
    extension.push("cat", category(event));
    extension.push("act", past_tense(event.op));
    extension.push("outcome", "success");
    if let Some(actor) = &event.actor {
        extension.push("suser", &actor.name);
        if !actor.groups.is_empty() {
            extension.push("spriv", &actor.groups.join(","));
        }
        match actor.source_ips.first().and_then(|ip| ip.parse().ok()) {
            Some(IpAddr::V4(ip)) => extension.push("src", &ip.to_string()),
            Some(IpAddr::V6(ip)) => extension.custom("c6a2", "sourceAddress", &ip.to_string()),
            None => {}
        }
        if let Some(agent) = &actor.user_agent {
            extension.push("requestClientApplication", agent);
        }
    }
    extension.custom("cs1", "eventId", event.id.as_str());
    extension.custom("cs2", "source", &event.source.name);
    extension.custom("cs3", "resource", &entity_name(event));
    match &event.source.origin {
        Origin::Kubernetes(k8s) => {
            extension.custom("cs4", "cluster", &k8s.cluster);
            let api_version = if k8s.group.is_empty() {
                k8s.version.clone()
            } else {
                format!("{}/{}", k8s.group, k8s.version)
            };
            extension.custom("cs5", "apiVersion", &api_version);
        }
        Origin::Postgresql(pg) => {
            extension.custom("cs4", "database", &pg.db);
            extension.custom("cs5", "schema", &pg.schema);
        }
    }
    let (label, content) = match (&event.diff, &event.after, &event.before) {
        (Some(diff), _, _) => ("diff", serde_json::to_string(diff)),
        (None, Some(after), _) => ("after", serde_json::to_string(after)),
        (None, None, Some(before)) => ("before", serde_json::to_string(before)),
        (None, None, None) => ("diff", Ok("[]".to_owned())),
    };
    extension.custom("cs6", label, &content.unwrap_or_default());
    extension.0
}

/// 6 for identity and access changes, 5 for deletes, else 3 (CEF: 0-10).
fn severity(event: &ChangeEvent) -> u8 {
    match (category(event), event.op) {
        ("iam", _) => 6,
        (_, Op::Delete | Op::Truncate) => 5,
        _ => 3,
    }
}

fn verb(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Read => "read",
        Op::Update => "update",
        Op::Delete => "delete",
        Op::Truncate => "truncate",
    }
}

/// Appends a header field, escaped.
fn push_header(out: &mut String, field: &str) {
    for c in field.chars() {
        match c {
            '\\' | '|' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
}

/// The extension being written: ` key=value` pairs after the header.
struct Extension(String);

impl Extension {
    fn push(&mut self, key: &str, value: &str) {
        if !self.0.ends_with('|') {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{key}=");
        for c in value.chars() {
            match c {
                '\\' | '=' => {
                    self.0.push('\\');
                    self.0.push(c);
                }
                '\n' => self.0.push_str("\\n"),
                '\r' => self.0.push_str("\\r"),
                c => self.0.push(c),
            }
        }
    }

    /// A custom field and its label, the label first.
    fn custom(&mut self, key: &str, label: &str, value: &str) {
        self.push(&format!("{key}Label"), label);
        self.push(key, value);
    }
}

#[cfg(test)]
mod tests {
    use changewire_schemas::fixtures;
    use serde_json::json;

    use super::*;

    #[test]
    fn header_and_extension_are_escaped() {
        let mut event = fixtures::kubernetes_create("prod");
        if let Some(actor) = &mut event.actor {
            actor.name = "a|b\\c".into();
            actor.user_agent = Some("k=v\nnext\\".into());
        }
        let message = message(&event);
        assert!(
            message.starts_with("CEF:0|changewire|changewire|"),
            "{message}"
        );
        assert!(
            message.contains("|a\\|b\\\\c created RateLimit edge/per-ip|3|"),
            "{message}"
        );
        assert!(
            message.contains(" requestClientApplication=k\\=v\\nnext\\\\ "),
            "{message}"
        );
        assert!(message.contains(" suser=a|b\\\\c "), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn fields_follow_the_mapping_and_the_diff_comes_last() {
        let event = fixtures::kubernetes_create("prod");
        let message = message(&event);
        assert!(message.contains("|kubernetes:create|"), "{message}");
        for field in [
            "rt=",
            " cat=configuration ",
            " act=created ",
            " outcome=success ",
            " suser=bob ",
            " spriv=ops ",
            " src=192.0.2.4 ",
            " requestClientApplication=kubectl ",
            " cs3Label=resource cs3=RateLimit edge/per-ip ",
            " cs5Label=apiVersion cs5=policy.example.com/v1 ",
        ] {
            assert!(message.contains(field), "{field} in {message}");
        }
        assert!(message.contains(&format!(
            " cs1Label=eventId cs1={} ",
            event.id.as_str().replace('=', "\\=")
        )));
        let diff = message.split(" cs6=").nth(1).expect("cs6 last");
        let diff: serde_json::Value = serde_json::from_str(diff).expect("the diff as JSON");
        assert_eq!(diff, json!(event.diff));
    }

    #[test]
    fn severity_rises_for_access_changes_and_deletes() {
        let mut secret = fixtures::kubernetes_delete("prod");
        if let Origin::Kubernetes(k8s) = &mut secret.source.origin {
            k8s.kind = "Secret".into();
        }
        assert_eq!(severity(&secret), 6);
        assert_eq!(severity(&fixtures::kubernetes_delete("prod")), 5);
        let row = message(&fixtures::postgres_update("shop"));
        assert!(row.contains("|postgresql:update|"), "{row}");
        assert!(row.contains(" cat=database "), "{row}");
        assert!(row.contains(" cs4Label=database "), "{row}");
    }
}
