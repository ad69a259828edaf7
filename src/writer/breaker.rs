//! A circuit breaker around the database: closed → open after consecutive failures → half-open
//! probe after an exponentially growing, jittered pause → closed on success.

use std::{sync::Mutex, time::Duration};

use rand::Rng;
use tokio::time::Instant;

use crate::config::BreakerConfig;

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

#[derive(Debug)]
struct State {
    circuit: CircuitState,
    consecutive_failures: u32,
    open_for: Duration,
    open_until: Instant,
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

    pub fn record_success(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.circuit != CircuitState::Closed {
            tracing::info!(
                previous = state.circuit.as_str(),
                "circuit closed: the database is back"
            );
        }
        state.circuit = CircuitState::Closed;
        state.consecutive_failures = 0;
        state.open_for = self.config.open_initial;
    }

    pub fn record_failure(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.consecutive_failures += 1;
        let open = match state.circuit {
            CircuitState::HalfOpen => {
                state.open_for = (state.open_for * 2).min(self.config.open_max);
                true
            }
            CircuitState::Closed => state.consecutive_failures >= self.config.failure_threshold,
            CircuitState::Open => false,
        };
        if open {
            let pause = state.open_for.mul_f64(rand::rng().random_range(0.8..1.2));
            state.circuit = CircuitState::Open;
            state.open_until = Instant::now() + pause;
            tracing::warn!(failures = state.consecutive_failures, pause = ?pause, "circuit open: writing to the spool");
        }
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
        }
    }

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
        breaker.record_success();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(breaker.allow());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = Breaker::new(&config());
        breaker.record_failure();
        breaker.record_success();
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
