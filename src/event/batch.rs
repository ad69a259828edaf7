//! The versioned encoding of a batch of events, shared by the spool's records and the Redis
//! broker's entries: a version byte, then that version's encoding (version 1: a protobuf
//! `SpoolBatch`, documented in `proto/sluice/spool/v1/spool.proto`).

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;

use super::{TraceId, ValidEvent};

/// The generated `sluice.spool.v1` messages.
#[allow(clippy::all, missing_docs)]
mod pb {
    include!("../proto/generated/sluice.spool.v1.rs");
}

/// The payload version written now.
const VERSION_PROTOBUF: u8 = 1;

/// Why a payload cannot be read as events.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("empty payload")]
    Empty,
    #[error("unknown record version {0} (written by a newer sluice?)")]
    UnknownVersion(u8),
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("event id is not 16 bytes")]
    InvalidId,
    #[error("event timestamp is out of range")]
    InvalidTimestamp,
}

/// A batch of events, and when the first of them was admitted (None: not known).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub events: Vec<ValidEvent>,
    pub admitted_at: Option<DateTime<Utc>>,
}

/// When the first event of several batches was admitted: the earliest, or None when any is
/// not known (every recorded erasure then reaches them).
pub fn earliest(
    admitted: impl IntoIterator<Item = Option<DateTime<Utc>>>,
) -> Option<DateTime<Utc>> {
    let mut earliest: Option<DateTime<Utc>> = None;
    for at in admitted {
        let at = at?;
        earliest = Some(earliest.map_or(at, |earliest| earliest.min(at)));
    }
    earliest
}

/// Encodes a batch as a current-version payload.
pub fn encode(events: &[&ValidEvent], admitted_at: Option<DateTime<Utc>>) -> Vec<u8> {
    let batch = pb::SpoolBatch {
        admitted_at_micros: admitted_at.map_or(0, |at| at.timestamp_micros()),
        events: events
            .iter()
            .map(|event| pb::SpoolEvent {
                id: event.id.as_bytes().to_vec(),
                service: event.service.clone(),
                message: event.message.clone(),
                timestamp_micros: event.timestamp.timestamp_micros(),
                user_id: event.user_id.clone(),
                metadata_json: event.metadata_json.clone(),
                trace_id: event
                    .trace_id
                    .map(|trace| trace.to_bytes().to_vec())
                    .unwrap_or_default(),
            })
            .collect(),
    };
    let mut payload = Vec::with_capacity(1 + batch.encoded_len());
    payload.push(VERSION_PROTOBUF);
    // Writing into a Vec cannot run out of room.
    batch.encode(&mut payload).unwrap_or_default();
    payload
}

/// Decodes a payload. Events are numbered by their place in the batch (the index of a
/// request is of no use once the request was acknowledged).
pub fn decode(payload: &[u8]) -> Result<Batch, BatchError> {
    match payload.split_first() {
        None => Err(BatchError::Empty),
        Some((&VERSION_PROTOBUF, rest)) => decode_protobuf(rest),
        Some((&version, _)) => Err(BatchError::UnknownVersion(version)),
    }
}

fn decode_protobuf(bytes: &[u8]) -> Result<Batch, BatchError> {
    let batch = pb::SpoolBatch::decode(bytes)?;
    let admitted_at = match batch.admitted_at_micros {
        0 => None,
        micros => {
            Some(DateTime::from_timestamp_micros(micros).ok_or(BatchError::InvalidTimestamp)?)
        }
    };
    let events = batch
        .events
        .into_iter()
        .enumerate()
        .map(|(index, event)| {
            Ok(ValidEvent {
                trace_id: <[u8; 16]>::try_from(event.trace_id.as_slice())
                    .ok()
                    .map(TraceId::from_bytes),
                index: index as u64,
                id: Uuid::from_slice(&event.id).map_err(|_| BatchError::InvalidId)?,
                service: event.service,
                message: event.message,
                timestamp: DateTime::from_timestamp_micros(event.timestamp_micros)
                    .ok_or(BatchError::InvalidTimestamp)?,
                user_id: event.user_id,
                metadata_json: event.metadata_json,
            })
        })
        .collect::<Result<Vec<ValidEvent>, BatchError>>()?;
    Ok(Batch {
        events,
        admitted_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ValidEvent {
        ValidEvent {
            trace_id: None,
            index: 0,
            id: Uuid::now_v7(),
            service: "svc".to_owned(),
            message: "m \u{e9}".to_owned(),
            timestamp: DateTime::from_timestamp_micros(1_800_000_000_123_456).expect("ts"),
            user_id: Some("u".to_owned()),
            metadata_json: r#"{"k":[1,2]}"#.to_owned(),
        }
    }

    #[test]
    fn a_batch_round_trips_through_the_current_version() {
        let events = vec![
            event(),
            ValidEvent {
                index: 1,
                user_id: None,
                trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok(),
                ..event()
            },
        ];
        let admitted_at = DateTime::from_timestamp_micros(1_800_000_000_654_321);
        let payload = encode(&events.iter().collect::<Vec<_>>(), admitted_at);
        assert_eq!(payload[0], VERSION_PROTOBUF);
        assert_eq!(
            decode(&payload).expect("decodes"),
            Batch {
                events,
                admitted_at,
            }
        );
        // A record written before admission times were kept says it does not know.
        let unknown = encode(&[&event()], None);
        assert_eq!(decode(&unknown).expect("decodes").admitted_at, None);
    }

    #[test]
    fn an_unknown_version_is_an_error_not_an_empty_batch() {
        let mut payload = encode(&[&event()], None);
        payload[0] = 9;
        assert!(matches!(
            decode(&payload),
            Err(BatchError::UnknownVersion(9))
        ));
    }
}
