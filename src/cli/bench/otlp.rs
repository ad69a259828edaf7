//! `sluice bench --otlp`: the same workload sent as OTLP logs (`LogsService/Export`, one
//! resource per service, records as an OpenTelemetry SDK sends them: no record id, the user in
//! `enduser.id`, the metadata as attributes), `window` calls in flight per connection.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    resource::v1::Resource,
};
use serde_json::{Map, Value as Json};
use tokio::sync::Mutex;
use tonic::{Code, client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_types::StatusExt;

use super::{
    BenchArgs, BenchError, IdKind,
    encoded::{PreEncoded, encode_all},
    native::{LoadReport, latency_histogram},
    own_cpu, own_cpu_since,
};
use sluice::{
    otlp::mapping::keys,
    proto::{Event, IngestRequest},
};

/// The workload's requests as OTLP exports, built before timing starts.
pub fn requests(workload: &[Vec<IngestRequest>]) -> Vec<Vec<ExportLogsServiceRequest>> {
    workload
        .iter()
        .map(|stream| stream.iter().map(export_request).collect())
        .collect()
}

fn export_request(request: &IngestRequest) -> ExportLogsServiceRequest {
    let mut by_service: Vec<(String, Vec<LogRecord>)> = Vec::new();
    for event in &request.events {
        let record = record(event);
        match by_service
            .iter_mut()
            .find(|(service, _)| *service == event.service)
        {
            Some((_, records)) => records.push(record),
            None => by_service.push((event.service.clone(), vec![record])),
        }
    }
    ExportLogsServiceRequest {
        resource_logs: by_service
            .into_iter()
            .map(|(service, records)| ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![attribute("service.name", Json::String(service))],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..Default::default()
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

fn record(event: &Event) -> LogRecord {
    let time = event.timestamp.as_ref().map_or(0, |timestamp| {
        (timestamp.seconds as u64) * 1_000_000_000 + timestamp.nanos as u64
    });
    let mut attributes: Vec<KeyValue> = event
        .metadata
        .as_ref()
        .map(|metadata| {
            metadata
                .as_object()
                .iter()
                .map(|(key, value)| attribute(key, value.clone()))
                .collect()
        })
        .unwrap_or_default();
    attributes.push(attribute("enduser.id", Json::String(event.user_id.clone())));
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: time,
        severity_number: SEVERITY_NUMBER,
        severity_text: SEVERITY_TEXT.to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(event.message.clone())),
        }),
        attributes,
        ..Default::default()
    }
}

/// The workload as native requests whose events are stored as the OTLP phase's records are:
/// the metadata nested under `attributes` beside the record's severity and its resource (the
/// mapping's keys), so that comparing the two phases weighs the protocol, not the rows.
/// Each twin has an id of its own (of the kind `ids` names): the first phase's rows are gone,
/// but nothing is left to chance in what counts as a duplicate.
pub fn native_twins(workload: &[Vec<IngestRequest>], ids: IdKind) -> Vec<Vec<IngestRequest>> {
    workload
        .iter()
        .map(|stream| {
            stream
                .iter()
                .map(|request| IngestRequest {
                    events: request
                        .events
                        .iter()
                        .map(|event| twin(event, ids))
                        .collect(),
                    sequence: request.sequence,
                })
                .collect()
        })
        .collect()
}

fn twin(event: &Event, ids: IdKind) -> Event {
    let mut metadata = Map::new();
    if let Some(attributes) = &event.metadata {
        metadata.insert(
            keys::ATTRIBUTES.to_owned(),
            Json::Object(attributes.as_object().clone()),
        );
    }
    metadata.insert(
        keys::RESOURCE.to_owned(),
        serde_json::json!({ "service.name": event.service }),
    );
    metadata.insert(keys::SEVERITY_NUMBER.to_owned(), SEVERITY_NUMBER.into());
    metadata.insert(keys::SEVERITY_TEXT.to_owned(), SEVERITY_TEXT.into());
    Event {
        id: ids.sent(),
        metadata: Some(metadata.into()),
        ..event.clone()
    }
}

/// The severity every benchmark record carries (INFO).
const SEVERITY_NUMBER: i32 = 9;
const SEVERITY_TEXT: &str = "INFO";

fn attribute(key: &str, value: Json) -> KeyValue {
    let value = match value {
        Json::String(text) => any_value::Value::StringValue(text),
        Json::Number(number) => match number.as_i64() {
            Some(integer) => any_value::Value::IntValue(integer),
            None => any_value::Value::DoubleValue(number.as_f64().unwrap_or_default()),
        },
        Json::Bool(flag) => any_value::Value::BoolValue(flag),
        other => any_value::Value::StringValue(other.to_string()),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

const EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// Sends every stream's exports (encoded before timing starts) over its own connection,
/// `window` calls in flight each; a refused call (UNAVAILABLE + RetryInfo) is sent again after
/// the delay it names.
pub async fn load(
    args: &BenchArgs,
    workload: &[Vec<ExportLogsServiceRequest>],
    records: u64,
) -> Result<LoadReport, BenchError> {
    let mut streams = Vec::with_capacity(workload.len());
    for requests in encode_all(workload) {
        let channel = args.connect.channel().await?;
        streams.push((Grpc::new(channel), requests));
    }
    let latency = latency_histogram()?;
    let cpu_before = own_cpu();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (grpc, requests) in streams {
        let latency = latency.clone();
        let window = args.window.max(1);
        tasks.spawn(async move { drive(grpc, requests, window, latency).await });
    }
    let mut refusals = 0;
    while let Some(result) = tasks.join_next().await {
        refusals += result??;
    }
    let elapsed = started.elapsed();
    let client_cpu = own_cpu_since(cpu_before);
    let latency = latency.lock().await.clone();
    Ok(LoadReport {
        events: records,
        elapsed,
        latency,
        refusals,
        client_cpu,
    })
}

async fn drive(
    grpc: Grpc<Channel>,
    requests: Vec<Bytes>,
    window: usize,
    latency: Arc<Mutex<Histogram<u64>>>,
) -> Result<u64, BenchError> {
    let mut pending = FuturesUnordered::new();
    let mut requests = requests.into_iter();
    let mut refusals = 0;
    let send = |request: Bytes| {
        let mut grpc = grpc.clone();
        async move {
            let mut refused = 0;
            let started = Instant::now();
            loop {
                grpc.ready().await.map_err(|error| {
                    tonic::Status::unavailable(format!("connection not ready: {error}"))
                })?;
                let answer = grpc
                    .unary(
                        tonic::Request::new(request.clone()),
                        PathAndQuery::from_static(EXPORT),
                        PreEncoded::<ExportLogsServiceResponse>::default(),
                    )
                    .await;
                match answer {
                    Ok(_) => return Ok::<_, tonic::Status>((started.elapsed(), refused)),
                    Err(status) if status.code() == Code::Unavailable => {
                        refused += 1;
                        let delay = status
                            .get_error_details()
                            .retry_info()
                            .and_then(|retry| retry.retry_delay)
                            .unwrap_or(Duration::from_millis(100));
                        tokio::time::sleep(delay).await;
                    }
                    Err(status) => return Err(status),
                }
            }
        }
    };
    loop {
        while pending.len() < window {
            let Some(request) = requests.next() else {
                break;
            };
            pending.push(send(request));
        }
        let Some(done) = pending.next().await else {
            return Ok(refusals);
        };
        let (took, refused) = done?;
        refusals += refused;
        latency
            .lock()
            .await
            .saturating_record((took.as_micros() as u64).max(1));
    }
}
