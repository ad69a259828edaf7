//! TLS material: dev certificates created on first run (rcgen), and the mTLS server config
//! (rustls, client certificates required).

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::config::Config;

/// How long dev leaf certificates (server, clients) are valid.
const DEV_LEAF_VALIDITY: TimeDuration = TimeDuration::days(365);
/// How long the dev CA is valid.
const DEV_CA_VALIDITY: TimeDuration = TimeDuration::days(5 * 365);
/// Start-up warns when the server certificate expires sooner than this.
const EXPIRY_WARNING: TimeDuration = TimeDuration::days(30);

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
    #[error("cannot parse {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
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
    set_validity(&mut ca_params, DEV_CA_VALIDITY);
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
    set_validity(&mut server_params, DEV_LEAF_VALIDITY);
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
    set_validity(&mut params, DEV_LEAF_VALIDITY);
    Ok(params)
}

/// Valid from a day ago (clock skew) for `validity`.
fn set_validity(params: &mut CertificateParams, validity: TimeDuration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::days(1);
    params.not_after = now + validity;
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "sluice");
    name
}

/// The server's mTLS configuration: its identity plus the CA that client certificates must
/// chain to. Client certificates are required; ALPN offers HTTP/2 only.
pub fn server_tls_config(config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&config.tls.cert_path())?;
    let key_path = config.tls.key_path();
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Pem {
        path: key_path,
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&config.tls.client_ca_path())? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    if let Some(certificate) = certs.first() {
        warn_if_expiring(certificate, &config.tls.cert_path());
    }
    let mut server = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// `grpc`'s mTLS configuration for an HTTP/1.1 port (OTLP/HTTP): the same identity and client
/// verification, with ALPN offering HTTP/1.1.
pub fn for_http1(grpc: &ServerConfig) -> Arc<ServerConfig> {
    let mut http1 = grpc.clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(http1)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Logs a warning when the certificate expires within [`EXPIRY_WARNING`] (or already has).
fn warn_if_expiring(certificate: &CertificateDer<'_>, path: &Path) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else {
        return;
    };
    let expires = parsed.validity().not_after.to_datetime();
    let left = expires - OffsetDateTime::now_utc();
    if left < EXPIRY_WARNING {
        tracing::warn!(
            certificate = %path.display(),
            expires = %expires,
            days_left = left.whole_days(),
            "the server certificate expires soon; renew it (dev certificates: delete the cert dir to recreate them)"
        );
    }
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

    #[test]
    fn dev_leaf_certificates_live_a_year_not_centuries() {
        let set = generate_dev_certs("client").expect("generates");
        for pem in [&set.server_cert, &set.client_cert] {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
            let validity = parsed.validity();
            let lifetime = validity.not_after.to_datetime() - validity.not_before.to_datetime();
            assert!((365..=367).contains(&lifetime.whole_days()), "{lifetime:?}");
        }
    }
}
