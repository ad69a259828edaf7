//! A fair share of the buffer per principal. While the buffer is less than half full anyone
//! may take room. Past half, a principal may hold at most its share: the capacity times its
//! weight over the weights of the principals active in the last [`ACTIVE_WINDOW`] (holding
//! room, or admitted or refused lately), and never more than all but [`HEADROOM`] of it, so
//! that a sender who arrives finds room before it counts. A principal that holds nothing may
//! always take one request. So a noisy sender is refused first
//! and a quiet one keeps getting in, while a sender alone may still use nearly all of it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// How long a principal counts as active after it last asked for room.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(2);

/// Past this fraction of the buffer (in events), principals are held to their share.
const PRESSURE: f64 = 0.5;

/// The fraction of the buffer no one principal may take under pressure: room for a sender
/// not yet seen.
const HEADROOM: f64 = 0.1;

/// Who asks for room: a principal and its weight (`auth.principals[].weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub principal: Arc<str>,
    pub weight: u32,
}

impl Holder {
    pub fn new(principal: &str, weight: u32) -> Self {
        Self {
            principal: principal.into(),
            weight: weight.max(1),
        }
    }
}

/// A principal over its share: how much it holds and may hold, and whether others are
/// active (alone, it is only kept out of the headroom: to it, the buffer is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverShare {
    pub held: usize,
    pub share: usize,
    pub contended: bool,
}

#[derive(Debug)]
struct Holding {
    held: usize,
    weight: u32,
    seen: Instant,
}

/// The room each principal holds in the buffer.
#[derive(Debug)]
pub struct FairShare {
    capacity: usize,
    holdings: Mutex<HashMap<Arc<str>, Holding>>,
    /// Woken whenever room is given back.
    released: tokio::sync::Notify,
}

impl FairShare {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            holdings: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
        })
    }

    /// Resolves the next time room is given back.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Takes `events` of room for `holder`, with `used` events of the buffer already taken by
    /// anyone; refused when the buffer is under pressure and that would put the holder over
    /// its share. The room is given back when the returned [`Held`] is dropped.
    pub fn take(
        self: &Arc<Self>,
        holder: &Holder,
        events: usize,
        used: usize,
        now: Instant,
    ) -> Result<Held, OverShare> {
        let mut holdings = self
            .holdings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget the principals that hold nothing and left.
        holdings.retain(|_, holding| {
            holding.held > 0 || now.saturating_duration_since(holding.seen) < ACTIVE_WINDOW
        });
        let held = holdings
            .get(&holder.principal)
            .map_or(0, |holding| holding.held);
        // Room taken here is taken before its buffer slots (and given back after them), so
        // the holdings count requests still on their way into the buffer too: many arriving
        // at once cannot all pass as if the buffer were empty.
        let taken: usize = holdings.values().map(|holding| holding.held).sum();
        let under_pressure = (used.max(taken) + events) as f64 > self.capacity as f64 * PRESSURE;
        // A principal that holds nothing may always take one request, however large: its
        // share is never smaller than what it must send at once.
        if under_pressure && held > 0 {
            let others: u64 = holdings
                .iter()
                .filter(|(principal, _)| **principal != holder.principal)
                .map(|(_, holding)| u64::from(holding.weight))
                .sum();
            let share = self.share(holder.weight, others);
            if held + events > share {
                holdings
                    .entry(holder.principal.clone())
                    .or_insert(Holding {
                        held: 0,
                        weight: holder.weight,
                        seen: now,
                    })
                    .seen = now;
                return Err(OverShare {
                    held,
                    share,
                    contended: others > 0,
                });
            }
        }
        let holding = holdings.entry(holder.principal.clone()).or_insert(Holding {
            held: 0,
            weight: holder.weight,
            seen: now,
        });
        holding.held += events;
        holding.weight = holder.weight;
        holding.seen = now;
        Ok(Held {
            fair: self.clone(),
            principal: holder.principal.clone(),
            events,
        })
    }

    /// How many more events `holder` could take now, with `used` events of the buffer taken:
    /// up to the pressure mark, or up to its share.
    pub fn room(&self, holder: &Holder, used: usize, now: Instant) -> usize {
        let below_pressure = ((self.capacity as f64 * PRESSURE) as usize).saturating_sub(used);
        let holdings = self
            .holdings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let active = |holding: &Holding| {
            holding.held > 0 || now.saturating_duration_since(holding.seen) < ACTIVE_WINDOW
        };
        let held = holdings
            .get(&holder.principal)
            .map_or(0, |holding| holding.held);
        let others: u64 = holdings
            .iter()
            .filter(|(principal, holding)| **principal != holder.principal && active(holding))
            .map(|(_, holding)| u64::from(holding.weight))
            .sum();
        let share = self.share(holder.weight, others);
        below_pressure.max(share.saturating_sub(held))
    }

    /// The events a principal of `weight` may hold beside others of `others` in weight.
    fn share(&self, weight: u32, others: u64) -> usize {
        let weight = u64::from(weight.max(1));
        let weighted = (self.capacity as u64 * weight / (weight + others)) as usize;
        weighted.min((self.capacity as f64 * (1.0 - HEADROOM)) as usize)
    }

    /// Events `principal` holds now.
    #[cfg(test)]
    fn held(&self, principal: &str) -> usize {
        self.holdings
            .lock()
            .map_or(0, |holdings| holdings.get(principal).map_or(0, |h| h.held))
    }

    fn give_back(&self, principal: &str, events: usize) {
        let mut holdings = self
            .holdings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(holding) = holdings.get_mut(principal) {
            holding.held = holding.held.saturating_sub(events);
        }
        drop(holdings);
        self.released.notify_waiters();
    }
}

/// Room a principal holds in the buffer, given back when dropped (after the commit).
#[derive(Debug)]
pub struct Held {
    fair: Arc<FairShare>,
    principal: Arc<str>,
    events: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.fair.give_back(&self.principal, self.events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_alone_may_fill_all_but_the_headroom() {
        let fair = FairShare::new(1_000);
        let noisy = Holder::new("noisy", 1);
        let now = Instant::now();
        let held: Vec<_> = (0..9)
            .map(|step| fair.take(&noisy, 100, step * 100, now).expect("room"))
            .collect();
        assert_eq!(fair.held("noisy"), 900);
        assert_eq!(
            fair.take(&noisy, 100, 900, now).map(|_| ()),
            Err(OverShare {
                held: 900,
                share: 900,
                contended: false
            })
        );
        fair.take(&Holder::new("newcomer", 1), 100, 900, now)
            .expect("a newcomer finds room");
        drop(held);
        assert_eq!(fair.held("noisy"), 0);
    }

    #[test]
    fn under_pressure_a_noisy_sender_is_held_to_its_share_and_a_quiet_one_gets_in() {
        let fair = FairShare::new(1_000);
        let (noisy, quiet) = (Holder::new("noisy", 1), Holder::new("quiet", 1));
        let now = Instant::now();
        // The quiet sender was seen lately: it counts, though it holds nothing now.
        drop(fair.take(&quiet, 10, 0, now).expect("room"));
        let mut held = Vec::new();
        for step in 0..5 {
            held.push(
                fair.take(&noisy, 100, step * 100, now)
                    .expect("within its half"),
            );
        }
        assert_eq!(
            fair.take(&noisy, 100, 500, now).map(|_| ()),
            Err(OverShare {
                held: 500,
                share: 500,
                contended: true
            })
        );
        fair.take(&quiet, 100, 500, now)
            .expect("the quiet one gets in");
    }

    #[test]
    fn requests_arriving_together_are_held_to_the_share_before_any_enters_the_buffer() {
        let fair = FairShare::new(1_000);
        let noisy = Holder::new("noisy", 1);
        let now = Instant::now();
        // Sixteen requests pass the share before any takes its buffer slots (used stays 0).
        let admitted: Vec<_> = (0..16)
            .filter_map(|_| fair.take(&noisy, 100, 0, now).ok())
            .collect();
        assert_eq!(admitted.len(), 9, "all but the headroom");
        fair.take(&Holder::new("newcomer", 1), 100, 0, now)
            .expect("the headroom is left for a newcomer");
    }

    #[test]
    fn weights_divide_the_buffer() {
        let fair = FairShare::new(1_000);
        let (heavy, light) = (Holder::new("heavy", 3), Holder::new("light", 1));
        let now = Instant::now();
        let _light = fair.take(&light, 10, 0, now).expect("room");
        let mut held = Vec::new();
        for step in 0..7 {
            held.push(fair.take(&heavy, 100, 10 + step * 100, now).expect("3/4"));
        }
        assert_eq!(
            fair.take(&heavy, 100, 710, now).map(|_| ()),
            Err(OverShare {
                held: 700,
                share: 750,
                contended: true
            })
        );
    }

    #[test]
    fn a_principal_that_left_no_longer_counts() {
        let fair = FairShare::new(1_000);
        let (noisy, quiet) = (Holder::new("noisy", 1), Holder::new("quiet", 1));
        let then = Instant::now();
        drop(fair.take(&quiet, 10, 0, then).expect("room"));
        let later = then + ACTIVE_WINDOW + Duration::from_millis(1);
        let _held = fair.take(&noisy, 900, 0, later).expect("alone again");
    }
}
