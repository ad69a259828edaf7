//! Health (grpc.health.v1) follows the database and the buffer; reflection lists every service;
//! the private PostgreSQL cluster starts, survives a restart of sluice, is stopped with it, and
//! is left running by a one-shot job that found it running.

mod common;

use std::time::{Duration, Instant};

use common::{ServerSpec, TestServer, event, wait_for_status};
use sluice::{proto::IngestRequest, store::EmbeddedPostgres};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cluster_starts_without_database_url_and_health_follows_its_outage() {
    common::init_crypto();
    let server = TestServer::start(ServerSpec::default()).await;
    let data_dir = server.dir_path().join("data");
    assert!(
        data_dir.join("postgres/PG_VERSION").exists(),
        "initdb ran under the data dir"
    );
    wait_for_status(&server, ServingStatus::Serving).await;

    let mut client = server.ingest_client().await;
    let response = client
        .publish(IngestRequest {
            events: vec![event("embedded", "before outage")],
            sequence: 0,
        })
        .await;
    assert_eq!(response.expect("publish").into_inner().accepted, 1);

    // Stop the cluster under the server's feet: health goes NOT_SERVING, then back.
    let cluster = EmbeddedPostgres::start(&data_dir).expect("attach to the running cluster");
    cluster.stop().expect("stop PostgreSQL");
    wait_for_status(&server, ServingStatus::NotServing).await;
    // During the outage an event is still acknowledged: the circuit opens and it is spooled.
    let during = client
        .publish(IngestRequest {
            events: vec![event("embedded", "during outage")],
            sequence: 0,
        })
        .await;
    assert_eq!(
        during.expect("publish during outage").into_inner().accepted,
        1
    );
    // Back up, with no traffic at all: the replayer's probe closes the circuit, health recovers
    // and the spooled event reaches PostgreSQL.
    let cluster = EmbeddedPostgres::start(&data_dir).expect("restart PostgreSQL");
    wait_for_status(&server, ServingStatus::Serving).await;
    let mut query = server.query_client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = sluice::proto::QueryRequest {
            message_contains: "during outage".to_owned(),
            ..Default::default()
        };
        if !query
            .query(request)
            .await
            .expect("query")
            .into_inner()
            .events
            .is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spooled event not replayed:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let response = client
        .publish(IngestRequest {
            events: vec![event("embedded", "after outage")],
            sequence: 0,
        })
        .await;
    assert_eq!(
        response
            .expect("publish after recovery")
            .into_inner()
            .accepted,
        1
    );

    // A clean stop of sluice stops its cluster.
    server.terminate();
    let mut server = server;
    assert!(server.wait(Duration::from_secs(60)).success());
    assert!(
        !data_dir.join("postgres/postmaster.pid").exists(),
        "PostgreSQL still running after sluice stopped:\n{}",
        server.logs()
    );

    // A new sluice on the same data dir finds the events again.
    let spec = ServerSpec {
        dir: Some(server.dir_path().to_owned()),
        ..ServerSpec::default()
    };
    let restarted = TestServer::start(spec).await;
    wait_for_status(&restarted, ServingStatus::Serving).await;

    // A one-shot job on the same data dir uses the running cluster and leaves it running.
    let job = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["lifecycle", "--once"])
        .env_remove("DATABASE_URL")
        .env("SLUICE_DATA_DIR", &data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice lifecycle");
    assert!(
        job.status.success(),
        "{}",
        String::from_utf8_lossy(&job.stderr)
    );
    assert!(
        data_dir.join("postgres/postmaster.pid").exists(),
        "the job stopped the server's PostgreSQL"
    );
    let mut client = restarted.ingest_client().await;
    let after_job = client
        .publish(IngestRequest {
            events: vec![event("embedded", "after the job")],
            sequence: 0,
        })
        .await;
    assert_eq!(after_job.expect("publish").into_inner().accepted, 1);
    let url = cluster.url();
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE service = 'embedded'")
        .fetch_one(&mut connection)
        .await
        .expect("count");
    assert_eq!(
        stored, 4,
        "before, during and after the outage, and after the job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_every_service() {
    common::init_crypto();
    let database = common::TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let channel = server.channel().await;

    use tonic_reflection::pb::{v1, v1alpha};
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1")
        .into_inner();
    let Some(Ok(v1::ServerReflectionResponse {
        message_response:
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)),
        ..
    })) = responses.next().await
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in [
        "sluice.v1.IngestService",
        "sluice.v1.QueryService",
        "opentelemetry.proto.collector.logs.v1.LogsService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} listed in {names:?}"
        );
    }
    assert!(
        !names.iter().any(|name| name.contains("TraceService")),
        "only the services served are listed: {names:?}"
    );

    let mut alpha_client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "sluice.v1.IngestService".to_owned(),
            ),
        ),
    };
    let mut responses = alpha_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha")
        .into_inner();
    let response = responses.next().await.expect("response").expect("ok");
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}
