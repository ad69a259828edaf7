//! Retry advice that spreads refused callers over time. Told the same delay, refused callers
//! come back together (stock gRPC retry policies honour the pushback exactly, with no
//! jitter, per gRFC A6), the buffer admits one buffer's worth, and the rest are refused again
//! until their attempts run out: the server's own advice would make the herd. So refusals
//! queue in a virtual line: each is told when its request's turn in the drain comes, after
//! the requests refused before it, with a little jitter.

use std::{sync::Mutex, time::Duration};

use rand::Rng;
use tokio::time::Instant;

/// The shortest and the longest advice.
pub const MIN_RETRY: Duration = Duration::from_millis(20);
pub const MAX_RETRY: Duration = Duration::from_secs(10);

/// The advice when the drain rate is unknown (no commit in the last second: writers just
/// woke up, or the database is down), spread over as much again.
pub const UNKNOWN_RATE_RETRY: Duration = Duration::from_secs(1);

/// Jitter, as a fraction of a request's own turn.
const JITTER: f64 = 0.25;

/// The virtual line of refused requests.
#[derive(Debug)]
pub struct RetryLine {
    /// When the last request in line is due to fit.
    last_turn: Mutex<Option<Instant>>,
}

impl RetryLine {
    pub fn new() -> Self {
        Self {
            last_turn: Mutex::new(None),
        }
    }

    /// When a refused request of `events` should come back: once `room_in` has passed (the
    /// time the buffer needs to drain enough for it) and the requests refused before it had
    /// their turn, each taking its events at `rate` events per second.
    pub fn advise(&self, now: Instant, events: usize, room_in: Duration, rate: f64) -> Duration {
        let mut random = rand::rng();
        if rate <= 0.0 {
            let spread = random.random_range(0.0..1.0);
            return UNKNOWN_RATE_RETRY.mul_f64(1.0 + spread);
        }
        let own_turn = Duration::from_secs_f64(events as f64 / rate);
        let mut last_turn = self
            .last_turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let earliest = now + room_in;
        let turn = match *last_turn {
            Some(last) if last > earliest => last,
            _ => earliest,
        };
        // The line never reaches past the longest advice: beyond, callers are told the
        // longest, and the line stays where it was.
        let turn = turn.min(now + MAX_RETRY);
        *last_turn = Some((turn + own_turn).min(now + MAX_RETRY));
        let jitter = own_turn.mul_f64(random.random_range(0.0..JITTER));
        (turn.saturating_duration_since(now) + jitter).clamp(MIN_RETRY, MAX_RETRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_refused_together_are_told_successive_turns() {
        let line = RetryLine::new();
        let now = Instant::now();
        // 10,000 events a second: a request of 200 takes 20 ms of drain.
        let advice: Vec<Duration> = (0..50)
            .map(|_| line.advise(now, 200, Duration::from_millis(5), 10_000.0))
            .collect();
        for (position, delay) in advice.iter().enumerate() {
            let turn = Duration::from_millis(5 + 20 * position as u64);
            assert!(
                *delay >= turn.max(MIN_RETRY)
                    && *delay <= turn.max(MIN_RETRY) + Duration::from_millis(5),
                "caller {position}: {delay:?}, its turn {turn:?}"
            );
        }
        let last = advice.last().copied().unwrap_or_default();
        assert!(last >= Duration::from_millis(985), "{last:?}");
    }

    #[test]
    fn the_line_starts_again_once_its_turns_have_passed() {
        let line = RetryLine::new();
        let now = Instant::now();
        for _ in 0..10 {
            line.advise(now, 1_000, Duration::ZERO, 10_000.0);
        }
        let later = now + Duration::from_secs(2);
        let delay = line.advise(later, 200, Duration::from_millis(50), 10_000.0);
        assert!(delay < Duration::from_millis(56), "{delay:?}");
    }

    #[test]
    fn the_advice_never_passes_the_longest() {
        let line = RetryLine::new();
        let now = Instant::now();
        for _ in 0..1_000 {
            let delay = line.advise(now, 10_000, Duration::ZERO, 1_000.0);
            assert!(delay <= MAX_RETRY, "{delay:?}");
        }
    }

    #[test]
    fn an_unknown_rate_spreads_the_callers_over_a_second_and_another() {
        let line = RetryLine::new();
        let now = Instant::now();
        let advice: Vec<Duration> = (0..100)
            .map(|_| line.advise(now, 200, Duration::ZERO, 0.0))
            .collect();
        assert!(
            advice
                .iter()
                .all(|delay| *delay >= UNKNOWN_RATE_RETRY && *delay < UNKNOWN_RATE_RETRY * 2)
        );
        let distinct: std::collections::BTreeSet<_> = advice.iter().collect();
        assert!(distinct.len() > 50, "spread, not one delay");
    }
}
