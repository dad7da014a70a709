//! The binaries reject bad settings with a message naming the key, exit status 2, and
//! accept `CHANGEWIRE_*` environment overrides.

use std::path::Path;
use std::process::{Command, Output};

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

/// The files under config/ are what the demo and docker-compose run; with the
/// overrides docker-compose sets, they must pass `--check`.
#[test]
fn shipped_config_files_are_valid() -> anyhow::Result<()> {
    let stack = Stack::from_env();
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let state = tempfile::tempdir()?;
    let state_dir = state.path().to_string_lossy().into_owned();
    let cases = [
        ("changewire-producer", "producer.toml", vec![]),
        (
            "changewire-producer",
            "kubernetes.toml",
            vec![("CHANGEWIRE_KUBERNETES__REDACTION_KEY", "0123456789abcdef")],
        ),
        (
            "changewire-consumer",
            "dedup.toml",
            vec![("CHANGEWIRE_SERVICE__STATE_DIR", state_dir.as_str())],
        ),
    ];
    for (binary, file, mut env) in cases {
        env.push(("CHANGEWIRE_KAFKA__BROKERS", stack.kafka_brokers.as_str()));
        let output = run(binary, &config_dir.join(file), &env)?;
        assert!(output.status.success(), "{file}: {}", stderr(&output));
    }
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
