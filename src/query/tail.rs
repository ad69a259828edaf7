//! Tail: follows new events as this node's writers store them, like `tail -f`, filtered by
//! services and user. Every subscriber reads the one shared ring of the [`TailFeed`]; one
//! that reads too slowly skips batches and is told how many.
//!
//! [`TailFeed`]: crate::feed::TailFeed

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::Stream;
use serde_json::Value as Json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::{QueryError, Reader};
use crate::{
    config::Scope,
    event::ValidEvent,
    filter::check_services,
    privacy::{Privacy, PrivacyError},
    proto::{Event, TailRequest, TailResponse, wire::to_timestamp},
    rpc::{Admission, Call},
};

/// Tail responses queued per subscriber before it skips batches.
const TAIL_QUEUE: usize = 8;

pub type TailStream = Pin<Box<dyn Stream<Item = Result<TailResponse, Status>> + Send + 'static>>;

/// Checks and audits the request, then follows the feed from a task of its own.
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
        });
    let details = serde_json::json!({ "services": request.services });
    admission.audited(&call, details, checked).await?;
    let user =
        (!request.user_id.is_empty()).then(|| reader.privacy.load().user_id(&request.user_id));
    let privacy = reader.privacy.clone();
    let admission = admission.clone();
    let mut batches = reader.feed.subscribe();
    let shutdown = reader.shutdown.clone();
    let (responses, receiver) = mpsc::channel(TAIL_QUEUE);
    tokio::spawn(
        async move {
            loop {
                let received = tokio::select! {
                    received = batches.recv() => received,
                    () = shutdown.cancelled() => return,
                };
                // A long-lived stream: the caller is looked up again under the policy in
                // force, so a reload or an expired token applies from the next batch on.
                let caller = match admission.refresh(&call) {
                    Ok(caller) => caller,
                    Err(error) => {
                        let _ = responses.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                let show = caller.has_scope(Scope::Pii);
                let wanted = |event: &ValidEvent| {
                    caller.may_use(&event.service)
                        && (request.services.is_empty()
                            || request.services.contains(&event.service))
                        && user
                            .as_ref()
                            .is_none_or(|user| event.user_id.as_ref() == Some(user))
                };
                let response = match received {
                    Ok(batch) => {
                        let privacy = privacy.load();
                        let events: Result<Vec<Event>, QueryError> = batch
                            .iter()
                            .filter(|event| wanted(event))
                            .map(|event| tailed_event(&privacy, event, show))
                            .collect();
                        match events {
                            Ok(events) if events.is_empty() => continue,
                            Ok(events) => Ok(TailResponse {
                                events,
                                missed_batches: 0,
                            }),
                            Err(error) => Err(Status::from(error)),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => Ok(TailResponse {
                        events: Vec::new(),
                        missed_batches: missed,
                    }),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // A client that stops reading must not hold up shutdown.
                tokio::select! {
                    sent = responses.send(response) => {
                        if sent.is_err() {
                            // The client went away: stop following.
                            return;
                        }
                    }
                    () = shutdown.cancelled() => return,
                }
            }
        }
        .in_current_span(),
    );
    Ok(Box::pin(ReceiverStream::new(receiver)))
}

/// A stored event as Tail shows it: encrypted values opened for `pii` only.
fn tailed_event(privacy: &Privacy, event: &ValidEvent, show: bool) -> Result<Event, QueryError> {
    let mut metadata: Json =
        serde_json::from_str(&event.metadata_json).map_err(|_| PrivacyError::Malformed)?;
    privacy.reveal(event.id, &mut metadata, show)?;
    Ok(Event {
        id: event.id.to_string(),
        service: event.service.clone(),
        message: event.message.clone(),
        timestamp: Some(to_timestamp(event.timestamp)),
        user_id: event.user_id.clone().unwrap_or_default(),
        metadata: match metadata {
            Json::Object(object) => Some(object.into()),
            _ => None,
        },
        ingested_at: Some(to_timestamp(Utc::now())),
        trace_id: event
            .trace_id
            .map(|trace_id| trace_id.to_string())
            .unwrap_or_default(),
    })
}
