//! Audit: pages through the audit log, newest first, filtered by principal, RPC and time. It
//! reads the primary, where the log is written, after writing the refusals counted so far.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::QueryError;
use crate::proto::{
    AuditEntry, AuditRequest, AuditResponse,
    wire::{to_datetime, to_timestamp},
};

/// Audit rows per page, by default and at most.
const DEFAULT_AUDIT_PAGE: u32 = 100;
const MAX_AUDIT_PAGE: u32 = 1_000;

struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    principal: String,
    rpc: String,
    code: String,
    details: sqlx::types::Json<serde_json::Value>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for AuditRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get("id")?,
            at: row.try_get("at")?,
            principal: row.try_get("principal")?,
            rpc: row.try_get("rpc")?,
            code: row.try_get("code")?,
            details: row.try_get("details")?,
        })
    }
}

/// One page of the audit log.
pub async fn page(pool: &PgPool, request: AuditRequest) -> Result<AuditResponse, QueryError> {
    let limit = match request.limit {
        0 => DEFAULT_AUDIT_PAGE,
        limit if limit > MAX_AUDIT_PAGE => {
            return Err(QueryError::invalid(
                "limit",
                format!("at most {MAX_AUDIT_PAGE} rows per page"),
            ));
        }
        limit => limit,
    };
    let before_id = match request.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .strip_prefix("a.")
                .and_then(|id| id.parse::<i64>().ok())
                .ok_or_else(|| QueryError::invalid("page_token", "not an audit page token"))?,
        ),
    };
    let bound = |field: &'static str, value: Option<&prost_types::Timestamp>| {
        value
            .map(to_datetime)
            .transpose()
            .map_err(|error| QueryError::invalid(field, error.to_string()))
    };
    let start = bound("start_time", request.start_time.as_ref())?;
    let end = bound("end_time", request.end_time.as_ref())?;
    let mut rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT id, at, principal, rpc, code, details FROM audit_log \
         WHERE ($1::text IS NULL OR principal = $1) AND ($2::text IS NULL OR rpc = $2) \
         AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4) \
         AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
    )
    .bind((!request.principal.is_empty()).then_some(request.principal))
    .bind((!request.rpc.is_empty()).then_some(request.rpc))
    .bind(start)
    .bind(end)
    .bind(before_id)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let next_page_token = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|row| format!("a.{}", row.id))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(AuditResponse {
        entries: rows
            .into_iter()
            .map(|row| AuditEntry {
                id: row.id,
                at: Some(to_timestamp(row.at)),
                principal: row.principal,
                rpc: row.rpc,
                code: row.code,
                details: match row.details.0 {
                    serde_json::Value::Object(object) => Some(object.into()),
                    _ => None,
                },
            })
            .collect(),
        next_page_token,
    })
}
