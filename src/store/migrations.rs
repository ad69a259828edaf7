//! The schema's migrations, embedded in the binary. Each file of `migrations/` is listed here
//! and read the way sqlx's `migrate!` reads it (version and description from the file name,
//! the checksum of its text), so databases migrated by earlier builds agree. Listing them by
//! hand spares the build the `macros` feature, which compiles a second sqlx for the host: a
//! test keeps the list equal to the folder.

use sqlx::{
    SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
};

/// Every migration: its file name and text. Never edit one that has landed: add a file.
macro_rules! migrations {
    ($($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("../../migrations/", $file)))),*]
    };
}

const FILES: &[(&str, &str)] = migrations![
    "0001_events.sql",
    "0002_event_counts.sql",
    "0003_audit_log.sql",
    "0004_lifecycle_runs.sql",
    "0005_lz4_compression.sql",
    "0006_archives.sql",
    "0007_privacy_keys.sql",
    "0008_privacy_optouts.sql",
    "0009_trace_id.sql",
    "0010_ts_brin.sql",
    "0011_ingested_at_brin.sql",
    "0012_erasures.sql",
    "0013_privacy_wrapped_keys.sql",
    "0014_figures_and_trace_blooms.sql",
];

/// The migrator over [`FILES`].
pub fn migrator() -> Migrator {
    Migrator::with_migrations(
        FILES
            .iter()
            .map(|(file, sql)| migration(file, sql))
            .collect(),
    )
}

/// `<version>_<description>.sql` as `migrate!` reads it: underscores in the description become
/// spaces; a text starting `-- no-transaction` runs outside a transaction.
fn migration(file: &str, sql: &'static str) -> Migration {
    let (version, rest) = file.split_once('_').unwrap_or((file, ""));
    let migration_type = MigrationType::from_filename(rest);
    let description = rest
        .trim_end_matches(migration_type.suffix())
        .replace('_', " ");
    Migration::new(
        // The list above is checked by a test: every version parses.
        version.parse().unwrap_or_default(),
        description.into(),
        migration_type,
        sql.into_sql_str(),
        sql.starts_with("-- no-transaction"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_embedded_migrations_are_the_folders_as_sqlx_reads_it() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let read = Migrator::new(folder).await.expect("migrations folder");
        let embedded = migrator();
        let summary = |migrator: &Migrator| {
            migrator
                .iter()
                .map(|migration| {
                    (
                        migration.version,
                        migration.description.to_string(),
                        migration.migration_type,
                        migration.checksum.to_vec(),
                        migration.no_tx,
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(summary(&embedded), summary(&read));
        assert!(embedded.iter().all(|migration| migration.version > 0));
    }
}
