//! Live events for `Tail`: the writers publish each batch once it is durable, and each Tail
//! stream subscribes. One ring of batches, bounded in bytes ([`TAIL_RING_BYTES`]) and in
//! batches ([`TAIL_BATCHES`]), is shared by every subscriber, so memory is bounded however
//! many follow and however slow they read: a subscriber that falls behind skips batches and
//! is told how many. A batch is converted to its wire form once, for every subscriber
//! ([`TailBatch::converted`]). Publishing costs nothing while nobody follows.
//!
//! A node sees the events its own writers store: with several nodes, follow each.

use std::{
    collections::VecDeque,
    ops::Range,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::{event::ValidEvent, privacy::PrivacyError};

/// The most batches the ring keeps for subscribers that are behind...
pub const TAIL_BATCHES: usize = 64;
/// ...and the most bytes of events (as the buffer counts them, [`ValidEvent::weight`]); the
/// newest batch is kept whatever its size. Each batch's wire forms, made while subscribers
/// read it, come on top: at most about as much again per form (masked, and opened for `pii`).
pub const TAIL_RING_BYTES: usize = 8 * 1024 * 1024;

/// A batch's events as Tail sends them, or why they cannot be shown.
pub type Converted = Result<Arc<EncodedBatch>, PrivacyError>;

/// A batch's events encoded once for every subscriber: each event as one entry of
/// `TailResponse.events`, back to back, in the batch's order.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    bytes: Bytes,
    /// Where each event's entry ends in `bytes`.
    ends: Vec<usize>,
}

impl EncodedBatch {
    /// Encodes each event with `encode`, which appends one entry to the buffer.
    pub fn build<T, E>(
        items: &[T],
        mut encode: impl FnMut(&T, &mut BytesMut) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut bytes = BytesMut::new();
        let mut ends = Vec::with_capacity(items.len());
        for item in items {
            encode(item, &mut bytes)?;
            ends.push(bytes.len());
        }
        Ok(Self {
            bytes: bytes.freeze(),
            ends,
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The encoded size of event `position`'s entry.
    pub fn entry_len(&self, position: usize) -> usize {
        self.span(position..position + 1).len()
    }

    /// The entries of the events at `positions` (ascending), concatenated: a slice of the
    /// shared bytes when the positions follow each other, a copy of the entries otherwise.
    pub fn entries(&self, positions: &[usize]) -> Bytes {
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Bytes::new();
        };
        if last - first + 1 == positions.len() {
            return self.bytes.slice(self.span(first..last + 1));
        }
        let mut copy = BytesMut::new();
        for &position in positions {
            copy.extend_from_slice(&self.bytes[self.span(position..position + 1)]);
        }
        copy.freeze()
    }

    /// The byte range of the entries of events `events`.
    fn span(&self, events: Range<usize>) -> Range<usize> {
        let start = match events.start {
            0 => 0,
            after => self.ends[after - 1],
        };
        start..self.ends[events.end - 1]
    }
}

/// One durable batch, with its wire forms made on first use: encrypted values masked (for
/// most subscribers) and opened (for scope `pii`).
pub struct TailBatch {
    pub events: Vec<ValidEvent>,
    /// The events' bytes as the ring counts them.
    weight: usize,
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

/// What a subscriber receives next.
pub enum Received {
    Batch(Arc<TailBatch>),
    /// This many batches left the ring before the subscriber read them.
    Missed(u64),
}

/// The batches still kept: `batches[0]` is batch number `first`.
#[derive(Default)]
struct Ring {
    batches: VecDeque<Arc<TailBatch>>,
    first: u64,
    bytes: usize,
}

impl Ring {
    /// The number the next batch published gets.
    fn end(&self) -> u64 {
        self.first + self.batches.len() as u64
    }
}

/// The batches written by this node's writers, for subscribers.
pub struct TailFeed {
    ring: Mutex<Ring>,
    /// The number of batches published so far; every subscriber holds a receiver.
    published: watch::Sender<u64>,
    max_bytes: usize,
}

impl Default for TailFeed {
    fn default() -> Self {
        Self::with_max_bytes(TAIL_RING_BYTES)
    }
}

impl TailFeed {
    fn with_max_bytes(max_bytes: usize) -> Self {
        Self {
            ring: Mutex::default(),
            published: watch::Sender::new(0),
            max_bytes,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The ring is consistent after every statement: a panic elsewhere leaves it usable.
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether anyone follows: writers skip the copy otherwise.
    pub fn has_subscribers(&self) -> bool {
        self.published.receiver_count() > 0
    }

    /// Hands durable events to the subscribers, forgetting the oldest batches past the ring's
    /// bounds.
    pub fn publish(&self, events: Vec<ValidEvent>) {
        if events.is_empty() {
            return;
        }
        let weight = events.iter().map(ValidEvent::weight).sum();
        let end = {
            let mut ring = self.ring();
            ring.batches.push_back(Arc::new(TailBatch {
                events,
                weight,
                masked: OnceLock::new(),
                revealed: OnceLock::new(),
            }));
            ring.bytes += weight;
            while ring.batches.len() > 1
                && (ring.batches.len() > TAIL_BATCHES || ring.bytes > self.max_bytes)
            {
                if let Some(oldest) = ring.batches.pop_front() {
                    ring.bytes -= oldest.weight;
                    ring.first += 1;
                }
            }
            ring.end()
        };
        self.published.send_replace(end);
    }

    /// A subscriber to the batches published from now on.
    pub fn subscribe(self: &Arc<Self>) -> Subscriber {
        let published = self.published.subscribe();
        let next = self.ring().end();
        Subscriber {
            feed: self.clone(),
            published,
            next,
        }
    }
}

/// One reader's place in the feed.
pub struct Subscriber {
    feed: Arc<TailFeed>,
    published: watch::Receiver<u64>,
    /// The number of the next batch to read.
    next: u64,
}

impl Subscriber {
    /// The next batch, or how many were missed, once there is one.
    pub async fn recv(&mut self) -> Received {
        loop {
            // Marked seen before the ring is read, so a batch published after the read wakes
            // the wait below.
            self.published.borrow_and_update();
            if let Some(received) = self.try_recv() {
                return received;
            }
            if self.published.changed().await.is_err() {
                // The feed lives as long as this subscriber holds it: never reached.
                std::future::pending::<()>().await;
            }
        }
    }

    fn try_recv(&mut self) -> Option<Received> {
        let ring = self.feed.ring();
        if self.next < ring.first {
            let missed = ring.first - self.next;
            self.next = ring.first;
            return Some(Received::Missed(missed));
        }
        let batch = ring.batches.get((self.next - ring.first) as usize)?.clone();
        self.next += 1;
        Some(Received::Batch(batch))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    async fn next_batch(subscriber: &mut Subscriber) -> Arc<TailBatch> {
        match subscriber.recv().await {
            Received::Batch(batch) => batch,
            Received::Missed(missed) => panic!("missed {missed} batches"),
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_skips_batches_and_is_told() {
        let feed = Arc::new(TailFeed::default());
        assert!(!feed.has_subscribers());
        let mut subscriber = feed.subscribe();
        assert!(feed.has_subscribers());
        for _ in 0..TAIL_BATCHES + 3 {
            feed.publish(vec![ValidEvent::sample(0)]);
        }
        assert!(matches!(subscriber.recv().await, Received::Missed(3)));
        for _ in 0..TAIL_BATCHES {
            next_batch(&mut subscriber).await;
        }
        feed.publish(vec![ValidEvent::sample(1)]);
        assert_eq!(next_batch(&mut subscriber).await.events[0].index, 1);
    }

    #[tokio::test]
    async fn the_ring_keeps_batches_within_its_bytes_but_always_the_newest() {
        let weight = ValidEvent::sample(0).weight();
        let feed = Arc::new(TailFeed::with_max_bytes(weight * 10));
        let mut subscriber = feed.subscribe();
        let batch = |events: usize| (0..events).map(|_| ValidEvent::sample(0)).collect();
        for _ in 0..4 {
            feed.publish(batch(3));
        }
        // 12 events' worth: the oldest batch left so that 9 remain.
        assert!(matches!(subscriber.recv().await, Received::Missed(1)));
        for _ in 0..3 {
            next_batch(&mut subscriber).await;
        }
        feed.publish(batch(50));
        assert_eq!(next_batch(&mut subscriber).await.events.len(), 50);
        assert_eq!(feed.ring().bytes, weight * 50);
    }

    #[tokio::test]
    async fn a_subscriber_waits_for_the_next_batch() {
        let feed = Arc::new(TailFeed::default());
        feed.publish(vec![ValidEvent::sample(0)]);
        let mut subscriber = feed.subscribe();
        let waiting = tokio::spawn(async move { next_batch(&mut subscriber).await });
        tokio::task::yield_now().await;
        feed.publish(vec![ValidEvent::sample(7)]);
        let batch = waiting.await.expect("subscriber");
        assert_eq!(
            batch.events[0].index, 7,
            "only batches published after subscribing"
        );
    }

    #[tokio::test]
    async fn a_batch_is_converted_once_for_every_subscriber() {
        let feed = Arc::new(TailFeed::default());
        let mut subscribers: Vec<_> = (0..5).map(|_| feed.subscribe()).collect();
        feed.publish(vec![ValidEvent::sample(0), ValidEvent::sample(1)]);
        let conversions = AtomicUsize::new(0);
        for subscriber in &mut subscribers {
            let batch = next_batch(subscriber).await;
            let encoded = batch
                .converted(false, |events| {
                    conversions.fetch_add(1, Ordering::Relaxed);
                    EncodedBatch::build(events, |_, bytes| {
                        bytes.extend_from_slice(b"e");
                        Ok(())
                    })
                    .map(Arc::new)
                })
                .expect("converted");
            assert_eq!(encoded.len(), 2);
        }
        assert_eq!(conversions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn entries_are_a_slice_when_consecutive_and_a_copy_otherwise() {
        let words = ["a", "bb", "ccc", "dddd"];
        let encoded = EncodedBatch::build(&words, |word, bytes| {
            bytes.extend_from_slice(word.as_bytes());
            Ok::<_, ()>(())
        })
        .expect("built");
        assert_eq!(&encoded.entries(&[1, 2])[..], b"bbccc");
        assert_eq!(&encoded.entries(&[0, 3])[..], b"adddd");
        assert_eq!(&encoded.entries(&[0, 1, 2, 3])[..], b"abbcccdddd");
        assert!(encoded.entries(&[]).is_empty());
    }
}
