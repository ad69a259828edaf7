//! Traces against a real OTLP receiver (an in-process `TraceService` over gRPC): a caller's
//! `traceparent` makes the RPC span its child, validation and the batch write get spans, the
//! batch span links to the request, and the stored events carry the trace id, which Query
//! filters by. Without export, the caller's trace id is still stored and logged.

mod common;

use std::time::{Duration, Instant};

use common::{ServerSpec, TestDatabase, TestServer, event, otlp::Receiver, request};
use sluice::proto::{IngestRequest, QueryRequest, ingest_service_client::IngestServiceClient};
use tonic::Request;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
const STREAM_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

fn with_traceparent<T>(message: T, trace_id: &str, span_id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{span_id}-01")
            .parse()
            .expect("traceparent"),
    );
    request
}

async fn query_trace(server: &TestServer, trace_id: &str) -> Vec<sluice::proto::Event> {
    server
        .query_client()
        .await
        .query(QueryRequest {
            trace_id: trace_id.to_owned(),
            ..QueryRequest::default()
        })
        .await
        .expect("query by trace id")
        .into_inner()
        .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_reaches_the_collector_with_rpc_validation_and_linked_batch_spans() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let (collector, receiver) = Receiver::start().await;
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &format!("http://{collector}"),
            )
            .env("OTEL_SERVICE_NAME", "sluice-under-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut ingest = server.ingest_client().await;
    let published = request(vec![event("traced", "one"), event("traced", "two")]);
    let response = ingest
        .publish(with_traceparent(published, TRACE_ID, CALLER_SPAN_ID))
        .await
        .expect("publish");
    assert_eq!(response.into_inner().accepted, 2);

    let hex = hex_of;
    // The batch span ends before the RPC's (which ends once its answer is sent): they may
    // reach the collector in different exports, so wait for both.
    let spans = receiver
        .spans_until(|spans| {
            let linked_batch = spans.iter().any(|(_, span)| {
                span.name == "write_batch"
                    && span
                        .links
                        .iter()
                        .any(|link| hex(&link.trace_id) == TRACE_ID)
            });
            let rpc = spans
                .iter()
                .any(|(_, span)| span.name == "/sluice.v1.IngestService/Publish");
            linked_batch && rpc
        })
        .await;
    let rpc = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "/sluice.v1.IngestService/Publish")
        .expect("the RPC span");
    assert_eq!(hex(&rpc.trace_id), TRACE_ID, "the caller's trace");
    assert_eq!(
        hex(&rpc.parent_span_id),
        CALLER_SPAN_ID,
        "a child of the caller's span"
    );
    let validate = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "validate" && hex(&span.trace_id) == TRACE_ID)
        .expect("the validation span");
    assert_eq!(
        validate.parent_span_id, rpc.span_id,
        "validation inside the RPC"
    );
    let batch = spans
        .iter()
        .map(|(_, span)| span)
        .find(|span| span.name == "write_batch" && !span.links.is_empty())
        .expect("the batch span");
    assert!(
        batch
            .links
            .iter()
            .any(|link| link.trace_id == rpc.trace_id && link.span_id == rpc.span_id),
        "the batch links to the request that brought its events"
    );
    assert_ne!(
        batch.trace_id, rpc.trace_id,
        "a batch is its own trace, linked"
    );
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "sluice-under-test"),
        "OTEL_SERVICE_NAME names the resource"
    );

    // From the trace to the stored events: they carry its id and Query finds them by it.
    let stored = query_trace(&server, TRACE_ID).await;
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|event| event.trace_id == TRACE_ID));

    // A bidirectional stream: its events carry the stream's trace too.
    let stream = tokio_stream::iter(vec![IngestRequest {
        sequence: 1,
        ..request(vec![event("traced", "three")])
    }]);
    let mut acks = IngestServiceClient::new(server.channel().await)
        .ingest_stream(with_traceparent(stream, STREAM_TRACE_ID, CALLER_SPAN_ID))
        .await
        .expect("stream")
        .into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!(ack.accepted, 1);
    assert_eq!(query_trace(&server, STREAM_TRACE_ID).await.len(), 1);
    // A call without traceparent starts its own sampled trace (ratio 1.0 by default), and its
    // events carry that id.
    ingest
        .publish(request(vec![event("untraced-caller", "four")]))
        .await
        .expect("publish");
    let events = server
        .query_client()
        .await
        .query(QueryRequest {
            services: vec!["untraced-caller".to_owned()],
            ..QueryRequest::default()
        })
        .await
        .expect("query")
        .into_inner()
        .events;
    assert_eq!(events[0].trace_id.len(), 32, "{events:?}");
    assert_ne!(events[0].trace_id, TRACE_ID);

    let status = server
        .query_client()
        .await
        .query(QueryRequest {
            trace_id: "not-a-trace".to_owned(),
            ..QueryRequest::default()
        })
        .await
        .expect_err("a malformed trace id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_callers_trace_id_is_still_stored_and_logged() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url)).await;
    let mut ingest = server.ingest_client().await;
    ingest
        .publish(with_traceparent(
            request(vec![event("logged", "one")]),
            TRACE_ID,
            CALLER_SPAN_ID,
        ))
        .await
        .expect("publish");
    ingest
        .publish(request(vec![event("logged", "two")]))
        .await
        .expect("publish");
    let stored = query_trace(&server, TRACE_ID).await;
    assert_eq!(stored.len(), 1, "only the traced request's event");
    assert_eq!(stored[0].message, "one");
    assert_eq!(
        database
            .scalar("SELECT count(*) FROM events WHERE trace_id IS NULL")
            .await,
        1,
        "no trace, no id: sluice starts no trace of its own when not exporting"
    );
    // The log lines of a traced call carry its trace id beside its request id.
    server
        .query_client()
        .await
        .delete(with_traceparent(
            sluice::proto::DeleteRequest {
                services: vec!["logged".to_owned()],
                ..Default::default()
            },
            STREAM_TRACE_ID,
            CALLER_SPAN_ID,
        ))
        .await
        .expect("delete");
    let line = server.log_line("delete request served").await;
    assert!(
        line.contains(&format!(r#""trace_id":"{STREAM_TRACE_ID}""#)),
        "{line}"
    );
    assert!(line.contains(r#""request_id":"#), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_logs_reach_the_collector_with_their_fields_request_id_principal_and_trace() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    let (collector, receiver) = Receiver::start().await;
    let server = TestServer::start(ServerSpec::with_database(&database.url).env(
        "SLUICE_TELEMETRY__OTLP_ENDPOINT",
        &format!("http://{collector}"),
    ))
    .await;
    server
        .query_client()
        .await
        .delete(with_traceparent(
            sluice::proto::DeleteRequest {
                services: vec!["logged".to_owned()],
                ..Default::default()
            },
            STREAM_TRACE_ID,
            CALLER_SPAN_ID,
        ))
        .await
        .expect("delete");
    let logs = receiver
        .logs_until(|logs| logs.iter().any(|log| log.body() == "delete request served"))
        .await;
    let served = logs
        .iter()
        .find(|log| log.body() == "delete request served")
        .expect("the delete's record");
    assert_eq!(served.service, "sluice");
    // Its target, its severity and its own fields.
    assert_eq!(served.scope, "audit");
    assert_eq!(served.record.severity_text, "INFO");
    assert_eq!(served.record.severity_number, 9);
    assert_eq!(
        served.attribute("dry_run").as_deref(),
        Some("BoolValue(false)")
    );
    assert_eq!(served.attribute("deleted").as_deref(), Some("IntValue(0)"));
    // The RPC span's fields: the call and who made it.
    assert_eq!(served.attribute("rpc").as_deref(), Some("Delete"));
    assert!(
        served
            .attribute("request_id")
            .is_some_and(|id| !id.is_empty()),
        "{served:?}"
    );
    assert!(
        served
            .attribute("principal")
            .is_some_and(|name| !name.is_empty()),
        "{served:?}"
    );
    // The trace and span it was logged in: the caller's trace, and the RPC span, which the
    // collector also received.
    assert_eq!(hex_of(&served.record.trace_id), STREAM_TRACE_ID);
    let span_id = served.record.span_id.clone();
    assert_eq!(span_id.len(), 8);
    assert_ne!(hex_of(&span_id), CALLER_SPAN_ID);
    receiver
        .spans_until(|spans| spans.iter().any(|(_, span)| span.span_id == span_id))
        .await;
    let metrics = server.metrics().await;
    assert!(
        common::metric_sum(&metrics, "sluice_log_records_exported_total", "") >= 1.0,
        "{metrics}"
    );
    // The start-up records went out too, without a trace.
    assert!(
        logs.iter()
            .any(|log| log.body().contains("listening") && log.record.trace_id.is_empty()),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_receiver_that_never_answers_costs_a_bounded_queue_and_never_holds_calls() {
    common::init_crypto();
    let database = TestDatabase::create().await;
    // Takes connections and never answers: every export waits out the exporter's timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = silent.local_addr().expect("address");
    let server = TestServer::start(
        ServerSpec::with_database(&database.url)
            .env(
                "SLUICE_TELEMETRY__OTLP_ENDPOINT",
                &format!("http://{address}"),
            )
            .env("SLUICE_TELEMETRY__LOG_QUEUE", "8"),
    )
    .await;
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("sluice_log_records_dropped_total{reason=\"queue_full\"}"),
        "the series exists from start: {metrics}"
    );
    // Each Delete logs a record. The queue holds 8: past them, records are dropped and
    // counted while every call is answered.
    let mut query = server.query_client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut calls = 0;
    loop {
        query
            .delete(sluice::proto::DeleteRequest {
                services: vec!["logged".to_owned()],
                dry_run: true,
                ..Default::default()
            })
            .await
            .expect("delete answered while the receiver hangs");
        calls += 1;
        let metrics = server.metrics().await;
        if common::metric_sum(&metrics, "sluice_log_records_dropped_total", "queue_full") > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record dropped after {calls} calls:\n{metrics}"
        );
    }
    drop(silent);
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
