//! The schema's own indexes that a migration could not build on a table holding events without
//! blocking ingest for the whole build. Such a migration creates only the parent index
//! (`ON ONLY events`, invalid, nothing read); a starting server builds it here partition by
//! partition (`partitioned_index`) in the background, and once it is valid drops the index it
//! replaces. Until then queries use the old index (and each partition's new one as soon as
//! that part is built). A build cut short resumes at the next start.

use sqlx::PgPool;

use super::partitioned_index::{PartitionedIndex, build, ddl};

/// An index of the schema, and the one it replaces.
struct CoreIndex {
    name: &'static str,
    definition: &'static str,
    replaces: Option<&'static str>,
}

/// Every index a migration may have left to build (migration 0015: a user's events in time
/// order, instead of the bare `(user_id)` of 0001).
const INDEXES: &[CoreIndex] = &[CoreIndex {
    name: "events_user_ts_idx",
    definition: "USING btree (user_id, ts, id) WHERE user_id IS NOT NULL",
    replaces: Some("events_user_id_idx"),
}];

/// What [`finish`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Finished {
    pub built: Vec<String>,
    pub dropped: Vec<String>,
}

/// Builds what is left of every core index and drops the indexes they replace once they are
/// valid. One node at a time, under the search indexes' lock (their DDL would wait on each
/// other): None when another node holds it. Needs a pool without a statement timeout.
pub async fn finish(pool: &PgPool) -> Result<Option<Finished>, sqlx::Error> {
    super::while_locked(pool, super::search_indexes::LOCK, apply(pool)).await
}

async fn apply(pool: &PgPool) -> Result<Finished, sqlx::Error> {
    let mut finished = Finished::default();
    for index in INDEXES {
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        )
        .bind(index.name)
        .fetch_optional(pool)
        .await?;
        match valid {
            // Not created: the migration that creates it has not run here.
            None => continue,
            Some(false) => {
                build(
                    pool,
                    &PartitionedIndex {
                        name: index.name.to_owned(),
                        definition: index.definition.to_owned(),
                        extension: None,
                    },
                )
                .await?;
                finished.built.push(index.name.to_owned());
            }
            Some(true) => {}
        }
        let Some(old) = index.replaces else {
            continue;
        };
        let present: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(old)
            .fetch_one(pool)
            .await?;
        if present {
            // A partitioned index cannot be dropped concurrently; this takes a short lock.
            ddl(pool, &format!("DROP INDEX IF EXISTS {old}")).await?;
            tracing::info!(index = %old, replaced_by = %index.name, "index replaced");
            finished.dropped.push(old.to_owned());
        }
    }
    Ok(finished)
}

/// [`finish`] in the background of a starting server: ingest and queries go on meanwhile.
pub async fn keep(pool: PgPool) {
    match finish(&pool).await {
        Ok(Some(done)) if !done.built.is_empty() || !done.dropped.is_empty() => {
            tracing::info!(built = ?done.built, dropped = ?done.dropped, "schema indexes finished");
        }
        Ok(Some(_)) => {}
        Ok(None) => tracing::info!("another node is building the schema's indexes"),
        Err(error) => tracing::error!(
            %error,
            "cannot finish the schema's indexes; queries use the indexes they replace, and the next start resumes"
        ),
    }
}
