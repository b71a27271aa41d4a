//! The spool's journal: one append-only log shared by every recording, so one fdatasync makes a
//! whole batch of streams durable (group commit).
//!
//! # Record layout
//! ```text
//! u32 LE body length | u32 LE CRC-32 of body | body
//! body = u8 id length | recording id | u64 LE offset in the recording | payload
//! ```
//! Segments are `{spool}/journal/{seq:016}.wal`, rotated at [`SEGMENT_BYTES`] or
//! [`SEGMENT_MAX_AGE`]. Three offsets mark metadata records: [`META_OFFSET`] carries the
//! recording's `meta.json` (it opened), [`END_OFFSET`] its `end.json` (its stream ended) and
//! [`REMOVED_OFFSET`] nothing (it was finalized and its directory removed). So opening and ending
//! a recording cost no fsync of their own: the files and directory entries are written without
//! one, and the journal makes them durable with the next commit round.
//!
//! # Commit
//! One writer thread takes every append queued while its previous round ran (no artificial
//! window), writes them with one `write`, calls `fdatasync` once, then moves each recording's
//! durable offset and tells metadata writers. The queue is bounded in bytes ([`QUEUE_BYTES`]); a
//! full queue makes writers wait, which is back-pressure, never a drop. A round is refused like a
//! full disk when the disk could not also take its bytes in the data files
//! ([`DATA_RESERVE_BYTES`]); a refused round's streams are failed and its records dropped (never
//! acked), and data records of a failed recording are not journaled any more, so a data file is
//! always a gapless prefix of its recording.
//!
//! # Direct writes
//! Segments are opened with `O_DIRECT` where the file system allows it. A round is written
//! from aligned memory in whole blocks ([`DIRECT_ALIGN`]), zero-padded after its last record
//! (replay reads the zeros as the end); the partial last block stays in memory and is written
//! again in front of the next round's records. The journal, read only by replay, so stays out
//! of the page cache: copying every byte into it, on top of the copy into its data file, was a
//! tenth of all CPU when the gateway recorded a 1 GiB `cat`. A rewritten last block puts its
//! earlier records at risk on a torn block write exactly as the page cache's writeback of that
//! block did.
//!
//! # Data writer
//! After a committed round the batch goes to the data-writer thread, which holds each data
//! record in memory with its recording (see the spool's module doc), copied, so that the
//! receive buffers are free again for the next frames at once. Its queue is
//! bounded ([`DATA_QUEUE_BATCHES`]) and each record keeps its share of [`QUEUE_BYTES`] until
//! it is held, so a slow data writer pushes back on the streams.
//!
//! # Checkpoint
//! A rotated segment is checkpointed, oldest first, as soon as each recording with records in
//! it is removed (finalized: its bytes are in the store) or has them in its data file. Else it
//! waits until it is due: [`RETAIN_AGE`] after it rotated, or at once while the journal holds
//! more than its budget ([`RETAIN_MAX_BYTES`], at most 1/[`RETAIN_MEMORY_SHARE`] of memory and
//! 1/[`RETAIN_DISK_SHARE`] of the spool disk's free space). Then the data writer spills the
//! held bytes of its recordings up to their records in it into their data files (a spill that
//! fails, disk full, fails the recording's stream and is retried every second; the segment
//! stays meanwhile). The checkpoint thread then fsyncs those data files, the metadata files
//! and directory entries of recordings with metadata records in it, and deletes the segment.
//! Segments are deleted one at a time, in order, and only once their bytes are durable
//! elsewhere or no longer needed. A removal record that is lost in a crash after its
//! recording's segments were deleted leaves nothing to replay (data records with no meta
//! record are skipped), or, with its meta record still in a segment, a recording that finds
//! its manifest in the store and concludes.
//!
//! # Replay
//! At start, before anything else, every segment is read in order. Records of a removed
//! recording are skipped. A meta record rebuilds its recording's directory, `meta.json` and
//! `data`; an end record rewrites `end.json`; a data record is written into its data file at its
//! offset (always: a power cut can leave a file at full length with lost pages inside). A data
//! record with no directory and no meta record before it belongs to a finalized recording and is
//! skipped. Then everything replayed is fsynced and the segments are deleted. A record whose
//! length or CRC does not check is a torn tail: replay of that segment stops there (such bytes
//! were never acked).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metrics::Histogram;

use super::{SpoolError, SpoolFile, free_bytes, fsync_dir, io_err, sync_metadata_files};

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

/// Offset of a record that carries the recording's `meta.json` (replay recreates the
/// recording's directory, `meta.json` and empty `data` from it).
pub const META_OFFSET: u64 = u64::MAX;

/// Offset of a record that carries the recording's `end.json`.
pub const END_OFFSET: u64 = u64::MAX - 1;

/// Offset of a record (empty) saying the recording was finalized and its spool directory
/// removed: replay skips every record of it, rather than rebuild it from its meta record.
pub const REMOVED_OFFSET: u64 = u64::MAX - 2;

/// Checkpoints queued for the checkpoint thread at most; one is queued per rotated segment,
/// at most one every few seconds.
const CHECKPOINT_QUEUE: usize = 64;

/// Committed batches queued for the data writer at most; past it the journal writer waits.
/// Bytes are bounded by [`QUEUE_BYTES`] in any case.
pub const DATA_QUEUE_BATCHES: usize = 1024;

/// How often spills into data files that failed are tried again.
const DATA_RETRY: Duration = Duration::from_secs(1);

enum Message {
    Append(Append),
    /// Sent every second so an idle writer can rotate an old segment.
    Tick,
}

/// What the journal writer hands the data writer, in order.
enum DataMessage {
    Batch(Vec<Append>),
    /// Segment `seq` at `path` was rotated out: checkpoint it once its records are written.
    Rotated {
        seq: u64,
        path: PathBuf,
    },
    Tick,
}

/// One record on its way through the journal to the data writer. It counts in its file's
/// `in_flight` from creation until it is dropped: held, or refused by the journal.
struct Append {
    file: Arc<SpoolFile>,
    offset: u64,
    bytes: Bytes,
    /// The segment the record was committed to (set by the writer).
    segment: u64,
    /// Told whether the record was committed (metadata records, whose writer waits).
    done: Option<tokio::sync::oneshot::Sender<bool>>,
    _budget: OwnedSemaphorePermit,
}

impl Append {
    fn new(file: &Arc<SpoolFile>, offset: u64, bytes: Bytes, budget: OwnedSemaphorePermit) -> Self {
        file.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            file: file.clone(),
            offset,
            bytes,
            segment: 0,
            done: None,
            _budget: budget,
        }
    }

    fn is_metadata(&self) -> bool {
        self.offset >= REMOVED_OFFSET
    }
}

impl Drop for Append {
    fn drop(&mut self) {
        self.file.append_done();
    }
}

/// Handle to the journal writer. Dropping it stops the writer after its last round and waits
/// until the data writer has taken every committed record; held bytes stay in their
/// segments, which the next start replays.
pub struct Journal {
    queue: Option<mpsc::Sender<Message>>,
    budget: Arc<Semaphore>,
    /// Duration of each commit round.
    pub commit_seconds: Arc<Histogram>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Committed payload bytes not in data files (shared with the writer and data writer).
    unwritten: Arc<AtomicU64>,
}

impl Drop for Journal {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Journal {
    /// Starts the writer on a new segment after `last_seq`.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the segment cannot be created.
    pub fn start(dir: PathBuf, last_seq: u64) -> Result<Self, SpoolError> {
        let segment = Segment::create(&dir, last_seq + 1)?;
        let (queue, rx) = mpsc::channel(QUEUE_APPENDS);
        let (data_queue, data_rx) = std::sync::mpsc::sync_channel(DATA_QUEUE_BATCHES);
        let data_dir = dir.clone();
        let unwritten = Arc::new(AtomicU64::new(0));
        let commit_seconds = Arc::new(Histogram::default());
        let writer_commit_seconds = commit_seconds.clone();
        let writer_unwritten = unwritten.clone();
        let journal_unwritten = unwritten.clone();
        let data_writer = std::thread::Builder::new()
            .name("spool-data".to_owned())
            .spawn(move || DataWriter::new(data_dir, writer_unwritten).run(&data_rx))
            .map_err(io_err("start spool data thread", Path::new("journal")))?;
        let writer = std::thread::Builder::new()
            .name("spool-journal".to_owned())
            .spawn(move || {
                run_writer(
                    dir,
                    segment,
                    rx,
                    &data_queue,
                    &journal_unwritten,
                    &writer_commit_seconds,
                );
                drop(data_queue);
                let _ = data_writer.join();
            })
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
            queue: Some(queue),
            budget: Arc::new(Semaphore::new(QUEUE_BYTES)),
            commit_seconds,
            writer: Some(writer),
            unwritten,
        })
    }

    /// Queues `bytes` (recording bytes at `offset`) for the next commit.
    ///
    /// # Errors
    /// [`SpoolError::Failed`] when the journal writer is gone.
    pub async fn append(
        &self,
        file: &Arc<SpoolFile>,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), SpoolError> {
        self.enqueue(file, offset, bytes, None).await
    }

    /// A removed recording's held bytes: they need no data file any more.
    pub(super) fn released(&self, bytes: u64) {
        unhold(&self.unwritten, bytes);
    }

    /// Journals a metadata record ([`META_OFFSET`] or [`END_OFFSET`]) and waits for its commit.
    ///
    /// # Errors
    /// [`SpoolError::Failed`] when the record could not be committed.
    pub async fn commit_metadata(
        &self,
        file: &Arc<SpoolFile>,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), SpoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(file, offset, bytes, Some(tx)).await?;
        match rx.await {
            Ok(true) => Ok(()),
            _ => Err(file
                .check_failed()
                .err()
                .unwrap_or_else(|| SpoolError::Failed {
                    recording_id: file.id.to_string(),
                    reason: "spool journal commit failed".to_owned(),
                    exhausted: false,
                })),
        }
    }

    async fn enqueue(
        &self,
        file: &Arc<SpoolFile>,
        offset: u64,
        bytes: Bytes,
        done: Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> Result<(), SpoolError> {
        let cost = u32::try_from(bytes.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        let gone = || SpoolError::Failed {
            recording_id: file.id.to_string(),
            reason: "spool journal stopped".to_owned(),
            exhausted: false,
        };
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| gone())?;
        let mut append = Append::new(file, offset, bytes, budget);
        append.done = done;
        let queue = self.queue.as_ref().ok_or_else(gone)?;
        queue
            .send(Message::Append(append))
            .await
            .map_err(|_| gone())
    }
}

struct Segment {
    path: PathBuf,
    file: File,
    /// Bytes of records in it (the file can be longer: zero padding of direct writes).
    len: u64,
    opened: Instant,
    /// Opened with `O_DIRECT`: writes are whole blocks ([`DIRECT_ALIGN`]) from aligned memory.
    direct: bool,
}

impl Segment {
    fn create(dir: &Path, seq: u64) -> Result<Self, SpoolError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(format!("{seq:016}.wal"));
        let open = |flags| {
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .custom_flags(flags)
                .open(&path)
        };
        // File systems without direct I/O (some tmpfs, FUSE) refuse the flag: write through
        // the page cache there.
        let (file, direct) = match open(nix::libc::O_DIRECT) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                let _ = fs::remove_file(&path);
                (
                    open(0).map_err(io_err("create journal segment", &path))?,
                    false,
                )
            }
            Err(e) => return Err(io_err("create journal segment", &path)(e)),
        };
        fsync_dir(dir)?;
        Ok(Self {
            path,
            file,
            len: 0,
            opened: Instant::now(),
            direct,
        })
    }
}

/// Block size and memory alignment of the journal's direct writes; a multiple of every common
/// logical block size (512 B, 4 KiB).
const DIRECT_ALIGN: usize = 4096;

/// The bytes of one commit round, in memory aligned for direct writes. Between rounds it holds
/// the segment's last partial block (the tail), which the next round writes again in front of
/// its own records: a direct write covers whole blocks only.
struct RoundBuf {
    raw: Vec<u8>,
    /// Where the contents start in `raw`: the first [`DIRECT_ALIGN`] boundary.
    at: usize,
}

impl RoundBuf {
    fn new() -> Self {
        Self {
            raw: Vec::new(),
            at: 0,
        }
    }

    fn len(&self) -> usize {
        self.raw.len() - self.at
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.at..]
    }

    /// Room for `more` bytes after the contents, so appending them moves nothing; a new
    /// allocation is aligned afresh and takes the contents along.
    fn reserve(&mut self, more: usize) {
        if self.is_aligned() && self.raw.capacity() - self.raw.len() >= more {
            return;
        }
        let mut raw: Vec<u8> = Vec::with_capacity(self.len() + more + DIRECT_ALIGN);
        let at = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        raw.resize(at, 0);
        raw.extend_from_slice(self.bytes());
        *self = Self { raw, at };
    }

    fn is_aligned(&self) -> bool {
        (self.bytes().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
    }

    /// Keeps the first `len` bytes of the contents.
    fn truncate(&mut self, len: usize) {
        self.raw.truncate(self.at + len);
    }

    /// Keeps the bytes from `from` on, moved to the front.
    fn keep_from(&mut self, from: usize) {
        let end = self.raw.len();
        self.raw.copy_within(self.at + from..end, self.at);
        self.raw.truncate(end - from);
    }
}

fn run_writer(
    dir: PathBuf,
    mut segment: Segment,
    mut rx: mpsc::Receiver<Message>,
    data: &std::sync::mpsc::SyncSender<DataMessage>,
    unwritten: &AtomicU64,
    commit_seconds: &Histogram,
) {
    let mut seq = segment_seq(&segment.path).unwrap_or(0);
    let mut spare = Spare::prepare(&dir, seq + 1);
    let mut messages = Vec::with_capacity(ROUND_APPENDS);
    let mut buf = RoundBuf::new();
    while rx.blocking_recv_many(&mut messages, ROUND_APPENDS) > 0 {
        let mut ticked = false;
        let mut batch: Vec<Append> = messages
            .drain(..)
            .filter_map(|m| match m {
                Message::Append(append) => Some(append),
                Message::Tick => {
                    ticked = true;
                    None
                }
            })
            .collect();
        // A failed recording takes no more data records: its held bytes and data file must
        // stay a gapless prefix. Its end record still goes in.
        batch.retain(|a| a.is_metadata() || a.file.failure().is_none());
        if !batch.is_empty() {
            let started = Instant::now();
            let committed = commit(&mut segment, &mut batch, &mut buf, &dir, unwritten);
            commit_seconds.observe(started.elapsed().as_secs_f64());
            if started.elapsed() > SLOW_COMMIT {
                tracing::warn!(appends = batch.len(), bytes = buf.len(), took = ?started.elapsed(), "slow journal commit");
            }
            if committed {
                for append in &mut batch {
                    append.segment = seq;
                }
                if data.send(DataMessage::Batch(batch)).is_err() {
                    tracing::error!("spool data writer stopped; data files no longer grow");
                }
            }
            // Not committed: the records were never acked and are dropped here; their streams
            // have been failed.
        }
        if ticked {
            let _ = data.try_send(DataMessage::Tick);
        }
        let aged = segment.len > 0 && segment.opened.elapsed() >= SEGMENT_MAX_AGE;
        if segment.len >= SEGMENT_BYTES || aged {
            // The next segment is created ahead on its own thread: creating a file and fsyncing
            // the directory can take many milliseconds, and every ack would wait for it here.
            // Only a segment far past its size waits for the spare.
            let must = segment.len >= 2 * SEGMENT_BYTES;
            match spare.take(must) {
                Some(Ok(mut next)) => {
                    next.opened = Instant::now();
                    let old = std::mem::replace(&mut segment, next);
                    // The old segment's partial last block is not the new one's.
                    buf.truncate(0);
                    let _ = data.send(DataMessage::Rotated {
                        seq,
                        path: old.path,
                    });
                    seq += 1;
                    spare = Spare::prepare(&dir, seq + 1);
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "cannot create the next journal segment; the current one keeps growing");
                    spare = Spare::prepare(&dir, seq + 1);
                }
                None => {}
            }
        }
    }
    // A spare still being created would otherwise race the next start's replay.
    let _ = spare.take(true);
}

/// The next journal segment, being created on a helper thread.
struct Spare(Option<std::thread::JoinHandle<Result<Segment, SpoolError>>>);

impl Spare {
    fn prepare(dir: &Path, seq: u64) -> Self {
        let dir = dir.to_owned();
        let handle = std::thread::Builder::new()
            .name("spool-segment".to_owned())
            .spawn(move || Segment::create(&dir, seq));
        match handle {
            Ok(handle) => Self(Some(handle)),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the journal segment helper");
                Self(None)
            }
        }
    }

    /// The spare segment once it is ready (or, with `wait`, after waiting for it); `None` while
    /// it is still being created.
    fn take(&mut self, wait: bool) -> Option<Result<Segment, SpoolError>> {
        if !wait && !self.0.as_ref().is_some_and(|h| h.is_finished()) {
            return self.0.is_none().then(|| Err(helper_gone()));
        }
        let handle = self.0.take()?;
        Some(handle.join().unwrap_or_else(|_| Err(helper_gone())))
    }
}

fn helper_gone() -> SpoolError {
    SpoolError::Io {
        op: "create journal segment",
        path: PathBuf::from("journal"),
        source: std::io::Error::other("segment helper thread failed"),
    }
}

/// The data-writer thread's state (see the module doc).
struct DataWriter {
    /// Per segment, the recordings with data records in it and where their last one ends:
    /// a checkpoint needs each in its data file (or the recording removed).
    touched: BTreeMap<u64, HashMap<String, (Arc<SpoolFile>, u64)>>,
    /// Recordings with metadata records per segment (true: it was opened there), whose files
    /// and directory entries the checkpoint makes durable.
    metadata: BTreeMap<u64, HashMap<String, (Arc<SpoolFile>, bool)>>,
    /// The checkpoint thread: segments are checkpointed and deleted one at a time, in order,
    /// so a segment never outlives a later one (replay relies on it).
    checkpoints: std::sync::mpsc::SyncSender<Checkpoint>,
    checkpoint_thread: Option<std::thread::JoinHandle<()>>,
    /// Rotated segments waiting for their checkpoint, oldest first, with when they rotated.
    rotated: VecDeque<(u64, PathBuf, Instant)>,
    /// When a spill last failed: the next try waits [`DATA_RETRY`].
    spill_failed: Option<Instant>,
    /// Committed payload bytes not in data files: held in memory, or on their way to be
    /// (shared with the journal writer, which keeps disk space for them).
    unwritten: Arc<AtomicU64>,
    dir: PathBuf,
    /// [`RETAIN_MAX_BYTES`] or the memory share, whichever is less.
    memory_budget: u64,
}

impl DataWriter {
    fn new(dir: PathBuf, unwritten: Arc<AtomicU64>) -> Self {
        let (checkpoints, jobs) = std::sync::mpsc::sync_channel::<Checkpoint>(CHECKPOINT_QUEUE);
        let journal_dir = dir.clone();
        let started = std::thread::Builder::new()
            .name("spool-checkpoint".to_owned())
            .spawn(move || {
                // Its fsyncs are background work: acks never wait on a checkpoint.
                crate::background::lower_priority();
                while let Ok(job) = jobs.recv() {
                    job.run(&journal_dir);
                }
            });
        let checkpoint_thread = started
            .inspect_err(|e| tracing::error!(error = %e, "cannot start the journal checkpoint thread; segments stay until the next start"))
            .ok();
        Self {
            unwritten,
            metadata: BTreeMap::new(),
            checkpoints,
            checkpoint_thread,
            touched: BTreeMap::new(),
            rotated: VecDeque::new(),
            spill_failed: None,
            dir,
            memory_budget: memory_budget(),
        }
    }

    fn run(mut self, rx: &std::sync::mpsc::Receiver<DataMessage>) {
        while let Ok(message) = rx.recv() {
            match message {
                DataMessage::Batch(batch) => {
                    for append in batch {
                        self.take(append);
                    }
                }
                DataMessage::Rotated { seq, path } => {
                    self.rotated.push_back((seq, path, Instant::now()));
                }
                DataMessage::Tick => super::trim_pool(),
            }
            self.checkpoint_ready();
        }
        // Stopping: let queued checkpoints finish, so the next start never races one. Held
        // bytes stay in their segments, which the next start replays.
        let Self {
            checkpoints,
            checkpoint_thread,
            ..
        } = self;
        drop(checkpoints);
        if let Some(thread) = checkpoint_thread {
            let _ = thread.join();
        }
    }

    /// Takes one committed record: a data record is held in memory, a metadata record booked
    /// for its segment's checkpoint.
    fn take(&mut self, append: Append) {
        if append.offset == REMOVED_OFFSET {
            return;
        }
        let id = append.file.id.as_str();
        if append.is_metadata() {
            let opened = append.offset == META_OFFSET;
            let entry = self
                .metadata
                .entry(append.segment)
                .or_default()
                .entry(id.to_owned())
                .or_insert_with(|| (append.file.clone(), false));
            entry.1 |= opened;
            return;
        }
        let end = append.offset + append.bytes.len() as u64;
        match append.file.hold(append.offset, &append.bytes) {
            Ok(released) => unhold(&self.unwritten, released),
            Err(e) => {
                // Cannot happen (one recording's records come in offset order, and none after
                // a failed one); the segment keeps the record until its checkpoint spills.
                tracing::error!(recording_id = %append.file.id, error = %e, "spool record out of order");
                append.file.fail_io("spool record out of order", &e);
            }
        }
        let entry = self
            .touched
            .entry(append.segment)
            .or_default()
            .entry(id.to_owned())
            .or_insert_with(|| (append.file.clone(), end));
        entry.1 = entry.1.max(end);
    }

    /// Bytes the journal may hold in memory and in retained segments: the memory budget, and
    /// at most a share of the spool disk's free space.
    fn retention_budget(&self) -> u64 {
        let disk = free_bytes(&self.dir).map_or(0, |free| free / RETAIN_DISK_SHARE);
        self.memory_budget.min(disk)
    }

    /// Checkpoints rotated segments, oldest first: each as soon as every recording in it is
    /// removed or in its data file; else once it is due (too old, or the journal holds more
    /// than its budget), after spilling what its recordings hold up to their records in it.
    fn checkpoint_ready(&mut self) {
        let mut budget = None;
        while let Some((seq, _, rotated_at)) = self.rotated.front() {
            let seq = *seq;
            let files = self.touched.get(&seq);
            let spill: Vec<(Arc<SpoolFile>, u64)> = files
                .into_iter()
                .flat_map(|files| files.values())
                .filter(|(file, end)| file.holds_before(*end))
                .cloned()
                .collect();
            if !spill.is_empty() {
                let budget = *budget.get_or_insert_with(|| self.retention_budget());
                let due = rotated_at.elapsed() >= RETAIN_AGE
                    || self.unwritten.load(Ordering::Acquire) > budget;
                let retry_wait = self
                    .spill_failed
                    .is_some_and(|failed| failed.elapsed() < DATA_RETRY);
                if !due || retry_wait {
                    return;
                }
                for (file, end) in spill {
                    match file.spill(end) {
                        Ok(spilled) => unhold(&self.unwritten, spilled),
                        Err(e) => {
                            tracing::error!(recording_id = %file.id, error = %e, "cannot write the spool data file; retrying every second, the journal keeps the bytes");
                            file.fail_io("spool data write failed", &e);
                            self.spill_failed = Some(Instant::now());
                            return;
                        }
                    }
                }
                self.spill_failed = None;
            }
            let Some((_, path, _)) = self.rotated.pop_front() else {
                return;
            };
            let job = Checkpoint {
                segment: path,
                files: self
                    .touched
                    .remove(&seq)
                    .unwrap_or_default()
                    .into_values()
                    .map(|(file, _)| file)
                    .collect(),
                metadata: self
                    .metadata
                    .remove(&seq)
                    .unwrap_or_default()
                    .into_values()
                    .collect(),
            };
            if self.checkpoints.send(job).is_err() {
                tracing::warn!(
                    "journal checkpoint thread stopped; segments stay until the next start"
                );
            }
        }
    }
}

/// Takes `bytes` that need no data-file write any more off `unwritten`.
fn unhold(unwritten: &AtomicU64, bytes: u64) {
    if bytes > 0 {
        let _ = unwritten.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            Some(u.saturating_sub(bytes))
        });
    }
}

/// The most the journal holds in memory (and in segments kept for it): what a burst of
/// recordings at full speed takes to be stored and finalized (a 1 GiB `cat` through the
/// gateway: about 1.1 GiB), so that its bytes are never written a second time.
pub const RETAIN_MAX_BYTES: u64 = 2 << 30;

/// The journal holds at most this share (1/8) of the machine's memory: the page cache did
/// the same job before, and the rest of the node must fit beside it.
const RETAIN_MEMORY_SHARE: u64 = 8;

/// ... and at most this share (1/4) of the spool disk's free space: each held byte may have
/// to go into its data file, next to its segment, and new commits need room.
const RETAIN_DISK_SHARE: u64 = 4;

/// A rotated segment is checkpointed this long after it rotated at the latest, its held
/// bytes spilled: bounds what a long recording holds in memory and what a replay reads.
pub const RETAIN_AGE: Duration = Duration::from_secs(60);

/// [`RETAIN_MAX_BYTES`] or the memory share, whichever is less; nothing (every segment
/// spilled at once, as without holding) when the machine's memory cannot be read.
pub(crate) fn memory_budget() -> u64 {
    static BUDGET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(read_memory_budget)
}

fn read_memory_budget() -> u64 {
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib << 10)
        })
        .unwrap_or(0);
    RETAIN_MAX_BYTES.min(memory / RETAIN_MEMORY_SHARE)
}

/// One rotated segment to make redundant and delete.
struct Checkpoint {
    segment: PathBuf,
    files: Vec<Arc<SpoolFile>>,
    metadata: Vec<(Arc<SpoolFile>, bool)>,
}

impl Checkpoint {
    /// Makes the segment's bytes durable in the data files, and its metadata records durable as
    /// files and directory entries, then deletes the segment. On any error the segment stays
    /// (replay at the next start redoes it).
    fn run(self, journal_dir: &Path) {
        for file in &self.files {
            if let Err(e) = file.sync_data_file() {
                tracing::error!(recording_id = %file.id, error = %e, "checkpoint fsync failed; keeping the journal segment");
                return;
            }
        }
        for (file, _) in &self.metadata {
            if let Err(e) = sync_metadata_files(&file.dir) {
                tracing::error!(recording_id = %file.id, error = %e, "checkpoint fsync failed; keeping the journal segment");
                return;
            }
        }
        // New recording directories are entries of the spool root, and so are removed ones
        // whose unwritten bytes go with this segment.
        if (self.metadata.iter().any(|(_, opened)| *opened)
            || self.files.iter().any(|file| file.is_released()))
            && let Some(root) = journal_dir.parent()
            && let Err(e) = fsync_dir(root)
        {
            tracing::error!(error = %e, "checkpoint fsync failed; keeping the journal segment");
            return;
        }
        if let Err(e) = fs::remove_file(&self.segment)
            .map_err(io_err("remove segment", &self.segment))
            .and_then(|()| fsync_dir(journal_dir))
        {
            tracing::warn!(error = %e, "cannot remove a checkpointed journal segment");
        }
    }
}

/// Free space the journal leaves on the spool disk beyond what its committed records still
/// need in their data files: room for file-system metadata, so that every committed record can
/// be written to its data file. A commit that would cut into it fails like a full disk.
pub const DATA_RESERVE_BYTES: u64 = 1 << 20;

/// Writes one batch with one write and one fdatasync, then moves the durable offsets and tells
/// metadata writers. Returns false, with the batch's recordings failed, when the batch could
/// not be committed.
fn commit(
    segment: &mut Segment,
    batch: &mut [Append],
    buf: &mut RoundBuf,
    dir: &Path,
    unwritten: &AtomicU64,
) -> bool {
    // A direct write starts at the block boundary before the end of the records, so the
    // round's buffer starts with the segment's partial last block (kept from the last round).
    let align = if segment.direct { DIRECT_ALIGN } else { 1 };
    let tail = buf.len();
    debug_assert_eq!(tail as u64, segment.len % align as u64);
    let start = segment.len - tail as u64;
    let mut payload = 0;
    let mut size = 0;
    for append in batch.iter() {
        size += record_len(append.file.id.as_str(), &append.bytes);
        if !append.is_metadata() {
            payload += append.bytes.len() as u64;
        }
    }
    buf.reserve(size + align);
    for append in batch.iter() {
        encode(
            &mut buf.raw,
            append.file.id.as_str(),
            append.offset,
            &append.bytes,
        );
    }
    let end = buf.len();
    // Zeros up to the next block boundary; replay stops at them (a zero-length record).
    buf.raw.resize(buf.at + end.next_multiple_of(align), 0);
    // Each committed byte is written twice, here and in its data file: commit only what the
    // disk can still take both times, or a record acked now could never reach its data file.
    let needed =
        buf.len() as u64 + payload + unwritten.load(Ordering::Acquire) + DATA_RESERVE_BYTES;
    let written = if free_bytes(dir).is_some_and(|free| free < needed) {
        Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC))
    } else if segment.direct && !buf.is_aligned() {
        Err(std::io::Error::other(
            "journal buffer is not aligned for direct I/O",
        ))
    } else {
        // Written at an explicit offset and trimmed back on failure, so a segment never holds
        // a torn record with good records after it (replay stops at the first bad record).
        segment
            .file
            .write_all_at(buf.bytes(), start)
            .and_then(|()| segment.file.sync_data())
    };
    let committed = match written {
        Ok(()) => {
            segment.len = start + end as u64;
            buf.truncate(end);
            buf.keep_from(end - end % align);
            unwritten.fetch_add(payload, Ordering::AcqRel);
            for append in batch.iter().filter(|a| !a.is_metadata()) {
                append
                    .file
                    .mark_durable(append.offset + append.bytes.len() as u64);
            }
            true
        }
        Err(e) => {
            buf.truncate(tail);
            let _ = segment.file.set_len(segment.len);
            tracing::error!(path = %segment.path.display(), error = %e, "spool journal write failed; affected streams end with an error");
            for append in batch.iter() {
                append.file.fail_io("journal write failed", &e);
            }
            false
        }
    };
    for append in batch.iter_mut() {
        if let Some(done) = append.done.take() {
            let _ = done.send(committed);
        }
    }
    committed
}

/// Bytes of one encoded record.
fn record_len(id: &str, payload: &[u8]) -> usize {
    8 + 1 + id.len() + 8 + payload.len()
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
    let mut restored: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut replayed = 0u64;
    let mut contents = Vec::with_capacity(segments.len());
    for (_, path) in &segments {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_err("read journal segment", path))?;
        contents.push(data);
    }
    // Recordings finalized and removed: none of their records is replayed.
    let removed: std::collections::HashSet<&str> = contents
        .iter()
        .flat_map(|data| decode(data))
        .filter(|r| r.offset == REMOVED_OFFSET)
        .map(|r| r.id)
        .collect();
    for ((_, path), data) in segments.iter().zip(&contents) {
        let records = decode(data);
        let consumed: usize = records
            .iter()
            .map(|r| 17 + r.id.len() + r.payload.len())
            .sum();
        if consumed < data.len() {
            tracing::warn!(path = %path.display(), torn_bytes = data.len() - consumed, "journal segment ends in a torn record; ignoring it");
        }
        for record in records {
            if removed.contains(record.id) {
                continue;
            }
            let recording = spool_root.join(record.id);
            if record.offset == META_OFFSET {
                // The recording opened here: its directory, meta.json and data file may never
                // have reached the disk. (If it was finalized since, it comes back and the
                // uploader finds its manifest in the store.)
                fs::create_dir_all(&recording)
                    .map_err(io_err("replay recording dir", &recording))?;
                let meta = recording.join("meta.json");
                fs::write(&meta, record.payload).map_err(io_err("replay meta", &meta))?;
                let data = recording.join("data");
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&data)
                    .map_err(io_err("replay data", &data))?;
                files.insert(record.id.to_owned(), Some(file));
                restored.insert(record.id.to_owned());
                continue;
            }
            let file = files.entry(record.id.to_owned()).or_insert_with(|| {
                // No spool directory and no meta record: finalized; its bytes are in the store.
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(recording.join("data"))
                    .ok()
            });
            let Some(file) = file else { continue };
            if record.offset == END_OFFSET {
                let end = recording.join("end.json");
                fs::write(&end, record.payload).map_err(io_err("replay end", &end))?;
                restored.insert(record.id.to_owned());
                continue;
            }
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
    for id in &restored {
        sync_metadata_files(&spool_root.join(id))?;
    }
    if !restored.is_empty() {
        fsync_dir(spool_root)?;
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
    use castvault_storage::keys::{RecordingId, Region};

    /// A data writer on its own thread with `budget` bytes of memory, over the spool at `root`.
    fn data_writer(
        root: &Path,
        budget: u64,
    ) -> (
        std::sync::mpsc::SyncSender<DataMessage>,
        std::thread::JoinHandle<()>,
        Arc<AtomicU64>,
    ) {
        let dir = root.join("journal");
        fs::create_dir_all(&dir).unwrap();
        let unwritten = Arc::new(AtomicU64::new(0));
        let mut writer = DataWriter::new(dir, unwritten.clone());
        writer.memory_budget = budget;
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let thread = std::thread::spawn(move || writer.run(&rx));
        (tx, thread, unwritten)
    }

    fn recording(root: &Path, n: u64) -> Arc<SpoolFile> {
        let id = RecordingId::new(&Region::new("local").unwrap(), n, n);
        let dir = root.join(id.as_str());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("data"), b"").unwrap();
        Arc::new(SpoolFile::new(id, dir, 0, std::sync::Weak::new()))
    }

    /// Segment `seq` with `records` committed to it, as the journal writer hands it on.
    fn committed(
        root: &Path,
        seq: u64,
        records: &[(&Arc<SpoolFile>, u64, &'static [u8])],
        unwritten: &AtomicU64,
    ) -> (DataMessage, PathBuf) {
        let path = root.join("journal").join(format!("{seq:016}.wal"));
        fs::write(&path, b"records").unwrap();
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        let batch = records
            .iter()
            .map(|(file, offset, bytes)| {
                unwritten.fetch_add(bytes.len() as u64, Ordering::AcqRel);
                let permit = budget.clone().try_acquire_many_owned(1).unwrap();
                let mut append = Append::new(file, *offset, Bytes::from_static(bytes), permit);
                append.segment = seq;
                append
            })
            .collect();
        (DataMessage::Batch(batch), path)
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting until {what}");
    }

    #[test]
    fn a_segment_of_finalized_recordings_goes_without_a_data_file_write() {
        let root = tempfile::tempdir().unwrap();
        let (tx, thread, unwritten) = data_writer(root.path(), u64::MAX);
        let (a, b) = (recording(root.path(), 1), recording(root.path(), 2));
        let (batch, segment) = committed(
            root.path(),
            1,
            &[(&a, 0, b"hello\n"), (&b, 0, b"world\n")],
            &unwritten,
        );
        tx.send(batch).unwrap();
        tx.send(DataMessage::Rotated {
            seq: 1,
            path: segment.clone(),
        })
        .unwrap();
        wait_until("both are held", || a.written() == 6 && b.written() == 6);
        // Held, not due: the segment stays, as long as one of its recordings is not removed.
        tx.send(DataMessage::Tick).unwrap();
        assert_eq!(unwritten.fetch_sub(a.release(), Ordering::AcqRel), 12);
        tx.send(DataMessage::Tick).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(segment.exists());
        unwritten.fetch_sub(b.release(), Ordering::AcqRel);
        tx.send(DataMessage::Tick).unwrap();
        wait_until("the segment is deleted", || !segment.exists());
        for file in [&a, &b] {
            assert_eq!(fs::read(file.dir.join("data")).unwrap(), b"");
        }
        assert_eq!(unwritten.load(Ordering::Acquire), 0);
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn a_due_segment_spills_its_held_bytes_first() {
        let root = tempfile::tempdir().unwrap();
        let (tx, thread, unwritten) = data_writer(root.path(), 0);
        let a = recording(root.path(), 1);
        let (batch, first) = committed(root.path(), 1, &[(&a, 0, b"hello\n")], &unwritten);
        tx.send(batch).unwrap();
        tx.send(DataMessage::Rotated {
            seq: 1,
            path: first.clone(),
        })
        .unwrap();
        let (batch, second) = committed(root.path(), 2, &[(&a, 6, b"again\n")], &unwritten);
        tx.send(batch).unwrap();
        tx.send(DataMessage::Tick).unwrap();
        // Over its budget (none): the first segment's bytes go to the data file, then it goes.
        wait_until("the first segment is deleted", || !first.exists());
        let data = fs::read(a.dir.join("data")).unwrap();
        assert!(data.starts_with(b"hello\n"), "{data:?}");
        assert_eq!(a.on_disk(), data.len() as u64);
        assert_eq!(unwritten.load(Ordering::Acquire), 12 - a.on_disk());
        assert!(second.exists());
        drop(tx);
        thread.join().unwrap();
        let all = a.dir.join("data");
        let mut tail = Vec::new();
        let file = File::open(&all).unwrap();
        a.read_into(&file, 0, 12, &mut tail).unwrap();
        assert_eq!(tail, b"hello\nagain\n");
    }

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
