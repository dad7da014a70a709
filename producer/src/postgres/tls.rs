//! TLS to PostgreSQL, with libpq's modes: the replication session (rustls, inside
//! pgwire-replication) and the catalog/snapshot sessions (native-tls) use the same
//! settings.

use std::path::{Path, PathBuf};

use changewire_schemas::settings::ConfigError;
use native_tls::{Certificate, Identity, TlsConnector};
use postgres_native_tls::MakeTlsConnector;
use serde::{Deserialize, Serialize};

use super::error::PostgresError;

/// How the server is authenticated (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// No TLS.
    #[default]
    Disable,
    /// Encrypt, but do not verify the server (open to a man in the middle).
    Require,
    /// Encrypt and verify the certificate chain, not the host name.
    VerifyCa,
    /// Encrypt and verify the chain and that it names the host.
    VerifyFull,
}

/// The `[postgres.tls]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// How the server is authenticated.
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM file of the CA(s) to trust; with it only these are trusted, without it
    /// the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for certificate authentication.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM (PKCS#8) key of the client certificate.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl TlsSettings {
    /// Checks the files exist and fit the mode.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(ConfigError::invalid(
                "postgres.tls",
                "client_cert and client_key go together",
            ));
        }
        let files = [&self.ca_file, &self.client_cert, &self.client_key];
        for path in files.into_iter().flatten() {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    "postgres.tls",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        if self.mode == TlsMode::Disable && files.iter().any(|f| f.is_some()) {
            return Err(ConfigError::invalid(
                "postgres.tls.mode",
                "certificate files are set but mode is disable; use require, verify-ca or verify-full",
            ));
        }
        Ok(())
    }

    /// Settings for the replication session.
    pub fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let tls = match self.mode {
            TlsMode::Disable => return TlsConfig::disabled(),
            TlsMode::Require => TlsConfig::require(),
            TlsMode::VerifyCa => TlsConfig::verify_ca(self.ca_file.clone()),
            TlsMode::VerifyFull => TlsConfig::verify_full(self.ca_file.clone()),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => tls.with_client_cert(cert.clone(), key.clone()),
            _ => tls,
        }
    }

    /// The connector for ordinary sessions; `None` without TLS.
    pub fn connector(&self) -> Result<Option<MakeTlsConnector>, PostgresError> {
        if self.mode == TlsMode::Disable {
            return Ok(None);
        }
        let mut builder = TlsConnector::builder();
        builder
            .danger_accept_invalid_certs(self.mode == TlsMode::Require)
            .danger_accept_invalid_hostnames(self.mode != TlsMode::VerifyFull);
        if let Some(ca) = &self.ca_file {
            builder.disable_built_in_roots(true);
            for cert in read(ca)
                .and_then(|pem| Certificate::stack_from_pem(&pem).map_err(PostgresError::Tls))?
            {
                builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            builder.identity(Identity::from_pkcs8(&read(cert)?, &read(key)?)?);
        }
        Ok(Some(MakeTlsConnector::new(builder.build()?)))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PostgresError> {
    std::fs::read(path).map_err(|source| PostgresError::TlsFile {
        path: path.to_owned(),
        source,
    })
}
