//! Calls one principal may have running at once, per kind of read (Query, Export, Tail), and
//! in all for a kind that holds resources for long (Tail). A call takes a [`Slot`] before it
//! starts and gives it back when it ends, however it ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use super::QueryError;
use crate::metrics;

#[derive(Debug)]
pub struct Slots {
    /// What the calls are, for refusals and the metric (`queries`, `exports`, `tails`).
    kind: &'static str,
    per_principal: usize,
    total: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_principal: HashMap<String, usize>,
}

impl Slots {
    pub fn new(kind: &'static str, per_principal: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            kind,
            per_principal,
            total,
            held: Mutex::default(),
        })
    }

    /// A slot for one call of `principal`, or RESOURCE_EXHAUSTED when it (or everyone) holds
    /// the most there may be.
    pub fn take(self: &Arc<Self>, principal: &str) -> Result<Slot, QueryError> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.by_principal.get(principal).copied().unwrap_or(0);
        let limit = if mine >= self.per_principal {
            Some(self.per_principal)
        } else if held.total >= self.total {
            Some(self.total)
        } else {
            None
        };
        if let Some(limit) = limit {
            metrics::read_refused(self.kind);
            return Err(QueryError::TooMany {
                kind: self.kind,
                limit,
            });
        }
        held.total += 1;
        *held.by_principal.entry(principal.to_owned()).or_default() += 1;
        Ok(Slot {
            slots: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

/// One running call; its slot is free again once this is dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    principal: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_principal.get_mut(&self.principal) {
            *count -= 1;
            if *count == 0 {
                held.by_principal.remove(&self.principal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_holds_at_most_its_share_and_everyone_at_most_the_total() {
        let slots = Slots::new("tails", 2, 3);
        let first = slots.take("a").expect("first");
        let _second = slots.take("a").expect("second");
        assert!(matches!(
            slots.take("a"),
            Err(QueryError::TooMany { limit: 2, .. })
        ));
        let _third = slots.take("b").expect("another principal");
        assert!(matches!(
            slots.take("c"),
            Err(QueryError::TooMany { limit: 3, .. })
        ));
        drop(first);
        slots.take("c").expect("a slot came back");
    }
}
