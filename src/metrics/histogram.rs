//! Histograms kept in fixed buckets of atomic counters, for the two series that take a sample
//! per event (`sluice_event_bytes`, `sluice_event_commit_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};

use super::LATENCY_BUCKETS;

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
    pub(super) const fn new(name: &'static str, bounds: &'static [f64]) -> Self {
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
    pub(super) fn render(&self, out: &mut String) {
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
pub(super) static EVENT_BYTES: FixedHistogram =
    FixedHistogram::new("sluice_event_bytes", SIZE_BUCKETS);

/// `sluice_event_commit_seconds`: one sample per event stored.
pub(super) static EVENT_COMMIT_SECONDS: FixedHistogram =
    FixedHistogram::new("sluice_event_commit_seconds", LATENCY_BUCKETS);

/// Bytes per event: the bench's events are ~250 B; metadata may reach 16 KiB and messages
/// 8 KiB by default.
const SIZE_BUCKETS: &[f64] = &[
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

#[cfg(test)]
mod tests {
    use super::*;

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
