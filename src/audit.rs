//! The audit log: who read, exported, deleted or was refused what, in the append-only
//! `audit_log` table (a trigger refuses UPDATE and DELETE of rows younger than the retention).
//!
//! Every Query, Export, Delete and Stats gets a row, and so does every policy reload. Refusals
//! on authentication or permission are counted per peer, principal, RPC, code and reason (the
//! ErrorInfo reason, a bounded set, never the message a client's input shaped) and written
//! once a minute with their count, so a flood cannot fill the table. What a row stores is
//! bounded too: strings, lists and the whole row. The log has a small pool of its own, so
//! that neither ingest nor a flood of reads can starve the other of connections; a read of
//! personal data whose row cannot be written is refused ([`Audit::record_read`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use serde_json::{Value as Json, json};
use sqlx::{PgConnection, PgPool};
use tonic::{Code, Status};

use crate::{metrics, proto::status::code_name};

/// How often aggregated authentication failures are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// One row to write.
#[derive(Debug, Clone)]
pub struct Entry {
    pub principal: String,
    pub rpc: &'static str,
    pub code: Code,
    pub details: Json,
}

impl Entry {
    /// A row for an RPC: `details` plus the peer address and the request id.
    pub fn new(
        principal: &str,
        rpc: &'static str,
        code: Code,
        peer: Option<SocketAddr>,
        request_id: &str,
        mut details: Json,
    ) -> Self {
        if let Json::Object(object) = &mut details {
            object.insert(
                "peer".to_owned(),
                peer.map_or(Json::Null, |peer| Json::String(peer.to_string())),
            );
            object.insert("request_id".to_owned(), Json::String(request_id.to_owned()));
        }
        Self {
            principal: principal.to_owned(),
            rpc,
            code,
            details,
        }
    }
}

/// Aggregation key of a refusal: every part bounded, whatever the client sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FailureKey {
    peer: String,
    principal: String,
    rpc: &'static str,
    code: Code,
    /// The ErrorInfo reason (`SERVICE_DENIED`, …), else the code's name.
    reason: String,
}

/// Longest text kept in an audit row's details (a client chooses some of it).
const MAX_DETAIL_CHARS: usize = 512;
/// Most items of a list, and entries of an object, kept in a row's details.
const MAX_DETAIL_ITEMS: usize = 100;
/// Largest row details, as JSON: a larger one keeps its start only.
const MAX_DETAIL_BYTES: usize = 16 * 1024;
/// Distinct refusal keys counted between flushes; past it the rest count under one key.
const MAX_FAILURE_KEYS: usize = 10_000;

/// Makes client-chosen text storable and bounded: jsonb holds no NUL, and a row stays small.
fn sanitize(value: &mut Json) {
    match value {
        Json::String(text) => {
            if text.contains('\0') || text.chars().count() > MAX_DETAIL_CHARS {
                *text = text
                    .chars()
                    .take(MAX_DETAIL_CHARS)
                    .map(|character| {
                        if character == '\0' {
                            '\u{fffd}'
                        } else {
                            character
                        }
                    })
                    .collect();
            }
        }
        Json::Array(items) => {
            if items.len() > MAX_DETAIL_ITEMS {
                let more = items.len() - MAX_DETAIL_ITEMS;
                items.truncate(MAX_DETAIL_ITEMS);
                items.push(json!({ "more": more }));
            }
            items.iter_mut().for_each(sanitize);
        }
        Json::Object(object) => {
            let keys: Vec<String> = object.keys().cloned().collect();
            if keys.len() > MAX_DETAIL_ITEMS {
                for key in &keys[MAX_DETAIL_ITEMS..] {
                    object.remove(key);
                }
                object.insert(
                    "(more)".to_owned(),
                    Json::from(keys.len() - MAX_DETAIL_ITEMS),
                );
            }
            for key in keys.into_iter().take(MAX_DETAIL_ITEMS) {
                if let Some(mut value) = object.remove(&key) {
                    sanitize(&mut value);
                    let mut key = Json::String(key);
                    sanitize(&mut key);
                    if let Json::String(key) = key {
                        object.insert(key, value);
                    }
                }
            }
        }
        Json::Null | Json::Bool(_) | Json::Number(_) => {}
    }
}

/// Makes row details storable and bounded: every string, list and object, then the whole.
fn bounded(details: &Json) -> Json {
    let mut details = details.clone();
    sanitize(&mut details);
    let text = details.to_string();
    if text.len() <= MAX_DETAIL_BYTES {
        return details;
    }
    let mut cut = MAX_DETAIL_BYTES / 2;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    json!({ "truncated": true, "bytes": text.len(), "start": &text[..cut] })
}

/// An audit row of a read could not be written: the read is refused (UNAVAILABLE).
#[derive(Debug, thiserror::Error)]
#[error("the audit log cannot record this read; retry later")]
pub struct NotRecorded(#[from] sqlx::Error);

impl From<NotRecorded> for Status {
    fn from(error: NotRecorded) -> Self {
        crate::proto::status::refusal(
            Code::Unavailable,
            error.to_string(),
            "AUDIT_UNAVAILABLE",
            Some(Duration::from_secs(1)),
            HashMap::new(),
        )
    }
}

pub struct Audit {
    pool: PgPool,
    failures: Mutex<HashMap<FailureKey, u64>>,
}

impl Audit {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Writes one row, durably. A failure is logged and counted, never hidden.
    pub async fn record(&self, entry: Entry) {
        let _ = self.write(entry, true).await;
    }

    /// Writes the row of a read (Query, Export, Tail, Stats, Audit) without waiting for its
    /// WAL flush (`synchronous_commit = off`): a flush that the disk stalls would otherwise
    /// land in the answer of every read (it was the tail of bounded searches). A PostgreSQL
    /// crash can lose such rows of the last moments (`wal_writer_delay`, 200 ms by default);
    /// rows of calls that change anything stay durable. A row that cannot be written at all
    /// is an error, so that a read of personal data fails closed.
    pub async fn record_read(&self, entry: Entry) -> Result<(), NotRecorded> {
        self.write(entry, false).await
    }

    async fn write(&self, entry: Entry, durable: bool) -> Result<(), NotRecorded> {
        let result = async {
            let mut transaction = self.pool.begin().await?;
            if !durable {
                sqlx::query("SET LOCAL synchronous_commit = off")
                    .execute(&mut *transaction)
                    .await?;
            }
            Self::record_in(&mut transaction, &entry).await?;
            transaction.commit().await
        }
        .await;
        result.map_err(|error| {
            metrics::audit_error();
            tracing::error!(%error, principal = %entry.principal, rpc = entry.rpc, "cannot write the audit log");
            NotRecorded(error)
        })
    }

    /// Writes one row on `connection`, inside the caller's transaction when it has one.
    pub async fn record_in(
        connection: &mut PgConnection,
        entry: &Entry,
    ) -> Result<(), sqlx::Error> {
        let details = bounded(&entry.details);
        let mut principal = Json::String(entry.principal.clone());
        sanitize(&mut principal);
        sqlx::query(
            "INSERT INTO audit_log (principal, rpc, code, details) VALUES ($1, $2, $3, $4)",
        )
        .bind(principal.as_str().unwrap_or_default())
        .bind(entry.rpc)
        .bind(code_name(entry.code))
        .bind(sqlx::types::Json(&details))
        .execute(connection)
        .await?;
        Ok(())
    }

    /// Records a refusal. Refusals are counted per peer, principal, RPC, code and reason and
    /// written once a minute with their count, so that no flood of them can fill the table.
    pub fn refused(
        &self,
        principal: &str,
        rpc: &'static str,
        peer: Option<SocketAddr>,
        status: &Status,
    ) {
        use tonic_types::StatusExt;
        let reason = status
            .get_details_error_info()
            .map_or_else(|| code_name(status.code()).to_owned(), |info| info.reason);
        let mut key = FailureKey {
            peer: peer.map_or_else(|| "unknown".to_owned(), |peer| peer.ip().to_string()),
            principal: principal.chars().take(MAX_DETAIL_CHARS).collect(),
            rpc,
            code: status.code(),
            reason,
        };
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() >= MAX_FAILURE_KEYS && !failures.contains_key(&key) {
            key.peer = "(many)".to_owned();
            key.principal = "(many)".to_owned();
        }
        *failures.entry(key).or_default() += 1;
    }

    /// Writes the refusals counted since the last flush.
    pub async fn flush(&self) {
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(PoisonError::into_inner));
        for (key, count) in failures {
            let details = json!({
                "peer": key.peer,
                "reason": key.reason,
                "count": count,
                "window_seconds": FLUSH_INTERVAL.as_secs(),
            });
            self.record(Entry {
                principal: key.principal,
                rpc: key.rpc,
                code: key.code,
                details,
            })
            .await;
        }
    }

    /// Sets how long rows are kept, and deletes the older ones.
    pub async fn expire(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let seconds = retention.as_secs_f64();
        sqlx::query("UPDATE audit_settings SET retention = make_interval(secs => $1)")
            .bind(seconds)
            .execute(&self.pool)
            .await?;
        let deleted = sqlx::query(
            "DELETE FROM audit_log WHERE at < now() - (SELECT retention FROM audit_settings)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(deleted)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Writes the counted refusals once a minute, and applies the audit log's retention once an
/// hour, until the task is dropped.
pub async fn upkeep(audit: std::sync::Arc<Audit>, retention: Duration) {
    const EXPIRE_EVERY: u32 = 60;
    let mut ticks = 0u32;
    loop {
        if ticks.is_multiple_of(EXPIRE_EVERY) {
            match audit.expire(retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "audit rows past their retention removed"),
                Err(error) => tracing::error!(%error, "cannot apply the audit log retention"),
            }
        }
        tokio::time::sleep(FLUSH_INTERVAL).await;
        audit.flush().await;
        ticks = ticks.wrapping_add(1);
    }
}

/// The request id of a call: the client's `x-request-id` when it sends one (bounded), else a
/// new UUIDv7.
pub fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    const MAX_REQUEST_ID: usize = 128;
    metadata
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty() && value.len() <= MAX_REQUEST_ID)
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_peer_and_request_id() {
        let entry = Entry::new(
            "billing",
            "Query",
            Code::Ok,
            Some(SocketAddr::from(([127, 0, 0, 1], 4000))),
            "r-1",
            json!({"rows": 3}),
        );
        assert_eq!(entry.details["peer"], "127.0.0.1:4000");
        assert_eq!(entry.details["request_id"], "r-1");
        assert_eq!(entry.details["rows"], 3);
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
    }

    #[test]
    fn client_text_is_made_storable_and_bounded() {
        let mut details = json!({"reason": "a\0b", "k\0": "x".repeat(2_000)});
        sanitize(&mut details);
        assert_eq!(details["reason"], "a\u{fffd}b");
        assert_eq!(
            details["k\u{fffd}"]
                .as_str()
                .map(|text| text.chars().count()),
            Some(MAX_DETAIL_CHARS)
        );
    }

    #[test]
    fn request_ids_come_from_the_client_when_sane() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(request_id(&metadata).len(), 36);
        metadata.insert("x-request-id", "abc".parse().expect("ascii"));
        assert_eq!(request_id(&metadata), "abc");
    }
}
