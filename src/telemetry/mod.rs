//! Logs and traces: the `tracing` subscriber (text or JSON lines), OpenTelemetry export of
//! spans and of log records ([`logs`]) over OTLP/gRPC (off unless an endpoint is configured),
//! W3C trace context from callers, and the trace id that stored events carry.
//!
//! Spans: one per RPC (`rpc`, made in [`crate::server`]), a child of the caller's span when the
//! request carries `traceparent`; one per validation pass (`validate`); and one per batch write
//! (`write_batch`), linked to the spans of the requests whose events it holds.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{SpanContext, TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    logs::SdkLoggerProvider,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tonic::codegen::http::HeaderMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, Targets},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

mod gate;
pub mod logs;

/// The standard variables that turn export on when `telemetry.otlp_endpoint` is unset.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// A batch span links to at most this many requests (the SDK's default link limit).
pub const MAX_BATCH_LINKS: usize = 128;

/// Whether spans are exported; read on hot paths, set once at start-up.
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// Whether events keep the trace id of their request.
static STORE_TRACE_ID: AtomicBool = AtomicBool::new(true);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a tracing subscriber was already installed")]
    AlreadyInstalled,
}

/// Export in progress; [`Telemetry::shutdown`] flushes the spans and log records still
/// queued.
#[must_use = "shut telemetry down at exit, or queued spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    logs: Option<SdkLoggerProvider>,
}

impl Telemetry {
    /// Flushes queued spans and log records (bounded by the exporters' timeouts). Blocking:
    /// call it off the async workers, or once serving has ended.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("sluice: flushing traces at exit failed: {error}");
        }
        if let Some(logs) = self.logs
            && let Err(error) = logs.shutdown()
        {
            eprintln!("sluice: flushing log records at exit failed: {error}");
        }
    }
}

/// The OTLP endpoint: the configured one, else the standard environment variables'.
fn endpoint(config: &TelemetryConfig) -> Option<String> {
    config.otlp_endpoint.clone().or_else(|| {
        ENDPOINT_VARIABLES
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    })
}

/// The resource: `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, with `service.name`
/// defaulting to `sluice` instead of the SDK's `unknown_service`.
fn resource() -> Resource {
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|attributes| attributes.contains("service.name="));
    let builder = Resource::builder();
    if named_by_env {
        builder.build()
    } else {
        builder.with_service_name("sluice").build()
    }
}

fn tracer_provider(
    endpoint: &str,
    config: &TelemetryConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    let failed = |reason: String| TelemetryError::Exporter {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        exporter = exporter.with_tls_config(
            opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_native_roots(),
        );
    }
    let exporter = exporter
        .build()
        .map_err(|error| failed(error.to_string()))?;
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource());
    // The SDK reads OTEL_TRACES_SAMPLER itself; the configured ratio applies otherwise.
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        )));
    }
    Ok(provider.build())
}

/// Installs the global subscriber: log lines to stderr under `log.filter` (`RUST_LOG` wins),
/// and, when an OTLP endpoint is set, sluice's spans and log records to the exporters. Call it
/// inside the async runtime: the exporters' channels live there.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    STORE_TRACE_ID.store(telemetry.store_trace_id, Ordering::Relaxed);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    // Whatever the filter says: the AWS SDK's trace events hold response bodies, and the
    // KMS's hold data keys.
    // The AWS SDK's trace events hold response bodies, and the KMS's hold data keys: a
    // filter that reaches TRACE anywhere keeps the SDK at DEBUG.
    let filter = if filter.max_level_hint() == Some(LevelFilter::TRACE) {
        ["aws_smithy_runtime=debug", "aws_smithy_http_client=debug"]
            .into_iter()
            .filter_map(|directive| directive.parse().ok())
            .fold(filter, EnvFilter::add_directive)
    } else {
        filter
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match log.format {
        LogFormat::Text => lines.with_filter(filter).boxed(),
        LogFormat::Json => lines.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let provider = endpoint(telemetry)
        .map(|endpoint| tracer_provider(&endpoint, telemetry).map(|provider| (endpoint, provider)))
        .transpose()?;
    // Only sluice's own spans: the RPC, validation and batch-write spans, not every poll of
    // the HTTP/2 or database drivers.
    let traces = provider.as_ref().map(|(_, provider)| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sluice"))
            .with_filter(Targets::new().with_target("sluice", tracing::Level::INFO))
    });
    let logs_endpoint = logs::endpoint(telemetry);
    let exported_logs = match &logs_endpoint {
        Some(endpoint) => logs::layer(endpoint, telemetry, resource())?,
        None => None,
    };
    let (logs_provider, logs_layer) = exported_logs.unzip();
    let logs_layer =
        logs_layer.map(|layer| gate::Gated::new(layer, logs::filter(&telemetry.log_level)));
    tracing_subscriber::registry()
        .with(lines)
        .with(traces)
        .with(logs_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Some((endpoint, _)) = &provider {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(%endpoint, sample_ratio = telemetry.sample_ratio, "exporting traces over OTLP");
    }
    if let (Some(endpoint), Some(_)) = (&logs_endpoint, &logs_provider) {
        tracing::info!(%endpoint, log_level = %telemetry.log_level, "exporting logs over OTLP");
    }
    Ok(Telemetry {
        provider: provider.map(|(_, provider)| provider),
        logs: logs_provider,
    })
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The caller's span from `traceparent` (and `tracestate`), when the headers carry a valid
/// one.
fn remote_span(headers: &HeaderMap) -> Option<SpanContext> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    // The propagator accepts ids shorter than the W3C widths (it parses them as numbers);
    // the spec does not, and neither does sluice.
    let mut fields = traceparent.split('-').skip(1);
    if fields.next()?.len() != 32 || fields.next()?.len() != 16 {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Makes `span` (an RPC's) a child of the caller's span when spans are exported, and records
/// the trace id in its `trace_id` field, so every log line of the call carries it.
pub fn adopt_caller(span: &tracing::Span, headers: &HeaderMap) {
    let remote = remote_span(headers);
    if exporting() {
        if let Some(remote) = &remote {
            let parent = opentelemetry::Context::new().with_remote_span_context(remote.clone());
            // Fails only when the span is disabled, and then there is nothing to parent.
            let _ = span.set_parent(parent);
        }
        let own = span.context().span().span_context().clone();
        if own.is_valid() && own.is_sampled() {
            span.record("trace_id", own.trace_id().to_string());
            return;
        }
    }
    if let Some(remote) = remote {
        span.record("trace_id", remote.trace_id().to_string());
    }
}

/// The trace id the events of the current request keep: the caller's (`traceparent`), or,
/// when exporting, the current span's if it is sampled. None when `store_trace_id` is off.
pub fn request_trace_id(metadata: &tonic::metadata::MetadataMap) -> Option<TraceId> {
    if !STORE_TRACE_ID.load(Ordering::Relaxed) {
        return None;
    }
    if exporting()
        && let Some(current) = current_span_context()
    {
        return Some(current.trace_id());
    }
    remote_span(metadata.as_ref()).map(|remote| remote.trace_id())
}

/// The current span's context when it is exported and sampled: what a batch span links to.
pub fn current_span_context() -> Option<SpanContext> {
    if !exporting() {
        return None;
    }
    let current = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    (current.is_valid() && current.is_sampled()).then_some(current)
}

/// Links `span` (a batch write's) to the request spans whose events it holds, once each and
/// at most [`MAX_BATCH_LINKS`].
pub fn link_requests<'a>(
    span: &tracing::Span,
    requests: impl IntoIterator<Item = &'a SpanContext>,
) {
    let mut linked: Vec<&SpanContext> = Vec::new();
    for request in requests {
        if linked.len() == MAX_BATCH_LINKS {
            break;
        }
        if linked
            .iter()
            .all(|seen| seen.span_id() != request.span_id())
        {
            span.add_link(request.clone());
            linked.push(request);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().expect("header value"));
        headers
    }

    #[test]
    fn a_valid_traceparent_gives_the_callers_trace_and_span() {
        let span = remote_span(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .expect("a remote span");
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_remote());
    }

    #[test]
    fn malformed_or_absent_traceparents_give_nothing() {
        assert!(remote_span(&HeaderMap::new()).is_none());
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(remote_span(&headers(bad)).is_none(), "{bad}");
        }
    }
}
