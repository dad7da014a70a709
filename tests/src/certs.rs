//! Throwaway certificates for TLS tests, made with the `openssl` command.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::servers::run;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A server on 127.0.0.1 or localhost.
    Server,
    /// A client (TLS client authentication).
    Client,
}

/// A test certificate authority: its certificate and key in a directory.
pub struct TestCa {
    /// The CA's certificate (PEM).
    pub cert: PathBuf,
    key: PathBuf,
    dir: PathBuf,
}

fn openssl(args: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
    let mut command = Command::new("openssl");
    command.args(args);
    for path in paths {
        command.arg(path);
    }
    run(command, "openssl")
}

impl TestCa {
    /// A new CA, valid for two days, kept in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let ca = Self {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
            dir: dir.to_owned(),
        };
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=changewire test CA",
                "-keyout",
            ],
            &[&ca.key, Path::new("-out"), &ca.cert],
        )?;
        Ok(ca)
    }

    /// Issues a certificate signed by this CA, written to `out` as `<name>.crt`
    /// and `<name>.key` (PEM, the key PKCS#8). Returns both paths.
    pub fn issue(
        &self,
        name: &str,
        usage: Usage,
        out: &Path,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = (
            out.join(format!("{name}.crt")),
            out.join(format!("{name}.key")),
        );
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        let extensions = match usage {
            Usage::Server => {
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
            }
            Usage::Client => "extendedKeyUsage=clientAuth\n",
        };
        std::fs::write(
            &ext,
            format!("{extensions}keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"),
        )?;
        let subject = match usage {
            Usage::Server => "/CN=127.0.0.1".to_owned(),
            Usage::Client => format!("/CN={name}"),
        };
        openssl(
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout",
            ],
            &[&key, Path::new("-out"), &csr],
        )?;
        openssl(
            &["x509", "-req", "-days", "2", "-CAcreateserial", "-in"],
            &[
                &csr,
                Path::new("-CA"),
                &self.cert,
                Path::new("-CAkey"),
                &self.key,
                Path::new("-extfile"),
                &ext,
                Path::new("-out"),
                &cert,
            ],
        )?;
        Ok((cert, key))
    }
}
