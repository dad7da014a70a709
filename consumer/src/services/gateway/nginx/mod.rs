//! The nginx gateway: render the whole config ([`render`]), check it with
//! `nginx -t`, swap it in atomically, reload, probe the health route until the
//! workers run it, and roll back to the last good config if they do not.
//!
//! `nginx -t` refusing a candidate names a line; the resource that wrote it is
//! left out (with nginx's message) and the rest is tried again, so one bad
//! resource never keeps the others from being served.

pub mod render;

use std::path::{Path, PathBuf};

use changewire_schemas::settings::ConfigError;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::apply::{Applied, Applier, ApplyError, ApplyResult, HealthProbe, Secrets, Trigger};
use super::desired::{Plan, Rejection};
use render::{render, Layout, Rendered};

/// Most resources left out of one apply on `nginx -t`'s word.
const MAX_REFUSED: usize = 20;

/// The `[gateway.nginx]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxConfig {
    /// The nginx binary.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// nginx's prefix directory, owned by the gateway service: `nginx.conf`,
    /// `nginx.conf.last-good`, the pid file, logs, temporary files.
    pub dir: PathBuf,
    /// Where traffic is served (`0.0.0.0:80`, `127.0.0.1:8080`).
    pub listen: String,
    /// Where the health route is served (loopback: the probe asks it).
    pub health_listen: std::net::SocketAddr,
    /// Start nginx when it is not running (else an apply waits for it).
    #[serde(default = "yes")]
    pub start: bool,
    /// How long the workers have to serve a new config after a reload.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
}

fn default_binary() -> PathBuf {
    "nginx".into()
}

fn yes() -> bool {
    true
}

fn default_probe_timeout_ms() -> u64 {
    10_000
}

/// Applies plans to a local nginx.
pub struct NginxGateway {
    config: NginxConfig,
    layout: Layout,
    secrets: Secrets,
    probe: HealthProbe,
    /// The text of the config this process last saw the workers serve.
    served: std::sync::Mutex<Option<String>>,
}

impl NginxGateway {
    /// The gateway `config` describes; API keys are read from `secrets`.
    pub fn new(config: &NginxConfig, secrets: Secrets) -> Result<Self, ConfigError> {
        let invalid =
            |e: &dyn std::fmt::Display| ConfigError::invalid("gateway.nginx", e.to_string());
        for dir in ["empty", "tmp"] {
            std::fs::create_dir_all(config.dir.join(dir)).map_err(|e| invalid(&e))?;
        }
        let probe = HealthProbe::new(config.health_listen, config.probe_timeout_ms)
            .map_err(|e| invalid(&e))?;
        let layout = Layout {
            listen: config.listen.clone(),
            health_listen: config.health_listen.to_string(),
            dir: config.dir.clone(),
        };
        Ok(Self {
            config: config.clone(),
            layout,
            secrets,
            probe,
            served: std::sync::Mutex::default(),
        })
    }

    fn live(&self) -> PathBuf {
        self.config.dir.join("nginx.conf")
    }

    fn candidate(&self) -> PathBuf {
        self.config.dir.join("nginx.conf.candidate")
    }

    fn last_good(&self) -> PathBuf {
        self.config.dir.join("nginx.conf.last-good")
    }

    /// Runs nginx with `args` on the config at `config`; its complaint if it fails.
    async fn nginx(&self, args: &[&str], config: &Path) -> Result<Result<(), String>, ApplyError> {
        let output = Command::new(&self.config.binary)
            .arg("-p")
            .arg(&self.config.dir)
            .arg("-c")
            .arg(config)
            .args(args)
            .output()
            .await
            .map_err(|e| {
                ApplyError::Unavailable(format!("cannot run {}: {e}", self.config.binary.display()))
            })?;
        if output.status.success() {
            return Ok(Ok(()));
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Ok(Err(stderr
            .lines()
            .find(|l| l.contains("[emerg]") || l.contains("[alert]") || l.contains("[error]"))
            .unwrap_or(stderr.trim())
            .to_owned()))
    }

    /// Renders `plan` and has `nginx -t` check it, leaving out each resource it
    /// refuses; the accepted candidate (written), and every resource left out.
    async fn checked_candidate(
        &self,
        plan: &Plan,
    ) -> Result<Result<(Rendered, Vec<Rejection>), String>, ApplyError> {
        let mut plan = plan.clone();
        let mut refused = Vec::new();
        loop {
            let rendered = render(&plan, &self.layout, &self.secrets);
            std::fs::write(self.candidate(), &rendered.text).map_err(ApplyError::Io)?;
            let complaint = match self.nginx(&["-t", "-q"], &self.candidate()).await? {
                Ok(()) => {
                    refused.extend(rendered.rejected.clone());
                    return Ok(Ok((rendered, refused)));
                }
                Err(complaint) => complaint,
            };
            let line = complaint
                .rsplit_once("nginx.conf.candidate:")
                .and_then(|(_, rest)| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                });
            let owner = line.and_then(|l| rendered.owner(l)).cloned();
            let Some(owner) = owner.filter(|_| refused.len() < MAX_REFUSED) else {
                return Ok(Err(format!("nginx -t refused the config: {complaint}")));
            };
            let reason = format!(
                "nginx -t: {}",
                complaint.replace(&*self.candidate().to_string_lossy(), "nginx.conf")
            );
            refused.push(Rejection {
                resource: owner.clone(),
                reason,
            });
            let (replanned, dangling) = plan.without(&owner);
            refused.extend(dangling);
            plan = replanned;
        }
    }

    /// Has the running nginx load the live config, starting nginx if it is not
    /// running.
    async fn reload(&self) -> Result<(), ApplyError> {
        if self.nginx(&["-s", "reload"], &self.live()).await?.is_ok() {
            return Ok(());
        }
        if !self.config.start {
            return Err(ApplyError::Unavailable(
                "nginx is not running (and gateway.nginx.start is false)".into(),
            ));
        }
        self.nginx(&[], &self.live())
            .await?
            .map_err(|e| ApplyError::Unavailable(format!("nginx does not start: {e}")))
    }

    /// Puts the last good config back and waits for nginx to run it.
    async fn roll_back(&self, why: String) -> Result<Applied, ApplyError> {
        let restored = std::fs::read_to_string(self.last_good()).ok();
        let message = match restored {
            Some(text) => {
                std::fs::rename(self.last_good(), self.live()).map_err(ApplyError::Io)?;
                self.reload().await?;
                let digest = text
                    .lines()
                    .nth(1)
                    .and_then(|l| l.strip_prefix("# config "))
                    .unwrap_or_default()
                    .to_owned();
                match self.probe.wait_for(&digest).await {
                    Ok(()) => format!("{why}; rolled back to config {digest}"),
                    Err(e) => format!(
                        "{why}; rolled back to config {digest}, which is not answering either: {e}"
                    ),
                }
            }
            None => format!("{why}; there was no earlier config to roll back to"),
        };
        tracing::error!(%message, "nginx rolled back");
        Ok(Applied {
            result: ApplyResult::RolledBack,
            message: Some(message),
            rejected: Vec::new(),
            config: String::new(),
        })
    }
}

impl Applier for NginxGateway {
    async fn apply(&self, plan: &Plan, trigger: Trigger) -> Result<Applied, ApplyError> {
        let (rendered, rejected) = match self.checked_candidate(plan).await? {
            Ok(checked) => checked,
            Err(message) => {
                return Ok(Applied {
                    result: ApplyResult::Failed,
                    message: Some(message),
                    rejected: Vec::new(),
                    config: String::new(),
                })
            }
        };
        let live = std::fs::read_to_string(self.live()).ok();
        if live.as_deref() == Some(rendered.text.as_str())
            && self.probe.serves(&rendered.digest).await.is_ok()
        {
            return Ok(Applied {
                result: ApplyResult::Unchanged,
                message: None,
                rejected,
                config: rendered.digest,
            });
        }
        let drifted = live.is_some() && trigger == Trigger::DriftCheck;
        if let Some(live) = &live {
            // Only a config nginx accepts is worth going back to; the one this
            // process saw served needs no second check.
            let known = self
                .served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                == Some(live.as_str());
            if known || self.nginx(&["-t", "-q"], &self.live()).await?.is_ok() {
                std::fs::write(self.last_good(), live).map_err(ApplyError::Io)?;
            }
        }
        std::fs::rename(self.candidate(), self.live()).map_err(ApplyError::Io)?;
        self.reload().await?;
        if let Err(why) = self.probe.wait_for(&rendered.digest).await {
            return self.roll_back(why).await;
        }
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = Some(rendered.text);
        let message =
            drifted.then(|| "the running config differed from the desired one".to_owned());
        Ok(Applied {
            result: if drifted {
                ApplyResult::DriftRepaired
            } else {
                ApplyResult::Applied
            },
            message,
            rejected,
            config: rendered.digest,
        })
    }
}
