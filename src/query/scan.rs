//! The plan of a time-sliced scan: the part of a search's range still to read, the slice the
//! next step reads, and when the call should stop. Pure arithmetic over times and durations,
//! so that every rule is unit-tested without a database; [`super::search`] runs the steps.
//!
//! A scan reads its range newest first (or oldest first) one slice at a time. A slow step
//! halves the slice (down to 1/[`MIN_SLICE_DIVISOR`] of `search.slice`), a fast one doubles it
//! (up to [`MAX_SLICE`]). Every step runs under a statement timeout of what is left of
//! `search.max_scan_time`, except a first step at the smallest slice, which runs to its end so
//! that paging always moves on. A cancelled first step hands the next call a slice
//! [`FIRST_STEP_SHRINK`] times shorter, through the page token.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use super::cursor::Cursor;
use crate::config::SearchConfig;

/// The largest slice a scan grows to.
pub const MAX_SLICE: TimeDelta = TimeDelta::days(31);
/// How much a first step cancelled at the budget shrinks the next call's slice.
pub const FIRST_STEP_SHRINK: i32 = 8;
/// How far below `search.slice` a scan's slices may shrink: below that a step's cost is its
/// fixed overhead, and more steps would only add calls.
pub const MIN_SLICE_DIVISOR: i32 = 64;

/// How long the next step may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepBound {
    /// To its end: the first step of a call at the smallest slice.
    Unbounded,
    /// Under a statement timeout of what is left of the budget.
    Within(Duration),
}

/// The state of one call's scan.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    /// The part of the range still to scan, `[low, high)`.
    low: DateTime<Utc>,
    high: DateTime<Utc>,
    oldest_first: bool,
    slice: TimeDelta,
    min_slice: TimeDelta,
    budget: Duration,
    /// Whether the step under way is the call's first.
    first_step: bool,
    steps: u32,
}

impl ScanPlan {
    /// The plan of a call over `[oldest, newest)`, going on from `cursor` (the last page's
    /// end, with the slice it ended with); None when nothing is left to scan.
    pub fn new(
        oldest: DateTime<Utc>,
        newest: DateTime<Utc>,
        cursor: Option<Cursor>,
        oldest_first: bool,
        search: &SearchConfig,
    ) -> Option<Self> {
        if oldest >= newest {
            return None;
        }
        let (low, high) = match (cursor, oldest_first) {
            (Some(cursor), false) => (oldest, (cursor.ts + TimeDelta::microseconds(1)).min(newest)),
            (Some(cursor), true) => (cursor.ts.max(oldest), newest),
            (None, _) => (oldest, newest),
        };
        let first_slice = TimeDelta::from_std(search.slice).unwrap_or(TimeDelta::hours(1));
        let min_slice = (first_slice / MIN_SLICE_DIVISOR).max(TimeDelta::seconds(1));
        let slice = cursor
            .and_then(|cursor| cursor.slice)
            .map_or(first_slice, |slice| slice.clamp(min_slice, MAX_SLICE));
        Some(Self {
            low,
            high,
            oldest_first,
            slice,
            min_slice,
            budget: search.max_scan_time,
            first_step: true,
            steps: 0,
        })
    }

    /// The window the next step reads, or None once the range is covered.
    pub fn next_window(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if self.low >= self.high {
            return None;
        }
        Some(if self.oldest_first {
            (self.low, (self.low + self.slice).min(self.high))
        } else {
            ((self.high - self.slice).max(self.low), self.high)
        })
    }

    /// Starts a step, `elapsed` into the call: how long it may run.
    pub fn begin_step(&mut self, elapsed: Duration) -> StepBound {
        self.steps += 1;
        self.first_step = self.steps == 1;
        if self.first_step && self.slice <= self.min_slice {
            return StepBound::Unbounded;
        }
        StepBound::Within(self.budget.saturating_sub(elapsed))
    }

    /// The step under way was cancelled at the budget: a first step shrinks the slice the
    /// next call starts with.
    pub fn cancelled(&mut self) {
        if self.first_step {
            self.slice = (self.slice / FIRST_STEP_SHRINK).max(self.min_slice);
        }
    }

    /// `window` was read in full in `took`: the scan goes on from its far edge, with a slice
    /// halved after a slow step or doubled after a fast one.
    pub fn covered(&mut self, window: (DateTime<Utc>, DateTime<Utc>), took: Duration) {
        if self.oldest_first {
            self.low = window.1;
        } else {
            self.high = window.0;
        }
        if took > self.budget / 2 {
            self.slice = (self.slice / 2).max(self.min_slice);
        } else if took < self.budget / 10 {
            self.slice = (self.slice * 2).min(MAX_SLICE);
        }
    }

    /// Whether to stop before another step: one like the last (`last_step`), with room for
    /// its variance (steps of one slice size vary by about half), would likely end past the
    /// budget, `elapsed` into the call.
    pub fn should_stop(&self, elapsed: Duration, last_step: Duration) -> bool {
        self.low < self.high && elapsed + last_step + last_step / 2 >= self.budget
    }

    /// The cursor of everything covered so far: all of one side of `low` (oldest first) or
    /// `high` (newest first), and nothing beyond.
    pub fn edge(&self) -> Cursor {
        if self.oldest_first {
            Cursor::at(self.low - TimeDelta::microseconds(1), Uuid::max())
        } else {
            Cursor::at(self.high, Uuid::nil())
        }
    }

    /// A page token's cursor: `position` (or the covered edge), carrying the slice.
    pub fn resume(&self, position: Option<Cursor>) -> Cursor {
        Cursor {
            slice: Some(self.slice),
            ..position.unwrap_or_else(|| self.edge())
        }
    }

    /// How far the scan got: the covered edge.
    pub fn scanned_until(&self) -> DateTime<Utc> {
        if self.oldest_first {
            self.low
        } else {
            self.high
        }
    }

    #[cfg(test)]
    fn slice(&self) -> TimeDelta {
        self.slice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search() -> SearchConfig {
        SearchConfig {
            slice: Duration::from_secs(3600),
            max_scan_time: Duration::from_millis(80),
            ..SearchConfig::default()
        }
    }

    fn at(hours: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("ts") + TimeDelta::hours(hours)
    }

    #[test]
    fn an_empty_range_has_no_plan() {
        assert!(ScanPlan::new(at(5), at(5), None, false, &search()).is_none());
        assert!(ScanPlan::new(at(6), at(5), None, true, &search()).is_none());
    }

    #[test]
    fn newest_first_reads_from_the_end_and_oldest_first_from_the_start() {
        let plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        assert_eq!(plan.next_window(), Some((at(9), at(10))));
        let plan = ScanPlan::new(at(0), at(10), None, true, &search()).expect("plan");
        assert_eq!(plan.next_window(), Some((at(0), at(1))));
    }

    #[test]
    fn windows_cover_the_range_exactly_once_and_never_pass_its_ends() {
        for oldest_first in [false, true] {
            let mut plan = ScanPlan::new(
                at(0),
                at(0) + TimeDelta::minutes(150),
                None,
                oldest_first,
                &search(),
            )
            .expect("plan");
            let mut covered = TimeDelta::zero();
            let mut windows = Vec::new();
            while let Some(window) = plan.next_window() {
                assert!(window.0 >= at(0) && window.1 <= at(0) + TimeDelta::minutes(150));
                covered += window.1 - window.0;
                windows.push(window);
                // Neither fast nor slow: the slice stays an hour.
                plan.covered(window, Duration::from_millis(20));
            }
            assert_eq!(covered, TimeDelta::minutes(150), "{windows:?}");
            assert_eq!(windows.len(), 3);
        }
    }

    #[test]
    fn fast_steps_double_the_slice_up_to_its_maximum_and_slow_ones_halve_it_to_its_minimum() {
        let mut plan = ScanPlan::new(at(0), at(100_000), None, false, &search()).expect("plan");
        for _ in 0..20 {
            let window = plan.next_window().expect("more to scan");
            plan.covered(window, Duration::from_millis(1));
        }
        assert_eq!(plan.slice(), MAX_SLICE);
        for _ in 0..40 {
            let window = plan.next_window().expect("more to scan");
            plan.covered(window, Duration::from_millis(60));
        }
        assert_eq!(plan.slice(), TimeDelta::hours(1) / MIN_SLICE_DIVISOR);
    }

    #[test]
    fn every_step_runs_within_what_is_left_of_the_budget_but_a_first_at_the_smallest_slice() {
        let mut plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        assert_eq!(
            plan.begin_step(Duration::from_millis(5)),
            StepBound::Within(Duration::from_millis(75))
        );
        assert_eq!(
            plan.begin_step(Duration::from_millis(100)),
            StepBound::Within(Duration::ZERO)
        );
        let smallest = Cursor {
            slice: Some(TimeDelta::seconds(1)),
            ..Cursor::at(at(5), Uuid::nil())
        };
        let mut plan =
            ScanPlan::new(at(0), at(10), Some(smallest), false, &search()).expect("plan");
        assert_eq!(plan.slice(), TimeDelta::hours(1) / MIN_SLICE_DIVISOR);
        assert_eq!(plan.begin_step(Duration::ZERO), StepBound::Unbounded);
        assert!(matches!(
            plan.begin_step(Duration::ZERO),
            StepBound::Within(_)
        ));
    }

    #[test]
    fn a_cancelled_first_step_shrinks_the_next_calls_slice_and_a_later_one_does_not() {
        let mut plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        plan.begin_step(Duration::ZERO);
        plan.cancelled();
        assert_eq!(plan.slice(), TimeDelta::hours(1) / FIRST_STEP_SHRINK);
        let token = plan.resume(None);
        assert_eq!(token.slice, Some(TimeDelta::hours(1) / FIRST_STEP_SHRINK));
        let mut plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        plan.begin_step(Duration::ZERO);
        let window = plan.next_window().expect("window");
        plan.covered(window, Duration::from_millis(20));
        plan.begin_step(Duration::from_millis(20));
        plan.cancelled();
        assert_eq!(plan.slice(), TimeDelta::hours(1));
    }

    #[test]
    fn a_token_carries_its_slice_within_the_bounds() {
        let huge = Cursor {
            slice: Some(TimeDelta::days(400)),
            ..Cursor::at(at(5), Uuid::nil())
        };
        let plan = ScanPlan::new(at(0), at(10), Some(huge), false, &search()).expect("plan");
        assert_eq!(plan.slice(), MAX_SLICE);
        // Newest first goes on at and below the cursor's row; oldest first at and above it.
        assert_eq!(
            plan.next_window().map(|window| window.1),
            Some(at(5) + TimeDelta::microseconds(1))
        );
        let plan = ScanPlan::new(at(0), at(10), Some(huge), true, &search()).expect("plan");
        assert_eq!(plan.next_window().map(|window| window.0), Some(at(5)));
    }

    #[test]
    fn the_call_stops_before_a_step_that_would_likely_end_past_the_budget() {
        let mut plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(window, Duration::from_millis(30));
        assert!(!plan.should_stop(Duration::from_millis(30), Duration::from_millis(30)));
        assert!(plan.should_stop(Duration::from_millis(40), Duration::from_millis(30)));
        // Nothing is left: no reason to stop early.
        let mut plan = ScanPlan::new(at(0), at(1), None, false, &search()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(window, Duration::from_millis(79));
        assert!(!plan.should_stop(Duration::from_millis(79), Duration::from_millis(79)));
    }

    #[test]
    fn the_edge_cursor_covers_one_side_of_the_scan_and_nothing_beyond() {
        let mut plan = ScanPlan::new(at(0), at(10), None, false, &search()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(window, Duration::from_millis(20));
        assert_eq!(plan.edge(), Cursor::at(at(9), Uuid::nil()));
        assert_eq!(plan.scanned_until(), at(9));
        let mut plan = ScanPlan::new(at(0), at(10), None, true, &search()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(window, Duration::from_millis(20));
        assert_eq!(
            plan.edge(),
            Cursor::at(at(1) - TimeDelta::microseconds(1), Uuid::max())
        );
        assert_eq!(plan.scanned_until(), at(1));
    }
}
