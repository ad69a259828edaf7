//! Which events a call is about: the filter that Query, Export, Tail, Delete, Anonymize and
//! Restore share, checked against the limits of event fields, restricted to what the caller may
//! see, and written as SQL (every value a bound parameter), as a selection of archived
//! objects, and as a matcher of archived or spooled events.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value as Json};
use sqlx::{Postgres, QueryBuilder};

use crate::{
    auth::Caller,
    config::{SearchConfig, ValidationConfig},
    event::ValidEvent,
    privacy::Privacy,
    proto,
    proto::metadata::{self, Metadata, Problem},
    proto::status::InvalidArgument,
    proto::wire::{self, check_service},
};

/// Which indexes one step of a search may read for `message_contains` and
/// `metadata_contains`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentIndexes<'a> {
    /// The whole table's, as `search.*` builds them.
    Configured,
    /// A closed partition's as well: the step reads that partition through them, its trigram
    /// index looking up `message` (a part of `message_contains`, see `query::needle`).
    Closed { message: Option<&'a str> },
    /// None on metadata but the whole table's: the step is a slice of a closed partition
    /// whose index ran out of time, and would read it again for every slice.
    Avoided,
}

/// Most services one filter may name.
pub const MAX_FILTER_SERVICES: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub services: Vec<String>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub user_id: Option<String>,
    pub metadata_contains: Option<Map<String, Json>>,
    pub message_contains: Option<String>,
    /// The services the caller may read, as SQL `LIKE` patterns, when the request names none
    /// and the caller may not read every service.
    pub allowed_services: Option<Vec<String>>,
    /// Only events brought by requests of this trace (32 lowercase hex digits). Left out of
    /// page-token fingerprints when unset, so tokens from before the filter existed still work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// A trace id filter: 32 hex digits, not all zero (W3C trace context), lowercased as stored.
fn trace_id_filter(text: &str) -> Result<Option<String>, InvalidArgument> {
    if text.is_empty() {
        return Ok(None);
    }
    match crate::event::TraceId::from_hex(text) {
        Ok(trace_id) if text.len() == 32 && trace_id != crate::event::TraceId::INVALID => {
            Ok(Some(trace_id.to_string()))
        }
        _ => Err(InvalidArgument::new(
            "trace_id",
            "must be 32 hex digits, not all zero (the trace id of a traceparent)",
        )),
    }
}

/// A filter bound at microseconds, as PostgreSQL compares (and as the spool purge does).
fn timestamp(
    field: &'static str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, InvalidArgument> {
    value
        .map(wire::to_datetime)
        .transpose()
        .map_err(|error| InvalidArgument::new(field, error.to_string()))
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// PostgreSQL text cannot hold NUL, so no stored value can match one: refuse it up front.
fn no_nul(field: &'static str, text: &str) -> Result<(), InvalidArgument> {
    if text.contains('\0') {
        return Err(InvalidArgument::new(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// At most `limit` bytes.
fn bounded(field: &'static str, text: &str, limit: usize) -> Result<(), InvalidArgument> {
    if text.len() > limit {
        return Err(InvalidArgument::new(
            field,
            format!("is {} bytes, the limit is {limit}", text.len()),
        ));
    }
    Ok(())
}

/// True when a key or string anywhere in `value` holds a NUL (jsonb cannot store one).
fn json_has_nul(value: &Json) -> bool {
    match value {
        Json::String(text) => text.contains('\0'),
        Json::Array(items) => items.iter().any(json_has_nul),
        Json::Object(object) => object
            .iter()
            .any(|(key, value)| key.contains('\0') || json_has_nul(value)),
        Json::Null | Json::Bool(_) | Json::Number(_) => false,
    }
}

/// `metadata_contains` as JSON, within the limits of event metadata.
fn metadata_filter(
    fields: &Metadata,
    limits: &ValidationConfig,
) -> Result<Map<String, Json>, InvalidArgument> {
    const FIELD: &str = "metadata_contains";
    let limit = limits.max_metadata_bytes;
    let too_large = || {
        InvalidArgument::new(
            FIELD,
            format!(
                "metadata_contains is at least {} bytes as JSON, the limit is {limit}",
                fields.json_len()
            ),
        )
    };
    match fields.problem() {
        Some(Problem::TooLarge) => return Err(too_large()),
        Some(Problem::NonFiniteNumber) => {
            return Err(InvalidArgument::new(FIELD, "numbers must be finite"));
        }
        None if fields.json_len() > limit => return Err(too_large()),
        None => {}
    }
    let object = Json::Object(fields.as_object().clone());
    if metadata::depth(&object) > limits.max_metadata_depth {
        return Err(InvalidArgument::new(
            FIELD,
            format!(
                "metadata_contains is nested deeper than {} levels",
                limits.max_metadata_depth
            ),
        ));
    }
    if json_has_nul(&object) {
        return Err(InvalidArgument::new(
            FIELD,
            "keys and strings must not contain NUL characters",
        ));
    }
    match object {
        Json::Object(object) => Ok(object),
        _ => Ok(Map::new()),
    }
}

/// Service names a call names (Tail, OptOut, OptIn): the same rule as events', and at most
/// [`MAX_FILTER_SERVICES`] of them, as for any filter.
pub fn check_services(services: &[String]) -> Result<(), InvalidArgument> {
    if services.len() > MAX_FILTER_SERVICES {
        return Err(InvalidArgument::new(
            "services",
            format!(
                "{} services named, the limit is {MAX_FILTER_SERVICES}",
                services.len()
            ),
        ));
    }
    services.iter().try_for_each(|service| {
        check_service(service).map_err(|error| InvalidArgument::new("services", error.to_string()))
    })
}

impl Filter {
    /// Checks every field against the limits of event fields: what no event can hold, no
    /// filter needs.
    #[allow(clippy::too_many_arguments)]
    fn build(
        limits: &ValidationConfig,
        services: Vec<String>,
        start: Option<&prost_types::Timestamp>,
        end: Option<&prost_types::Timestamp>,
        user_id: String,
        metadata_contains: Option<&Metadata>,
        message_contains: String,
    ) -> Result<Self, InvalidArgument> {
        no_nul("user_id", &user_id)?;
        bounded("user_id", &user_id, limits.max_user_id_bytes)?;
        no_nul("message_contains", &message_contains)?;
        bounded(
            "message_contains",
            &message_contains,
            limits.max_message_bytes,
        )?;
        if services.len() > MAX_FILTER_SERVICES {
            return Err(InvalidArgument::new(
                "services",
                format!(
                    "{} services named, the limit is {MAX_FILTER_SERVICES}",
                    services.len()
                ),
            ));
        }
        for service in &services {
            check_service(service)
                .map_err(|error| InvalidArgument::new("services", error.to_string()))?;
        }
        let filter = Self {
            services,
            start: timestamp("start_time", start)?,
            end: timestamp("end_time", end)?,
            user_id: non_empty(user_id),
            metadata_contains: metadata_contains
                .map(|fields| metadata_filter(fields, limits))
                .transpose()?,
            message_contains: non_empty(message_contains),
            allowed_services: None,
            trace_id: None,
        };
        if let (Some(start), Some(end)) = (filter.start, filter.end)
            && start >= end
        {
            return Err(InvalidArgument::new(
                "end_time",
                "end_time must be after start_time",
            ));
        }
        Ok(filter)
    }

    pub fn from_query(
        request: &proto::QueryRequest,
        limits: &ValidationConfig,
    ) -> Result<Self, InvalidArgument> {
        let mut filter = Self::build(
            limits,
            request.services.clone(),
            request.start_time.as_ref(),
            request.end_time.as_ref(),
            request.user_id.clone(),
            request.metadata_contains.as_ref(),
            request.message_contains.clone(),
        )?;
        filter.trace_id = trace_id_filter(&request.trace_id)?;
        Ok(filter)
    }

    pub fn from_export(
        request: proto::ExportRequest,
        limits: &ValidationConfig,
    ) -> Result<Self, InvalidArgument> {
        Self::build(
            limits,
            request.services,
            request.start_time.as_ref(),
            request.end_time.as_ref(),
            request.user_id,
            request.metadata_contains.as_ref(),
            request.message_contains,
        )
    }

    /// Delete needs a user, or at least one service: never "everything".
    pub fn from_delete(
        request: &proto::DeleteRequest,
        limits: &ValidationConfig,
    ) -> Result<Self, InvalidArgument> {
        let filter = Self::build(
            limits,
            request.services.clone(),
            request.start_time.as_ref(),
            request.end_time.as_ref(),
            request.user_id.clone(),
            None,
            String::new(),
        )?;
        if filter.user_id.is_none() && filter.services.is_empty() {
            return Err(InvalidArgument::new(
                "user_id",
                "give a user_id or services; an empty filter would delete everything",
            ));
        }
        Ok(filter)
    }

    /// Restore needs a time range; services are optional.
    pub fn from_restore(
        request: &proto::RestoreRequest,
        limits: &ValidationConfig,
    ) -> Result<Self, InvalidArgument> {
        let filter = Self::build(
            limits,
            request.services.clone(),
            request.start_time.as_ref(),
            request.end_time.as_ref(),
            String::new(),
            None,
            String::new(),
        )?;
        if filter.start.is_none() {
            return Err(InvalidArgument::new(
                "start_time",
                "required: the start of the range to restore",
            ));
        }
        if filter.end.is_none() {
            return Err(InvalidArgument::new(
                "end_time",
                "required: the end of the range to restore",
            ));
        }
        Ok(filter)
    }

    /// Appends ` WHERE …` with every condition as a bound parameter.
    pub fn push_where(&self, builder: &mut QueryBuilder<Postgres>) {
        self.push_conditions(builder, false);
    }

    /// [`Filter::push_where`] for one step of a search, with the conditions the indexes that
    /// `content` allows can serve (see [`Filter::push_index_hints`]).
    pub fn push_where_for_step(
        &self,
        builder: &mut QueryBuilder<Postgres>,
        search: &SearchConfig,
        content: ContentIndexes,
    ) {
        self.push_conditions(
            builder,
            content == ContentIndexes::Avoided && !search.metadata_index,
        );
        let closed = match content {
            ContentIndexes::Closed { message } => message,
            _ => None,
        };
        self.push_index_hints(builder, search, closed);
    }

    /// The conditions, keeping `metadata_contains` out of any GIN index on `metadata` with
    /// `avoid_metadata_index`.
    fn push_conditions(&self, builder: &mut QueryBuilder<Postgres>, avoid_metadata_index: bool) {
        builder.push(" WHERE TRUE");
        match self.services.as_slice() {
            [] => {}
            // Equality (not `= ANY`) lets one service's pages walk the index in order.
            [service] => {
                builder.push(" AND service = ").push_bind(service.clone());
            }
            services => {
                builder
                    .push(" AND service = ANY(")
                    .push_bind(services.to_vec())
                    .push(")");
            }
        }
        if let Some(patterns) = &self.allowed_services {
            builder
                .push(" AND service LIKE ANY(")
                .push_bind(patterns.clone())
                .push(")");
        }
        if let Some(start) = self.start {
            builder.push(" AND ts >= ").push_bind(start);
        }
        if let Some(end) = self.end {
            builder.push(" AND ts < ").push_bind(end);
        }
        if let Some(user_id) = &self.user_id {
            builder.push(" AND user_id = ").push_bind(user_id.clone());
        }
        if let Some(metadata) = &self.metadata_contains {
            // With a user or a trace, their B-tree index narrows best. PostgreSQL has no
            // statistics for `@>` and guesses it rare, so with a GIN index on `metadata`
            // (`search.metadata_index`) it would scan that instead, for every event holding a
            // common value: `metadata || '{}'` is the same object, out of the GIN index's reach.
            let column =
                if avoid_metadata_index || self.user_id.is_some() || self.trace_id.is_some() {
                    "(metadata || '{}'::jsonb)"
                } else {
                    "metadata"
                };
            builder
                .push(format_args!(" AND {column} @> "))
                .push_bind(sqlx::types::Json(Json::Object(metadata.clone())));
        }
        if let Some(text) = &self.message_contains {
            builder
                .push(" AND strpos(message, ")
                .push_bind(text.clone())
                .push(") > 0");
        }
        if let Some(trace_id) = &self.trace_id {
            builder.push(" AND trace_id = ").push_bind(trace_id.clone());
        }
    }

    /// Conditions the filter implies, written so that the optional search indexes can serve
    /// them (`search.*`): `message LIKE '%…%'` for a trigram index (the whole table's, on the
    /// needle of 3 characters or more, as fewer give it no trigram; or a closed partition's,
    /// on the part `closed` of the needle),
    /// and `(metadata ->> 'key') = 'value'` for an indexed key with a string or boolean value
    /// (numbers are left to `@>`: `->>` keeps a number's written form, `@>` compares values),
    /// unless a user or trace filter narrows better. The results do not change.
    pub fn push_index_hints(
        &self,
        builder: &mut QueryBuilder<Postgres>,
        search: &SearchConfig,
        closed: Option<&str>,
    ) {
        let lookup = match closed {
            Some(part) => Some(part),
            None if search.message_index => self.trigram_needle().map(String::as_str),
            None => None,
        };
        if let Some(text) = lookup {
            builder
                .push(" AND message LIKE ")
                .push_bind(crate::glob::like_containing(text));
        }
        let Some(metadata) = &self.metadata_contains else {
            return;
        };
        // A user or a trace narrows best through its own index (see `push_where`).
        if self.user_id.is_some() || self.trace_id.is_some() {
            return;
        }
        for key in &search.indexed_metadata_keys {
            let value = match metadata.get(key) {
                Some(Json::String(value)) => value.clone(),
                Some(Json::Bool(value)) => value.to_string(),
                _ => continue,
            };
            // The key is checked at start-up ([A-Za-z0-9_.-]) and must be written as in the
            // index's expression for the planner to match them.
            builder
                .push(format_args!(" AND (metadata ->> '{key}') = "))
                .push_bind(value);
        }
    }

    /// The `message_contains` a trigram index can serve: 3 characters or more.
    pub fn trigram_needle(&self) -> Option<&String> {
        self.message_contains
            .as_ref()
            .filter(|text| text.chars().count() >= 3)
    }

    /// Whether a closed partition's indexes serve a condition of this filter: its trigram
    /// index (`message`) or its GIN index on metadata (`metadata`).
    pub fn served_by(&self, message: bool, metadata: bool) -> bool {
        (message && self.trigram_needle().is_some())
            || (metadata && self.metadata_contains.is_some())
    }

    /// Whether no index narrows this filter, so that Query must bound its scan in time
    /// slices: no user, no trace, and either no services or a content filter on top.
    pub fn needs_scan(&self) -> bool {
        self.user_id.is_none()
            && self.trace_id.is_none()
            && (self.services.is_empty()
                || self.message_contains.is_some()
                || self.metadata_contains.is_some())
    }

    /// Whether a spooled event falls under a Delete filter (user, services, time range).
    pub fn matches_for_delete(&self, event: &ValidEvent) -> bool {
        let user_ok = self
            .user_id
            .as_ref()
            .is_none_or(|user_id| event.user_id.as_ref() == Some(user_id));
        let service_ok = self.services.is_empty() || self.services.contains(&event.service);
        let start_ok = self.start.is_none_or(|start| event.timestamp >= start);
        let end_ok = self.end.is_none_or(|end| event.timestamp < end);
        user_ok && service_ok && start_ok && end_ok
    }

    /// A read naming no service covers only the services the caller may read, and a user id
    /// is looked up in its stored (maybe pseudonymized) form; so is `metadata_contains`, whose
    /// hashed keys search by their hash. Searching dropped or encrypted keys is refused, so
    /// neither the filter's plain values nor such a search reach the audit log.
    pub fn restrict(&mut self, caller: &Caller, privacy: &Privacy) -> Result<(), InvalidArgument> {
        if self.services.is_empty() {
            self.allowed_services = caller.service_patterns();
        }
        if let Some(user_id) = self.user_id.as_mut() {
            *user_id = privacy.user_id(user_id);
        }
        if let Some(metadata) = self.metadata_contains.as_mut() {
            privacy
                .search_form(metadata)
                .map_err(|error| InvalidArgument::new("metadata_contains", error.to_string()))?;
        }
        Ok(())
    }

    /// The filter as the audit log records it.
    pub fn details(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// A checksum of the filter and order, carried in page tokens so a token is only used with
    /// the query that produced it.
    pub fn fingerprint(&self, oldest_first: bool) -> u32 {
        let canonical = serde_json::to_vec(&(self, oldest_first)).unwrap_or_default();
        crc32c::crc32c(&canonical)
    }
}

#[cfg(test)]
mod tests {
    use sqlx::QueryBuilder;

    use super::*;

    #[test]
    fn delete_refuses_an_empty_filter() {
        let request = proto::DeleteRequest::default();
        assert!(matches!(
            Filter::from_delete(&request, &ValidationConfig::default()),
            Err(InvalidArgument {
                field: "user_id",
                ..
            })
        ));
        let by_user = proto::DeleteRequest {
            user_id: "u-1".to_owned(),
            ..Default::default()
        };
        assert!(Filter::from_delete(&by_user, &ValidationConfig::default()).is_ok());
    }

    #[test]
    fn filters_build_bound_sql_only() {
        let filter = Filter {
            services: vec!["a".to_owned()],
            user_id: Some("x' OR '1'='1".to_owned()),
            message_contains: Some("%_\\".to_owned()),
            ..Filter::default()
        };
        let mut builder = QueryBuilder::new("SELECT 1 FROM events");
        filter.push_where(&mut builder);
        let sql = builder.sql().as_str().to_owned();
        assert!(!sql.contains("OR '1'"), "{sql}");
        assert!(sql.contains("service = $1 AND"), "{sql}");
        assert!(sql.contains("user_id = $2"), "{sql}");
    }

    #[test]
    fn metadata_filters_refuse_nul_anywhere_and_stay_within_event_limits() {
        let limits = ValidationConfig::default();
        let text = |value: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
        };
        let with = |key: &str, value: &str| prost_types::Struct {
            fields: [(key.to_owned(), text(value))].into(),
        };
        assert!(metadata_filter(&with("k", "v").into(), &limits).is_ok());
        for bad in [with("k", "a\0b"), with("k\0", "v")] {
            assert!(matches!(
                metadata_filter(&bad.into(), &limits),
                Err(InvalidArgument {
                    field: "metadata_contains",
                    ..
                })
            ));
        }
        let big = with("k", &"x".repeat(limits.max_metadata_bytes));
        assert!(metadata_filter(&big.into(), &limits).is_err());
    }

    #[test]
    fn every_text_filter_is_bounded() {
        let limits = ValidationConfig::default();
        let request = |request: proto::QueryRequest| Filter::from_query(&request, &limits);
        assert!(
            request(proto::QueryRequest {
                message_contains: "x".repeat(limits.max_message_bytes + 1),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            request(proto::QueryRequest {
                user_id: "u".repeat(limits.max_user_id_bytes + 1),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            request(proto::QueryRequest {
                services: vec!["a".to_owned(); MAX_FILTER_SERVICES + 1],
                ..Default::default()
            })
            .is_err()
        );
    }
}
