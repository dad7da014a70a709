//! The fake API server's audit webhook backend, in batch mode like kube-apiserver's
//! `--audit-webhook-mode=batch`: one `audit.k8s.io/v1` `EventList` per batch (at most
//! 400 events, or what arrived within `batch_max_wait`), POSTed over HTTPS with a
//! bearer token, retried with backoff while the receiver fails.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Which parts of a request an audit event carries (kube-apiserver's policy levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditLevel {
    /// User, verb, object reference, response status.
    Metadata,
    /// Also the request and response bodies.
    RequestResponse,
}

/// Where and how the fake sends audit events.
#[derive(Debug, Clone)]
pub struct AuditWebhook {
    /// The receiver's URL (`https://...`).
    pub url: String,
    /// Bearer token sent with every batch.
    pub token: String,
    /// PEM of the CA that signed the receiver's certificate.
    pub ca_pem: Vec<u8>,
    /// How long a batch waits for more events before it is sent.
    pub batch_max_wait: Duration,
    /// The policy level applied to every write.
    pub level: AuditLevel,
}

/// Who sent a request, as the authenticator and the connection tell.
#[derive(Debug, Clone)]
pub struct Requester {
    /// Authenticated user name (`system:anonymous` without a known token).
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The client's address.
    pub source_ip: String,
    /// The `User-Agent` header.
    pub user_agent: String,
}

/// A write the API server answered, to be audited.
pub(super) struct AuditedWrite<'a> {
    pub requester: &'a Requester,
    pub verb: &'static str,
    pub request_uri: String,
    pub object_ref: Value,
    pub code: u16,
    pub request: Option<Value>,
    pub response: Value,
    pub received: String,
}

/// The sending side: writes are queued here and batched by a background task.
pub(super) struct Auditor {
    events: mpsc::UnboundedSender<Value>,
    level: AuditLevel,
}

/// Events per batch at most (kube-apiserver's `--audit-webhook-batch-max-size`).
const MAX_BATCH: usize = 400;

impl Auditor {
    pub(super) fn start(webhook: AuditWebhook) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&webhook.ca_pem)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        let (events, queued) = mpsc::unbounded_channel();
        let level = webhook.level;
        tokio::spawn(send_batches(client, webhook, queued));
        Ok(Self { events, level })
    }

    /// Queues the `ResponseComplete` event of `write`.
    pub(super) fn record(&self, write: AuditedWrite<'_>) {
        let requester = write.requester;
        let mut event = json!({
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": match self.level { AuditLevel::Metadata => "Metadata", AuditLevel::RequestResponse => "RequestResponse" },
            "auditID": uuid::Uuid::new_v4().to_string(),
            "stage": "ResponseComplete",
            "requestURI": write.request_uri,
            "verb": write.verb,
            "user": {"username": requester.username, "groups": requester.groups},
            "sourceIPs": [requester.source_ip],
            "userAgent": requester.user_agent,
            "objectRef": write.object_ref,
            "responseStatus": {"metadata": {}, "code": write.code},
            "requestReceivedTimestamp": write.received,
            "stageTimestamp": super::store::now_micros(),
        });
        if self.level == AuditLevel::RequestResponse {
            if let Some(request) = write.request {
                event["requestObject"] = request;
            }
            event["responseObject"] = write.response;
        }
        // The receiver task ends only with the server.
        let _ = self.events.send(event);
    }
}

async fn send_batches(
    client: reqwest::Client,
    webhook: AuditWebhook,
    mut queued: mpsc::UnboundedReceiver<Value>,
) {
    while let Some(first) = queued.recv().await {
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + webhook.batch_max_wait;
        while items.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, queued.recv()).await {
                Ok(Some(event)) => items.push(event),
                Ok(None) | Err(_) => break,
            }
        }
        let list = json!({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": items});
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            let sent = client
                .post(&webhook.url)
                .bearer_auth(&webhook.token)
                .json(&list)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => eprintln!(
                    "fake API server: audit webhook answered {} (attempt {attempt})",
                    response.status()
                ),
                Err(error) => {
                    eprintln!("fake API server: audit webhook failed: {error} (attempt {attempt})")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}
