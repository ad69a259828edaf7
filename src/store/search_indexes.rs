//! The optional search indexes of `search.*`, created or dropped at start-up to match the
//! configuration. Each is an index on the partitioned `events` table, built without blocking
//! ingest: `CREATE INDEX … ON ONLY events` (invalid at first), then
//! `CREATE INDEX CONCURRENTLY` on each partition and `ALTER INDEX … ATTACH PARTITION`; once
//! every partition's index is attached the parent index is valid, and partitions created later
//! get theirs with the partition. Every managed index is named `events_search_*`.

use sqlx::PgPool;

use crate::config::SearchConfig;

/// Prefix of the indexes this module owns: any other `events_search_*` index is dropped.
const PREFIX: &str = "events_search_";
/// The advisory lock (as `hashtext` of this) held while search indexes change, these and the
/// closed partitions' alike: their DDL would otherwise wait on each other across nodes.
pub const LOCK: &str = "sluice.search_indexes";

/// One index the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchIndex {
    /// Name of the index on `events`; a partition's index is `<partition>_<suffix>`.
    pub name: String,
    /// What follows `ON <table>`: the method and the expression.
    pub definition: String,
    /// The extension it needs, if any.
    pub extension: Option<&'static str>,
}

impl SearchIndex {
    fn suffix(&self) -> &str {
        self.name.trim_start_matches("events_")
    }
}

/// The indexes `search` asks for.
pub fn wanted(search: &SearchConfig) -> Vec<SearchIndex> {
    let mut indexes = Vec::new();
    if search.message_index {
        indexes.push(SearchIndex {
            name: format!("{PREFIX}message_trgm"),
            definition: "USING gin (message gin_trgm_ops)".to_owned(),
            extension: Some("pg_trgm"),
        });
    }
    if search.metadata_index {
        indexes.push(SearchIndex {
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
        indexes.push(SearchIndex {
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

/// How long a statement that locks `events` (or a partition) whole may wait for its lock: a
/// long reader must not leave it queued, with every insert queued behind it.
const LOCK_TIMEOUT: &str = "5s";

/// Runs a statement that takes a strong lock, giving up after [`LOCK_TIMEOUT`] (the next
/// start tries again).
async fn ddl(pool: &PgPool, statement: &str) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"
    )))
    .execute(&mut *transaction)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await
}

/// Builds `index` on `events` partition by partition and attaches each part.
async fn build(pool: &PgPool, index: &SearchIndex) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    ddl(
        pool,
        &format!(
            "CREATE INDEX IF NOT EXISTS {} ON ONLY events {}",
            index.name, index.definition
        ),
    )
    .await?;
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid \
         WHERE h.inhparent = 'events'::regclass ORDER BY c.relname",
    )
    .fetch_all(pool)
    .await?;
    for partition in &partitions {
        // A part already attached, whatever its name (a partition created after the parent
        // index gets one named by PostgreSQL), is kept.
        let attached: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits h JOIN pg_index i ON i.indexrelid = h.inhrelid \
             WHERE h.inhparent = to_regclass($1) AND i.indrelid = to_regclass($2))",
        )
        .bind(&index.name)
        .bind(partition)
        .fetch_one(pool)
        .await?;
        if attached {
            continue;
        }
        let part = format!("{partition}_{}", index.suffix());
        // An invalid part, left by an interrupted concurrent build, is built again.
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid \
             WHERE c.relname = $1",
        )
        .bind(&part)
        .fetch_optional(pool)
        .await?;
        if valid == Some(false) {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {part}"
            )))
            .execute(pool)
            .await?;
        }
        if valid != Some(true) {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {part} ON {partition} {}",
                index.definition
            )))
            .execute(pool)
            .await?;
        }
        ddl(
            pool,
            &format!("ALTER INDEX {} ATTACH PARTITION {part}", index.name),
        )
        .await?;
    }
    tracing::info!(
        index = %index.name,
        partitions = partitions.len(),
        seconds = started.elapsed().as_secs_f64(),
        "search index built"
    );
    Ok(())
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
