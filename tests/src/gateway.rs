//! Gateway test support: upstream HTTP servers that say who answered, a real
//! Caddy started on free loopback ports, and an nginx prefix directory whose
//! nginx (started by the gateway service) is stopped when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::Router;
use serde_json::json;
use tokio::time::Instant;

/// An upstream server on loopback: answers every request with its name (and
/// the status it is told), counting requests.
pub struct Upstream {
    /// Its name, the body it answers.
    pub name: String,
    /// `127.0.0.1:<port>`.
    pub target: String,
    hits: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts one answering 200.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let target = listener.local_addr()?.to_string();
        let hits = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let (counted, answered, body) = (hits.clone(), status.clone(), name.to_owned());
        let app = Router::new().fallback(move || {
            let (counted, answered, body) = (counted.clone(), answered.clone(), body.clone());
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let status =
                    StatusCode::from_u16(answered.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
                (status, body)
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            name: name.to_owned(),
            target,
            hits,
            status,
            task,
        })
    }

    /// Requests it received.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answers `status` from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request through a gateway: status and body.
pub async fn request(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let mut builder = client.request(method.parse()?, url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = builder.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// Polls `check` every 100 ms until it returns true or `within` passes.
pub async fn eventually(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let last = check().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out waiting for {what} (last check: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// nginx's prefix directory for a gateway service; the nginx the service
/// starts there is stopped on drop.
pub struct NginxDir {
    /// The directory.
    pub dir: tempfile::TempDir,
}

impl NginxDir {
    /// A new, empty one.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The live config file.
    pub fn config(&self) -> PathBuf {
        self.path().join("nginx.conf")
    }

    /// Whether `nginx -t` accepts the live config.
    pub fn live_config_is_valid(&self) -> anyhow::Result<bool> {
        let status = Command::new("nginx")
            .arg("-p")
            .arg(self.path())
            .arg("-c")
            .arg(self.config())
            .args(["-t", "-q"])
            .stderr(Stdio::null())
            .status()?;
        Ok(status.success())
    }
}

impl Drop for NginxDir {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.path().join("nginx.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            // SIGTERM: the master stops its workers too.
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// A Caddy server of its own (admin API and two listeners on free ports),
/// stopped on drop.
pub struct Caddy {
    /// The admin API's URL.
    pub admin_url: String,
    /// Where the gateway config will serve traffic.
    pub listen: String,
    /// Where it will serve the health route.
    pub health_listen: String,
    child: std::process::Child,
    _home: tempfile::TempDir,
}

impl Caddy {
    /// Starts Caddy with an empty config (admin API only, on the first port;
    /// the gateway config will serve traffic and health on the others) and
    /// waits for it.
    pub async fn start([admin, listen, health]: [u16; 3]) -> anyhow::Result<Self> {
        let home = tempfile::tempdir()?;
        let admin = format!("127.0.0.1:{admin}");
        let config = home.path().join("caddy.json");
        let initial = json!({"admin": {"listen": admin, "config": {"persist": false}}});
        std::fs::write(&config, initial.to_string())?;
        let log = std::fs::File::create(home.path().join("caddy.log"))?;
        let child = Command::new("caddy")
            .args(["run", "--config"])
            .arg(&config)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path())
            .env("XDG_DATA_HOME", home.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting caddy (apt-get install caddy)")?;
        let caddy = Self {
            admin_url: format!("http://{admin}"),
            listen: format!("127.0.0.1:{listen}"),
            health_listen: format!("127.0.0.1:{health}"),
            child,
            _home: home,
        };
        let client = reqwest::Client::new();
        let url = format!("{}/config/", caddy.admin_url);
        eventually("Caddy's admin API", Duration::from_secs(20), async || {
            let answer = client.get(&url).send().await;
            Ok(answer.is_ok_and(|r| r.status().is_success()))
        })
        .await?;
        Ok(caddy)
    }

    /// The config Caddy runs now.
    pub async fn running(&self) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/config/", self.admin_url);
        Ok(reqwest::get(url).await?.json().await?)
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
