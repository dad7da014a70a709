//! `changewire-consumer audit ...`: the audit log from a terminal.
//!
//! - `query`: matching changes as a table (or JSON), from a running service's API;
//! - `history`: every version of one resource with coloured diffs;
//! - `verify`: a live service (`--url`), or a stopped service's store (`--config`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::Value;

use super::verify::verify;
use super::{head::HeadSigner, AuditConfig};
use crate::runtime::Store;

/// What `changewire-consumer audit` does.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Changes matching filters, newest first.
    Query(QueryArgs),
    /// Every version of one resource, oldest first, with its diffs.
    History(HistoryArgs),
    /// Checks the log against every signed head.
    Verify(VerifyArgs),
}

/// Where the service's API is.
#[derive(Debug, Args)]
pub struct Remote {
    /// The audit API, e.g. `http://127.0.0.1:9470`.
    #[arg(
        long,
        env = "CHANGEWIRE_AUDIT_URL",
        default_value = "http://127.0.0.1:9470"
    )]
    pub url: String,
    /// A bearer token (read, or admin for `verify`).
    #[arg(long, env = "CHANGEWIRE_AUDIT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    remote: Remote,
    /// Source name.
    #[arg(long)]
    source: Option<String>,
    /// `group/Kind` or table.
    #[arg(long)]
    kind: Option<String>,
    /// Namespace or schema.
    #[arg(long)]
    namespace: Option<String>,
    /// Object name or row key.
    #[arg(long)]
    name: Option<String>,
    /// Actor name.
    #[arg(long)]
    actor: Option<String>,
    /// Operation: c, u, d, r or t.
    #[arg(long)]
    op: Option<String>,
    /// A changed path, dotted, with `*` (`spec.auth.*`).
    #[arg(long)]
    changed: Option<String>,
    /// Changed since: `7d`, `12h`, `30m`, or ms since the epoch.
    #[arg(long)]
    since: Option<String>,
    /// Changed before: same forms as `--since`.
    #[arg(long)]
    until: Option<String>,
    /// At most this many changes.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// `audit history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    remote: Remote,
    /// Source name.
    source: String,
    /// `group/Kind` or table.
    kind: String,
    /// Namespace or schema (`-` for cluster-scoped).
    namespace: String,
    /// Object name or row key.
    name: String,
}

/// `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A stopped service's config: verify its store on disk.
    #[arg(long, conflicts_with = "url")]
    config: Option<PathBuf>,
    /// A running service's API: ask it to verify (needs an admin token).
    #[arg(long)]
    url: Option<String>,
    /// The admin token, with `--url`.
    #[arg(long, env = "CHANGEWIRE_AUDIT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one `audit` command; `Ok(false)` when verification found problems.
pub async fn run(command: AuditCommand) -> Result<bool, BoxError> {
    match command {
        AuditCommand::Query(args) => query(args).await.map(|()| true),
        AuditCommand::History(args) => history(args).await.map(|()| true),
        AuditCommand::Verify(args) => verify_command(args).await,
    }
}

async fn get(remote: &Remote, path: &str, params: &[(&str, String)]) -> Result<Value, BoxError> {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", remote.url.trim_end_matches('/')))
        .bearer_auth(&remote.token)
        .query(params)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let reason = body["error"].as_str().unwrap_or("no reason given");
        return Err(format!("the audit API answered {status}: {reason}").into());
    }
    Ok(body)
}

async fn query(args: QueryArgs) -> Result<(), BoxError> {
    let now = now_ms();
    let mut params: Vec<(&str, String)> = [
        ("source", args.source),
        ("kind", args.kind),
        ("namespace", args.namespace),
        ("name", args.name),
        ("actor", args.actor),
        ("op", args.op),
        ("changed", args.changed),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect();
    for (name, value) in [("from", args.since), ("to", args.until)] {
        if let Some(value) = value {
            params.push((name, parse_time(&value, now)?.to_string()));
        }
    }
    params.push(("limit", args.limit.to_string()));
    let page = get(&args.remote, "/v1/events", &params).await?;
    if args.remote.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    let events = page["events"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<24} {:<2} {:<16} {:<48} CHANGED",
        "TIME (UTC)", "OP", "ACTOR", "RESOURCE"
    );
    for found in &events {
        println!("{}", table_row(found));
    }
    if events.is_empty() {
        println!("(no matching changes)");
    } else if page["next_cursor"].is_string() {
        println!("(more: raise --limit or narrow the filters)");
    }
    Ok(())
}

fn table_row(found: &Value) -> String {
    let event = &found["event"];
    let resource = &found["resource"];
    let name = [&resource["kind"], &resource["namespace"], &resource["name"]]
        .map(|v| v.as_str().unwrap_or(""))
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    format!(
        "{:<24} {:<2} {:<16} {:<48} {}",
        utc(event["source"]["ts_ms"].as_i64().unwrap_or(0)),
        event["op"].as_str().unwrap_or("?"),
        event["actor"]["name"].as_str().unwrap_or("-"),
        format!("{}:{name}", resource["source"].as_str().unwrap_or("")),
        changed_paths(event).join(", ")
    )
}

/// The paths an event changed: from its diff, or (rows) the columns whose values
/// differ between `before` and `after`.
fn changed_paths(event: &Value) -> Vec<String> {
    if let Some(operations) = event["diff"].as_array() {
        return (operations.iter())
            .filter_map(|op| op["path"].as_str())
            .map(|p| p.trim_start_matches('/').replace('/', "."))
            .collect();
    }
    let (Some(before), Some(after)) = (event["before"].as_object(), event["after"].as_object())
    else {
        return Vec::new();
    };
    (after.iter())
        .filter(|(column, value)| before.get(*column) != Some(*value))
        .map(|(column, _)| column.clone())
        .collect()
}

async fn history(args: HistoryArgs) -> Result<(), BoxError> {
    let encode = |s: &str| s.replace('%', "%25").replace('/', "%2F");
    let path = format!(
        "/v1/resources/{}/{}/{}/{}/history",
        encode(&args.source),
        encode(&args.kind),
        encode(&args.namespace),
        encode(&args.name)
    );
    let page = get(&args.remote, &path, &[("limit", "500".to_owned())]).await?;
    if args.remote.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    let colour = std::io::stdout().is_terminal();
    for found in page["events"].as_array().into_iter().flatten() {
        let event = &found["event"];
        println!(
            "{} {} by {} ({})",
            utc(event["source"]["ts_ms"].as_i64().unwrap_or(0)),
            event["op"].as_str().unwrap_or("?"),
            event["actor"]["name"].as_str().unwrap_or("unknown"),
            event["id"].as_str().unwrap_or("")
        );
        for operation in event["diff"].as_array().into_iter().flatten() {
            println!("    {}", diff_line(operation, colour));
        }
    }
    Ok(())
}

/// One JSON Patch operation as a diff line: `+` added, `-` removed, `~` replaced.
fn diff_line(operation: &Value, colour: bool) -> String {
    let path = operation["path"].as_str().unwrap_or("");
    let value = operation
        .get("value")
        .map(Value::to_string)
        .unwrap_or_default();
    let (mark, code) = match operation["op"].as_str() {
        Some("add") => ("+", "32"),
        Some("remove") => ("-", "31"),
        _ => ("~", "33"),
    };
    let line = format!("{mark} {path} {value}");
    if colour {
        format!("\x1b[{code}m{line}\x1b[0m")
    } else {
        line
    }
}

async fn verify_command(args: VerifyArgs) -> Result<bool, BoxError> {
    let report = match (args.config, args.url) {
        (Some(config), None) => {
            let config = crate::config::ConsumerConfig::load(&config)?;
            let audit: AuditConfig = config
                .audit
                .clone()
                .ok_or("the config has no [audit] section")?;
            let key = HeadSigner::from_seed(&audit.signing_key)?.verifying_key();
            let store = Store::open(&config.service.state_dir).map_err(|e| {
                format!("cannot open the store (is the service still running?): {e}")
            })?;
            serde_json::to_value(verify(&store, &key)?)?
        }
        (None, Some(url)) => {
            let token = args
                .token
                .ok_or("--url needs --token (or CHANGEWIRE_AUDIT_TOKEN)")?;
            let response = reqwest::Client::new()
                .post(format!("{}/v1/verify", url.trim_end_matches('/')))
                .bearer_auth(token)
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                return Err(format!("the audit API answered {status}: {}", body["error"]).into());
            }
            body["report"].clone()
        }
        _ => {
            return Err(
                "give --config (a stopped service's store) or --url (a running service)".into(),
            )
        }
    };
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    println!(
        "{} entries, {} signed heads, signed up to {}",
        report["size"], report["heads"], report["signed_size"]
    );
    match problems.first() {
        None => println!("intact: every entry matches every signed head"),
        Some(first) => {
            println!("NOT INTACT: {} problem(s); the first:", problems.len());
            println!("  {first}");
        }
    }
    Ok(problems.is_empty())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `7d`, `12h`, `30m`, `45s` before `now`, or ms since the epoch.
pub fn parse_time(text: &str, now: i64) -> Result<i64, BoxError> {
    let unit = |suffix: char, ms: i64| {
        text.strip_suffix(suffix)
            .and_then(|n| n.parse::<i64>().ok())
            .map(|n| now - n * ms)
    };
    unit('d', 86_400_000)
        .or_else(|| unit('h', 3_600_000))
        .or_else(|| unit('m', 60_000))
        .or_else(|| unit('s', 1000))
        .or_else(|| text.parse().ok())
        .ok_or_else(|| format!("{text:?}: expected 7d, 12h, 30m, 45s or ms since the epoch").into())
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SS.mmm`, UTC.
pub fn utc(ms: i64) -> String {
    let text = changewire_schemas::time::rfc3339(ms);
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn times_read_relative_or_absolute_and_print_in_utc() {
        assert_eq!(
            parse_time("7d", 1_000_000_000_000).ok(),
            Some(1_000_000_000_000 - 604_800_000)
        );
        assert_eq!(
            parse_time("90m", 10_000_000).ok(),
            Some(10_000_000 - 5_400_000)
        );
        assert_eq!(parse_time("1700000000000", 0).ok(), Some(1_700_000_000_000));
        assert!(parse_time("last week", 0).is_err());
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn diffs_print_as_marked_lines() {
        let add = json!({"op": "add", "path": "/spec/auth", "value": {"mode": "jwt"}});
        assert_eq!(diff_line(&add, false), "+ /spec/auth {\"mode\":\"jwt\"}");
        let remove = json!({"op": "remove", "path": "/spec/rps"});
        assert_eq!(diff_line(&remove, true), "\x1b[31m- /spec/rps \x1b[0m");
        assert_eq!(
            changed_paths(&json!({"diff": [add, remove]})),
            ["spec.auth", "spec.rps"]
        );
        let row =
            json!({"before": {"id": 1, "status": "new"}, "after": {"id": 1, "status": "paid"}});
        assert_eq!(changed_paths(&row), ["status"]);
    }
}
