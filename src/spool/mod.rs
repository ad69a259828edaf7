//! The disk spool: where batches go while the database is unreachable, so ingest keeps being
//! acknowledged without losing anything. A peer of the buffer: the writers append to it while
//! the circuit is open, the replayer drains it, Delete purges it.
//!
//! Segment files `<sequence>.spool` under the spool directory, in the format of [`format`].
//! A record is fsync'd before its batch is acknowledged. At start-up every segment is checked:
//! - a torn tail (a crash mid-append: the file ends inside a record, or its last record fails
//!   its checksum) is cut off and reported, and every intact record before it is kept;
//! - a record that is intact but cannot be read (a corrupt record followed by others, an
//!   unknown version, a payload that does not decode) is never discarded: its whole segment
//!   moves to `quarantine/`, is counted and logged, and health turns NOT_SERVING until an
//!   operator deals with it.
//!
//! The replayer drains sealed segments into PostgreSQL (idempotently, by event id) and deletes
//! them. Every blocking file operation runs on a blocking thread behind the async methods.

pub mod format;

use std::os::unix::fs::OpenOptionsExt;
use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{BufReader, Read, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::OwnedMutexGuard;

use chrono::{DateTime, Utc};

use crate::{
    event::{ValidEvent, batch::Batch},
    metrics,
};
use format::{
    DecodeError, Frame, MAGIC, MAGIC_LEN, MAX_RECORD_BYTES, RECORD_HEADER, SegmentFormat,
};

/// Where unreadable segments are moved, under the spool directory.
const QUARANTINE_DIR: &str = "quarantine";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("batch of {bytes} bytes is larger than a spool record may be ({max})")]
    RecordTooLarge { bytes: usize, max: usize },
    #[error("spool segment {path} cannot be read ({source}); moved to {quarantined}")]
    Quarantined {
        path: PathBuf,
        quarantined: PathBuf,
        source: DecodeError,
    },
    #[error("spool task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<SpoolError> for tonic::Status {
    fn from(error: SpoolError) -> Self {
        tracing::error!(%error, "spool error during a call");
        tonic::Status::internal("spool error; see server logs")
    }
}

/// What start-up found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: usize,
    /// Bytes cut off the tails of segments (torn records).
    pub truncated_bytes: u64,
    /// Segments moved to quarantine now (unreadable records).
    pub quarantined: usize,
}

struct Active {
    sequence: u64,
    path: PathBuf,
    file: File,
    bytes: u64,
}

struct State {
    active: Option<Active>,
    /// Sealed segments, oldest first: sequence → size.
    sealed: BTreeMap<u64, u64>,
    next_sequence: u64,
    total_bytes: u64,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Held across an append's write and fsync. The state lock is never held across I/O, so
    /// async callers of `bytes`, `is_empty` and `seal_active` never wait on a disk.
    appending: Mutex<()>,
    state: Mutex<State>,
    /// Held while a segment is replayed or rewritten, so the two never overlap.
    maintenance: Arc<tokio::sync::Mutex<()>>,
    /// Segments in `quarantine/`.
    quarantined: AtomicUsize,
}

/// The spool. Cheap to clone: clones share one spool.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(work).await?
}

/// What an edit does to one spooled event.
enum Edit {
    Keep,
    Changed,
    Remove,
}

impl Spool {
    /// Opens (creating) the spool directory and checks every segment left there: torn tails
    /// are cut, unreadable segments quarantined.
    pub async fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Recovery), SpoolError> {
        let dir = dir.to_owned();
        blocking(move || Self::open_blocking(dir, max_bytes, segment_bytes)).await
    }

    fn open_blocking(
        dir: PathBuf,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Recovery), SpoolError> {
        private_dir(&dir)?;
        let inner = Inner {
            dir: dir.clone(),
            max_bytes,
            segment_bytes,
            appending: Mutex::new(()),
            state: Mutex::new(State {
                active: None,
                sealed: BTreeMap::new(),
                next_sequence: 0,
                total_bytes: 0,
            }),
            maintenance: Arc::new(tokio::sync::Mutex::new(())),
            quarantined: AtomicUsize::new(0),
        };
        let mut recovery = Recovery::default();
        let mut sealed = BTreeMap::new();
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path
                .extension()
                .is_some_and(|extension| extension == "rewrite")
            {
                // A purge interrupted before its rename: the original segment is intact.
                fs::remove_file(&path).map_err(io_error(&path))?;
                continue;
            }
            if let Some(sequence) = segment_sequence(&path) {
                segments.push((sequence, path));
            }
        }
        segments.sort();
        let mut highest = segments.last().map(|(sequence, _)| *sequence);
        for (sequence, path) in segments {
            let check = check_segment(&path)?;
            // Only the newest segment was being appended to: a sealed one that ends inside a
            // record held acknowledged events and is corrupt, not torn.
            let unreadable = check.unreadable.or_else(|| {
                (check.good_bytes < check.file_bytes && Some(sequence) != highest)
                    .then_some(DecodeError::SealedTornTail)
            });
            if let Some(source) = unreadable {
                let error = inner.quarantine(&path, source)?;
                tracing::error!(%error, "spool segment quarantined at start-up");
                recovery.quarantined += 1;
                continue;
            }
            if check.good_bytes < check.file_bytes {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                file.set_len(check.good_bytes).map_err(io_error(&path))?;
                file.sync_all().map_err(io_error(&path))?;
                let cut_bytes = check.file_bytes - check.good_bytes;
                tracing::warn!(segment = %path.display(), kept_records = check.records, cut_bytes, "spool segment had a torn tail; cut it off");
                recovery.truncated_bytes += cut_bytes;
            }
            if check.records == 0 {
                fs::remove_file(&path).map_err(io_error(&path))?;
                continue;
            }
            recovery.segments += 1;
            recovery.records += check.records;
            sealed.insert(sequence, check.good_bytes);
        }
        // Never reuse a sequence, not even one now in quarantine.
        highest = highest.max(inner.highest_quarantined());
        let quarantined = inner.count_quarantined();
        inner.quarantined.store(quarantined, Ordering::Relaxed);
        metrics::spool_quarantine(quarantined);
        {
            let mut state = inner.lock();
            state.next_sequence = highest.map_or(0, |last| last + 1);
            state.total_bytes = sealed.values().sum();
            state.sealed = sealed;
        }
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            recovery,
        ))
    }

    /// Appends one batch and fsyncs it before returning. `admitted_at` is when its first
    /// event was admitted: the erasures that reach it when it is replayed follow from it.
    pub async fn append(
        &self,
        events: &[&ValidEvent],
        admitted_at: Option<DateTime<Utc>>,
    ) -> Result<(), SpoolError> {
        let payload = crate::event::batch::encode(events, admitted_at);
        let inner = self.inner.clone();
        blocking(move || inner.append(&payload)).await
    }

    /// Removes every spooled event matching `doomed` (right to be forgotten): seals the active
    /// segment, then rewrites each sealed segment that holds such events, atomically (write a
    /// new file, fsync, rename over). Returns how many events were removed, or, with `dry_run`,
    /// how many would be. A segment that cannot be read is quarantined and the purge fails.
    pub async fn purge(
        &self,
        doomed: impl Fn(&ValidEvent) -> bool + Send + 'static,
        dry_run: bool,
    ) -> Result<u64, SpoolError> {
        self.edit(
            move |event| {
                if doomed(event) {
                    Edit::Remove
                } else {
                    Edit::Keep
                }
            },
            dry_run,
        )
        .await
    }

    /// Rewrites spooled events in place (Anonymize): `change` edits an event and says so.
    /// Same sealing and atomic rewrite as [`Spool::purge`]. Returns how many were changed (or
    /// would be).
    pub async fn rewrite(
        &self,
        change: impl Fn(&mut ValidEvent) -> bool + Send + 'static,
        dry_run: bool,
    ) -> Result<u64, SpoolError> {
        self.edit(
            move |event| {
                if change(event) {
                    Edit::Changed
                } else {
                    Edit::Keep
                }
            },
            dry_run,
        )
        .await
    }

    async fn edit(
        &self,
        edit: impl Fn(&mut ValidEvent) -> Edit + Send + 'static,
        dry_run: bool,
    ) -> Result<u64, SpoolError> {
        let exclusive = self.inner.maintenance.clone().lock_owned().await;
        let inner = self.inner.clone();
        // The lock goes with the work: a cancelled caller must not let a replay or another
        // edit start while this one still rewrites files.
        blocking(move || {
            let _exclusive = exclusive;
            inner.edit(edit, dry_run)
        })
        .await
    }

    /// Closes the segment being appended to, so the replayer can take it.
    pub fn seal_active(&self) {
        seal(&mut self.inner.lock());
    }

    /// The oldest sealed segment, opened for replay, with the spool's maintenance lock held
    /// until the replay is dropped or finished.
    pub async fn oldest_segment(&self) -> Result<Option<SegmentReplay>, SpoolError> {
        let exclusive = self.inner.maintenance.clone().lock_owned().await;
        let Some(sequence) = self.inner.lock().sealed.keys().next().copied() else {
            return Ok(None);
        };
        let path = self.inner.segment_path(sequence);
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || SegmentReader::open(&path)).await?
        };
        let reader = match opened {
            Ok(reader) => reader,
            Err(ReadError::Spool(error)) => return Err(error),
            Err(ReadError::Undecodable(source)) => {
                let inner = self.inner.clone();
                return Err(blocking(move || {
                    let _exclusive = exclusive;
                    Ok(inner.quarantine_sealed(sequence, source))
                })
                .await?);
            }
        };
        Ok(Some(SegmentReplay {
            spool: self.clone(),
            sequence,
            path,
            reader: Some(reader),
            _exclusive: exclusive,
        }))
    }

    /// Bytes on disk, active segment included.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().total_bytes
    }

    pub fn is_empty(&self) -> bool {
        let state = self.inner.lock();
        state.sealed.is_empty() && state.active.is_none()
    }

    /// Segments in quarantine, waiting for an operator (re-read from the directory, so that
    /// removing them there is seen without a restart).
    pub async fn quarantined(&self) -> usize {
        let inner = self.inner.clone();
        let counted = blocking(move || Ok(inner.count_quarantined())).await;
        let segments = counted.unwrap_or_else(|_| self.inner.quarantined.load(Ordering::Relaxed));
        self.inner.quarantined.store(segments, Ordering::Relaxed);
        metrics::spool_quarantine(segments);
        segments
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the spool; keep going with what is there.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn segment_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{sequence:020}.spool"))
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.dir.join(QUARANTINE_DIR)
    }

    fn highest_quarantined(&self) -> Option<u64> {
        fs::read_dir(self.quarantine_dir())
            .ok()
            .and_then(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| segment_sequence(&entry.path()))
                    .max()
            })
    }

    fn count_quarantined(&self) -> usize {
        fs::read_dir(self.quarantine_dir()).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| segment_sequence(&entry.path()).is_some())
                .count()
        })
    }

    fn append(&self, payload: &[u8]) -> Result<(), SpoolError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(SpoolError::RecordTooLarge {
                bytes: payload.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let _appending = self
            .appending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let record_bytes = (RECORD_HEADER + payload.len()) as u64;
        // Take the active segment (or a new sequence) under the state lock, then do the I/O
        // without it.
        let taken = {
            let mut state = self.lock();
            if state.total_bytes + record_bytes > self.max_bytes {
                return Err(SpoolError::Full {
                    used: state.total_bytes,
                    max: self.max_bytes,
                });
            }
            if state
                .active
                .as_ref()
                .is_some_and(|active| active.bytes + record_bytes > self.segment_bytes)
            {
                seal(&mut state);
            }
            state.active.take().ok_or_else(|| {
                let sequence = state.next_sequence;
                state.next_sequence += 1;
                sequence
            })
        };
        let mut active = match taken {
            Ok(active) => active,
            Err(sequence) => {
                let active = self.create_segment(sequence)?;
                self.lock().total_bytes += active.bytes;
                active
            }
        };
        let record = format::frame(payload);
        let written = active
            .file
            .write_all(&record)
            .and_then(|()| active.file.sync_data());
        if let Err(source) = written {
            // A failed append was not acknowledged: cut it off, so that a sealed segment never
            // ends in a torn record (only the active one can, in a crash). Should the cut fail
            // too, the tear stays, and the next start quarantines the segment.
            let cut = active
                .file
                .set_len(active.bytes)
                .and_then(|()| active.file.sync_data());
            let kept = match cut {
                Ok(()) => active.bytes,
                Err(_) => active.bytes + record_bytes,
            };
            let mut state = self.lock();
            state.sealed.insert(active.sequence, kept);
            state.total_bytes += kept - active.bytes;
            return Err(SpoolError::Io {
                path: active.path.clone(),
                source,
            });
        }
        let mut state = self.lock();
        active.bytes += record_bytes;
        state.total_bytes += record_bytes;
        state.active = Some(active);
        Ok(())
    }

    fn edit(
        &self,
        edit: impl Fn(&mut ValidEvent) -> Edit,
        dry_run: bool,
    ) -> Result<u64, SpoolError> {
        // Seal and list in one critical section: later appends start a new segment, which is
        // never rewritten here (it holds only events admitted after the Delete call).
        let sequences: Vec<u64> = {
            let mut state = self.lock();
            seal(&mut state);
            state.sealed.keys().copied().collect()
        };
        let mut edited = 0;
        for sequence in sequences {
            let path = self.segment_path(sequence);
            let mut reader = match SegmentReader::open(&path) {
                Ok(reader) => reader,
                Err(ReadError::Spool(error)) => return Err(error),
                Err(ReadError::Undecodable(source)) => {
                    return Err(self.quarantine_sealed(sequence, source));
                }
            };
            let mut kept_batches = Vec::new();
            let mut edited_here = 0;
            loop {
                let batch = match reader.next_batch() {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(ReadError::Spool(error)) => return Err(error),
                    Err(ReadError::Undecodable(source)) => {
                        drop(reader);
                        return Err(self.quarantine_sealed(sequence, source));
                    }
                };
                let mut kept = Vec::with_capacity(batch.events.len());
                for mut event in batch.events {
                    match edit(&mut event) {
                        Edit::Keep => kept.push(event),
                        Edit::Changed => {
                            edited_here += 1;
                            kept.push(event);
                        }
                        Edit::Remove => edited_here += 1,
                    }
                }
                if !kept.is_empty() {
                    kept_batches.push(Batch {
                        events: kept,
                        admitted_at: batch.admitted_at,
                    });
                }
            }
            edited += edited_here;
            if dry_run || edited_here == 0 {
                continue;
            }
            let new_bytes = self.rewrite_segment(&path, &kept_batches)?;
            let mut state = self.lock();
            if let Some(bytes) = state.sealed.get_mut(&sequence) {
                let old_bytes = std::mem::replace(bytes, new_bytes);
                state.total_bytes = state.total_bytes - old_bytes + new_bytes;
            }
        }
        Ok(edited)
    }

    /// Writes `batches` as a new segment in the current format over `path`, atomically.
    fn rewrite_segment(&self, path: &Path, batches: &[Batch]) -> Result<u64, SpoolError> {
        let temporary = path.with_extension("rewrite");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE)
            .open(&temporary)
            .map_err(io_error(&temporary))?;
        let mut bytes = MAGIC_LEN;
        file.write_all(MAGIC).map_err(io_error(&temporary))?;
        for batch in batches {
            let events: Vec<&ValidEvent> = batch.events.iter().collect();
            let payload = crate::event::batch::encode(&events, batch.admitted_at);
            let record = format::frame(&payload);
            file.write_all(&record).map_err(io_error(&temporary))?;
            bytes += record.len() as u64;
        }
        file.sync_all().map_err(io_error(&temporary))?;
        fs::rename(&temporary, path).map_err(io_error(path))?;
        sync_dir(&self.dir)?;
        Ok(bytes)
    }

    fn create_segment(&self, sequence: u64) -> Result<Active, SpoolError> {
        let path = self.segment_path(sequence);
        let mut file = OpenOptions::new()
            .mode(PRIVATE_FILE)
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(MAGIC).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
        // Make the new file's directory entry durable too.
        sync_dir(&self.dir)?;
        Ok(Active {
            sequence,
            path,
            file,
            bytes: MAGIC_LEN,
        })
    }

    /// Moves an unreadable segment to `quarantine/` (durably), counts and logs it. Returns the
    /// error that says where it went; an I/O failure while moving it is returned instead.
    fn quarantine(&self, path: &Path, source: DecodeError) -> Result<SpoolError, SpoolError> {
        let quarantine_dir = self.quarantine_dir();
        private_dir(&quarantine_dir)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // Never replace a segment already in quarantine.
        let mut quarantined = quarantine_dir.join(name.as_ref());
        let mut copy = 0;
        while quarantined.exists() {
            copy += 1;
            quarantined = quarantine_dir.join(format!("{name}.{copy}"));
        }
        fs::rename(path, &quarantined).map_err(io_error(path))?;
        sync_dir(&quarantine_dir)?;
        sync_dir(&self.dir)?;
        let segments = self.quarantined.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::spool_quarantined(segments);
        Ok(SpoolError::Quarantined {
            path: path.to_owned(),
            quarantined,
            source,
        })
    }

    /// Quarantines a sealed segment and forgets it.
    fn quarantine_sealed(&self, sequence: u64, source: DecodeError) -> SpoolError {
        let path = self.segment_path(sequence);
        let error = match self.quarantine(&path, source) {
            Ok(error) | Err(error) => error,
        };
        if matches!(error, SpoolError::Quarantined { .. }) {
            let mut state = self.lock();
            if let Some(bytes) = state.sealed.remove(&sequence) {
                state.total_bytes -= bytes;
            }
            // A quarantined segment no longer counts as spooled (it is in the quarantine gauge).
            metrics::spool_size(state.total_bytes);
        }
        tracing::error!(%error, "spool segment quarantined; its events wait for an operator");
        error
    }

    /// Deletes a replayed segment.
    fn remove(&self, sequence: u64) -> Result<(), SpoolError> {
        let path = self.segment_path(sequence);
        fs::remove_file(&path).map_err(io_error(&path))?;
        let mut state = self.lock();
        if let Some(bytes) = state.sealed.remove(&sequence) {
            state.total_bytes -= bytes;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(dir))
}

fn seal(state: &mut State) {
    if let Some(active) = state.active.take() {
        state.sealed.insert(active.sequence, active.bytes);
    }
}

fn segment_sequence(path: &Path) -> Option<u64> {
    if path.extension()? != "spool" {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

/// One sealed segment being replayed, with the spool's maintenance lock held.
pub struct SegmentReplay {
    spool: Spool,
    sequence: u64,
    path: PathBuf,
    /// None while a read runs on a blocking thread.
    reader: Option<SegmentReader>,
    _exclusive: OwnedMutexGuard<()>,
}

impl SegmentReplay {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next batch; None at the end of the segment. A batch that cannot be decoded
    /// quarantines the segment and returns [`SpoolError::Quarantined`].
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, SpoolError> {
        let Some(mut reader) = self.reader.take() else {
            return Ok(None);
        };
        let (reader, batch) = tokio::task::spawn_blocking(move || {
            let batch = reader.next_batch();
            (reader, batch)
        })
        .await?;
        match batch {
            Ok(batch) => {
                self.reader = Some(reader);
                Ok(batch)
            }
            Err(ReadError::Spool(error)) => Err(error),
            Err(ReadError::Undecodable(source)) => {
                drop(reader);
                let inner = self.spool.inner.clone();
                let sequence = self.sequence;
                Err(blocking(move || Ok(inner.quarantine_sealed(sequence, source))).await?)
            }
        }
    }

    /// Deletes the segment: every batch of it is in PostgreSQL.
    pub async fn finish(self) -> Result<(), SpoolError> {
        let inner = self.spool.inner.clone();
        let sequence = self.sequence;
        let exclusive = self._exclusive;
        blocking(move || {
            let _exclusive = exclusive;
            inner.remove(sequence)
        })
        .await
    }
}

enum ReadError {
    Spool(SpoolError),
    Undecodable(DecodeError),
}

/// Reads the records of a segment, one batch at a time.
struct SegmentReader {
    path: PathBuf,
    format: SegmentFormat,
    reader: BufReader<File>,
    /// Where the next record starts, and the file's size.
    position: u64,
    file_bytes: u64,
}

impl SegmentReader {
    fn open(path: &Path) -> Result<Self, ReadError> {
        let spool_error = |source| ReadError::Spool(io_error(path)(source));
        let file = File::open(path).map_err(spool_error)?;
        let file_bytes = file.metadata().map_err(spool_error)?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(spool_error)?;
        let format = SegmentFormat::from_magic(&magic)
            .ok_or(ReadError::Undecodable(DecodeError::UnknownFormat))?;
        Ok(Self {
            path: path.to_owned(),
            format,
            reader,
            position: MAGIC_LEN,
            file_bytes,
        })
    }

    /// The next batch; None at the end. A torn tail (the file ends inside the last record, as
    /// after a failed append) ends the segment; a bad record with more bytes after it is
    /// corruption, and an error, so that nothing after it is ever dropped.
    fn next_batch(&mut self) -> Result<Option<Batch>, ReadError> {
        let frame = format::read_frame(&mut self.reader)
            .map_err(|source| ReadError::Spool(io_error(&self.path)(source)))?;
        match frame {
            Frame::Record(payload) => {
                self.position += (RECORD_HEADER + payload.len()) as u64;
                format::decode_batch(self.format, &payload)
                    .map(Some)
                    .map_err(ReadError::Undecodable)
            }
            Frame::BadChecksum { bytes } if self.position + bytes < self.file_bytes => {
                Err(ReadError::Undecodable(DecodeError::CorruptRecord))
            }
            Frame::BadLength => Err(ReadError::Undecodable(DecodeError::BadLength)),
            Frame::End | Frame::Torn | Frame::BadChecksum { .. } => Ok(None),
        }
    }
}

/// What checking a segment found.
struct SegmentCheck {
    records: usize,
    /// Bytes up to the end of the last intact record.
    good_bytes: u64,
    file_bytes: u64,
    /// Why an intact part of the segment cannot be read (quarantine it), if so.
    unreadable: Option<DecodeError>,
}

/// Reads a whole segment. A torn tail ends the good part; an intact record that does not
/// decode, a record failing its checksum with more bytes after it, a garbage length or an
/// unknown magic (corruption, not a torn append) makes the segment unreadable: it is then
/// quarantined, never cut. A file shorter than the magic holds no records (a crash between
/// creating it and writing its magic).
/// Spool files hold events as they are stored, personal data among them: readable by this
/// user only, whatever the process's umask.
const PRIVATE_FILE: u32 = 0o600;
const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` (and its parents) when missing, and makes it this user's only.
fn private_dir(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR)).map_err(io_error(dir))
}

fn check_segment(path: &Path) -> Result<SegmentCheck, SpoolError> {
    let file_bytes = fs::metadata(path).map_err(io_error(path))?.len();
    let mut check = SegmentCheck {
        records: 0,
        good_bytes: 0,
        file_bytes,
        unreadable: None,
    };
    if file_bytes < MAGIC_LEN {
        return Ok(check);
    }
    let mut reader = match SegmentReader::open(path) {
        Ok(reader) => reader,
        Err(ReadError::Spool(error)) => return Err(error),
        Err(ReadError::Undecodable(error)) => {
            check.unreadable = Some(error);
            return Ok(check);
        }
    };
    check.good_bytes = MAGIC_LEN;
    loop {
        match reader.next_batch() {
            Ok(Some(_)) => {
                check.records += 1;
                check.good_bytes = reader.position;
            }
            Ok(None) => return Ok(check),
            Err(ReadError::Spool(error)) => return Err(error),
            Err(ReadError::Undecodable(error)) => {
                check.unreadable = Some(error);
                return Ok(check);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn batch(size: usize) -> Vec<ValidEvent> {
        (0..size)
            .map(|index| ValidEvent {
                trace_id: None,
                message: format!("event {index}"),
                user_id: Some("u-1".to_owned()),
                metadata_json: r#"{"k":1}"#.to_owned(),
                ..ValidEvent::sample(index as u64)
            })
            .collect()
    }

    async fn append(spool: &Spool, events: &[ValidEvent]) {
        spool
            .append(&events.iter().collect::<Vec<_>>(), Some(chrono::Utc::now()))
            .await
            .expect("append");
    }

    /// Replays everything, as the replayer does, and returns the events in order.
    async fn read_all(spool: &Spool) -> Vec<ValidEvent> {
        spool.seal_active();
        let mut events = Vec::new();
        while let Some(mut segment) = spool.oldest_segment().await.expect("open segment") {
            while let Some(batch) = segment.next_batch().await.expect("read") {
                events.extend(batch.events);
            }
            segment.finish().await.expect("remove");
        }
        events
    }

    /// Events compare without their index, which replay renumbers per batch.
    fn unindexed(events: Vec<ValidEvent>) -> Vec<ValidEvent> {
        events
            .into_iter()
            .map(|event| ValidEvent { index: 0, ..event })
            .collect()
    }

    fn segment(dir: &Path, sequence: u64) -> PathBuf {
        dir.join(format!("{sequence:020}.spool"))
    }

    #[tokio::test]
    async fn batches_survive_a_reopen_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = batch(3);
        let second = batch(2);
        {
            let (spool, recovery) = Spool::open(dir.path(), MIB, 250).await.expect("open");
            assert_eq!(recovery, Recovery::default());
            append(&spool, &first).await;
            append(&spool, &second).await;
        }
        let (spool, recovery) = Spool::open(dir.path(), MIB, 250).await.expect("reopen");
        assert_eq!(
            (
                recovery.segments,
                recovery.records,
                recovery.truncated_bytes
            ),
            (2, 2, 0)
        );
        let events = read_all(&spool).await;
        assert_eq!(unindexed(events), unindexed([first, second].concat()));
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_intact_records_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = batch(4);
        {
            let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
            append(&spool, &kept).await;
            append(&spool, &batch(4)).await;
        }
        let path = segment(dir.path(), 0);
        let full = fs::metadata(&path).expect("meta").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(full - 10)
            .expect("truncate");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("reopen");
        assert_eq!((recovery.records, recovery.quarantined), (1, 0));
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(unindexed(read_all(&spool).await), unindexed(kept));
    }

    #[tokio::test]
    async fn a_sealed_segment_ending_inside_a_record_is_quarantined_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let newest = batch(2);
        {
            // Segments of one record each: the first is sealed, the second the newest.
            let (spool, _) = Spool::open(dir.path(), MIB, 250).await.expect("open");
            append(&spool, &batch(3)).await;
            append(&spool, &newest).await;
        }
        let sealed = segment(dir.path(), 0);
        let full = fs::metadata(&sealed).expect("meta").len();
        OpenOptions::new()
            .write(true)
            .open(&sealed)
            .expect("open")
            .set_len(full - 10)
            .expect("truncate");
        let (spool, recovery) = Spool::open(dir.path(), MIB, 250).await.expect("reopen");
        assert_eq!(
            (recovery.quarantined, recovery.truncated_bytes),
            (1, 0),
            "acknowledged events of a sealed segment are kept aside, never cut"
        );
        assert!(
            dir.path()
                .join(QUARANTINE_DIR)
                .join(sealed.file_name().expect("name"))
                .exists()
        );
        assert_eq!(unindexed(read_all(&spool).await), unindexed(newest));
    }

    #[tokio::test]
    async fn spool_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("spool");
        let (spool, _) = Spool::open(&root, MIB, MIB).await.expect("open");
        append(&spool, &batch(1)).await;
        let mode = |path: &Path| fs::metadata(path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&segment(&root, 0)), 0o600);
    }

    #[tokio::test]
    async fn a_last_record_failing_its_checksum_is_a_torn_write_and_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = batch(2);
        {
            let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
            append(&spool, &kept).await;
            append(&spool, &batch(2)).await;
        }
        let path = segment(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("reopen");
        assert_eq!((recovery.records, recovery.quarantined), (1, 0));
        assert_eq!(unindexed(read_all(&spool).await), unindexed(kept));
    }

    #[tokio::test]
    async fn a_corrupt_record_with_records_after_it_quarantines_the_segment_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
            append(&spool, &batch(2)).await;
            append(&spool, &batch(2)).await;
        }
        let path = segment(dir.path(), 0);
        let original = fs::read(&path).expect("read");
        let mut bytes = original.clone();
        // A byte inside the first record's payload.
        bytes[MAGIC_LEN as usize + RECORD_HEADER + 5] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("reopen");
        assert_eq!((recovery.records, recovery.quarantined), (0, 1));
        assert!(!path.exists());
        let quarantined = dir
            .path()
            .join(QUARANTINE_DIR)
            .join(path.file_name().expect("name"));
        assert_eq!(fs::read(&quarantined).expect("kept whole"), bytes);
        assert_eq!(spool.quarantined().await, 1);
        assert!(spool.is_empty());
        // A new segment never takes the quarantined one's sequence.
        append(&spool, &batch(1)).await;
        spool.seal_active();
        assert!(segment(dir.path(), 1).exists());
    }

    #[tokio::test]
    async fn an_intact_record_that_does_not_decode_is_quarantined_not_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = segment(dir.path(), 7);
        // A record of a future version: its checksum holds, its payload is unknown here.
        let mut bytes = MAGIC.to_vec();
        bytes.extend(format::frame(&[42, 1, 2, 3]));
        fs::write(&path, &bytes).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        assert_eq!(recovery.quarantined, 1);
        assert_eq!(spool.quarantined().await, 1);
        let moved = dir
            .path()
            .join(QUARANTINE_DIR)
            .join(path.file_name().expect("name"));
        assert_eq!(fs::read(moved).expect("kept"), bytes);
        // Once the operator takes it away, the spool no longer reports it.
        fs::remove_dir_all(dir.path().join(QUARANTINE_DIR)).expect("operator");
        assert_eq!(spool.quarantined().await, 0);
    }

    #[tokio::test]
    async fn a_record_that_stops_decoding_during_replay_quarantines_its_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        append(&spool, &batch(2)).await;
        spool.seal_active();
        // Corrupt the payload's version byte after start-up checked the segment, fixing the
        // checksum so that the record stays intact.
        let path = segment(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        let payload_at = MAGIC_LEN as usize + RECORD_HEADER;
        bytes[payload_at] = 200;
        let checksum = crc32c::crc32c(&bytes[payload_at..]);
        bytes[payload_at - 4..payload_at].copy_from_slice(&checksum.to_le_bytes());
        fs::write(&path, &bytes).expect("write");
        let mut replay = spool
            .oldest_segment()
            .await
            .expect("open")
            .expect("a segment");
        assert!(matches!(
            replay.next_batch().await,
            Err(SpoolError::Quarantined { .. })
        ));
        drop(replay);
        assert!(spool.oldest_segment().await.expect("list").is_none());
        assert_eq!(spool.quarantined().await, 1);
        assert_eq!(spool.bytes(), 0);
    }

    #[tokio::test]
    async fn a_segment_of_the_pre_versioned_json_format_still_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/spool/legacy-json-v0.spool"
        );
        fs::copy(fixture, segment(dir.path(), 3)).expect("copy fixture");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        assert_eq!((recovery.records, recovery.quarantined), (2, 0));
        let events = read_all(&spool).await;
        let ids: Vec<String> = events.iter().map(|event| event.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "01900000-0000-7000-8000-000000000001",
                "01900000-0000-7000-8000-000000000002",
                "01900000-0000-7000-8000-000000000003"
            ]
        );
        let first = &events[0];
        assert_eq!(first.service, "legacy-svc");
        assert_eq!(first.message, "legacy event 0 \u{e9}\u{1F600}");
        assert_eq!(first.timestamp.timestamp_micros(), 1_790_000_000_123_456);
        assert_eq!(first.user_id.as_deref(), Some("u-1"));
        assert_eq!(
            first.metadata_json,
            r#"{"amount":42,"nested":{"k":[1,2.5,"x",null,true]}}"#
        );
        assert_eq!(events[1].user_id, None);
        assert_eq!(
            events[2].timestamp.timestamp_micros(),
            1_790_000_002_000_001
        );
    }

    #[tokio::test]
    async fn purging_a_legacy_segment_rewrites_it_in_the_current_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/spool/legacy-json-v0.spool"
        );
        fs::copy(fixture, segment(dir.path(), 0)).expect("copy fixture");
        let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        let removed = spool
            .purge(|event| event.user_id.as_deref() == Some("u-2"), false)
            .await
            .expect("purge");
        assert_eq!(removed, 1);
        let bytes = fs::read(segment(dir.path(), 0)).expect("read");
        assert_eq!(&bytes[..8], MAGIC);
        let left = read_all(&spool).await;
        assert_eq!(left.len(), 2);
        assert!(
            left.iter()
                .all(|event| event.user_id.as_deref() != Some("u-2"))
        );
    }

    #[tokio::test]
    async fn purge_removes_only_matching_events_and_dry_run_only_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        let mut mixed = batch(6);
        for event in mixed.iter_mut().step_by(2) {
            event.user_id = Some("forget-me".to_owned());
        }
        append(&spool, &mixed).await;
        let doomed = |event: &ValidEvent| event.user_id.as_deref() == Some("forget-me");
        assert_eq!(spool.purge(doomed, true).await.expect("dry run"), 3);
        assert_eq!(spool.purge(doomed, false).await.expect("purge"), 3);
        assert_eq!(spool.purge(doomed, true).await.expect("dry run"), 0);
        let kept = read_all(&spool).await;
        assert_eq!(kept.len(), 3);
        assert!(kept.iter().all(|event| !doomed(event)));
    }

    #[tokio::test]
    async fn rewrite_changes_only_matching_events_in_place_and_dry_run_only_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        let mut mixed = batch(6);
        for event in mixed.iter_mut().step_by(3) {
            event.user_id = Some("link-me-not".to_owned());
        }
        append(&spool, &mixed).await;
        let change = |event: &mut ValidEvent| {
            let theirs = event.user_id.as_deref() == Some("link-me-not");
            if theirs {
                event.user_id = Some("anon:1".to_owned());
            }
            theirs
        };
        assert_eq!(spool.rewrite(change, true).await.expect("dry run"), 2);
        assert_eq!(spool.rewrite(change, false).await.expect("rewrite"), 2);
        assert_eq!(spool.rewrite(change, false).await.expect("again"), 0);
        let kept = read_all(&spool).await;
        assert_eq!(kept.len(), 6, "nothing removed");
        let ids: Vec<_> = kept.iter().map(|event| event.id).collect();
        assert_eq!(ids, mixed.iter().map(|event| event.id).collect::<Vec<_>>());
        let anonymized = kept
            .iter()
            .filter(|event| event.user_id.as_deref() == Some("anon:1"))
            .count();
        assert_eq!(anonymized, 2);
    }

    #[tokio::test]
    async fn appends_beyond_max_bytes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 300, MIB).await.expect("open");
        append(&spool, &batch(1)).await;
        assert!(matches!(
            spool
                .append(&batch(4).iter().collect::<Vec<_>>(), None)
                .await,
            Err(SpoolError::Full { .. })
        ));
    }

    #[tokio::test]
    async fn a_zero_filled_tail_is_cut_not_quarantined() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = batch(2);
        {
            let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
            append(&spool, &kept).await;
        }
        let path = segment(dir.path(), 0);
        let mut bytes = fs::read(&path).expect("read");
        bytes.extend([0u8; 4096]);
        fs::write(&path, bytes).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("reopen");
        assert_eq!((recovery.records, recovery.quarantined), (1, 0));
        assert_eq!(recovery.truncated_bytes, 4096);
        assert_eq!(unindexed(read_all(&spool).await), unindexed(kept));
    }

    #[tokio::test]
    async fn a_garbage_length_or_an_unknown_magic_quarantines_and_never_cuts() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (spool, _) = Spool::open(dir.path(), MIB, 150).await.expect("open");
            append(&spool, &batch(2)).await;
            append(&spool, &batch(2)).await;
        }
        // Segment 0: its first record's length becomes garbage.
        let first = segment(dir.path(), 0);
        let mut bytes = fs::read(&first).expect("read");
        let at = MAGIC_LEN as usize;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&first, &bytes).expect("write");
        // Segment 1: a magic from the future.
        let second = segment(dir.path(), 1);
        let mut future = fs::read(&second).expect("read");
        future[..8].copy_from_slice(b"SLSPOOL9");
        fs::write(&second, &future).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), MIB, MIB).await.expect("reopen");
        assert_eq!(
            (
                recovery.records,
                recovery.quarantined,
                recovery.truncated_bytes
            ),
            (0, 2, 0)
        );
        let quarantine = dir.path().join(QUARANTINE_DIR);
        assert_eq!(
            fs::read(quarantine.join(first.file_name().expect("name"))).expect("kept"),
            bytes
        );
        assert_eq!(
            fs::read(quarantine.join(second.file_name().expect("name"))).expect("kept"),
            future
        );
        assert_eq!(spool.quarantined().await, 2);
    }

    #[tokio::test]
    async fn after_a_restart_new_segments_never_take_a_quarantined_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(QUARANTINE_DIR)).expect("dir");
        let held = dir
            .path()
            .join(QUARANTINE_DIR)
            .join("00000000000000000004.spool");
        fs::write(&held, b"operator, look at me").expect("write");
        let (spool, _) = Spool::open(dir.path(), MIB, MIB).await.expect("open");
        append(&spool, &batch(1)).await;
        spool.seal_active();
        assert!(
            segment(dir.path(), 5).exists(),
            "sequence 5, after the quarantined 4"
        );
        assert_eq!(fs::read(&held).expect("untouched"), b"operator, look at me");
    }
}
