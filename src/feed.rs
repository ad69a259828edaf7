//! Live events for `Tail`: the writers publish each batch once it is durable, and each Tail
//! stream subscribes. One ring of [`TAIL_BATCHES`] batches is shared by every subscriber, so
//! memory is bounded however many follow and however slow they read: a subscriber that falls
//! behind skips batches and is told how many. A batch is converted to its wire form once, for
//! every subscriber ([`TailBatch::converted`]). Publishing costs nothing while nobody follows.
//!
//! A node sees the events its own writers store: with several nodes, follow each.

use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;

use crate::{event::ValidEvent, privacy::PrivacyError, proto::Event};

/// Batches kept for subscribers that are behind: at most this many writer batches are held
/// (each at most `writer.batch_max_bytes`), however many follow.
pub const TAIL_BATCHES: usize = 64;

/// A batch's events as Tail shows them: one per event of the batch, in order.
pub type Converted = Result<Arc<[Event]>, PrivacyError>;

/// One durable batch, with its wire forms made on first use: encrypted values masked (for
/// most subscribers) and opened (for scope `pii`).
pub struct TailBatch {
    pub events: Vec<ValidEvent>,
    masked: OnceLock<Converted>,
    revealed: OnceLock<Converted>,
}

impl TailBatch {
    /// The batch's wire form, `convert`ed by the first subscriber that asks and shared by the
    /// rest.
    pub fn converted(
        &self,
        reveal: bool,
        convert: impl FnOnce(&[ValidEvent]) -> Converted,
    ) -> Converted {
        let cell = if reveal { &self.revealed } else { &self.masked };
        cell.get_or_init(|| convert(&self.events)).clone()
    }
}

/// The batches written by this node's writers, for subscribers.
pub struct TailFeed {
    sender: broadcast::Sender<Arc<TailBatch>>,
}

impl Default for TailFeed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(TAIL_BATCHES).0,
        }
    }
}

impl TailFeed {
    /// Whether anyone follows: writers skip the copy otherwise.
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Hands durable events to the subscribers.
    pub fn publish(&self, events: Vec<ValidEvent>) {
        if !events.is_empty() {
            // No subscriber left: nothing to do.
            let _ = self.sender.send(Arc::new(TailBatch {
                events,
                masked: OnceLock::new(),
                revealed: OnceLock::new(),
            }));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TailBatch>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_skips_batches_and_is_told() {
        let hub = TailFeed::default();
        assert!(!hub.has_subscribers());
        let mut subscriber = hub.subscribe();
        assert!(hub.has_subscribers());
        for _ in 0..TAIL_BATCHES + 3 {
            hub.publish(vec![ValidEvent::sample(0)]);
        }
        assert!(matches!(
            subscriber.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
        assert!(subscriber.recv().await.is_ok());
    }

    #[tokio::test]
    async fn a_batch_is_converted_once_for_every_subscriber() {
        let hub = TailFeed::default();
        let mut subscribers: Vec<_> = (0..5).map(|_| hub.subscribe()).collect();
        hub.publish(vec![ValidEvent::sample(0), ValidEvent::sample(1)]);
        let conversions = AtomicUsize::new(0);
        for subscriber in &mut subscribers {
            let batch = subscriber.recv().await.expect("batch");
            let events = batch
                .converted(false, |events| {
                    conversions.fetch_add(1, Ordering::Relaxed);
                    Ok(events.iter().map(|_| Event::default()).collect())
                })
                .expect("converted");
            assert_eq!(events.len(), 2);
        }
        assert_eq!(conversions.load(Ordering::Relaxed), 1);
    }
}
