//! Requests encoded once, before a load starts, and sent as they are: a load generator's own
//! CPU (building, cloning and encoding every request it sends) is CPU the server and
//! PostgreSQL do not get on the same machine, and is not what the bench measures. Answers
//! decode as the generated clients decode them.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, EncodeBuf, Encoder},
};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Each request of each stream, encoded (the protobuf message, without gRPC's frame).
pub fn encode_all<M: Message>(workload: &[Vec<M>]) -> Vec<Vec<Bytes>> {
    workload
        .iter()
        .map(|requests| {
            requests
                .iter()
                .map(|request| Bytes::from(request.encode_to_vec()))
                .collect()
        })
        .collect()
}

/// Sends pre-encoded messages; decodes answers of type `U` with prost.
#[derive(Debug)]
pub struct PreEncoded<U> {
    _answer: PhantomData<U>,
}

impl<U> Default for PreEncoded<U> {
    fn default() -> Self {
        Self {
            _answer: PhantomData,
        }
    }
}

impl<U: Message + Default + Send + 'static> Codec for PreEncoded<U> {
    type Encode = Bytes;
    type Decode = U;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<U> {
        ProstCodec::<U, U>::default().decoder()
    }
}

/// Writes a message's bytes as they were encoded.
#[derive(Debug)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::proto::{Event, IngestRequest};

    #[test]
    fn a_request_is_encoded_as_the_generated_client_encodes_it() {
        let request = IngestRequest {
            events: vec![Event {
                service: "billing".into(),
                message: "paid".into(),
                ..Default::default()
            }],
            sequence: 7,
        };
        let encoded = encode_all(&[vec![request.clone()]]);
        assert_eq!(encoded.len(), 1);
        let decoded = IngestRequest::decode(encoded[0][0].clone()).expect("decodes");
        assert_eq!(decoded, request);
    }
}
