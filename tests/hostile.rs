//! Hostile peers: silent connections, the connection limit, TLS without HTTP/2, silent and
//! idle OTLP/HTTP connections, malformed protobuf and filter values the database cannot take.

mod common;

use std::time::{Duration, Instant};

use common::{ServerSpec, TestDatabase, TestServer, metric_sum};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic_types::StatusExt;

/// Waits until the peer closes `stream` (EOF or reset), at most `limit`; returns how long after
/// `opened` (when the connection was made) that was.
async fn closed_within(
    mut stream: TcpStream,
    opened: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(limit, stream.read(&mut byte)).await {
        Ok(Ok(0) | Err(_)) => Some(opened.elapsed()),
        Ok(Ok(_)) | Err(_) => None,
    }
}

/// A server whose connections must finish TLS and the HTTP/2 preface within `timeout`.
async fn start_with_handshake_timeout(database: &TestDatabase, timeout: &str) -> TestServer {
    TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_GRPC__HANDSHAKE_TIMEOUT", timeout),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start_with_handshake_timeout(&database, "1s").await;
    // Opening 300 connections takes a while on a loaded machine: each is timed from its own
    // connect.
    let mut silent = Vec::new();
    for _ in 0..300 {
        let opened = Instant::now();
        silent.push((
            TcpStream::connect(server.addr).await.expect("connect"),
            opened,
        ));
    }
    let closes = futures::future::join_all(
        silent
            .into_iter()
            .map(|(stream, opened)| closed_within(stream, opened, Duration::from_secs(10))),
    )
    .await;
    let closed: Vec<Duration> = closes.into_iter().flatten().collect();
    assert_eq!(closed.len(), 300, "every silent connection was closed");
    assert!(
        closed
            .iter()
            .all(|took| *took >= Duration::from_millis(500)),
        "closed by the timeout, not at once: {:?}",
        closed.iter().min()
    );
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_connections_rejected_total",
            "reason=\"handshake_timeout\""
        ) >= 300.0
    );
    // The server still serves.
    let mut client = server.ingest_client().await;
    let response = common::publish(&mut client, vec![common::event("hostile", "after")]).await;
    assert_eq!(response.accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_the_http2_preface_is_closed_after_the_handshake_timeout() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = start_with_handshake_timeout(&database, "1s").await;
    let connector =
        tokio_rustls::TlsConnector::from(common::rustls_client_config(&server.cert_dir));
    // Timed from the connect: the server's timeout runs from its accept.
    let started = Instant::now();
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("mutual TLS handshake");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte))
        .await
        .expect("closed before 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_connections_rejected_total",
            "reason=\"handshake_timeout\""
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_connections_that_stay_silent_or_idle_are_closed_after_the_handshake_timeout() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_GRPC__HANDSHAKE_TIMEOUT", "1s")
            .env("SLUICE_OTLP__HTTP_LISTEN", "127.0.0.1:0"),
    )
    .await;
    let address = server.otlp_http_addr.expect("otlp/http listener");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        common::rustls_client_config_as(&server.cert_dir, Some("client"), b"http/1.1"),
    ));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    // Silent after the handshake: no request line ever comes.
    let started = Instant::now();
    let tcp = TcpStream::connect(address).await.expect("connect");
    let mut silent = connector
        .connect(name.clone(), tcp)
        .await
        .expect("mutual TLS handshake");
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer))
        .await
        .expect("closed before 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Idle after one answered request: the kept-alive connection is not held forever.
    let tcp = TcpStream::connect(address).await.expect("connect");
    let mut idle = connector
        .connect(name, tcp)
        .await
        .expect("mutual TLS handshake");
    let body = br#"{"resourceLogs":[]}"#;
    let request = format!(
        "POST /v1/logs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut idle, request.as_bytes())
        .await
        .expect("request");
    tokio::io::AsyncWriteExt::write_all(&mut idle, body)
        .await
        .expect("body");
    // Everything the server sends until it closes: the answer, then nothing.
    let asked = Instant::now();
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open 10 s after its answer");
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert!(asked.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_new_connections_close_at_once_and_clients_are_served_once_slots_free()
 {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_GRPC__MAX_CONNECTIONS", "20")
            // Longer than this test: no silent connection frees its slot on its own.
            .env("SLUICE_GRPC__HANDSHAKE_TIMEOUT", "60s"),
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Over the limit: closed at once, long before the handshake timeout.
    for _ in 0..5 {
        let extra = TcpStream::connect(server.addr).await.expect("connect");
        let took = closed_within(extra, Instant::now(), Duration::from_secs(1))
            .await
            .expect("closed at once");
        assert!(took < Duration::from_secs(1));
    }
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_connections_rejected_total",
            "reason=\"limit\""
        ) >= 5.0
    );
    // Once the silent ones go, a real client is served.
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(15);
    let response = loop {
        let attempt = async {
            let channel = server.channel_with(Some(server.client_tls())).await.ok()?;
            let mut client =
                sluice::proto::ingest_service_client::IngestServiceClient::new(channel);
            client
                .publish(common::request(vec![common::event("hostile", "served")]))
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        if let Some(response) = attempt.await {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "never served:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(response.accepted, 1);
}

/// Sends raw bytes as gRPC messages, so that tests can send what no generated client would.
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    };

    #[derive(Debug, Default, Clone, Copy)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }
}

/// Calls a unary method with `body` as the request message.
async fn call_raw(server: &TestServer, method: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(method),
        raw::RawCodec,
    )
    .await
    .expect_err("refused")
}

fn assert_bad_request(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("BadRequest").field_violations;
    assert_eq!(violations[0].field, field, "{status:?}");
    assert!(!violations[0].description.is_empty());
}

/// A Struct nested `depth` levels deep.
fn nested_struct(depth: usize) -> prost_types::Struct {
    let mut current = prost_types::Struct::default();
    for _ in 0..depth {
        current = prost_types::Struct {
            fields: [(
                "k".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(current)),
                },
            )]
            .into(),
        };
    }
    current
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument_with_bad_request_on_every_service() {
    use prost::Message;
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let valid = common::request(vec![common::event("hostile", "ok")]).encode_to_vec();
    let deep = common::request(vec![sluice::proto::Event {
        metadata: Some(nested_struct(120).into()),
        ..common::event("hostile", "deep")
    }])
    .encode_to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 16]),
        ("truncated", valid[..valid.len() - 3].to_vec()),
        ("wrong wire type", vec![0x08, 0x01]),
        // events[0].service = "\xff": not UTF-8.
        ("invalid utf-8", vec![0x0a, 0x03, 0x12, 0x01, 0xff]),
        ("nesting past the recursion limit", deep),
    ];
    for (case, body) in &cases {
        let status = call_raw(&server, "/sluice.v1.IngestService/Publish", body.clone()).await;
        assert_bad_request(&status, "request");
        assert!(!status.message().contains("Internal"), "{case}: {status:?}");
    }
    let status = call_raw(&server, "/sluice.v1.QueryService/Query", vec![0xff; 16]).await;
    assert_bad_request(&status, "request");
    let status = call_raw(&server, "/sluice.v1.QueryService/Delete", vec![0x08, 0x01]).await;
    assert_bad_request(&status, "request");
    // OTLP's rule too: a malformed export is INVALID_ARGUMENT, which exporters drop.
    let status = call_raw(
        &server,
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        vec![0xff; 16],
    )
    .await;
    assert_bad_request(&status, "request");

    // A client stream: one good request, then garbage. The good one is stored and the
    // trailers say so.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let requests = tokio_stream::iter(vec![valid.clone(), vec![0xff; 16]]);
    let status = grpc
        .client_streaming(
            tonic::Request::new(requests),
            tonic::codegen::http::uri::PathAndQuery::from_static("/sluice.v1.IngestService/Ingest"),
            raw::RawCodec,
        )
        .await
        .expect_err("refused");
    assert_bad_request(&status, "request");
    assert_eq!(
        status
            .metadata()
            .get("sluice-accepted")
            .and_then(|value| value.to_str().ok()),
        Some("1")
    );
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'hostile'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_values_the_database_cannot_take_are_refused_by_field_without_database_text() {
    use sluice::proto::QueryRequest;
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut client = server.query_client().await;
    let with_nul = |key: &str, value: &str| prost_types::Struct {
        fields: [(
            key.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
            },
        )]
        .into(),
    };
    for metadata in [with_nul("k", "a\0b"), with_nul("k\0", "v")] {
        let status = client
            .query(QueryRequest {
                metadata_contains: Some(metadata.into()),
                ..QueryRequest::default()
            })
            .await
            .expect_err("refused");
        assert_bad_request(&status, "metadata_contains");
        assert!(!status.message().contains("database"), "{status:?}");
    }
    // Every filter field is bounded.
    let oversized = [
        QueryRequest {
            message_contains: "x".repeat(9_000),
            ..QueryRequest::default()
        },
        QueryRequest {
            user_id: "u".repeat(300),
            ..QueryRequest::default()
        },
        QueryRequest {
            services: (0..200).map(|index| format!("svc-{index}")).collect(),
            ..QueryRequest::default()
        },
        QueryRequest {
            metadata_contains: Some(nested_struct(20).into()),
            ..QueryRequest::default()
        },
        QueryRequest {
            page_token: "t".repeat(1_000),
            ..QueryRequest::default()
        },
    ];
    for request in oversized {
        let status = client.query(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    // A read request larger than grpc.max_query_message_bytes (1 MiB) is refused before it
    // is decoded.
    let huge = prost_types::Struct {
        fields: (0..100_000)
            .map(|index| {
                (
                    format!("key-{index}"),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("v".repeat(8))),
                    },
                )
            })
            .collect(),
    };
    let status = client
        .query(QueryRequest {
            metadata_contains: Some(huge.into()),
            ..QueryRequest::default()
        })
        .await
        .expect_err("refused");
    assert_bad_request(&status, "request");
}
