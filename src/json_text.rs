//! Finding what JSON text must escape, eight bytes at a time: shared by the writers that put
//! strings into JSON without a serializer (the OTLP mapping, Export's lines).

/// Whether JSON text needs an escape in `bytes`: a control character, `"` or `\`. These are
/// all that serde_json and PostgreSQL's `escape_json` escape.
pub fn needs_escape(bytes: &[u8]) -> bool {
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
        if has_below(word, 0x20) || has(word, b'"') || has(word, b'\\') {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|byte| *byte < 0x20 || *byte == b'"' || *byte == b'\\')
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
    }
}
