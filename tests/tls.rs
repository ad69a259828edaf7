//! Secure by default: the server speaks mTLS only, and refuses clients without a certificate
//! from its CA, and plaintext.

mod common;

use common::{ServerSpec, TestDatabase, TestServer, event};
use sluice::proto::{IngestRequest, ingest_service_client::IngestServiceClient};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

async fn publish_fails(server: &TestServer, tls: Option<ClientTlsConfig>) -> bool {
    let Ok(channel) = server.channel_with(tls).await else {
        return true;
    };
    let request = IngestRequest {
        events: vec![event("tls", "must not be stored")],
        sequence: 0,
    };
    IngestServiceClient::new(channel)
        .publish(request)
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_or_without_tls_cannot_connect() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let ca = std::fs::read(server.cert_dir.join("ca.pem")).expect("ca");

    // The dev client certificate works.
    assert!(
        !publish_fails(&server, Some(server.client_tls())).await,
        "mTLS client is served"
    );

    // TLS but no client certificate.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost");
    assert!(
        publish_fails(&server, Some(no_cert)).await,
        "no client certificate is refused"
    );

    // A client certificate from another CA.
    let other = sluice::tls::generate_dev_certs("intruder").expect("other CA");
    let foreign = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(other.client_cert, other.client_key))
        .domain_name("localhost");
    assert!(
        publish_fails(&server, Some(foreign)).await,
        "a certificate from another CA is refused"
    );

    // An expired client certificate signed by the right CA.
    let (expired_cert, expired_key) = expired_client_certificate(&server.cert_dir);
    let expired = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(expired_cert, expired_key))
        .domain_name("localhost");
    assert!(
        publish_fails(&server, Some(expired)).await,
        "an expired certificate is refused"
    );

    // Plaintext HTTP/2.
    assert!(publish_fails(&server, None).await, "plaintext is refused");

    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'tls'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_needs_the_explicit_flag_and_is_logged_loudly() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server =
        TestServer::start(ServerSpec::with_database(&database.url).arg("--insecure-plaintext"))
            .await;
    assert!(
        !publish_fails(&server, None).await,
        "plaintext served when asked for"
    );
    assert!(server.logs().contains("TLS IS DISABLED"));
    assert!(
        !server.cert_dir.join("server.key").exists(),
        "no certificates needed in plaintext mode"
    );
}

/// A client certificate from the server's dev CA that expired yesterday.
fn expired_client_certificate(cert_dir: &std::path::Path) -> (String, String) {
    let read = |name: &str| std::fs::read_to_string(cert_dir.join(name)).expect("read");
    let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")).expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "expired");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}
