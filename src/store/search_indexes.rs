//! The optional search indexes of `search.*`, created or dropped at start-up to match the
//! configuration. Each is an index on the partitioned `events` table, built partition by
//! partition without blocking ingest (`partitioned_index`). Every managed index is named
//! `events_search_*`.

use sqlx::PgPool;

use super::partitioned_index::{PartitionedIndex, build, ddl};
use crate::config::SearchConfig;

/// Prefix of the indexes this module owns: any other `events_search_*` index is dropped.
const PREFIX: &str = "events_search_";
/// The advisory lock (as `hashtext` of this) held while search indexes change, these and the
/// closed partitions' alike: their DDL would otherwise wait on each other across nodes.
pub const LOCK: &str = "sluice.search_indexes";

/// The indexes `search` asks for.
pub fn wanted(search: &SearchConfig) -> Vec<PartitionedIndex> {
    let mut indexes = Vec::new();
    if search.message_index {
        indexes.push(PartitionedIndex {
            name: format!("{PREFIX}message_trgm"),
            definition: "USING gin (message gin_trgm_ops)".to_owned(),
            extension: Some("pg_trgm"),
        });
    }
    if search.metadata_index {
        indexes.push(PartitionedIndex {
            name: format!("{PREFIX}metadata_gin"),
            definition: "USING gin (metadata jsonb_path_ops)".to_owned(),
            extension: None,
        });
    }
    for key in &search.indexed_metadata_keys {
        // Keys are [A-Za-z0-9_.-] (checked at start-up); names keep [a-z0-9_] and a checksum
        // so that `a.b` and `a_b` differ.
        // Kept short: a partition's index name adds the partition's, within 63 bytes.
        let readable: String = key
            .chars()
            .take(16)
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        indexes.push(PartitionedIndex {
            name: format!(
                "{PREFIX}key_{readable}_{:08x}",
                crc32c::crc32c(key.as_bytes())
            ),
            definition: format!("USING btree ((metadata ->> '{key}'))"),
            extension: None,
        });
    }
    indexes
}

/// What [`reconcile`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub created: Vec<String>,
    pub dropped: Vec<String>,
}

/// Makes the `events_search_*` indexes those of `search`: drops the others, and builds the
/// missing ones partition by partition without blocking writes. Safe to run again after an
/// interruption: it resumes where it stopped. One node at a time (an advisory lock; None when
/// another holds it). Needs a pool without a statement timeout.
pub async fn reconcile(
    pool: &PgPool,
    search: &SearchConfig,
) -> Result<Option<Reconciled>, sqlx::Error> {
    super::while_locked(pool, LOCK, apply(pool, search)).await
}

async fn apply(pool: &PgPool, search: &SearchConfig) -> Result<Reconciled, sqlx::Error> {
    let wanted = wanted(search);
    let mut reconciled = Reconciled::default();
    let existing: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'events'::regclass AND starts_with(c.relname::text, $1)",
    )
    .bind(PREFIX)
    .fetch_all(pool)
    .await?;
    for (name, _) in &existing {
        if wanted.iter().all(|index| &index.name != name) {
            // A partitioned index cannot be dropped concurrently; this takes a short lock.
            ddl(pool, &format!("DROP INDEX IF EXISTS {name}")).await?;
            tracing::info!(index = %name, "search index dropped");
            reconciled.dropped.push(name.clone());
        }
    }
    for index in &wanted {
        if existing
            .iter()
            .any(|(name, valid)| name == &index.name && *valid)
        {
            continue;
        }
        if let Some(extension) = index.extension {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE EXTENSION IF NOT EXISTS {extension}"
            )))
            .execute(pool)
            .await?;
        }
        build(pool, index).await?;
        reconciled.created.push(index.name.clone());
    }
    if !reconciled.created.is_empty() {
        // An expression index (a metadata key) has no statistics until the table is analyzed:
        // the planner would guess every value rare and use the index for common ones too.
        sqlx::query("ANALYZE events").execute(pool).await?;
    }
    Ok(reconciled)
}

/// Builds the search indexes the configuration asks for and drops the others, in the
/// background of a starting server: ingest and queries go on meanwhile (queries without the
/// index until it is done).
pub async fn keep(pool: PgPool, search: SearchConfig) {
    match reconcile(&pool, &search).await {
        Ok(Some(done)) if !done.created.is_empty() || !done.dropped.is_empty() => {
            tracing::info!(created = ?done.created, dropped = ?done.dropped, "search indexes match the configuration");
        }
        Ok(Some(_)) => {}
        Ok(None) => tracing::info!("another node is changing the search indexes"),
        Err(error) => tracing::error!(
            %error,
            "cannot build or drop the search indexes; queries work without them, and the next start resumes"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_its_indexes() {
        let search = SearchConfig {
            message_index: true,
            metadata_index: true,
            indexed_metadata_keys: vec!["region".to_owned(), "a.b".to_owned(), "a_b".to_owned()],
            ..SearchConfig::default()
        };
        let indexes = wanted(&search);
        assert_eq!(indexes.len(), 5);
        assert_eq!(indexes[0].name, "events_search_message_trgm");
        assert_eq!(indexes[0].extension, Some("pg_trgm"));
        assert!(indexes[2].definition.contains("(metadata ->> 'region')"));
        assert_ne!(indexes[3].name, indexes[4].name, "a.b and a_b differ");
        assert!(indexes.iter().all(|index| index.name.len() < 50));
        assert!(wanted(&SearchConfig::default()).is_empty());
    }
}
