//! A private rsyslog receiver: a TCP listener and, with TLS files, a TLS listener
//! (RFC 5425) that requires a client certificate signed by the test CA. Every
//! message is written as received (the RFC 5424 message without its frame), one
//! per line, to a file the test reads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::servers::free_port;

/// The TLS listener's certificate, key and the CA clients must be signed by.
pub struct ReceiverTls {
    /// The CA (PEM) client certificates must chain to.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
}

/// An rsyslogd of its own.
pub struct Rsyslog {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Port of the plain TCP listener.
    pub tcp_port: u16,
    /// Port of the TLS listener, when started with TLS.
    pub tls_port: Option<u16>,
}

impl Rsyslog {
    /// Starts rsyslogd (plus a TLS listener with `tls`) and waits until it listens.
    pub fn start(tls: Option<ReceiverTls>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cw-rsyslog").tempdir()?;
        let tcp_port = free_port()?;
        let tls_port = tls.as_ref().map(|_| free_port()).transpose()?;
        let received = dir.path().join("received.log");
        let mut config = format!(
            "global(workDirectory={work:?} maxMessageSize=\"64k\"{tls_files})\n\
             module(load=\"imtcp\" maxSessions=\"200\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
             ruleset(name=\"store\") {{ action(type=\"omfile\" file={received:?} template=\"raw\") }}\n\
             input(type=\"imtcp\" port=\"{tcp_port}\" ruleset=\"store\")\n",
            work = dir.path(),
            tls_files = tls.as_ref().map_or_else(String::new, |t| format!(
                " defaultNetstreamDriverCAFile={:?} defaultNetstreamDriverCertFile={:?} defaultNetstreamDriverKeyFile={:?}",
                t.ca, t.cert, t.key
            )),
        );
        if let Some(port) = tls_port {
            config.push_str(&format!(
                "input(type=\"imtcp\" port=\"{port}\" ruleset=\"store\" streamDriver.name=\"gtls\" \
                 streamDriver.mode=\"1\" streamDriver.authMode=\"x509/certvalid\")\n"
            ));
        }
        std::fs::write(dir.path().join("rsyslog.conf"), config)?;
        let mut receiver = Self {
            dir,
            child: None,
            tcp_port,
            tls_port,
        };
        receiver.resume()?;
        Ok(receiver)
    }

    /// Stops it (SIGKILL): the ports refuse connections until [`Self::resume`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same ports and file.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("rsyslogd.log"))?;
        let child = Command::new(rsyslogd()?)
            .arg("-n")
            .arg("-f")
            .arg(self.dir.path().join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.path().join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting rsyslogd")?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for port in std::iter::once(self.tcp_port).chain(self.tls_port) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "rsyslogd did not listen on {port} within 30 s: {}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The messages received so far, in arrival order.
    pub fn messages(&self) -> anyhow::Result<Vec<String>> {
        match std::fs::read_to_string(self.dir.path().join("received.log")) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }

    /// What rsyslogd itself reported (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn rsyslogd() -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|d| Path::new(d).join("rsyslogd"))
        .chain(std::iter::once(PathBuf::from("/usr/sbin/rsyslogd")))
        .find(|p| p.is_file())
        .context("rsyslogd is not installed (apt-get install rsyslog rsyslog-gnutls; .ci/run does)")
}
