//! The one exponential backoff of every retry loop: each delay doubles the last, up to a
//! maximum, optionally jittered so that many retriers do not come back in step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
}

impl Backoff {
    /// Delays of `initial`, twice that, … up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            next: initial,
            jitter: false,
        }
    }

    /// The same, each delay drawn between half and all of its nominal value.
    pub fn jittered(initial: Duration, max: Duration) -> Self {
        Self {
            jitter: true,
            ..Self::new(initial, max)
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.next = nominal.saturating_mul(2).min(self.max);
        if self.jitter {
            nominal.mul_f64(rand::rng().random_range(0.5..1.0))
        } else {
            nominal
        }
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 350, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jittered_delays_stay_between_half_and_all_of_the_nominal_one() {
        let mut backoff = Backoff::jittered(Duration::from_millis(100), Duration::from_secs(1));
        for nominal in [100, 200, 400, 800, 1000, 1000] {
            let delay = backoff.next_delay().as_millis();
            assert!(
                (nominal / 2..=nominal).contains(&delay),
                "{delay} ms for {nominal}"
            );
        }
    }
}
