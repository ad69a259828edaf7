//! TLS material: dev certificates created on first run (rcgen), and the mTLS server config.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files of a dev certificate set under one directory.
#[derive(Debug, Clone)]
pub struct DevCertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl DevCertPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    fn all(&self) -> [&PathBuf; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// Creates a dev CA, a server certificate (SAN localhost, 127.0.0.1, ::1) and a client
/// certificate (CN `client_name`) in `dir`, unless a server certificate already exists there.
/// Returns true when it created them.
pub fn ensure_dev_certs(dir: &Path, client_name: &str) -> Result<bool, TlsError> {
    let paths = DevCertPaths::in_dir(dir);
    if paths.server_cert.exists() && paths.server_key.exists() && paths.ca_cert.exists() {
        return Ok(false);
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let set = generate_dev_certs(client_name)?;
    write_file(&paths.ca_cert, &set.ca_cert, 0o644)?;
    write_file(&paths.ca_key, &set.ca_key, 0o600)?;
    write_file(&paths.server_cert, &set.server_cert, 0o644)?;
    write_file(&paths.server_key, &set.server_key, 0o600)?;
    write_file(&paths.client_cert, &set.client_cert, 0o644)?;
    write_file(&paths.client_key, &set.client_key, 0o600)?;
    debug_assert!(paths.all().iter().all(|path| path.exists()));
    Ok(true)
}

/// Signs one more client certificate with the dev CA in `dir` (e.g. for another service).
pub fn issue_client_cert(
    dir: &Path,
    client_name: &str,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let paths = DevCertPaths::in_dir(dir);
    let ca_pem = read_string(&paths.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read_string(&paths.ca_key)?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let cert = client_params(client_name)?.signed_by(&key, &issuer)?;
    fs::create_dir_all(out_dir).map_err(|source| TlsError::Write {
        path: out_dir.to_owned(),
        source,
    })?;
    let cert_path = out_dir.join(format!("{client_name}.pem"));
    let key_path = out_dir.join(format!("{client_name}.key"));
    write_file(&cert_path, &cert.pem(), 0o644)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    Ok((cert_path, key_path))
}

/// PEM text of a freshly generated dev certificate set.
pub struct DevCertSet {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// Generates a CA, a server certificate and a client certificate, all in memory.
pub fn generate_dev_certs(client_name: &str) -> Result<DevCertSet, TlsError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = distinguished_name("sluice dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut server_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    server_params.distinguished_name = distinguished_name("sluice server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    debug_assert!(
        server_params
            .subject_alt_names
            .iter()
            .any(|san| matches!(san, SanType::IpAddress(_)))
    );
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &ca)?;

    let client_key = KeyPair::generate()?;
    let client_cert = client_params(client_name)?.signed_by(&client_key, &ca)?;

    Ok(DevCertSet {
        ca_cert: ca.pem(),
        ca_key: ca_key_pem,
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

fn client_params(client_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = distinguished_name(client_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "sluice");
    name
}

/// The server's mTLS configuration: its identity plus the CA that client certificates must
/// chain to. Client certificates are required.
pub fn server_tls_config(config: &Config) -> Result<ServerTlsConfig, TlsError> {
    let cert = read_string(&config.tls_cert_path())?;
    let key = read_string(&config.tls_key_path())?;
    let client_ca = read_string(&config.tls_client_ca_path())?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(client_ca))
        .client_auth_optional(false))
}

pub fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_created_once_with_private_keys_unreadable_by_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ensure_dev_certs(dir.path(), "client").expect("creates"));
        assert!(!ensure_dev_certs(dir.path(), "client").expect("keeps"));
        let paths = DevCertPaths::in_dir(dir.path());
        for path in paths.all() {
            assert!(path.exists(), "{} exists", path.display());
        }
        let mode = fs::metadata(&paths.server_key).expect("meta").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
    }

    #[test]
    fn another_client_certificate_can_be_issued_from_the_dev_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_dev_certs(dir.path(), "client").expect("creates");
        let (cert, key) = issue_client_cert(dir.path(), "billing", dir.path()).expect("issues");
        assert!(
            read_string(&cert)
                .expect("cert")
                .contains("BEGIN CERTIFICATE")
        );
        assert!(read_string(&key).expect("key").contains("PRIVATE KEY"));
    }
}
