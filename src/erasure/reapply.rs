//! Erasures applied again after a point-in-time restore. The restored database holds the
//! events of every Delete and Anonymize made after the restored time, and forgets the
//! opt-outs made since; the backup repository's journal (`backup::journal`) does not. Before
//! the server serves, each erasure the restore left is applied again, oldest first:
//! - recorded again in `erasures` with its own start and end, so that every writer erases
//!   what it still writes of it (this node's spool, other nodes' spools, the broker);
//! - its rows of the table and of dead letters erased again, those written before it ended
//!   only: a user's events sent after a Delete stay;
//! - an opt-out (or opt-in) made again.
//!
//! Each is audited as `(restore)`, naming the principal of the original call. The archive is
//! not part of the database and was not restored: the original call rewrote its objects.

use chrono::{DateTime, Utc};
use serde_json::{Value as Json, json};
use tonic::Code;

use super::{Erasure, ErasureError, anonymize, delete};
use crate::{
    audit::{Audit, Entry},
    backup::journal::{self, Change},
    writer::erasures::{self, CLOCK_MARGIN, Kind},
};

/// The audit principal of erasures applied again.
const PRINCIPAL: &str = "(restore)";

/// Applies the erasures a restore left in the data directory, then forgets them; gives how
/// many. An error leaves them all for the next start (applying one twice changes nothing).
pub async fn pending(erasure: &Erasure) -> Result<usize, ErasureError> {
    let data_dir = &erasure.config.data_dir;
    let entries = journal::read_pending(data_dir).map_err(ErasureError::Journal)?;
    if entries.is_empty() {
        return Ok(0);
    }
    tracing::warn!(
        erasures = entries.len(),
        "applying again the erasures made after the restored point in time"
    );
    for entry in &entries {
        let (rpc, details) = apply(erasure, entry).await?;
        let mut details = details;
        details["journal_id"] = Json::from(entry.id.clone());
        details["principal"] = Json::from(entry.principal.clone());
        details["started_at"] = Json::from(entry.started_at.to_rfc3339());
        let row = Entry::new(PRINCIPAL, rpc, Code::Ok, None, "", details);
        let mut connection = erasure.store.pool.acquire().await?;
        Audit::record_in(&mut connection, &row).await?;
        tracing::info!(target: "audit", journal_id = %entry.id, rpc, "erasure applied again");
    }
    journal::remove_pending(data_dir).map_err(ErasureError::Journal)?;
    Ok(entries.len())
}

/// One erasure again; gives the RPC it came from and what it changed.
async fn apply(
    erasure: &Erasure,
    entry: &journal::Entry,
) -> Result<(&'static str, Json), ErasureError> {
    let pool = &erasure.store.pool;
    let written_before: DateTime<Utc> = entry.reach_end()
        + chrono::Duration::from_std(CLOCK_MARGIN).unwrap_or(chrono::Duration::zero());
    match &entry.change {
        Change::Delete { filter } => {
            record(erasure, entry, Kind::Delete, filter).await?;
            let rows = delete::delete_events(pool, filter, Some(written_before)).await?;
            let mut transaction = pool.begin().await?;
            let dead_letters =
                delete::delete_dead_letters(&mut transaction, filter, false, Some(written_before))
                    .await?;
            transaction.commit().await?;
            Ok((
                "Delete",
                json!({"rows": rows, "dead_letters": dead_letters}),
            ))
        }
        Change::Anonymize { filter, pseudonym } => {
            let kind = Kind::Anonymize {
                pseudonym: pseudonym.clone(),
            };
            record(erasure, entry, kind, filter).await?;
            let privacy = erasure.privacy.load_full();
            let (rows, dead_letters) =
                anonymize::anonymize_table(pool, &privacy, filter, pseudonym, written_before)
                    .await?;
            Ok((
                "Anonymize",
                json!({"rows": rows, "dead_letters": dead_letters}),
            ))
        }
        Change::OptOut { user_key, services } => {
            let mut connection = pool.acquire().await?;
            erasure
                .optouts
                .opt_out(&mut connection, user_key, services)
                .await?;
            Ok((
                "OptOut",
                json!({"user_key": user_key, "services": services}),
            ))
        }
        Change::OptIn { user_key, services } => {
            let was_opted_out = erasure
                .optouts
                .opt_in(pool, user_key, services)
                .await
                .map_err(|error| match error {
                    crate::privacy::optouts::OptInError::Database(error) => error.into(),
                    other => ErasureError::invalid("services", other.to_string()),
                })?;
            Ok((
                "OptIn",
                json!({"user_key": user_key, "services": services, "was_opted_out": was_opted_out}),
            ))
        }
    }
}

/// Records the erasure again with its own times, unless the restored database has it.
async fn record(
    erasure: &Erasure,
    entry: &journal::Entry,
    kind: Kind,
    filter: &crate::filter::Filter,
) -> Result<(), ErasureError> {
    erasures::Erasure {
        kind,
        user_id: filter.user_id.clone(),
        services: filter.services.clone(),
        service_globs: entry.service_globs.clone(),
        start: filter.start,
        end: filter.end,
    }
    .record_again(&erasure.store.pool, entry.started_at, entry.reach_end())
    .await?;
    Ok(())
}
