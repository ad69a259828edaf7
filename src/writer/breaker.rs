//! A circuit breaker around the database, with the three rules of the seed's scenario 6:
//! connection failures (consecutive failed writes), slow queries (`slow_write_count` writes
//! slower than `slow_write` within `window`) and the error rate (failed writes over
//! `max_error_rate` of at least `min_writes` in `window`). Open → a half-open probe after an
//! exponentially growing, jittered pause → closed when the probe succeeds in time.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use rand::Rng;
use tokio::time::Instant;

use crate::{config::BreakerConfig, metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Writes go to the database.
    Closed,
    /// The database is considered down: writes go to the spool until the pause ends.
    Open,
    /// One probe write is trying the database.
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Why the circuit opened: the `cause` label of `sluice_breaker_opened_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenCause {
    /// `failure_threshold` consecutive failed writes.
    Failures,
    /// `slow_write_count` writes slower than `slow_write` within `window`.
    SlowWrites,
    /// Failed writes over `max_error_rate` within `window`.
    ErrorRate,
    /// The half-open probe failed, or was slow.
    ProbeFailed,
}

impl OpenCause {
    pub const ALL: [OpenCause; 4] = [
        OpenCause::Failures,
        OpenCause::SlowWrites,
        OpenCause::ErrorRate,
        OpenCause::ProbeFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failures => "failures",
            Self::SlowWrites => "slow_writes",
            Self::ErrorRate => "error_rate",
            Self::ProbeFailed => "probe_failed",
        }
    }
}

/// One write seen in the window.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    at: Instant,
    failed: bool,
    slow: bool,
}

#[derive(Debug)]
struct State {
    circuit: CircuitState,
    consecutive_failures: u32,
    open_for: Duration,
    open_until: Instant,
    /// Writes within the last `window`, oldest first.
    recent: VecDeque<Outcome>,
}

impl State {
    fn remember(&mut self, outcome: Outcome, window: Duration) {
        self.recent.push_back(outcome);
        while self
            .recent
            .front()
            .is_some_and(|oldest| outcome.at.duration_since(oldest.at) > window)
        {
            self.recent.pop_front();
        }
    }

    /// The window rule that is broken now, if any.
    fn window_rule(&self, config: &BreakerConfig) -> Option<OpenCause> {
        let slow = self.recent.iter().filter(|outcome| outcome.slow).count();
        if config.slow_write_count > 0 && slow >= config.slow_write_count as usize {
            return Some(OpenCause::SlowWrites);
        }
        let writes = self.recent.len();
        let failed = self.recent.iter().filter(|outcome| outcome.failed).count();
        if config.min_writes > 0
            && writes >= config.min_writes as usize
            && failed as f64 > config.max_error_rate * writes as f64
        {
            return Some(OpenCause::ErrorRate);
        }
        None
    }
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(config: &BreakerConfig) -> Self {
        let state = State {
            circuit: CircuitState::Closed,
            consecutive_failures: 0,
            open_for: config.open_initial,
            open_until: Instant::now(),
            recent: VecDeque::new(),
        };
        Self {
            config: config.clone(),
            state: Mutex::new(state),
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
            .lock()
            .map_or(CircuitState::Open, |state| state.circuit)
    }

    /// Whether the caller may try the database now. In the open state, the first caller after
    /// the pause becomes the half-open probe; everyone else is told no.
    pub fn allow(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        match state.circuit {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open if Instant::now() >= state.open_until => {
                state.circuit = CircuitState::HalfOpen;
                tracing::info!("circuit half-open: probing the database");
                true
            }
            CircuitState::Open => false,
        }
    }

    /// A write that succeeded after `took`. A slow one counts towards the slow rule, and a
    /// slow probe keeps the circuit open. While the circuit is open, a success can only be a
    /// write that started before it opened: it is ignored, and only the probe may close it.
    pub fn record_success(&self, took: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let slow = took >= self.config.slow_write;
        match state.circuit {
            CircuitState::Open => return,
            CircuitState::HalfOpen if slow => {
                tracing::warn!(took = ?took, "the probe write was slow");
                self.open(&mut state, OpenCause::ProbeFailed);
                return;
            }
            CircuitState::HalfOpen => {
                tracing::info!("circuit closed: the database is back");
                state.circuit = CircuitState::Closed;
                state.consecutive_failures = 0;
                state.open_for = self.config.open_initial;
                state.recent.clear();
                return;
            }
            CircuitState::Closed => {}
        }
        state.consecutive_failures = 0;
        state.open_for = self.config.open_initial;
        let outcome = Outcome {
            at: Instant::now(),
            failed: false,
            slow,
        };
        state.remember(outcome, self.config.window);
        if let Some(cause) = state.window_rule(&self.config) {
            self.open(&mut state, cause);
        }
    }

    pub fn record_failure(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.consecutive_failures += 1;
        match state.circuit {
            CircuitState::HalfOpen => self.open(&mut state, OpenCause::ProbeFailed),
            CircuitState::Closed => {
                let outcome = Outcome {
                    at: Instant::now(),
                    failed: true,
                    slow: false,
                };
                state.remember(outcome, self.config.window);
                if state.consecutive_failures >= self.config.failure_threshold {
                    self.open(&mut state, OpenCause::Failures);
                } else if let Some(cause) = state.window_rule(&self.config) {
                    self.open(&mut state, cause);
                }
            }
            CircuitState::Open => {}
        }
    }

    /// Opens the circuit for the current pause (doubled after a failed probe).
    fn open(&self, state: &mut State, cause: OpenCause) {
        if cause == OpenCause::ProbeFailed {
            state.open_for = (state.open_for * 2).min(self.config.open_max);
        }
        let pause = state.open_for.mul_f64(rand::rng().random_range(0.8..1.2));
        state.circuit = CircuitState::Open;
        state.open_until = Instant::now() + pause;
        state.recent.clear();
        metrics::breaker_opened(cause.as_str());
        tracing::warn!(
            cause = cause.as_str(),
            failures = state.consecutive_failures,
            pause = ?pause,
            "circuit open: writing to the spool"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 2,
            open_initial: Duration::from_millis(20),
            open_max: Duration::from_millis(80),
            ..BreakerConfig::default()
        }
    }

    const FAST: Duration = Duration::from_millis(5);

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once_after_the_pause() {
        let breaker = Breaker::new(&config());
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(!breaker.allow(), "no database writes while open");
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(breaker.allow(), "the first caller after the pause probes");
        assert!(!breaker.allow(), "only one probe at a time");
        breaker.record_failure();
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "a failed probe reopens"
        );
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(breaker.allow());
        breaker.record_success(FAST);
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.allow());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = Breaker::new(&config());
        breaker.record_failure();
        breaker.record_success(FAST);
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_writes_within_the_window_open_the_circuit() {
        let config = BreakerConfig {
            slow_write: Duration::from_secs(2),
            slow_write_count: 3,
            window: Duration::from_secs(30),
            ..config()
        };
        let slow = Duration::from_secs(3);
        let breaker = Breaker::new(&config);
        breaker.record_success(slow);
        breaker.record_success(slow);
        tokio::time::advance(Duration::from_secs(31)).await;
        breaker.record_success(slow);
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "slow writes that left the window do not count"
        );
        breaker.record_success(FAST);
        breaker.record_success(slow);
        breaker.record_success(slow);
        assert_eq!(breaker.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.allow());
        breaker.record_success(slow);
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "a slow probe keeps the circuit open"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_started_before_the_circuit_opened_cannot_close_it() {
        let breaker = Breaker::new(&config());
        breaker.record_failure();
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Open);
        breaker.record_success(FAST);
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "only the half-open probe closes the circuit"
        );
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(breaker.allow());
        breaker.record_success(FAST);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    /// The error-rate rule alone: 10% of at least 20 writes, consecutive failures out of play.
    fn rate_config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 100,
            max_error_rate: 0.1,
            min_writes: 20,
            ..config()
        }
    }

    /// Records `count` fast writes, failing those `fails` picks by their position.
    fn writes(breaker: &Breaker, count: usize, fails: impl Fn(usize) -> bool) {
        for write in 0..count {
            if fails(write) {
                breaker.record_failure();
            } else {
                breaker.record_success(FAST);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_rate_over_the_limit_opens_the_circuit_without_consecutive_failures() {
        let breaker = Breaker::new(&rate_config());
        // Every fifth write fails: 20%, never two in a row.
        writes(&breaker, 19, |write| write % 5 == 4);
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "too few writes to judge"
        );
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    #[test]
    fn an_error_rate_under_the_limit_keeps_the_circuit_closed() {
        let breaker = Breaker::new(&rate_config());
        writes(&breaker, 100, |write| write % 20 == 0);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
