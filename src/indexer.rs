//! The indexer: replays a finalized recording's output through a terminal emulator (`avt`,
//! asciinema's own) to produce
//! - a terminal snapshot at each chunk start (`index.json`): escape sequences that rebuild the
//!   screen as it was, so a player starts at any chunk without replaying the ones before it;
//! - a transcript (`transcript.jsonl.zst`, zstd-compressed JSON lines; earlier indexers wrote
//!   `transcript.jsonl` plain, which is still read): each line the screen showed, escape
//!   sequences gone, with the time it was last on screen, loaded into the catalog's full-text
//!   index.
//!
//! It runs on the background runtime, off the ingest path, one recording at a time, and picks
//! its work from the catalog: finalized recordings without a transcript. A recording another
//! node already indexed is loaded from its stored index instead of replayed.
//!
//! The transcript reads the primary screen only: full-screen programs (editors, pagers, `top`)
//! draw on the alternate screen, which has no scrollback to collect from.

use std::sync::Arc;
use std::time::Duration;

use avt::Terminal;
use avt::observer::Transcript;
use bytes::Bytes;
use castvault_storage::cast::CastHeader;
use castvault_storage::keys::{ObjectKey, RecordingId};
use castvault_storage::manifest::Manifest;
use castvault_storage::reader::{self, ReadError};
use castvault_storage::signing::{INDEX_SEAL_FORMAT, NodeKey};
use castvault_storage::store::{DynStore, Stores};
use castvault_storage::verify::index_digest;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogError, TranscriptLine};
use crate::spool::Tail;
use crate::upload::Uploader;
use std::collections::HashMap;

/// How often the indexer looks for work when nothing woke it.
pub const INDEX_SCAN_EVERY: Duration = Duration::from_secs(2);

/// How often the indexer looks again while the uploader drains staged chunks.
const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// The longest the indexer waits for upload work to pause before each step (a snapshot span of
/// replay, a recording's transcript into the catalog): under sustained load it still indexes
/// about [`SNAPSHOT_BYTES`] a second besides what nice 19 gives it.
const QUIET_MAX: Duration = Duration::from_secs(1);

/// Recordings picked per look; the rest wait for the next.
const INDEX_BATCH: usize = 16;

/// Terminal size when the header gives none (Tailscale sends 0 when it does not know).
const DEFAULT_SIZE: (usize, usize) = (80, 24);

/// Largest terminal the indexer emulates; bigger sizes in a header or resize are clamped, so a
/// hostile header cannot make the emulator allocate without bound.
const MAX_COLS: usize = 1000;
const MAX_ROWS: usize = 500;

pub const INDEX_FORMAT: &str = "castvault-index-2";

/// A snapshot is taken at each chunk start and then every this many raw bytes (at the next
/// line end), so a player starting anywhere replays at most about this much output, and a
/// window of two snapshots' spans reads at most two chunks.
pub const SNAPSHOT_BYTES: usize = 1 << 20;

/// zstd level of stored transcripts: written once, off the ingest path, read on catalog
/// rebuilds and exports.
const TRANSCRIPT_LEVEL: i32 = 3;

/// `index.json`: the screen at each snapshot point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub recording_id: String,
    /// Chunks the index covers.
    pub chunks: u32,
    pub snapshots: Vec<Snapshot>,
    pub transcript_lines: u64,
}

/// The terminal as it was at a line boundary of the recording.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// The chunk holding the next line.
    pub seq: u32,
    /// Raw byte offset of the next line in the recording.
    pub offset: u64,
    /// Time (seconds) of the last event before the next line; later lines all come after.
    pub time: f64,
    pub cols: usize,
    pub rows: usize,
    /// Escape sequences that rebuild the screen, cursor and modes on a fresh terminal.
    pub init: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("store error at {path}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("indexing task failed: {0}")]
    Task(String),
}

fn clamp_size(cols: usize, rows: usize) -> (usize, usize) {
    let or = |v: usize, d: usize| if v == 0 { d } else { v };
    (
        or(cols, DEFAULT_SIZE.0).min(MAX_COLS),
        or(rows, DEFAULT_SIZE.1).min(MAX_ROWS),
    )
}

/// Replays asciicast lines through a terminal, chunk by chunk.
pub struct Replay {
    terminal: Terminal,
    transcript: Transcript,
    time: f64,
    header_seen: bool,
    pub lines: Vec<TranscriptLine>,
}

#[derive(Deserialize)]
struct Event(f64, String, serde_json::Value);

impl Replay {
    /// # Errors
    /// Never in practice: the default size is positive.
    pub fn new() -> Result<Self, avt::InvalidSize> {
        let (cols, rows) = DEFAULT_SIZE;
        Ok(Self {
            terminal: Terminal::with_scrollback(cols, rows, Some(0))?,
            transcript: Transcript::new(),
            time: 0.0,
            header_seen: false,
            lines: Vec::new(),
        })
    }

    /// Continues from a snapshot: a terminal of its size painted by its `init`, past the header.
    ///
    /// # Errors
    /// Never in practice: sizes are clamped to be positive.
    pub fn resume(snapshot: &Snapshot) -> Result<Self, avt::InvalidSize> {
        let (cols, rows) = clamp_size(snapshot.cols, snapshot.rows);
        let mut terminal = Terminal::with_scrollback(cols, rows, Some(0))?;
        terminal.feed(snapshot.init.as_str());
        Ok(Self {
            terminal,
            transcript: Transcript::new(),
            time: snapshot.time,
            header_seen: true,
            lines: Vec::new(),
        })
    }

    /// The terminal as replayed so far.
    pub fn terminal(&self) -> &Terminal {
        &self.terminal
    }

    /// The screen now, as a snapshot at `offset` (in chunk `seq`).
    pub fn snapshot(&self, seq: u32, offset: u64) -> Snapshot {
        let (cols, rows) = self.terminal.size();
        Snapshot {
            seq,
            offset,
            time: self.time,
            cols,
            rows,
            init: self.terminal.dump(),
        }
    }

    /// Feeds whole asciicast lines (the header first, then events). Malformed lines are
    /// skipped: they are kept in the recording byte-exact but show nothing.
    pub fn feed(&mut self, raw: &[u8]) {
        for line in raw.split(|&b| b == b'\n') {
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            if !self.header_seen {
                self.header_seen = true;
                if let Ok(header) = CastHeader::parse(line) {
                    let dim = |k: &str| {
                        header
                            .fields()
                            .get(k)
                            .and_then(serde_json::Value::as_u64)
                            .map_or(0, |v| usize::try_from(v).unwrap_or(0))
                    };
                    let (cols, rows) = clamp_size(dim("width"), dim("height"));
                    self.terminal.resize(cols, rows);
                    continue;
                }
            }
            let Ok(Event(time, code, data)) = serde_json::from_slice::<Event>(line) else {
                continue;
            };
            let Some(data) = data.as_str() else { continue };
            match code.as_str() {
                "o" => {
                    let emitted = self.terminal.feed_with(data, &mut self.transcript);
                    // A line scrolled off by this event was last on screen before it.
                    let shown_at = self.time;
                    self.lines.extend(
                        emitted
                            .into_iter()
                            .map(|text| TranscriptLine { t: shown_at, text }),
                    );
                }
                "r" => {
                    if let Some((cols, rows)) = parse_size(data) {
                        let (cols, rows) = clamp_size(cols, rows);
                        let emitted = self.terminal.resize_with(cols, rows, &mut self.transcript);
                        let shown_at = self.time;
                        self.lines.extend(
                            emitted
                                .into_iter()
                                .map(|text| TranscriptLine { t: shown_at, text }),
                        );
                    }
                }
                _ => {}
            }
            if time.is_finite() && time >= self.time {
                self.time = time;
            }
        }
    }

    /// Ends the replay: the lines still on screen join the transcript at the last time.
    pub fn finish(self) -> Vec<TranscriptLine> {
        let Self {
            terminal,
            transcript,
            time,
            mut lines,
            ..
        } = self;
        lines.extend(
            transcript
                .finish(&terminal)
                .into_iter()
                .map(|text| TranscriptLine { t: time, text }),
        );
        lines
    }
}

/// A resize payload: asciicast's `"COLSxROWS"`.
fn parse_size(data: &str) -> Option<(usize, usize)> {
    let (cols, rows) = data.trim().split_once('x')?;
    Some((cols.trim().parse().ok()?, rows.trim().parse().ok()?))
}

/// Builds a recording's index and transcript by replaying its verified chunks. Memory: one
/// chunk plus the transcript.
///
/// # Errors
/// [`IndexError::Read`] when a chunk is missing or fails verification.
pub async fn build(
    store: &DynStore,
    manifest: &Manifest,
    uploader: &Uploader,
) -> Result<(Index, Vec<TranscriptLine>), IndexError> {
    let mut replay = Replay::new().map_err(|e| IndexError::Task(e.to_string()))?;
    let mut snapshots = Vec::new();
    let body = reader::body_chunks(store.as_ref(), manifest);
    futures::pin_mut!(body);
    let mut seq = 0u32;
    let mut chunk_offset = 0u64;
    while let Some(raw) = body.try_next().await? {
        let mut pos = 0;
        if seq == 0 {
            // The header sets the terminal size the first snapshot starts with.
            pos = line_end(&raw, 0);
            replay.feed(&raw[..pos]);
        }
        while pos < raw.len() {
            snapshots.push(replay.snapshot(seq, chunk_offset + pos as u64));
            let end = line_end(&raw, (pos + SNAPSHOT_BYTES).min(raw.len()) - 1);
            let segment = raw.slice(pos..end);
            uploader.quiet(QUIET_MAX).await;
            replay = tokio::task::spawn_blocking(move || {
                replay.feed(&segment);
                replay
            })
            .await
            .map_err(|e| IndexError::Task(e.to_string()))?;
            pos = end;
        }
        chunk_offset += raw.len() as u64;
        seq += 1;
    }
    let lines = replay.finish();
    let index = Index {
        format: INDEX_FORMAT.to_owned(),
        recording_id: manifest.recording_id.clone(),
        chunks: seq,
        snapshots,
        transcript_lines: lines.len() as u64,
    };
    Ok((index, lines))
}

/// The end (one past the newline) of the line holding byte `at`, or the end of `raw`.
fn line_end(raw: &[u8], at: usize) -> usize {
    raw.get(at..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(raw.len(), |p| at + p + 1)
}

fn store_err(path: &object_store::path::Path) -> impl FnOnce(object_store::Error) -> IndexError {
    let path = path.to_string();
    move |source| IndexError::Store { path, source }
}

/// Reads a recording's stored index, if it has one.
///
/// # Errors
/// Store errors other than not-found.
pub async fn read_index(store: &DynStore, id: &RecordingId) -> Result<Option<Index>, IndexError> {
    let path = ObjectKey::index(id);
    match store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(store_err(&path))?;
            // An index of another format is rebuilt.
            Ok(serde_json::from_slice::<Index>(&bytes)
                .ok()
                .filter(|i| i.format == INDEX_FORMAT))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_err(&path)(e)),
    }
}

pub async fn read_transcript(
    store: &DynStore,
    id: &RecordingId,
) -> Result<Option<Vec<TranscriptLine>>, IndexError> {
    let parse = |text: &[u8]| -> Vec<TranscriptLine> {
        text.split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect()
    };
    let path = ObjectKey::transcript(id);
    match store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(store_err(&path))?;
            let text = tokio::task::spawn_blocking(move || {
                let mut text = Vec::new();
                castvault_storage::chunk::StreamDecoder::new()
                    .and_then(|mut d| d.feed(&bytes, &mut text))
                    .map(|()| text)
            })
            .await
            .map_err(|e| IndexError::Task(e.to_string()))?
            .map_err(|e| IndexError::Task(format!("{path}: {e}")))?;
            return Ok(Some(parse(&text)));
        }
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store_err(&path)(e)),
    }
    // Written uncompressed by earlier indexers.
    let path = ObjectKey::transcript_plain(id);
    match store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(store_err(&path))?;
            Ok(Some(parse(&bytes)))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_err(&path)(e)),
    }
}

/// Indexes one finalized recording: loads its stored index and transcript when present,
/// else builds and stores them; then loads the transcript into the catalog.
///
/// # Errors
/// Read, store and catalog errors.
pub async fn index_recording(
    store: &DynStore,
    catalog: &Arc<Catalog>,
    id: &RecordingId,
    signer: &Signer,
    uploader: &Uploader,
) -> Result<(), IndexError> {
    let stored = match read_index(store, id).await? {
        Some(_) => read_transcript(store, id).await?,
        None => None,
    };
    let lines = match stored {
        Some(lines) => lines,
        None => {
            let manifest = reader::read_manifest(store.as_ref(), id).await?;
            let (index, lines) = build(store, &manifest, uploader).await?;
            let mut text = Vec::new();
            for line in &lines {
                if serde_json::to_writer(&mut text, line).is_ok() {
                    text.push(b'\n');
                }
            }
            // The transcript first: an index without its transcript would be loaded as done.
            let json = serde_json::to_vec(&index).unwrap_or_default();
            // Compressed (it is most of a recording's text again: stored plain it would take
            // several times the space of the recording's own chunks).
            let text = tokio::task::spawn_blocking(move || {
                castvault_storage::chunk::compress(&text, TRANSCRIPT_LEVEL)
            })
            .await
            .map_err(|e| IndexError::Task(e.to_string()))?
            .map_err(|e| IndexError::Task(format!("compressing the transcript: {e}")))?;
            // Sealed last: `castvault verify` checks both outputs against the seal.
            let seal = signer.key.seal_digest(
                INDEX_SEAL_FORMAT,
                &signer.node_id,
                id.as_str(),
                index_digest(&json, &text),
            );
            let path = ObjectKey::transcript(id);
            store
                .put(&path, PutPayload::from(Bytes::from(text)))
                .await
                .map_err(store_err(&path))?;
            let path = ObjectKey::index(id);
            store
                .put(&path, PutPayload::from(Bytes::from(json)))
                .await
                .map_err(store_err(&path))?;
            let path = ObjectKey::index_seal(id);
            store
                .put(&path, PutPayload::from(Bytes::from(seal.to_bytes())))
                .await
                .map_err(store_err(&path))?;
            // Retention may have deleted the recording while it was indexed: its listing then
            // missed these outputs, so they go again here rather than stay behind (retention
            // lists once more after the manifest, for outputs put before this look).
            let manifest = ObjectKey::manifest(id);
            match store.head(&manifest).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    for path in [
                        ObjectKey::transcript(id),
                        ObjectKey::index(id),
                        ObjectKey::index_seal(id),
                    ] {
                        match store.delete(&path).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(store_err(&path)(e)),
                        }
                    }
                    tracing::info!(recording_id = %id, "recording deleted while it was indexed; its index went with it");
                    return Ok(());
                }
                Err(e) => return Err(store_err(&manifest)(e)),
            }
            lines
        }
    };
    uploader.quiet(QUIET_MAX).await;
    catalog.set_transcript(id.to_string(), lines).await?;
    Ok(())
}

/// Recordings in progress indexed at once; others are indexed when they end. Bounds the
/// indexer's memory: one terminal (and a partial line) each.
const LIVE_INDEX_MAX: usize = 64;

/// A recording in progress being indexed: its terminal and how far it has been read.
struct LiveIndex {
    /// Out only while a batch of lines is being fed on the blocking pool.
    replay: Option<Replay>,
    tail: Tail,
}

/// Indexes what has been committed of the recordings this node is receiving: their new whole
/// lines go through their terminal, and the lines that left the screen join the searchable
/// transcript. The full index replaces this once a recording ends.
async fn index_live(
    uploader: &Uploader,
    catalog: &Arc<Catalog>,
    live: &mut HashMap<RecordingId, LiveIndex>,
) {
    let ids = uploader.live_ids();
    live.retain(|id, _| ids.contains(id));
    for id in ids {
        let Some(source) = uploader.live(&id) else {
            continue;
        };
        if !live.contains_key(&id) {
            if live.len() >= LIVE_INDEX_MAX {
                continue;
            }
            let (Ok(tail), Ok(replay)) = (Tail::open(source.file()).await, Replay::new()) else {
                continue;
            };
            live.insert(
                id.clone(),
                LiveIndex {
                    replay: Some(replay),
                    tail,
                },
            );
        }
        let Some(state) = live.get_mut(&id) else {
            continue;
        };
        while let Ok(Some(lines)) = state.tail.next_lines(source.committed()).await {
            let Some(mut replay) = state.replay.take() else {
                break;
            };
            uploader.quiet(QUIET_MAX).await;
            let fed = tokio::task::spawn_blocking(move || {
                replay.feed(&lines);
                let emitted = std::mem::take(&mut replay.lines);
                (replay, emitted)
            })
            .await;
            let Ok((replay, emitted)) = fed else { break };
            state.replay = Some(replay);
            if let Err(e) = catalog.append_transcript(id.to_string(), emitted).await {
                tracing::warn!(recording_id = %id, error = %crate::upload::error_chain(&e), "live indexing failed");
            }
        }
    }
}

/// Who seals the indexer's outputs.
pub struct Signer {
    pub key: Arc<NodeKey>,
    pub node_id: String,
}

/// Runs the indexer until `stop`.
pub async fn run(
    stores: Stores,
    catalog: Arc<Catalog>,
    uploader: Uploader,
    signer: Signer,
    stop: CancellationToken,
) {
    let mut live = HashMap::new();
    loop {
        while uploader.draining_staged() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(DRAIN_WAIT) => {}
            }
        }
        index_live(&uploader, &catalog, &mut live).await;
        let todo = match catalog.unindexed(INDEX_BATCH).await {
            Ok(todo) => todo,
            Err(e) => {
                tracing::warn!(error = %crate::upload::error_chain(&e), "indexer cannot read the catalog");
                Vec::new()
            }
        };
        for id in &todo {
            if stop.is_cancelled() {
                return;
            }
            let Ok(rid) = RecordingId::parse(id) else {
                continue;
            };
            let started = std::time::Instant::now();
            let Ok(store) = stores.for_id(&rid) else {
                continue;
            };
            match index_recording(store, &catalog, &rid, &signer, &uploader).await {
                Ok(()) => {
                    tracing::debug!(recording_id = %id, seconds = started.elapsed().as_secs_f64(), "indexed")
                }
                Err(e) => {
                    tracing::warn!(recording_id = %id, error = %crate::upload::error_chain(&e), "indexing failed");
                    // Marked so a broken recording is not retried in a loop; a catalog rebuild
                    // retries it.
                    let _ = catalog.set_transcript(id.clone(), Vec::new()).await;
                }
            }
        }
        if todo.len() == INDEX_BATCH {
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = catalog.changed() => {}
            () = tokio::time::sleep(INDEX_SCAN_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_snapshots_and_transcript() {
        let mut replay = Replay::new().unwrap();
        replay.feed(b"{\"version\":2,\"width\":20,\"height\":3}\n[0.5,\"o\",\"\\u001b[31mone\\r\\n\"]\n[1.0,\"o\",\"two\\r\\nthree\\r\\n\"]\n");
        let snap = replay.snapshot(1, 0);
        assert_eq!((snap.cols, snap.rows), (20, 3));
        assert!((snap.time - 1.0).abs() < 1e-9);
        let mut fresh = Terminal::new(20, 3).unwrap();
        fresh.feed(snap.init.as_str());
        let screen: Vec<String> = fresh
            .screen()
            .visible_lines()
            .map(avt::Line::text)
            .collect();
        assert_eq!(screen[0].trim_end(), "two");
        assert_eq!(screen[1].trim_end(), "three");
        replay.feed(b"[2.0,\"r\",\"30x3\"]\n[2.5,\"o\",\"four\\r\\n\"]\nnot json\n");
        let lines = replay.finish();
        let texts: Vec<(&str, f64)> = lines.iter().map(|l| (l.text.as_str(), l.t)).collect();
        assert_eq!(texts[0], ("one", 0.5));
        assert!(texts.iter().any(|(t, _)| *t == "four"));
    }

    #[test]
    fn hostile_sizes_are_clamped() {
        let mut replay = Replay::new().unwrap();
        replay.feed(
            b"{\"version\":2,\"width\":4000000000,\"height\":0}\n[1,\"r\",\"999999x999999\"]\n",
        );
        let snap = replay.snapshot(0, 0);
        assert_eq!((snap.cols, snap.rows), (MAX_COLS, MAX_ROWS));
    }
}
