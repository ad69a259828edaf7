//! The spool's on-disk framing, documented in `proto/sluice/spool/v1/spool.proto`.
//!
//! A segment starts with an 8-byte magic that names its format. A record is framed as payload
//! length (u32 LE), CRC32C of the payload (u32 LE), payload. In a `SLSPOOL2` segment a payload
//! is a batch in the versioned encoding of [`crate::event::batch`], which the Redis broker uses
//! for its entries too. A
//! `SLSPOOL1` segment, written before records were versioned, holds JSON arrays of events; it
//! is still read, through a frozen copy of that layout, and never written.

use std::io::{self, Read};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{
    ValidEvent,
    batch::{self, Batch, BatchError},
};

/// The magic of segments written now.
pub const MAGIC: &[u8; 8] = b"SLSPOOL2";
/// The magic of segments written before records carried a version (JSON payloads).
const LEGACY_MAGIC: &[u8; 8] = b"SLSPOOL1";
pub const MAGIC_LEN: u64 = MAGIC.len() as u64;
pub const RECORD_HEADER: usize = 8;
/// A record larger than this is not a record: the length field is garbage.
pub const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

/// How a segment's payloads are encoded, from its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentFormat {
    /// `SLSPOOL1`: JSON arrays of events, no version byte.
    LegacyJson,
    /// `SLSPOOL2`: a version byte, then that version's encoding.
    Versioned,
}

impl SegmentFormat {
    pub fn from_magic(magic: &[u8; 8]) -> Option<Self> {
        match magic {
            magic if magic == MAGIC => Some(Self::Versioned),
            magic if magic == LEGACY_MAGIC => Some(Self::LegacyJson),
            _ => None,
        }
    }
}

/// Why a record cannot be read as events.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "a record fails its checksum and more records follow it (corruption, not a torn append)"
    )]
    CorruptRecord,
    #[error("a record length is larger than any record (corruption, not a torn append)")]
    BadLength,
    #[error(
        "a sealed segment ends inside a record (corruption: only the newest segment can be torn)"
    )]
    SealedTornTail,
    #[error("the segment does not start with a known magic (written by a newer sluice?)")]
    UnknownFormat,
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("legacy json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes a payload of a segment of `format`. Events are numbered by their place in the
/// batch (the index of a request is of no use once the request was acknowledged).
pub fn decode_batch(format: SegmentFormat, payload: &[u8]) -> Result<Batch, DecodeError> {
    match format {
        SegmentFormat::LegacyJson => Ok(Batch {
            events: decode_legacy_json(payload)?,
            admitted_at: None,
        }),
        SegmentFormat::Versioned => Ok(batch::decode(payload)?),
    }
}

/// The event layout of `SLSPOOL1` records (the serde JSON of the in-memory event of that
/// release), frozen here so that the in-memory type may change.
#[derive(serde::Deserialize)]
struct LegacyEvent {
    index: u64,
    id: Uuid,
    service: String,
    message: String,
    timestamp: DateTime<Utc>,
    user_id: Option<String>,
    metadata_json: String,
}

fn decode_legacy_json(payload: &[u8]) -> Result<Vec<ValidEvent>, DecodeError> {
    let events: Vec<LegacyEvent> = serde_json::from_slice(payload)?;
    Ok(events
        .into_iter()
        .map(|event| ValidEvent {
            trace_id: None,
            index: event.index,
            id: event.id,
            service: event.service,
            message: event.message,
            timestamp: event.timestamp,
            user_id: event.user_id,
            metadata_json: event.metadata_json,
        })
        .collect())
}

/// A record framed for appending: length, checksum, payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
    // `append` refuses payloads over MAX_RECORD_BYTES, so the length fits.
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// What the next bytes of a segment hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// An intact record's payload.
    Record(Vec<u8>),
    /// The clean end of the segment.
    End,
    /// The segment ends inside a record, or in a zero-filled tail: a crash mid-append.
    Torn,
    /// A length larger than any record: corruption.
    BadLength,
    /// A whole record whose payload fails its checksum; `bytes` is its framed size.
    BadChecksum { bytes: u64 },
}

/// Reads the next frame.
pub fn read_frame(reader: &mut impl Read) -> io::Result<Frame> {
    let mut header = [0u8; RECORD_HEADER];
    match read_full(reader, &mut header)? {
        0 => return Ok(Frame::End),
        read if read < RECORD_HEADER => return Ok(Frame::Torn),
        _ => {}
    }
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // Appends never write an empty payload; a zero header is a zero-filled tail (and its
    // checksum, of nothing, would hold).
    if length == 0 {
        return Ok(Frame::Torn);
    }
    if length > MAX_RECORD_BYTES {
        return Ok(Frame::BadLength);
    }
    let mut payload = vec![0u8; length];
    if read_full(reader, &mut payload)? < length {
        return Ok(Frame::Torn);
    }
    if crc32c::crc32c(&payload) != checksum {
        return Ok(Frame::BadChecksum {
            bytes: (RECORD_HEADER + length) as u64,
        });
    }
    Ok(Frame::Record(payload))
}

/// Reads until `buffer` is full or the input ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_tell_torn_tails_from_bad_checksums() {
        let record = frame(b"payload");
        assert_eq!(
            read_frame(&mut record.as_slice()).expect("read"),
            Frame::Record(b"payload".to_vec())
        );
        assert_eq!(read_frame(&mut &record[..10]).expect("read"), Frame::Torn);
        assert_eq!(read_frame(&mut &record[..3]).expect("read"), Frame::Torn);
        assert_eq!(read_frame(&mut &[][..]).expect("read"), Frame::End);
        assert_eq!(read_frame(&mut &[0u8; 16][..]).expect("read"), Frame::Torn);
        assert_eq!(
            read_frame(&mut &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..]).expect("read"),
            Frame::BadLength
        );
        let mut flipped = record.clone();
        flipped[9] ^= 0xff;
        assert_eq!(
            read_frame(&mut flipped.as_slice()).expect("read"),
            Frame::BadChecksum {
                bytes: record.len() as u64
            }
        );
    }
}
