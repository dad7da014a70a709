//! A fake Kubernetes API server for tests (no real one can be installed here).
//!
//! It follows the API conventions kube-rs and other clients rely on: discovery
//! (`/api`, `/apis`, group-version resource lists), CRUD for built-in and custom
//! resources with one global resourceVersion counter, `limit`/`continue` pagination
//! (every page consistent with the first), `watch=true` from a resourceVersion with
//! `allowWatchBookmarks`, label and field selectors (objects entering or leaving a
//! selector are ADDED/DELETED for that watch), a bounded change log whose compaction
//! answers 410 Gone (as an in-stream ERROR, or as HTTP 410 when asked), CRD
//! registration through apiextensions.k8s.io/v1 (the kind becomes servable and the
//! CRD Established), Secret `stringData` folded into `data`, managedFields per manager,
//! bearer-token users, an audit webhook backend in batch mode, and hooks to cut watch
//! connections and to stop and resume serving.

mod audit;
mod http;
mod selector;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use audit::{AuditLevel, AuditWebhook, Requester};
pub use store::{merge, ApiError, ResourceType, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Behaviour switches.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Answer a too-old watch with HTTP 410 instead of 200 + an ERROR event.
    pub gone_as_http: bool,
    /// Changes kept for watches and list continuations; older ones are compacted.
    pub max_log: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            gone_as_http: false,
            max_log: 100_000,
        }
    }
}

/// State shared by the HTTP handlers and the test's handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    drops: watch::Sender<u64>,
    active_watches: AtomicUsize,
    options: Mutex<Options>,
    /// Bearer tokens and the user (name, groups) each authenticates.
    users: Mutex<HashMap<String, (String, Vec<String>)>>,
    auditor: Mutex<Option<Arc<audit::Auditor>>>,
}

impl Shared {
    fn options(&self) -> Options {
        self.options.lock().expect("options lock").clone()
    }

    /// The user a request authenticates as: its bearer token's, else anonymous.
    fn authenticate(&self, headers: &axum::http::HeaderMap) -> (String, Vec<String>) {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let users = self.users.lock().expect("users lock");
        match token.and_then(|t| users.get(t)) {
            Some((name, groups)) => {
                let mut groups = groups.clone();
                groups.push("system:authenticated".into());
                (name.clone(), groups)
            }
            None => (
                "system:anonymous".into(),
                vec!["system:unauthenticated".into()],
            ),
        }
    }

    fn auditor(&self) -> Option<Arc<audit::Auditor>> {
        self.auditor.lock().expect("auditor lock").clone()
    }
}

/// A running fake API server on a loopback port.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    serving: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApiServer {
    /// Starts on a free loopback port with default options.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default(), "127.0.0.1:0".parse()?).await
    }

    /// Starts on `addr` with `options`.
    pub async fn start_with(options: Options, addr: SocketAddr) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.max_log)),
            drops: watch::Sender::new(0),
            active_watches: AtomicUsize::new(0),
            options: Mutex::new(options),
            users: Mutex::default(),
            auditor: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let server = Self {
            addr: listener.local_addr()?,
            shared,
            serving: Mutex::new(None),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(self.shared.clone());
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("fake API server stopped: {error}");
            }
        });
        *self.serving.lock().expect("serving lock") = Some(task);
    }

    /// The base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    /// A kube client that authenticates with `token` (see [`FakeApiServer::add_user`]).
    pub fn client_as(&self, token: &str) -> anyhow::Result<kube::Client> {
        let mut config = kube::Config::new(self.url().parse()?);
        config.auth_info.token = Some(token.to_owned().into());
        // kube-rs sends no User-Agent of its own; kubectl's looks like this.
        config.headers.push((
            axum::http::header::USER_AGENT,
            axum::http::HeaderValue::from_static("kubectl/v1.33.0 (linux/amd64) kubernetes/fake"),
        ));
        Ok(kube::Client::try_from(config)?)
    }

    /// Lets requests bearing `token` authenticate as `name` in `groups` (like a line
    /// of kube-apiserver's `--token-auth-file`).
    pub fn add_user(&self, token: &str, name: &str, groups: &[&str]) {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        self.shared
            .users
            .lock()
            .expect("users lock")
            .insert(token.to_owned(), (name.to_owned(), groups));
    }

    /// Sends an audit event for every write received from now on to `webhook`.
    /// Writes made through [`FakeApiServer::store`] bypass the API and are not audited.
    pub fn send_audit_to(&self, webhook: AuditWebhook) -> anyhow::Result<()> {
        let auditor = audit::Auditor::start(webhook)?;
        *self.shared.auditor.lock().expect("auditor lock") = Some(Arc::new(auditor));
        Ok(())
    }

    /// The store, for direct reads and writes (benchmarks, assertions).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().expect("store lock")
    }

    /// Watch connections currently open.
    pub fn active_watches(&self) -> usize {
        self.shared.active_watches.load(Ordering::SeqCst)
    }

    /// Aborts every open watch connection mid-stream.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|generation| *generation += 1);
    }

    /// Forgets the change log: resuming from any earlier version gets 410 Gone.
    pub fn compact(&self) {
        self.store().compact();
    }

    /// Changes behaviour switches at runtime.
    pub fn set_options(&self, change: impl FnOnce(&mut Options)) {
        change(&mut self.shared.options.lock().expect("options lock"));
    }

    /// Stops accepting connections and cuts the open watches (an API server going
    /// down); [`FakeApiServer::resume`] brings it back on the same port.
    pub async fn pause(&self) {
        let task = self.serving.lock().expect("serving lock").take();
        if let Some(task) = task {
            task.abort();
            // Returns once the listener is closed, so `resume` can bind the port again.
            let _ = task.await;
        }
        self.drop_watches();
    }

    /// Serves again on the same port after [`FakeApiServer::pause`].
    pub async fn resume(&self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.serving.lock().expect("serving lock").take() {
            task.abort();
        }
        self.drop_watches();
    }
}
