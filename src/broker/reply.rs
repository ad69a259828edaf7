//! XREADGROUP's reply taken apart as it is: each entry's fields moved out of the reply, never
//! copied. redis-rs's `StreamReadReply` clones the whole reply before converting it, so every
//! entry's payload (a whole ingest batch) was copied once more at a writer node's full rate.

use redis::{Value, streams::StreamId};

/// Why an XREADGROUP reply could not be read: not the shape Redis gives it.
#[derive(Debug, thiserror::Error)]
#[error("unexpected XREADGROUP reply: {0}")]
pub struct ReplyError(&'static str);

/// One stream's new entries.
pub(super) struct StreamEntries {
    pub(super) key: String,
    pub(super) entries: Vec<StreamId>,
}

/// The streams of an XREADGROUP reply (RESP2's array of pairs or RESP3's map; nil when a
/// read found nothing), each with its entries in order.
pub(super) fn read_group(reply: Value) -> Result<Vec<StreamEntries>, ReplyError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(pair)
            .collect::<Result<Vec<_>, _>>()?,
        Value::Map(streams) => streams,
        _ => return Err(ReplyError("neither an array nor a map")),
    };
    streams
        .into_iter()
        .map(|(key, entries)| {
            let entries = match entries {
                Value::Nil => Vec::new(),
                Value::Array(entries) => entries
                    .into_iter()
                    .map(stream_entry)
                    .collect::<Result<_, _>>()?,
                _ => return Err(ReplyError("a stream's entries are not an array")),
            };
            Ok(StreamEntries {
                key: text(key)?,
                entries,
            })
        })
        .collect()
}

/// `[id, [field, value, …]]` (the fields a map in RESP3; nil for an entry deleted while
/// pending).
fn stream_entry(entry: Value) -> Result<StreamId, ReplyError> {
    let (id, fields) = pair(entry)?;
    let pairs = match fields {
        Value::Nil => Vec::new(),
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            if flat.len() % 2 != 0 {
                return Err(ReplyError("an entry's fields are not in pairs"));
            }
            let mut flat = flat.into_iter();
            std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
        }
        _ => return Err(ReplyError("an entry's fields are not an array")),
    };
    let map = pairs
        .into_iter()
        .map(|(field, value)| Ok((text(field)?, value)))
        .collect::<Result<_, _>>()?;
    Ok(StreamId {
        id: text(id)?,
        map,
        ..StreamId::default()
    })
}

fn pair(value: Value) -> Result<(Value, Value), ReplyError> {
    let Value::Array(items) = value else {
        return Err(ReplyError("a pair is not an array"));
    };
    let mut items = items.into_iter();
    match (items.next(), items.next()) {
        (Some(first), Some(second)) => Ok((first, second)),
        _ => Err(ReplyError("a pair has fewer than two items")),
    }
}

fn text(value: Value) -> Result<String, ReplyError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|_| ReplyError("a name is not UTF-8"))
        }
        Value::SimpleString(text) => Ok(text),
        _ => Err(ReplyError("a name is not a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn a_reply_gives_each_streams_entries_with_their_fields_in_resp2_and_resp3() {
        let fields = Value::Array(vec![bulk("b"), bulk("payload"), bulk("n"), bulk("2")]);
        let resp2 = Value::Array(vec![
            Value::Array(vec![
                bulk("sluice:{0}:events"),
                Value::Array(vec![
                    Value::Array(vec![bulk("1-0"), fields.clone()]),
                    Value::Array(vec![bulk("1-1"), Value::Nil]),
                ]),
            ]),
            Value::Array(vec![bulk("sluice:{1}:events"), Value::Array(vec![])]),
        ]);
        let resp3 = Value::Map(vec![(
            bulk("sluice:{0}:events"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Map(vec![(bulk("b"), bulk("payload")), (bulk("n"), bulk("2"))]),
            ])]),
        )]);
        for reply in [resp2, resp3] {
            let streams = read_group(reply).expect("reads");
            assert_eq!(streams[0].key, "sluice:{0}:events");
            let entry = &streams[0].entries[0];
            assert_eq!(entry.id, "1-0");
            assert_eq!(entry.map.get("b"), Some(&bulk("payload")));
            assert_eq!(entry.get::<u64>("n"), Some(2));
        }
        assert!(read_group(Value::Nil).expect("reads").is_empty());
        assert!(read_group(Value::Int(3)).is_err());
        assert!(
            read_group(Value::Array(vec![Value::Array(vec![
                bulk("k"),
                Value::Array(vec![Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("b")])
                ])]),
            ])]))
            .is_err(),
            "fields not in pairs"
        );
    }
}
