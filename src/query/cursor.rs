//! Keyset page tokens: where the previous page of a Query ended, tied to its filter and order.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::{filter::Filter, proto::status::InvalidArgument};

/// Longest page token (a real one is under 100 characters).
pub const MAX_PAGE_TOKEN_BYTES: usize = 256;

/// Where the previous page ended: the (timestamp, id) of its last row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub ts: DateTime<Utc>,
    pub id: Uuid,
    /// A time-sliced scan's slice size when the page ended, so that the next call goes on
    /// with what the last one learned (a slice whose first step ran out of time is smaller).
    pub slice: Option<TimeDelta>,
    /// The start of a partition the scan reads in slices, not through its closed-partition
    /// index: a step through that index ran out of time.
    pub unindexed: Option<DateTime<Utc>>,
}

impl Cursor {
    pub fn at(ts: DateTime<Utc>, id: Uuid) -> Self {
        Self {
            ts,
            id,
            slice: None,
            unindexed: None,
        }
    }

    /// An opaque token: version, filter fingerprint, timestamp (µs), id, the slice in
    /// seconds when there is one, and `u` with the start (µs) of a partition read unindexed.
    pub fn encode(&self, filter: &Filter, oldest_first: bool) -> String {
        let mut text = format!(
            "1.{}.{}.{}",
            filter.fingerprint(oldest_first),
            self.ts.timestamp_micros(),
            self.id.simple()
        );
        if let Some(slice) = self.slice {
            text.push_str(&format!(".{}", slice.num_seconds()));
            if let Some(start) = self.unindexed {
                text.push_str(&format!(".u{}", start.timestamp_micros()));
            }
        }
        URL_SAFE_NO_PAD.encode(text)
    }

    pub fn decode(
        token: &str,
        filter: &Filter,
        oldest_first: bool,
    ) -> Result<Self, InvalidArgument> {
        let invalid = || InvalidArgument::new("page_token", "not a page token of this query");
        if token.len() > MAX_PAGE_TOKEN_BYTES {
            return Err(invalid());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let parts: Vec<&str> = text.split('.').collect();
        let (fingerprint, micros, id, slice, unindexed) = match parts.as_slice() {
            ["1", fingerprint, micros, id] => (fingerprint, micros, id, None, None),
            ["1", fingerprint, micros, id, slice] => (fingerprint, micros, id, Some(slice), None),
            ["1", fingerprint, micros, id, slice, unindexed] => {
                let start = unindexed
                    .strip_prefix('u')
                    .and_then(|micros| micros.parse::<i64>().ok())
                    .and_then(DateTime::from_timestamp_micros)
                    .ok_or_else(invalid)?;
                (fingerprint, micros, id, Some(slice), Some(start))
            }
            _ => return Err(invalid()),
        };
        if fingerprint.parse::<u32>().ok() != Some(filter.fingerprint(oldest_first)) {
            return Err(InvalidArgument::new(
                "page_token",
                "the page token belongs to a query with other filters or order",
            ));
        }
        let ts = micros
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid)?;
        let id = Uuid::try_parse(id).map_err(|_| invalid())?;
        let slice = match slice {
            None => None,
            Some(seconds) => Some(
                seconds
                    .parse::<u32>()
                    .ok()
                    .filter(|seconds| *seconds > 0)
                    .map(|seconds| TimeDelta::seconds(i64::from(seconds)))
                    .ok_or_else(invalid)?,
            ),
        };
        Ok(Self {
            ts,
            id,
            slice,
            unindexed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_tied_to_their_filter() {
        let filter = Filter {
            services: vec!["billing".to_owned()],
            ..Filter::default()
        };
        let cursor = Cursor::at(
            DateTime::from_timestamp_micros(1_800_000_000_123_456).expect("ts"),
            Uuid::now_v7(),
        );
        let token = cursor.encode(&filter, false);
        assert_eq!(
            Cursor::decode(&token, &filter, false).expect("decodes"),
            cursor
        );
        assert!(
            Cursor::decode(&token, &filter, true).is_err(),
            "other order"
        );
        assert!(
            Cursor::decode(&token, &Filter::default(), false).is_err(),
            "other filter"
        );
        assert!(Cursor::decode("garbage!", &filter, false).is_err());
        // A scan's slice travels with its token.
        let scanning = Cursor {
            slice: Some(TimeDelta::minutes(15)),
            ..cursor
        };
        let token = scanning.encode(&filter, false);
        assert_eq!(
            Cursor::decode(&token, &filter, false).expect("decodes"),
            scanning
        );
        // So does a scan's fallback from a closed partition's index.
        let unindexed = Cursor {
            unindexed: DateTime::from_timestamp_micros(1_799_900_000_000_000),
            ..scanning
        };
        let token = unindexed.encode(&filter, false);
        assert_eq!(
            Cursor::decode(&token, &filter, false).expect("decodes"),
            unindexed
        );
    }

    #[test]
    fn oversized_tokens_are_refused_before_decoding() {
        assert!(Cursor::decode(&"t".repeat(1_000), &Filter::default(), false).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_page_tokens_never_panic_and_are_refused_by_field(token in ".{0,300}") {
            let filter = Filter {
                services: vec!["svc".to_owned()],
                ..Filter::default()
            };
            if let Err(error) = Cursor::decode(&token, &filter, false) {
                let precise = matches!(error, InvalidArgument { field: "page_token", .. });
                proptest::prop_assert!(precise, "{:?}", error);
            }
        }

        #[test]
        fn tampered_real_tokens_are_refused_or_point_inside_the_same_query(
            flip in 0usize..64,
            to in proptest::char::range('0', 'z'),
        ) {
            let filter = Filter::default();
            let cursor = Cursor {
                ts: DateTime::from_timestamp_micros(1_800_000_000_000_000).expect("ts"),
                id: Uuid::nil(),
                slice: Some(TimeDelta::hours(2)),
                unindexed: DateTime::from_timestamp_micros(1_799_900_000_000_000),
            };
            let token = cursor.encode(&filter, true);
            let mut chars: Vec<char> = token.chars().collect();
            let at = flip % chars.len();
            chars[at] = to;
            let tampered: String = chars.into_iter().collect();
            if let Err(error) = Cursor::decode(&tampered, &filter, true) {
                let precise = matches!(error, InvalidArgument { field: "page_token", .. });
                proptest::prop_assert!(precise, "{:?}", error);
            }
        }
    }
}
