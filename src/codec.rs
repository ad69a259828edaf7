//! The gRPC codec of every sluice service: prost, except that a request that does not decode
//! (garbage bytes, truncation, wrong wire types, invalid UTF-8, nesting past prost's recursion
//! limit) is the client's fault and gets INVALID_ARGUMENT with a BadRequest that says what was
//! wrong, not prost's INTERNAL.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::status::bad_request;

/// The field a BadRequest names for a request that does not decode.
pub const MALFORMED_FIELD: &str = "request";

/// prost encoding, with decode failures mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct StrictProstCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder { _type: PhantomData }
    }
}

/// Decodes `U`, refusing malformed input as the client's error.
#[derive(Debug)]
pub struct StrictProstDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over one message in one contiguous buffer. Decoding from a plain slice
        // lets prost read varints and copy strings straight from it, instead of going through
        // `DecodeBuf`'s bounds bookkeeping for every byte it advances (BENCHMARKS.md, "Decoding
        // from a slice").
        let len = buf.remaining();
        let chunk = buf.chunk();
        if chunk.len() != len {
            return U::decode(buf).map(Some).map_err(malformed);
        }
        let decoded = U::decode(chunk);
        buf.advance(len);
        decoded.map(Some).map_err(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// INVALID_ARGUMENT + BadRequest for a message that does not decode.
pub fn malformed(error: prost::DecodeError) -> Status {
    bad_request(
        "request is not a valid protobuf message of this method".to_owned(),
        MALFORMED_FIELD,
        error.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn garbage_is_invalid_argument_with_a_bad_request_naming_the_request() {
        let error = crate::proto::IngestRequest::decode(&b"\xff\xff\xff\xff"[..])
            .expect_err("garbage does not decode");
        let status = malformed(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("bad request").field_violations[0];
        assert_eq!(violation.field, MALFORMED_FIELD);
        assert!(!violation.description.is_empty());
        // A valid message still decodes.
        let mut bytes = BytesMut::new();
        crate::proto::IngestRequest::default()
            .encode(&mut bytes)
            .expect("encode");
        assert!(crate::proto::IngestRequest::decode(bytes).is_ok());
    }
}
