//! sluice's own logs over OTLP: `tracing` events become OTLP log records (through
//! `opentelemetry-appender-tracing`) with their severity, target and fields, the RPC span's
//! `request_id`, `principal`, `rpc` and `method`, and the trace and span ids of the span they
//! were logged in, so logs and traces join in any backend.
//!
//! Export is batched and bounded: records wait in a queue of `telemetry.log_queue`; when it
//! is full (a receiver that is down or slow) a record is dropped and counted in
//! `sluice_log_records_dropped_total{reason="queue_full"}`, and a batch the receiver refuses
//! in `{reason="export_failed"}`. Logging never waits on the receiver.

use std::{sync::Mutex, time::Duration};

use opentelemetry::{InstrumentationScope, context::FutureExt};
use opentelemetry_appender_tracing::layer::{OpenTelemetryTracingBridge, TracingSpanAttributes};
use opentelemetry_otlp::{LogExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    logs::{LogBatch, LogProcessor, SdkLogRecord, SdkLoggerProvider},
};
use tokio::sync::mpsc;
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

use super::TelemetryError;
use crate::{config::TelemetryConfig, metrics};

/// Records per export call at most.
const BATCH_RECORDS: usize = 512;
/// How long a record waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// The span fields each record carries (the RPC span's): never a field that may hold a secret.
const SPAN_FIELDS: [&str; 5] = ["request_id", "principal", "rpc", "method", "trace_id"];
/// Never exported, whatever `telemetry.log_level` says: the exporter's own transport, whose
/// events during an export would feed the queue they drain, and the AWS SDK, whose trace
/// events hold response bodies (the KMS's data keys).
const NEVER: [&str; 8] = [
    "h2=off",
    "hyper=off",
    "hyper_util=off",
    "tonic=off",
    "tower=off",
    "opentelemetry=off",
    "opentelemetry_sdk=off",
    "aws_smithy_runtime=off",
];

/// The standard variables that turn log export on when `telemetry.otlp_endpoint` is unset.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The OTLP endpoint of logs: the configured one, else the standard environment variables'.
pub fn endpoint(config: &TelemetryConfig) -> Option<String> {
    config.otlp_endpoint.clone().or_else(|| {
        ENDPOINT_VARIABLES
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    })
}

/// The filter of exported records: `telemetry.log_level`, without [`NEVER`]'s targets.
pub fn filter(log_level: &str) -> Targets {
    let directives = std::iter::once(log_level)
        .chain(NEVER)
        .collect::<Vec<_>>()
        .join(",");
    directives
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
}

/// The provider and the layer that feeds it (unfiltered: [`filter`] is its filter); None
/// when `telemetry.log_level` is `off`.
pub fn layer<S>(
    endpoint: &str,
    config: &TelemetryConfig,
    resource: Resource,
) -> Result<Option<(SdkLoggerProvider, impl Layer<S>)>, TelemetryError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    if config.log_level.trim() == "off" {
        return Ok(None);
    }
    let mut exporter = LogExporter::builder().with_tonic().with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        exporter = exporter.with_tls_config(
            opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_native_roots(),
        );
    }
    let mut exporter = exporter.build().map_err(|error| TelemetryError::Exporter {
        endpoint: endpoint.to_owned(),
        reason: error.to_string(),
    })?;
    // The processor owns the exporter: the resource (service.name) is set on it here.
    opentelemetry_sdk::logs::LogExporter::set_resource(&mut exporter, &resource);
    let provider = SdkLoggerProvider::builder()
        .with_log_processor(BoundedProcessor::start(exporter, config.log_queue))
        .with_resource(resource)
        .build();
    let bridge = OpenTelemetryTracingBridge::builder(&provider)
        .with_tracing_span_attributes(TracingSpanAttributes::allowlist(SPAN_FIELDS))
        .build();
    Ok(Some((provider, bridge)))
}

type Queued = (SdkLogRecord, InstrumentationScope);

/// Queues records for the export task without ever waiting; counts what it drops.
#[derive(Debug)]
struct BoundedProcessor {
    queue: Mutex<Option<mpsc::Sender<Queued>>>,
    /// Told once the export task has sent everything queued before the queue closed.
    drained: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl BoundedProcessor {
    /// The processor, and its export task on the current runtime.
    fn start<E: opentelemetry_sdk::logs::LogExporter + 'static>(exporter: E, queue: usize) -> Self {
        let (sender, receiver) = mpsc::channel(queue);
        let (drained_sender, drained) = std::sync::mpsc::channel();
        tokio::spawn(
            async move {
                export(exporter, receiver).await;
                let _ = drained_sender.send(());
            }
            // Nothing the export itself logs comes back into the queue.
            .with_context(opentelemetry::Context::current().with_telemetry_suppressed()),
        );
        Self {
            queue: Mutex::new(Some(sender)),
            drained: Mutex::new(Some(drained)),
        }
    }
}

impl LogProcessor for BoundedProcessor {
    fn emit(&self, record: &mut SdkLogRecord, scope: &InstrumentationScope) {
        let Ok(queue) = self.queue.lock() else {
            return;
        };
        let Some(sender) = queue.as_ref() else {
            metrics::log_records_dropped("shut_down", 1);
            return;
        };
        if sender.try_send((record.clone(), scope.clone())).is_err() {
            metrics::log_records_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Closes the queue and waits, up to `timeout`, for what it holds to be exported.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if let Ok(mut queue) = self.queue.lock() {
            queue.take();
        }
        let drained = self
            .drained
            .lock()
            .ok()
            .and_then(|mut drained| drained.take());
        match drained {
            Some(drained) => drained
                .recv_timeout(timeout)
                .map_err(|_| OTelSdkError::Timeout(timeout)),
            None => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

/// Sends batches of up to [`BATCH_RECORDS`], each at most [`BATCH_DELAY`] after its first
/// record, until the queue is closed and empty.
async fn export<E: opentelemetry_sdk::logs::LogExporter>(
    exporter: E,
    mut queue: mpsc::Receiver<Queued>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(BATCH_RECORDS);
    loop {
        let Some(first) = queue.recv().await else {
            break;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_RECORDS {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(record)) => batch.push(record),
                Ok(None) | Err(_) => break,
            }
        }
        send(&exporter, &mut batch).await;
    }
    if let Err(error) = exporter.shutdown() {
        eprintln!("sluice: closing the OTLP log exporter: {error}");
    }
}

async fn send<E: opentelemetry_sdk::logs::LogExporter>(exporter: &E, batch: &mut Vec<Queued>) {
    let records: Vec<(&SdkLogRecord, &InstrumentationScope)> = batch
        .iter()
        .map(|(record, scope)| (record, scope))
        .collect();
    let count = records.len() as u64;
    match exporter.export(LogBatch::new(&records)).await {
        Ok(()) => metrics::log_records_exported(count),
        Err(_) => metrics::log_records_dropped("export_failed", count),
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_and_the_aws_sdk_are_never_exported_whatever_the_level() {
        let filter = filter("trace");
        assert!(filter.would_enable("sluice::writer", &tracing::Level::TRACE));
        for target in [
            "h2::codec",
            "tonic::transport",
            "aws_smithy_runtime::client",
        ] {
            assert!(
                !filter.would_enable(target, &tracing::Level::ERROR),
                "{target}"
            );
        }
    }
}
