//! The bounded buffer between the RPC handlers and the writer pool.
//!
//! Admission takes permits from two semaphores, one counting events and one counting bytes, so
//! memory is bounded in both. A request is admitted whole or not at all. Permits travel with the
//! [`Envelope`] and are released only when the writer drops it after the commit, so the bound
//! covers everything accepted but not yet durable. Under pressure each principal holds at
//! most its [`fair`] share, and refused callers are told successive turns of the drain
//! ([`retry`]), so that they do not come back together.

mod fair;
mod retry;

pub use fair::Holder;

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    time::Instant,
};

use opentelemetry::trace::SpanContext;

use crate::{
    config::BufferConfig,
    event::{EventRejection, ValidEvent},
    telemetry,
};

/// What the writer reports for an envelope once its events are durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Durable {
    /// Events now stored (newly written, or already present under the same id).
    pub stored: u64,
    /// Of `stored`, events that were already present (a retry).
    pub duplicates: u64,
    /// Events not stored: refused by PostgreSQL (kept in the dead-letter table), or with a
    /// field no PostgreSQL row can hold.
    pub rejected: Vec<EventRejection>,
}

/// A receiver for the outcome of one admitted request. If the writer never commits it (the
/// server stopped first), the sender is dropped and the receiver errors: not durable.
pub type AckReceiver = oneshot::Receiver<Durable>;

/// One admitted request on its way to a writer.
#[derive(Debug)]
pub struct Envelope {
    pub events: Vec<ValidEvent>,
    /// Marks the envelope pending until it is dropped (after its commit).
    _pending: PendingGuard,
    /// Buffer bytes this envelope holds (the sum of event weights).
    pub bytes: usize,
    /// When the envelope was admitted, for ack latency.
    pub admitted_at: Instant,
    /// The same moment by the wall clock, for the erasures that reach the envelope's events.
    pub admitted_wall: chrono::DateTime<chrono::Utc>,
    /// The span of the request, for the batch span to link to (when traces are exported).
    pub origin: Option<SpanContext>,
    pub ack: oneshot::Sender<Durable>,
    _held: fair::Held,
    _event_permit: OwnedSemaphorePermit,
    _byte_permit: OwnedSemaphorePermit,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("buffer is full")]
    Full { retry_after: Duration },
    #[error(
        "the buffer is under pressure and this principal holds its share ({held} of {share} events)"
    )]
    OverShare {
        retry_after: Duration,
        held: usize,
        share: usize,
    },
    #[error("server is shutting down")]
    Closed,
    #[error(
        "request of {events} events and {bytes} bytes can never fit a buffer of {max_events} events and {max_bytes} bytes"
    )]
    TooLarge {
        events: usize,
        bytes: usize,
        max_events: usize,
        max_bytes: usize,
    },
}

/// Current occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferUsage {
    pub events: usize,
    pub bytes: usize,
    pub max_events: usize,
    pub max_bytes: usize,
}

impl BufferUsage {
    /// True when fewer than 10% of the event slots, or 1% of the byte slots, are free: from
    /// there a sender alone is refused (the rest is headroom for others, [`fair`]).
    pub fn is_full(&self) -> bool {
        self.events * 10 >= self.max_events * 9 || self.bytes * 100 >= self.max_bytes * 99
    }
}

/// The sending side, shared by every RPC handler.
pub struct Buffer {
    sender: RwLock<Option<mpsc::Sender<Envelope>>>,
    pending: Arc<PendingTracker>,
    event_slots: Arc<Semaphore>,
    byte_slots: Arc<Semaphore>,
    config: BufferConfig,
    drain: Mutex<DrainRate>,
    fair: Arc<fair::FairShare>,
    line: retry::RetryLine,
}

/// The receiving side, shared by the writers.
pub type BufferReceiver = Arc<tokio::sync::Mutex<mpsc::Receiver<Envelope>>>;

impl Buffer {
    pub fn new(config: &BufferConfig) -> (Arc<Self>, BufferReceiver) {
        // Every envelope holds at least one event permit, so the channel never holds more
        // envelopes than there are event slots: `try_send` cannot find it full.
        let (sender, receiver) = mpsc::channel(config.max_events);
        let buffer = Self {
            sender: RwLock::new(Some(sender)),
            pending: Arc::new(PendingTracker::default()),
            event_slots: Arc::new(Semaphore::new(config.max_events)),
            byte_slots: Arc::new(Semaphore::new(config.max_bytes)),
            config: config.clone(),
            drain: Mutex::new(DrainRate::new()),
            fair: fair::FairShare::new(config.max_events),
            line: retry::RetryLine::new(),
        };
        (
            Arc::new(buffer),
            Arc::new(tokio::sync::Mutex::new(receiver)),
        )
    }

    /// Admits a request's valid events for `holder`, waiting for room at most `admit_wait`,
    /// doubled for each earlier attempt of the same call ([`Buffer::admit_wait`]).
    pub async fn admit(
        &self,
        events: Vec<ValidEvent>,
        holder: &Holder,
        previous_attempts: u32,
    ) -> Result<AckReceiver, AdmitError> {
        let count = events.len();
        let bytes: usize = events.iter().map(ValidEvent::weight).sum();
        if count > self.config.max_events || bytes > self.config.max_bytes {
            return Err(AdmitError::TooLarge {
                events: count,
                bytes,
                max_events: self.config.max_events,
                max_bytes: self.config.max_bytes,
            });
        }
        if self.is_closed() {
            return Err(AdmitError::Closed);
        }
        let deadline = Instant::now() + self.admit_wait(previous_attempts);
        let held = self.take_share(holder, count, deadline).await?;
        let full = || AdmitError::Full {
            retry_after: self.retry_after(count),
        };
        // Both fit in u32: the config caps the capacities and the checks above cap the request.
        let event_permit = acquire(&self.event_slots, count as u32, deadline)
            .await
            .ok_or_else(full)?;
        let byte_permit = acquire(&self.byte_slots, bytes as u32, deadline)
            .await
            .ok_or_else(full)?;
        let (ack, ack_receiver) = oneshot::channel();
        let envelope = Envelope {
            events,
            _pending: self.pending.track(),
            bytes,
            admitted_at: Instant::now(),
            admitted_wall: chrono::Utc::now(),
            origin: telemetry::current_span_context(),
            ack,
            _held: held,
            _event_permit: event_permit,
            _byte_permit: byte_permit,
        };
        let guard = self.sender.read().map_err(|_| AdmitError::Closed)?;
        let sender = guard.as_ref().ok_or(AdmitError::Closed)?;
        sender.try_send(envelope).map_err(|_| AdmitError::Closed)?;
        Ok(ack_receiver)
    }

    /// How long a request may wait for room: `admit_wait` for a first attempt, doubled for each
    /// earlier attempt its client reports (gRFC A6's `grpc-previous-rpc-attempts`), up to
    /// [`MAX_RETRY_PATIENCE`] times. A caller refused before, and back at its turn, finds a
    /// drain a little slower than estimated: it waits the difference instead of spending
    /// another of its few attempts. `admit_wait = 0` never waits, retry or not.
    pub fn admit_wait(&self, previous_attempts: u32) -> Duration {
        let doublings = previous_attempts.min(MAX_RETRY_PATIENCE.trailing_zeros());
        self.config.admit_wait * (1 << doublings)
    }

    /// Takes `holder`'s room for `count` events in the fair share, waiting until `deadline`
    /// for room it holds to be given back.
    async fn take_share(
        &self,
        holder: &Holder,
        count: usize,
        deadline: Instant,
    ) -> Result<fair::Held, AdmitError> {
        loop {
            // Registered before the check, so that no give-back between the two is missed.
            let released = self.fair.released();
            tokio::pin!(released);
            released.as_mut().enable();
            let now = Instant::now();
            let over = match self.fair.take(holder, count, self.usage().events, now) {
                Ok(held) => return Ok(held),
                Err(over) => over,
            };
            if now >= deadline || tokio::time::timeout_at(deadline, released).await.is_err() {
                let retry_after = self.advise(now, count, over.held + count - over.share);
                if !over.contended {
                    // Alone, it is only kept out of the headroom: to it, the buffer is full.
                    return Err(AdmitError::Full { retry_after });
                }
                return Err(AdmitError::OverShare {
                    retry_after,
                    held: over.held,
                    share: over.share,
                });
            }
        }
    }

    /// Waits until every envelope admitted before this call has been written (or abandoned),
    /// at most `timeout`. Returns false on timeout.
    pub async fn wait_for_admitted(&self, timeout: Duration) -> bool {
        let barrier = self.pending.last_admitted();
        tokio::time::timeout(timeout, self.pending.wait_until_done(barrier))
            .await
            .is_ok()
    }

    /// Refuses further admissions. Writers drain what is queued, then stop.
    pub fn close(&self) {
        if let Ok(mut sender) = self.sender.write() {
            sender.take();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.sender.read().map_or(true, |sender| sender.is_none())
    }

    pub fn usage(&self) -> BufferUsage {
        BufferUsage {
            events: self.config.max_events - self.event_slots.available_permits(),
            bytes: self.config.max_bytes - self.byte_slots.available_permits(),
            max_events: self.config.max_events,
            max_bytes: self.config.max_bytes,
        }
    }

    /// Called by writers after a commit of `events` that took `elapsed`, to estimate how fast
    /// the buffer can drain.
    pub fn record_drained(&self, events: usize, elapsed: Duration) {
        if let Ok(mut drain) = self.drain.lock() {
            drain.record(events, elapsed, Instant::now());
        }
    }

    /// How long a refused request of `request_events` should wait: until the buffer has
    /// drained enough for it, at the drain rate of the last second, and the requests refused
    /// before it had their turn ([`retry::RetryLine`]), between 20 ms and 10 s. With no commit
    /// in the last second the rate is unknown (writers just woke up, or the database is down)
    /// and the advice is spread over 1 to 2 s.
    pub fn retry_after(&self, request_events: usize) -> Duration {
        let usage = self.usage();
        let to_drain = (usage.events + request_events).saturating_sub(usage.max_events);
        self.advise(Instant::now(), request_events, to_drain)
    }

    /// The advice for a request of `events` that fits once `to_drain` events are written.
    fn advise(&self, now: Instant, events: usize, to_drain: usize) -> Duration {
        let rate = self
            .drain
            .lock()
            .map_or(0.0, |mut drain| drain.events_per_second(now));
        // Turns a little later than the estimate: an estimate on the high side would bring
        // callers back to a buffer still full, and each refusal costs them an attempt.
        let rate = rate * PACE;
        let room_in = if rate > 0.0 {
            Duration::from_secs_f64((to_drain as f64 / rate).min(retry::MAX_RETRY.as_secs_f64()))
        } else {
            Duration::ZERO
        };
        self.line.advise(now, events, room_in, rate)
    }

    /// How many more events and bytes `holder` may send right now: the buffer's free room,
    /// and under pressure what is left of its share. The credit of `IngestStream` acks.
    pub fn credit(&self, holder: &Holder) -> (usize, usize) {
        let usage = self.usage();
        let events = usage
            .max_events
            .saturating_sub(usage.events)
            .min(self.fair.room(holder, usage.events, Instant::now()));
        (events, usage.max_bytes.saturating_sub(usage.bytes))
    }
}

/// Sequence numbers of envelopes admitted and not yet dropped by a writer.
#[derive(Debug, Default)]
struct PendingTracker {
    state: Mutex<PendingState>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct PendingState {
    next: u64,
    pending: BTreeSet<u64>,
}

#[derive(Debug)]
struct PendingGuard {
    sequence: u64,
    tracker: Arc<PendingTracker>,
}

impl PendingTracker {
    fn track(self: &Arc<Self>) -> PendingGuard {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sequence = state.next;
        state.next += 1;
        state.pending.insert(sequence);
        PendingGuard {
            sequence,
            tracker: self.clone(),
        }
    }

    fn last_admitted(&self) -> Option<u64> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.next.checked_sub(1)
    }

    async fn wait_until_done(&self, barrier: Option<u64>) {
        let Some(barrier) = barrier else { return };
        loop {
            let changed = self.changed.notified();
            {
                let state = self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if state.pending.first().is_none_or(|oldest| *oldest > barrier) {
                    return;
                }
            }
            changed.await;
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut state = self
            .tracker
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.pending.remove(&self.sequence);
        drop(state);
        self.tracker.changed.notify_waiters();
    }
}

async fn acquire(
    slots: &Arc<Semaphore>,
    count: u32,
    deadline: Instant,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_many_owned(count) {
        return Some(permit);
    }
    let wait = deadline.saturating_duration_since(Instant::now());
    if wait.is_zero() {
        return None;
    }
    tokio::time::timeout(wait, slots.clone().acquire_many_owned(count))
        .await
        .ok()?
        .ok()
}

/// Commits of the last second, to estimate the drain rate: what drained in the last second,
/// or the most that drained in a second lately ([`PEAK_MEMORY`]), whichever is more. Refused
/// callers come back when told: were the advice to follow the last second alone, a buffer
/// that callers left idle would seem to drain little, make the advice longer, and the buffer
/// idler still.
struct DrainRate {
    /// When each commit ended, its events, and how long it took.
    samples: VecDeque<(Instant, usize, Duration)>,
    /// The highest rate seen lately, and when.
    peak: Option<(f64, Instant)>,
}

/// How long the highest drain rate seen is remembered.
const PEAK_MEMORY: Duration = Duration::from_secs(10);

const DRAIN_WINDOW: Duration = Duration::from_secs(1);

/// The share of the estimated drain rate the retry advice counts on.
const PACE: f64 = 0.75;

/// The most a retry's wait for room grows: `admit_wait` times this (a power of two).
const MAX_RETRY_PATIENCE: u32 = 8;
/// Bounds the samples kept (one per committed batch).
const MAX_DRAIN_SAMPLES: usize = 1024;

impl DrainRate {
    fn new() -> Self {
        Self {
            samples: VecDeque::new(),
            peak: None,
        }
    }

    fn record(&mut self, events: usize, elapsed: Duration, now: Instant) {
        if self.samples.len() == MAX_DRAIN_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now, events, elapsed));
    }

    /// Events per second over the last second; zero when nothing drained in that time.
    fn events_per_second(&mut self, now: Instant) -> f64 {
        while self
            .samples
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > DRAIN_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some((oldest, _, _)) = self.samples.front() else {
            return 0.0;
        };
        let span = now.duration_since(*oldest).max(Duration::from_millis(50));
        let drained: usize = self.samples.iter().map(|(_, events, _)| events).sum();
        let rate = drained as f64 / span.as_secs_f64();
        let peak = match self.peak {
            Some((peak, at)) if peak >= rate && now.duration_since(at) < PEAK_MEMORY => peak,
            _ => {
                self.peak = Some((rate, now));
                rate
            }
        };
        rate.max(peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(count: usize) -> Vec<ValidEvent> {
        (0..count)
            .map(|index| ValidEvent::sample(index as u64))
            .collect()
    }

    fn holder() -> Holder {
        Holder::new("tests", 1)
    }

    fn config(max_events: usize) -> BufferConfig {
        BufferConfig {
            max_events,
            max_bytes: 1 << 20,
            admit_wait: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn admission_is_refused_once_event_slots_are_taken_and_resumes_after_release() {
        let (buffer, receiver) = Buffer::new(&config(10));
        let _first = buffer.admit(events(6), &holder(), 0).await.expect("fits");
        // Another principal, within its share: refused for want of room alone.
        let other = Holder::new("other", 1);
        let refused = buffer.admit(events(5), &other, 0).await.expect_err("full");
        assert!(
            matches!(refused, AdmitError::Full { retry_after } if retry_after >= retry::MIN_RETRY)
        );
        assert_eq!(buffer.usage().events, 6);
        let envelope = receiver.lock().await.recv().await.expect("queued");
        drop(envelope);
        assert_eq!(buffer.usage().events, 0);
        buffer
            .admit(events(5), &holder(), 0)
            .await
            .expect("fits again");
    }

    #[tokio::test]
    async fn byte_budget_bounds_admission_too() {
        let (buffer, _receiver) = Buffer::new(&BufferConfig {
            max_events: 1000,
            max_bytes: 1000,
            admit_wait: Duration::ZERO,
        });
        buffer
            .admit(events(5), &holder(), 0)
            .await
            .expect("5 small events fit");
        assert!(matches!(
            buffer.admit(events(5), &holder(), 0).await,
            Err(AdmitError::Full { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_are_told_successive_turns_of_the_recent_drain() {
        let (buffer, _receiver) = Buffer::new(&config(100_000));
        let unknown = buffer.retry_after(1_000);
        assert!(
            unknown >= retry::UNKNOWN_RATE_RETRY && unknown < retry::UNKNOWN_RATE_RETRY * 2,
            "no recent commit: the rate is unknown, {unknown:?}"
        );
        // 2,000 events drained over the last second: 2,000 events/s.
        buffer.record_drained(1_000, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        buffer.record_drained(1_000, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        // Requests of 1,000 refused one after the other: each its turn of the drain, counted
        // at PACE of the estimate (2,000 × 0.75 = 1,500 events/s: 667 ms each).
        for position in 0..4u64 {
            let delay = buffer.retry_after(1_000);
            let own_turn = Duration::from_secs_f64(1_000.0 / (2_000.0 * PACE));
            let turn = (own_turn * position as u32).max(retry::MIN_RETRY);
            assert!(
                delay >= turn && delay <= turn + own_turn / 4 + Duration::from_millis(1),
                "request {position}: {delay:?}, its turn at {turn:?}"
            );
        }
        // Bounded: a request far beyond the drain is told the longest wait at most.
        assert!(buffer.retry_after(200_000) <= retry::MAX_RETRY);
        // A second without commits: the rate is unknown again.
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(buffer.retry_after(1_000) >= retry::UNKNOWN_RATE_RETRY);
    }

    #[tokio::test]
    async fn a_principal_over_its_share_under_pressure_is_refused_while_another_gets_in() {
        let (buffer, _receiver) = Buffer::new(&config(1_000));
        let (noisy, quiet) = (Holder::new("noisy", 1), Holder::new("quiet", 1));
        let _quiet = buffer.admit(events(10), &quiet, 0).await.expect("room");
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(
                buffer
                    .admit(events(100), &noisy, 0)
                    .await
                    .expect("its share"),
            );
        }
        assert!(matches!(
            buffer.admit(events(100), &noisy, 0).await,
            Err(AdmitError::OverShare {
                held: 500,
                share: 500,
                ..
            })
        ));
        buffer
            .admit(events(100), &quiet, 0)
            .await
            .expect("the quiet one gets in");
        assert_eq!(buffer.credit(&noisy).0, 0, "no credit left over its share");
        assert!(buffer.credit(&quiet).0 > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_admitted_envelopes_ends_when_earlier_ones_are_written() {
        let (buffer, receiver) = Buffer::new(&config(100));
        assert!(
            buffer.wait_for_admitted(Duration::from_millis(10)).await,
            "nothing pending"
        );
        let _ack = buffer.admit(events(1), &holder(), 0).await.expect("fits");
        assert!(
            !buffer.wait_for_admitted(Duration::from_millis(50)).await,
            "still queued"
        );
        let envelope = receiver.lock().await.recv().await.expect("queued");
        let waiter = {
            let buffer = buffer.clone();
            tokio::spawn(async move { buffer.wait_for_admitted(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(envelope);
        assert!(
            waiter.await.expect("waiter"),
            "done once the envelope is written"
        );
    }

    #[tokio::test]
    async fn a_request_larger_than_the_buffer_is_too_large_not_full() {
        let (buffer, _receiver) = Buffer::new(&config(3));
        assert!(matches!(
            buffer.admit(events(4), &holder(), 0).await,
            Err(AdmitError::TooLarge { events: 4, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_waits_up_to_admit_wait_for_room() {
        let (buffer, receiver) = Buffer::new(&BufferConfig {
            admit_wait: Duration::from_secs(5),
            ..config(2)
        });
        let _held = buffer.admit(events(2), &holder(), 0).await.expect("fits");
        let writer_side = receiver.clone();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(writer_side.lock().await.recv().await);
        });
        let started = tokio::time::Instant::now();
        // Others than the holder of the room, each within its share: they wait for room.
        let _second = buffer
            .admit(events(2), &Holder::new("second", 1), 0)
            .await
            .expect("admitted once room frees");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        releaser.await.expect("releaser");
        // Nothing frees room now: the wait ends at admit_wait, refused.
        let started = tokio::time::Instant::now();
        assert!(matches!(
            buffer.admit(events(1), &Holder::new("third", 1), 0).await,
            Err(AdmitError::Full { .. })
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_waits_longer_for_room_the_more_attempts_it_spent() {
        let (buffer, _receiver) = Buffer::new(&BufferConfig {
            admit_wait: Duration::from_millis(200),
            ..config(2)
        });
        let _held = buffer.admit(events(2), &holder(), 0).await.expect("fits");
        for (previous_attempts, waited) in [(0, 200), (1, 400), (2, 800), (3, 1_600), (9, 1_600)] {
            let started = tokio::time::Instant::now();
            let refused = buffer
                .admit(events(1), &Holder::new("retrying", 1), previous_attempts)
                .await;
            assert!(
                matches!(refused, Err(AdmitError::Full { .. })),
                "{refused:?}"
            );
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(waited),
                "after {previous_attempts} attempts"
            );
        }
        // No wait configured: a retry is refused at once too.
        let (buffer, _receiver) = Buffer::new(&config(2));
        let _held = buffer.admit(events(2), &holder(), 0).await.expect("fits");
        let started = tokio::time::Instant::now();
        assert!(
            buffer
                .admit(events(1), &Holder::new("retrying", 1), 4)
                .await
                .is_err()
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn closed_buffer_refuses_and_writers_see_the_end_after_draining() {
        let (buffer, receiver) = Buffer::new(&config(10));
        let _ack = buffer.admit(events(1), &holder(), 0).await.expect("fits");
        buffer.close();
        assert_eq!(
            buffer
                .admit(events(1), &holder(), 0)
                .await
                .expect_err("closed"),
            AdmitError::Closed
        );
        let mut receiver = receiver.lock().await;
        assert!(receiver.recv().await.is_some());
        assert!(receiver.recv().await.is_none());
    }
}
