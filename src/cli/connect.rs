//! How the client subcommands reach a server: address, mTLS files and an optional bearer
//! token, from flags or `SLUICE_*` variables, with defaults that work against a local server
//! started from this directory (its dev certificates under `certs/`).

use std::path::PathBuf;

use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad address {addr}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the token is not valid in a gRPC header")]
    Token,
}

/// How to reach the server.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(long, env = "SLUICE_ADDR", default_value = "https://localhost:50051")]
    pub addr: String,
    /// CA that signed the server certificate.
    #[arg(long, env = "SLUICE_CA", default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// Client certificate and key for mTLS.
    #[arg(long, env = "SLUICE_CERT", default_value = "certs/client.pem")]
    pub cert: PathBuf,
    #[arg(long, env = "SLUICE_KEY", default_value = "certs/client.key")]
    pub key: PathBuf,
    /// Bearer token (JWT), sent as `authorization: Bearer …` on every call.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Name the server certificate must hold (default: `localhost`, as the dev certificates).
    #[arg(long, env = "SLUICE_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// Use plaintext (for a server started with --insecure-plaintext).
    #[arg(long)]
    pub plaintext: bool,
}

impl ConnectArgs {
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let addr = &self.addr;
        let mut endpoint =
            Channel::from_shared(addr.clone()).map_err(|error| ConnectError::Address {
                addr: addr.clone(),
                reason: error.to_string(),
            })?;
        if !self.plaintext {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| ConnectError::Read {
                    path: path.clone(),
                    source,
                })
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&self.ca)?))
                .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
                .domain_name(self.server_name.clone());
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint)
    }

    pub async fn channel(&self) -> Result<Channel, ConnectError> {
        Ok(self.endpoint()?.connect().await?)
    }

    /// `message` as a request carrying the token, when there is one.
    pub fn request<T>(&self, message: T) -> Result<Request<T>, ConnectError> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| ConnectError::Token)?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}
