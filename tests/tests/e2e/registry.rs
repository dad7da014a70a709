//! Avro in the Confluent wire format. No Confluent Schema Registry can be installed
//! here, so a small in-process server answers the two REST calls the codec makes,
//! as the registry documents them (register under a subject; fetch by global id).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use changewire_schemas::registry::RegistryConfig;
use changewire_schemas::{Codec, CodecError, FormatConfig, ValueFormat};
use serde_json::{json, Value};

use crate::fixtures;

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
