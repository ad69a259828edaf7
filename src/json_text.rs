//! Finding what JSON text must escape, eight bytes at a time, and the numbers JSON writes as
//! integers: shared by the writers that put values into JSON without a serializer (the OTLP
//! mapping, native metadata, Export's lines).

/// A double that holds an integer JSON readers take exactly (below 2^53 in magnitude), as
/// that integer: sluice writes such numbers without a fraction (`200`, not `200.0`), on every
/// ingest path alike.
pub fn exact_integer(number: f64) -> Option<i64> {
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;
    // A round trip through i64 rather than `fract()`, which is a libm call on baseline x86-64.
    let integer = number as i64;
    (integer as f64 == number && number.abs() < EXACT_INTEGER_LIMIT).then_some(integer)
}

/// Whether JSON text needs an escape in `bytes`: a control character, `"` or `\`. These are
/// all that serde_json and PostgreSQL's `escape_json` escape.
pub fn needs_escape(bytes: &[u8]) -> bool {
    finds(bytes, false)
}

/// Whether `bytes` are ASCII that JSON takes as they are: UTF-8 without a check of its own,
/// and no escape. One pass where a UTF-8 check and [`needs_escape`] would take two.
pub fn is_plain_ascii(bytes: &[u8]) -> bool {
    !finds(bytes, true)
}

/// Whether `bytes` hold one that needs an escape, or, with `non_ascii`, one past ASCII.
#[inline]
fn finds(bytes: &[u8], non_ascii: bool) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether a byte of `word` is below `limit` (at most 0x80), exactly.
    let has_below =
        |word: u64, limit: u8| word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGHS != 0;
    let has = |word: u64, byte: u8| has_below(word ^ (ONES * u64::from(byte)), 1);
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        if (non_ascii && word & HIGHS != 0)
            || has_below(word, 0x20)
            || has(word, b'"')
            || has(word, b'\\')
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|byte| (non_ascii && *byte >= 0x80) || *byte < 0x20 || *byte == b'"' || *byte == b'\\')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn an_escape_is_found_wherever_a_byte_needs_one(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let expected = bytes.iter().any(|byte| *byte < 0x20 || *byte == b'"' || *byte == b'\\');
            prop_assert_eq!(needs_escape(&bytes), expected);
        }

        #[test]
        fn plain_ascii_is_ascii_with_nothing_to_escape(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let expected = bytes.is_ascii() && !needs_escape(&bytes);
            prop_assert_eq!(is_plain_ascii(&bytes), expected);
        }
    }
}
