//! Query's archived tier: the events of a page that live in archived objects, merged with
//! the page's rows by `(timestamp, id)`, so that one page token goes on across both tiers.
//!
//! A call lists the objects ahead of its cursor, nearest first (from the catalog: by service
//! and time span, by user through `archive_users`), and fetches and decodes
//! `archive.query_concurrency` of them at a time (while the rows are read, when the archive
//! surely comes first). It then takes objects
//! in order until the page is settled (the next object starts beyond the page's last event),
//! the rows' own bound is passed, or the call's time (`search.max_scan_time`) is spent. The
//! first object it did not read bounds the page: the token resumes there. A call always
//! reads the objects its cursor lies in, so paging always moves on.
//!
//! Each event lives in exactly one tier at any moment (the lifecycle job records an object
//! and deletes its rows in one transaction), but a call reads the two at different moments.
//! So after reading, it lists the objects of the range it covered again: when that list
//! changed (an object was archived, rewritten, restored or expired meanwhile), the page is
//! read again, and no event is missed or repeated.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::{task::JoinHandle, time::Instant};
use uuid::Uuid;

use crate::{
    archive::{
        Archive, ArchiveError, Matcher,
        cache::{DecodedObject, LineKey},
        catalog::{self, ArchivedObject, Selection},
        format::ArchivedEvent,
    },
    filter::Filter,
};

/// Objects listed per call: the first one past them bounds the call's reach.
const LISTED_OBJECTS: i64 = 256;

/// A point in a read's order: `(timestamp, id)`.
pub type Position = (DateTime<Utc>, Uuid);

/// Which way a read goes.
#[derive(Debug, Clone, Copy)]
pub struct Direction {
    pub oldest_first: bool,
}

impl Direction {
    /// `a` comes before `b` in this read.
    pub fn before(self, a: Position, b: Position) -> bool {
        if self.oldest_first { a < b } else { a > b }
    }

    /// The end of an object nearest to where the read comes from, as a bound: everything
    /// strictly before it lies outside the object.
    fn near_edge(self, object: &ArchivedObject) -> Position {
        if self.oldest_first {
            (object.min_ts, Uuid::nil())
        } else {
            (object.max_ts, Uuid::max())
        }
    }

    /// Every event of `object` comes strictly after `position`.
    fn beyond(self, object: &ArchivedObject, position: Position) -> bool {
        if self.oldest_first {
            object.min_ts > position.0
        } else {
            object.max_ts < position.0
        }
    }

    /// The timestamps `[start, end)` that events strictly after `from` and up to `to`
    /// (inclusive) can have, within the filter's range.
    fn span(
        self,
        filter: &Filter,
        from: Option<Position>,
        to: Option<Position>,
    ) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let micro = TimeDelta::microseconds(1);
        let (low, high) = if self.oldest_first {
            (from, to)
        } else {
            (to, from)
        };
        // A bound on the id's own extreme takes no event of its timestamp.
        let start = low.map(|(ts, id)| if id == Uuid::max() { ts + micro } else { ts });
        let end = high.map(|(ts, id)| if id == Uuid::nil() { ts } else { ts + micro });
        let start = match (filter.start, start) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let end = match (filter.end, end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (start, end)
    }
}

/// What the archive gave a page.
pub struct Found {
    /// The nearest matching archived events ahead of the cursor and within the rows' bound,
    /// at most one more than the page's limit, in the read's order.
    pub events: Vec<ArchivedEvent>,
    /// The near edge of the first object not read: the page ends before it.
    pub bound: Option<Position>,
}

/// Why a call's archived part could not be used.
pub enum Unsettled {
    /// The archive changed under the call: read the page again.
    Changed,
    Failed(ArchiveError),
}

impl From<ArchiveError> for Unsettled {
    fn from(error: ArchiveError) -> Self {
        Self::Failed(error)
    }
}

impl From<sqlx::Error> for Unsettled {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(error.into())
    }
}

type Load = JoinHandle<Result<Arc<DecodedObject>, ArchiveError>>;

/// The archived part of one call, begun before its rows are read.
pub struct Reading {
    archive: Arc<Archive>,
    direction: Direction,
    cursor: Option<Position>,
    /// The objects ahead, nearest first.
    objects: Vec<ArchivedObject>,
    /// The first object past the listed ones, if any: the call reaches no further.
    unlisted: Option<ArchivedObject>,
    /// Loads of `objects[read..]`, in order.
    loads: VecDeque<Load>,
    concurrency: usize,
}

impl Reading {
    /// Lists the objects ahead of `cursor` and starts loading the nearest.
    pub async fn begin(
        archive: &Arc<Archive>,
        pool: &sqlx::PgPool,
        filter: &Filter,
        cursor: Option<Position>,
        direction: Direction,
        concurrency: usize,
    ) -> Result<Self, ArchiveError> {
        let (start, end) = direction.span(filter, cursor, None);
        let selection = Selection {
            start,
            end,
            ..filter.archive_selection()
        };
        let mut connection = pool.acquire().await?;
        let mut objects = catalog::select_nearest(
            &mut connection,
            &selection,
            direction.oldest_first,
            LISTED_OBJECTS + 1,
        )
        .await?;
        let unlisted = (objects.len() as i64 > LISTED_OBJECTS)
            .then(|| objects.pop())
            .flatten();
        // Objects whose trace filter rules the trace out need no reading.
        objects.retain(|object| object.may_hold_trace(filter.trace_id.as_deref()));
        let mut reading = Self {
            archive: archive.clone(),
            direction,
            cursor,
            objects,
            unlisted,
            loads: VecDeque::new(),
            concurrency,
        };
        // Fetched while the rows are read when the archive surely comes first: oldest first,
        // or a cursor already inside an object. Newest first, the rows usually fill the page
        // and the objects are fetched only if they do not.
        let first_needed = reading
            .objects
            .first()
            .is_some_and(|object| cursor.is_some_and(|cursor| !direction.beyond(object, cursor)));
        if direction.oldest_first || first_needed {
            reading.keep_loading(0);
        }
        Ok(reading)
    }

    /// Whether no object lies ahead (the rows are the whole answer).
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.unlisted.is_none()
    }

    /// Keeps `concurrency` loads going from object `next`.
    fn keep_loading(&mut self, next: usize) {
        let mut index = next + self.loads.len();
        while self.loads.len() < self.concurrency && index < self.objects.len() {
            let object = self.objects[index].clone();
            self.loads.push_back(self.archive.decode(object));
            index += 1;
        }
    }

    /// Reads objects in order until the page is settled, `rows_bound` (where the rows' part
    /// of the page ends, None: they reached the end) is passed, or `deadline` (once the call
    /// has moved past its cursor). `rows` are the rows' positions, for where the page ends.
    pub async fn finish(
        &mut self,
        filter: &Filter,
        rows: &[Position],
        rows_bound: Option<Position>,
        limit: usize,
        deadline: Instant,
        pool: &sqlx::PgPool,
    ) -> Result<Found, Unsettled> {
        let direction = self.direction;
        let matcher = filter.archived_matcher();
        let needles = Arc::new(filter.archived_needles());
        let mut events: Vec<ArchivedEvent> = Vec::new();
        let mut read = 0;
        while read < self.objects.len() {
            let object = self.objects[read].clone();
            let object = &object;
            let edge = direction.near_edge(object);
            let past_rows = rows_bound.is_some_and(|end| direction.beyond(object, end));
            let settled = self
                .last_of_page(rows, &events, limit)
                .is_some_and(|last| direction.beyond(object, last));
            // Objects the cursor lies in are read whatever the time: the call moves on.
            let must = self
                .cursor
                .is_some_and(|cursor| !direction.beyond(object, cursor));
            if past_rows || settled || (!must && Instant::now() >= deadline) {
                return Ok(Found {
                    events,
                    bound: Some(edge),
                });
            }
            self.keep_loading(read);
            let Some(load) = self.loads.pop_front() else {
                return Ok(Found {
                    events,
                    bound: Some(edge),
                });
            };
            let decoded = if must {
                load.await
            } else {
                match tokio::time::timeout_at(deadline, load).await {
                    Ok(decoded) => decoded,
                    // The load goes on, for the next call.
                    Err(_) => {
                        return Ok(Found {
                            events,
                            bound: Some(edge),
                        });
                    }
                }
            };
            let decoded = match decoded.map_err(ArchiveError::Task)? {
                Ok(decoded) => decoded,
                Err(ArchiveError::Gone { path }) => {
                    // Rewritten or expired since it was listed, or lost from the store.
                    return Err(self.gone(pool, object.id, path).await);
                }
                Err(error) => return Err(error.into()),
            };
            read += 1;
            self.keep_loading(read);
            // One more than the page takes: an object cut short then holds the page's end,
            // so the page never ends past what was read of it.
            let taken = take_matches(
                decoded,
                matcher.clone(),
                needles.clone(),
                self.cursor,
                rows_bound,
                limit + 1,
                direction,
            )
            .await?;
            events = merge(events, taken, limit + 1, direction);
        }
        // Every listed object read: the first one past them, if any, bounds the page.
        let bound = self
            .unlisted
            .as_ref()
            .map(|object| direction.near_edge(object));
        Ok(Found { events, bound })
    }

    /// Where the page would end with what is in hand: the `limit`-th nearest of the rows
    /// and the archived events so far; None while there are fewer.
    fn last_of_page(
        &self,
        rows: &[Position],
        events: &[ArchivedEvent],
        limit: usize,
    ) -> Option<Position> {
        if rows.len() + events.len() < limit || limit == 0 {
            return None;
        }
        let mut positions: Vec<Position> = rows
            .iter()
            .copied()
            .chain(events.iter().map(|event| (event.timestamp, event.id)))
            .collect();
        let direction = self.direction;
        positions.sort_by(|a, b| order(direction, *a, *b));
        positions.get(limit - 1).copied()
    }

    /// An object that vanished from the store: read again when the catalog forgot it too (it
    /// was rewritten or expired); data loss, said by name, when the catalog still holds it.
    async fn gone(&self, pool: &sqlx::PgPool, id: i64, path: String) -> Unsettled {
        let recorded: Result<bool, sqlx::Error> =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM archives WHERE id = $1)")
                .bind(id)
                .fetch_one(pool)
                .await;
        match recorded {
            Ok(true) => Unsettled::Failed(ArchiveError::Missing { path }),
            Ok(false) => Unsettled::Changed,
            Err(error) => error.into(),
        }
    }

    /// Checks that the objects of the range the page covers (from the cursor up to `end`)
    /// are still those the call listed: else a tier changed under it.
    pub async fn check_unchanged(
        &self,
        filter: &Filter,
        end: Option<Position>,
        pool: &sqlx::PgPool,
    ) -> Result<(), Unsettled> {
        let (start, stop) = self.direction.span(filter, self.cursor, end);
        let covers = |object: &ArchivedObject| {
            start.is_none_or(|start| object.max_ts >= start)
                && stop.is_none_or(|stop| object.min_ts < stop)
        };
        let mut listed: Vec<i64> = self
            .objects
            .iter()
            .chain(self.unlisted.iter())
            .filter(|object| covers(object) && object.may_hold_trace(filter.trace_id.as_deref()))
            .map(|object| object.id)
            .collect();
        let selection = Selection {
            start,
            end: stop,
            ..filter.archive_selection()
        };
        let mut connection = pool.acquire().await?;
        let mut now: Vec<i64> = catalog::select(&mut connection, &selection)
            .await?
            .into_iter()
            .filter(|object| object.may_hold_trace(filter.trace_id.as_deref()))
            .map(|object| object.id)
            .collect();
        listed.sort_unstable();
        now.sort_unstable();
        if listed == now {
            Ok(())
        } else {
            Err(Unsettled::Changed)
        }
    }
}

/// Compares two positions in a read's order.
pub fn order(direction: Direction, a: Position, b: Position) -> std::cmp::Ordering {
    if direction.oldest_first {
        a.cmp(&b)
    } else {
        b.cmp(&a)
    }
}

/// The nearest `limit` of two lists of events, in the read's order.
fn merge(
    mut events: Vec<ArchivedEvent>,
    taken: Vec<ArchivedEvent>,
    limit: usize,
    direction: Direction,
) -> Vec<ArchivedEvent> {
    events.extend(taken);
    events.sort_by(|a, b| order(direction, (a.timestamp, a.id), (b.timestamp, b.id)));
    events.truncate(limit);
    events
}

/// The first `limit` events of an object that match, strictly after `cursor` and up to
/// `bound` (inclusive), in the read's order; off the async threads when the object is big.
/// A line without one of `needles` in its text is skipped without being parsed.
async fn take_matches(
    decoded: Arc<DecodedObject>,
    matcher: Matcher,
    needles: Arc<Vec<String>>,
    cursor: Option<Position>,
    bound: Option<Position>,
    limit: usize,
    direction: Direction,
) -> Result<Vec<ArchivedEvent>, ArchiveError> {
    // A few thousand lines are matched in well under a millisecond.
    const INLINE_LINES: usize = 4_096;
    let inline = decoded.lines.len() <= INLINE_LINES;
    let scan = move || {
        let lines = &decoded.lines;
        let key = |line: &LineKey| (line.timestamp, line.id);
        let (first, end) = if direction.oldest_first {
            let first = cursor.map_or(0, |cursor| {
                lines.partition_point(|line| key(line) <= cursor)
            });
            (first, lines.len())
        } else {
            let end = cursor.map_or(lines.len(), |cursor| {
                lines.partition_point(|line| key(line) < cursor)
            });
            (0, end)
        };
        let ahead: Box<dyn Iterator<Item = &LineKey>> = if direction.oldest_first {
            Box::new(lines[first..end].iter())
        } else {
            Box::new(lines[first..end].iter().rev())
        };
        let mut taken = Vec::new();
        for line in ahead {
            if taken.len() == limit || bound.is_some_and(|bound| direction.before(bound, key(line)))
            {
                break;
            }
            let text = decoded.text(line);
            if !needles.iter().all(|needle| text.contains(needle.as_str())) {
                continue;
            }
            let event = decoded.event(line)?;
            if matcher(&event) {
                taken.push(event);
            }
        }
        Ok(taken)
    };
    if inline {
        return scan();
    }
    tokio::task::spawn_blocking(scan)
        .await
        .map_err(ArchiveError::Task)?
}

impl Found {
    /// Nothing archived, no bound: what a call with no object ahead gets.
    pub fn none() -> Self {
        Self {
            events: Vec::new(),
            bound: None,
        }
    }
}

/// How long a call may wait for objects: what is left of `search.max_scan_time`.
pub fn deadline(started: std::time::Instant, budget: Duration) -> Instant {
    Instant::from_std(started + budget)
}
