//! The bounded buffer between the RPC handlers and the writer pool.
//!
//! Admission takes permits from two semaphores, one counting events and one counting bytes, so
//! memory is bounded in both. A request is admitted whole or not at all. Permits travel with the
//! [`Envelope`] and are released only when the writer drops it after the commit, so the bound
//! covers everything accepted but not yet durable.

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
    _event_permit: OwnedSemaphorePermit,
    _byte_permit: OwnedSemaphorePermit,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("buffer is full")]
    Full { retry_after: Duration },
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
    /// True when fewer than 1% of the event or byte slots are free.
    pub fn is_full(&self) -> bool {
        self.events * 100 >= self.max_events * 99 || self.bytes * 100 >= self.max_bytes * 99
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
        };
        (
            Arc::new(buffer),
            Arc::new(tokio::sync::Mutex::new(receiver)),
        )
    }

    /// Admits a request's valid events, waiting at most `admit_wait` for room.
    pub async fn admit(&self, events: Vec<ValidEvent>) -> Result<AckReceiver, AdmitError> {
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
        let deadline = Instant::now() + self.config.admit_wait;
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
            _event_permit: event_permit,
            _byte_permit: byte_permit,
        };
        let guard = self.sender.read().map_err(|_| AdmitError::Closed)?;
        let sender = guard.as_ref().ok_or(AdmitError::Closed)?;
        sender.try_send(envelope).map_err(|_| AdmitError::Closed)?;
        Ok(ack_receiver)
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

    /// Called by writers after a commit, to estimate how fast the buffer drains.
    pub fn record_drained(&self, events: usize) {
        if let Ok(mut drain) = self.drain.lock() {
            drain.record(events, Instant::now());
        }
    }

    /// How long a refused client should wait: the time to drain what is queued ahead of it plus
    /// its own request at the drain rate of the last second, between 100 ms and 10 s. With no
    /// commit in the last second the rate is unknown (writers just woke up, or the database is
    /// down) and the advice is 1 s.
    pub fn retry_after(&self, request_events: usize) -> Duration {
        let backlog = (self.usage().events + request_events) as f64;
        let rate = self
            .drain
            .lock()
            .map_or(0.0, |mut drain| drain.events_per_second(Instant::now()));
        if rate <= 0.0 {
            return UNKNOWN_RATE_RETRY;
        }
        Duration::from_secs_f64((backlog / rate).clamp(0.1, 10.0))
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

/// Commits of the last second, to estimate the drain rate.
struct DrainRate {
    samples: VecDeque<(Instant, usize)>,
}

const DRAIN_WINDOW: Duration = Duration::from_secs(1);
/// Retry advice when nothing committed in the last `DRAIN_WINDOW`.
const UNKNOWN_RATE_RETRY: Duration = Duration::from_secs(1);
/// Bounds the samples kept (one per committed batch).
const MAX_DRAIN_SAMPLES: usize = 1024;

impl DrainRate {
    fn new() -> Self {
        Self {
            samples: VecDeque::new(),
        }
    }

    fn record(&mut self, events: usize, now: Instant) {
        if self.samples.len() == MAX_DRAIN_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((now, events));
    }

    /// Events per second over the last second; zero when nothing drained in that time.
    fn events_per_second(&mut self, now: Instant) -> f64 {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > DRAIN_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some((oldest, _)) = self.samples.front() else {
            return 0.0;
        };
        let span = now.duration_since(*oldest).max(Duration::from_millis(50));
        let drained: usize = self.samples.iter().map(|(_, events)| events).sum();
        drained as f64 / span.as_secs_f64()
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
        let _first = buffer.admit(events(6)).await.expect("fits");
        let refused = buffer.admit(events(5)).await.expect_err("full");
        assert!(
            matches!(refused, AdmitError::Full { retry_after } if retry_after >= Duration::from_millis(100))
        );
        assert_eq!(buffer.usage().events, 6);
        let envelope = receiver.lock().await.recv().await.expect("queued");
        drop(envelope);
        assert_eq!(buffer.usage().events, 0);
        buffer.admit(events(5)).await.expect("fits again");
    }

    #[tokio::test]
    async fn byte_budget_bounds_admission_too() {
        let (buffer, _receiver) = Buffer::new(&BufferConfig {
            max_events: 1000,
            max_bytes: 1000,
            admit_wait: Duration::ZERO,
        });
        buffer.admit(events(5)).await.expect("5 small events fit");
        assert!(matches!(
            buffer.admit(events(5)).await,
            Err(AdmitError::Full { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_delay_follows_the_recent_drain_rate() {
        let (buffer, _receiver) = Buffer::new(&config(100_000));
        assert_eq!(
            buffer.retry_after(1_000),
            UNKNOWN_RATE_RETRY,
            "no recent commit: rate unknown"
        );
        // 2,000 events drained over the last second: 2,000 events/s.
        buffer.record_drained(1_000);
        tokio::time::advance(Duration::from_millis(500)).await;
        buffer.record_drained(1_000);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(buffer.retry_after(4_000), Duration::from_secs(2));
        assert_eq!(buffer.retry_after(1_000), Duration::from_millis(500));
        // Faster draining: shorter advice for the same backlog.
        buffer.record_drained(8_000);
        let delay = buffer.retry_after(4_000);
        assert!(
            delay.abs_diff(Duration::from_millis(400)) < Duration::from_micros(1),
            "{delay:?}"
        );
        // Bounded on both sides.
        assert_eq!(buffer.retry_after(1), Duration::from_millis(100));
        assert_eq!(buffer.retry_after(200_000), Duration::from_secs(10));
        // A second without commits: the rate is unknown again.
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(buffer.retry_after(1_000), UNKNOWN_RATE_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_admitted_envelopes_ends_when_earlier_ones_are_written() {
        let (buffer, receiver) = Buffer::new(&config(100));
        assert!(
            buffer.wait_for_admitted(Duration::from_millis(10)).await,
            "nothing pending"
        );
        let _ack = buffer.admit(events(1)).await.expect("fits");
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
            buffer.admit(events(4)).await,
            Err(AdmitError::TooLarge { events: 4, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_waits_up_to_admit_wait_for_room() {
        let (buffer, receiver) = Buffer::new(&BufferConfig {
            admit_wait: Duration::from_secs(5),
            ..config(2)
        });
        let _held = buffer.admit(events(2)).await.expect("fits");
        let writer_side = receiver.clone();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(writer_side.lock().await.recv().await);
        });
        let started = tokio::time::Instant::now();
        let _second = buffer
            .admit(events(2))
            .await
            .expect("admitted once room frees");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        releaser.await.expect("releaser");
        // Nothing frees room now: the wait ends at admit_wait, refused.
        let started = tokio::time::Instant::now();
        assert!(matches!(
            buffer.admit(events(1)).await,
            Err(AdmitError::Full { .. })
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn closed_buffer_refuses_and_writers_see_the_end_after_draining() {
        let (buffer, receiver) = Buffer::new(&config(10));
        let _ack = buffer.admit(events(1)).await.expect("fits");
        buffer.close();
        assert_eq!(
            buffer.admit(events(1)).await.expect_err("closed"),
            AdmitError::Closed
        );
        let mut receiver = receiver.lock().await;
        assert!(receiver.recv().await.is_some());
        assert!(receiver.recv().await.is_none());
    }
}
