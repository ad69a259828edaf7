//! Anonymize: a user's events stay for statistics, the link to the person goes, everywhere the
//! events are: the table (every partition), dead letters, the spool and the archive. Each
//! gets one new random pseudonym, so the events still belong together.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::{PgPool, Postgres, QueryBuilder, types::Json as SqlJson};
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use super::{Erasure, ErasureError, optout, push_written_before};
use crate::{
    archive::{Archive, Removal},
    backup::journal::Change,
    filter::Filter,
    privacy::Privacy,
    proto::{AnonymizeRequest, AnonymizeResponse},
    rpc::{Admission, Call},
    spool::Spool,
    writer,
};

/// Serves an Anonymize in a task of its own: a client that goes away does not stop it before
/// its audit row.
pub async fn serve(
    erasure: Arc<Erasure>,
    admission: Arc<Admission>,
    call: Call,
    request: AnonymizeRequest,
) -> Result<AnonymizeResponse, Status> {
    let task = tokio::spawn(
        async move {
            let mut details = Json::Object(Default::default());
            let result = anonymize_user(&erasure, &call, request, &mut details).await;
            admission.audited(&call, details, result).await
        }
        .in_current_span(),
    );
    task.await
        .map_err(|_| Status::internal("the anonymize task failed; see server logs"))?
}

async fn anonymize_user(
    erasure: &Erasure,
    call: &Call,
    request: AnonymizeRequest,
    details: &mut Json,
) -> Result<AnonymizeResponse, ErasureError> {
    optout::check_user_id(&erasure.config, &request.user_id)?;
    let mut filter = Filter {
        user_id: Some(request.user_id),
        ..Filter::default()
    };
    erasure.restrict(&mut filter, &call.caller)?;
    details["filters"] = filter.details();
    details["dry_run"] = Json::Bool(request.dry_run);
    // One at a time with Deletes (they share the write pool), and after the events accepted
    // before the call are written.
    let _turn = erasure.take_turn().await?;
    let may_use = {
        let caller = call.caller.clone();
        Arc::new(move |service: &str| caller.may_use(service))
    };
    let pseudonym = format!("anon:{}", Uuid::new_v4().simple());
    let recorded = (!request.dry_run).then(|| {
        let erasure = writer::erasures::Erasure {
            kind: writer::erasures::Kind::Anonymize {
                pseudonym: pseudonym.clone(),
            },
            user_id: filter.user_id.clone(),
            services: Vec::new(),
            service_globs: call.caller.service_globs(),
            start: None,
            end: None,
        };
        let change = Change::Anonymize {
            filter: filter.clone(),
            pseudonym: pseudonym.clone(),
        };
        (erasure, change)
    });
    let scope = Scope {
        pool: &erasure.store.pool,
        archive_pool: &erasure.store.maintenance_pool,
        archive: &erasure.archive,
        spool: erasure.spool.as_ref(),
        privacy: erasure.privacy.load_full(),
        filter: &filter,
        may_use,
    };
    let done = erasure
        .recorded(
            recorded,
            &call.caller,
            anonymize(scope, &pseudonym, request.dry_run),
        )
        .await?;
    details["rows"] = Json::from(done.events);
    details["dead_letters"] = Json::from(done.dead_letters);
    details["spooled"] = Json::from(done.spooled);
    details["archived"] = Json::from(done.archived);
    let quarantined_segments = erasure.quarantined_segments().await;
    details["quarantined_segments"] = Json::from(quarantined_segments);
    Ok(AnonymizeResponse {
        anonymized: done.events,
        dead_letters_anonymized: done.dead_letters,
        spooled_anonymized: done.spooled,
        archived_anonymized: done.archived,
        dry_run: request.dry_run,
        quarantined_segments,
    })
}

/// Rows changed per transaction.
const BATCH: i64 = 1_000;

/// What an Anonymize did (or would do).
#[derive(Debug, Default)]
struct Anonymized {
    events: u64,
    dead_letters: u64,
    spooled: u64,
    archived: u64,
}

/// Where the events are, and the user (`filter.user_id`, in stored form) with the services the
/// caller may change (`filter.allowed_services`).
struct Scope<'a> {
    pool: &'a PgPool,
    archive_pool: &'a PgPool,
    archive: &'a Archive,
    spool: Option<&'a Spool>,
    privacy: Arc<Privacy>,
    filter: &'a Filter,
    /// Whether the caller may change events of a service (the spool has no SQL filter).
    may_use: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// Gives the user's events a new random pseudonym, everywhere, or (dry run) counts them.
async fn anonymize(
    scope: Scope<'_>,
    pseudonym: &str,
    dry_run: bool,
) -> Result<Anonymized, ErasureError> {
    let pseudonym = pseudonym.to_owned();
    let Some(user) = scope.filter.user_id.clone() else {
        return Err(ErasureError::invalid(
            "user_id",
            "required: the user to anonymize",
        ));
    };
    let mut done = Anonymized::default();
    if let Some(spool) = scope.spool {
        let privacy = scope.privacy.clone();
        let may_use = scope.may_use.clone();
        let (user, pseudonym) = (user.clone(), pseudonym.clone());
        done.spooled = spool
            .rewrite(
                move |event| {
                    let theirs =
                        event.user_id.as_deref() == Some(user.as_str()) && may_use(&event.service);
                    if theirs {
                        privacy.anonymize_event(event, &pseudonym);
                    }
                    theirs
                },
                dry_run,
            )
            .await?;
    }
    let table = Table {
        pool: scope.pool,
        privacy: &scope.privacy,
        filter: scope.filter,
        written_before: None,
    };
    done.events = table.anonymize_rows(&pseudonym, dry_run).await?;
    done.dead_letters = table.anonymize_dead_letters(&pseudonym, dry_run).await?;
    let selection = scope.filter.archive_selection();
    if dry_run {
        let objects = scope
            .archive
            .select_settled(scope.archive_pool, &selection)
            .await?;
        done.archived = scope
            .filter
            .count_archived(scope.archive, &objects)
            .await?
            .iter()
            .sum();
        return Ok(done);
    }
    let privacy = scope.privacy.clone();
    let line_pseudonym = pseudonym.clone();
    let taken = scope
        .archive
        .take_all(
            scope.archive_pool,
            &selection,
            scope.filter.archived_matcher(),
            Removal::Rewrite(Arc::new(move |line| {
                privacy.anonymize_line(line, &line_pseudonym)
            })),
            |_| std::ops::ControlFlow::Continue(()),
        )
        .await?;
    done.archived = taken.events;
    // A Restore may have moved the user's lines back into the table meanwhile.
    done.events += table.anonymize_rows(&pseudonym, false).await?;
    Ok(done)
}

/// The user's rows in the database: of `filter`, written before `written_before` when set.
struct Table<'a> {
    pool: &'a PgPool,
    privacy: &'a Privacy,
    filter: &'a Filter,
    written_before: Option<DateTime<Utc>>,
}

/// Anonymizes the user of `filter` in the table and dead letters, in rows written before
/// `written_before` (an erasure applied again after a restore); gives the rows and dead
/// letters changed.
pub(super) async fn anonymize_table(
    pool: &PgPool,
    privacy: &Privacy,
    filter: &Filter,
    pseudonym: &str,
    written_before: DateTime<Utc>,
) -> Result<(u64, u64), ErasureError> {
    let table = Table {
        pool,
        privacy,
        filter,
        written_before: Some(written_before),
    };
    let rows = table.anonymize_rows(pseudonym, false).await?;
    let dead_letters = table.anonymize_dead_letters(pseudonym, false).await?;
    Ok((rows, dead_letters))
}

impl Table<'_> {
    /// The user's rows of `events`, a batch per transaction.
    async fn anonymize_rows(&self, pseudonym: &str, dry_run: bool) -> Result<u64, ErasureError> {
        if dry_run {
            let mut count = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
            self.filter.push_where(&mut count);
            let count: i64 = count.build_query_scalar().fetch_one(self.pool).await?;
            return Ok(count.max(0) as u64);
        }
        let mut changed = 0;
        loop {
            let mut transaction = self.pool.begin().await?;
            let mut select = QueryBuilder::<Postgres>::new("SELECT id, ts, metadata FROM events");
            self.filter.push_where(&mut select);
            push_written_before(&mut select, "ingested_at", self.written_before);
            select.push(" LIMIT ").push_bind(BATCH).push(" FOR UPDATE");
            let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>, SqlJson<Json>)> =
                select.build_query_as().fetch_all(&mut *transaction).await?;
            if rows.is_empty() {
                return Ok(changed);
            }
            let mut ids = Vec::with_capacity(rows.len());
            let mut stamps = Vec::with_capacity(rows.len());
            let mut metadata = Vec::with_capacity(rows.len());
            for (id, ts, SqlJson(mut value)) in rows {
                self.privacy.anonymize_metadata(&mut value, pseudonym);
                ids.push(id);
                stamps.push(ts);
                metadata.push(value);
            }
            let updated = sqlx::query(
                "UPDATE events e SET user_id = $1, metadata = u.metadata \
             FROM unnest($2::uuid[], $3::timestamptz[], $4::jsonb[]) AS u(id, ts, metadata) \
             WHERE e.id = u.id AND e.ts = u.ts",
            )
            .bind(pseudonym)
            .bind(&ids)
            .bind(&stamps)
            .bind(metadata.into_iter().map(SqlJson).collect::<Vec<_>>())
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            transaction.commit().await?;
            changed += updated;
        }
    }

    /// The user's dead letters: their column and the event JSON they keep.
    async fn anonymize_dead_letters(
        &self,
        pseudonym: &str,
        dry_run: bool,
    ) -> Result<u64, ErasureError> {
        let mut select = QueryBuilder::<Postgres>::new("SELECT id, raw FROM dead_letters");
        self.filter.push_where(&mut select);
        push_written_before(&mut select, "failed_at", self.written_before);
        let rows: Vec<(i64, Vec<u8>)> = select.build_query_as().fetch_all(self.pool).await?;
        if dry_run || rows.is_empty() {
            return Ok(rows.len() as u64);
        }
        let mut transaction = self.pool.begin().await?;
        let mut changed = 0;
        for (id, raw) in rows {
            // A raw that is not the expected JSON is dropped rather than left linked.
            let anonymized = self
                .privacy
                .anonymize_dead_letter(&raw, pseudonym)
                .unwrap_or_default();
            changed += sqlx::query("UPDATE dead_letters SET user_id = $1, raw = $2 WHERE id = $3")
                .bind(pseudonym)
                .bind(anonymized)
                .bind(id)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
        }
        transaction.commit().await?;
        Ok(changed)
    }
}
