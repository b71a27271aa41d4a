//! The spool: append-only local files that hold every received byte until its chunk is committed
//! in the store.
//!
//! # Layout
//! ```text
//! {data_dir}/spool/{recording_id}/meta.json     who sent what, written before the first ack
//! {data_dir}/spool/{recording_id}/data          the body exactly as received, append-only
//! {data_dir}/spool/{recording_id}/chunks.jsonl  one manifest chunk entry per committed chunk
//! {data_dir}/spool/{recording_id}/end.json      how the stream ended, written when it ends
//! {data_dir}/spool/{recording_id}/staged-{seq}.zst  a chunk compressed while the store was
//!                                                   out of reach (removed on start)
//! ```
//! None of these is fsynced when written. `meta.json` and `end.json` also go into the journal as
//! metadata records and are durable once committed (before the first ack, and before the final
//! ack); replay rebuilds the directory, `meta.json`, `data` and `end.json` from the journal, and a
//! journal checkpoint fsyncs them and their directory entries before it deletes a segment.
//!
//! # Durability and group commit
//! A stream's bytes go to the shared journal ([`journal`]) only: its one writer thread commits
//! everything queued with a single fdatasync per round, however many streams are writing. After a
//! round the recordings' `durable` offsets move; acks at `spool` level read them. Nothing on the
//! ack path touches a data file: a write to one can sleep for the length of a disk write
//! whenever its inode's table block is being written back (an fsync of any of the 15 other files
//! sharing that block), and on the stream's own task that stalled whole runtime threads.
//!
//! # Held in memory
//! A second thread, the data writer, takes each committed batch and copies every recording's
//! bytes into memory (see `Held`), where the uploader, the live view and the live indexer read
//! them. A recording's bytes reach its `data` file only when the journal needs the segment that
//! holds them back: the segment is old, or the journal holds more than its budget (see
//! [`journal`]). A recording finalized before that never writes its data file: it costs one
//! disk write per byte (the journal's, direct) instead of two, and no copy into page-cache
//! memory (docs/DESIGN-NOTES.md has the measurements). The data file is always the recording's
//! first bytes, and the held bytes follow it without a gap.
//!
//! Offsets: `received` counts bytes handed to the journal, `durable` bytes committed, `written`
//! bytes taken by the data writer (readable), `on_disk` bytes in the data file;
//! `on_disk <= written <= received` and `durable <= received`.

//! # Deletion
//! A recording's directory is removed only after its manifest is committed in the store, which
//! implies all of its chunks are.
//!
//! # Recovery
//! On start the journal is replayed into the data files first (see [`journal`]): a segment is
//! deleted only once its records are in their data files or their recordings removed, so held
//! bytes are replayed. Then every directory left is a recording that was not finalized, and
//! its `data` holds every acked byte. `chunks.jsonl` is not fsynced: a torn last line is
//! ignored and chunks it misses are found in the store and checked byte for byte against `data`
//! (see `upload`). No `end.json` means the stream was cut by the crash: status `interrupted`.
//! A directory without `meta.json` never acked a byte and is removed.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use castvault_storage::keys::RecordingId;
use castvault_storage::manifest::ChunkEntry;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

pub mod journal;

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool file of {recording_id} failed earlier: {reason}")]
    Failed {
        recording_id: String,
        reason: String,
        /// The failure was a full disk (or quota, or descriptors).
        exhausted: bool,
    },
}

impl SpoolError {
    /// True when the node is out of a resource (disk space, quota, file descriptors): the
    /// client should try its next recorder rather than treat this node as broken.
    pub fn is_resource_exhausted(&self) -> bool {
        match self {
            Self::Io { source, .. } => exhausted(source),
            Self::Failed { exhausted, .. } => *exhausted,
        }
    }
}

/// True for the I/O errors of a node out of a resource.
fn exhausted(e: &io::Error) -> bool {
    use nix::libc::{EDQUOT, EMFILE, ENFILE, ENOSPC};
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT | EMFILE | ENFILE))
}

/// What is known about a recording when it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordingMeta {
    pub recording_id: String,
    pub node_id: String,
    pub zone: String,
    pub protocol: String,
    pub peer: Option<String>,
    /// The uploader's identity from admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<castvault_storage::manifest::Sender>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// The header object as received.
    pub header: serde_json::Value,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamOutcome {
    /// The client ended the body cleanly.
    Complete,
    /// The stream broke or was refused part-way.
    Interrupted,
}

/// Contents of `end.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamEnd {
    pub outcome: StreamOutcome,
    pub reason: Option<String>,
    pub bytes: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub ended_at: OffsetDateTime,
}

/// Name of the journal directory inside the spool root.
const JOURNAL_DIR: &str = "journal";

/// Names of staged chunk files in a recording's directory.
const STAGED_PREFIX: &str = "staged-";

/// The node's spool directory and its journal.
#[derive(Clone)]
pub struct Spool {
    root: PathBuf,
    journal: Arc<journal::Journal>,
}

/// One recording's spool files. No descriptor is held between operations (see `open_data`).
pub struct SpoolFile {
    pub id: RecordingId,
    dir: PathBuf,
    received: AtomicU64,
    /// Bytes the data writer has taken: readable, from the data file or held in memory.
    written: AtomicU64,
    /// Appends handed to the journal and not yet taken by the data writer or dropped.
    in_flight: AtomicU64,
    /// The journal, for the removal record.
    journal: std::sync::Weak<journal::Journal>,
    /// Notified when `in_flight` drops to zero, once armed by [`SpoolFile::notify_when_settled`].
    on_settled: OnceLock<Arc<tokio::sync::Notify>>,
    durable: watch::Sender<u64>,
    failed: OnceLock<(String, bool)>,
    /// Bytes the store holds in committed chunks ([`SpoolFile::mark_stored`]).
    stored: AtomicU64,
    /// Bytes whose cached pages a checkpoint has dropped (all clean then, so all dropped).
    dropped: AtomicU64,
    /// A drop started by [`SpoolFile::mark_stored`] is running.
    dropping: std::sync::atomic::AtomicBool,
    /// Committed bytes not yet in the data file (see "Held in memory" in the module doc).
    held: Mutex<Held>,
}

impl Spool {
    /// Opens (creating) the spool root, replays its journal into the data files and starts
    /// the journal writer.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the directory cannot be created or the journal not replayed.
    pub fn open(root: PathBuf) -> Result<Self, SpoolError> {
        fs::create_dir_all(&root).map_err(|source| SpoolError::Io {
            op: "create spool dir",
            path: root.clone(),
            source,
        })?;
        let journal_dir = root.join(JOURNAL_DIR);
        let last_seq = journal::replay(&journal_dir, &root)?;
        let journal = Arc::new(journal::Journal::start(journal_dir, last_seq)?);
        Ok(Self { root, journal })
    }

    /// Appends bytes to a recording through the journal. They become durable (and ackable) at
    /// its next commit, and readable from the data file ([`SpoolFile::written`]) soon after.
    ///
    /// # Errors
    /// [`SpoolError`] on a write error (the file is then failed for good).
    pub async fn append(&self, file: &Arc<SpoolFile>, bytes: Bytes) -> Result<(), SpoolError> {
        file.check_failed()?;
        // Nothing to make durable (an empty HTTP/2 DATA frame, an empty chunk): no record.
        if bytes.is_empty() {
            return Ok(());
        }
        // One stream appends to its file, one call at a time: offsets follow each other.
        let offset = file
            .received
            .fetch_add(bytes.len() as u64, Ordering::AcqRel);
        self.journal.append(file, offset, bytes).await
    }

    /// The journal's commit-round durations.
    pub fn commit_seconds(&self) -> Arc<crate::metrics::Histogram> {
        self.journal.commit_seconds.clone()
    }

    /// Free bytes on the spool's filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }

    /// Creates a recording's spool directory with its `meta.json`, durable before returning.
    ///
    /// # Errors
    /// [`SpoolError::Io`] on any file error (disk full included).
    pub async fn create(
        &self,
        id: RecordingId,
        meta: RecordingMeta,
    ) -> Result<Arc<SpoolFile>, SpoolError> {
        let dir = self.root.join(id.as_str());
        let meta = Bytes::from(serde_json::to_vec(&meta).unwrap_or_default());
        let meta_file = meta.clone();
        let journal = Arc::downgrade(&self.journal);
        // No fsync here: the journal's meta record makes all of this durable with the next
        // commit round, and replay recreates it from that record.
        let file = blocking(move || {
            fs::create_dir(&dir).map_err(io_err("create recording dir", &dir))?;
            let path = dir.join("meta.json");
            fs::write(&path, &meta_file).map_err(io_err("write meta", &path))?;
            let path = dir.join("data");
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(io_err("create data", &path))?;
            Ok(SpoolFile::new(id, dir, 0, journal))
        })
        .await?;
        let file = Arc::new(file);
        if let Err(e) = self
            .journal
            .commit_metadata(&file, journal::META_OFFSET, meta)
            .await
        {
            // Never acked: leave nothing for the next start to resume.
            let _ = file.remove().await;
            return Err(e);
        }
        Ok(file)
    }

    /// Records how the stream ended (`end.json`), durable before returning.
    ///
    /// # Errors
    /// [`SpoolError`] on a file error or when the journal cannot commit it.
    pub async fn finish(&self, file: &Arc<SpoolFile>, end: &StreamEnd) -> Result<(), SpoolError> {
        let bytes = Bytes::from(serde_json::to_vec(end).unwrap_or_default());
        let path = file.dir.join("end.json");
        let contents = bytes.clone();
        blocking(move || fs::write(&path, &contents).map_err(io_err("write end", &path))).await?;
        self.journal
            .commit_metadata(file, journal::END_OFFSET, bytes)
            .await
    }

    /// Recordings left in the spool by an earlier run, oldest first.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the spool directory cannot be read.
    pub fn recover(&self) -> Result<Vec<Recovered>, SpoolError> {
        let entries = fs::read_dir(&self.root).map_err(io_err("read spool dir", &self.root))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == JOURNAL_DIR {
                continue;
            }
            let Ok(id) = RecordingId::parse(&name) else {
                tracing::warn!(path = %dir.display(), "ignoring unknown entry in spool");
                continue;
            };
            let meta = match fs::read(dir.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<RecordingMeta>(&b).ok())
            {
                Some(meta) => meta,
                None => {
                    tracing::warn!(recording_id = %id, "removing spool dir without meta.json (nothing was acked)");
                    fs::remove_dir_all(&dir).map_err(io_err("remove spool dir", &dir))?;
                    continue;
                }
            };
            let end = fs::read(dir.join("end.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<StreamEnd>(&b).ok());
            let path = dir.join("data");
            let len = fs::metadata(&path)
                .map_err(io_err("stat data", &path))?
                .len();
            let chunks = read_chunk_log(&dir.join("chunks.jsonl"));
            remove_staged(&dir);
            found.push(Recovered {
                file: Arc::new(SpoolFile::new(id, dir, len, Arc::downgrade(&self.journal))),
                meta,
                end,
                chunks,
            });
        }
        found.sort_by(|a, b| a.file.id.cmp(&b.file.id));
        Ok(found)
    }
}

/// A recording found in the spool at start.
pub struct Recovered {
    pub file: Arc<SpoolFile>,
    pub meta: RecordingMeta,
    pub end: Option<StreamEnd>,
    pub chunks: Vec<ChunkEntry>,
}

impl SpoolFile {
    fn new(
        id: RecordingId,
        dir: PathBuf,
        len: u64,
        journal: std::sync::Weak<journal::Journal>,
    ) -> Self {
        Self {
            id,
            dir,
            journal,
            received: AtomicU64::new(len),
            written: AtomicU64::new(len),
            in_flight: AtomicU64::new(0),
            on_settled: OnceLock::new(),
            durable: watch::Sender::new(len),
            failed: OnceLock::new(),
            stored: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropping: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(Held::new(len)),
        }
    }

    /// The store holds the recording's first `end` bytes in committed chunks: their pages
    /// leave the page cache (see [`SpoolFile::drop_stored_pages`]).
    /// Off the caller's path, at most one at a time per recording.
    pub fn mark_stored(self: &Arc<Self>, end: u64) {
        if self.stored.fetch_max(end, Ordering::AcqRel) >= end
            // Bytes still held in memory have no pages to drop.
            || end.min(self.on_disk()) <= self.dropped.load(Ordering::Acquire) & !(PAGE_BYTES - 1)
            || self.dropping.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(data) = this.open_data(false) {
                this.drop_stored_pages(&data, false);
            }
            this.dropping.store(false, Ordering::Release);
        });
    }

    /// Bytes handed to the journal so far (maybe not yet durable); after the stream has ended,
    /// the recording's length.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Bytes readable with [`SpoolFile::read_at`], from the data file or held in memory.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// True when no append is on its way to the data writer: after the stream has ended, the
    /// whole recording is then readable ([`SpoolFile::written`] is final). Appends the journal
    /// could not commit are dropped, never taken, so a failed stream settles too.
    pub fn settled(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Notifies `notify` once the file has settled (now, if it has). For after the stream
    /// ended: before that, settling happens after every commit and nobody needs to hear of it.
    pub fn notify_when_settled(&self, notify: Arc<tokio::sync::Notify>) {
        let notify = self.on_settled.get_or_init(|| notify);
        // Pairs with the fence in `append_done`: either it sees the hook or this sees zero.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.settled() {
            notify.notify_one();
        }
    }

    /// One append is done with (written or dropped).
    fn append_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            std::sync::atomic::fence(Ordering::SeqCst);
            if let Some(notify) = self.on_settled.get() {
                notify.notify_one();
            }
        }
    }

    /// Bytes fsynced so far.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(|(reason, _)| reason.as_str())
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds a committed record in memory (the data writer, in offset order). Returns the
    /// bytes that leave the journal's retention at once: all of them for a removed recording.
    fn hold(&self, offset: u64, bytes: &[u8]) -> io::Result<u64> {
        let mut held = self.held();
        if offset != held.end() {
            return Err(io::Error::other(format!(
                "record at {offset} does not follow the held bytes, which end at {}",
                held.end()
            )));
        }
        let len = bytes.len();
        held.push(bytes);
        let (end, released) = (held.end(), held.released);
        drop(held);
        self.written.store(end, Ordering::Release);
        Ok(if released { len as u64 } else { 0 })
    }

    /// Bytes of the recording in its data file; the rest is held in memory.
    pub fn on_disk(&self) -> u64 {
        self.held().start
    }

    /// Writes the held bytes up to `upto` (or the end of the piece it falls in) into the data
    /// file and stops holding them. Returns the bytes that leave the journal's retention. The
    /// lock is not held while writing: readers go on reading held bytes until they are in the
    /// file. Only the data writer calls it.
    fn spill(&self, upto: u64) -> io::Result<u64> {
        let (start, pieces) = {
            let held = self.held();
            if upto <= held.start {
                return Ok(0);
            }
            let pieces: Vec<Arc<Piece>> = held
                .pieces
                .iter()
                .take_while(|(at, _)| *at < upto)
                .map(|(_, piece)| piece.clone())
                .collect();
            (held.start, pieces)
        };
        let written = self.write_data(start, &pieces.iter().map(|p| &p.0[..]).collect::<Vec<_>>());
        let mut held = self.held();
        if held.released {
            // Finalized meanwhile (its directory may be gone): nothing more to keep.
            return Ok(0);
        }
        let end = written?;
        while held
            .pieces
            .front()
            .is_some_and(|(at, piece)| at + piece.0.len() as u64 <= end)
        {
            held.pieces.pop_front();
        }
        let spilled = end - held.start;
        held.start = end;
        Ok(spilled)
    }

    /// True when the data file lacks bytes before `end` that are held (not removed).
    fn holds_before(&self, end: u64) -> bool {
        let held = self.held();
        !held.released && held.start < end
    }

    /// The recording was removed: returns the held bytes that leave the journal's retention.
    /// They stay in memory for readers that still follow the recording, until the last goes.
    fn release(&self) -> u64 {
        let mut held = self.held();
        if held.released {
            return 0;
        }
        held.released = true;
        held.bytes()
    }

    /// Writes consecutive pieces into the data file from `offset` on, with as few `pwritev`
    /// calls as the kernel allows, and returns where they end. One write for a run, not one
    /// per piece, also saves the kernel zeroing the rest of each partly written new page.
    fn write_data(&self, offset: u64, pieces: &[&[u8]]) -> io::Result<u64> {
        /// `IOV_MAX` on Linux.
        const IOV_MAX: usize = 1024;
        let file = self.open_data(true)?;
        // Empty pieces (an append that carries no bytes) would make a `pwritev` of nothing
        // return 0, which reads as a failed write.
        let mut slices: Vec<io::IoSlice<'_>> = pieces
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| io::IoSlice::new(p))
            .collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            let n = nix::sys::uio::pwritev(
                &file,
                &rest[..rest.len().min(IOV_MAX)],
                i64::try_from(at).map_err(io::Error::other)?,
            )
            .map_err(io::Error::from)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            at += n as u64;
            io::IoSlice::advance_slices(&mut rest, n);
        }
        Ok(at)
    }

    /// Copies held bytes from `offset` on (up to `len`) into `out`; false when `offset` is
    /// before the held bytes (in the data file).
    fn read_held(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> bool {
        let held = self.held();
        if offset < held.start {
            return false;
        }
        held.copy_out(offset, len, out);
        true
    }

    /// Reads up to `len` bytes from `offset` into `out`: from `data` (the data file) below the
    /// held bytes, from memory from there on. Stops short at the end of what is there.
    fn read_into(&self, data: &File, offset: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let end = offset.saturating_add(len as u64);
        loop {
            let at = offset + out.len() as u64;
            if at >= end {
                return Ok(());
            }
            let limit = {
                let held = self.held();
                if at >= held.start {
                    held.copy_out(at, (end - at) as usize, out);
                    return Ok(());
                }
                held.start.min(end)
            };
            // Below `start` the bytes are in the file for good: `start` only moves forward.
            let from = out.len();
            out.resize(from + (limit - at) as usize, 0);
            let n = data.read_at(&mut out[from..], at)?;
            out.truncate(from + n);
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Reads `len` bytes at `offset`: from memory while they are held, else from the data file.
    ///
    /// # Errors
    /// [`SpoolError::Io`] on a read error or when fewer bytes are there.
    pub async fn read_at(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>, SpoolError> {
        let path = || self.dir.join("data");
        let mut buf = Vec::with_capacity(len);
        if !self.read_held(offset, len, &mut buf) {
            let this = self.clone();
            buf = blocking(move || {
                this.open_data(false)
                    .and_then(|data| this.read_into(&data, offset, len, &mut buf))
                    .map_err(io_err("read data", &this.dir.join("data")))?;
                Ok(buf)
            })
            .await?;
        }
        if buf.len() < len {
            return Err(io_err("read data", &path())(
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        Ok(buf)
    }

    /// Appends a committed chunk's manifest entry to `chunks.jsonl` (not fsynced; see module doc).
    ///
    /// # Errors
    /// [`SpoolError::Io`] on a file error.
    pub async fn log_chunk(self: &Arc<Self>, entry: &ChunkEntry) -> Result<(), SpoolError> {
        let path = self.dir.join("chunks.jsonl");
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        blocking(move || {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err("open chunk log", &path))?;
            f.write_all(&line)
                .map_err(io_err("append chunk log", &path))
        })
        .await
    }

    /// Free bytes on the filesystem of the recording's directory.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    /// Keeps chunk `seq`, compressed while the store was out of reach, so that the drain when
    /// it returns is puts only (see `upload`). Not fsynced and not part of recovery: staged
    /// chunks are removed on start and compressed again from `data`.
    ///
    /// # Errors
    /// [`SpoolError::Io`] on a file error.
    pub async fn stage(self: &Arc<Self>, seq: u32, bytes: Bytes) -> Result<(), SpoolError> {
        let path = self.dir.join(staged_name(seq));
        blocking(move || fs::write(&path, &bytes).map_err(io_err("write staged chunk", &path)))
            .await
    }

    /// A chunk written by [`Self::stage`].
    ///
    /// # Errors
    /// [`SpoolError::Io`] when it cannot be read.
    pub async fn staged(self: &Arc<Self>, seq: u32) -> Result<Bytes, SpoolError> {
        let path = self.dir.join(staged_name(seq));
        blocking(move || {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(io_err("read staged chunk", &path))
        })
        .await
    }

    /// Removes a staged chunk (once its object is committed, or when it is given up).
    pub async fn unstage(self: &Arc<Self>, seq: u32) {
        let path = self.dir.join(staged_name(seq));
        let removed = blocking(move || {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
            .map_err(io_err("remove staged chunk", &path))
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(recording_id = %self.id, error = %e, "cannot remove a staged chunk; it goes with the recording's directory");
        }
    }

    /// The chunk entries logged so far.
    pub async fn chunk_log(self: &Arc<Self>) -> Vec<ChunkEntry> {
        let path = self.dir.join("chunks.jsonl");
        tokio::task::spawn_blocking(move || read_chunk_log(&path))
            .await
            .unwrap_or_default()
    }

    /// Removes the recording's spool directory (after its manifest is committed).
    ///
    /// # Errors
    /// [`SpoolError::Io`] on a file error.
    pub async fn remove(self: &Arc<Self>) -> Result<(), SpoolError> {
        // Tells replay not to rebuild it from its meta record. Not waited for: if it is lost
        // in a crash, the rebuilt recording finds its manifest in the store and goes again.
        let journal = self.journal.upgrade();
        if let Some(journal) = &journal {
            let _ = journal
                .append(self, journal::REMOVED_OFFSET, Bytes::new())
                .await;
        }
        let dir = self.dir.clone();
        blocking(move || fs::remove_dir_all(&dir).map_err(io_err("remove recording dir", &dir)))
            .await?;
        // Only now may the journal drop the segments that hold its unwritten bytes: a
        // directory still there after a crash would come back with a data file that lacks
        // them. The checkpoint that deletes such a segment makes the removal durable first.
        if let Some(journal) = journal {
            journal.released(self.release());
        }
        Ok(())
    }

    /// The recording was removed (see [`SpoolFile::remove`]).
    fn is_released(&self) -> bool {
        self.held().released
    }

    pub(crate) fn check_failed(&self) -> Result<(), SpoolError> {
        match self.failed.get() {
            Some((reason, exhausted)) => Err(SpoolError::Failed {
                recording_id: self.id.to_string(),
                reason: reason.clone(),
                exhausted: *exhausted,
            }),
            None => Ok(()),
        }
    }

    /// Moves the durable offset forward (called by the journal after a commit).
    fn mark_durable(&self, upto: u64) {
        self.durable.send_if_modified(|d| {
            let moved = upto > *d;
            *d = (*d).max(upto);
            moved
        });
    }

    /// Fails the file for good over an I/O error (a full disk is remembered as such) and wakes
    /// everyone waiting on its durable offset.
    fn fail_io(&self, what: &str, e: &io::Error) {
        let _ = self.failed.set((format!("{what}: {e}"), exhausted(e)));
        self.durable.send_modify(|_| {});
    }

    /// fsyncs the data file (journal checkpoint).
    fn sync_data_file(&self) -> Result<(), SpoolError> {
        match self.open_data(true) {
            Ok(data) => {
                data.sync_data()
                    .map_err(io_err("fsync data", &self.dir.join("data")))?;
                self.drop_stored_pages(&data, true);
                Ok(())
            }
            // Finalized meanwhile: its bytes are in the store.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("open data", &self.dir.join("data"))(e)),
        }
    }

    /// Drops the cached pages of bytes the store holds: the uploader has read them, and nothing
    /// else reads a finished chunk's bytes soon (a live indexer that lags reads them from
    /// disk). Called when a chunk is committed, it starts the writeback of those pages that are
    /// dirty and drops the clean ones (the advice skips dirty pages); called by a checkpoint
    /// (`synced`: the file was just fsynced) it drops them all, and later calls start there.
    /// A long recording so keeps about a chunk or two in the page cache instead of its whole
    /// length, and pages freed just before the next ones are needed come back cheaply: writing
    /// a gigabyte into fresh page-cache memory cost 2.3–3.3 s of CPU here, into just-freed
    /// memory 0.2 s (`dd`, both measured on this machine). In a burst that holds every core the
    /// uploader lags, and the data writer's copy costs the fresh rate (docs/DESIGN-NOTES.md).
    fn drop_stored_pages(&self, data: &File, synced: bool) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let stored = self.stored.load(Ordering::Acquire).min(self.on_disk());
        let from = self.dropped.load(Ordering::Acquire) & !(PAGE_BYTES - 1);
        if stored <= from {
            return;
        }
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(stored - from)) else {
            return;
        };
        let advised = posix_fadvise(data, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        if synced && advised.is_ok() {
            self.dropped.fetch_max(stored, Ordering::AcqRel);
        }
    }

    /// Opens the data file for one operation. Holding no descriptor per recording keeps a node
    /// at one descriptor per stream (its socket), whatever the process limit.
    fn open_data(&self, write: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .open(self.dir.join("data"))
    }
}

/// A recording's first held piece has room for this much; each next one for twice the last,
/// up to [`BLOCK_BYTES`]: 10,000 slow streams hold a few KiB each, not a block each.
const FIRST_PIECE_BYTES: usize = 4 << 10;

/// Size of the pieces long recordings are held in, and of the blocks the pool keeps.
const BLOCK_BYTES: usize = 1 << 20;

/// Every [`POOL_TRIM_EVERY`], the pool frees half of the blocks that stayed unused all along.
const POOL_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Free blocks of held memory, kept for the next burst: on a VM that gives freed memory back
/// to its host, touching fresh memory costs several times the copy itself (3.2–3.5 CPU-s per
/// GiB here), so a burst's bytes go into memory the last burst used. Kept up to the journal's
/// memory budget, trimmed when it stays unused (see [`trim_pool`]).
struct Pool {
    free: Vec<Vec<u8>>,
    /// The fewest free blocks since the last trim.
    low: usize,
    trimmed: Option<std::time::Instant>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    low: 0,
    trimmed: None,
});

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn take_block(capacity: usize) -> Vec<u8> {
    if capacity == BLOCK_BYTES {
        let mut pool = pool();
        if let Some(block) = pool.free.pop() {
            pool.low = pool.low.min(pool.free.len());
            return block;
        }
    }
    Vec::with_capacity(capacity)
}

/// Frees half of the pool's blocks that went unused for a whole [`POOL_TRIM_EVERY`] (the data
/// writer calls it every second).
pub(super) fn trim_pool() {
    let freed = {
        let mut pool = pool();
        let due = pool
            .trimmed
            .is_none_or(|at| at.elapsed() >= POOL_TRIM_EVERY);
        if !due {
            return;
        }
        let unused = pool.low / 2;
        let keep = pool.free.len() - unused;
        let freed = pool.free.split_off(keep);
        pool.low = pool.free.len();
        pool.trimmed = Some(std::time::Instant::now());
        freed
    };
    drop(freed);
}

/// A piece of held memory; a full-size block goes back to the pool when the last reader is
/// done with it.
struct Piece(Vec<u8>);

impl Drop for Piece {
    fn drop(&mut self) {
        if self.0.capacity() == BLOCK_BYTES {
            let mut block = std::mem::take(&mut self.0);
            block.clear();
            let mut pool = pool();
            if pool.free.len() < journal::memory_budget() as usize / BLOCK_BYTES {
                pool.free.push(block);
            }
        }
    }
}

/// A recording's committed bytes that are not in its data file: the data writer copies them
/// into memory and holds them there until the recording is finalized (they are never written)
/// or the journal needs their segment back (they are spilled into the data file first). The
/// data file is always the recording's first `start` bytes, and the held bytes follow from
/// there without a gap. Copying frees the receive buffers at once, for the next frames.
struct Held {
    /// Offset of the first held byte.
    start: u64,
    /// Pieces at their offsets, contiguous from `start`; each is full but the last (and one
    /// a spill was writing when the next bytes came).
    pieces: VecDeque<(u64, Arc<Piece>)>,
    /// Capacity of the next piece.
    next_piece: usize,
    /// The recording was removed: its held bytes no longer count in the journal's retention,
    /// and are kept only for readers that still follow it (a [`Tail`]).
    released: bool,
}

impl Held {
    fn new(len: u64) -> Self {
        Self {
            start: len,
            pieces: VecDeque::new(),
            next_piece: FIRST_PIECE_BYTES,
            released: false,
        }
    }

    fn end(&self) -> u64 {
        self.pieces
            .back()
            .map_or(self.start, |(at, piece)| at + piece.0.len() as u64)
    }

    fn bytes(&self) -> u64 {
        self.end() - self.start
    }

    /// Copies `bytes` in after the held ones.
    fn push(&mut self, mut bytes: &[u8]) {
        // The last piece takes more while it has room and no spill is writing it.
        if let Some(piece) = self.pieces.back_mut().and_then(|(_, p)| Arc::get_mut(p)) {
            let n = bytes.len().min(piece.0.capacity() - piece.0.len());
            piece.0.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            let mut block = take_block(self.next_piece);
            self.next_piece = (self.next_piece * 2).min(BLOCK_BYTES);
            let n = bytes.len().min(block.capacity());
            block.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            let at = self.end();
            self.pieces.push_back((at, Arc::new(Piece(block))));
        }
    }

    /// Copies the held bytes from `offset` (at least `start`) on into `out`, up to `len`.
    fn copy_out(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        let end = offset.saturating_add(len as u64).min(self.end());
        let first = self
            .pieces
            .partition_point(|(at, piece)| at + piece.0.len() as u64 <= offset);
        for (at, piece) in self.pieces.range(first..) {
            let at = *at;
            if at >= end {
                break;
            }
            let from = offset.max(at) - at;
            let to = end.min(at + piece.0.len() as u64) - at;
            if from < to {
                out.extend_from_slice(&piece.0[from as usize..to as usize]);
            }
        }
    }
}

/// Page size for [`SpoolFile::drop_stored_pages`]: a partly dropped page is kept, so each drop
/// starts again at the page the last one ended in.
const PAGE_BYTES: u64 = 4096;

/// Bytes a [`Tail`] reads at once.
const TAIL_READ_BYTES: usize = 1 << 20;

/// A partial line longer than this is dropped by a [`Tail`] (its reader never sees it; it is in
/// the recording). Bounds a tail's memory.
const TAIL_MAX_LINE: usize = 8 << 20;

/// Reads a recording as it grows, whole lines at a time (live view, live indexing): held bytes
/// from memory, the rest from its data file. One open handle serves it to the end: it stays
/// valid after the recording is finalized and its spool directory removed, and so do the held
/// bytes it has yet to read.
pub struct Tail {
    spool: Arc<SpoolFile>,
    data: Arc<File>,
    offset: u64,
    carry: Vec<u8>,
}

impl Tail {
    /// # Errors
    /// [`SpoolError::Io`] when the data file cannot be opened.
    pub async fn open(file: &Arc<SpoolFile>) -> Result<Self, SpoolError> {
        let this = file.clone();
        let data = blocking(move || {
            this.open_data(false)
                .map_err(io_err("open data", &this.dir.join("data")))
        })
        .await?;
        Ok(Self {
            spool: file.clone(),
            data: Arc::new(data),
            offset: 0,
            carry: Vec::new(),
        })
    }

    /// Bytes read so far: the lines handed out and the partial line held back.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next whole lines among the recording's first `upto` bytes; `None` when no whole
    /// line is left there yet.
    ///
    /// # Errors
    /// Read errors.
    pub async fn next_lines(&mut self, upto: u64) -> io::Result<Option<Vec<u8>>> {
        while self.offset < upto {
            let want = usize::try_from(upto - self.offset)
                .unwrap_or(usize::MAX)
                .min(TAIL_READ_BYTES);
            let at = self.offset;
            let mut bytes = Vec::new();
            if !self.spool.read_held(at, want, &mut bytes) {
                let (spool, data) = (self.spool.clone(), self.data.clone());
                bytes = tokio::task::spawn_blocking(move || {
                    spool.read_into(&data, at, want, &mut bytes).map(|()| bytes)
                })
                .await
                .map_err(io::Error::other)??;
            }
            if bytes.is_empty() {
                break;
            }
            self.offset += bytes.len() as u64;
            self.carry.extend_from_slice(&bytes);
            if let Some(end) = self.carry.iter().rposition(|&b| b == b'\n') {
                let rest = self.carry.split_off(end + 1);
                return Ok(Some(std::mem::replace(&mut self.carry, rest)));
            }
            if self.carry.len() > TAIL_MAX_LINE {
                self.carry.clear();
            }
        }
        Ok(None)
    }
}

fn read_chunk_log(path: &Path) -> Vec<ChunkEntry> {
    let Ok(text) = fs::read(path) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        // A torn last line (no newline, or unparsable) ends the log.
        let Some(entry) = line
            .strip_suffix(b"\n")
            .and_then(|l| serde_json::from_slice::<ChunkEntry>(l).ok())
        else {
            break;
        };
        if entry.seq as usize != entries.len() {
            break;
        }
        entries.push(entry);
    }
    entries
}

/// fsyncs a recording directory's `meta.json` and `end.json` where present, then the directory
/// itself (its entries). A directory gone meanwhile was finalized: nothing to do.
pub(crate) fn sync_metadata_files(dir: &Path) -> Result<(), SpoolError> {
    for name in ["meta.json", "end.json"] {
        let path = dir.join(name);
        match File::open(&path) {
            Ok(f) => f.sync_all().map_err(io_err("fsync metadata", &path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("open metadata", &path)(e)),
        }
    }
    match fsync_dir(dir) {
        Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Free bytes on the filesystem holding `path`.
fn staged_name(seq: u32) -> String {
    format!("{STAGED_PREFIX}{seq:010}.zst")
}

/// Removes chunks staged before a restart: their hashes were in memory only.
fn remove_staged(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGED_PREFIX)
            && let Err(e) = fs::remove_file(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a staged chunk");
        }
    }
}

pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync dir", dir))
}

pub(crate) fn io_err(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> SpoolError + use<> {
    let path = path.to_owned();
    move |source| SpoolError::Io { op, path, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(SpoolError::Io {
            op: "blocking task",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use castvault_storage::keys::Region;

    fn meta(id: &RecordingId) -> RecordingMeta {
        RecordingMeta {
            recording_id: id.to_string(),
            node_id: "n".into(),
            zone: "z".into(),
            protocol: "v2".into(),
            peer: None,
            sender: None,
            received_at: OffsetDateTime::now_utc(),
            header: serde_json::json!({"version": 2}),
        }
    }

    /// Opens a recording and makes its 14-byte header durable.
    async fn open_with_header(spool: &Spool, id: &RecordingId) -> Arc<SpoolFile> {
        let file = spool.create(id.clone(), meta(id)).await.unwrap();
        spool
            .append(&file, Bytes::from_static(b"{\"version\":2}\n"))
            .await
            .unwrap();
        file.durable().wait_for(|&d| d == 14).await.unwrap();
        file
    }

    /// Waits (up to 5 s) for the data writer to be done with `file`.
    async fn wait_settled(file: &SpoolFile) {
        for _ in 0..500 {
            if file.settled() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("spool file never settled");
    }

    #[tokio::test]
    async fn a_recording_whose_files_never_reached_the_disk_comes_back_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 4, 4);
        let body = b"{\"version\":2}\n[0.1,\"o\",\"x\"]\n";
        {
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            let file = spool.create(id.clone(), meta(&id)).await.unwrap();
            spool.append(&file, Bytes::from_static(body)).await.unwrap();
            let end = StreamEnd {
                outcome: StreamOutcome::Complete,
                reason: None,
                bytes: body.len() as u64,
                ended_at: OffsetDateTime::now_utc(),
            };
            spool.finish(&file, &end).await.unwrap();
            file.durable()
                .wait_for(|&d| d == body.len() as u64)
                .await
                .unwrap();
        }
        // A power cut took everything that was written without an fsync: the directory entry.
        fs::remove_dir_all(dir.path().join(id.as_str())).unwrap();

        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let recovered = spool.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        let r = &recovered[0];
        assert_eq!(r.file.id, id);
        assert_eq!(r.meta.recording_id, id.to_string());
        assert_eq!(
            r.end.as_ref().map(|e| e.outcome),
            Some(StreamOutcome::Complete)
        );
        assert_eq!(r.file.written(), body.len() as u64);
        assert_eq!(r.file.read_at(0, body.len()).await.unwrap(), body);
    }

    #[tokio::test]
    async fn staged_chunks_round_trip_and_are_removed_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 5, 5);
        {
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            let file = open_with_header(&spool, &id).await;
            file.stage(0, Bytes::from_static(b"zero")).await.unwrap();
            file.stage(1, Bytes::from_static(b"one")).await.unwrap();
            assert_eq!(&file.staged(1).await.unwrap()[..], b"one");
            file.unstage(0).await;
            assert!(file.staged(0).await.is_err());
            file.unstage(0).await; // gone already: no error
            wait_settled(&file).await;
        }
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let recovered = spool.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        assert!(recovered[0].file.staged(1).await.is_err());
        let left: Vec<String> = fs::read_dir(dir.path().join(id.as_str()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            left.iter().all(|n| !n.starts_with(STAGED_PREFIX)),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn a_removed_recording_is_not_rebuilt_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 5, 5);
        {
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            let file = open_with_header(&spool, &id).await;
            wait_settled(&file).await;
            file.remove().await.unwrap();
        }
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        assert!(spool.recover().unwrap().is_empty());
        assert!(!dir.path().join(id.as_str()).exists());
    }

    #[tokio::test]
    async fn a_failed_recording_takes_no_more_appends_and_settles() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 1, 2);
        let file = open_with_header(&spool, &id).await;
        file.fail_io("test", &io::Error::other("injected"));
        assert!(matches!(
            spool.append(&file, Bytes::from_static(b"x")).await,
            Err(SpoolError::Failed { .. })
        ));
        wait_settled(&file).await;
        assert_eq!(file.written(), 14);
    }

    #[tokio::test]
    async fn an_empty_append_is_written_as_nothing_and_fails_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 1, 3);
        let file = open_with_header(&spool, &id).await;
        spool.append(&file, Bytes::new()).await.unwrap();
        spool
            .append(&file, Bytes::from_static(b"[0.1,\"o\",\"x\"]\n"))
            .await
            .unwrap();
        file.durable().wait_for(|&d| d == 28).await.unwrap();
        wait_settled(&file).await;
        assert!(file.failure().is_none());
        assert_eq!((file.written(), file.on_disk()), (28, 0));
        assert_eq!(file.spill(28).unwrap(), 28);
        assert_eq!(file.on_disk(), 28);
        // Empty pieces between full ones, and nothing at all.
        let pieces: [&[u8]; 4] = [b"", b"[0.2,", b"", b"\"o\",\"y\"]\n"];
        assert_eq!(file.write_data(28, &pieces).unwrap(), 42);
        assert_eq!(file.write_data(42, &[b""]).unwrap(), 42);
        let data = fs::read(dir.path().join(id.as_str()).join("data")).unwrap();
        assert_eq!(
            &data[..],
            b"{\"version\":2}\n[0.1,\"o\",\"x\"]\n[0.2,\"o\",\"y\"]\n"
        );
    }

    /// Every read of `body` from `file` at a grid of offsets and lengths.
    async fn assert_reads(file: &Arc<SpoolFile>, body: &[u8]) {
        for offset in (0..body.len()).step_by(4999) {
            for len in [1, 5000, 70_000] {
                let len = len.min(body.len() - offset);
                let got = file.read_at(offset as u64, len).await.unwrap();
                assert!(got == body[offset..offset + len], "{offset}+{len}");
            }
        }
        assert!(file.read_at(body.len() as u64 - 1, 2).await.is_err());
    }

    #[tokio::test]
    async fn held_bytes_read_the_same_from_memory_the_file_or_both() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 1, 4);
        let file = open_with_header(&spool, &id).await;
        wait_settled(&file).await;
        // Records across pieces of growing size, up to whole blocks, and past them.
        let mut body = b"{\"version\":2}\n".to_vec();
        let sizes = [
            10,
            FIRST_PIECE_BYTES,
            100,
            BLOCK_BYTES,
            3,
            3 * BLOCK_BYTES / 2,
            7,
        ];
        for (i, n) in sizes.into_iter().enumerate() {
            let mut line = format!("[{i},\"o\",\"").into_bytes();
            line.resize(line.len() + n, b'a' + i as u8);
            line.extend_from_slice(b"\"]\n");
            assert_eq!(file.hold(body.len() as u64, &line).unwrap(), 0);
            body.extend_from_slice(&line);
        }
        let len = body.len() as u64;
        assert!(file.hold(len + 1, b"x").is_err());
        assert_eq!((file.written(), file.on_disk()), (len, 0));
        assert_reads(&file, &body).await;

        let mut tail = Tail::open(&file).await.unwrap();
        let mut lines = Vec::new();
        while let Some(got) = tail.next_lines(len / 3).await.unwrap() {
            lines.extend_from_slice(&got);
        }
        // A spill writes whole pieces: the first one here.
        let spilled = file.spill(20).unwrap();
        assert!(spilled >= 20 && spilled < len, "{spilled}");
        assert_eq!(file.on_disk(), spilled);
        assert!(file.holds_before(len) && !file.holds_before(spilled));
        assert_reads(&file, &body).await;
        while let Some(got) = tail.next_lines(2 * len / 3).await.unwrap() {
            lines.extend_from_slice(&got);
        }
        // Finalized: the directory goes, the held bytes stay for the tail that follows them.
        file.remove().await.unwrap();
        assert_eq!(file.spill(len).unwrap(), 0);
        assert!(!file.holds_before(len));
        while let Some(got) = tail.next_lines(len).await.unwrap() {
            lines.extend_from_slice(&got);
        }
        assert!(lines == body);
    }

    #[tokio::test]
    async fn appends_become_durable_and_survive_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 1, 1);
        let file = spool.create(id.clone(), meta(&id)).await.unwrap();
        let mut durable = file.durable();
        spool
            .append(&file, Bytes::from_static(b"{\"version\":2}\n"))
            .await
            .unwrap();
        spool
            .append(&file, Bytes::from_static(b"[0.1,\"o\",\"x\"]\n"))
            .await
            .unwrap();
        durable.wait_for(|&d| d == 28).await.unwrap();
        // The data writer follows the commit; the file settles with every byte in it.
        wait_settled(&file).await;
        assert_eq!((file.written(), file.received()), (28, 28));
        drop(file);
        // The bytes are held in memory and in the journal: a restart replays them.
        drop(spool);
        let spool = Spool::open(dir.path().to_owned()).unwrap();

        let recovered = spool.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].file.written(), 28);
        assert!(recovered[0].end.is_none());
        assert_eq!(
            recovered[0].file.read_at(14, 14).await.unwrap(),
            b"[0.1,\"o\",\"x\"]\n"
        );
    }

    #[tokio::test]
    async fn journal_replay_restores_acked_bytes_a_data_file_lost() {
        let dir = tempfile::tempdir().unwrap();
        let id = RecordingId::new(&Region::new("local").unwrap(), 2, 2);
        let body = b"{\"version\":2}\n[0.1,\"o\",\"lost in a power cut\"]\n";
        {
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            let file = spool.create(id.clone(), meta(&id)).await.unwrap();
            spool
                .append(&file, Bytes::from_static(&body[..14]))
                .await
                .unwrap();
            spool
                .append(&file, Bytes::from_static(&body[14..]))
                .await
                .unwrap();
            let mut durable = file.durable();
            durable.wait_for(|&d| d == body.len() as u64).await.unwrap();
        }
        // The data file's unsynced pages are gone; the journal was fsynced. First a short file.
        let data = dir.path().join(id.as_str()).join("data");
        let file = OpenOptions::new().write(true).open(&data).unwrap();
        file.set_len(3).unwrap();
        drop(Spool::open(dir.path().to_owned()).unwrap());
        assert_eq!(fs::read(&data).unwrap(), body);

        // Then lost pages inside a file's full length: zeros where acked bytes were.
        let id2 = RecordingId::new(&Region::new("local").unwrap(), 3, 3);
        {
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            let file = spool.create(id2.clone(), meta(&id2)).await.unwrap();
            spool.append(&file, Bytes::from_static(body)).await.unwrap();
            let mut durable = file.durable();
            durable.wait_for(|&d| d == body.len() as u64).await.unwrap();
        }
        let data2 = dir.path().join(id2.as_str()).join("data");
        OpenOptions::new()
            .write(true)
            .open(&data2)
            .unwrap()
            .write_all_at(&[0; 8], 20)
            .unwrap();
        let spool = Spool::open(dir.path().to_owned()).unwrap();
        assert_eq!(fs::read(&data2).unwrap(), body);
        assert_eq!(fs::read(&data).unwrap(), body);
        let recovered = spool.recover().unwrap();
        assert_eq!(recovered.len(), 2, "the journal dir is not a recording");
        assert!(
            recovered
                .iter()
                .all(|r| r.file.written() == body.len() as u64)
        );
    }

    /// xorshift64*, so each case is reproducible from its seed.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
        }
    }

    /// Property: whatever a crash does to the data files (lost tails, lost pages inside) and to
    /// the journal's tail (a torn record), reopening the spool gives back every acked byte.
    #[tokio::test]
    async fn every_acked_byte_survives_any_data_file_damage() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let dir = tempfile::tempdir().unwrap();
            let mut expected = Vec::new();
            {
                let spool = Spool::open(dir.path().to_owned()).unwrap();
                let mut files = Vec::new();
                for r in 0..1 + rng.below(4) {
                    let id = RecordingId::new(&Region::new("local").unwrap(), seed, r);
                    files.push((
                        spool.create(id.clone(), meta(&id)).await.unwrap(),
                        Vec::new(),
                    ));
                }
                for _ in 0..1 + rng.below(60) {
                    let pick = rng.below(files.len() as u64) as usize;
                    let (file, sent) = &mut files[pick];
                    let bytes: Vec<u8> = (0..1 + rng.below(5000))
                        .map(|_| rng.below(256) as u8)
                        .collect();
                    sent.extend_from_slice(&bytes);
                    spool.append(file, Bytes::from(bytes)).await.unwrap();
                }
                for (file, sent) in &files {
                    let mut durable = file.durable();
                    durable.wait_for(|&d| d == sent.len() as u64).await.unwrap();
                    expected.push((dir.path().join(file.id.as_str()).join("data"), sent.clone()));
                }
            }
            // The crash: damage every data file at random, and tear the journal's tail.
            for (path, sent) in &expected {
                let f = OpenOptions::new().write(true).open(path).unwrap();
                match rng.below(3) {
                    0 => f.set_len(rng.below(sent.len() as u64 + 1)).unwrap(),
                    1 if !sent.is_empty() => {
                        let at = rng.below(sent.len() as u64);
                        let len = 1 + rng.below(sent.len() as u64 - at);
                        f.write_all_at(&vec![0; len as usize], at).unwrap();
                    }
                    _ => {}
                }
            }
            let journal_dir = dir.path().join(JOURNAL_DIR);
            for entry in fs::read_dir(&journal_dir).unwrap().flatten() {
                let mut f = OpenOptions::new().append(true).open(entry.path()).unwrap();
                let garbage: Vec<u8> = (0..rng.below(40)).map(|_| rng.below(256) as u8).collect();
                f.write_all(&garbage).unwrap();
            }
            let spool = Spool::open(dir.path().to_owned()).unwrap();
            for (path, sent) in &expected {
                assert_eq!(
                    &fs::read(path).unwrap(),
                    sent,
                    "seed {seed}: {}",
                    path.display()
                );
            }
            assert_eq!(
                spool.recover().unwrap().len(),
                expected.len(),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn chunk_log_stops_at_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |seq| ChunkEntry {
            seq,
            offset: 0,
            raw_len: 1,
            compressed_len: 1,
            stored_sha256: None,
            events: 0,
            malformed_lines: 0,
            first_event_time: None,
            last_event_time: None,
            sha256: String::new(),
            chain: String::new(),
        };
        let mut text = Vec::new();
        for seq in 0..2 {
            text.extend(serde_json::to_vec(&entry(seq)).unwrap());
            text.push(b'\n');
        }
        text.extend(b"{\"seq\":2,\"off");
        fs::write(dir.path().join("log"), text).unwrap();
        assert_eq!(read_chunk_log(&dir.path().join("log")).len(), 2);
    }
}
