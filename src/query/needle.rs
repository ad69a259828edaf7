//! What a closed day's trigram index looks up for a `message_contains`. The index serves
//! `message LIKE '%…%'` for any part of the needle (the exact `strpos` filter stays), and its
//! cost is the posting lists of the looked-up trigrams: the words nearly every message holds
//! (`GET`, `orders`, `in` of a log template) make most of it while they narrow nothing. So the
//! lookup is the stretch of the needle between such words with the most characters of rare
//! words of 3 characters or more, from its first such word to its last: the separators around
//! it are left out too, as a word's first and last trigrams (`  1`, ` 12`: any number starting
//! with 1) are as common as the template's. A needle with no common word, or no such rare
//! word, is looked up whole. At 3.57M rows a day, `/orders/1234567 -> ` costs 93 ms looked up
//! whole and 2.6 ms as `1234567` (BENCHMARKS.md, "Search that answers").

use std::collections::HashSet;

use crate::store::closed_indexes::words;

/// The part of `needle` to look up in a trigram index, given the partition's `common` words.
pub fn trigram_lookup<'a>(needle: &'a str, common: &HashSet<String>) -> &'a str {
    let words = words(needle);
    if !words.iter().any(|(_, _, word)| common.contains(word)) {
        return needle;
    }
    // The stretches between common words, each scored by the characters of its rare words
    // long enough to give a trigram of their own, and spanning the first to the last of them.
    let mut best: Option<(usize, usize, usize)> = None;
    let mut current: Option<(usize, usize, usize)> = None;
    for (start, end, word) in words.iter().map(|(s, e, w)| (*s, *e, w)) {
        if common.contains(word) {
            best = better(best, current.take());
        } else if word.chars().count() >= 3 {
            let length = word.chars().count();
            current = Some(match current {
                Some((from, _, score)) => (from, end, score + length),
                None => (start, end, length),
            });
        }
    }
    match better(best, current) {
        Some((from, until, _)) => &needle[from..until],
        None => needle,
    }
}

/// The higher-scored of two stretches (the first on a tie).
fn better(
    best: Option<(usize, usize, usize)>,
    other: Option<(usize, usize, usize)>,
) -> Option<(usize, usize, usize)> {
    match (best, other) {
        (Some(best), Some(other)) if other.2 > best.2 => Some(other),
        (None, other) => other,
        (best, _) => best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(words: &[&str]) -> HashSet<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    #[test]
    fn a_needle_without_common_words_is_looked_up_whole() {
        assert_eq!(
            trigram_lookup("E1234 timeout", &common(&["get"])),
            "E1234 timeout"
        );
    }

    #[test]
    fn the_longest_rare_stretch_between_common_words_is_looked_up() {
        let template = common(&["get", "api", "orders", "in", "ms", "200"]);
        assert_eq!(trigram_lookup("/orders/1234567 -> ", &template), "1234567");
        assert_eq!(trigram_lookup("-> 599 in", &template), "599");
        assert_eq!(
            trigram_lookup("payments timeout in checkout-db", &template),
            "payments timeout"
        );
        // Short words between rare ones stay; words are matched lowercased, as pg_trgm does.
        assert_eq!(trigram_lookup("GET E42 at db7 in", &template), "E42 at db7");
    }

    #[test]
    fn a_needle_of_common_or_short_words_only_is_looked_up_whole() {
        let template = common(&["get", "orders", "in"]);
        assert_eq!(trigram_lookup("GET orders", &template), "GET orders");
        assert_eq!(trigram_lookup("in 59 ms", &template), "in 59 ms");
    }
}
