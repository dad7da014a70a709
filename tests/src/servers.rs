//! Private servers for tests that restart them: a PostgreSQL cluster and a tansu
//! broker of their own, so restarting them cannot disturb tests running in parallel.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::certs::{TestCa, Usage};

/// A free loopback port (free when asked; the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `N` distinct free loopback ports (held together while chosen, so two calls
/// of [`free_port`] cannot hand out the same one twice).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let held = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool as the cluster owner (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        command
    } else {
        Command::new(bin.join(tool))
    }
}

pub(crate) fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// A PostgreSQL cluster of its own (wal_level=logical, trust auth on loopback).
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    /// Port it listens on.
    pub port: u16,
    /// The CA that signed the server certificate, when started with TLS.
    pub ca_file: Option<PathBuf>,
}

impl PrivatePostgres {
    /// Initialises and starts a new cluster with superuser `changewire`.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false, "")
    }

    /// Like [`PrivatePostgres::start`], with `settings` (postgresql.conf lines) added
    /// last so they override the defaults.
    pub fn start_configured(settings: &str) -> anyhow::Result<Self> {
        Self::start_with(false, settings)
    }

    /// Like [`PrivatePostgres::start`], but accepting only TLS connections, with a
    /// server certificate for 127.0.0.1 signed by a test CA ([`PrivatePostgres::ca_file`]).
    pub fn start_with_tls() -> anyhow::Result<Self> {
        Self::start_with(true, "")
    }

    fn start_with(tls: bool, extra_settings: &str) -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (run scripts/stack install)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").is_file())
            .max()
            .context("no initdb under /usr/lib/postgresql")?;
        let dir = tempfile::Builder::new().prefix("cw-pg").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            )?;
        }
        let mut initdb = pg_command(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "changewire", "--auth=trust", "-E", "UTF8"]);
        run(initdb, "initdb")?;
        let port = free_port()?;
        let settings = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n",
            dir.path().display()
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&settings);
        let ca_file = if tls {
            let ca = TestCa::new(dir.path())?;
            ca.issue("server", Usage::Server, &data)?;
            // PostgreSQL refuses a key others can read.
            let mut chmod = Command::new("chmod");
            chmod.arg("600").arg(data.join("server.key"));
            run(chmod, "chmod")?;
            let ca = ca.cert;
            // verify-full in pgwire-replication needs a host name: serve `localhost`.
            text.push_str(
                "listen_addresses = 'localhost'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(
                data.join("pg_hba.conf"),
                "hostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n\
                 hostssl all all ::1/128 trust\nhostssl replication all ::1/128 trust\n",
            )?;
            Some(ca)
        } else {
            None
        };
        text.push_str(extra_settings);
        text.push('\n');
        std::fs::write(&conf, text)?;
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(&data);
            run(chown, "chown")?;
        }
        let postgres = Self {
            bin,
            data,
            _dir: dir,
            port,
            ca_file,
        };
        postgres.pg_ctl(&["start", "-w", "-t", "60", "-l"], true)?;
        Ok(postgres)
    }

    /// URL of database `db` (by host name with TLS, which verify-full checks).
    pub fn url(&self, db: &str) -> String {
        let host = if self.ca_file.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("postgres://changewire@{host}:{}/{db}", self.port)
    }

    /// Restarts the server (fast shutdown: sessions are terminated).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60", "-l"], true)
    }

    fn pg_ctl(&self, args: &[&str], with_log: bool) -> anyhow::Result<()> {
        let mut command = pg_command(&self.bin, "pg_ctl");
        command.arg("-D").arg(&self.data).args(args);
        if with_log {
            command.arg(self.data.join("server.log"));
        }
        run(command, "pg_ctl")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"], false);
    }
}

/// A tansu broker of its own on the libsql engine: its data survives restarts.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    child: Option<Child>,
    engine: &'static str,
    /// Port it listens on.
    pub port: u16,
}

impl PrivateBroker {
    /// Starts a broker that keeps its data on disk (survives [`Self::stop`]) and
    /// waits until it listens.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("sqlite://tansu.db")
    }

    /// Starts a broker that keeps its data in memory (faster; lost on stop).
    pub fn start_in_memory() -> anyhow::Result<Self> {
        Self::start_with("memory://tansu/")
    }

    fn start_with(engine: &'static str) -> anyhow::Result<Self> {
        let mut broker = Self {
            dir: tempfile::Builder::new().prefix("cw-tansu").tempdir()?,
            child: None,
            engine,
            port: free_port()?,
        };
        broker.resume()?;
        Ok(broker)
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a frozen broker go on (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the broker is not running")?;
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Bootstrap list of this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGKILL).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_binary()?)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu resolves the sqlite path against its working directory.
            .args(["--storage-engine", self.engine])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tansu")?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("tansu did not listen on {} within 30 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn tansu_binary() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("tansu"))
        .chain(std::iter::once(Path::new(&home).join(".cargo/bin/tansu")))
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("tansu is not installed (run scripts/stack install)")
}
