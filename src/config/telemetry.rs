//! `[metrics]`, `[log]` and `[telemetry]`: what the server says about itself.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; unset disables it.
    #[default(Some(SocketAddr::from(([127, 0, 0, 1], 9464))))]
    pub listen: Option<SocketAddr>,
    /// How often each node adds its business figures (accepted, rejected by reason, sizes,
    /// ack latency per service and hour) to PostgreSQL, where Stats reads them.
    #[default(Duration::from_secs(10))]
    #[serde(with = "humantime_serde")]
    pub figures_interval: Duration,
}

impl MetricsConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.figures_interval.is_zero() {
            return Err(invalid("metrics.figures_interval", "must be above zero"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    #[default(LogFormat::Text)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `sluice=debug,sqlx=warn`. `RUST_LOG` overrides it.
    #[default("info")]
    pub filter: String,
}

/// OpenTelemetry traces and sluice's own logs. Export is off unless an endpoint is set here or
/// in the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
/// `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` are honoured.
#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector, e.g. `http://otel-collector:4317`.
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here that are kept (0.0 to 1.0). A caller's `traceparent`
    /// decides for its own traces (parent-based sampling). `OTEL_TRACES_SAMPLER` overrides it.
    #[default(1.0)]
    pub sample_ratio: f64,
    /// Store the trace id of the request that brought each event (the `trace_id` column, a
    /// `Query` filter): the caller's `traceparent`, or this server's sampled trace.
    #[default(true)]
    pub store_trace_id: bool,
    /// Which of sluice's own log events are exported as OTLP log records, when an endpoint
    /// is set: a tracing filter (`info`, `warn,sluice=debug`), or `off`.
    #[default("info")]
    pub log_level: String,
    /// Log records waiting for export at most; past it (a receiver that is down or slow),
    /// new records are dropped and counted.
    #[default(4096)]
    pub log_queue: usize,
}

impl TelemetryConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.log_queue == 0 {
            return Err(invalid("telemetry.log_queue", "must be above zero"));
        }
        if let Err(error) = self
            .log_level
            .parse::<tracing_subscriber::filter::Targets>()
        {
            return Err(ConfigError::Invalid {
                field: "telemetry.log_level",
                reason: format!("not a tracing filter: {error}"),
            });
        }
        Ok(())
    }
}
