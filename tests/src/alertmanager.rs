//! A private Prometheus Alertmanager (the Debian package's binary): one receiver,
//! a webhook to a URL the test serves, grouping by alert name with short waits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::servers::free_port;

/// An Alertmanager of its own.
pub struct Alertmanager {
    dir: tempfile::TempDir,
    child: Child,
    /// Its base URL (`http://127.0.0.1:<port>`).
    pub url: String,
}

impl Alertmanager {
    /// Starts Alertmanager notifying `webhook_url` (resolved alerts too) and
    /// waits until it is ready.
    pub async fn start(webhook_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cw-alertmanager")
            .tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: hook\n  group_by: [alertname]\n  group_wait: 200ms\n  \
                 group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n- name: hook\n  \
                 webhook_configs:\n  - url: {webhook_url:?}\n    send_resolved: true\n"
            ),
        )?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("alertmanager.log"))?;
        let child = Command::new(binary()?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting alertmanager")?;
        let alertmanager = Self {
            dir,
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", alertmanager.url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(alertmanager);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "alertmanager was not ready within 30 s: {}",
                    alertmanager.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The alerts it holds (`GET /api/v2/alerts`).
    pub async fn alerts(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let response = reqwest::get(format!("{}/api/v2/alerts", self.url)).await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// What it logged (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .flat_map(|d| ["prometheus-alertmanager", "alertmanager"].map(|b| Path::new(d).join(b)))
        .chain(std::iter::once(PathBuf::from("/usr/bin/prometheus-alertmanager")))
        .find(|p| p.is_file())
        .context("alertmanager is not installed (apt-get install prometheus-alertmanager; scripts/stack install-receivers does)")
}
