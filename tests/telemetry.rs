//! Traces against a real OTLP receiver (an in-process `TraceService` over gRPC): a caller's
//! `traceparent` makes the RPC span its child, validation and the batch write get spans, the
//! batch span links to the request, and the stored events carry the trace id, which Query
//! filters by. Without export, the caller's trace id is still stored and logged.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{ServerSpec, TestDatabase, TestServer, event, request};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::Span,
};
use sluice::proto::{IngestRequest, QueryRequest, ingest_service_client::IngestServiceClient};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Request;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
const STREAM_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// Every span received, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .iter()
                .flat_map(|resource| resource.attributes.iter())
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref()?.value.clone())
                .map(|value| match value {
                    any_value::Value::StringValue(name) => name,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service_name.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_receiver() -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let address = listener.local_addr().expect("address");
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("receiver serves");
    });
    (address, receiver)
}

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

/// Waits until `wanted` holds for the received spans.
async fn spans_until(
    receiver: &Receiver,
    wanted: impl Fn(&[(String, Span)]) -> bool,
) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans.lock().expect("spans").clone();
        if wanted(&spans) {
            return spans;
        }
        let names: Vec<&str> = spans.iter().map(|(_, span)| span.name.as_str()).collect();
        assert!(
            Instant::now() < deadline,
            "spans never arrived; got {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let (collector, receiver) = start_receiver().await;
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
    let spans = spans_until(&receiver, |spans| {
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
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|line| line.contains("delete request served"))
        .expect("the delete's log line");
    assert!(
        line.contains(&format!(r#""trace_id":"{STREAM_TRACE_ID}""#)),
        "{line}"
    );
    assert!(line.contains(r#""request_id":"#), "{line}");
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
