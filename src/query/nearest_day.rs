//! The nearest day first, for a page that walks the `(service, ts, id)` index in order.
//!
//! With daily partitions, an ordered walk over a range of many days starts one index scan in
//! every partition of the range (a Merge Append) and fetches each one's first row before it
//! returns its own first row: a next page of one service, whose range runs back to the oldest
//! partition, paid about 1.4 ms more than with monthly partitions (BENCHMARKS.md, "A user's
//! events in time order"). Such a page reads first the UTC day where it starts (the cursor's,
//! else the range's near end, else today), which holds a whole page for any busy service, and
//! only when that day does not fill it, the rest of the range after it.

use chrono::{DateTime, Days, NaiveTime, Utc};

use super::cursor::Cursor;
use crate::filter::Filter;

/// The page's filter split in two: the day where the page starts, then the rest of its
/// range, in the page's order. None when one read does as well: the filter is not an ordered
/// walk of services, the range is within that day already, or an oldest-first page has no
/// start to begin from.
pub fn split(
    filter: &Filter,
    cursor: Option<&Cursor>,
    oldest_first: bool,
    now: DateTime<Utc>,
) -> Option<(Filter, Filter)> {
    if filter.services.is_empty()
        || filter.user_id.is_some()
        || filter.trace_id.is_some()
        || filter.needs_scan()
    {
        return None;
    }
    let (mut near, mut rest) = (filter.clone(), filter.clone());
    if oldest_first {
        let anchor = cursor.map(|cursor| cursor.ts).or(filter.start)?;
        let day_end = midnight(anchor).checked_add_days(Days::new(1))?;
        if filter.end.is_some_and(|end| end <= day_end) {
            return None;
        }
        near.end = Some(day_end);
        rest.start = Some(day_end);
    } else {
        // The range's end is exclusive: its day is the one of the instant before it.
        let anchor = cursor.map(|cursor| cursor.ts).or_else(|| {
            filter
                .end
                .map(|end| end - chrono::TimeDelta::microseconds(1))
        });
        let day_start = midnight(anchor.unwrap_or(now));
        if filter.start.is_some_and(|start| start >= day_start) {
            return None;
        }
        near.start = Some(day_start);
        rest.end = Some(day_start);
    }
    Some((near, rest))
}

/// The UTC midnight that starts `at`'s day.
fn midnight(at: DateTime<Utc>) -> DateTime<Utc> {
    at.date_naive().and_time(NaiveTime::MIN).and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, day, hour, 0, 0)
            .single()
            .expect("time")
    }

    fn services() -> Filter {
        Filter {
            services: vec!["checkout".to_owned()],
            ..Filter::default()
        }
    }

    fn cursor(ts: DateTime<Utc>) -> Cursor {
        Cursor::at(ts, Uuid::nil())
    }

    #[test]
    fn a_newest_first_page_reads_its_cursors_day_then_everything_before_it() {
        let (near, rest) =
            split(&services(), Some(&cursor(at(2, 15))), false, at(3, 9)).expect("split");
        assert_eq!((near.start, near.end), (Some(at(2, 0)), None));
        assert_eq!((rest.start, rest.end), (None, Some(at(2, 0))));
    }

    #[test]
    fn a_first_page_starts_at_the_ranges_end_or_today() {
        let ending = Filter {
            end: Some(at(2, 0)),
            ..services()
        };
        let (near, rest) = split(&ending, None, false, at(3, 9)).expect("split");
        assert_eq!((near.start, near.end), (Some(at(1, 0)), Some(at(2, 0))));
        assert_eq!(rest.end, Some(at(1, 0)));
        let (near, _) = split(&services(), None, false, at(3, 9)).expect("split");
        assert_eq!((near.start, near.end), (Some(at(3, 0)), None));
    }

    #[test]
    fn an_oldest_first_page_reads_its_day_then_everything_after_it() {
        let starting = Filter {
            start: Some(at(1, 6)),
            ..services()
        };
        let (near, rest) = split(&starting, None, true, at(3, 9)).expect("split");
        assert_eq!((near.start, near.end), (Some(at(1, 6)), Some(at(2, 0))));
        assert_eq!((rest.start, rest.end), (Some(at(2, 0)), None));
        assert!(
            split(&services(), None, true, at(3, 9)).is_none(),
            "no start"
        );
    }

    #[test]
    fn a_range_within_one_day_or_a_narrower_index_reads_once() {
        let hour = Filter {
            start: Some(at(2, 10)),
            end: Some(at(2, 11)),
            ..services()
        };
        assert!(split(&hour, None, false, at(3, 9)).is_none());
        assert!(split(&hour, None, true, at(3, 9)).is_none());
        let user = Filter {
            user_id: Some("u".to_owned()),
            ..services()
        };
        assert!(split(&user, None, false, at(3, 9)).is_none());
        let content = Filter {
            message_contains: Some("x".to_owned()),
            ..services()
        };
        assert!(split(&content, None, false, at(3, 9)).is_none());
        assert!(split(&Filter::default(), None, false, at(3, 9)).is_none());
    }
}
