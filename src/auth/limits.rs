//! Per-principal rate limits: GCRA (governor) on events per second and on event bytes per
//! second (text fields plus metadata as JSON), each with a burst. A request is admitted whole or refused whole.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

/// Which limit refused a request: the `QuotaFailure` description and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    EventsPerSecond,
    BytesPerSecond,
}

impl Exceeded {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EventsPerSecond => "events_per_second",
            Self::BytesPerSecond => "bytes_per_second",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough tokens now; they will be there after the delay.
    Wait(RateLimited),
    /// More than the whole burst: it can never pass as one request.
    NeverFits(Exceeded),
}

impl Refusal {
    pub fn exceeded(self) -> Exceeded {
        match self {
            Self::Wait(limited) => limited.exceeded,
            Self::NeverFits(exceeded) => exceeded,
        }
    }
}

/// A refusal: the limit, and when the tokens will be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub exceeded: Exceeded,
    pub retry_after: Duration,
}

/// One principal's limiters.
#[derive(Debug)]
pub struct Limits {
    events: Option<(DefaultDirectRateLimiter, u32)>,
    bytes: Option<(DefaultDirectRateLimiter, u32)>,
    clock: DefaultClock,
}

/// The rates of a principal's limits; 0: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub events_per_second: u32,
    /// Events allowed at once above the rate (0: one second's worth).
    pub burst_events: u32,
    /// The burst is one second's worth.
    pub bytes_per_second: u32,
}

impl Limits {
    /// None when the rates set no limit.
    pub fn new(rates: Rates) -> Option<Self> {
        let limiter = |rate: u32, burst: u32| {
            let rate = NonZeroU32::new(rate)?;
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Some((
                RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                burst.get(),
            ))
        };
        let events = limiter(rates.events_per_second, rates.burst_events);
        let bytes = limiter(rates.bytes_per_second, rates.bytes_per_second);
        if events.is_none() && bytes.is_none() {
            return None;
        }
        Some(Self {
            events,
            bytes,
            clock: DefaultClock::default(),
        })
    }

    /// Takes `events` and `bytes` tokens, or none of them.
    pub fn admit(&self, events: usize, bytes: usize) -> Result<(), Refusal> {
        let events = saturating_u32(events);
        let bytes = saturating_u32(bytes);
        if let Some((limiter, burst)) = &self.events {
            self.take(limiter, *burst, events, Exceeded::EventsPerSecond)?;
        }
        if let Some((limiter, burst)) = &self.bytes {
            // The events were taken; a byte refusal still refuses the request, and those event
            // tokens are lost for this second, which errs on the safe side.
            self.take(limiter, *burst, bytes, Exceeded::BytesPerSecond)?;
        }
        Ok(())
    }

    fn take(
        &self,
        limiter: &DefaultDirectRateLimiter,
        burst: u32,
        count: u32,
        exceeded: Exceeded,
    ) -> Result<(), Refusal> {
        let Some(count) = NonZeroU32::new(count) else {
            return Ok(());
        };
        match limiter.check_n(count) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::Wait(RateLimited {
                exceeded,
                retry_after: not_until.wait_time_from(self.clock.now()),
            })),
            Err(_) => {
                tracing::debug!(
                    burst,
                    requested = count.get(),
                    "request larger than the burst"
                );
                Err(Refusal::NeverFits(exceeded))
            }
        }
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(events_per_second: u32, burst_events: u32) -> Rates {
        Rates {
            events_per_second,
            burst_events,
            bytes_per_second: 0,
        }
    }

    #[test]
    fn no_rate_means_no_limiter() {
        assert!(Limits::new(principal(0, 0)).is_none());
    }

    #[test]
    fn the_burst_passes_then_requests_wait_for_tokens() {
        let limits = Limits::new(principal(100, 200)).expect("limited");
        limits.admit(150, 0).expect("within the burst");
        let Refusal::Wait(refused) = limits.admit(100, 0).expect_err("over the burst") else {
            panic!("a wait, not a never-fits");
        };
        assert_eq!(refused.exceeded, Exceeded::EventsPerSecond);
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert_eq!(
            limits.admit(1_000, 0).expect_err("larger than the burst"),
            Refusal::NeverFits(Exceeded::EventsPerSecond)
        );
    }
}
