//! The alert service: rules over change events ([`rules`]), alerts delivered by
//! the runtime's sinks to Prometheus Alertmanager and a signed webhook.
//!
//! For each event every matching rule fires, unless it has a threshold (N
//! matching events per actor or resource within a window: the window's times are
//! state, committed with the offsets, so a restart neither resets nor counts a
//! window twice) or its group fired less than `repeat_interval_s` ago. An alert
//! goes to the receivers its severity routes to; its effects' idempotency keys
//! are `<event id>/<receiver>/<n>`, so a restart re-sends none. `tick` resolves
//! threshold alerts whose window stopped holding (Alertmanager gets `endsAt`).

pub mod dry_run;
pub mod rules;
pub mod silences;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use changewire_schemas::diagnostics::report;

use changewire_schemas::settings::ConfigError;
use changewire_schemas::time::{epoch_ms, rfc3339};
use changewire_schemas::ChangeEvent;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::runtime::sinks::alertmanager::{AlertmanagerConfig, AlertmanagerSink};
use crate::runtime::sinks::slack::{SlackConfig, SlackSink};
use crate::runtime::sinks::webhook::{WebhookConfig, WebhookSink};
use crate::runtime::{ConsumerMetrics, Context, Effect, Handler, HandlerError, Record, Sinks};
use rules::{GroupBy, Per, Rule, RulesFile, Severity, Subject};
use silences::Silences;

/// The Alertmanager receiver's sink name.
pub const ALERTMANAGER: &str = "alertmanager";
/// The webhook receiver's sink name.
pub const WEBHOOK: &str = "webhook";
/// The Slack receiver's sink name.
pub const SLACK: &str = "slack";
/// The digest: a route to it collects alerts for a periodic summary.
pub const DIGEST: &str = "digest";

/// State key prefixes: windows' event times, firing threshold alerts, the last
/// alert per group.
const WINDOW: &str = "alert/window/";
const FIRING: &str = "alert/firing/";
const LAST: &str = "alert/last/";
/// Alerts waiting for the digest, and when the last digest went out.
const DIGESTED: &str = "alert/digest/entry/";
const DIGEST_SENT: &str = "alert/digest/sent";

/// Longest diff excerpt an alert carries, in bytes.
const EXCERPT: usize = 2000;

/// The `[alert]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The rules file (YAML).
    pub rules_file: PathBuf,
    /// Send alerts to Prometheus Alertmanager.
    #[serde(default)]
    pub alertmanager: Option<AlertmanagerConfig>,
    /// POST alerts, signed (Standard Webhooks).
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Post alerts to a Slack-compatible incoming webhook.
    #[serde(default)]
    pub slack: Option<SlackConfig>,
    /// Collect the alerts routed to `digest` and send a summary periodically.
    #[serde(default)]
    pub digest: Option<DigestConfig>,
    /// Where the silences API listens; not served when absent.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer tokens of the silences API: a list, or one comma-separated string.
    #[serde(default, deserialize_with = "changewire_schemas::settings::tokens")]
    pub api_tokens: Vec<String>,
    /// Receivers per severity (`critical = ["alertmanager"]`); default: every
    /// configured receiver gets every severity.
    #[serde(default)]
    pub routes: BTreeMap<Severity, Vec<String>>,
    /// An alert without a window resolves in Alertmanager after this long.
    #[serde(default = "default_resolve_after_s")]
    pub resolve_after_s: u64,
    /// A link to the event, `{id}` replaced by its id (the audit API's
    /// `/v1/events/{id}`, say): Alertmanager's `generatorURL`.
    #[serde(default)]
    pub event_url: Option<String>,
}

fn default_resolve_after_s() -> u64 {
    3600
}

/// The `[alert.digest]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestConfig {
    /// The receiver the summary goes to (`slack`, `webhook`).
    pub to: String,
    /// Seconds between summaries.
    #[serde(default = "default_digest_interval_s")]
    pub interval_s: u64,
    /// Most alerts listed in one summary (the rest are counted).
    #[serde(default = "default_digest_lines")]
    pub max_lines: usize,
}

fn default_digest_interval_s() -> u64 {
    86_400
}

fn default_digest_lines() -> usize {
    100
}

impl AlertConfig {
    /// Checks the receivers and routes, and loads the rules.
    pub fn validate(&self) -> Result<RulesFile, ConfigError> {
        let receivers = self.receivers();
        if receivers.is_empty() {
            return Err(ConfigError::invalid(
                "alert",
                "configure a receiver: [alert.alertmanager], [alert.webhook] or [alert.slack]",
            ));
        }
        if self.listen.is_some() && self.api_tokens.is_empty() {
            return Err(ConfigError::invalid(
                "alert.api_tokens",
                "the silences API (alert.listen) needs at least one bearer token",
            ));
        }
        if let Some(digest) = &self.digest {
            if !receivers.contains(&digest.to.as_str()) || digest.interval_s == 0 {
                return Err(ConfigError::invalid(
                    "alert.digest",
                    format!(
                        "to must name a configured receiver ({receivers:?}); interval_s at least 1"
                    ),
                ));
            }
        }
        let routable =
            |name: &str| receivers.contains(&name) || (name == DIGEST && self.digest.is_some());
        for (severity, names) in &self.routes {
            if let Some(name) = names.iter().find(|n| !routable(n)) {
                return Err(ConfigError::invalid(
                    "alert.routes",
                    format!(
                        "{}: {name:?} is not a configured receiver ({receivers:?}, or digest with [alert.digest])",
                        severity.as_str()
                    ),
                ));
            }
        }
        RulesFile::load(&self.rules_file)
            .map_err(|e| ConfigError::invalid("alert.rules_file", report(&e)))
    }

    fn receivers(&self) -> Vec<&'static str> {
        let mut receivers = Vec::new();
        if self.alertmanager.is_some() {
            receivers.push(ALERTMANAGER);
        }
        if self.webhook.is_some() {
            receivers.push(WEBHOOK);
        }
        if self.slack.is_some() {
            receivers.push(SLACK);
        }
        receivers
    }

    /// Whether a rule needs windows (and so ticks and one owner per partition).
    pub fn has_windows(rules: &RulesFile) -> bool {
        rules.rules.iter().any(|r| r.threshold.is_some())
    }
}

/// The rules in force, swapped whole by a reload.
type LiveRules = Arc<RwLock<Arc<RulesFile>>>;

/// How often the rules file's modification time is checked.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The alert handler.
pub struct Alert {
    rules: LiveRules,
    rules_file: PathBuf,
    routes: BTreeMap<Severity, Vec<String>>,
    resolve_after_s: u64,
    event_url: Option<String>,
    digest: Option<DigestConfig>,
    silences: Arc<Silences>,
    metrics: Arc<ConsumerMetrics>,
}

impl Alert {
    /// The handler with its rules and the silences kept in `state_dir`, and its
    /// sinks.
    pub fn new(
        config: &AlertConfig,
        state_dir: &std::path::Path,
    ) -> Result<(Self, Sinks), ConfigError> {
        let rules = config.validate()?;
        let silences_file = state_dir.join("alert-silences.json");
        let silences = std::fs::create_dir_all(state_dir)
            .and_then(|()| Silences::open(silences_file.clone()))
            .map_err(|e| {
                let shown = silences_file.display();
                ConfigError::invalid("service.state_dir", format!("cannot read {shown}: {e}"))
            })?;
        let mut sinks = Sinks::new();
        if let Some(alertmanager) = &config.alertmanager {
            sinks = sinks.with(
                ALERTMANAGER,
                AlertmanagerSink::new(alertmanager, "alert.alertmanager")?,
            );
        }
        if let Some(webhook) = &config.webhook {
            sinks = sinks.with(WEBHOOK, WebhookSink::new(webhook, "alert.webhook")?);
        }
        if let Some(slack) = &config.slack {
            sinks = sinks.with(SLACK, SlackSink::new(slack, "alert.slack")?);
        }
        let receivers: Vec<String> = config.receivers().into_iter().map(String::from).collect();
        let routes = [Severity::Critical, Severity::Warning, Severity::Info]
            .into_iter()
            .map(|s| {
                (
                    s,
                    config
                        .routes
                        .get(&s)
                        .cloned()
                        .unwrap_or_else(|| receivers.clone()),
                )
            })
            .collect();
        tracing::info!(rules = rules.rules.len(), file = %config.rules_file.display(), "alert rules loaded");
        let handler = Self {
            rules: Arc::new(RwLock::new(Arc::new(rules))),
            rules_file: config.rules_file.clone(),
            routes,
            resolve_after_s: config.resolve_after_s,
            event_url: config.event_url.clone(),
            digest: config.digest.clone(),
            silences: Arc::new(silences),
            metrics: Arc::default(),
        };
        Ok((handler, sinks))
    }

    /// Sends the digest of the alerts collected since the last one, once its
    /// interval has passed.
    fn send_digest(&self, now: i64, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let Some(digest) = &self.digest else {
            return Ok(());
        };
        let last = decode_times(context.get(DIGEST_SENT.as_bytes())?.as_deref());
        let Some(&sent) = last.first() else {
            context.put(DIGEST_SENT.as_bytes().to_vec(), encode_times(&[now]));
            return Ok(());
        };
        if now - sent < digest.interval_s as i64 * 1000 {
            return Ok(());
        }
        let entries = context.scan_committed(DIGESTED.as_bytes())?;
        context.put(DIGEST_SENT.as_bytes().to_vec(), encode_times(&[now]));
        if entries.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = (entries.iter())
            .map(|(_, line)| String::from_utf8_lossy(line).into_owned())
            .collect();
        for (key, _) in entries {
            context.remove(key);
        }
        let payload = if digest.to == SLACK {
            json!({ "text": digest_text(&lines, sent, digest.max_lines) })
        } else {
            json!({ "status": "digest", "since": rfc3339(sent), "until": rfc3339(now), "alerts": lines })
        };
        let effect = Effect::new(serde_json::to_vec(&payload).map_err(HandlerError::permanent)?);
        context.emit(&digest.to, effect)?;
        Ok(())
    }

    /// The rules in force now.
    fn rules(&self) -> Arc<RulesFile> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads the rules file on SIGHUP and when it changes (checked every
    /// [`RELOAD_CHECK`]); a file that does not load leaves the rules in force and
    /// says why. Runs until the process ends: spawn it.
    pub fn rules_watcher(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (path, rules) = (self.rules_file.clone(), self.rules.clone());
        async move {
            let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let mut seen = modified(&path);
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut check = tokio::time::interval(RELOAD_CHECK);
            loop {
                tokio::select! {
                    Some(()) = async { hangup.as_mut()?.recv().await } => {}
                    _ = check.tick() => {
                        let now = modified(&path);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                    }
                }
                match RulesFile::load(&path) {
                    Ok(loaded) => {
                        tracing::info!(rules = loaded.rules.len(), file = %path.display(), "alert rules reloaded");
                        *rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
                    }
                    Err(error) => {
                        tracing::error!(error = %report(&error), "alert rules not reloaded; the previous rules stay in force")
                    }
                }
            }
        }
    }

    fn count(&self, event: &str, rule: &str) {
        self.metrics.count_handler_event(event, rule);
    }

    /// The silences this handler honours (for the API).
    pub fn silences(&self) -> Arc<Silences> {
        self.silences.clone()
    }

    /// Sends `alert` of `rule` to the receivers of its severity, unless a
    /// silence matches it.
    fn send(
        &self,
        rule: &Rule,
        alert: &Fired,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        if let Some(silence) = self
            .silences
            .silencing(&alert.labels, epoch_ms(SystemTime::now()))
        {
            tracing::info!(rule = %rule.name, event = %alert.message["event_id"], silence, "alert silenced");
            self.count("silenced", &rule.name);
            return Ok(());
        }
        self.count("fired", &rule.name);
        if self.routes[&rule.severity].iter().any(|r| r == DIGEST) {
            let at = alert.message["at"].as_str().unwrap_or_default();
            let key = format!("{DIGESTED}{at}/{}", alert.group_key);
            context.put(key.into_bytes(), slack_line(&alert.message).into_bytes());
        }
        let key = Some(alert.group_key.as_str());
        self.emit_routed(rule.severity, key, context, |receiver| match receiver {
            ALERTMANAGER => Some(alert.alertmanager()),
            SLACK => Some(json!({ "text": slack_text(&alert.message) })),
            DIGEST => None,
            _ => Some(alert.message.clone()),
        })
    }

    /// Emits, to each receiver `severity` routes to, the payload `payload_for`
    /// makes for it (none: that receiver gets nothing).
    fn emit_routed(
        &self,
        severity: Severity,
        key: Option<&str>,
        context: &mut Context<'_>,
        payload_for: impl Fn(&str) -> Option<Value>,
    ) -> Result<(), HandlerError> {
        for receiver in &self.routes[&severity] {
            let Some(payload) = payload_for(receiver) else {
                continue;
            };
            let effect = Effect {
                key: key.map(|k| k.as_bytes().to_vec()),
                ..Effect::new(serde_json::to_vec(&payload).map_err(HandlerError::permanent)?)
            };
            context.emit(receiver, effect)?;
        }
        Ok(())
    }

    /// Counts `event` in `rule`'s window; whether the threshold is newly reached,
    /// and the count.
    fn count_in_window(
        rule: &Rule,
        event: &ChangeEvent,
        window_key: &str,
        context: &mut Context<'_>,
    ) -> Result<Option<usize>, HandlerError> {
        let threshold = rule.threshold.as_ref().expect("a windowed rule");
        let key = format!("{WINDOW}{window_key}");
        let times = decode_times(context.get(key.as_bytes())?.as_deref());
        let times = in_window(times, event.source.ts_ms, threshold.within_s);
        context.put(key.into_bytes(), encode_times(&times));
        let firing = format!("{FIRING}{window_key}");
        if times.len() < threshold.count as usize || context.get(firing.as_bytes())?.is_some() {
            return Ok(None);
        }
        Ok(Some(times.len()))
    }
}

/// An alert about to be sent: the webhook's message and what Alertmanager needs.
struct Fired {
    message: Value,
    labels: BTreeMap<String, String>,
    starts_at: String,
    ends_at: Option<String>,
    generator_url: Option<String>,
    group_key: String,
}

impl Fired {
    fn alertmanager(&self) -> Value {
        let message = &self.message;
        let mut annotations = json!({
            "summary": message["summary"],
            "description": message["reasons"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; ")),
            "actor": message["actor"]["name"],
            "resource": message["resource"],
            "event_id": message["event_id"],
            "diff": message["diff_excerpt"],
        });
        if let Some(runbook) = message["runbook_url"].as_str() {
            annotations["runbook_url"] = json!(runbook);
        }
        let annotations: serde_json::Map<String, Value> =
            (annotations.as_object().into_iter().flatten())
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k.clone(), json!(s))),
                    Value::Null => None,
                    other => Some((k.clone(), json!(other.to_string()))),
                })
                .collect();
        let mut alert = json!({
            "labels": self.labels,
            "annotations": annotations,
            "startsAt": self.starts_at,
        });
        if let Some(ends_at) = &self.ends_at {
            alert["endsAt"] = json!(ends_at);
        }
        if let Some(url) = &self.generator_url {
            alert["generatorURL"] = json!(url);
        }
        alert
    }
}

/// Escapes `&`, `<` and `>` as Slack's message formatting asks.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line naming an alert: severity, rule, summary.
fn slack_line(message: &Value) -> String {
    let field = |name: &str| message[name].as_str().unwrap_or_default();
    slack_escape(&format!(
        "[{}] {}: {}",
        field("severity"),
        field("rule"),
        field("summary")
    ))
}

/// A Slack message of an alert: its line, why it matched, the event.
fn slack_text(message: &Value) -> String {
    let mut text = format!("*{}*", slack_line(message));
    for reason in (message["reasons"].as_array().into_iter().flatten()).filter_map(Value::as_str) {
        text += &format!("\n• {}", slack_escape(reason));
    }
    text += &format!(
        "\nevent `{}` at {}",
        slack_escape(message["event_id"].as_str().unwrap_or_default()),
        message["at"].as_str().unwrap_or_default()
    );
    if let Some(runbook) = message["runbook_url"].as_str() {
        text += &format!("\nrunbook: {runbook}");
    }
    text
}

/// A digest's Slack text: how many, since when, at most `max_lines` of them.
fn digest_text(lines: &[String], since: i64, max_lines: usize) -> String {
    let mut text = format!(
        "*changewire digest: {} alerts since {}*",
        lines.len(),
        rfc3339(since)
    );
    for line in lines.iter().take(max_lines) {
        text += &format!("\n• {line}");
    }
    if lines.len() > max_lines {
        text += &format!("\n… and {} more", lines.len() - max_lines);
    }
    text
}

/// A window's times once an event at `at` joined it: those within `within_s`
/// before it, and it.
fn in_window(mut times: Vec<i64>, at: i64, within_s: u64) -> Vec<i64> {
    let since = at - within_s as i64 * 1000;
    times.retain(|t| *t > since);
    times.push(at);
    times
}

fn encode_times(times: &[i64]) -> Vec<u8> {
    times.iter().flat_map(|t| t.to_be_bytes()).collect()
}

fn decode_times(bytes: Option<&[u8]>) -> Vec<i64> {
    (bytes.unwrap_or_default().chunks_exact(8))
        .map(|c| i64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// `summary` with `{actor}`, `{resource}`, ... filled in.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (name, value)| {
            text.replace(&format!("{{{name}}}"), value)
        })
}

/// The start of `event`'s diff (or row change), at most [`EXCERPT`] bytes.
fn excerpt(event: &ChangeEvent) -> String {
    let shown = match (&event.diff, &event.before, &event.after) {
        (Some(diff), _, _) => diff.to_string(),
        (None, Some(before), Some(after)) => json!({"before": before, "after": after}).to_string(),
        (None, before, after) => after
            .as_ref()
            .or(before.as_ref())
            .map(Value::to_string)
            .unwrap_or_default(),
    };
    if shown.len() <= EXCERPT {
        return shown;
    }
    let mut cut = EXCERPT;
    while !shown.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &shown[..cut])
}

impl Alert {
    /// The alert `rule` raises for `event`.
    fn fired(
        &self,
        rule: &Rule,
        event: &ChangeEvent,
        reasons: Vec<String>,
        count: Option<usize>,
        now: i64,
    ) -> Fired {
        let subject = Subject::of(event);
        let resource = subject.resource();
        let actor = event.actor.as_ref().map_or("someone", |a| a.name.as_str());
        let op = event.op.code();
        let count_text = count.map(|c| c.to_string()).unwrap_or_default();
        let summary = rule.summary.as_deref().map_or_else(
            || format!("{}: {actor} changed {resource}", rule.name),
            |t| {
                fill(
                    t,
                    &[
                        ("actor", actor),
                        ("resource", &resource),
                        ("op", op),
                        ("rule", &rule.name),
                        ("source", subject.source),
                        ("count", &count_text),
                    ],
                )
            },
        );
        let group_key = group_key(rule, event, &subject);
        let mut labels: BTreeMap<String, String> = rule.labels.clone();
        labels.insert("alertname".into(), rule.name.clone());
        labels.insert("severity".into(), rule.severity.as_str().into());
        for part in &rule.group_by {
            let (name, value) = match part {
                GroupBy::Rule => continue,
                GroupBy::Actor => ("actor", actor.to_owned()),
                GroupBy::Resource => ("resource", resource.clone()),
                GroupBy::Namespace => ("namespace", subject.namespace.to_owned()),
                GroupBy::Source => ("source", subject.source.to_owned()),
            };
            labels.insert(name.into(), value);
        }
        let message = json!({
            "status": "firing",
            "rule": rule.name,
            "severity": rule.severity.as_str(),
            "summary": summary,
            "runbook_url": rule.runbook_url,
            "labels": labels,
            "group_key": group_key,
            "event_id": event.id.as_str(),
            "at": rfc3339(event.source.ts_ms),
            "op": op,
            "source": subject.source,
            "resource": resource,
            "actor": event.actor,
            "reasons": reasons,
            "count": count,
            "diff_excerpt": excerpt(event),
        });
        Fired {
            message,
            labels,
            starts_at: rfc3339(event.source.ts_ms),
            ends_at: Some(rfc3339(now + self.resolve_after_s as i64 * 1000)),
            generator_url: self
                .event_url
                .as_ref()
                .map(|u| u.replace("{id}", event.id.as_str())),
            group_key,
        }
    }
}

/// The group key of `rule`'s alert for `event`: its `group_by` parts.
fn group_key(rule: &Rule, event: &ChangeEvent, subject: &Subject<'_>) -> String {
    let actor = event.actor.as_ref().map_or("", |a| a.name.as_str());
    let parts: Vec<String> = (rule.group_by.iter())
        .map(|part| match part {
            GroupBy::Rule => rule.name.clone(),
            GroupBy::Actor => actor.to_owned(),
            GroupBy::Resource => subject.resource(),
            GroupBy::Namespace => subject.namespace.to_owned(),
            GroupBy::Source => subject.source.to_owned(),
        })
        .collect();
    parts.join("|")
}

/// The window `rule` counts `event` (about `subject`) in.
fn window_key(rule: &Rule, event: &ChangeEvent, subject: &Subject<'_>, per: Per) -> String {
    let value = match per {
        Per::Actor => event
            .actor
            .as_ref()
            .map_or(String::new(), |a| a.name.clone()),
        Per::Resource => subject.resource(),
    };
    format!("{}/{value}", rule.name)
}

impl Handler for Alert {
    type Row = Value;

    async fn handle(
        &self,
        event: &ChangeEvent,
        _record: &Record,
        context: &mut Context<'_>,
    ) -> Result<(), HandlerError> {
        let now = epoch_ms(SystemTime::now());
        let rules = self.rules();
        let subject = Subject::of(event);
        for rule in &rules.rules {
            let Some(mut reasons) = rule.matches(event, &subject) else {
                if let Some(lack) = rule.unevaluable(event) {
                    if rule.concerns(event, &subject) {
                        tracing::debug!(rule = %rule.name, event = %event.id, lack, "rule cannot evaluate the event");
                        self.count("unevaluable", &rule.name);
                    }
                }
                continue;
            };
            let mut count = None;
            if let Some(threshold) = &rule.threshold {
                let window = window_key(rule, event, &subject, threshold.per);
                let Some(reached) = Self::count_in_window(rule, event, &window, context)? else {
                    continue;
                };
                reasons.push(format!(
                    "{reached} matching changes within {} s",
                    threshold.within_s
                ));
                count = Some((reached, window));
            }
            let fired = self.fired(rule, event, reasons, count.as_ref().map(|c| c.0), now);
            if let Some((_, window)) = &count {
                let firing =
                    serde_json::to_vec(&fired.alertmanager()).map_err(HandlerError::permanent)?;
                context.put(format!("{FIRING}{window}").into_bytes(), firing);
            }
            if rule.repeat_interval_s > 0 {
                let last_key = format!("{LAST}{}/{}", rule.name, fired.group_key);
                let last = decode_times(context.get(last_key.as_bytes())?.as_deref());
                if last
                    .first()
                    .is_some_and(|t| event.source.ts_ms - t < rule.repeat_interval_s as i64 * 1000)
                {
                    self.count("held_back", &rule.name);
                    continue;
                }
                context.put(last_key.into_bytes(), encode_times(&[event.source.ts_ms]));
            }
            self.send(rule, &fired, context)?;
        }
        Ok(())
    }

    /// The runtime's metrics, and per rule the alerts `fired`, `silenced`,
    /// `held_back` (by `repeat_interval_s`) and the events it found
    /// `unevaluable`.
    fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.metrics.clone()
    }

    async fn tick(&self, now: SystemTime, context: &mut Context<'_>) -> Result<(), HandlerError> {
        let now = epoch_ms(now);
        self.send_digest(now, context)?;
        let rules = self.rules();
        for (key, value) in context.scan_committed(FIRING.as_bytes())? {
            let window = String::from_utf8_lossy(&key[FIRING.len()..]).into_owned();
            let Some(rule) =
                (rules.rules.iter()).find(|r| window.starts_with(&format!("{}/", r.name)))
            else {
                context.remove(key);
                continue;
            };
            let threshold = rule.threshold.as_ref().expect("firing: a windowed rule");
            let times = decode_times(
                context
                    .get(format!("{WINDOW}{window}").as_bytes())?
                    .as_deref(),
            );
            let since = now - threshold.within_s as i64 * 1000;
            if times.iter().filter(|t| **t > since).count() >= threshold.count as usize {
                continue;
            }
            let mut resolved: Value = serde_json::from_slice(&value).unwrap_or_default();
            resolved["endsAt"] = json!(rfc3339(now));
            context.remove(key);
            context.remove(format!("{WINDOW}{window}").into_bytes());
            let ended_at = rfc3339(now);
            self.emit_routed(rule.severity, None, context, |receiver| match receiver {
                DIGEST => None,
                SLACK => Some(json!({ "text": slack_escape(&format!("[resolved] {}: {window}", rule.name)) })),
                ALERTMANAGER => Some(resolved.clone()),
                _ => Some(json!({"status": "resolved", "rule": rule.name, "labels": resolved["labels"], "ended_at": ended_at})),
            })?;
        }
        Ok(())
    }
}
