//! The spool's journal: one append-only log shared by every recording, so one fdatasync makes a
//! whole batch of streams durable (group commit).
//!
//! # Record layout
//! ```text
//! u32 LE body length | u32 LE CRC-32 of body | body
//! body = u8 id length | recording id | u64 LE offset in the recording | payload
//! ```
//! Segments are `{spool}/journal/{seq:016}.wal`, rotated at [`SEGMENT_BYTES`].
//!
//! # Commit
//! One writer thread takes every append queued while its previous round ran (no artificial
//! window), writes them with one `write`, calls `fdatasync` once, then moves each recording's
//! durable offset. The queue is bounded in bytes ([`QUEUE_BYTES`]); a full queue makes writers
//! wait, which is back-pressure, never a drop.
//!
//! # Checkpoint
//! When a segment is rotated out, a checkpoint thread fsyncs the data file of every recording
//! that has records in it (their bytes were written to the data files before they were
//! journaled), then deletes the segment. So a segment is deleted only when its bytes are durable
//! in the data files.
//!
//! # Replay
//! At start, before anything else, every segment is read in order; each record whose recording
//! still has a spool directory is written into its data file at its offset (always: a power cut
//! can leave a file at full length with lost pages inside), the data files are fsynced, and the
//! segments are deleted. A record whose length or CRC does not check
//! is a torn tail: replay of that segment stops there (such bytes were never acked).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{SpoolError, SpoolFile, fsync_dir, io_err};

/// Segment size at which the journal rotates; bounds how much a replay reads and how much disk
/// the journal holds besides the data files.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// A non-empty segment older than this rotates too, so the journal gives back the disk space of
/// finalized recordings within seconds even when little is written (a full disk recovers).
pub const SEGMENT_MAX_AGE: Duration = Duration::from_secs(10);

/// A commit round slower than this is logged: acks wait on it.
const SLOW_COMMIT: Duration = Duration::from_millis(500);

/// Bytes queued for the writer at most; past it appends wait (back-pressure on the stream).
pub const QUEUE_BYTES: usize = 32 << 20;

/// Appends queued at most (each holds part of the byte budget too).
const QUEUE_APPENDS: usize = 65_536;

/// Appends written in one commit round at most; bounds a round's latency for early writers.
const ROUND_APPENDS: usize = 8_192;

enum Message {
    Append(Append),
    /// Sent every second so an idle writer can rotate an old segment.
    Tick,
}

struct Append {
    file: Arc<SpoolFile>,
    offset: u64,
    bytes: Bytes,
    _budget: OwnedSemaphorePermit,
}

/// Handle to the journal writer.
pub struct Journal {
    queue: mpsc::Sender<Message>,
    budget: Arc<Semaphore>,
}

impl Journal {
    /// Starts the writer on a new segment after `last_seq`.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the segment cannot be created.
    pub fn start(dir: PathBuf, last_seq: u64) -> Result<Self, SpoolError> {
        let segment = Segment::create(&dir, last_seq + 1)?;
        let (queue, rx) = mpsc::channel(QUEUE_APPENDS);
        std::thread::Builder::new()
            .name("spool-journal".to_owned())
            .spawn(move || run_writer(dir, segment, rx))
            .map_err(io_err("start journal thread", Path::new("journal")))?;
        // The ticker holds only a weak sender: the writer stops when the last `Journal` goes.
        let ticker = queue.downgrade();
        std::thread::Builder::new()
            .name("spool-journal-tick".to_owned())
            .spawn(move || {
                while let Some(queue) = ticker.upgrade() {
                    let _ = queue.try_send(Message::Tick);
                    drop(queue);
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map_err(io_err("start journal ticker", Path::new("journal")))?;
        Ok(Self {
            queue,
            budget: Arc::new(Semaphore::new(QUEUE_BYTES)),
        })
    }

    /// Queues `bytes` (already written to `file` at `offset`) for the next commit.
    ///
    /// # Errors
    /// [`SpoolError::Failed`] when the journal writer is gone.
    pub async fn append(
        &self,
        file: &Arc<SpoolFile>,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), SpoolError> {
        let cost = u32::try_from(bytes.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        let gone = || SpoolError::Failed {
            recording_id: file.id.to_string(),
            reason: "spool journal stopped".to_owned(),
        };
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| gone())?;
        let append = Append {
            file: file.clone(),
            offset,
            bytes,
            _budget: budget,
        };
        self.queue
            .send(Message::Append(append))
            .await
            .map_err(|_| gone())
    }
}

struct Segment {
    path: PathBuf,
    file: File,
    len: u64,
    opened: Instant,
}

impl Segment {
    fn create(dir: &Path, seq: u64) -> Result<Self, SpoolError> {
        let path = dir.join(format!("{seq:016}.wal"));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io_err("create journal segment", &path))?;
        fsync_dir(dir)?;
        Ok(Self {
            path,
            file,
            len: 0,
            opened: Instant::now(),
        })
    }
}

fn run_writer(dir: PathBuf, mut segment: Segment, mut rx: mpsc::Receiver<Message>) {
    let mut seq = segment_seq(&segment.path).unwrap_or(0);
    let mut messages = Vec::with_capacity(ROUND_APPENDS);
    let mut batch = Vec::with_capacity(ROUND_APPENDS);
    let mut buf = Vec::new();
    let mut touched: HashMap<String, Arc<SpoolFile>> = HashMap::new();
    while rx.blocking_recv_many(&mut messages, ROUND_APPENDS) > 0 {
        batch.extend(messages.drain(..).filter_map(|m| match m {
            Message::Append(append) => Some(append),
            Message::Tick => None,
        }));
        if !batch.is_empty() {
            let started = Instant::now();
            commit(&mut segment, &batch, &mut buf, &mut touched);
            if started.elapsed() > SLOW_COMMIT {
                tracing::warn!(appends = batch.len(), bytes = buf.len(), took = ?started.elapsed(), "slow journal commit");
            }
            batch.clear();
        }
        let aged = segment.len > 0 && segment.opened.elapsed() >= SEGMENT_MAX_AGE;
        if segment.len >= SEGMENT_BYTES || aged {
            match Segment::create(&dir, seq + 1) {
                Ok(next) => {
                    seq += 1;
                    let old = std::mem::replace(&mut segment, next);
                    let files = std::mem::take(&mut touched);
                    let dir = dir.clone();
                    let _ = std::thread::Builder::new()
                        .name("spool-checkpoint".to_owned())
                        .spawn(move || {
                            // Its fsyncs are background work: acks never wait on a checkpoint.
                            crate::background::lower_priority();
                            checkpoint(&dir, &old.path, files.into_values());
                        });
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot rotate the spool journal; the segment keeps growing")
                }
            }
        }
    }
}

/// Writes one batch with one write and one fdatasync, then moves the durable offsets.
fn commit(
    segment: &mut Segment,
    batch: &[Append],
    buf: &mut Vec<u8>,
    touched: &mut HashMap<String, Arc<SpoolFile>>,
) {
    buf.clear();
    for append in batch {
        encode(buf, append.file.id.as_str(), append.offset, &append.bytes);
    }
    // Written at an explicit offset and trimmed back on failure, so a segment never holds a torn
    // record with good records after it (replay stops at the first bad record).
    let written = segment
        .file
        .write_all_at(buf, segment.len)
        .and_then(|()| segment.file.sync_data());
    match written {
        Ok(()) => {
            segment.len += buf.len() as u64;
            for append in batch {
                append
                    .file
                    .mark_durable(append.offset + append.bytes.len() as u64);
                touched
                    .entry(append.file.id.to_string())
                    .or_insert_with(|| append.file.clone());
            }
        }
        Err(e) => {
            let _ = segment.file.set_len(segment.len);
            tracing::error!(path = %segment.path.display(), error = %e, "spool journal write failed; affected streams end with an error");
            for append in batch {
                append.file.fail(&format!("journal write failed: {e}"));
            }
        }
    }
}

/// Makes a rotated segment's bytes durable in the data files, then deletes the segment.
fn checkpoint(dir: &Path, segment: &Path, files: impl Iterator<Item = Arc<SpoolFile>>) {
    for file in files {
        if let Err(e) = file.sync_data_file() {
            tracing::error!(recording_id = %file.id, error = %e, "checkpoint fsync failed; keeping the journal segment");
            return;
        }
    }
    if let Err(e) = fs::remove_file(segment)
        .map_err(io_err("remove segment", segment))
        .and_then(|()| fsync_dir(dir))
    {
        tracing::warn!(error = %e, "cannot remove a checkpointed journal segment");
    }
}

fn encode(buf: &mut Vec<u8>, id: &str, offset: u64, payload: &[u8]) {
    let body_len = 1 + id.len() + 8 + payload.len();
    buf.reserve(8 + body_len);
    let start = buf.len() + 8;
    buf.put_u32_le(u32::try_from(body_len).unwrap_or(u32::MAX));
    buf.put_u32_le(0);
    buf.put_u8(u8::try_from(id.len()).unwrap_or(u8::MAX));
    buf.put_slice(id.as_bytes());
    buf.put_u64_le(offset);
    buf.put_slice(payload);
    let crc = crc32fast::hash(&buf[start..]);
    buf[start - 4..start].copy_from_slice(&crc.to_le_bytes());
}

/// One decoded record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub id: &'a str,
    pub offset: u64,
    pub payload: &'a [u8],
}

/// Decodes the records of a segment, stopping at the first torn or corrupt one.
pub fn decode(mut data: &[u8]) -> Vec<Record<'_>> {
    let mut records = Vec::new();
    while data.len() >= 8 {
        let body_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let crc = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
        let Some(body) = data.get(8..8 + body_len) else {
            break;
        };
        if crc32fast::hash(body) != crc || body.is_empty() {
            break;
        }
        let id_len = body[0] as usize;
        let (Some(id), Some(offset)) = (body.get(1..1 + id_len), body.get(1 + id_len..9 + id_len))
        else {
            break;
        };
        let Ok(id) = std::str::from_utf8(id) else {
            break;
        };
        let offset = u64::from_le_bytes(offset.try_into().unwrap_or_default());
        records.push(Record {
            id,
            offset,
            payload: &body[9 + id_len..],
        });
        data = &data[8 + body_len..];
    }
    records
}

fn segment_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".wal")?
        .parse()
        .ok()
}

/// Replays every segment into the recordings' data files, fsyncs them and deletes the segments.
/// Returns the highest segment number seen.
///
/// # Errors
/// [`SpoolError::Io`] on any file error: start-up must not go on with unreplayed bytes.
pub fn replay(dir: &Path, spool_root: &Path) -> Result<u64, SpoolError> {
    fs::create_dir_all(dir).map_err(io_err("create journal dir", dir))?;
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map_err(io_err("read journal dir", dir))?
        .flatten()
        .filter_map(|e| segment_seq(&e.path()).map(|seq| (seq, e.path())))
        .collect();
    segments.sort();
    let mut files: HashMap<String, Option<File>> = HashMap::new();
    let mut replayed = 0u64;
    for (_, path) in &segments {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_err("read journal segment", path))?;
        let records = decode(&data);
        let consumed: usize = records
            .iter()
            .map(|r| 17 + r.id.len() + r.payload.len())
            .sum();
        if consumed < data.len() {
            tracing::warn!(path = %path.display(), torn_bytes = data.len() - consumed, "journal segment ends in a torn record; ignoring it");
        }
        for record in records {
            let file = files.entry(record.id.to_owned()).or_insert_with(|| {
                // No spool directory: the recording was finalized; its bytes are in the store.
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(spool_root.join(record.id).join("data"))
                    .ok()
            });
            let Some(file) = file else { continue };
            // Always rewritten, not only past the file's end: after a power cut a data file can
            // have its length but lost pages inside it. Rewriting identical bytes is harmless.
            file.write_all_at(record.payload, record.offset)
                .map_err(io_err("replay into data", path))?;
            replayed += 1;
        }
    }
    for file in files.values().flatten() {
        file.sync_data()
            .map_err(io_err("fsync replayed data", dir))?;
    }
    for (_, path) in &segments {
        fs::remove_file(path).map_err(io_err("remove replayed segment", path))?;
    }
    fsync_dir(dir)?;
    if replayed > 0 {
        tracing::info!(records = replayed, "replayed spool journal into data files");
    }
    Ok(segments.last().map_or(0, |(seq, _)| *seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let mut buf = Vec::new();
        encode(&mut buf, "rec-a", 0, b"hello\n");
        encode(&mut buf, "rec-b", 42, b"");
        encode(&mut buf, "rec-a", 6, b"world\n");
        let whole = decode(&buf);
        assert_eq!(whole.len(), 3);
        assert_eq!(
            whole[2],
            Record {
                id: "rec-a",
                offset: 6,
                payload: b"world\n"
            }
        );
        for cut in 1..buf.len() {
            assert!(decode(&buf[..cut]).len() < 3, "cut at {cut}");
        }
        let mut flipped = buf.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert_eq!(decode(&flipped).len(), 2);
    }
}
