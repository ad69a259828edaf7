//! One OTLP log record as one sluice event: the README's table "Send OpenTelemetry logs: the
//! mapping", in code. Pure: no I/O, no clock but the receive time it is handed.
//!
//! - `service` ← resource attribute `service.name`, normalized to sluice's service rule
//!   ([`normalize_service`]); the original stays in `metadata.resource`.
//! - `message` ← `body`: a string verbatim, any other value as compact JSON; no body → the
//!   record's `event_name`, else `-`.
//! - `timestamp` ← `time_unix_nano`, else `observed_time_unix_nano`, else the receive time
//!   (`metadata.time_source` says which, when it is not the first).
//! - `id` ← attribute `log.record.uid` (a UUID as it is, any other text hashed into one), else a
//!   UUID hashed from the record, its scope and its resource as they were sent: an SDK's retry
//!   after a timeout is the same event, stored once. It starts with the record's time, as a
//!   UUIDv7 does, so that ids grow with time.
//! - `trace_id` ← the record's trace id; span id, flags, severity, event name, scope, resource
//!   and record attributes go into `metadata` under the keys of [`keys`].
//! - `user_id` ← the first present of the configured attribute keys, record attributes first,
//!   then the resource's; the attribute leaves `metadata`, so privacy sees the id once.
//!
//! The request is read in place ([`super::wire`]): strings are slices of it, and every
//! attribute's JSON is written straight from its encoding. It is checked as prost would check
//! it, so a request that would not decode is an error here too.

mod context;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use self::context::{ResourceContext, ScopeContext};
use super::wire::{Attribute, Fields, Value, WireError, merge, utf8, wrong_type};
use crate::{event::TraceId, proto::Event};

/// The metadata keys an OTLP record's fields are stored under.
pub mod keys {
    pub const SEVERITY_TEXT: &str = "severity_text";
    pub const SEVERITY_NUMBER: &str = "severity_number";
    pub const SPAN_ID: &str = "span_id";
    pub const TRACE_FLAGS: &str = "trace_flags";
    pub const EVENT_NAME: &str = "event_name";
    pub const ATTRIBUTES: &str = "attributes";
    pub const RESOURCE: &str = "resource";
    pub const SCOPE: &str = "scope";
    pub const TIME_SOURCE: &str = "time_source";
    pub const DROPPED_ATTRIBUTES: &str = "dropped_attributes_count";
}

/// The resource attribute that names the service.
const SERVICE_NAME: &str = "service.name";
/// The attribute that carries a record's own id (OpenTelemetry semantic conventions).
const RECORD_UID: &str = "log.record.uid";
/// The service of records whose resource names none.
const UNKNOWN_SERVICE: &str = "unknown_service";
/// Longest service name sluice stores.
const MAX_SERVICE_LEN: usize = 64;
/// The message of a record with neither body nor event name.
const NO_BODY: &str = "-";

/// A request's records mapped: each as the event a native client would have sent, but for
/// its id, beside it as a UUID (not written out as text only for validation to parse it
/// again), and the record's trace (the same index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MappedRequest {
    pub events: Vec<Event>,
    pub ids: Vec<Uuid>,
    pub trace_ids: Vec<Option<TraceId>>,
}

/// How many log records an encoded `ExportLogsServiceRequest` holds, counted without mapping
/// them (a malformed request counts what precedes the fault; mapping it then fails).
pub fn count_records(request: &[u8]) -> usize {
    messages(request, 1)
        .flat_map(|resource_logs| messages(resource_logs, 2))
        .map(|scope_logs| messages(scope_logs, 2).count())
        .sum()
}

/// The occurrences of the message field `tag`, up to the first fault.
fn messages(bytes: &[u8], tag: u32) -> impl Iterator<Item = &[u8]> {
    Fields::new(bytes)
        .map_while(Result::ok)
        .filter_map(move |field| match field {
            (found, Value::Bytes(message)) if found == tag => Some(message),
            _ => None,
        })
}

/// Maps every record of an encoded `ExportLogsServiceRequest` in order (resource by
/// resource, scope by scope), taking user ids from `user_id_attributes`, with `received` for
/// records that carry no time. A request that does not decode is an error, whole. `records`
/// is what [`count_records`] found (the caller counts them first, to refuse a request over
/// the limit before mapping it): the room reserved for the events.
///
/// The metadata of each record is written straight as the JSON text that is stored: the
/// resource's and the scope's parts once per resource and scope, the record's own fields
/// once per record, with no JSON tree built or copied.
pub fn map_request(
    request: &[u8],
    records: usize,
    user_id_attributes: &[String],
    received: DateTime<Utc>,
) -> Result<MappedRequest, WireError> {
    let mut mapper = Mapper {
        user_id_attributes,
        received,
        mapped: MappedRequest {
            events: Vec::with_capacity(records),
            ids: Vec::with_capacity(records),
            trace_ids: Vec::with_capacity(records),
        },
        attributes: Vec::new(),
    };
    for field in Fields::new(request) {
        match field? {
            (1, Value::Bytes(resource_logs)) => mapper.resource_logs(resource_logs)?,
            (1, _) => return Err(wrong_type("ExportLogsServiceRequest", 1)),
            _ => {}
        }
    }
    Ok(mapper.mapped)
}

/// A request's mapping under way: what every record needs, the records mapped so far, and
/// the scratch list of one record's attributes.
struct Mapper<'a, 'k> {
    user_id_attributes: &'k [String],
    received: DateTime<Utc>,
    mapped: MappedRequest,
    attributes: Vec<Attribute<'a>>,
}

impl<'a> Mapper<'a, '_> {
    /// One `ResourceLogs`: its resource (which may follow its scopes on the wire), then each
    /// of its `ScopeLogs`.
    fn resource_logs(&mut self, encoded: &'a [u8]) -> Result<(), WireError> {
        let mut resource = None;
        let mut scopes = Vec::new();
        for field in Fields::new(encoded) {
            match field? {
                (1, Value::Bytes(more)) => resource = Some(merge(resource, more)),
                (2, Value::Bytes(scope_logs)) => scopes.push(scope_logs),
                (3, Value::Bytes(schema_url)) => {
                    utf8(schema_url)?;
                }
                (tag @ 1..=3, _) => return Err(wrong_type("ResourceLogs", tag)),
                _ => {}
            }
        }
        let resource =
            ResourceContext::new(resource.as_deref().unwrap_or(&[]), self.user_id_attributes)?;
        for scope_logs in scopes {
            self.scope_logs(&resource, scope_logs)?;
        }
        Ok(())
    }

    /// One `ScopeLogs`: its scope (which may follow its records), then each record.
    fn scope_logs(
        &mut self,
        resource: &ResourceContext,
        encoded: &'a [u8],
    ) -> Result<(), WireError> {
        let mut scope = None;
        let mut records = Vec::new();
        for field in Fields::new(encoded) {
            match field? {
                (1, Value::Bytes(more)) => scope = Some(merge(scope, more)),
                (2, Value::Bytes(record)) => records.push(record),
                (3, Value::Bytes(schema_url)) => {
                    utf8(schema_url)?;
                }
                (tag @ 1..=3, _) => return Err(wrong_type("ScopeLogs", tag)),
                _ => {}
            }
        }
        let scope = ScopeContext::new(resource, scope.as_deref().unwrap_or(&[]))?;
        for record in records {
            let (event, id, trace_id) = scope.map(
                record,
                self.user_id_attributes,
                self.received,
                &mut self.attributes,
            )?;
            self.mapped.events.push(event);
            self.mapped.ids.push(id);
            self.mapped.trace_ids.push(trace_id);
        }
        Ok(())
    }
}

/// A service name as sluice's rule takes it (`^[a-z0-9][a-z0-9._-]{0,63}$`): lower-cased,
/// every other character `-`, leading characters that cannot start a name dropped, cut to 64
/// bytes; `unknown_service` when nothing is left. `unknown_service:python3` (an SDK's default)
/// becomes `unknown_service-python3`.
pub fn normalize_service(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|character| {
            let character = character.to_ascii_lowercase();
            if character.is_ascii_lowercase()
                || character.is_ascii_digit()
                || matches!(character, '.' | '_' | '-')
            {
                character
            } else {
                '-'
            }
        })
        .collect();
    let mut service = mapped
        .trim_start_matches(|character: char| !character.is_ascii_alphanumeric())
        .to_owned();
    service.truncate(MAX_SERVICE_LEN);
    if service.is_empty() {
        return UNKNOWN_SERVICE.to_owned();
    }
    service
}

/// The event's time, and what it came from when not the record's own `time_unix_nano`.
fn timestamp_of(
    time: u64,
    observed: u64,
    received: DateTime<Utc>,
) -> (prost_types::Timestamp, Option<&'static str>) {
    // Nanoseconds past i64 (year 2262) are not a time chrono or PostgreSQL would take.
    let from_nanos = |nanos: u64| {
        i64::try_from(nanos)
            .ok()
            .map(|nanos| prost_types::Timestamp {
                seconds: nanos / NANOS_PER_SECOND,
                nanos: (nanos % NANOS_PER_SECOND) as i32,
            })
    };
    if time != 0
        && let Some(at) = from_nanos(time)
    {
        return (at, None);
    }
    if observed != 0
        && let Some(at) = from_nanos(observed)
    {
        return (at, Some("observed_time_unix_nano"));
    }
    let at = prost_types::Timestamp {
        seconds: received.timestamp(),
        nanos: received.timestamp_subsec_nanos() as i32,
    };
    (at, Some(RECEIVED))
}

/// `metadata.time_source` of a record that carries no time of its own.
const RECEIVED: &str = "received";

const NANOS_PER_SECOND: i64 = 1_000_000_000;

#[cfg(test)]
mod tests;
