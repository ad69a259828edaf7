//! Live events for `Tail`: the writers publish each batch once it is durable, and each Tail
//! stream subscribes. One ring of `TAIL_BATCHES` batches is shared by every subscriber, so
//! memory is bounded however many follow and however slow they read: a subscriber that falls
//! behind skips batches and is told how many. Publishing costs nothing while nobody follows.
//!
//! A node sees the events its own writers store: with several nodes, follow each.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::event::ValidEvent;

/// Batches kept for subscribers that are behind: at most this many writer batches are held
/// (each at most `writer.batch_max_bytes`), however many follow.
const TAIL_BATCHES: usize = 64;

/// The batches written by this node's writers, for subscribers.
pub struct TailFeed {
    sender: broadcast::Sender<Arc<[ValidEvent]>>,
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
            let _ = self.sender.send(events.into());
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<[ValidEvent]>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
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
}
