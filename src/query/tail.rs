//! Tail: follows new events as this node's writers store them, like `tail -f`, filtered by
//! services and user. Every subscriber reads the one shared ring of the [`TailFeed`], whose
//! batches are converted and encoded once for all of them: a subscriber's message is a slice
//! of those bytes (a copy of the entries it wants when it filters). The stream holds no queue
//! of its own, only its place in the batch it is sending, which it holds weakly, in messages
//! of at most [`EVENTS_PER_MESSAGE`] events and [`MESSAGE_BYTES`]: it takes the next message
//! when HTTP/2 lets it send, so a subscriber that does not read holds its place in the ring
//! and the connection's bounded send buffer, and one that reads too slowly skips batches and
//! is told how many (`missed_batches`, `sluice_tail_batches_missed_total`). Subscribers are
//! capped per principal and per node (`reads.max_tails*`).
//!
//! [`TailFeed`]: crate::feed::TailFeed

use std::{
    pin::Pin,
    sync::{Arc, Weak},
};

use chrono::Utc;
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{QueryError, Reader, slots::Slot};
use crate::{
    auth::Caller,
    config::Scope,
    event::ValidEvent,
    feed::{Converted, EncodedBatch, Received, Subscriber, TailBatch},
    filter::check_services,
    metrics,
    privacy::{Privacy, PrivacyError, SharedPrivacy},
    proto::{
        Event, Metadata, TailRequest, TailResponse,
        tail::{MESSAGE_BYTES, encode_event},
        wire::to_timestamp,
    },
    rpc::{Admission, Call},
};

pub type TailStream = Pin<Box<dyn Stream<Item = Result<TailResponse, Status>> + Send + 'static>>;

/// Checks and audits the request, then follows the feed for as long as the client reads.
pub async fn serve(
    reader: &Reader,
    admission: &Arc<Admission>,
    call: Call,
    request: TailRequest,
) -> Result<TailStream, Status> {
    let checked = check_services(&request.services)
        .map_err(QueryError::from)
        .and_then(|()| {
            if request.user_id.len() > reader.config.validation.max_user_id_bytes {
                return Err(QueryError::invalid("user_id", "longer than any event's"));
            }
            Ok(())
        })
        .and_then(|()| reader.tails.take(&call.caller.principal));
    let details = serde_json::json!({ "services": request.services });
    let slot = admission.audited(&call, details, checked).await?;
    let user =
        (!request.user_id.is_empty()).then(|| reader.privacy.load().user_id(&request.user_id));
    let following = Following {
        batches: reader.feed.subscribe(),
        services: request.services,
        user,
        privacy: reader.privacy.clone(),
        admission: admission.clone(),
        call,
        shutdown: reader.shutdown.clone(),
        done: false,
        unsent: None,
        _slot: slot,
    };
    Ok(Box::pin(futures::stream::unfold(
        following,
        |mut following| async move {
            let next = following.next().await?;
            Some((next, following))
        },
    )))
}

/// One subscriber's place in the feed.
struct Following {
    batches: Subscriber,
    services: Vec<String>,
    /// The user, in stored form.
    user: Option<String>,
    privacy: SharedPrivacy,
    admission: Arc<Admission>,
    call: Call,
    shutdown: CancellationToken,
    /// The stream ended with an error: nothing follows it.
    done: bool,
    /// The batch being sent, while it holds more for this subscriber.
    unsent: Option<Sending>,
    /// Held while the stream is open.
    _slot: Slot,
}

impl Following {
    /// The next message for the client; None once the stream ends.
    async fn next(&mut self) -> Option<Result<TailResponse, Status>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(message) = self.next_chunk() {
                return Some(message);
            }
            let received = tokio::select! {
                received = self.batches.recv() => received,
                // Shutdown ends Tail streams instead of waiting for them.
                () = self.shutdown.cancelled() => return None,
            };
            // A long-lived stream: the caller is looked up again under the policy in force,
            // so a reload or an expired token applies from the next batch on.
            let caller = match self.admission.refresh(&self.call) {
                Ok(caller) => caller,
                Err(error) => {
                    self.done = true;
                    return Some(Err(error.into()));
                }
            };
            match received {
                Received::Batch(batch) => {
                    self.unsent = Some(Sending {
                        batch: Arc::downgrade(&batch),
                        reveal: caller.has_scope(Scope::Pii),
                        caller,
                        position: 0,
                    });
                }
                Received::Missed(missed) => return Some(Ok(missed_batches(missed))),
            }
        }
    }

    /// The next message of the current batch: at most [`EVENTS_PER_MESSAGE`] events, so that
    /// what one stream holds while its client does not read (its encoded message, HTTP/2's
    /// send buffer) stays small however large the writers' batches are. The events are the
    /// batch's shared encoding: a slice of it when this subscriber wants every event. None
    /// once the batch holds nothing more for this subscriber.
    fn next_chunk(&mut self) -> Option<Result<TailResponse, Status>> {
        let sending = self.unsent.as_mut()?;
        let Some(batch) = sending.batch.upgrade() else {
            // The batch left the ring while the client was not reading: it missed the rest.
            self.unsent = None;
            return Some(Ok(missed_batches(1)));
        };
        let reveal = sending.reveal;
        let privacy = self.privacy.load();
        let encoded = match batch.converted(reveal, |events| convert(&privacy, events, reveal)) {
            Ok(encoded) => encoded,
            Err(error) => {
                self.done = true;
                return Some(Err(QueryError::from(error).into()));
            }
        };
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for (position, event) in batch.events.iter().enumerate().skip(sending.position) {
            let wanted = sending.caller.may_use(&event.service)
                && (self.services.is_empty() || self.services.contains(&event.service))
                && self
                    .user
                    .as_ref()
                    .is_none_or(|user| event.user_id.as_ref() == Some(user));
            if wanted {
                let len = encoded.entry_len(position);
                let full = chunk.len() == EVENTS_PER_MESSAGE || bytes + len > MESSAGE_BYTES;
                if full && !chunk.is_empty() {
                    break;
                }
                chunk.push(position);
                bytes += len;
            }
            sending.position = position + 1;
        }
        if chunk.is_empty() {
            self.unsent = None;
            return None;
        }
        Some(Ok(TailResponse::encoded(encoded.entries(&chunk))))
    }
}

/// The message that tells a subscriber how many batches it missed.
fn missed_batches(missed: u64) -> TailResponse {
    metrics::tail_batches_missed(missed);
    TailResponse {
        missed_batches: missed,
        ..TailResponse::default()
    }
}

/// Where a subscriber is in the batch it is sending. The batch is held weakly: a client that
/// does not read holds no batch the ring has let go.
struct Sending {
    batch: Weak<TailBatch>,
    /// The caller's rights when the batch arrived, which filter it.
    caller: Caller,
    reveal: bool,
    /// The next event of the batch to consider.
    position: usize,
}

/// The most events one Tail message carries (a writer's batch can hold thousands).
const EVENTS_PER_MESSAGE: usize = 128;

/// A batch as Tail shows it, encoded once for every subscriber: encrypted values opened for
/// `pii` only.
fn convert(privacy: &Privacy, events: &[ValidEvent], reveal: bool) -> Converted {
    EncodedBatch::build(events, |event, bytes| {
        encode_event(&tailed_event(privacy, event, reveal)?, bytes);
        Ok(())
    })
    .map(Arc::new)
}

fn tailed_event(
    privacy: &Privacy,
    event: &ValidEvent,
    reveal: bool,
) -> Result<Event, PrivacyError> {
    let text = privacy.revealed_text(event.id, event.metadata_json.clone().into_bytes(), reveal)?;
    let metadata = Metadata::from_stored_text(text).map_err(|_| PrivacyError::Malformed)?;
    Ok(Event {
        id: event.id.to_string(),
        service: event.service.clone(),
        message: event.message.clone(),
        timestamp: Some(to_timestamp(event.timestamp)),
        user_id: event.user_id.clone().unwrap_or_default(),
        metadata: Some(metadata),
        ingested_at: Some(to_timestamp(Utc::now())),
        trace_id: event
            .trace_id
            .map(|trace_id| trace_id.to_string())
            .unwrap_or_default(),
    })
}
