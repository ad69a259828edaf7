//! OTLP's `ExportLogsServiceRequest` as the gRPC and HTTP servers hand it over: its encoded
//! bytes, kept as they arrived. [`crate::otlp`] maps the records straight from them (string
//! fields as slices of the request, every attribute's JSON written from the wire), where a
//! decoded request would first build and then drop a tree of owned strings, attribute lists
//! and values per record (BENCHMARKS.md, "OpenTelemetry logs in").

use ::bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use prost::{
    DecodeError, Message,
    encoding::{
        DecodeContext, WireType, bytes, check_wire_type, decode_varint, encode_key, encode_varint,
        fixed32, fixed64,
    },
};

/// An encoded `ExportLogsServiceRequest`. Its `Message` implementation keeps whatever fields
/// it is given, unparsed: the bytes are checked when the request is mapped, and a malformed
/// one is then INVALID_ARGUMENT like any request that does not decode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedLogsRequest {
    bytes: Bytes,
}

impl EncodedLogsRequest {
    pub fn new(bytes: Bytes) -> Self {
        Self { bytes }
    }

    /// The request's encoding.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<&ExportLogsServiceRequest> for EncodedLogsRequest {
    fn from(request: &ExportLogsServiceRequest) -> Self {
        Self::new(request.encode_to_vec().into())
    }
}

impl Message for EncodedLogsRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    /// Appends the field as it came (its key, then its value). sluice's codec never gets
    /// here: it takes a whole request's bytes at once, without a copy.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut field = Vec::with_capacity(self.bytes.len() + 16);
        field.extend_from_slice(&self.bytes);
        encode_key(tag, wire_type, &mut field);
        match wire_type {
            WireType::Varint => encode_varint(decode_varint(buf)?, &mut field),
            WireType::SixtyFourBit => {
                let mut value = 0;
                fixed64::merge(wire_type, &mut value, buf, ctx)?;
                field.put_u64_le(value);
            }
            WireType::ThirtyTwoBit => {
                let mut value = 0;
                fixed32::merge(wire_type, &mut value, buf, ctx)?;
                field.put_u32_le(value);
            }
            WireType::LengthDelimited => {
                let mut value = Bytes::new();
                bytes::merge(wire_type, &mut value, buf, ctx)?;
                encode_varint(value.len() as u64, &mut field);
                field.extend_from_slice(&value);
            }
            // OTLP defines no groups, and proto3 cannot declare one: prost's error for a field
            // of the wrong wire type.
            WireType::StartGroup | WireType::EndGroup => {
                check_wire_type(WireType::LengthDelimited, wire_type)?;
            }
        }
        self.bytes = field.into();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};

    use super::*;

    #[test]
    fn decoding_keeps_the_request_as_it_was_sent() {
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: vec![LogRecord {
                        time_unix_nano: 1,
                        severity_number: 9,
                        flags: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        // A field of every wire type (an unknown varint and fixed32 after the records).
        let mut sent = request.encode_to_vec();
        sent.extend_from_slice(&[
            0x48, 0x96, 0x01, 0x55, 1, 2, 3, 4, 0x59, 0, 0, 0, 0, 0, 0, 0, 9,
        ]);
        let decoded = EncodedLogsRequest::decode(sent.as_slice()).expect("decodes");
        assert_eq!(decoded.bytes(), sent.as_slice());
        assert_eq!(decoded.encode_to_vec(), sent);
        assert_eq!(
            EncodedLogsRequest::from(&request).bytes(),
            request.encode_to_vec()
        );
    }

    #[test]
    fn truncated_fields_and_groups_do_not_decode() {
        for bytes in [&[0x0a, 0x05, 1][..], &[0x0b, 0x0c], &[0x11, 0, 0], &[0x08]] {
            assert!(EncodedLogsRequest::decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
