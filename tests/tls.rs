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
