//! Durability while running: every master's `appendonly`, `appendfsync` and
//! `maxmemory-policy` are read at connect, and again every `redis.durability_check_interval`,
//! so that a master a failover promoted or a reshard added is held to what acks promise
//! (redis-rs does not say when the slot map changes, so the check runs on a clock). While one
//! is weak, appends fail and ingest spools.

use std::{
    sync::{Mutex, PoisonError},
    time::Instant,
};

use super::{
    Broker,
    connection::{self, ConnectError},
};

/// The last re-check's verdict, and when it ran.
#[derive(Default)]
pub(super) struct Verdict {
    /// Why appends stop: a master found weak.
    weak: Mutex<Option<String>>,
    checked_at: Mutex<Option<Instant>>,
}

impl Verdict {
    /// Why appends stop, if a master was found weak.
    pub(super) fn weak(&self) -> Option<String> {
        self.weak
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a re-check is due (and, if so, marks it as run now).
    fn due(&self, interval: std::time::Duration) -> bool {
        let mut checked_at = self
            .checked_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = checked_at.is_none_or(|at| at.elapsed() >= interval);
        if due {
            *checked_at = Some(Instant::now());
        }
        due
    }

    fn set(&self, verdict: Option<String>) {
        let mut weak = self.weak.lock().unwrap_or_else(PoisonError::into_inner);
        if *weak != verdict {
            match &verdict {
                Some(reason) => tracing::error!(
                    reason,
                    "a redis master is not durable enough: appends stop, ingest spools"
                ),
                None => tracing::info!("every redis master is durable again: appends resume"),
            }
        }
        *weak = verdict;
    }
}

impl Broker {
    /// Reads every master's durability settings again, at most once per
    /// `redis.durability_check_interval`, and says why appends stop, if they do. An
    /// unreachable Redis keeps the last verdict; with `redis.allow_weak_durability` nothing
    /// is enforced.
    pub async fn recheck_durability(&self) -> Option<String> {
        let config = &self.shared.config;
        if config.allow_weak_durability {
            return None;
        }
        let verdict = &self.shared.durability;
        if verdict.due(config.durability_check_interval) {
            let mut connection = self.connection.clone();
            match connection::check_durability(&mut connection, config).await {
                Ok(()) => verdict.set(None),
                Err(weak @ ConnectError::WeakDurability { .. }) => {
                    verdict.set(Some(weak.to_string()));
                }
                Err(ConnectError::Redis(_)) => {}
            }
        }
        verdict.weak()
    }
}
