//! The binaries reject bad settings with a message naming the key, exit status 2, and
//! accept `CHANGEWIRE_*` environment overrides.

use std::path::Path;
use std::process::{Command, Output};

use changewire_tests::kube_api::FakeApiServer;
use changewire_tests::{workspace_binary, Stack};

const EXIT_CONFIG: i32 = 2;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn run(binary: &str, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = Command::new(workspace_binary(binary)?);
    command.arg("--config").arg(config).arg("--check");
    // Overrides in the test's own environment must not leak into the child.
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("CHANGEWIRE_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    Ok(command.output()?)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn producer_config(brokers: &str) -> String {
    format!("[kafka]\nbrokers = \"{brokers}\"\n\n[topics]\nprefix = \"cwtest\"\n")
}

#[test]
fn unknown_key_is_named_in_the_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        "[kafka]\nbrokers = \"h:1\"\nbrokerz = \"typo\"\n",
    );
    let output = run("changewire-producer", &config, &[])?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    let message = stderr(&output);
    assert!(message.contains("brokerz"), "{message}");
    assert!(
        message.contains("brokers"),
        "should list what is expected: {message}"
    );
    Ok(())
}

#[test]
fn invalid_value_names_the_key_and_what_was_expected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        "[kafka]\nbrokers = \"h:1\"\n[topics]\nprefix = \"has space\"\n",
    );
    let output = run("changewire-producer", &config, &[])?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    let message = stderr(&output);
    assert!(message.contains("topics.prefix"), "{message}");
    assert!(message.contains("[a-zA-Z0-9._-]"), "{message}");
    Ok(())
}

#[test]
fn wrong_type_and_missing_file_are_reported() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "[kafka]\nbrokers = 9092\n");
    let output = run("changewire-producer", &config, &[])?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(stderr(&output).contains("brokers"), "{}", stderr(&output));

    let output = run("changewire-producer", &dir.path().join("absent.toml"), &[])?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(
        stderr(&output).contains("absent.toml"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn environment_overrides_are_validated_like_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &producer_config("h:1"));
    let output = run(
        "changewire-producer",
        &config,
        &[("CHANGEWIRE_KAFKA__BROKERS", "no-port")],
    )?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(
        stderr(&output).contains("kafka.brokers"),
        "{}",
        stderr(&output)
    );

    let output = run(
        "changewire-producer",
        &config,
        &[("CHANGEWIRE_KAFKA__TYPO", "1")],
    )?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(
        stderr(&output).to_lowercase().contains("typo"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn environment_override_reaches_the_real_broker() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    // The file points nowhere; only the override makes the broker check pass.
    let config = write_config(dir.path(), &producer_config("127.0.0.1:1"));
    let output = run(
        "changewire-producer",
        &config,
        &[("CHANGEWIRE_KAFKA__BROKERS", stack.kafka_brokers.as_str())],
    )?;
    assert!(output.status.success(), "{}", stderr(&output));
    Ok(())
}

#[test]
fn unreachable_broker_fails_the_check_with_a_runtime_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &producer_config("127.0.0.1:1"));
    let output = run("changewire-producer", &config, &[])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot reach Kafka at 127.0.0.1:1"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// The consumer's `--check` reaches the brokers it will read from, like the
/// producer's.
#[test]
fn the_consumer_check_reaches_kafka() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    let text = "[kafka]\nbrokers = \"127.0.0.1:1\"\n[service]\nname = \"dedup\"\nsubscribe = [\"t\"]\nstate_dir = \"/tmp/x\"\n[dedup]\n";
    let config = write_config(dir.path(), text);
    let output = run("changewire-consumer", &config, &[])?;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("cannot reach Kafka at 127.0.0.1:1"),
        "{}",
        stderr(&output)
    );
    let reachable = [("CHANGEWIRE_KAFKA__BROKERS", stack.kafka_brokers.as_str())];
    let output = run("changewire-consumer", &config, &reachable)?;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("Kafka reachable"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[test]
fn consumer_requires_a_subscription() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = "[kafka]\nbrokers = \"h:1\"\n[service]\nname = \"dedup\"\nsubscribe = []\nstate_dir = \"/tmp/x\"\n";
    let config = write_config(dir.path(), text);
    let output = run("changewire-consumer", &config, &[])?;
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert!(
        stderr(&output).contains("service.subscribe"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// Each consumer config `service` + settings fails `--check` with exit status
/// 2 and a message naming what is wrong.
fn refused_with_key_named(service: &str, cases: &[(String, &str)]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (settings, named) in cases {
        let config = write_config(dir.path(), &format!("{service}{settings}"));
        let output = run("changewire-consumer", &config, &[])?;
        assert_eq!(
            output.status.code(),
            Some(EXIT_CONFIG),
            "{}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(named),
            "{named}: {}",
            stderr(&output)
        );
    }
    Ok(())
}

/// The audit service refuses what would break its log: a group (partitions could
/// move between instances), a signing key that is not 32 bytes, no token.
#[test]
fn audit_refuses_settings_that_would_break_its_log() -> anyhow::Result<()> {
    let service = "[kafka]\nbrokers = \"h:1\"\n[service]\nname = \"audit\"\nsubscribe = [\"t\"]\nstate_dir = \"/tmp/x\"\n";
    let key = "signing_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"";
    let cases = [
        (
            format!("[audit]\n{key}\nread_tokens = [\"r\"]\n"),
            "service.assignment",
        ),
        (
            "assignment = \"static\"\n[audit]\nsigning_key = \"c2hvcnQ=\"\nread_tokens = [\"r\"]\n"
                .to_owned(),
            "audit.signing_key",
        ),
        (
            format!("assignment = \"static\"\n[audit]\n{key}\n"),
            "audit.read_tokens",
        ),
    ];
    refused_with_key_named(service, &cases)
}

/// The gateway service refuses what cannot work: a group (a replica would miss
/// partitions), no gateway, a status API without tokens, a typo in a section.
#[test]
fn gateway_refuses_settings_that_cannot_work() -> anyhow::Result<()> {
    let service = "[kafka]\nbrokers = \"h:1\"\n[service]\nname = \"gw\"\nsubscribe = [\"t\"]\nstate_dir = \"/tmp/x\"\n";
    let nginx = "[gateway.nginx]\ndir = \"/tmp/gw\"\nlisten = \"127.0.0.1:1\"\nhealth_listen = \"127.0.0.1:2\"\n";
    let ticking = "assignment = \"static\"\ntick_interval_ms = 100\n";
    let cases = [
        (
            format!("[gateway]\n{nginx}"),
            "the gateway service reads every partition",
        ),
        (format!("{ticking}[gateway]\n"), "configure a gateway"),
        (
            format!("{ticking}[gateway]\nlisten = \"127.0.0.1:3\"\n{nginx}"),
            "gateway.api_tokens",
        ),
        (
            format!("{ticking}[gateway]\n{nginx}port = 80\n"),
            "gateway.nginx.port",
        ),
    ];
    refused_with_key_named(service, &cases)
}

/// The files under config/ are what the demo and docker-compose run; with the
/// overrides docker-compose sets, they must pass `--check`, which reaches Kafka,
/// PostgreSQL (the stack's demo database) and the API server (a fake one here).
// Multi-threaded: the fake API server answers while a test thread waits on a binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_files_are_valid() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let fake = FakeApiServer::start().await?;
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let state = tempfile::tempdir()?;
    let state_dir = state.path().to_string_lossy().into_owned();
    let demo_db = demo_database_url(&stack);
    let api_url = fake.url();
    let rules = config_dir
        .join("alert-rules.yaml")
        .to_string_lossy()
        .into_owned();
    let cases = [
        (
            "changewire-producer",
            "producer.toml",
            vec![("CHANGEWIRE_POSTGRES__URL", demo_db.as_str())],
        ),
        (
            "changewire-producer",
            "kubernetes.toml",
            vec![
                ("CHANGEWIRE_KUBERNETES__REDACTION_KEY", "0123456789abcdef"),
                ("CHANGEWIRE_KUBERNETES__API_URL", api_url.as_str()),
            ],
        ),
        (
            "changewire-consumer",
            "dedup.toml",
            vec![("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str())],
        ),
        (
            "changewire-consumer",
            "siem.toml",
            vec![("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str())],
        ),
        (
            "changewire-consumer",
            "alert.toml",
            vec![
                ("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str()),
                ("CHANGEWIRE_ALERT__RULES_FILE", rules.as_str()),
            ],
        ),
        (
            "changewire-consumer",
            "gateway.toml",
            vec![("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str())],
        ),
        (
            "changewire-consumer",
            "audit.toml",
            vec![
                ("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str()),
                ("CHANGEWIRE_AUDIT__READ_TOKENS", "a,b"),
            ],
        ),
    ];
    for (binary, file, mut env) in cases {
        env.push(("CHANGEWIRE_KAFKA__BROKERS", stack.kafka_brokers.as_str()));
        let output = run(binary, &config_dir.join(file), &env)?;
        assert!(output.status.success(), "{file}: {}", stderr(&output));
    }
    Ok(())
}

/// The stack's `demo` database (scripts/stack up creates it), password included.
fn demo_database_url(stack: &Stack) -> String {
    let base = stack.pg_url.rsplit_once('/').map_or("", |(base, _)| base);
    format!("{base}/demo")
}

/// The producer's `--check` reaches each source's server and fails, naming it,
/// when one does not answer or cannot be streamed from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_check_reaches_postgres_and_the_api_server() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    let fake = FakeApiServer::start().await?;
    let base = producer_config(&stack.kafka_brokers);
    let postgres = |url: &str| format!("{base}\n[postgres]\nname = \"demo\"\nurl = \"{url}\"\n");
    let kubernetes = |url: &str| {
        format!("{base}\n[kubernetes]\nname = \"k\"\napi_url = \"{url}\"\n[[kubernetes.kinds]]\nversion = \"v1\"\nkind = \"ConfigMap\"\nplural = \"configmaps\"\n")
    };

    let reachable = run(
        "changewire-producer",
        &write_config(dir.path(), &postgres(&demo_database_url(&stack))),
        &[],
    )?;
    assert!(reachable.status.success(), "{}", stderr(&reachable));
    assert!(
        stderr(&reachable).contains("wal_level = logical"),
        "{}",
        stderr(&reachable)
    );
    let down = run(
        "changewire-producer",
        &write_config(
            dir.path(),
            &postgres("postgres://changewire@127.0.0.1:1/demo"),
        ),
        &[],
    )?;
    assert_eq!(down.status.code(), Some(1));
    assert!(
        stderr(&down).contains("the PostgreSQL check failed"),
        "{}",
        stderr(&down)
    );

    let answering = run(
        "changewire-producer",
        &write_config(dir.path(), &kubernetes(&fake.url())),
        &[],
    )?;
    assert!(answering.status.success(), "{}", stderr(&answering));
    assert!(
        stderr(&answering).contains("Kubernetes API server"),
        "{}",
        stderr(&answering)
    );
    let silent = run(
        "changewire-producer",
        &write_config(dir.path(), &kubernetes("http://127.0.0.1:1")),
        &[],
    )?;
    assert_eq!(silent.status.code(), Some(1));
    assert!(
        stderr(&silent).contains("the Kubernetes check failed"),
        "{}",
        stderr(&silent)
    );
    Ok(())
}

/// Environment values are text unless the key wants a number: a secret made of
/// digits stays a string; librdkafka's dotted property names are one key; a
/// variable for a section only another binary has is ignored with a warning.
#[test]
fn environment_overrides_keep_secrets_as_text_and_ignore_other_binaries_sections(
) -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    let text = format!("[kafka]\nbrokers = {:?}\n[service]\nname = \"dedup\"\nsubscribe = [\"t\"]\nstate_dir = \"/tmp/x\"\n[dedup]\n", stack.kafka_brokers);
    let config = write_config(dir.path(), &text);
    let env = [
        ("CHANGEWIRE_HTTP__TOKEN", "007123"),
        ("CHANGEWIRE_KAFKA__PROPERTIES__SASL.PASSWORD", "1234"),
        ("CHANGEWIRE_SERVICE__MAX_BATCH", "500"),
        ("CHANGEWIRE_POSTGRES__PASSWORD", "for-the-producer"),
    ];
    let output = run("changewire-consumer", &config, &env)?;
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("ignoring CHANGEWIRE_POSTGRES__*"),
        "{message}"
    );
    assert!(
        !message.contains("for-the-producer"),
        "values are not echoed"
    );

    let output = run(
        "changewire-consumer",
        &config,
        &[("CHANGEWIRE_SERVICE__MAX_BATCH", "many")],
    )?;
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "a number is still checked"
    );
    assert!(stderr(&output).contains("max_batch"), "{}", stderr(&output));
    Ok(())
}

/// `CHANGEWIRE_LOG_FORMAT=json` makes every log line a JSON object (and is not
/// taken for a config key); an unknown format is a configuration error.
#[test]
fn logs_are_json_lines_when_asked() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\n[service]\nname = \"logs\"\nsubscribe = [\"cw-log-test\"]\nstate_dir = {:?}\n[dedup]\n",
        stack.kafka_brokers,
        dir.path().join("state")
    );
    let config = write_config(dir.path(), &text);
    let log = dir.path().join("service.log");
    let mut child = Command::new(workspace_binary("changewire-consumer")?)
        .arg("--config")
        .arg(&config)
        .env("CHANGEWIRE_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let lines = loop {
        let text = std::fs::read_to_string(&log)?;
        if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    child.kill()?;
    child.wait()?;
    assert!(lines.lines().count() >= 2, "the service logged: {lines}");
    for line in lines.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(
            object["level"].is_string() && object["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        !lines.contains("ignoring"),
        "the log format is not a config key"
    );

    let output = Command::new(workspace_binary("changewire-consumer")?)
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("yaml")
        .output()?;
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// The services docker-compose.yml defines, as `docker-compose config` resolves them.
#[derive(Debug, serde::Deserialize)]
struct ComposeFile {
    services: std::collections::BTreeMap<String, ComposeService>,
}

#[derive(Debug, serde::Deserialize)]
struct ComposeService {
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    environment: std::collections::BTreeMap<String, Scalar>,
}

/// An environment value as YAML may type it.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(i64),
    Flag(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(text) => text.clone(),
            Scalar::Number(n) => n.to_string(),
            Scalar::Flag(b) => b.to_string(),
        }
    }
}

/// `docker-compose config` (or the compose plugin's) for the repository's file,
/// with no variable set: a plain `docker compose up` must work.
fn compose_config(root: &Path) -> anyhow::Result<String> {
    let tools: [&[&str]; 2] = [&["docker-compose"], &["docker", "compose"]];
    for tool in tools {
        let Ok(output) = Command::new(tool[0])
            .args(&tool[1..])
            .args(["config"])
            .current_dir(root)
            .env_remove("FORWARD_SECRET")
            .env_remove("FORWARD_URL")
            .env_remove("AUDIT_SIGNING_KEY")
            .env_remove("AUDIT_READ_TOKENS")
            .env_remove("AUDIT_ADMIN_TOKENS")
            .output()
        else {
            continue;
        };
        if output.status.success() {
            return Ok(String::from_utf8(output.stdout)?);
        }
        let error = String::from_utf8_lossy(&output.stderr).into_owned();
        if !error.contains("unknown command") {
            anyhow::bail!(
                "{} config rejected docker-compose.yml: {error}",
                tool.join(" ")
            );
        }
    }
    anyhow::bail!("neither docker-compose nor the compose plugin is installed (.ci/run installs docker-compose)")
}

/// docker-compose.yml is valid for the compose tool, and every changewire
/// service's config file with the environment the file gives it passes its
/// binary's `--check` (which reaches Kafka and PostgreSQL), with only the
/// container hosts and paths mapped to this machine's.
#[test]
fn docker_compose_services_pass_their_binarys_check() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let compose: ComposeFile = figment::Figment::from(
        <figment::providers::Yaml as figment::providers::Format>::string(&compose_config(&root)?),
    )
    .extract()?;
    let state = tempfile::tempdir()?;
    let demo_db = demo_database_url(&stack);
    let local = |name: &str, value: String| match name {
        "CHANGEWIRE_KAFKA__BROKERS" => stack.kafka_brokers.clone(),
        "CHANGEWIRE_POSTGRES__URL" => demo_db.clone(),
        "CHANGEWIRE_HTTP__LISTEN" => "127.0.0.1:0".to_owned(),
        _ if name.ends_with("STATE_DIR") => state.path().join(name).to_string_lossy().into_owned(),
        _ => value,
    };
    let mut checked = Vec::new();
    for (name, service) in &compose.services {
        let Some((binary, args)) = service.command.split_first() else {
            continue;
        };
        if !binary.starts_with("changewire-") {
            continue;
        }
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("/etc/changewire/", &format!("{}/config/", root.display())))
            .collect();
        let mut command = Command::new(workspace_binary(binary)?);
        command.args(&args).arg("--check");
        for (variable, _) in std::env::vars().filter(|(n, _)| n.starts_with("CHANGEWIRE_")) {
            command.env_remove(variable);
        }
        for (variable, value) in &service.environment {
            command.env(variable, local(variable, value.text()));
        }
        let output = command.output()?;
        assert!(
            output.status.success(),
            "service {name}: {}",
            stderr(&output)
        );
        checked.push(name.as_str());
    }
    assert_eq!(checked, ["audit", "dedup", "forward", "producer"]);
    Ok(())
}
