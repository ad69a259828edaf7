//! The ingest counters that the Stats RPC reads beside Prometheus, with the typed reasons of
//! refusals, and counters whose one label is bounded in cardinality.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics::{counter, gauge, histogram};

use super::histogram::EVENT_COMMIT_SECONDS;
use crate::figures::Figures;

/// Why a whole request was refused: the `reason` label of `sluice_events_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BufferFull,
    /// The buffer is under pressure and the principal holds its fair share.
    OverShare,
    /// The Redis streams hold `redis.max_pending_events` (or bytes) not yet written.
    BacklogFull,
    ShuttingDown,
    TooLarge,
    /// The caller's rate limit.
    RateLimited,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::BufferFull,
        Refusal::OverShare,
        Refusal::BacklogFull,
        Refusal::ShuttingDown,
        Refusal::TooLarge,
        Refusal::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BufferFull => "buffer_full",
            Self::OverShare => "over_share",
            Self::BacklogFull => "backlog_full",
            Self::ShuttingDown => "shutting_down",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
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
    /// The business figures per service and hour that Stats reads from PostgreSQL.
    figures: Arc<Figures>,
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
            figures: Arc::default(),
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

    /// One event of `service` refused, with the label of its reason.
    pub fn event_rejected(&self, service: &str, reason: &'static str) {
        self.events_rejected(service, reason, 1);
    }

    /// `count` events of `service` not stored, for one reason.
    pub fn events_rejected(&self, service: &str, reason: &'static str, count: u64) {
        counter!("sluice_events_rejected_total", "reason" => reason).increment(count);
        add(&self.rejected, reason, count);
        self.figures.rejected(service, reason, count);
    }

    /// The business figures this node counts (Stats reads them from PostgreSQL).
    pub fn figures(&self) -> &Arc<Figures> {
        &self.figures
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_keep_totals_by_reason() {
        let counters = Counters::default();
        counters.events_received(5);
        counters.event_rejected("s", "invalid_id");
        counters.event_rejected("s", "invalid_id");
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
}
