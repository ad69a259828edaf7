//! What calls did: request sizes, RPC durations and codes, search cancellations, and the
//! refusals on who sent a call.

use std::time::Duration;

use metrics::{counter, histogram};

use super::histogram::EVENT_BYTES;

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

/// A step of a search ran (`step`: `indexed` through a closed partition's index, `sliced`
/// over a time slice).
pub fn search_step(step: &'static str) {
    counter!("sluice_search_steps_total", "step" => step).increment(1);
}

/// An archived object a Query call read (`source`: `cache`, decoded by an earlier call;
/// `store`, fetched, checked and decoded).
pub fn archive_query_object(source: &'static str) {
    counter!("sluice_archive_query_objects_total", "source" => source).increment(1);
}

/// A Query call read its page again because the archive changed under it (the lifecycle job
/// moved, rewrote or expired an object it reads).
pub fn archive_query_retried() {
    counter!("sluice_archive_query_retries_total").increment(1);
}

/// A request refused on who sent it; `reason` is the ErrorInfo reason (`INVALID_TOKEN`,
/// `MISSING_SCOPE`, `SERVICE_DENIED`, `RATE_LIMITED`).
pub fn auth_refused(reason: &'static str) {
    counter!("sluice_auth_refusals_total", "reason" => reason).increment(1);
}

/// A request refused by a principal's rate limit (`limit`: `events_per_second` or
/// `bytes_per_second`). `principal` is a configured principal's name, or `(default)` for any
/// principal of the default grant, so the label set is bounded.
pub fn rate_limited(principal: &str, limit: &'static str) {
    auth_refused("RATE_LIMITED");
    counter!("sluice_rate_limited_total", "principal" => principal.to_owned(), "limit" => limit)
        .increment(1);
}

/// An audit row could not be written.
pub fn audit_error() {
    counter!("sluice_audit_errors_total").increment(1);
}

/// How long the JWKS keys in hand have gone without a good read of their file (0: fresh).
pub fn jwks_stale(stale: Duration) {
    metrics::gauge!("sluice_jwks_stale_seconds").set(stale.as_secs_f64());
}

/// A read refused because its principal (or the node) runs the most calls of its `kind` there
/// may be (`queries`, `exports`, `tails`).
pub fn read_refused(kind: &'static str) {
    counter!("sluice_reads_refused_total", "kind" => kind).increment(1);
}

/// Batches a Tail subscriber skipped because it read too slowly.
pub fn tail_batches_missed(batches: u64) {
    counter!("sluice_tail_batches_missed_total").increment(batches);
}

/// `sluice_otlp_log_records_total{outcome}`: the records of OTLP exports, by what became of
/// them (beside the per-reason counts every event shares).
pub fn otlp_log_records(outcome: OtlpOutcome, records: usize) {
    counter!("sluice_otlp_log_records_total", "outcome" => outcome.as_str())
        .increment(records as u64);
}

/// What became of an OTLP export's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpOutcome {
    /// Committed (or spooled): the export's OK.
    Stored,
    /// Refused for good, reported in `partial_success`.
    Rejected,
    /// The whole export was refused (retried by the exporter, or dropped when it never fits).
    Refused,
}

impl OtlpOutcome {
    pub const ALL: [OtlpOutcome; 3] = [Self::Stored, Self::Rejected, Self::Refused];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Rejected => "rejected",
            Self::Refused => "refused",
        }
    }
}
