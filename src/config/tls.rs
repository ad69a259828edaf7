//! `[tls]`: mTLS of the gRPC listener (on by default, with dev certificates on first run).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve plaintext HTTP/2 without TLS. For local development only; logged loudly.
    pub insecure_plaintext: bool,
    /// Where dev certificates are created on first run when the paths below are unset.
    #[default(PathBuf::from("certs"))]
    pub cert_dir: PathBuf,
    /// Server certificate chain (PEM). Default: `cert_dir/server.pem`.
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Default: `cert_dir/server.key`.
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to. Default: `cert_dir/ca.pem`.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Server certificate path.
    pub fn cert_path(&self) -> PathBuf {
        self.cert
            .clone()
            .unwrap_or_else(|| self.cert_dir.join("server.pem"))
    }

    /// Server key path.
    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.cert_dir.join("server.key"))
    }

    /// Client CA path.
    pub fn client_ca_path(&self) -> PathBuf {
        self.client_ca
            .clone()
            .unwrap_or_else(|| self.cert_dir.join("ca.pem"))
    }

    /// True when every path is left to its default under `cert_dir`, so dev certificates may
    /// be created there.
    pub fn uses_dev_certs(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.client_ca.is_none()
    }
}
