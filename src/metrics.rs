//! Prometheus metrics. Every event that is not stored is counted here with its reason.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_events_received_total` | counter | |
//! | `sluice_events_rejected_total` | counter | `reason` (validation or `database_refused`) |
//! | `sluice_events_refused_total` | counter | `reason` (`buffer_full`, `shutting_down`, `too_large`) |
//! | `sluice_events_stored_total` | counter | |
//! | `sluice_events_duplicate_total` | counter | |
//! | `sluice_ack_latency_seconds` | summary | |
//! | `sluice_batch_events`, `sluice_batch_write_seconds` | summary | |
//! | `sluice_writer_errors_total` | counter | `kind` |
//! | `sluice_buffer_events`, `sluice_buffer_bytes`, `sluice_buffer_capacity_events`, `sluice_buffer_capacity_bytes` | gauge | |
//! | `sluice_database_up`, `sluice_ingest_serving` | gauge | |
//! | `sluice_events_spooled_total`, `sluice_events_replayed_total` | counter | |
//! | `sluice_spool_bytes` | gauge | |
//! | `sluice_spool_truncated_bytes_total` | counter | |
//! | `sluice_circuit_state` | gauge | `state` (`closed`, `open`, `half_open`) |

use std::{collections::BTreeMap, net::SocketAddr, sync::Mutex, time::Duration};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::{
    buffer::{BufferUsage, Durable},
    event::EventRejection,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install metrics recorder: {0}")]
    Install(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen for metrics on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the global recorder. Returns the handle that renders the exposition text.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// Serves `GET /metrics` on `address`; returns the bound address (useful with port 0).
pub async fn serve(
    handle: PrometheusHandle,
    address: SocketAddr,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { address, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// The ingest counters since start, also kept in-process for the Stats RPC.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestTotals {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub spooled: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub refused: BTreeMap<&'static str, u64>,
}

static TOTALS: Mutex<IngestTotals> = Mutex::new(IngestTotals {
    received: 0,
    stored: 0,
    duplicates: 0,
    spooled: 0,
    rejected: BTreeMap::new(),
    refused: BTreeMap::new(),
});

fn update_totals(update: impl FnOnce(&mut IngestTotals)) {
    update(
        &mut TOTALS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
}

/// A snapshot of the ingest counters since this process started.
pub fn ingest_totals() -> IngestTotals {
    TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

pub fn events_received(count: usize) {
    counter!("sluice_events_received_total").increment(count as u64);
    update_totals(|totals| totals.received += count as u64);
}

pub fn event_rejected(rejection: &EventRejection) {
    counter!("sluice_events_rejected_total", "reason" => rejection.metric_reason).increment(1);
    update_totals(|totals| *totals.rejected.entry(rejection.metric_reason).or_default() += 1);
}

pub fn events_refused(reason: &'static str, count: usize) {
    counter!("sluice_events_refused_total", "reason" => reason).increment(count as u64);
    update_totals(|totals| *totals.refused.entry(reason).or_default() += count as u64);
}

pub fn events_committed(durable: &Durable, ack_latency: Duration) {
    counter!("sluice_events_stored_total").increment(durable.stored);
    counter!("sluice_events_duplicate_total").increment(durable.duplicates);
    update_totals(|totals| {
        totals.stored += durable.stored;
        totals.duplicates += durable.duplicates;
    });
    for rejection in &durable.dead_lettered {
        event_rejected(rejection);
    }
    histogram!("sluice_ack_latency_seconds").record(ack_latency.as_secs_f64());
}

pub fn batch_written(events: usize, elapsed: Duration) {
    histogram!("sluice_batch_events").record(events as f64);
    histogram!("sluice_batch_write_seconds").record(elapsed.as_secs_f64());
}

pub fn events_spooled(count: usize, spool_bytes: u64) {
    counter!("sluice_events_spooled_total").increment(count as u64);
    update_totals(|totals| totals.spooled += count as u64);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

pub fn spool_replayed(count: usize, spool_bytes: u64) {
    counter!("sluice_events_replayed_total").increment(count as u64);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

pub fn spool_recovered(truncated_bytes: u64, spool_bytes: u64) {
    counter!("sluice_spool_truncated_bytes_total").increment(truncated_bytes);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

pub fn circuit(state: &'static str) {
    for known in ["closed", "open", "half_open"] {
        gauge!("sluice_circuit_state", "state" => known).set(if known == state {
            1.0
        } else {
            0.0
        });
    }
}

pub fn writer_error(kind: &'static str) {
    counter!("sluice_writer_errors_total", "kind" => kind).increment(1);
}

pub fn health(usage: BufferUsage, database_up: bool, serving: bool) {
    gauge!("sluice_buffer_events").set(usage.events as f64);
    gauge!("sluice_buffer_bytes").set(usage.bytes as f64);
    gauge!("sluice_buffer_capacity_events").set(usage.max_events as f64);
    gauge!("sluice_buffer_capacity_bytes").set(usage.max_bytes as f64);
    gauge!("sluice_database_up").set(if database_up { 1.0 } else { 0.0 });
    gauge!("sluice_ingest_serving").set(if serving { 1.0 } else { 0.0 });
}
