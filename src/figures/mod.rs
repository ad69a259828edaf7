//! The seed's business figures, per service and UTC hour of receipt: events accepted and their
//! sizes, rejections by reason, how fast requests were acknowledged, and how long events took
//! from admission to commit. Each node counts in memory ([`Figures`]) and adds what it counted
//! to PostgreSQL every `metrics.figures_interval` ([`store`]), so Stats answers for every node
//! over any window within retention. A crash loses at most one interval of figures, never
//! events.

pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// Upper bounds (µs) of the ack latency buckets: powers of √2 from 100 µs to about 105 s; the
/// last bucket takes everything above. Percentiles are interpolated inside a bucket, within
/// about 20% of the true value.
pub const BOUNDS_US: [u64; 41] = bounds();

const fn bounds() -> [u64; 41] {
    let mut bounds = [0u64; 41];
    let mut index = 0;
    while index < 41 {
        // 100 µs × 2^(index / 2), the odd ones × √2 (1.41421356).
        let base = 100u64 << (index / 2);
        bounds[index] = if index % 2 == 0 {
            base
        } else {
            base * 141_421_356 / 100_000_000
        };
        index += 1;
    }
    bounds
}

/// Buckets of the ack latency histogram: one per bound and one above them.
pub const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Event sizes (message + metadata, bytes) the distribution splits at.
pub const SMALL_BELOW: usize = 1024;
pub const LARGE_ABOVE: usize = 10 * 1024;

/// Service names one node keeps apart per interval before the rest count as `(other)`: a
/// client inventing names cannot grow the table without bound.
const MAX_SERVICES: usize = 10_000;
const OTHER_SERVICE: &str = "(other)";
/// The service of events counted whose service is not known (a stream entry that cannot be
/// read).
pub const UNKNOWN_SERVICE: &str = "(unknown)";

/// What one service did in one hour, as counted by one node since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub accepted: u64,
    /// Under 1 KiB, 1–10 KiB, over 10 KiB.
    pub sizes: [u64; 3],
    pub ack_buckets: [u64; BUCKETS],
    pub processing_sum_us: u64,
    pub processing_max_us: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            accepted: 0,
            sizes: [0; 3],
            ack_buckets: [0; BUCKETS],
            processing_sum_us: 0,
            processing_max_us: 0,
            rejected: BTreeMap::new(),
        }
    }
}

/// The events of one service in one acknowledged request.
#[derive(Debug, Default, Clone)]
pub struct Accepted {
    pub events: u64,
    pub sizes: [u64; 3],
}

impl Accepted {
    /// Counts one event of `bytes`.
    pub fn add(&mut self, bytes: usize) {
        self.events += 1;
        self.sizes[size_class(bytes)] += 1;
    }
}

/// The size class of an event of `bytes`.
pub fn size_class(bytes: usize) -> usize {
    if bytes < SMALL_BELOW {
        0
    } else if bytes <= LARGE_ABOVE {
        1
    } else {
        2
    }
}

/// The ack latency bucket of `latency`.
pub fn bucket(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    BOUNDS_US.partition_point(|bound| *bound < micros)
}

/// A node's figures since the last flush, by (service, hour of receipt).
#[derive(Debug, Default)]
pub struct Figures {
    tallies: Mutex<HashMap<(String, DateTime<Utc>), Tally>>,
}

impl Figures {
    fn with<R>(&self, service: &str, update: impl FnOnce(&mut Tally) -> R) -> R {
        let now = Utc::now();
        let hour = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now);
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (service.to_owned(), hour);
        let key = if tallies.len() >= MAX_SERVICES && !tallies.contains_key(&key) {
            (OTHER_SERVICE.to_owned(), hour)
        } else {
            key
        };
        update(tallies.entry(key).or_default())
    }

    /// One request acknowledged `latency` after admission, with its accepted events by
    /// service.
    pub fn acknowledged(&self, services: &[(String, Accepted)], latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = bucket(latency);
        for (service, accepted) in services {
            self.with(service, |tally| {
                tally.accepted += accepted.events;
                for (total, count) in tally.sizes.iter_mut().zip(accepted.sizes) {
                    *total += count;
                }
                tally.ack_buckets[bucket] += 1;
                tally.processing_sum_us = tally
                    .processing_sum_us
                    .saturating_add(micros.saturating_mul(accepted.events));
                tally.processing_max_us = tally.processing_max_us.max(micros);
            });
        }
    }

    /// `count` events of `service` rejected for `reason`.
    pub fn rejected(&self, service: &str, reason: &'static str, count: u64) {
        self.with(service, |tally| {
            *tally.rejected.entry(reason).or_default() += count;
        });
    }

    /// Everything counted since the last call, leaving nothing behind.
    pub fn take(&self) -> HashMap<(String, DateTime<Utc>), Tally> {
        std::mem::take(&mut *self.tallies.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts figures back that could not be stored, to be added at the next flush.
    pub fn restore(&self, figures: HashMap<(String, DateTime<Utc>), Tally>) {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, tally) in figures {
            let kept = tallies.entry(key).or_default();
            kept.accepted += tally.accepted;
            for (total, count) in kept.sizes.iter_mut().zip(tally.sizes) {
                *total += count;
            }
            for (total, count) in kept.ack_buckets.iter_mut().zip(tally.ack_buckets) {
                *total += count;
            }
            kept.processing_sum_us = kept
                .processing_sum_us
                .saturating_add(tally.processing_sum_us);
            kept.processing_max_us = kept.processing_max_us.max(tally.processing_max_us);
            for (reason, count) in tally.rejected {
                *kept.rejected.entry(reason).or_default() += count;
            }
        }
    }
}

/// The latency (ms) below which a share `quantile` of the requests of `buckets` were
/// acknowledged, interpolated inside its bucket; None without requests.
pub fn percentile_ms(buckets: &[u64], quantile: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = quantile * total as f64;
    let mut seen = 0u64;
    for (index, count) in buckets.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let low = if index == 0 { 0 } else { BOUNDS_US[index - 1] } as f64;
            // Above the last bound: said as the last bound.
            let high = BOUNDS_US
                .get(index)
                .copied()
                .unwrap_or(BOUNDS_US[BOUNDS_US.len() - 1]) as f64;
            let within = ((rank - seen as f64) / *count as f64).clamp(0.0, 1.0);
            return Some((low + (high - low) * within) / 1000.0);
        }
        seen += count;
    }
    Some(BOUNDS_US[BOUNDS_US.len() - 1] as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_grow_by_root_two_from_100_microseconds() {
        assert_eq!(BOUNDS_US[0], 100);
        assert_eq!(BOUNDS_US[1], 141);
        assert_eq!(BOUNDS_US[2], 200);
        assert!(BOUNDS_US.is_sorted());
        assert!(BOUNDS_US[40] >= 100_000_000);
        assert_eq!(bucket(Duration::from_micros(100)), 0);
        assert_eq!(bucket(Duration::from_micros(101)), 1);
        assert_eq!(bucket(Duration::from_secs(1_000)), BUCKETS - 1);
    }

    #[test]
    fn percentiles_fall_inside_the_bucket_of_their_rank() {
        let figures = Figures::default();
        let one = |events| {
            vec![(
                "checkout".to_owned(),
                Accepted {
                    events,
                    sizes: [events, 0, 0],
                },
            )]
        };
        for _ in 0..90 {
            figures.acknowledged(&one(2), Duration::from_millis(3));
        }
        for _ in 0..10 {
            figures.acknowledged(&one(2), Duration::from_millis(400));
        }
        figures.rejected("checkout", "invalid_id", 3);
        let taken = figures.take();
        assert!(figures.take().is_empty(), "taking leaves nothing");
        let tally = taken.values().next().expect("one tally");
        assert_eq!((tally.accepted, tally.sizes[0]), (200, 200));
        assert_eq!(tally.rejected.get("invalid_id"), Some(&3));
        assert_eq!(tally.processing_max_us, 400_000);
        assert_eq!(tally.processing_sum_us, 90 * 2 * 3_000 + 10 * 2 * 400_000);
        let p50 = percentile_ms(&tally.ack_buckets, 0.5).expect("p50");
        let p99 = percentile_ms(&tally.ack_buckets, 0.99).expect("p99");
        assert!((2.0..=3.0).contains(&p50), "{p50}");
        assert!((283.0..=400.0).contains(&p99), "{p99}");
        assert_eq!(percentile_ms(&[0; BUCKETS], 0.5), None);
    }

    #[test]
    fn figures_put_back_add_to_what_came_since() {
        let figures = Figures::default();
        figures.rejected("a", "invalid_id", 1);
        let taken = figures.take();
        figures.rejected("a", "invalid_id", 2);
        figures.restore(taken);
        let tally = figures.take().into_values().next().expect("tally");
        assert_eq!(tally.rejected.get("invalid_id"), Some(&3));
    }

    #[test]
    fn sizes_split_at_one_and_ten_kibibytes() {
        assert_eq!(size_class(1023), 0);
        assert_eq!(size_class(1024), 1);
        assert_eq!(size_class(10 * 1024), 1);
        assert_eq!(size_class(10 * 1024 + 1), 2);
    }
}
