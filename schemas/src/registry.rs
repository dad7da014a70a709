//! A small client for the Confluent Schema Registry REST API: register the envelope
//! schema, and fetch writer schemas by id.
//!
//! The envelope is one schema for every topic: by default it is registered once
//! under a record-name subject (`io.changewire.ChangeEvent`); with
//! `subject_naming = "topic"` under `<topic>-value` for each topic, as Confluent
//! tools expect by default. Either way one schema text has one id.

use std::fmt;
use std::time::Duration;

use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// Media type the registry expects.
const REGISTRY_MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The `[format.schema_registry]` configuration section.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, e.g. `http://registry:8081`.
    pub url: String,
    /// Subject to register the envelope schema under (with `subject_naming =
    /// "record"`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `record` (default): one subject, `subject`, for every topic; `topic`:
    /// `<topic>-value` per topic, what Confluent tools default to.
    #[serde(default)]
    pub subject_naming: SubjectNaming,
    /// Basic-auth user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password (never logged).
    #[serde(default)]
    pub password: Option<String>,
}

/// How the envelope schema's subjects are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectNaming {
    /// One subject for every topic (RecordNameStrategy).
    #[default]
    Record,
    /// `<topic>-value` per topic (TopicNameStrategy).
    Topic,
}

fn default_subject() -> String {
    "io.changewire.ChangeEvent".to_owned()
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("subject", &self.subject)
            .field("subject_naming", &self.subject_naming)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A registry request that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Network failure or timeout.
    #[error("cannot reach the schema registry")]
    Http(#[from] reqwest::Error),
    /// The registry answered with an error status.
    #[error("schema registry answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body (the registry's error message).
        body: String,
    },
    /// The registry returned a schema that does not parse.
    #[error("schema registry returned an invalid schema")]
    InvalidSchema(#[source] Box<apache_avro::Error>),
}

impl RegistryError {
    /// Network errors, 429 and 5xx are worth retrying; other statuses are not.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Http(_) => true,
            RegistryError::Status { status, .. } => *status == 429 || *status >= 500,
            RegistryError::InvalidSchema(_) => false,
        }
    }
}

/// Client for one schema registry.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    config: RegistryConfig,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct SchemaBody<'a> {
    schema: &'a str,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaText {
    schema: String,
}

impl SchemaRegistry {
    /// A client for the configured registry.
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            config: config.clone(),
            http,
        })
    }

    /// Registers the schema `text` under `subject` (idempotent) and returns its
    /// global id. The text goes as written, not in Parsing Canonical Form: that
    /// form strips `default`, `doc` and `aliases`, and a registry checking
    /// BACKWARD compatibility (its default) would refuse the next version that
    /// adds a field with a default.
    pub async fn register(&self, subject: &str, text: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.base());
        let request = self.http.post(url).json(&SchemaBody { schema: text });
        let body: IdBody = self.send(request).await?;
        Ok(body.id)
    }

    /// Fetches the schema with global id `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<Schema, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base());
        let body: SchemaText = self.send(self.http.get(url)).await?;
        Schema::parse_str(&body.schema).map_err(|e| RegistryError::InvalidSchema(Box::new(e)))
    }

    fn base(&self) -> &str {
        self.config.url.trim_end_matches('/')
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, RegistryError> {
        let mut request = request.header(reqwest::header::ACCEPT, REGISTRY_MEDIA_TYPE);
        if let Some(user) = &self.config.username {
            request = request.basic_auth(user, self.config.password.as_ref());
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(RegistryError::Status {
                status: status.as_u16(),
                body,
            });
        }
        Ok(response.json().await?)
    }
}
