//! One index on the partitioned `events` table, built without blocking ingest: `CREATE INDEX …
//! ON ONLY events` (invalid at first), then `CREATE INDEX CONCURRENTLY` on each partition and
//! `ALTER INDEX … ATTACH PARTITION`; once every partition's index is attached the parent index
//! is valid, and partitions created later get theirs with the partition. An interrupted build
//! resumes where it stopped. Used by the optional search indexes and by the schema's own
//! indexes that a migration could not build on a table holding events.

use sqlx::PgPool;

/// An index on `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionedIndex {
    /// Name of the index on `events`; a partition's index is `<partition>_<suffix>`.
    pub name: String,
    /// What follows `ON <table>`: the method, the expression, and any `WHERE`.
    pub definition: String,
    /// The extension it needs, if any.
    pub extension: Option<&'static str>,
}

impl PartitionedIndex {
    fn suffix(&self) -> &str {
        self.name.trim_start_matches("events_")
    }
}

/// How long a statement that locks `events` (or a partition) whole may wait for its lock: a
/// long reader must not leave it queued, with every insert queued behind it.
const LOCK_TIMEOUT: &str = "5s";

/// Runs a statement that takes a strong lock, giving up after [`LOCK_TIMEOUT`] (the next
/// start tries again).
pub async fn ddl(pool: &PgPool, statement: &str) -> Result<(), sqlx::Error> {
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
pub async fn build(pool: &PgPool, index: &PartitionedIndex) -> Result<(), sqlx::Error> {
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
        "index built on every partition"
    );
    Ok(())
}
