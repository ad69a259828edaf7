//! Prometheus metrics. Every event that is not stored is counted here with its reason.
//!
//! A leaf module: callers pass plain numbers and the typed reasons below (or a rejection
//! reason's own `as_str()`), never their domain types.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_events_received_total` | counter | |
//! | `sluice_events_rejected_total` | counter | `reason` (a validation reason, `field_too_long` or `database_refused`) |
//! | `sluice_events_refused_total` | counter | `reason` ([`Refusal`]: `buffer_full`, `shutting_down`, `too_large`) |
//! | `sluice_events_stored_total` | counter | |
//! | `sluice_events_duplicate_total` | counter | |
//! | `sluice_events_duplicate_conflicting_total` | counter | |
//! | `sluice_ack_latency_seconds` | histogram | |
//! | `sluice_event_commit_seconds` | histogram | | (per event: admitted to the buffer → committed) |
//! | `sluice_service_events_total` | counter | `service` (the first [`TOP_LABEL_VALUES`] services stored since start, then `other`) |
//! | `sluice_principal_events_total` | counter | `principal` (the first [`TOP_LABEL_VALUES`] principals that sent events, then `other`) |
//! | `sluice_batch_events`, `sluice_batch_write_seconds` | histogram | |
//! | `sluice_request_events`, `sluice_event_bytes` | histogram | |
//! | `sluice_rpc_duration_seconds` | histogram | `method` (QueryService RPCs, `Publish`, `Ingest`), `code` |
//! | `sluice_search_steps_cancelled_total` | counter | | (a time-sliced scan's step cancelled at `search.max_scan_time`) |
//! | `sluice_writer_errors_total` | counter | `kind` ([`WriteFailure`]) |
//! | `sluice_stream_events_written_total` | counter | `outcome` (`stored`, `duplicate`): Redis mode, streams → PostgreSQL |
//! | `sluice_stream_backlog_events`, `sluice_stream_backlog_bytes` | gauge | | (Redis mode: in the streams, not yet in PostgreSQL) |
//! | `sluice_buffer_events`, `sluice_buffer_bytes`, `sluice_buffer_capacity_events`, `sluice_buffer_capacity_bytes` | gauge | |
//! | `sluice_buffer_utilization` | gauge | | (the fuller of events and bytes, 0.0 to 1.0) |
//! | `sluice_database_up`, `sluice_ingest_serving` | gauge | |
//! | `sluice_events_spooled_total`, `sluice_events_replayed_total` | counter | |
//! | `sluice_spool_bytes` | gauge | |
//! | `sluice_spool_truncated_bytes_total` | counter | |
//! | `sluice_spool_quarantined_total` | counter | |
//! | `sluice_spool_quarantined_segments` | gauge | |
//! | `sluice_circuit_state` | gauge | `state` (`closed`, `open`, `half_open`) |
//! | `sluice_health_check` | gauge | `check` (`database`, `buffer`, `circuit`, `spool_quarantine`, `disk`, `memory`, `redis`, `backlog`): 1 passing, 0 failing |
//! | `sluice_disk_free_bytes` | gauge | `volume` (`data`, `spool`) |
//! | `sluice_resident_memory_bytes` | gauge | |
//! | `sluice_database_failovers_total` | counter | `pools` (`write`, `read`) |
//! | `sluice_backups_total` | counter | `outcome` (`ok`, `failed`) |
//! | `sluice_backup_last_finished_timestamp_seconds`, `sluice_wal_last_archived_timestamp_seconds` | gauge | |
//! | `sluice_wal_archive_failures` | gauge | | (PostgreSQL's `pg_stat_archiver.failed_count`) |
//! | `sluice_breaker_opened_total` | counter | `cause` (`failures`, `slow_writes`, `error_rate`, `probe_failed`) |
//! | `sluice_auth_refusals_total` | counter | `reason` (`INVALID_TOKEN`, `MISSING_SCOPE`, `SERVICE_DENIED`, `RATE_LIMITED`) |
//! | `sluice_rate_limited_total` | counter | `principal`, `limit` |
//! | `sluice_connections_open` | gauge | |
//! | `sluice_connections_rejected_total` | counter | `reason` ([`ConnectionFailure`]) |
//! | `sluice_accept_errors_total` | counter | `kind` (`emfile`, `enfile`, `no_memory`, `aborted`, `other`) |

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("sluice_batch_events".to_owned()),
            COUNT_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("sluice_request_events".to_owned()),
            COUNT_BUCKETS,
        )?
        .install_recorder()?)
}

/// A histogram kept in fixed buckets of atomic counters, for the two that take a sample per
/// event: `sluice_event_bytes` and `sluice_event_commit_seconds`. The exporter's histograms
/// queue every sample until upkeep folds it into its bucket, and its `record_many` records
/// one sample at a time; here a request's event sizes are bucketed on the stack and added
/// once per bucket, and a commit wait is added once with the number of events it applied to
/// (BENCHMARKS.md, "Per-event histograms in fixed buckets"). Rendered after the exporter's
/// text, in the same exposition format.
pub struct FixedHistogram {
    name: &'static str,
    bounds: &'static [f64],
    /// Not cumulative: bucket `i` counts samples in `(bounds[i - 1], bounds[i]]`; the last
    /// one, samples above every bound.
    buckets: [AtomicU64; MAX_FIXED_BUCKETS],
    /// The sum of the samples, as `f64` bits.
    sum: AtomicU64,
}

/// The most buckets a [`FixedHistogram`] has, `+Inf` included.
const MAX_FIXED_BUCKETS: usize = 16;

impl FixedHistogram {
    const fn new(name: &'static str, bounds: &'static [f64]) -> Self {
        assert!(bounds.len() < MAX_FIXED_BUCKETS);
        Self {
            name,
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_FIXED_BUCKETS],
            sum: AtomicU64::new(0),
        }
    }

    /// The bucket of `value`: the first bound at or above it (Prometheus's `le`).
    fn bucket(&self, value: f64) -> usize {
        self.bounds.partition_point(|bound| *bound < value)
    }

    /// Records `value` `weight` times.
    pub fn record_many(&self, value: f64, weight: u64) {
        if weight == 0 {
            return;
        }
        self.buckets[self.bucket(value)].fetch_add(weight, Ordering::Relaxed);
        self.add_to_sum(value * weight as f64);
    }

    /// Records every value of `values`, with one atomic add per bucket they fall in.
    pub fn record_all(&self, values: impl Iterator<Item = f64>) {
        let mut counts = [0u64; MAX_FIXED_BUCKETS];
        let mut sum = 0.0;
        for value in values {
            counts[self.bucket(value)] += 1;
            sum += value;
        }
        for (bucket, count) in self.buckets.iter().zip(counts) {
            if count > 0 {
                bucket.fetch_add(count, Ordering::Relaxed);
            }
        }
        self.add_to_sum(sum);
    }

    fn add_to_sum(&self, amount: f64) {
        // The closure always returns Some: the update cannot fail.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + amount).to_bits())
            });
    }

    /// Appends the histogram in Prometheus's text format.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = self.name;
        // Writing into a String cannot fail.
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// `sluice_event_bytes`: one sample per event received.
static EVENT_BYTES: FixedHistogram = FixedHistogram::new("sluice_event_bytes", SIZE_BUCKETS);
/// `sluice_event_commit_seconds`: one sample per event stored.
static EVENT_COMMIT_SECONDS: FixedHistogram =
    FixedHistogram::new("sluice_event_commit_seconds", LATENCY_BUCKETS);

/// The exposition text: the exporter's metrics, then the fixed-bucket histograms.
fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    EVENT_BYTES.render(&mut out);
    EVENT_COMMIT_SECONDS.render(&mut out);
    out
}

/// Seconds. Acks take 1–10 ms on an idle server and 250–400 ms at the 2-core ceiling
/// (BENCHMARKS.md); batch writes 5–200 ms; reads 1–10 ms, and up to the read statement
/// timeout. Each decade gets 2–3 buckets, up to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Events per batch or request: writers batch up to 1,000 (default 500 per request in the
/// bench); a request holds at most `grpc.max_events_per_request` (10,000).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];
/// Bytes per event: the bench's events are ~250 B; metadata may reach 16 KiB and messages
/// 8 KiB by default.
const SIZE_BUCKETS: &[f64] = &[
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

/// How often histogram samples are folded into their buckets whether or not anyone scrapes
/// (the exporter's own default upkeep period).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    // Histogram samples wait in the recorder until they are folded into their buckets, which
    // a scrape does; without scrapes they would pile up (several per request).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(render(&handle))),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// Why a whole request was refused: the `reason` label of `sluice_events_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BufferFull,
    /// The Redis streams hold `redis.max_pending_events` (or bytes) not yet written.
    BacklogFull,
    ShuttingDown,
    TooLarge,
    /// The caller's rate limit.
    RateLimited,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::BacklogFull => "backlog_full",
            Self::ShuttingDown => "shutting_down",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// What went wrong in a writer: the `kind` label of `sluice_writer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// An id already stored: the batch goes the idempotent way.
    Duplicate,
    /// No partition for a row's timestamp.
    MissingPartition,
    /// A value PostgreSQL refuses.
    BadData,
    /// Connection lost, database down, timeout: retried.
    Transient,
    /// The spool could not take a batch.
    Spool,
    /// A refused event could not be kept in `dead_letters` either.
    DeadLetterRefused,
    /// Redis refused or did not answer an append, a read or an ack (Redis mode).
    Redis,
}

impl WriteFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::MissingPartition => "missing_partition",
            Self::BadData => "bad_data",
            Self::Transient => "transient",
            Self::Spool => "spool",
            Self::DeadLetterRefused => "dead_letter_refused",
            Self::Redis => "redis",
        }
    }
}

/// Why a connection was closed before it was served: the `reason` label of
/// `sluice_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionFailure {
    /// `grpc.max_connections` were open.
    Limit,
    /// No TLS handshake plus HTTP/2 preface within `grpc.handshake_timeout`.
    Timeout,
    /// The TLS handshake failed (no or an untrusted client certificate, not TLS at all).
    Tls,
    /// The peer closed before sending the HTTP/2 preface.
    Closed,
    /// The first bytes were not the HTTP/2 preface.
    BadPreface,
}

impl ConnectionFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::Timeout => "handshake_timeout",
            Self::Tls => "tls",
            Self::Closed => "closed",
            Self::BadPreface => "bad_preface",
        }
    }
}

/// The ingest counters since start, as the Stats RPC reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestTotals {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub spooled: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub refused: BTreeMap<&'static str, u64>,
}

/// The ingest counters: each method counts the Prometheus metric and keeps the running total
/// that the Stats RPC reads. One handle per server, shared through an `Arc` by the handlers
/// and the writers.
#[derive(Debug)]
pub struct Counters {
    received: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    spooled: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Events stored per service, bounded in cardinality.
    services: BoundedLabel,
    /// Events received per principal, bounded in cardinality.
    principals: BoundedLabel,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            received: AtomicU64::default(),
            stored: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            spooled: AtomicU64::default(),
            rejected: Mutex::default(),
            refused: Mutex::default(),
            services: BoundedLabel::new("sluice_service_events_total", "service"),
            principals: BoundedLabel::new("sluice_principal_events_total", "principal"),
        }
    }
}

/// Label values each per-service or per-principal counter keeps before the rest count as
/// `other`: enough for the services of a real deployment, few enough that a client inventing
/// service names cannot blow up Prometheus.
pub const TOP_LABEL_VALUES: usize = 50;
const OTHER_LABEL: &str = "other";

/// A counter with one label whose values are bounded: the first [`TOP_LABEL_VALUES`] values
/// seen since start get their own series (busy ones arrive first in practice), every later
/// one counts as `other`. Series never move between values, so each stays monotonic.
#[derive(Debug)]
struct BoundedLabel {
    metric: &'static str,
    label: &'static str,
    series: Mutex<std::collections::HashMap<String, metrics::Counter>>,
}

impl BoundedLabel {
    fn new(metric: &'static str, label: &'static str) -> Self {
        Self {
            metric,
            label,
            series: Mutex::default(),
        }
    }

    fn add(&self, value: &str, count: u64) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(counter) = series.get(value) {
            counter.increment(count);
            return;
        }
        let label = if series.len() < TOP_LABEL_VALUES {
            value
        } else {
            OTHER_LABEL
        };
        let counter = counter!(self.metric, self.label => label.to_owned());
        counter.increment(count);
        if label != OTHER_LABEL {
            series.insert(value.to_owned(), counter);
        }
    }
}

fn add(totals: &Mutex<BTreeMap<&'static str, u64>>, reason: &'static str, count: u64) {
    *totals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(reason)
        .or_default() += count;
}

fn snapshot(totals: &Mutex<BTreeMap<&'static str, u64>>) -> BTreeMap<&'static str, u64> {
    totals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

impl Counters {
    pub fn events_received(&self, count: usize) {
        counter!("sluice_events_received_total").increment(count as u64);
        self.received.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// One event refused, with the label of its reason.
    pub fn event_rejected(&self, reason: &'static str) {
        self.events_rejected(reason, 1);
    }

    /// `count` events not stored, for one reason.
    pub fn events_rejected(&self, reason: &'static str, count: u64) {
        counter!("sluice_events_rejected_total", "reason" => reason).increment(count);
        add(&self.rejected, reason, count);
    }

    /// A whole request of `count` events refused.
    pub fn events_refused(&self, reason: Refusal, count: usize) {
        counter!("sluice_events_refused_total", "reason" => reason.as_str())
            .increment(count as u64);
        add(&self.refused, reason.as_str(), count as u64);
    }

    /// Events of one request now durable: `stored` of them, `duplicates` of which were
    /// already there; acknowledged `ack_latency` after admission.
    pub fn events_committed(&self, stored: u64, duplicates: u64, ack_latency: Duration) {
        counter!("sluice_events_stored_total").increment(stored);
        counter!("sluice_events_duplicate_total").increment(duplicates);
        self.stored.fetch_add(stored, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        histogram!("sluice_ack_latency_seconds").record(ack_latency.as_secs_f64());
        // The seed's "processing time": the same wait, once per event it applied to.
        EVENT_COMMIT_SECONDS.record_many(ack_latency.as_secs_f64(), stored);
    }

    /// `count` events of `service` stored.
    pub fn service_events(&self, service: &str, count: u64) {
        self.services.add(service, count);
    }

    /// `count` events received from `principal`.
    pub fn principal_events(&self, principal: &str, count: u64) {
        self.principals.add(principal, count);
    }

    pub fn events_spooled(&self, count: usize, spool_bytes: u64) {
        counter!("sluice_events_spooled_total").increment(count as u64);
        self.spooled.fetch_add(count as u64, Ordering::Relaxed);
        gauge!("sluice_spool_bytes").set(spool_bytes as f64);
    }

    /// A snapshot of the counters since this server started.
    pub fn totals(&self) -> IngestTotals {
        IngestTotals {
            received: self.received.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            spooled: self.spooled.load(Ordering::Relaxed),
            rejected: snapshot(&self.rejected),
            refused: snapshot(&self.refused),
        }
    }
}

/// Events a Redis-mode writer node moved from the streams to PostgreSQL: newly `stored`, or
/// already there (`duplicate`: a redelivery after a claim, or a client's resend).
pub fn stream_events_written(stored: u64, duplicates: u64) {
    counter!("sluice_stream_events_written_total", "outcome" => "stored").increment(stored);
    counter!("sluice_stream_events_written_total", "outcome" => "duplicate").increment(duplicates);
}

/// The Redis streams' backlog, as a writer or ingest node last read it.
pub fn stream_backlog(events: u64, bytes: u64) {
    gauge!("sluice_stream_backlog_events").set(events as f64);
    gauge!("sluice_stream_backlog_bytes").set(bytes as f64);
}

/// Duplicates (same `id` and `ts`) whose content differs from the stored event.
pub fn duplicates_conflicting(count: u64) {
    if count > 0 {
        counter!("sluice_events_duplicate_conflicting_total").increment(count);
    }
}

/// One ingest request's size in events, and each valid event's size in bytes.
pub fn request_sizes(events: usize, event_bytes: impl Iterator<Item = usize>) {
    histogram!("sluice_request_events").record(events as f64);
    EVENT_BYTES.record_all(event_bytes.map(|bytes| bytes as f64));
}

/// A QueryService call ended with `code` after `elapsed`.
pub fn rpc_finished(method: &'static str, code: tonic::Code, elapsed: Duration) {
    histogram!("sluice_rpc_duration_seconds", "method" => method, "code" => crate::proto::status::code_name(code))
        .record(elapsed.as_secs_f64());
}

/// A step of a time-sliced search ran into what was left of `search.max_scan_time` and
/// PostgreSQL cancelled it; the call returned its partial page.
pub fn search_step_cancelled() {
    counter!("sluice_search_steps_cancelled_total").increment(1);
}

pub fn batch_written(events: usize, elapsed: Duration) {
    histogram!("sluice_batch_events").record(events as f64);
    histogram!("sluice_batch_write_seconds").record(elapsed.as_secs_f64());
}

pub fn spool_replayed(count: usize, spool_bytes: u64) {
    counter!("sluice_events_replayed_total").increment(count as u64);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

pub fn spool_recovered(truncated_bytes: u64, spool_bytes: u64) {
    counter!("sluice_spool_truncated_bytes_total").increment(truncated_bytes);
    gauge!("sluice_spool_bytes").set(spool_bytes as f64);
}

/// A spool segment moved aside because a record in it could not be decoded; `segments` is
/// how many are now in quarantine.
pub fn spool_quarantined(segments: usize) {
    counter!("sluice_spool_quarantined_total").increment(1);
    gauge!("sluice_spool_quarantined_segments").set(segments as f64);
}

/// Bytes the spool holds now.
pub fn spool_size(bytes: u64) {
    gauge!("sluice_spool_bytes").set(bytes as f64);
}

pub fn spool_quarantine(segments: usize) {
    gauge!("sluice_spool_quarantined_segments").set(segments as f64);
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

/// Free bytes on a watched volume (`data`, `spool`).
pub fn disk_free(volume: &'static str, bytes: u64) {
    gauge!("sluice_disk_free_bytes", "volume" => volume).set(bytes as f64);
}

/// The server's resident memory.
pub fn resident_memory(bytes: u64) {
    gauge!("sluice_resident_memory_bytes").set(bytes as f64);
}

/// One readiness check: 1 when it passes, 0 when it fails.
pub fn health_check(check: &'static str, ok: bool) {
    gauge!("sluice_health_check", "check" => check).set(if ok { 1.0 } else { 0.0 });
}

/// A pool moved to another database host (`pools`: `write`, `read`).
pub fn database_failover(pools: &'static str) {
    counter!("sluice_database_failovers_total", "pools" => pools).increment(1);
}

/// A base backup was taken (or failed).
pub fn backup_taken(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("sluice_backups_total", "outcome" => outcome).increment(1);
}

/// Unix time at which the newest base backup finished.
pub fn backup_finished_at(seconds: f64) {
    gauge!("sluice_backup_last_finished_timestamp_seconds").set(seconds);
}

/// The WAL archiver: when it last archived a segment, and how many attempts failed.
pub fn wal_archiver(last_archived: Option<f64>, failed: i64) {
    if let Some(seconds) = last_archived {
        gauge!("sluice_wal_last_archived_timestamp_seconds").set(seconds);
    }
    gauge!("sluice_wal_archive_failures").set(failed as f64);
}

/// The circuit opened; `cause` is `failures`, `slow_writes`, `error_rate` or `probe_failed`.
pub fn breaker_opened(cause: &'static str) {
    counter!("sluice_breaker_opened_total", "cause" => cause).increment(1);
}

pub fn connection_failed(failure: ConnectionFailure) {
    counter!("sluice_connections_rejected_total", "reason" => failure.as_str()).increment(1);
}

/// `accept` failed; `kind` is `emfile`, `enfile`, `no_memory`, `aborted` or `other`.
pub fn accept_error(kind: &'static str) {
    counter!("sluice_accept_errors_total", "kind" => kind).increment(1);
}

pub fn connection_opened() {
    gauge!("sluice_connections_open").increment(1.0);
}

pub fn connection_closed() {
    gauge!("sluice_connections_open").decrement(1.0);
}

/// What one lifecycle run did.
#[derive(Debug, Default)]
pub struct LifecycleTotals {
    pub rows_deleted: u64,
    pub rows_archived: u64,
    pub objects_written: u64,
    pub objects_deleted: u64,
    pub partitions_dropped: u64,
}

/// A lifecycle run ended (`status`: `ok` or `failed`).
pub fn lifecycle_run(status: &'static str, totals: LifecycleTotals) {
    counter!("sluice_lifecycle_runs_total", "status" => status).increment(1);
    counter!("sluice_lifecycle_rows_deleted_total").increment(totals.rows_deleted);
    counter!("sluice_lifecycle_rows_archived_total").increment(totals.rows_archived);
    counter!("sluice_archive_objects_written_total").increment(totals.objects_written);
    counter!("sluice_archive_objects_deleted_total").increment(totals.objects_deleted);
    counter!("sluice_lifecycle_partitions_dropped_total").increment(totals.partitions_dropped);
}

/// An audit row could not be written.
pub fn audit_error() {
    counter!("sluice_audit_errors_total").increment(1);
}

/// A request refused on who sent it; `reason` is the ErrorInfo reason (`INVALID_TOKEN`,
/// `MISSING_SCOPE`, `SERVICE_DENIED`, `RATE_LIMITED`).
pub fn auth_refused(reason: &'static str) {
    counter!("sluice_auth_refusals_total", "reason" => reason).increment(1);
}

/// A request refused by a principal's rate limit (`limit`: `events_per_second` or
/// `bytes_per_second`). Only configured principals have limits, so the label set is bounded.
pub fn rate_limited(principal: &str, limit: &'static str) {
    auth_refused("RATE_LIMITED");
    counter!("sluice_rate_limited_total", "principal" => principal.to_owned(), "limit" => limit)
        .increment(1);
}

pub fn writer_error(failure: WriteFailure) {
    counter!("sluice_writer_errors_total", "kind" => failure.as_str()).increment(1);
}

/// Buffer occupancy and capacity.
pub fn buffer(events: usize, bytes: usize, max_events: usize, max_bytes: usize) {
    gauge!("sluice_buffer_events").set(events as f64);
    gauge!("sluice_buffer_bytes").set(bytes as f64);
    gauge!("sluice_buffer_capacity_events").set(max_events as f64);
    gauge!("sluice_buffer_capacity_bytes").set(max_bytes as f64);
    // The fuller of the two bounds, 0.0 to 1.0: what admission runs out of first.
    let utilization =
        (events as f64 / max_events.max(1) as f64).max(bytes as f64 / max_bytes.max(1) as f64);
    gauge!("sluice_buffer_utilization").set(utilization);
}

pub fn serving(database_up: bool, serving: bool) {
    gauge!("sluice_database_up").set(if database_up { 1.0 } else { 0.0 });
    gauge!("sluice_ingest_serving").set(if serving { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_keep_totals_by_reason() {
        let counters = Counters::default();
        counters.events_received(5);
        counters.event_rejected("invalid_id");
        counters.event_rejected("invalid_id");
        counters.events_refused(Refusal::BufferFull, 3);
        counters.events_committed(2, 1, Duration::from_millis(3));
        let totals = counters.totals();
        assert_eq!(
            (totals.received, totals.stored, totals.duplicates),
            (5, 2, 1)
        );
        assert_eq!(totals.rejected.get("invalid_id"), Some(&2));
        assert_eq!(totals.refused.get("buffer_full"), Some(&3));
    }

    #[test]
    fn fixed_histograms_render_cumulative_buckets_with_weights() {
        static SIZES: FixedHistogram = FixedHistogram::new("test_bytes", &[64.0, 256.0]);
        SIZES.record_all([10.0, 64.0, 65.0, 1000.0].into_iter());
        SIZES.record_many(100.0, 3);
        SIZES.record_many(5.0, 0);
        let mut out = String::new();
        SIZES.render(&mut out);
        assert_eq!(
            out,
            "# TYPE test_bytes histogram\n\
             test_bytes_bucket{le=\"64\"} 2\n\
             test_bytes_bucket{le=\"256\"} 6\n\
             test_bytes_bucket{le=\"+Inf\"} 7\n\
             test_bytes_sum 1439\n\
             test_bytes_count 7\n"
        );
    }
}
