//! The disk spool: where batches go while the database is unreachable, so ingest keeps being
//! acknowledged without losing anything.
//!
//! Segment files `<sequence>.spool` under the spool directory. Each starts with an 8-byte magic,
//! then records: payload length (u32 LE), CRC32C of the payload (u32 LE), payload (the batch as
//! JSON). A record is fsync'd before its batch is acknowledged. At start-up every segment is
//! checked: a torn or corrupt tail (a crash mid-write) is cut off and reported, and every intact
//! record before it is kept. The replayer drains sealed segments into PostgreSQL (idempotently,
//! by event id) and deletes them.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{BufReader, Read, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::event::ValidEvent;

const MAGIC: &[u8; 8] = b"SLSPOOL1";
const RECORD_HEADER: usize = 8;
/// A record larger than this is not a record: the length field is garbage.
const MAX_RECORD_BYTES: usize = 256 * 1024 * 1024;

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
    #[error("cannot encode batch for the spool: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What start-up found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: usize,
    /// Bytes cut off the tails of segments (torn or corrupt records).
    pub truncated_bytes: u64,
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

pub struct Spool {
    /// Held while a segment is replayed or rewritten, so the two never overlap.
    pub maintenance: tokio::sync::Mutex<()>,
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    state: Mutex<State>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Spool {
    /// Opens (creating) the spool directory and checks every segment left there.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut recovery = Recovery::default();
        let mut sealed = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            if path
                .extension()
                .is_some_and(|extension| extension == "rewrite")
            {
                // A purge interrupted before its rename: the original segment is intact.
                fs::remove_file(&path).map_err(io_error(&path))?;
                continue;
            }
            let Some(sequence) = segment_sequence(&path) else {
                continue;
            };
            let (records, good_bytes, file_bytes) = check_segment(&path)?;
            if good_bytes < file_bytes {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                file.set_len(good_bytes).map_err(io_error(&path))?;
                file.sync_all().map_err(io_error(&path))?;
                tracing::warn!(segment = %path.display(), kept_records = records, cut_bytes = file_bytes - good_bytes, "spool segment had a torn or corrupt tail; cut it off");
                recovery.truncated_bytes += file_bytes - good_bytes;
            }
            if records == 0 {
                fs::remove_file(&path).map_err(io_error(&path))?;
                continue;
            }
            recovery.segments += 1;
            recovery.records += records;
            sealed.insert(sequence, good_bytes);
        }
        let next_sequence = sealed.keys().next_back().map_or(0, |last| last + 1);
        let total_bytes = sealed.values().sum();
        let state = State {
            active: None,
            sealed,
            next_sequence,
            total_bytes,
        };
        Ok((
            Self {
                maintenance: tokio::sync::Mutex::new(()),
                dir: dir.to_owned(),
                max_bytes,
                segment_bytes,
                state: Mutex::new(state),
            },
            recovery,
        ))
    }

    /// Encodes a batch as a record payload.
    pub fn encode(events: &[&ValidEvent]) -> Result<Vec<u8>, SpoolError> {
        Ok(serde_json::to_vec(events)?)
    }

    /// Appends one batch and fsyncs it. Blocking: call from a blocking thread.
    pub fn append(&self, events: &[&ValidEvent]) -> Result<(), SpoolError> {
        self.append_encoded(Self::encode(events)?)
    }

    /// Appends one record payload made by [`Spool::encode`] and fsyncs it. Blocking.
    pub fn append_encoded(&self, payload: Vec<u8>) -> Result<(), SpoolError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(SpoolError::RecordTooLarge {
                bytes: payload.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let record_bytes = (RECORD_HEADER + payload.len()) as u64;
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
        let mut active = match state.active.take() {
            Some(active) => active,
            None => {
                let active = self.create_segment(state.next_sequence)?;
                state.next_sequence += 1;
                state.total_bytes += active.bytes;
                active
            }
        };
        let record = encode_record(&payload);
        let written = active
            .file
            .write_all(&record)
            .and_then(|()| active.file.sync_data());
        if let Err(source) = written {
            // The segment may now end in a torn record: seal it; reading stops at the tear.
            let path = active.path.clone();
            state
                .sealed
                .insert(active.sequence, active.bytes + record_bytes);
            state.total_bytes += record_bytes;
            return Err(SpoolError::Io { path, source });
        }
        active.bytes += record_bytes;
        state.total_bytes += record_bytes;
        state.active = Some(active);
        Ok(())
    }

    /// Closes the segment being appended to, so the replayer can take it.
    pub fn seal_active(&self) {
        seal(&mut self.lock());
    }

    /// The oldest sealed segment, if any.
    pub fn oldest_sealed(&self) -> Option<(u64, PathBuf)> {
        let state = self.lock();
        state
            .sealed
            .keys()
            .next()
            .map(|sequence| (*sequence, self.segment_path(*sequence)))
    }

    /// Deletes a replayed segment.
    pub fn remove(&self, sequence: u64) -> Result<(), SpoolError> {
        let path = self.segment_path(sequence);
        fs::remove_file(&path).map_err(io_error(&path))?;
        let mut state = self.lock();
        if let Some(bytes) = state.sealed.remove(&sequence) {
            state.total_bytes -= bytes;
        }
        Ok(())
    }

    /// Removes every spooled event matching `doomed` (right to be forgotten): seals the active
    /// segment, then rewrites each sealed segment that holds such events, atomically (write a
    /// new file, fsync, rename over). Returns how many events were removed, or, with `dry_run`,
    /// how many would be. Blocking; hold `maintenance` around it.
    pub fn purge(
        &self,
        doomed: impl Fn(&ValidEvent) -> bool,
        dry_run: bool,
    ) -> Result<u64, SpoolError> {
        // Seal and list in one critical section: later appends start a new segment, which is
        // never rewritten here (it holds only events admitted after the Delete call).
        let sequences: Vec<u64> = {
            let mut state = self.lock();
            seal(&mut state);
            state.sealed.keys().copied().collect()
        };
        let mut removed = 0;
        for sequence in sequences {
            let path = self.segment_path(sequence);
            let mut reader = SegmentReader::open(&path)?;
            let mut kept_batches = Vec::new();
            let mut removed_here = 0;
            while let Some(batch) = reader.next_batch()? {
                let before = batch.len();
                let kept: Vec<ValidEvent> =
                    batch.into_iter().filter(|event| !doomed(event)).collect();
                removed_here += (before - kept.len()) as u64;
                if !kept.is_empty() {
                    kept_batches.push(kept);
                }
            }
            removed += removed_here;
            if dry_run || removed_here == 0 {
                continue;
            }
            let new_bytes = self.rewrite_segment(&path, &kept_batches)?;
            let mut state = self.lock();
            if let Some(bytes) = state.sealed.get_mut(&sequence) {
                let old_bytes = std::mem::replace(bytes, new_bytes);
                state.total_bytes = state.total_bytes - old_bytes + new_bytes;
            }
        }
        Ok(removed)
    }

    fn rewrite_segment(&self, path: &Path, batches: &[Vec<ValidEvent>]) -> Result<u64, SpoolError> {
        let temporary = path.with_extension("rewrite");
        let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
        let mut bytes = MAGIC.len() as u64;
        file.write_all(MAGIC).map_err(io_error(&temporary))?;
        for batch in batches {
            let payload = Self::encode(&batch.iter().collect::<Vec<_>>())?;
            let record = encode_record(&payload);
            file.write_all(&record).map_err(io_error(&temporary))?;
            bytes += record.len() as u64;
        }
        file.sync_all().map_err(io_error(&temporary))?;
        fs::rename(&temporary, path).map_err(io_error(path))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(bytes)
    }

    /// Bytes on disk, active segment included.
    pub fn bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    pub fn is_empty(&self) -> bool {
        let state = self.lock();
        state.sealed.is_empty() && state.active.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the spool; keep going with what is there.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn segment_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{sequence:020}.spool"))
    }

    fn create_segment(&self, sequence: u64) -> Result<Active, SpoolError> {
        let path = self.segment_path(sequence);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(MAGIC).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
        // Make the new file's directory entry durable too.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(Active {
            sequence,
            path,
            file,
            bytes: MAGIC.len() as u64,
        })
    }
}

/// A record: payload length, CRC32C of the payload, payload.
fn encode_record(payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
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

/// Reads the records of a segment, one batch at a time.
pub struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
}

impl SegmentReader {
    pub fn open(path: &Path) -> Result<Self, SpoolError> {
        let mut reader = BufReader::new(File::open(path).map_err(io_error(path))?);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(io_error(path))?;
        if &magic != MAGIC {
            let source = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a sluice spool segment",
            );
            return Err(SpoolError::Io {
                path: path.to_owned(),
                source,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            reader,
        })
    }

    /// The next intact record; None at the end (or at a corrupt tail, which start-up cuts).
    pub fn next_batch(&mut self) -> Result<Option<Vec<ValidEvent>>, SpoolError> {
        match read_record(&mut self.reader).map_err(io_error(&self.path))? {
            Some(payload) => Ok(serde_json::from_slice(&payload).ok()),
            None => Ok(None),
        }
    }
}

/// Reads one record: None at a clean end, or when the record is torn or fails its checksum.
fn read_record(reader: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; RECORD_HEADER];
    if let Err(error) = reader.read_exact(&mut header) {
        return if error.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(error)
        };
    }
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if length > MAX_RECORD_BYTES {
        return Ok(None);
    }
    let mut payload = vec![0u8; length];
    if let Err(error) = reader.read_exact(&mut payload) {
        return if error.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(error)
        };
    }
    if crc32c::crc32c(&payload) != checksum {
        return Ok(None);
    }
    Ok(Some(payload))
}

/// Counts the intact records of a segment and the bytes they span. Returns (records,
/// intact bytes, file bytes).
fn check_segment(path: &Path) -> Result<(usize, u64, u64), SpoolError> {
    let file_bytes = fs::metadata(path).map_err(io_error(path))?.len();
    let Ok(mut reader) = SegmentReader::open(path) else {
        return Ok((0, 0, file_bytes));
    };
    let mut records = 0;
    let mut good_bytes = MAGIC.len() as u64;
    while let Some(payload) = read_record(&mut reader.reader).map_err(io_error(path))? {
        if serde_json::from_slice::<Vec<ValidEvent>>(&payload).is_err() {
            break;
        }
        records += 1;
        good_bytes += (RECORD_HEADER + payload.len()) as u64;
    }
    Ok((records, good_bytes, file_bytes))
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;

    fn batch(size: usize) -> Vec<ValidEvent> {
        (0..size)
            .map(|index| ValidEvent {
                index: index as u64,
                id: Uuid::now_v7(),
                service: "svc".to_owned(),
                message: format!("event {index}"),
                timestamp: Utc::now(),
                user_id: Some("u-1".to_owned()),
                metadata_json: r#"{"k":1}"#.to_owned(),
            })
            .collect()
    }

    fn read_all(spool: &Spool) -> Vec<ValidEvent> {
        spool.seal_active();
        let mut events = Vec::new();
        while let Some((sequence, path)) = spool.oldest_sealed() {
            let mut reader = SegmentReader::open(&path).expect("open");
            while let Some(batch) = reader.next_batch().expect("read") {
                events.extend(batch);
            }
            spool.remove(sequence).expect("remove");
        }
        events
    }

    #[test]
    fn batches_survive_a_reopen_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = batch(3);
        let second = batch(2);
        {
            let (spool, recovery) = Spool::open(dir.path(), 1 << 20, 600).expect("open");
            assert_eq!(recovery, Recovery::default());
            spool
                .append(&first.iter().collect::<Vec<_>>())
                .expect("append");
            spool
                .append(&second.iter().collect::<Vec<_>>())
                .expect("append");
        }
        let (spool, recovery) = Spool::open(dir.path(), 1 << 20, 600).expect("reopen");
        assert_eq!(
            (
                recovery.segments,
                recovery.records,
                recovery.truncated_bytes
            ),
            (2, 2, 0)
        );
        let events = read_all(&spool);
        assert_eq!(events, [first, second].concat());
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_intact_records_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = batch(4);
        let path = {
            let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
            spool
                .append(&kept.iter().collect::<Vec<_>>())
                .expect("append");
            spool
                .append(&batch(4).iter().collect::<Vec<_>>())
                .expect("append");
            spool.segment_path(0)
        };
        let full = fs::metadata(&path).expect("meta").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(full - 10)
            .expect("truncate");
        let (spool, recovery) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(recovery.records, 1);
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(read_all(&spool), kept);
    }

    #[test]
    fn a_corrupt_record_stops_the_segment_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kept = batch(2);
        {
            let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
            spool
                .append(&kept.iter().collect::<Vec<_>>())
                .expect("append");
            spool
                .append(&batch(2).iter().collect::<Vec<_>>())
                .expect("append");
        }
        let path = dir.path().join(format!("{:020}.spool", 0));
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        let (spool, recovery) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("reopen");
        assert_eq!(recovery.records, 1);
        assert_eq!(read_all(&spool), kept);
    }

    #[test]
    fn purge_removes_only_matching_events_and_dry_run_only_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        let mut mixed = batch(6);
        for event in mixed.iter_mut().step_by(2) {
            event.user_id = Some("forget-me".to_owned());
        }
        spool
            .append(&mixed.iter().collect::<Vec<_>>())
            .expect("append");
        let doomed = |event: &ValidEvent| event.user_id.as_deref() == Some("forget-me");
        assert_eq!(spool.purge(doomed, true).expect("dry run"), 3);
        assert_eq!(spool.purge(doomed, false).expect("purge"), 3);
        assert_eq!(spool.purge(doomed, true).expect("dry run"), 0);
        let kept = read_all(&spool);
        assert_eq!(kept.len(), 3);
        assert!(kept.iter().all(|event| !doomed(event)));
    }

    #[test]
    fn appends_beyond_max_bytes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = Spool::open(dir.path(), 400, 1 << 20).expect("open");
        spool
            .append(&batch(1).iter().collect::<Vec<_>>())
            .expect("first fits");
        assert!(matches!(
            spool.append(&batch(3).iter().collect::<Vec<_>>()),
            Err(SpoolError::Full { .. })
        ));
    }
}
