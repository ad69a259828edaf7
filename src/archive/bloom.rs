//! The trace ids of an archived object, as a Bloom filter in its catalog row
//! (`archives.trace_bloom`): a Query by `trace_id` reads only the objects whose filter may
//! hold the trace (1% false positives), without a catalog row per trace. Hashes are SHA-256,
//! stable across builds, so a filter written by one version is read by the next.
//!
//! Layout: version (1), hash count, bit count (u32 little-endian), then the bits.

use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const HASHES: u8 = 7;
/// Bits per trace id for about 1% false positives with 7 hashes.
const BITS_PER_ITEM: usize = 10;
const HEADER: usize = 6;

/// Builds the filter of `trace_ids` (an object without trace ids gets an empty one, which
/// holds none).
pub fn build<'a>(trace_ids: impl ExactSizeIterator<Item = &'a str>) -> Vec<u8> {
    let bits = (trace_ids.len() * BITS_PER_ITEM).max(64);
    let bits = u32::try_from(bits).unwrap_or(u32::MAX);
    let mut filter = vec![0u8; HEADER + (bits as usize).div_ceil(8)];
    filter[0] = VERSION;
    filter[1] = HASHES;
    filter[2..HEADER].copy_from_slice(&bits.to_le_bytes());
    for trace_id in trace_ids {
        for bit in positions(trace_id, HASHES, bits) {
            filter[HEADER + bit / 8] |= 1 << (bit % 8);
        }
    }
    filter
}

/// Whether the object may hold `trace_id`; true for a filter this build cannot read.
pub fn may_hold(filter: &[u8], trace_id: &str) -> bool {
    let Some(header) = filter.get(..HEADER) else {
        return true;
    };
    let bits = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
    if header[0] != VERSION || bits == 0 || filter.len() < HEADER + (bits as usize).div_ceil(8) {
        return true;
    }
    positions(trace_id, header[1], bits).all(|bit| filter[HEADER + bit / 8] & (1 << (bit % 8)) != 0)
}

/// The bits of `trace_id`: double hashing over the two halves of its SHA-256.
fn positions(trace_id: &str, hashes: u8, bits: u32) -> impl Iterator<Item = usize> {
    let digest = Sha256::digest(trace_id.as_bytes());
    let half = |range: std::ops::Range<usize>| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[range]);
        u64::from_le_bytes(bytes)
    };
    let (first, second) = (half(0..8), half(8..16) | 1);
    (0..u64::from(hashes)).map(move |index| {
        (first.wrapping_add(index.wrapping_mul(second)) % u64::from(bits)) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_holds_its_trace_ids_and_rarely_others() {
        let traces: Vec<String> = (0..2_000).map(|n| format!("{n:032x}")).collect();
        let filter = build(traces.iter().map(String::as_str));
        assert!(traces.iter().all(|trace| may_hold(&filter, trace)));
        let false_positives = (10_000..20_000)
            .filter(|n| may_hold(&filter, &format!("{n:032x}")))
            .count();
        assert!(false_positives < 300, "{false_positives} of 10,000");
        let empty = build(std::iter::empty());
        assert!(!may_hold(&empty, &traces[0]));
        assert!(may_hold(b"", &traces[0]), "unreadable: read the object");
        assert!(may_hold(
            &[9, 7, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &traces[0]
        ));
    }
}
