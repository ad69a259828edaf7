//! OpenTelemetry logs in, against the real server and PostgreSQL: the stock OpenTelemetry
//! Python SDK (logging handler, batch processor, OTLP/gRPC exporter with mTLS) sends to
//! sluice unchanged and every record is stored once, found by its user and its trace; stock
//! exporters retry sluice's UNAVAILABLE + RetryInfo by themselves; a tonic OTLP client sends
//! zstd, a compression bomb, every AnyValue kind and records refused for good. OTLP/HTTP: the
//! stock Python SDK's HTTP exporter, and an HTTPS client sending OTLP/JSON and compressed
//! protobuf, bombs, malformed bodies, and requests refused for rights or a full buffer.

mod common;

use std::{process::Command, time::Duration};

use common::{ServerSpec, TestDatabase, TestServer, issue_certificate, metric_sum, query_all};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};
use sluice::proto::QueryRequest;
use tonic::{Code, codec::CompressionEncoding, transport::Channel};

/// Runs `tests/otel/emit_logs.py` (the stock Python SDK) against `server` with `env`.
fn emit_logs(server: &TestServer, env: &[(&str, &str)]) -> serde_json::Value {
    let python = std::env::var("TEST_SLUICE_PYTHON")
        .expect("TEST_SLUICE_PYTHON is unset: run the suite with scripts/test");
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/otel/emit_logs.py"
        ))
        .env("SLUICE_ADDR", format!("localhost:{}", server.addr.port()))
        .env("SLUICE_CERTS", &server.cert_dir)
        // requests lets these override the exporter's own `certificate_file`.
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .envs(env.iter().copied())
        .output()
        .expect("run the OpenTelemetry SDK");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "emit_logs.py failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("json report")
}

fn string(text: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(text.to_owned())),
    })
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// One resource (`service.name` = `service`) holding `records`.
fn logs_request(service: &str, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![attribute(
                    "service.name",
                    any_value::Value::StringValue(service.to_owned()),
                )],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    }
}

fn record_now(body: &str) -> LogRecord {
    let now = chrono::Utc::now();
    LogRecord {
        time_unix_nano: now.timestamp_nanos_opt().unwrap_or_default() as u64,
        severity_number: 9,
        severity_text: "INFO".to_owned(),
        body: string(body),
        ..Default::default()
    }
}

async fn logs_client(server: &TestServer) -> LogsServiceClient<Channel> {
    LogsServiceClient::new(server.channel().await)
}

/// Each sender of `emit_logs.py` logged its records inside one span: `sluice query --trace-id`
/// finds `per_trace` events for each, all of that trace.
async fn each_trace_holds(server: &TestServer, report: &serde_json::Value, per_trace: usize) {
    let mut query = server.query_client().await;
    let trace_ids = report["trace_ids"].as_array().expect("trace ids");
    assert_eq!(trace_ids.len(), 2);
    for trace_id in trace_ids {
        let trace_id = trace_id.as_str().expect("hex");
        let traced = query_all(
            &mut query,
            QueryRequest {
                trace_id: trace_id.to_owned(),
                limit: 1000,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(traced.len(), per_trace, "trace {trace_id}");
        assert!(traced.iter().all(|event| event.trace_id == trace_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_logs_over_otlp_grpc_are_stored_once_with_severity_attributes_user_and_trace() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let report = emit_logs(
        &server,
        &[
            ("RECORDS", "2000"),
            ("SENDERS", "2"),
            ("SERVICE", "checkout"),
            ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "gzip"),
        ],
    );
    assert_eq!(report["export_errors"], 0, "{report}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'checkout'")
            .await,
        2000,
        "every record stored once"
    );
    let mut query = server.query_client().await;
    // Each sender's first record is an exception logged for its user.
    let failed = query_all(
        &mut query,
        QueryRequest {
            user_id: "user-1".to_owned(),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let failed = &failed[0];
    assert_eq!(failed.message, "payment failed");
    let metadata = failed
        .metadata
        .clone()
        .map(|metadata| metadata.into_object())
        .unwrap_or_default();
    assert_eq!(metadata["severity_text"], "ERROR", "{metadata:?}");
    assert_eq!(metadata["severity_number"], 17);
    assert_eq!(metadata["attributes"]["exception.type"], "ValueError");
    assert_eq!(metadata["resource"]["service.name"], "checkout");
    assert!(
        metadata["span_id"]
            .as_str()
            .is_some_and(|span| span.len() == 16),
        "{metadata:?}"
    );
    // Every record of a sender was logged inside its span: found by the span's trace id.
    each_trace_holds(&server, &report, 1000).await;
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_rpc_duration_seconds_count",
            "method=\"OtlpLogs\",code=\"OK\""
        ) > 0.0,
        "OTLP calls are recorded like every RPC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_exporters_retry_unavailable_with_retry_info_and_every_record_is_stored_once() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Room for one 512-record batch at a time, refused at once when full.
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env("SLUICE_BUFFER__MAX_EVENTS", "1000")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s"),
    )
    .await;
    // The writers are held until a refusal was seen, whatever the machine's speed.
    let stalled = database.stall_writers().await;
    let python = {
        let addr = format!("localhost:{}", server.addr.port());
        let certs = server.cert_dir.clone();
        std::thread::spawn(move || {
            let python = std::env::var("TEST_SLUICE_PYTHON").expect("TEST_SLUICE_PYTHON");
            Command::new(python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/otel/emit_logs.py"
                ))
                .env("SLUICE_ADDR", addr)
                .env("SLUICE_CERTS", certs)
                .env("RECORDS", "6000")
                .env("SENDERS", "6")
                .output()
                .expect("run the OpenTelemetry SDK")
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric_sum(
        &server.metrics().await,
        "sluice_events_refused_total",
        "reason=\"buffer_full\"",
    ) == 0.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal: {}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    TestDatabase::resume_writers(stalled).await;
    let output = tokio::task::spawn_blocking(move || python.join().expect("sdk thread"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(report["export_errors"], 0, "{report}");
    // The SDK's default service name, unknown_service:<process>, is normalized, not refused.
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service LIKE 'unknown_service%'")
            .await,
        6000,
        "every record stored exactly once"
    );
    assert_eq!(
        database
            .scalar("SELECT count(DISTINCT id) FROM events")
            .await,
        6000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_refused_for_good_are_a_partial_success_and_the_rest_is_stored() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut client = logs_client(&server).await;
    let old = LogRecord {
        time_unix_nano: 1_000_000_000, // 1970: past any retention
        ..record_now("too old")
    };
    let huge = record_now(&"x".repeat(100_000));
    let every_kind = LogRecord {
        attributes: vec![
            attribute("b", any_value::Value::BoolValue(true)),
            attribute("big", any_value::Value::IntValue(i64::MAX)),
            attribute("d", any_value::Value::DoubleValue(0.25)),
            attribute("bytes", any_value::Value::BytesValue(vec![1, 2, 3])),
        ],
        ..record_now("every kind")
    };
    let response = client
        .export(logs_request(
            "kinds",
            vec![old, record_now("fine"), huge, every_kind],
        ))
        .await
        .expect("export")
        .into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_log_records, 2, "{partial:?}");
    assert!(partial.error_message.contains("record 0"), "{partial:?}");
    assert!(partial.error_message.contains("record 2"), "{partial:?}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'kinds'")
            .await,
        2
    );
    assert_eq!(
        database
            .scalar(
                "SELECT count(*) FROM events WHERE metadata->'attributes' = \
                 '{\"b\": true, \"big\": \"9223372036854775807\", \"d\": 0.25, \"bytes\": \"AQID\"}'::jsonb"
            )
            .await,
        1
    );
    let metrics = server.metrics().await;
    let records = |outcome: &str| {
        metric_sum(
            &metrics,
            "sluice_otlp_log_records_total",
            &format!("outcome=\"{outcome}\""),
        )
    };
    assert_eq!(records("rejected"), 2.0);
    assert_eq!(records("stored"), 2.0);
    assert!(
        metrics.contains("sluice_otlp_log_records_total{outcome=\"refused\"} 0"),
        "the series exists at 0"
    );
    // The same request again: OK, and nothing stored twice (ids are hashed from the records).
    let resent = logs_request("kinds", vec![record_now("fine")]);
    client.export(resent.clone()).await.expect("first");
    client.export(resent).await.expect("resent");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'kinds' AND message = 'fine'")
            .await,
        2,
        "the resent record is stored once (the earlier 'fine' is another record)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_requests_are_taken_and_a_compression_bomb_is_refused_before_it_is_held() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url).env("SLUICE_OTLP__MAX_REQUEST_BYTES", "1048576"),
    )
    .await;
    let mut zstd = logs_client(&server)
        .await
        .send_compressed(CompressionEncoding::Zstd);
    zstd.export(logs_request("zstd", vec![record_now("compressed")]))
        .await
        .expect("zstd export");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'zstd'")
            .await,
        1
    );
    // 8 MiB of one byte: a few KiB on the wire, past the 1 MiB limit once inflated.
    let bomb = logs_request("bomb", vec![record_now(&"a".repeat(8 << 20))]);
    let mut gzip = logs_client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip);
    let refused = gzip.export(bomb).await.expect_err("bomb");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("size limit"), "{refused:?}");
    let still = logs_client(&server)
        .await
        .export(logs_request("after", vec![record_now("still serving")]))
        .await;
    assert!(still.is_ok(), "{still:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_needs_the_ingest_scope_and_the_service_right_like_the_native_rpcs() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url).toml(
        r#"
[[auth.principals]]
name = "reader"
scopes = ["query"]

[[auth.principals]]
name = "billing"
scopes = ["ingest"]
services = ["billing"]
"#,
    ))
    .await;
    issue_certificate(&server, "reader");
    issue_certificate(&server, "billing");
    let mut reader = LogsServiceClient::new(common::channel_as(&server, "reader").await);
    let refused = reader
        .export(logs_request("billing", vec![record_now("no")]))
        .await
        .expect_err("no ingest scope");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let mut billing = LogsServiceClient::new(common::channel_as(&server, "billing").await);
    let response = billing
        .export(ExportLogsServiceRequest {
            resource_logs: [
                logs_request("billing", vec![record_now("mine")]),
                logs_request("checkout", vec![record_now("not mine")]),
            ]
            .into_iter()
            .flat_map(|request| request.resource_logs)
            .collect(),
        })
        .await
        .expect("export")
        .into_inner();
    assert_eq!(
        response
            .partial_success
            .map(|partial| partial.rejected_log_records),
        Some(1)
    );
    assert_eq!(database.scalar("SELECT count(*) FROM events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_logs_over_otlp_grpc_are_stored_once_with_their_user_and_severity() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let node = std::env::var("TEST_SLUICE_NODE")
        .expect("TEST_SLUICE_NODE is unset: run the suite with scripts/test");
    let certs = &server.cert_dir;
    let output = Command::new(node)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/otel/node/emit_logs.js"
        ))
        .env(
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            format!("https://localhost:{}", server.addr.port()),
        )
        .env("OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE", certs.join("ca.pem"))
        .env(
            "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE",
            certs.join("client.pem"),
        )
        .env(
            "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY",
            certs.join("client.key"),
        )
        .env("RECORDS", "500")
        .output()
        .expect("run the OpenTelemetry JS SDK");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "emit_logs.js failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json report");
    assert_eq!(report["export_errors"], 0, "{report}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'node-orders'")
            .await,
        500
    );
    let mut query = server.query_client().await;
    let failed = query_all(
        &mut query,
        QueryRequest {
            user_id: "node-user".to_owned(),
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].message, "order failed");
    let metadata = failed[0]
        .metadata
        .clone()
        .map(|metadata| metadata.into_object())
        .unwrap_or_default();
    assert_eq!(metadata["severity_text"], "ERROR", "{metadata:?}");
    assert_eq!(metadata["attributes"]["order.id"], 0);
    assert_eq!(metadata["scope"]["name"], "emit_logs");
}

/// A server with OTLP/HTTP on a port of its own.
fn with_otlp_http(spec: ServerSpec) -> ServerSpec {
    spec.env("SLUICE_OTLP__HTTP_LISTEN", "127.0.0.1:0")
}

fn logs_url(server: &TestServer) -> String {
    let port = server.otlp_http_addr.expect("otlp/http listener").port();
    format!("https://localhost:{port}/v1/logs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_logs_over_otlp_http_are_stored_once_and_found_by_trace() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(with_otlp_http(ServerSpec::with_database(&database.url))).await;
    let port = server.otlp_http_addr.expect("otlp/http listener").port();
    let report = emit_logs(
        &server,
        &[
            ("PROTOCOL", "http"),
            ("SLUICE_ADDR", &format!("localhost:{port}")),
            ("RECORDS", "1000"),
            ("SENDERS", "2"),
            ("SERVICE", "storefront"),
            ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "gzip"),
        ],
    );
    assert_eq!(report["export_errors"], 0, "{report}");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'storefront'")
            .await,
        1000,
        "every record stored once"
    );
    each_trace_holds(&server, &report, 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_takes_json_and_compressed_protobuf_and_answers_each_refusal_with_its_code() {
    use prost::Message;
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(with_otlp_http(ServerSpec::with_database(&database.url))).await;
    let client = common::https_client(&server, Some("client"));
    let url = logs_url(&server);
    // OTLP/JSON: hex ids, the enum as a number, 64-bit integers as strings, every AnyValue.
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let json = serde_json::json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "web"}}]},
        "scopeLogs": [{
            "scope": {"name": "http-test", "version": "1.0"},
            "logRecords": [{
                "timeUnixNano": now.to_string(),
                "severityNumber": 13,
                "severityText": "WARN",
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "spanId": "00f067aa0ba902b7",
                "body": {"stringValue": "json over http"},
                "attributes": [
                    {"key": "enduser.id", "value": {"stringValue": "u-http"}},
                    {"key": "count", "value": {"intValue": "9007199254740993"}},
                    {"key": "ratio", "value": {"doubleValue": 0.5}},
                    {"key": "ok", "value": {"boolValue": true}},
                    {"key": "raw", "value": {"bytesValue": "aGVsbG8="}},
                    {"key": "list", "value": {"arrayValue": {"values": [
                        {"stringValue": "a"}, {"intValue": "2"}]}}},
                    {"key": "map", "value": {"kvlistValue": {"values": [
                        {"key": "k", "value": {"stringValue": "v"}}]}}}
                ]
            }]
        }]
    }]});
    let answer = client
        .post(&url)
        .header("content-type", "application/json")
        .body(json.to_string())
        .send()
        .await
        .expect("send json");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/json");
    let body: serde_json::Value =
        serde_json::from_slice(&answer.bytes().await.expect("body")).expect("json answer");
    assert!(body["partialSuccess"].is_null(), "{body}");
    let mut query = server.query_client().await;
    let found = query_all(
        &mut query,
        QueryRequest {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].message, "json over http");
    assert_eq!(found[0].service, "web");
    assert_eq!(found[0].user_id, "u-http");
    let metadata = found[0]
        .metadata
        .clone()
        .map(|metadata| metadata.into_object())
        .unwrap_or_default();
    assert_eq!(metadata["severity_text"], "WARN");
    assert_eq!(metadata["span_id"], "00f067aa0ba902b7");
    assert_eq!(
        metadata["attributes"],
        serde_json::json!({"count": "9007199254740993", "ratio": 0.5, "ok": true,
            "raw": "aGVsbG8=", "list": ["a", 2], "map": {"k": "v"}}),
    );
    // Protobuf, zstd-compressed: the answer is protobuf.
    let records = (0..50)
        .map(|index| record_now(&format!("zstd {index}")))
        .collect();
    let protobuf = logs_request("web", records).encode_to_vec();
    let answer = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "zstd")
        .body(zstd::encode_all(&protobuf[..], 3).expect("zstd"))
        .send()
        .await
        .expect("send zstd");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/x-protobuf");
    let body = answer.bytes().await.expect("body");
    let response =
        opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse::decode(body)
            .expect("protobuf answer");
    assert_eq!(response.partial_success, None);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'web'")
            .await,
        51
    );
    // A gzip bomb: 64 MiB of zeros in about 64 KiB, over the 16 MiB cap once inflated.
    let bomb = {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder
            .write_all(&vec![0u8; 64 * 1024 * 1024])
            .expect("gzip");
        encoder.finish().expect("gzip")
    };
    let refused = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .expect("send bomb");
    assert_eq!(refused.status(), 413);
    // Malformed JSON and protobuf: 400, with a google.rpc.Status in the request's encoding.
    let refused = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"resourceLogs\": [")
        .send()
        .await
        .expect("send bad json");
    assert_eq!(refused.status(), 400);
    let status: serde_json::Value =
        serde_json::from_slice(&refused.bytes().await.expect("body")).expect("json status");
    assert_eq!(status["code"], Code::InvalidArgument as i32, "{status}");
    let refused = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff, 0xff, 0xff, 0xff])
        .send()
        .await
        .expect("send bad protobuf");
    assert_eq!(refused.status(), 400);
    let status = tonic_types::pb::Status::decode(refused.bytes().await.expect("body"))
        .expect("google.rpc.Status");
    assert_eq!(status.code, Code::InvalidArgument as i32);
    // Not OTLP/HTTP: an unknown type, an unknown encoding, another method.
    let refused = client
        .post(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send text");
    assert_eq!(refused.status(), 415);
    let refused = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "br")
        .body(protobuf.clone())
        .send()
        .await
        .expect("send br");
    assert_eq!(refused.status(), 415);
    let refused = client.get(&url).send().await.expect("get");
    assert_eq!(refused.status(), 405);
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE service = 'web'")
            .await,
        51,
        "nothing refused was stored"
    );
    // Without a client certificate, no request gets through the handshake.
    let anonymous = common::https_client(&server, None);
    let refused = anonymous
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(protobuf)
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let metrics = server.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "sluice_rpc_duration_seconds_count",
            "method=\"OtlpLogs\",code=\"OK\""
        ) >= 2.0,
        "OTLP/HTTP calls are recorded like every RPC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_refuses_a_full_buffer_with_503_and_retry_after_and_a_missing_scope_with_403() {
    use prost::Message;
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(
        with_otlp_http(ServerSpec::with_database(&database.url))
            .env("SLUICE_BUFFER__MAX_EVENTS", "10")
            .env("SLUICE_BUFFER__ADMIT_WAIT", "0s")
            .toml(
                r#"
[[auth.principals]]
name = "reader"
scopes = ["query"]

[[auth.principals]]
name = "client"
scopes = ["ingest"]
"#,
            ),
    )
    .await;
    issue_certificate(&server, "reader");
    let reader = common::https_client(&server, Some("reader"));
    let url = logs_url(&server);
    let request = |count: usize| {
        let records = (0..count)
            .map(|index| record_now(&format!("r{index}")))
            .collect();
        logs_request("full", records).encode_to_vec()
    };
    let refused = reader
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(request(1))
        .send()
        .await
        .expect("send as reader");
    assert_eq!(refused.status(), 403);
    let status = tonic_types::pb::Status::decode(refused.bytes().await.expect("body"))
        .expect("google.rpc.Status");
    assert_eq!(status.code, Code::PermissionDenied as i32);
    // Eight records fill the buffer while the writers are held; the next eight are refused
    // whole, with the advice exporters follow.
    let stalled = database.stall_writers().await;
    let client = common::https_client(&server, Some("client"));
    let first = tokio::spawn({
        let (client, url, body) = (client.clone(), url.clone(), request(8));
        async move {
            client
                .post(&url)
                .header("content-type", "application/x-protobuf")
                .body(body)
                .send()
                .await
                .expect("send first")
                .status()
        }
    });
    // The first request's events are in the buffer once a writer's COPY waits on the lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while database
        .scalar(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) \
             WHERE NOT granted AND query ILIKE 'COPY%'",
        )
        .await
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline && !first.is_finished(),
            "no writer waits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = client
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(request(8))
        .send()
        .await
        .expect("send second");
    assert_eq!(
        refused.status(),
        503,
        "{:?}",
        refused.headers().get("retry-after")
    );
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1, "{retry_after}");
    let status = tonic_types::pb::Status::decode(refused.bytes().await.expect("body"))
        .expect("google.rpc.Status");
    assert_eq!(status.code, Code::Unavailable as i32);
    TestDatabase::resume_writers(stalled).await;
    assert_eq!(first.await.expect("first"), 200);
}
