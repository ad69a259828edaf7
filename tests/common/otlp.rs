//! A real OTLP receiver for the tests: an in-process gRPC server with the collector's
//! `TraceService` and `LogsService`, keeping every span and log record it gets with the
//! `service.name` of its resource.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::LogRecord,
    resource::v1::Resource,
    trace::v1::Span,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Request;

#[derive(Clone, Default)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<(String, Span)>>>,
    pub logs: Arc<Mutex<Vec<ReceivedLog>>>,
}

/// One log record, with its resource's `service.name` and its scope's name (the `tracing`
/// target of a sluice record).
#[derive(Clone, Debug)]
pub struct ReceivedLog {
    pub service: String,
    pub scope: String,
    pub record: LogRecord,
}

impl ReceivedLog {
    pub fn body(&self) -> String {
        text(self.record.body.as_ref())
    }

    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.record.attributes, key)
    }
}

/// A string value as text (other kinds in their debug form).
pub fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The value of attribute `key`, as text.
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .map(|attribute| text(attribute.value.as_ref()))
}

fn service_name(resource: Option<&Resource>) -> String {
    resource
        .and_then(|resource| attribute(&resource.attributes, "service.name"))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut logs = self.logs.lock().expect("logs");
        for resource_logs in request.into_inner().resource_logs {
            let service = service_name(resource_logs.resource.as_ref());
            for scope_logs in resource_logs.scope_logs {
                let scope = scope_logs
                    .scope
                    .as_ref()
                    .map(|scope| scope.name.clone())
                    .unwrap_or_default();
                for record in scope_logs.log_records {
                    logs.push(ReceivedLog {
                        service: service.clone(),
                        scope: scope.clone(),
                        record,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a free loopback port until the test ends.
    pub async fn start() -> (SocketAddr, Self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let address = listener.local_addr().expect("address");
        let receiver = Self::default();
        let traces = TraceServiceServer::new(receiver.clone());
        let logs = LogsServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(logs)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("receiver serves");
        });
        (address, receiver)
    }

    /// Waits until `wanted` holds for the received spans.
    pub async fn spans_until(
        &self,
        wanted: impl Fn(&[(String, Span)]) -> bool,
    ) -> Vec<(String, Span)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans.lock().expect("spans").clone();
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

    /// Waits until `wanted` holds for the received log records.
    pub async fn logs_until(&self, wanted: impl Fn(&[ReceivedLog]) -> bool) -> Vec<ReceivedLog> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs.lock().expect("logs").clone();
            if wanted(&logs) {
                return logs;
            }
            let bodies: Vec<String> = logs.iter().map(ReceivedLog::body).collect();
            assert!(
                Instant::now() < deadline,
                "log records never arrived; got {bodies:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
