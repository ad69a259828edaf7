//! `sluice.v1.TailResponse`, written by hand instead of generated, so that the server can
//! send events already encoded: a batch is encoded once for every Tail subscriber, and each
//! subscriber's message is a slice (or a concatenation) of those bytes rather than its own
//! copy of every event, encoded again. On the wire it is the message the proto declares;
//! clients decode `events` and `missed_batches` as from any generated message.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, message, skip_field, uint64},
};

use super::Event;

/// The size Tail's messages keep to (each carries at least one event, however large), and
/// the most its stream's encoder gathers before handing bytes to HTTP/2: a stream whose
/// client does not read then holds little beyond HTTP/2's own send buffer.
pub const MESSAGE_BYTES: usize = 16 * 1024;

/// The field number of `events`.
pub const EVENTS_FIELD: u32 = 1;
/// The field number of `missed_batches`.
const MISSED_BATCHES_FIELD: u32 = 2;

#[derive(Clone, PartialEq, Default, Debug)]
pub struct TailResponse {
    /// Newly stored events, oldest first within the batch.
    pub events: Vec<Event>,
    /// Batches skipped since the last message because this subscriber fell behind.
    pub missed_batches: u64,
    /// More `events`, already encoded as entries of field 1 (key, length, `Event`), sent
    /// after those of `events`. Only the server fills it; decoding puts every event in
    /// `events`.
    pub encoded_events: Bytes,
}

impl TailResponse {
    /// A message of events already encoded by [`encode_event`].
    pub fn encoded(encoded_events: Bytes) -> Self {
        Self {
            encoded_events,
            ..Self::default()
        }
    }
}

/// `event` as one entry of TailResponse's `events` field, appended to `buf`: the form
/// [`TailResponse::encoded_events`] holds.
pub fn encode_event(event: &Event, buf: &mut impl BufMut) {
    message::encode(EVENTS_FIELD, event, buf);
}

impl Message for TailResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        message::encode_repeated(EVENTS_FIELD, &self.events, buf);
        buf.put_slice(&self.encoded_events);
        if self.missed_batches != 0 {
            uint64::encode(MISSED_BATCHES_FIELD, &self.missed_batches, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            EVENTS_FIELD => message::merge_repeated(wire_type, &mut self.events, buf, ctx).map_err(
                |mut error| {
                    error.push("TailResponse", "events");
                    error
                },
            ),
            MISSED_BATCHES_FIELD => uint64::merge(wire_type, &mut self.missed_batches, buf, ctx)
                .map_err(|mut error| {
                    error.push("TailResponse", "missed_batches");
                    error
                }),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(EVENTS_FIELD, &self.events)
            + self.encoded_events.len()
            + if self.missed_batches != 0 {
                uint64::encoded_len(MISSED_BATCHES_FIELD, &self.missed_batches)
            } else {
                0
            }
    }

    fn clear(&mut self) {
        self.events.clear();
        self.missed_batches = 0;
        self.encoded_events = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            service: "checkout".to_owned(),
            message: "paid".to_owned(),
            ..Event::default()
        }
    }

    #[test]
    fn events_sent_encoded_decode_as_events_in_order() {
        let mut encoded = Vec::new();
        encode_event(&event("b"), &mut encoded);
        encode_event(&event("c"), &mut encoded);
        let sent = TailResponse {
            events: vec![event("a")],
            missed_batches: 0,
            encoded_events: Bytes::from(encoded),
        };
        let wire = sent.encode_to_vec();
        assert_eq!(wire.len(), sent.encoded_len());
        let received = TailResponse::decode(wire.as_slice()).expect("decodes");
        let ids: Vec<_> = received
            .events
            .iter()
            .map(|event| event.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(received.encoded_events.is_empty());
    }

    #[test]
    fn the_wire_form_is_the_generated_messages() {
        // The same message as prost would derive it from the proto.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Generated {
            #[prost(message, repeated, tag = "1")]
            events: Vec<Event>,
            #[prost(uint64, tag = "2")]
            missed_batches: u64,
        }
        let generated = Generated {
            events: vec![event("a"), event("b")],
            missed_batches: 3,
        };
        let mut encoded = Vec::new();
        encode_event(&event("b"), &mut encoded);
        let by_hand = TailResponse {
            events: vec![event("a")],
            missed_batches: 3,
            encoded_events: Bytes::from(encoded),
        };
        assert_eq!(by_hand.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(
            TailResponse::decode(generated.encode_to_vec().as_slice()).expect("decodes"),
            TailResponse {
                events: generated.events,
                missed_batches: 3,
                encoded_events: Bytes::new(),
            }
        );
    }
}
