//! The plan of a time-sliced scan: the part of a search's range still to read, the slice the
//! next step reads, and when the call should stop. Pure arithmetic over times and durations,
//! so that every rule is unit-tested without a database; [`super::search`] runs the steps.
//!
//! A scan reads its range newest first (or oldest first). A partition with a closed-partition
//! index that serves the filter ([`crate::store::closed_indexes`]) is read in one step through
//! that index ([`Step::Indexed`]): a rare word over a past day costs a few milliseconds,
//! whatever the day holds. The rest (the open partition, and any not indexed yet) is read one
//! time slice at a time ([`Step::Sliced`]), never crossing into an indexed partition. An
//! indexed step cancelled at the budget hands the next call that partition to read in slices
//! (the token's `unindexed` flag), so paging always moves on.
//!
//! A slow sliced step halves the slice (down to 1/[`MIN_SLICE_DIVISOR`] of `search.slice`), a fast one doubles it
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

/// How a step reads its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The whole of one partition's part of the range, through its closed-partition index.
    Indexed,
    /// One time slice, scanned.
    Sliced,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Indexed => "indexed",
            Step::Sliced => "sliced",
        }
    }
}

/// What the next step reads: `[from, until)`, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub step: Step,
    /// A sliced step inside a partition whose index ran out of time: the step keeps out of
    /// that index, which the planner would otherwise pick for every slice.
    pub avoid_index: bool,
}

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
    /// The partitions read through an index, `[start, end)`, oldest first, not overlapping.
    indexed: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    /// An indexed partition read in slices instead: its indexed step ran out of time.
    unindexed: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl ScanPlan {
    /// The plan of a call over `[oldest, newest)`, going on from `cursor` (the last page's
    /// end, with the slice it ended with), reading the `indexed` partitions (oldest first)
    /// through their index; None when nothing is left to scan.
    pub fn new(
        oldest: DateTime<Utc>,
        newest: DateTime<Utc>,
        cursor: Option<Cursor>,
        oldest_first: bool,
        search: &SearchConfig,
        indexed: Vec<(DateTime<Utc>, DateTime<Utc>)>,
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
        let unindexed = cursor
            .and_then(|cursor| cursor.unindexed)
            .and_then(|from| indexed.iter().copied().find(|(start, _)| *start == from));
        Some(Self {
            low,
            high,
            oldest_first,
            slice,
            min_slice,
            budget: search.max_scan_time,
            first_step: true,
            steps: 0,
            indexed,
            unindexed,
        })
    }

    /// The indexed partitions still read through their index.
    fn readable(&self) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> + '_ {
        self.indexed
            .iter()
            .copied()
            .filter(|range| Some(*range) != self.unindexed)
    }

    /// The window the next step reads, or None once the range is covered.
    pub fn next_window(&self) -> Option<Window> {
        if self.low >= self.high {
            return None;
        }
        let window = |from: DateTime<Utc>, until: DateTime<Utc>, step| {
            let avoid_index = step == Step::Sliced
                && self
                    .unindexed
                    .is_some_and(|(start, end)| start < until && from < end);
            Some(Window {
                from,
                until,
                step,
                avoid_index,
            })
        };
        if self.oldest_first {
            // The partition holding `low`, or a slice that stops where the next indexed one
            // starts.
            if let Some((_, end)) = self
                .readable()
                .find(|(start, end)| *start <= self.low && self.low < *end)
            {
                return window(self.low, end.min(self.high), Step::Indexed);
            }
            let next_indexed = self
                .readable()
                .map(|(start, _)| start)
                .filter(|start| *start > self.low)
                .min();
            let until = next_indexed.map_or(self.high, |start| start.min(self.high));
            window(self.low, (self.low + self.slice).min(until), Step::Sliced)
        } else {
            // The partition holding the instant just below `high`, or a slice that stops where
            // the indexed one below ends.
            if let Some((start, _)) = self
                .readable()
                .find(|(start, end)| *start < self.high && self.high <= *end)
            {
                return window(start.max(self.low), self.high, Step::Indexed);
            }
            let indexed_below = self
                .readable()
                .map(|(_, end)| end)
                .filter(|end| *end < self.high)
                .max();
            let from = indexed_below.map_or(self.low, |end| end.max(self.low));
            window((self.high - self.slice).max(from), self.high, Step::Sliced)
        }
    }

    /// Starts a step over `window`, `elapsed` into the call: how long it may run.
    pub fn begin_step(&mut self, elapsed: Duration, window: &Window) -> StepBound {
        self.steps += 1;
        self.first_step = self.steps == 1;
        if self.first_step && window.step == Step::Sliced && self.slice <= self.min_slice {
            return StepBound::Unbounded;
        }
        StepBound::Within(self.budget.saturating_sub(elapsed))
    }

    /// `first` and the indexed windows that follow it, `most` in all: indexed steps are
    /// independent of each other, so a call may read several at once. A sliced window goes
    /// alone (the next slice's size depends on its time).
    pub fn batch(&self, first: Window, most: usize) -> Vec<Window> {
        let mut batch = vec![first];
        if first.step != Step::Indexed {
            return batch;
        }
        let mut ahead = self.clone();
        let mut last = first;
        while batch.len() < most {
            ahead.covered(&last, Duration::ZERO);
            match ahead.next_window() {
                Some(next) if next.step == Step::Indexed => {
                    batch.push(next);
                    last = next;
                }
                _ => break,
            }
        }
        batch
    }

    /// The step over `window` was cancelled at the budget. An indexed step leaves its
    /// partition to slices; a first sliced step shrinks the slice the next call starts with.
    pub fn cancelled(&mut self, window: &Window) {
        match window.step {
            Step::Indexed => {
                self.unindexed = self
                    .indexed
                    .iter()
                    .copied()
                    .find(|(start, end)| *start <= window.from && window.until <= *end);
            }
            Step::Sliced if self.first_step => {
                self.slice = (self.slice / FIRST_STEP_SHRINK).max(self.min_slice);
            }
            Step::Sliced => {}
        }
    }

    /// `window` was read in full in `took`: the scan goes on from its far edge. After a
    /// sliced step the slice is halved if it was slow, doubled if it was fast; an indexed
    /// step's time says nothing of slices.
    pub fn covered(&mut self, window: &Window, took: Duration) {
        if self.oldest_first {
            self.low = window.until;
        } else {
            self.high = window.from;
        }
        if window.step == Step::Indexed {
            return;
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
    /// `high` (newest first), and nothing beyond. Its id is one no event has (nil, max), and
    /// its time the first instant left to read, so that the next call's plan starts exactly
    /// there (in the partition the scan is in, not a sliver of the one it left).
    pub fn edge(&self) -> Cursor {
        if self.oldest_first {
            Cursor::at(self.low, Uuid::nil())
        } else {
            Cursor::at(self.high - TimeDelta::microseconds(1), Uuid::max())
        }
    }

    /// A page token's cursor: `position` (or the covered edge), carrying the slice, and the
    /// partition read in slices while the scan has not left it.
    pub fn resume(&self, position: Option<Cursor>) -> Cursor {
        let unindexed = self
            .unindexed
            .filter(|(start, end)| {
                if self.oldest_first {
                    self.low < *end
                } else {
                    self.high > *start
                }
            })
            .map(|(start, _)| start);
        Cursor {
            slice: Some(self.slice),
            unindexed,
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

    fn sliced(from: DateTime<Utc>, until: DateTime<Utc>) -> Window {
        Window {
            from,
            until,
            step: Step::Sliced,
            avoid_index: false,
        }
    }

    fn indexed(from: DateTime<Utc>, until: DateTime<Utc>) -> Window {
        Window {
            from,
            until,
            step: Step::Indexed,
            avoid_index: false,
        }
    }

    /// Every window of a plan run to its end, each step taking `took`.
    fn windows(mut plan: ScanPlan, took: Duration) -> Vec<Window> {
        let mut windows = Vec::new();
        while let Some(window) = plan.next_window() {
            plan.begin_step(Duration::ZERO, &window);
            plan.covered(&window, took);
            windows.push(window);
        }
        windows
    }

    /// Two indexed "days" of 24 hours, [24, 48) and [72, 96), in a range of [10, 100).
    fn days() -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        vec![(at(24), at(48)), (at(72), at(96))]
    }

    #[test]
    fn indexed_partitions_are_read_in_one_step_each_and_slices_never_cross_into_them() {
        let slow = Duration::from_millis(30);
        let plan = ScanPlan::new(at(10), at(100), None, false, &search(), days()).expect("plan");
        let newest_first = windows(plan, slow);
        assert_eq!(
            newest_first[..5],
            [
                sliced(at(99), at(100)),
                sliced(at(98), at(99)),
                sliced(at(97), at(98)),
                sliced(at(96), at(97)),
                indexed(at(72), at(96)),
            ]
        );
        assert!(newest_first.contains(&sliced(at(48), at(49))));
        assert!(newest_first.contains(&indexed(at(24), at(48))));
        assert_eq!(newest_first.last(), Some(&sliced(at(10), at(11))));
        let plan = ScanPlan::new(at(10), at(100), None, true, &search(), days()).expect("plan");
        let oldest_first = windows(plan, slow);
        assert!(oldest_first.contains(&sliced(at(23), at(24))));
        assert!(oldest_first.contains(&indexed(at(24), at(48))));
        assert!(oldest_first.contains(&indexed(at(72), at(96))));
        for windows in [newest_first, oldest_first] {
            let covered: TimeDelta = windows.iter().map(|w| w.until - w.from).sum();
            assert_eq!(covered, at(100) - at(10), "{windows:?}");
            let indexed = windows.iter().filter(|w| w.step == Step::Indexed).count();
            assert_eq!(indexed, 2);
        }
        // A range that starts or ends inside an indexed partition reads only its part.
        let plan = ScanPlan::new(at(30), at(80), None, false, &search(), days()).expect("plan");
        let windows = windows(plan, slow);
        assert_eq!(windows.first(), Some(&indexed(at(72), at(80))));
        assert_eq!(windows.last(), Some(&indexed(at(30), at(48))));
    }

    #[test]
    fn a_batch_is_the_indexed_windows_in_a_row_and_a_sliced_one_goes_alone() {
        let three = vec![(at(24), at(48)), (at(48), at(72)), (at(72), at(96))];
        let plan = ScanPlan::new(at(10), at(96), None, false, &search(), three).expect("plan");
        let first = plan.next_window().expect("window");
        assert_eq!(
            plan.batch(first, 2),
            [indexed(at(72), at(96)), indexed(at(48), at(72))]
        );
        assert_eq!(plan.batch(first, 5).len(), 3, "up to the slices below");
        let plan = ScanPlan::new(at(10), at(100), None, false, &search(), days()).expect("plan");
        let first = plan.next_window().expect("window");
        assert_eq!(plan.batch(first, 4), [sliced(at(99), at(100))]);
    }

    #[test]
    fn an_indexed_step_is_always_bounded_and_leaves_the_slice_as_it_was() {
        let smallest = Cursor {
            slice: Some(TimeDelta::seconds(1)),
            ..Cursor::at(at(90), Uuid::nil())
        };
        let mut plan =
            ScanPlan::new(at(10), at(100), Some(smallest), false, &search(), days()).expect("plan");
        let window = plan.next_window().expect("window");
        assert_eq!(window.step, Step::Indexed);
        assert_eq!(
            plan.begin_step(Duration::ZERO, &window),
            StepBound::Within(Duration::from_millis(80))
        );
        plan.covered(&window, Duration::from_millis(1));
        assert_eq!(plan.slice(), TimeDelta::hours(1) / MIN_SLICE_DIVISOR);
    }

    #[test]
    fn a_cancelled_indexed_step_hands_its_partition_to_slices_until_the_scan_leaves_it() {
        for oldest_first in [false, true] {
            let mut plan =
                ScanPlan::new(at(24), at(96), None, oldest_first, &search(), days()).expect("plan");
            let window = plan.next_window().expect("window");
            assert_eq!(window.step, Step::Indexed);
            plan.begin_step(Duration::ZERO, &window);
            plan.cancelled(&window);
            let token = plan.resume(None);
            let partition = if oldest_first { at(24) } else { at(72) };
            assert_eq!(token.unindexed, Some(partition));
            // The next call slices that partition, and goes back to indexes past it.
            let mut plan =
                ScanPlan::new(at(24), at(96), Some(token), oldest_first, &search(), days())
                    .expect("plan");
            let mut steps = Vec::new();
            while let Some(window) = plan.next_window() {
                plan.begin_step(Duration::ZERO, &window);
                plan.covered(&window, Duration::from_millis(30));
                steps.push(window.step);
                let token = plan.resume(None);
                let in_partition = if oldest_first {
                    window.from < at(48)
                } else {
                    window.until > at(72)
                };
                assert_eq!(window.avoid_index, in_partition, "{window:?}");
                let inside = if oldest_first {
                    window.until < at(48)
                } else {
                    window.from > at(72)
                };
                assert_eq!(token.unindexed.is_some(), inside, "{window:?}");
            }
            assert_eq!(
                steps.iter().filter(|step| **step == Step::Sliced).count(),
                24 + 24
            );
            assert_eq!(
                steps.iter().filter(|step| **step == Step::Indexed).count(),
                1
            );
        }
    }

    #[test]
    fn an_empty_range_has_no_plan() {
        assert!(ScanPlan::new(at(5), at(5), None, false, &search(), Vec::new()).is_none());
        assert!(ScanPlan::new(at(6), at(5), None, true, &search(), Vec::new()).is_none());
    }

    #[test]
    fn newest_first_reads_from_the_end_and_oldest_first_from_the_start() {
        let plan = ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        assert_eq!(plan.next_window(), Some(sliced(at(9), at(10))));
        let plan = ScanPlan::new(at(0), at(10), None, true, &search(), Vec::new()).expect("plan");
        assert_eq!(plan.next_window(), Some(sliced(at(0), at(1))));
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
                Vec::new(),
            )
            .expect("plan");
            let mut covered = TimeDelta::zero();
            let mut windows = Vec::new();
            while let Some(window) = plan.next_window() {
                assert!(window.from >= at(0) && window.until <= at(0) + TimeDelta::minutes(150));
                covered += window.until - window.from;
                windows.push(window);
                // Neither fast nor slow: the slice stays an hour.
                plan.covered(&window, Duration::from_millis(20));
            }
            assert_eq!(covered, TimeDelta::minutes(150), "{windows:?}");
            assert_eq!(windows.len(), 3);
        }
    }

    #[test]
    fn fast_steps_double_the_slice_up_to_its_maximum_and_slow_ones_halve_it_to_its_minimum() {
        let mut plan =
            ScanPlan::new(at(0), at(100_000), None, false, &search(), Vec::new()).expect("plan");
        for _ in 0..20 {
            let window = plan.next_window().expect("more to scan");
            plan.covered(&window, Duration::from_millis(1));
        }
        assert_eq!(plan.slice(), MAX_SLICE);
        for _ in 0..40 {
            let window = plan.next_window().expect("more to scan");
            plan.covered(&window, Duration::from_millis(60));
        }
        assert_eq!(plan.slice(), TimeDelta::hours(1) / MIN_SLICE_DIVISOR);
    }

    #[test]
    fn every_step_runs_within_what_is_left_of_the_budget_but_a_first_at_the_smallest_slice() {
        let mut plan =
            ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        assert_eq!(
            plan.begin_step(Duration::from_millis(5), &window),
            StepBound::Within(Duration::from_millis(75))
        );
        assert_eq!(
            plan.begin_step(Duration::from_millis(100), &window),
            StepBound::Within(Duration::ZERO)
        );
        let smallest = Cursor {
            slice: Some(TimeDelta::seconds(1)),
            ..Cursor::at(at(5), Uuid::nil())
        };
        let mut plan = ScanPlan::new(at(0), at(10), Some(smallest), false, &search(), Vec::new())
            .expect("plan");
        assert_eq!(plan.slice(), TimeDelta::hours(1) / MIN_SLICE_DIVISOR);
        let window = plan.next_window().expect("window");
        assert_eq!(
            plan.begin_step(Duration::ZERO, &window),
            StepBound::Unbounded
        );
        assert!(matches!(
            plan.begin_step(Duration::ZERO, &window),
            StepBound::Within(_)
        ));
    }

    #[test]
    fn a_cancelled_first_step_shrinks_the_next_calls_slice_and_a_later_one_does_not() {
        let mut plan =
            ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.begin_step(Duration::ZERO, &window);
        plan.cancelled(&window);
        assert_eq!(plan.slice(), TimeDelta::hours(1) / FIRST_STEP_SHRINK);
        let token = plan.resume(None);
        assert_eq!(token.slice, Some(TimeDelta::hours(1) / FIRST_STEP_SHRINK));
        let mut plan =
            ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.begin_step(Duration::ZERO, &window);
        plan.covered(&window, Duration::from_millis(20));
        let window = plan.next_window().expect("window");
        plan.begin_step(Duration::from_millis(20), &window);
        plan.cancelled(&window);
        assert_eq!(plan.slice(), TimeDelta::hours(1));
    }

    #[test]
    fn a_token_carries_its_slice_within_the_bounds() {
        let huge = Cursor {
            slice: Some(TimeDelta::days(400)),
            ..Cursor::at(at(5), Uuid::nil())
        };
        let plan =
            ScanPlan::new(at(0), at(10), Some(huge), false, &search(), Vec::new()).expect("plan");
        assert_eq!(plan.slice(), MAX_SLICE);
        // Newest first goes on at and below the cursor's row; oldest first at and above it.
        assert_eq!(
            plan.next_window().map(|window| window.until),
            Some(at(5) + TimeDelta::microseconds(1))
        );
        let plan =
            ScanPlan::new(at(0), at(10), Some(huge), true, &search(), Vec::new()).expect("plan");
        assert_eq!(plan.next_window().map(|window| window.from), Some(at(5)));
    }

    #[test]
    fn the_call_stops_before_a_step_that_would_likely_end_past_the_budget() {
        let mut plan =
            ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(&window, Duration::from_millis(30));
        assert!(!plan.should_stop(Duration::from_millis(30), Duration::from_millis(30)));
        assert!(plan.should_stop(Duration::from_millis(40), Duration::from_millis(30)));
        // Nothing is left: no reason to stop early.
        let mut plan =
            ScanPlan::new(at(0), at(1), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(&window, Duration::from_millis(79));
        assert!(!plan.should_stop(Duration::from_millis(79), Duration::from_millis(79)));
    }

    #[test]
    fn the_edge_cursor_covers_one_side_of_the_scan_and_nothing_beyond() {
        let mut plan =
            ScanPlan::new(at(0), at(10), None, false, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(&window, Duration::from_millis(20));
        assert_eq!(
            plan.edge(),
            Cursor::at(at(9) - TimeDelta::microseconds(1), Uuid::max())
        );
        assert_eq!(plan.scanned_until(), at(9));
        let mut plan =
            ScanPlan::new(at(0), at(10), None, true, &search(), Vec::new()).expect("plan");
        let window = plan.next_window().expect("window");
        plan.covered(&window, Duration::from_millis(20));
        assert_eq!(plan.edge(), Cursor::at(at(1), Uuid::nil()));
        assert_eq!(plan.scanned_until(), at(1));
    }
}
