//! The archive: events older than `archive.after` leave PostgreSQL for objects in a file
//! directory or an S3 bucket, one or more per service per day
//! (`service=<s>/date=<yyyy-mm-dd>/part-<n>.ndjson.zst`, see [`format`]), recorded in the
//! [`catalog`]. Every event lives in exactly one place: a row of `events` or a line of one
//! object. Export, Delete and Restore reach archived events through [`Archive::take`] and
//! [`Archive::matching_lines`]; the lifecycle job moves events in and expires objects.
//!
//! Crash safety: a path goes on the garbage list (committed) before its object is written, and
//! comes off it in the transaction that records the object (and, when archiving, deletes the
//! archived rows). A replaced object goes on the list in the transaction that replaces it. So
//! an object is either recorded or removed by the next garbage collection, and no row leaves
//! PostgreSQL before its object is durable.

pub mod bloom;
pub mod cache;
pub mod catalog;
pub mod format;
pub mod restore;
mod selection;

use std::ops::ControlFlow;
use std::{
    collections::{HashMap, HashSet},
    path::Path as FsPath,
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, DurationRound, NaiveDate, TimeDelta, Utc};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path};
use sqlx::PgPool;

use crate::{config::ArchiveConfig, store::partitions};
use catalog::{ArchivedObject, Placement, Selection};
use format::{ArchivedEvent, Encoded, Encoder};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid configuration: archive.url: {reason}")]
    Config { reason: String },
    #[error("invalid configuration: archive.url: {0}")]
    Url(#[from] crate::objects::ObjectsError),
    #[error("invalid configuration: archive.url {url} cannot be written: {reason}")]
    Unwritable { url: String, reason: String },
    #[error("object store error: {0}")]
    Store(#[from] object_store::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("archived object {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("archived object {path} was rewritten or expired during the call; retry")]
    Gone { path: String },
    #[error(
        "the archive changed under the call again and again (the lifecycle job is moving this range); retry"
    )]
    Moving,
    #[error("archived object {path} is recorded in the catalog but missing from the store")]
    Missing { path: String },
    #[error("cannot compress an object: {0}")]
    Compress(std::io::Error),
    #[error("archive task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Archive failures in a call: a store that cannot be reached is retryable, and so is an
/// object that changed under the call; a corrupt object is data loss, said loudly.
impl From<ArchiveError> for tonic::Status {
    fn from(error: ArchiveError) -> Self {
        use tonic::Status;
        match error {
            ArchiveError::Database(database_error) => {
                crate::store::database_status(&database_error)
            }
            ArchiveError::Gone { .. } | ArchiveError::Moving => Status::aborted(error.to_string()),
            ArchiveError::Store(store_error) => {
                tracing::error!(error = %store_error, "archive store error during a call");
                crate::proto::status::refusal(
                    tonic::Code::Unavailable,
                    "the archive's object store cannot be read; see server logs".to_owned(),
                    "ARCHIVE_UNAVAILABLE",
                    Some(Duration::from_secs(5)),
                    HashMap::new(),
                )
            }
            ArchiveError::Corrupt {
                ref path,
                ref reason,
            } => {
                tracing::error!(path, reason, "an archived object is corrupt");
                Status::data_loss(error.to_string())
            }
            ArchiveError::Missing { ref path } => {
                tracing::error!(path, "an archived object is missing from the store");
                Status::data_loss(error.to_string())
            }
            other => {
                tracing::error!(error = %other, "archive error during a call");
                Status::internal("archive error; see server logs")
            }
        }
    }
}

/// Which lines of an object a call is about.
pub type Matcher = Arc<dyn Fn(&ArchivedEvent) -> bool + Send + Sync>;

/// Gives the new text of an archived line (Anonymize); None when the line cannot be read.
pub type RewriteLine = dyn Fn(&str) -> Option<String> + Send + Sync;
pub type Rewriter = Arc<RewriteLine>;

/// What happens to the lines [`Archive::take`] selects in an object.
#[derive(Clone)]
pub enum Removal {
    /// They are gone (Delete): the hourly rollup forgets them.
    Delete,
    /// They go back into `events` (Restore), by id: a row already there is kept.
    Restore,
    /// They stay, rewritten (Anonymize).
    Rewrite(Rewriter),
}

/// What [`Archive::take`] did to one object.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Taken {
    /// Lines removed from the object.
    pub events: u64,
    /// Of those, rows inserted into `events` (Restore).
    pub inserted: u64,
    /// The object written in its place, holding the other lines, if any were left.
    pub replacement: Option<i64>,
}

/// How far [`Archive::take_all`] got.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TakeProgress {
    pub objects_done: u64,
    /// Objects found so far (a round finds the objects written meanwhile by others).
    pub objects_total: u64,
    /// Objects rewritten or removed.
    pub objects_changed: u64,
    pub events: u64,
    pub inserted: u64,
    /// The work stopped before its end, as `progress` asked.
    pub stopped: bool,
}

/// The object store and the archiving settings.
pub struct Archive {
    objects: Arc<dyn ObjectStore>,
    /// The `archive.url` objects are written under, without a trailing slash.
    root: String,
    /// Events older than this leave PostgreSQL; None: archiving is off (what was archived
    /// stays readable).
    pub after: Option<Duration>,
    /// How long Restore keeps a restored range in PostgreSQL.
    pub restore_hold: Duration,
    /// Decoded objects for the next Query page.
    cache: cache::ObjectCache,
}

/// Uncompressed bytes at which an object is closed and the next part begins.
pub const PART_MAX_RAW_BYTES: usize = 64 * 1024 * 1024;
/// Events at which an object is closed and the next part begins.
pub const PART_MAX_ROWS: i64 = 200_000;

impl Archive {
    /// Opens the store of `archive.url` (default: `data_dir/archive`) and, when archiving is
    /// on, proves it writable by writing and removing a probe object.
    pub async fn open(config: &ArchiveConfig, data_dir: &FsPath) -> Result<Self, ArchiveError> {
        let url = match &config.url {
            Some(url) => url.clone(),
            None => {
                let directory = std::path::absolute(data_dir.join("archive")).map_err(|error| {
                    ArchiveError::Config {
                        reason: format!("cannot resolve data_dir/archive: {error}"),
                    }
                })?;
                format!("file://{}", directory.display())
            }
        };
        let root = url.trim_end_matches('/').to_owned();
        // Archived events are personal data: a local archive is this user's only, whatever
        // the umask (objects inside cannot be reached through a 0700 directory).
        if root.starts_with("file:") {
            use std::os::unix::fs::PermissionsExt;
            let directory = crate::objects::local_directory(&root)?;
            let private = std::fs::create_dir_all(&directory).and_then(|()| {
                std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700))
            });
            private.map_err(|error| ArchiveError::Unwritable {
                url: root.clone(),
                reason: error.to_string(),
            })?;
        }
        let objects = crate::objects::open(&root)?;
        let archive = Self {
            objects,
            root,
            after: config.after,
            restore_hold: config.restore_hold,
            cache: cache::ObjectCache::new(config.query_cache_bytes),
        };
        if archive.after.is_some() {
            archive.probe().await?;
        }
        Ok(archive)
    }

    async fn probe(&self) -> Result<(), ArchiveError> {
        let unwritable = |error: object_store::Error| ArchiveError::Unwritable {
            url: self.root.clone(),
            reason: error.to_string(),
        };
        let path = Path::from(format!("_sluice_probe/{}", uuid::Uuid::new_v4()));
        self.objects
            .put(&path, PutPayload::from_static(b"sluice"))
            .await
            .map_err(unwritable)?;
        self.objects.delete(&path).await.map_err(unwritable)
    }

    /// The URL of an object, for people.
    pub fn uri(&self, path: &str) -> String {
        format!("{}/{path}", self.root)
    }

    async fn get(&self, object: &ArchivedObject) -> Result<bytes::Bytes, ArchiveError> {
        let path = parse_path(&object.path)?;
        let bytes = match self.objects.get(&path).await {
            Ok(result) => result.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ArchiveError::Gone {
                    path: object.path.clone(),
                });
            }
            Err(error) => return Err(error.into()),
        };
        if format::sha256_hex(&bytes) != object.sha256 {
            return Err(ArchiveError::Corrupt {
                path: object.path.clone(),
                reason: "its sha256 differs from the one recorded".to_owned(),
            });
        }
        Ok(bytes)
    }

    async fn remove(&self, path: &str) -> Result<(), ArchiveError> {
        match self.objects.delete(&parse_path(path)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Writes `encoded` as the next part of its service's day and records it in the
    /// caller's transaction (which must hold the archive lock). The object is durable when
    /// this returns; it belongs to the archive once the transaction commits.
    pub async fn store(
        &self,
        side: &mut sqlx::PgConnection,
        connection: &mut sqlx::PgConnection,
        service: &str,
        day: NaiveDate,
        encoded: &Encoded,
    ) -> Result<i64, ArchiveError> {
        let part = catalog::next_part(connection, service, day).await?;
        let path = format!(
            "{}part-{part}.{}",
            catalog::day_prefix(service, day),
            format::EXTENSION
        );
        let placement = Placement {
            uri: self.uri(&path),
            path,
            service: service.to_owned(),
            day,
            part,
        };
        catalog::expect_garbage(side, &placement.path).await?;
        self.objects
            .put(
                &parse_path(&placement.path)?,
                PutPayload::from(encoded.bytes.clone()),
            )
            .await?;
        Ok(catalog::record(connection, &placement, encoded).await?)
    }

    /// Removes the objects on the garbage list: written by a run that died before recording
    /// them, or replaced and not yet removed. One path at a time under the archive lock (so no
    /// writer is between listing a path and recording its object); a path that cannot be
    /// removed now stays listed for the next run.
    pub async fn collect_garbage(&self, pool: &PgPool) -> Result<u64, ArchiveError> {
        let paths = {
            let mut connection = pool.acquire().await?;
            catalog::garbage(&mut connection).await?
        };
        let mut removed = 0;
        for path in paths {
            let mut transaction = pool.begin().await?;
            catalog::lock(&mut transaction).await?;
            // Recorded meanwhile (a writer's path, listed before its object was recorded).
            if !catalog::still_garbage(&mut transaction, &path).await? {
                continue;
            }
            match self.remove(&path).await {
                Ok(()) => {
                    catalog::collected(&mut transaction, std::slice::from_ref(&path)).await?;
                    transaction.commit().await?;
                    removed += 1;
                }
                Err(error) => {
                    tracing::warn!(%error, path, "cannot remove an archive object; retrying next run");
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                objects = removed,
                "removed unrecorded or replaced archive objects"
            );
        }
        Ok(removed)
    }

    /// Removes one object from the catalog and the store (retention).
    pub async fn expire(&self, pool: &PgPool, id: i64) -> Result<bool, ArchiveError> {
        let mut transaction = pool.begin().await?;
        catalog::lock(&mut transaction).await?;
        let Some(object) = catalog::reload(&mut transaction, id).await? else {
            return Ok(false);
        };
        catalog::forget(&mut transaction, &object).await?;
        transaction.commit().await?;
        self.discard(pool, &object.path).await;
        Ok(true)
    }

    /// Removes a forgotten object from the store and takes it off the garbage list. A failure
    /// is logged, not returned: the committed change stands, and the path stays on the garbage
    /// list, so the next lifecycle run removes the object.
    async fn discard(&self, pool: &PgPool, path: &str) {
        let outcome = async {
            self.remove(path).await?;
            let mut connection = pool.acquire().await?;
            catalog::collected(&mut connection, &[path.to_owned()]).await?;
            Ok::<(), ArchiveError>(())
        }
        .await;
        if let Err(error) = outcome {
            tracing::warn!(%error, path, "a replaced archive object stays until the next lifecycle run");
        }
    }

    /// The keys `(id, timestamp)` held by the objects of a service's day (the caller holds
    /// the archive lock): the idempotency key of events everywhere, so that two events that
    /// share an id but not a timestamp are both kept.
    pub async fn keys_of_day(
        &self,
        connection: &mut sqlx::PgConnection,
        service: &str,
        day: NaiveDate,
    ) -> Result<HashSet<(uuid::Uuid, DateTime<Utc>)>, ArchiveError> {
        let mut ids = HashSet::new();
        for object in catalog::objects_of_day(connection, service, day).await? {
            for line in self.matching_lines(&object, Arc::new(|_| true)).await? {
                let event = ArchivedEvent::parse(&line).map_err(|error| ArchiveError::Corrupt {
                    path: object.path.clone(),
                    reason: error.to_string(),
                })?;
                ids.insert((event.id, event.timestamp));
            }
        }
        Ok(ids)
    }

    /// The objects of `selection`, read under the archive lock: every archiving that began
    /// before the call is included (a Delete that just removed rows finds the objects a
    /// concurrent run put them in).
    pub async fn select_settled(
        &self,
        pool: &PgPool,
        selection: &Selection,
    ) -> Result<Vec<ArchivedObject>, ArchiveError> {
        let mut transaction = pool.begin().await?;
        catalog::lock(&mut transaction).await?;
        let objects = catalog::select(&mut transaction, selection).await?;
        transaction.commit().await?;
        Ok(objects)
    }

    /// [`Archive::take`] on every object of `selection`, until a fresh selection finds no
    /// object left to look at; `progress` is called after each object, and stops the work
    /// there when it answers [`ControlFlow::Break`] (`stopped` tells).
    pub async fn take_all(
        &self,
        pool: &PgPool,
        selection: &Selection,
        matches: Matcher,
        removal: Removal,
        mut progress: impl FnMut(&TakeProgress) -> ControlFlow<()> + Send,
    ) -> Result<TakeProgress, ArchiveError> {
        let mut seen: HashSet<i64> = HashSet::new();
        let mut state = TakeProgress::default();
        loop {
            let todo: Vec<ArchivedObject> = self
                .select_settled(pool, selection)
                .await?
                .into_iter()
                .filter(|object| !seen.contains(&object.id))
                .collect();
            if todo.is_empty() {
                return Ok(state);
            }
            state.objects_total += todo.len() as u64;
            for object in todo {
                seen.insert(object.id);
                if matches!(removal, Removal::Restore) {
                    // Older months may have no partition any more.
                    partitions::ensure_partitions(pool, object.min_ts, object.max_ts).await?;
                }
                if let Some(taken) = self
                    .take(pool, object.id, matches.clone(), removal.clone())
                    .await?
                {
                    state.events += taken.events;
                    state.inserted += taken.inserted;
                    if taken.events > 0 {
                        state.objects_changed += 1;
                    }
                    seen.extend(taken.replacement);
                }
                state.objects_done += 1;
                if progress(&state).is_break() {
                    state.stopped = true;
                    return Ok(state);
                }
            }
        }
    }

    /// The lines of `object` that `matches` selects, in the object's order.
    pub async fn matching_lines(
        &self,
        object: &ArchivedObject,
        matches: Matcher,
    ) -> Result<Vec<String>, ArchiveError> {
        let bytes = self.get(object).await?;
        let path = object.path.clone();
        let split = tokio::task::spawn_blocking(move || split(&path, &bytes, &*matches, None))
            .await
            .map_err(ArchiveError::Task)??;
        Ok(split.taken.into_iter().map(|line| line.text).collect())
    }

    /// Removes the lines `matches` selects from object `id`, atomically: the other lines are
    /// written to a new object first, then, in one transaction, the new object is recorded,
    /// the old one forgotten and the removed lines deleted or restored (`removal`); the old
    /// object is removed from the store after the commit. None when the object is gone
    /// (replaced or expired since it was selected).
    pub async fn take(
        &self,
        pool: &PgPool,
        id: i64,
        matches: Matcher,
        removal: Removal,
    ) -> Result<Option<Taken>, ArchiveError> {
        // Both connections before the lock: its holder never waits for the pool.
        let mut side = pool.acquire().await?;
        let mut transaction = pool.begin().await?;
        catalog::lock(&mut transaction).await?;
        let Some(object) = catalog::reload(&mut transaction, id).await? else {
            return Ok(None);
        };
        let bytes = self.get(&object).await?;
        let path = object.path.clone();
        let rewriter = match &removal {
            Removal::Rewrite(rewriter) => Some(rewriter.clone()),
            Removal::Delete | Removal::Restore => None,
        };
        let split = tokio::task::spawn_blocking(move || {
            split(&path, &bytes, &*matches, rewriter.as_deref())
        })
        .await
        .map_err(ArchiveError::Task)??;
        if split.taken.is_empty() {
            return Ok(Some(Taken::default()));
        }
        let mut taken = Taken {
            events: split.taken.len() as u64,
            ..Taken::default()
        };
        match removal {
            Removal::Delete => forget_counts(&mut transaction, &split.taken).await?,
            Removal::Restore => {
                taken.inserted = restore_lines(&mut transaction, &split.taken).await?;
            }
            Removal::Rewrite(_) => {}
        }
        if let Some(encoded) = split.kept {
            taken.replacement = Some(
                self.store(
                    &mut side,
                    &mut transaction,
                    &object.service,
                    object.day,
                    &encoded,
                )
                .await?,
            );
        }
        catalog::forget(&mut transaction, &object).await?;
        transaction.commit().await?;
        drop(side);
        self.discard(pool, &object.path).await;
        Ok(Some(taken))
    }
}

/// Opens the store behind a `file://` or `s3://` URL.
fn parse_path(path: &str) -> Result<Path, ArchiveError> {
    Path::parse(path).map_err(|error| ArchiveError::Corrupt {
        path: path.to_owned(),
        reason: format!("not an object path: {error}"),
    })
}

/// One line with what is needed to put it back or account for it.
struct Line {
    text: String,
    service: String,
    ts: DateTime<Utc>,
}

/// An object's lines split by a matcher: the taken ones, and the rest re-encoded (None when
/// none are left). With a rewriter, taken lines are rewritten and stay in the object.
struct Split {
    taken: Vec<Line>,
    kept: Option<Encoded>,
}

fn split(
    path: &str,
    bytes: &[u8],
    matches: &dyn Fn(&ArchivedEvent) -> bool,
    rewriter: Option<&RewriteLine>,
) -> Result<Split, ArchiveError> {
    let corrupt = |reason: String| ArchiveError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let lines = format::decode(bytes).map_err(|error| corrupt(error.to_string()))?;
    let mut taken = Vec::new();
    let mut kept = Encoder::new().map_err(|error| corrupt(error.to_string()))?;
    for text in lines {
        let event = ArchivedEvent::parse(&text).map_err(|error| corrupt(error.to_string()))?;
        if matches(&event) {
            if let Some(rewrite) = rewriter {
                let rewritten = rewrite(&text)
                    .ok_or_else(|| corrupt("a line cannot be rewritten".to_owned()))?;
                let changed =
                    ArchivedEvent::parse(&rewritten).map_err(|error| corrupt(error.to_string()))?;
                kept.push(
                    &rewritten,
                    changed.timestamp,
                    changed.user_id.as_deref(),
                    changed.trace_id.as_deref(),
                )
                .map_err(|error| corrupt(error.to_string()))?;
            }
            taken.push(Line {
                text,
                service: event.service,
                ts: event.timestamp,
            });
        } else {
            kept.push(
                &text,
                event.timestamp,
                event.user_id.as_deref(),
                event.trace_id.as_deref(),
            )
            .map_err(|error| corrupt(error.to_string()))?;
        }
    }
    // Nothing taken: the kept copy is never written.
    let kept = if taken.is_empty() {
        None
    } else {
        kept.finish().map_err(|error| corrupt(error.to_string()))?
    };
    Ok(Split { taken, kept })
}

/// The hourly rollup forgets deleted archived events, as it does deleted rows.
async fn forget_counts(
    connection: &mut sqlx::PgConnection,
    lines: &[Line],
) -> Result<(), sqlx::Error> {
    let mut counts: HashMap<(&str, DateTime<Utc>), i64> = HashMap::new();
    for line in lines {
        let hour = line
            .ts
            .duration_trunc(TimeDelta::hours(1))
            .unwrap_or(line.ts);
        *counts.entry((&line.service, hour)).or_default() += 1;
    }
    let mut services = Vec::with_capacity(counts.len());
    let mut hours = Vec::with_capacity(counts.len());
    let mut negated = Vec::with_capacity(counts.len());
    for ((service, hour), count) in counts {
        services.push(service.to_owned());
        hours.push(hour);
        negated.push(-count);
    }
    sqlx::query(
        "INSERT INTO event_counts (service, hour, shard, events) \
         SELECT service, hour, -1, n FROM unnest($1::text[], $2::timestamptz[], $3::bigint[]) AS c(service, hour, n) \
         ON CONFLICT (service, hour, shard) DO UPDATE SET events = event_counts.events + excluded.events",
    )
    .bind(services)
    .bind(hours)
    .bind(negated)
    .execute(connection)
    .await
    .map(|_| ())
}

/// Puts archived lines back into `events`; rows already there are kept. Returns rows inserted.
async fn restore_lines(
    connection: &mut sqlx::PgConnection,
    lines: &[Line],
) -> Result<u64, sqlx::Error> {
    let texts: Vec<&str> = lines.iter().map(|line| line.text.as_str()).collect();
    sqlx::query(
        "INSERT INTO events (id, service, message, ts, ingested_at, user_id, metadata, trace_id) \
         SELECT (l->>'id')::uuid, l->>'service', l->>'message', (l->>'timestamp')::timestamptz, \
         (l->>'ingested_at')::timestamptz, l->>'user_id', COALESCE(l->'metadata', '{}'::jsonb), \
         l->>'trace_id' \
         FROM (SELECT line::jsonb AS l FROM unnest($1::text[]) AS line) lines \
         ON CONFLICT DO NOTHING",
    )
    .bind(texts)
    .execute(connection)
    .await
    .map(|done| done.rows_affected())
}
