//! Avro in the Confluent wire format. No Confluent Schema Registry can be installed
//! here, so a small in-process server answers the two REST calls the codec makes,
//! as the registry documents them (register under a subject; fetch by global id),
//! and checks BACKWARD compatibility as the registry does by default for a
//! record's fields: a field the latest version lacks needs a default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use changewire_schemas::registry::{RegistryConfig, RegistryError, SchemaRegistry, SubjectNaming};
use changewire_schemas::{Codec, CodecError, FormatConfig, ValueFormat};
use serde_json::{json, Value};

use std::time::Duration;

use changewire_tests::{unique_name, Stack, TestConsumer};

use crate::pipeline::{config, database_with, RunningSource};
use changewire_schemas::fixtures;

#[derive(Default)]
struct Registry {
    schemas: Vec<String>,
    subjects: HashMap<String, Vec<usize>>,
}

type Shared = Arc<Mutex<Registry>>;

async fn register(
    State(registry): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    let schema = body["schema"]
        .as_str()
        .ok_or(StatusCode::UNPROCESSABLE_ENTITY)?
        .to_owned();
    let mut registry = registry
        .lock()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let latest = registry
        .subjects
        .get(&subject)
        .and_then(|versions| versions.last())
        .map(|&index| registry.schemas[index].clone());
    if let Some(latest) = latest {
        if !backward_compatible(&latest, &schema) {
            return Err(StatusCode::CONFLICT);
        }
    }
    // Global ids start at 1; registering a known schema returns its id.
    let index = match registry.schemas.iter().position(|s| *s == schema) {
        Some(index) => index,
        None => {
            registry.schemas.push(schema);
            registry.schemas.len() - 1
        }
    };
    registry.subjects.entry(subject).or_default().push(index);
    Ok(Json(json!({ "id": index + 1 })))
}

/// Whether a reader with `new` can read what `old` wrote, for a record's
/// top-level fields: every field `old` lacks needs a default in `new`.
fn backward_compatible(old: &str, new: &str) -> bool {
    let fields = |text: &str| -> Vec<Value> {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|schema| schema["fields"].as_array().cloned())
            .unwrap_or_default()
    };
    let old_names: Vec<Value> = fields(old).iter().map(|f| f["name"].clone()).collect();
    fields(new)
        .iter()
        .all(|field| old_names.contains(&field["name"]) || field.get("default").is_some())
}

async fn schema_by_id(
    State(registry): State<Shared>,
    Path(id): Path<usize>,
) -> Result<Json<Value>, StatusCode> {
    let registry = registry
        .lock()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let schema = id
        .checked_sub(1)
        .and_then(|i| registry.schemas.get(i))
        .ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(json!({ "schema": schema })))
}

async fn start_registry(preloaded: &[&str]) -> anyhow::Result<(String, Shared)> {
    let state: Shared = Arc::default();
    state
        .lock()
        .expect("fresh lock")
        .schemas
        .extend(preloaded.iter().map(|s| s.to_string()));
    let app = Router::new()
        .route("/subjects/{subject}/versions", post(register))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, state))
}

fn avro_with_registry(url: &str) -> FormatConfig {
    FormatConfig {
        value: ValueFormat::Avro,
        schema_registry: Some(RegistryConfig {
            url: url.to_owned(),
            subject: "io.changewire.ChangeEvent".into(),
            subject_naming: SubjectNaming::Record,
            username: None,
            password: None,
        }),
    }
}

#[tokio::test]
async fn confluent_framing_carries_the_registered_schema_id() -> anyhow::Result<()> {
    // Two unrelated schemas already registered: ours must get id 3.
    let (url, registry) = start_registry(&["\"string\"", "\"long\""]).await?;
    let writer = Codec::from_config(&avro_with_registry(&url)).await?;
    let event = fixtures::kubernetes_create("reg");
    let bytes = writer.encode(&event)?;
    assert_eq!(&bytes[..5], &[0, 0, 0, 0, 3]);
    assert_eq!(
        registry
            .lock()
            .expect("lock")
            .subjects
            .get("io.changewire.ChangeEvent"),
        Some(&vec![2])
    );

    // A reader (JSON writer, registry configured) does not register; it learns id 3.
    let mut reader_config = avro_with_registry(&url);
    reader_config.value = ValueFormat::Json;
    let reader = Codec::from_config(&reader_config).await?;
    assert!(matches!(
        reader.decode(&bytes),
        Err(CodecError::UnknownSchemaId(3))
    ));
    assert_eq!(reader.decode_fetching(&bytes).await?, event);
    assert_eq!(reader.decode(&bytes)?, event, "the fetched schema is kept");
    assert_eq!(
        registry.lock().expect("lock").subjects.len(),
        1,
        "readers do not register"
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_registry_is_a_transient_error() -> anyhow::Result<()> {
    let error = Codec::from_config(&avro_with_registry("http://127.0.0.1:1"))
        .await
        .expect_err("nothing listens on port 1");
    assert!(error.is_transient(), "{error:?}");
    Ok(())
}

/// The next version of the envelope adds a field with a default: a registry in
/// BACKWARD mode accepts it because the client registers the schema as written
/// (the Parsing Canonical Form it used to send strips defaults, and the
/// registry refused the new version with 409).
#[tokio::test]
async fn a_next_schema_version_with_a_defaulted_field_is_accepted() -> anyhow::Result<()> {
    let (url, registry) = start_registry(&[]).await?;
    let config = avro_with_registry(&url);
    Codec::from_config(&config).await?;
    let stored = registry.lock().expect("lock").schemas[0].clone();
    assert!(
        stored.contains("\"default\""),
        "the full schema is registered: {stored}"
    );

    let mut next: Value = serde_json::from_str(changewire_schemas::codec::CURRENT_SCHEMA)?;
    next["fields"]
        .as_array_mut()
        .expect("a record")
        .push(json!({"name": "added_later", "type": "string", "default": ""}));
    let client = SchemaRegistry::new(config.schema_registry.as_ref().expect("registry"))?;
    let subject = "io.changewire.ChangeEvent";
    let id = client.register(subject, &next.to_string()).await?;
    assert_eq!(id, 2, "a second version");

    let mut breaking = next.clone();
    breaking["fields"]
        .as_array_mut()
        .expect("a record")
        .push(json!({"name": "required_later", "type": "string"}));
    let refused = client.register(subject, &breaking.to_string()).await;
    assert!(
        matches!(refused, Err(RegistryError::Status { status: 409, .. })),
        "the stand-in checks: {refused:?}"
    );
    Ok(())
}

/// With `subject_naming = "topic"` the producer registers the envelope under
/// `<topic>-value` for each topic it creates (what Confluent tools look up by
/// default) and frames its records with that id; nothing goes under the
/// record-name subject.
#[tokio::test]
async fn topic_subjects_are_registered_per_topic_by_the_producer() -> anyhow::Result<()> {
    let (url, registry) = start_registry(&["\"string\""]).await?;
    let mut format = avro_with_registry(&url);
    if let Some(registry) = &mut format.schema_registry {
        registry.subject_naming = SubjectNaming::Topic;
    }
    let codec = Codec::from_config(&format).await?;
    assert!(
        codec.encode(&fixtures::kubernetes_create("reg")).is_err(),
        "no id before a topic is prepared"
    );
    assert!(registry.lock().expect("lock").subjects.is_empty());

    let stack = Stack::from_env();
    let (db, client) = database_with(&stack, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let prefix = unique_name("reg");
    let kafka = stack.kafka_config();
    let source = RunningSource::start_with(&kafka, codec, config(&db.url, "reg"), &prefix)?;
    client
        .batch_execute("INSERT INTO t VALUES (1), (2)")
        .await?;
    let topic = format!("{prefix}.reg.public.t");
    let consumer = TestConsumer::once_created(&stack, &topic, Duration::from_secs(30)).await?;
    let records = consumer.read_exactly(2, Duration::from_secs(30)).await?;
    source.stop().await?;

    let subjects: Vec<String> = registry
        .lock()
        .expect("lock")
        .subjects
        .keys()
        .cloned()
        .collect();
    assert_eq!(subjects, [format!("{topic}-value")]);
    let mut reader_format = avro_with_registry(&url);
    reader_format.value = ValueFormat::Json;
    let reader = Codec::from_config(&reader_format).await?;
    for record in &records {
        let value = record.value.as_deref().expect("a value");
        assert_eq!(
            &value[..5],
            &[0, 0, 0, 0, 2],
            "the id registered for the topic (after the preloaded one)"
        );
        let event = reader.decode_fetching(value).await?;
        assert!(event.after.expect("a row")["id"].as_i64().is_some());
    }
    Ok(())
}
