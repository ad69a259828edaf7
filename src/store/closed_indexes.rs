//! Search indexes on closed partitions (`search.index_closed_partitions`): once a partition's
//! range has ended (plus `search.index_delay`), it gets a trigram GIN index on `message`, a
//! GIN `jsonb_path_ops` index on `metadata` and a B-tree on `(user_id, ts, id)`, built in the
//! background with `CREATE INDEX CONCURRENTLY`. Ingest writes to the open partition, which has
//! none of them, so it never pays for them; a search reads past days through them
//! ([`crate::query::scan`]) and scans only the open range, and a user's page walks the closed
//! days in time order and stops once it is full, where the deduplicated `(user_id)` index
//! every partition keeps (cheap to write) would fetch and sort all of the user's events.
//!
//! The catalog is the record: an index exists and is valid, or it is built (again). A build
//! cut short (a crash, `kill -9`, a lost connection) leaves an invalid index, which the next
//! round drops and builds again. Delete, Anonymize and retention need nothing here: these are
//! PostgreSQL indexes on the rows themselves.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

// One node builds at a time, under the lock of the whole-table search indexes.
use super::{
    partitions::{self, Partition},
    search_indexes::LOCK,
};
use crate::{config::SearchConfig, metrics};

/// A kind of search index on a closed partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `message_contains` of 3 characters or more.
    Message,
    /// Any `metadata_contains`.
    Metadata,
    /// A user's events in time order.
    User,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Message, Kind::Metadata, Kind::User];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Metadata => "metadata",
            Kind::User => "user",
        }
    }

    /// The index's name on `partition`.
    fn index_name(self, partition: &str) -> String {
        match self {
            Kind::Message => format!("{partition}_msg_trgm"),
            Kind::Metadata => format!("{partition}_meta_gin"),
            Kind::User => format!("{partition}_user_ts"),
        }
    }

    fn definition(self) -> &'static str {
        match self {
            Kind::Message => "USING gin (message gin_trgm_ops)",
            Kind::Metadata => "USING gin (metadata jsonb_path_ops)",
            Kind::User => "USING btree (user_id, ts, id) WHERE user_id IS NOT NULL",
        }
    }

    /// Whether `search` asks for this kind on closed partitions. An index on the whole table
    /// (`search.message_index`, `search.metadata_index`) already serves every partition.
    fn wanted(self, search: &SearchConfig) -> bool {
        search.index_closed_partitions
            && match self {
                Kind::Message => !search.message_index,
                Kind::Metadata => !search.metadata_index,
                Kind::User => true,
            }
    }
}

/// A partition's range and which closed-partition indexes it has, valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub message: bool,
    pub metadata: bool,
    /// Words a large share of the partition's messages hold (from a sample): a trigram
    /// lookup of a needle skips them, as their posting lists are most of its cost.
    pub common_words: Arc<HashSet<String>>,
}

/// The words `pg_trgm` indexes in `text`: runs of alphanumeric characters, lowercased, with
/// their byte range in `text`.
pub fn words(text: &str) -> Vec<(usize, usize, String)> {
    let mut words = Vec::new();
    let mut start = None;
    for (at, character) in text.char_indices().chain([(text.len(), ' ')]) {
        match (character.is_alphanumeric(), start) {
            (true, None) => start = Some(at),
            (false, Some(from)) => {
                words.push((from, at, text[from..at].to_lowercase()));
                start = None;
            }
            _ => {}
        }
    }
    words
}

/// A word is common when at least this share of the sampled messages hold it.
const COMMON_SHARE: f64 = 0.05;
/// About how many pages of a partition its sample reads.
const SAMPLE_PAGES: f64 = 40.0;

/// The words at least [`COMMON_SHARE`] of a sample of `partition`'s messages hold.
async fn common_words(pool: &PgPool, partition: &str) -> Result<HashSet<String>, sqlx::Error> {
    let pages: Option<i32> =
        sqlx::query_scalar("SELECT relpages FROM pg_class WHERE oid = to_regclass($1)")
            .bind(partition)
            .fetch_optional(pool)
            .await?;
    let percent = match pages {
        Some(pages) if pages > 0 => (SAMPLE_PAGES * 100.0 / f64::from(pages)).clamp(0.01, 100.0),
        _ => 100.0,
    };
    // The name is one sluice made (checked by `Partition::parse`); the percentage a number.
    let messages: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT message FROM {partition} TABLESAMPLE SYSTEM ({percent:.4}) LIMIT 5000"
    )))
    .fetch_all(pool)
    .await?;
    let mut holders: HashMap<String, usize> = HashMap::new();
    for message in &messages {
        let distinct: HashSet<String> = words(message)
            .into_iter()
            .map(|(_, _, word)| word)
            .collect();
        for word in distinct {
            *holders.entry(word).or_default() += 1;
        }
    }
    let least = ((messages.len() as f64 * COMMON_SHARE).ceil() as usize).max(2);
    Ok(holders
        .into_iter()
        .filter(|(_, count)| *count >= least)
        .map(|(word, _)| word)
        .collect())
}

/// Which partitions searches can read through their closed-partition indexes, as last read
/// from the catalog of the database reads go to. A stale view only costs speed: a step
/// through an index that is gone is bounded like any other, and a cancelled one falls back to
/// a scan.
#[derive(Debug, Default)]
pub struct ClosedIndexes {
    ranges: ArcSwap<Vec<IndexedRange>>,
    /// The common words of each partition sampled so far, by name: a closed day's messages
    /// barely change, so each is sampled once per node.
    sampled: Mutex<HashMap<String, Arc<HashSet<String>>>>,
}

impl ClosedIndexes {
    /// The partitions with at least one valid closed-partition index, oldest first.
    pub fn ranges(&self) -> Arc<Vec<IndexedRange>> {
        self.ranges.load_full()
    }

    /// Reads the catalog again.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, bool, bool)> = sqlx::query_as(
            "SELECT p.relname::text, \
                    coalesce(bool_or(c.relname::text = p.relname::text || '_msg_trgm' AND i.indisvalid), false), \
                    coalesce(bool_or(c.relname::text = p.relname::text || '_meta_gin' AND i.indisvalid), false) \
             FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhrelid \
             LEFT JOIN pg_index i ON i.indrelid = p.oid \
             LEFT JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE h.inhparent = 'events'::regclass GROUP BY p.relname",
        )
        .fetch_all(pool)
        .await?;
        let mut ranges = Vec::new();
        for (name, message, metadata) in rows {
            let Some(partition) = Partition::parse(&name) else {
                continue;
            };
            if !message && !metadata {
                continue;
            }
            let common_words = if message {
                self.common_words_of(pool, &name).await
            } else {
                Arc::default()
            };
            ranges.push(IndexedRange {
                start: partition.start,
                end: partition.end,
                message,
                metadata,
                common_words,
            });
        }
        ranges.sort_by_key(|range| range.start);
        // Partitions dropped since (retention) take their sample with them.
        self.sampled().retain(|name, _| {
            Partition::parse(name)
                .is_some_and(|partition| ranges.iter().any(|range| range.start == partition.start))
        });
        self.ranges.store(Arc::new(ranges));
        Ok(())
    }
}

impl ClosedIndexes {
    /// `partition`'s common words, sampled the first time. A failed sample gives none (the
    /// whole needle is looked up) and is tried again at the next refresh.
    async fn common_words_of(&self, pool: &PgPool, partition: &str) -> Arc<HashSet<String>> {
        if let Some(words) = self.sampled().get(partition) {
            return words.clone();
        }
        match common_words(pool, partition).await {
            Ok(words) => {
                let words = Arc::new(words);
                self.sampled().insert(partition.to_owned(), words.clone());
                words
            }
            Err(error) => {
                tracing::warn!(%error, partition, "cannot sample a closed partition's words");
                Arc::default()
            }
        }
    }

    fn sampled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<HashSet<String>>>> {
        self.sampled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What one round of [`build_round`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    pub built: Vec<String>,
    pub dropped: Vec<String>,
    /// Closed partitions still lacking an index this round could not build.
    pub unindexed: usize,
}

/// The partitions closed at `now`: their range ended `delay` ago or more. Newest first, as
/// the days searched most are the recent ones.
fn closed(partitions: Vec<Partition>, now: DateTime<Utc>, delay: Duration) -> Vec<Partition> {
    let delay = chrono::TimeDelta::from_std(delay).unwrap_or(chrono::TimeDelta::MAX);
    let mut closed: Vec<Partition> = partitions
        .into_iter()
        .filter(|partition| {
            partition
                .end
                .checked_add_signed(delay)
                .is_some_and(|due| due <= now)
        })
        .collect();
    closed.sort_by_key(|partition| std::cmp::Reverse(partition.start));
    closed
}

/// Where a build round reports each index it built: `indexes` reads the catalog of
/// `read_pool` again, so that searches use the index at once.
pub struct Readers<'a> {
    pub indexes: &'a ClosedIndexes,
    pub read_pool: &'a PgPool,
}

impl Readers<'_> {
    async fn refresh(&self) {
        if let Err(error) = self.indexes.refresh(self.read_pool).await {
            tracing::warn!(%error, "cannot read which partitions are indexed");
        }
    }
}

/// Builds the missing indexes of every closed partition (and drops those `search` no longer
/// asks for), one node at a time: None when another node holds the lock. Needs a pool
/// without a statement timeout.
pub async fn build_round(
    pool: &PgPool,
    search: &SearchConfig,
    now: DateTime<Utc>,
    readers: &Readers<'_>,
) -> Result<Option<Round>, sqlx::Error> {
    super::while_locked(pool, LOCK, build_all(pool, search, now, readers)).await
}

async fn build_all(
    pool: &PgPool,
    search: &SearchConfig,
    now: DateTime<Utc>,
    readers: &Readers<'_>,
) -> Result<Round, sqlx::Error> {
    let mut round = Round::default();
    let existing: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_inherits h \
         JOIN pg_index i ON i.indrelid = h.inhrelid JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE h.inhparent = 'events'::regclass \
         AND (c.relname LIKE '%\\_msg\\_trgm' OR c.relname LIKE '%\\_meta\\_gin' \
              OR c.relname LIKE '%\\_user\\_ts')",
    )
    .fetch_all(pool)
    .await?;
    let partitions = partitions::list(pool).await?;
    // Indexes of a kind no longer asked for go (their disk comes back).
    for (name, _) in &existing {
        let kind = Kind::ALL.into_iter().find(|kind| {
            partitions
                .iter()
                .any(|partition| &kind.index_name(&partition.name) == name)
        });
        if kind.is_some_and(|kind| !kind.wanted(search)) {
            drop_index(pool, name).await?;
            round.dropped.push(name.clone());
        }
    }
    if !round.dropped.is_empty() {
        readers.refresh().await;
    }
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|kind| kind.wanted(search))
        .collect();
    if kinds.is_empty() {
        return Ok(round);
    }
    // Whether `pg_trgm` is there, once a trigram index is to be built.
    let mut trigrams: Option<bool> = None;
    let closed = closed(partitions, now, search.index_delay);
    for partition in &closed {
        let missing: Vec<(Kind, String, Option<bool>)> = kinds
            .iter()
            .map(|&kind| {
                let name = kind.index_name(&partition.name);
                let state = existing
                    .iter()
                    .find(|(existing, _)| existing == &name)
                    .map(|(_, valid)| *valid);
                (kind, name, state)
            })
            .filter(|(_, _, state)| *state != Some(true))
            .collect();
        if missing.is_empty() {
            continue;
        }
        // An empty partition needs no index (a scan of it costs nothing); a late event makes
        // it worth one at the next round.
        let empty: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT NOT EXISTS (SELECT 1 FROM {})",
            partition.name
        )))
        .fetch_one(pool)
        .await?;
        if empty {
            continue;
        }
        for (kind, name, state) in missing {
            if kind == Kind::Message {
                let available = match trigrams {
                    Some(available) => available,
                    None => *trigrams.insert(trigram_extension(pool).await),
                };
                if !available {
                    round.unindexed += 1;
                    continue;
                }
            }
            let started = Instant::now();
            match build(pool, &partition.name, &name, kind, state).await {
                Ok(()) => {
                    let seconds = started.elapsed().as_secs_f64();
                    metrics::closed_index_built(kind.as_str(), true, seconds);
                    tracing::info!(index = %name, kind = kind.as_str(), seconds, "closed partition indexed");
                    round.built.push(name);
                    readers.refresh().await;
                }
                Err(error) => {
                    metrics::closed_index_built(
                        kind.as_str(),
                        false,
                        started.elapsed().as_secs_f64(),
                    );
                    tracing::error!(%error, index = %name, "cannot build a closed partition's index; the next round retries");
                    round.unindexed += 1;
                }
            }
        }
    }
    Ok(round)
}

/// Creates `pg_trgm` if it is missing: false (logged) when this role may not.
async fn trigram_extension(pool: &PgPool) -> bool {
    match sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        .execute(pool)
        .await
    {
        Ok(_) => true,
        Err(error) => {
            tracing::error!(%error, "cannot create the pg_trgm extension; message_contains on closed partitions stays a scan");
            false
        }
    }
}

/// Builds one index concurrently; an invalid one left by a build cut short is dropped first.
async fn build(
    pool: &PgPool,
    partition: &str,
    name: &str,
    kind: Kind,
    state: Option<bool>,
) -> Result<(), sqlx::Error> {
    if state == Some(false) {
        drop_index(pool, name).await?;
    }
    // Names come from partition names sluice made (checked by `Partition::parse`).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {partition} {}",
        kind.definition()
    )))
    .execute(pool)
    .await?;
    Ok(())
}

async fn drop_index(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP INDEX CONCURRENTLY IF EXISTS {name}"
    )))
    .execute(pool)
    .await?;
    tracing::info!(index = %name, "closed partition index dropped");
    Ok(())
}

/// Every `search.index_check_interval`: builds what closed partitions lack (the node that
/// takes the lock), then refreshes `indexes` from the database reads go to.
pub async fn keep(
    build_pool: PgPool,
    read_pool: PgPool,
    search: SearchConfig,
    indexes: Arc<ClosedIndexes>,
) {
    let readers = Readers {
        indexes: &indexes,
        read_pool: &read_pool,
    };
    loop {
        readers.refresh().await;
        match build_round(&build_pool, &search, Utc::now(), &readers).await {
            Ok(Some(round)) => {
                metrics::closed_partitions_unindexed(round.unindexed);
                if !round.built.is_empty() || !round.dropped.is_empty() {
                    tracing::info!(
                        built = round.built.len(),
                        dropped = round.dropped.len(),
                        unindexed = round.unindexed,
                        "closed partition indexes updated"
                    );
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "cannot index closed partitions; searches scan them meanwhile");
            }
        }
        tokio::time::sleep(search.index_check_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;

    #[test]
    fn a_partition_is_closed_once_its_range_ended_the_delay_ago_and_newest_come_first() {
        let day = |d| Partition::day(NaiveDate::from_ymd_opt(2026, 12, d).expect("day"));
        let now = DateTime::parse_from_rfc3339("2026-12-03T00:30:00Z")
            .expect("now")
            .to_utc();
        // The 2nd ended 30 minutes ago: not yet, with an hour's delay.
        assert_eq!(
            closed_at(now, Duration::from_secs(3600), vec![day(1), day(2), day(3)]),
            ["events_p2026_12_01"]
        );
        assert_eq!(
            closed_at(now, Duration::ZERO, vec![day(1), day(2), day(3)]),
            ["events_p2026_12_02", "events_p2026_12_01"]
        );
    }

    fn closed_at(now: DateTime<Utc>, delay: Duration, partitions: Vec<Partition>) -> Vec<String> {
        closed(partitions, now, delay)
            .into_iter()
            .map(|partition| partition.name)
            .collect()
    }

    #[test]
    fn words_are_lowercased_alphanumeric_runs_with_their_place() {
        let found: Vec<(usize, usize, String)> = words("GET /api/Orders/42 -> 200 in 5ms");
        let names: Vec<&str> = found.iter().map(|(_, _, word)| word.as_str()).collect();
        assert_eq!(names, ["get", "api", "orders", "42", "200", "in", "5ms"]);
        assert_eq!((found[2].0, found[2].1), (9, 15));
        assert!(words(" -> ").is_empty());
    }

    #[test]
    fn a_whole_table_index_makes_the_closed_one_unneeded() {
        let search = SearchConfig::default();
        assert!(Kind::Message.wanted(&search) && Kind::Metadata.wanted(&search));
        let search = SearchConfig {
            message_index: true,
            ..SearchConfig::default()
        };
        assert!(!Kind::Message.wanted(&search) && Kind::Metadata.wanted(&search));
        let off = SearchConfig {
            index_closed_partitions: false,
            ..SearchConfig::default()
        };
        assert!(!Kind::Message.wanted(&off) && !Kind::Metadata.wanted(&off));
        assert!(Kind::User.wanted(&search) && !Kind::User.wanted(&off));
        assert_eq!(
            Kind::Message.index_name("events_p2026_12_01"),
            "events_p2026_12_01_msg_trgm"
        );
    }
}
