//! `castvault import`: brings the recordings of Tailscale's recorder (tsrecorder) into castvault.
//!
//! Sources (shared PROTOCOL.md 5.2):
//! - a directory tsrecorder wrote (`<dst>/<stableNodeID>/<time>.cast`);
//! - an S3 bucket (`s3://BUCKET[/PREFIX]`) with `<stableNodeID>/<RFC3339Nano>.cast` and
//!   `<stableNodeID>/events/<RFC3339Nano>.event` (the Kubernetes API events, each wrapped as
//!   `{"stableID", "event", "timestamp"}`). Events in the same place in a directory are taken
//!   too. Anything else (the `check-write-access` and `.events-exist` markers, tsrecorder's
//!   state directory) is counted as ignored.
//!
//! Each recording is stored like a live one: cut at line ends into chunks, compressed, hashed
//! into the chain, checkpointed and sealed with this node's key, with a manifest (status
//! `imported`, `source` naming the object) and a catalog row. Its bytes stay exactly as
//! tsrecorder wrote them. The home region comes from the same routing rules as live
//! recordings (no failover: a region that is down fails the recording, and a re-run retries it).
//!
//! Identity, idempotency and resume: the recording id's time is the recording's start (the file
//! name's time, else the header's `timestamp`, else the object's modification time) and its
//! random part is a hash of the source key, so a re-run computes the same ids. An id whose
//! manifest exists in any configured region is skipped; an id with objects but no manifest is
//! an import that was interrupted, and its objects are removed and written again. Two imports
//! of the same source must not run at once (the loser's recordings fail and a re-run fixes
//! them).
//!
//! Recordings still being written: tsrecorder writes a `.cast` while the session runs and
//! nothing marks it finished, so an object modified less than `--min-age` ago is skipped and
//! reported; run the import again later to take it.
//!
//! Memory per import job is bounded by one chunk plus one line ([`Config::max_line_bytes`]),
//! read with ranged reads; listing is streamed (twice: once to count for the progress bar).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use castvault_storage::cast::CastHeader;
use castvault_storage::chunk::{self, ChunkEncoder, ChunkStats};
use castvault_storage::keys::{ObjectKey, RecordingId, Region};
use castvault_storage::manifest::{
    CatalogRow, ChunkEntry, HashChain, ImportSource, MANIFEST_FORMAT, Manifest, RecordingStatus,
};
use castvault_storage::store::{
    DynStore, ErrorKind, Stores, error_kind, put_create, put_overwrite,
};
use castvault_storage::{reader, routing};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::Config;

/// Most recordings imported at once. Each job holds at most a chunk and a line in memory and
/// one zstd context; more than a few per core only adds memory.
pub const MAX_JOBS: usize = 64;

/// Jobs by default, per CPU: a job spends most of its time waiting on reads, puts and fsyncs
/// (the bench: 2 CPUs, 8 jobs imported twice as fast as 2), so several per core keep them busy.
const DEFAULT_JOBS_PER_CPU: usize = 4;

/// ... but no more than this by default (memory: about 6 MiB per job with 4 MiB chunks).
const DEFAULT_JOBS_MAX: usize = 16;

/// The default `--jobs`.
pub fn default_jobs() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    (cpus * DEFAULT_JOBS_PER_CPU).min(DEFAULT_JOBS_MAX)
}

/// Imported recordings named per catalog notice (see `ObjectKey::notice`): running nodes list
/// them within a recent-scan period instead of at their next start.
const NOTICE_BATCH: usize = 500;

/// The progress bar is redrawn this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What to import and how.
pub struct Options {
    /// A directory, or `s3://BUCKET[/PREFIX]`.
    pub source: String,
    /// object_store settings of an S3 source (endpoint, region, keys); `AWS_*` otherwise.
    pub source_options: BTreeMap<String, String>,
    /// Objects modified more recently than this are taken to be still being written.
    pub min_age: Duration,
    pub jobs: usize,
    /// Draw a progress bar on stderr (default: when stderr is a terminal).
    pub progress: bool,
    /// Report as JSON lines instead of text.
    pub json: bool,
}

/// What happened to one source object.
#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Outcome {
    Imported {
        id: String,
        bytes: u64,
    },
    Skipped {
        reason: String,
        /// The id it has, when it was imported before.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Failed {
        reason: String,
    },
}

/// The final report's counts.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub recordings_imported: u64,
    pub events_imported: u64,
    pub bytes_imported: u64,
    pub skipped: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// A source: a store and the root the tsrecorder layout starts at.
struct Source {
    store: DynStore,
    root: Option<Path>,
    /// `file:///abs/dir` or `s3://bucket[/prefix]`, to name objects in manifests.
    base: String,
    kind: &'static str,
}

impl Source {
    fn open(spec: &str, options: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            let store = castvault_storage::store::open(&format!("s3://{bucket}"), options)
                .with_context(|| format!("opening {spec}"))?;
            return Ok(Self {
                store,
                root: (!prefix.is_empty()).then(|| Path::from(prefix)),
                base: format!(
                    "s3://{bucket}{}",
                    if prefix.is_empty() {
                        String::new()
                    } else {
                        format!("/{prefix}")
                    }
                ),
                kind: "tsrecorder-s3",
            });
        }
        if !options.is_empty() {
            anyhow::bail!("--source-option applies to s3:// sources only");
        }
        let dir = spec.strip_prefix("file://").unwrap_or(spec);
        let dir = std::fs::canonicalize(dir).with_context(|| format!("source directory {dir}"))?;
        if !dir.is_dir() {
            anyhow::bail!("source {} is not a directory", dir.display());
        }
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        Ok(Self {
            store: Arc::new(store),
            root: None,
            base: format!("file://{}", dir.display()),
            kind: "tsrecorder-dir",
        })
    }

    /// The key below the root, for a listed object.
    fn relative<'a>(&self, path: &'a Path) -> &'a str {
        let full = path.as_ref();
        match &self.root {
            Some(root) => full
                .strip_prefix(root.as_ref())
                .map_or(full, |r| r.trim_start_matches('/')),
            None => full,
        }
    }
}

/// What a listed object is in tsrecorder's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Recording,
    Event,
    Other,
}

fn classify(key: &str) -> Kind {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        [node, file] if !node.is_empty() && file.len() > 5 && file.ends_with(".cast") => {
            Kind::Recording
        }
        [node, "events", file]
            if !node.is_empty() && file.len() > 6 && file.ends_with(".event") =>
        {
            Kind::Event
        }
        _ => Kind::Other,
    }
}

/// The time in a tsrecorder object name (`<RFC3339Nano>.cast`), in unix milliseconds.
fn name_time_ms(key: &str) -> Option<u64> {
    let file = key.rsplit('/').next()?;
    let stem = file.rsplit_once('.')?.0;
    let t = OffsetDateTime::parse(stem, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Go's `time.Time` string form, as the event wrapper's `timestamp`:
/// `2026-07-29 10:44:42.123 +0000 UTC`.
fn go_time_ms(text: &str) -> Option<u64> {
    let mut parts = text.split(' ');
    let (date, clock, offset) = (parts.next()?, parts.next()?, parts.next()?);
    let rfc = format!("{date}T{clock}{}:{}", offset.get(..3)?, offset.get(3..5)?);
    let t = OffsetDateTime::parse(&rfc, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

fn modified_ms(meta: &ObjectMeta) -> u64 {
    u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0)
}

/// The random half of an imported recording's id: stable for a source key.
fn id_random(key: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"castvault-import-v1\0")
        .chain_update(key.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Everything one import job needs.
struct Importer {
    source: Source,
    stores: Stores,
    routing: Vec<routing::Rule>,
    node_id: String,
    zone: String,
    max_chunk_bytes: usize,
    max_line_bytes: usize,
    level: i32,
    actor: crate::retention::Actor,
    min_age: Duration,
    started: OffsetDateTime,
    progress: Progress,
}

#[derive(Default)]
struct Progress {
    done: AtomicU64,
    bytes: AtomicU64,
}

/// `castvault import`. Prints one line per object that was not simply imported (or every
/// object with `--json`) and a final report; returns the totals.
///
/// # Errors
/// When the source or the stores cannot be opened or listed.
pub async fn run(cfg: &Config, options: Options) -> anyhow::Result<Totals> {
    let source = Source::open(&options.source, &options.source_options)?;
    let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
    let actor = crate::cli::actor(cfg, &stores).await?;
    let importer = Arc::new(Importer {
        source,
        stores,
        routing: cfg.routing.clone(),
        node_id: cfg.node_id.clone(),
        zone: cfg.zone.clone(),
        max_chunk_bytes: cfg.chunk.max_bytes,
        max_line_bytes: cfg.max_line_bytes,
        level: cfg.chunk.compression_level,
        actor,
        min_age: options.min_age,
        started: OffsetDateTime::now_utc(),
        progress: Progress::default(),
    });

    // First pass, for the progress bar only: count.
    let (mut total, mut total_bytes) = (0u64, 0u64);
    if options.progress {
        let mut listing = importer.source.store.list(importer.source.root.as_ref());
        while let Some(meta) = listing.try_next().await.context("listing the source")? {
            if classify(importer.source.relative(&meta.location)) != Kind::Other {
                total += 1;
                total_bytes += meta.size;
            }
        }
    }
    let started = Instant::now();
    let bar = options.progress.then(|| {
        let importer = importer.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                draw_bar(&importer.progress, total, total_bytes, started);
            }
        })
    });

    let mut totals = Totals::default();
    let jobs = options.jobs.clamp(1, MAX_JOBS);
    let listing = importer.source.store.list(importer.source.root.as_ref());
    let mut results = listing
        .map(|meta| {
            let importer = importer.clone();
            async move {
                let meta = match meta {
                    Ok(meta) => meta,
                    Err(e) => return Err(anyhow::Error::new(e).context("listing the source")),
                };
                let key = importer.source.relative(&meta.location).to_owned();
                let kind = classify(&key);
                let outcome = match kind {
                    Kind::Other => return Ok((kind, key, None)),
                    Kind::Recording => importer.try_recording(&meta, &key).await,
                    Kind::Event => importer.try_event(&meta, &key).await,
                }
                .unwrap_or_else(|e| Outcome::Failed {
                    reason: format!("{e:#}"),
                });
                importer.progress.done.fetch_add(1, Ordering::Relaxed);
                importer
                    .progress
                    .bytes
                    .fetch_add(meta.size, Ordering::Relaxed);
                Ok((kind, key, Some(outcome)))
            }
        })
        .buffer_unordered(jobs);
    let mut notices: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = std::io::stdout().lock();
    while let Some(result) = results.next().await {
        let (kind, key, outcome) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(bar) = bar {
                    bar.abort();
                }
                return Err(e);
            }
        };
        let Some(outcome) = outcome else {
            totals.ignored += 1;
            continue;
        };
        // Recordings in the catalog now: named in a notice for running nodes. Those imported
        // before are named again, in case the run that imported them stopped before its notice.
        let listed = match &outcome {
            Outcome::Imported { bytes, id } => {
                if kind == Kind::Recording {
                    totals.recordings_imported += 1;
                } else {
                    totals.events_imported += 1;
                }
                totals.bytes_imported += bytes;
                Some(id)
            }
            Outcome::Skipped { id, .. } => {
                totals.skipped += 1;
                id.as_ref()
            }
            Outcome::Failed { .. } => {
                totals.failed += 1;
                None
            }
        };
        if let Some(id) = listed.filter(|_| kind == Kind::Recording) {
            let region = id.rsplit_once('-').map_or("", |(_, r)| r).to_owned();
            let batch = notices.entry(region.clone()).or_default();
            batch.push(id.clone());
            if batch.len() >= NOTICE_BATCH {
                let ids = std::mem::take(batch);
                importer.notify(&region, ids).await;
            }
        }
        if options.progress {
            // Clear the bar's line before printing under it.
            eprint!("\r\x1b[2K");
        }
        let line = if options.json {
            let mut v = serde_json::to_value(&outcome).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("key".to_owned(), key.clone().into());
            }
            Some(v.to_string())
        } else {
            match &outcome {
                Outcome::Imported { .. } => None,
                Outcome::Skipped { reason, .. } => Some(format!("skipped {key}: {reason}")),
                Outcome::Failed { reason } => Some(format!("failed  {key}: {reason}")),
            }
        };
        if let Some(line) = line {
            let _ = writeln!(out, "{line}");
        }
    }
    for (region, ids) in notices {
        if !ids.is_empty() {
            importer.notify(&region, ids).await;
        }
    }
    if let Some(bar) = bar {
        bar.abort();
        draw_bar(&importer.progress, total, total_bytes, started);
        eprintln!();
    }
    let summary = format!(
        "imported {} recordings ({} bytes) and {} events; skipped {}; failed {}; ignored {} other objects",
        totals.recordings_imported,
        totals.bytes_imported,
        totals.events_imported,
        totals.skipped,
        totals.failed,
        totals.ignored
    );
    if options.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({"result": "summary", "totals": &totals})
        );
    } else {
        let _ = writeln!(out, "{summary}");
    }
    Ok(totals)
}

fn draw_bar(progress: &Progress, total: u64, total_bytes: u64, started: Instant) {
    const WIDTH: u64 = 30;
    let done = progress.done.load(Ordering::Relaxed);
    let bytes = progress.bytes.load(Ordering::Relaxed);
    let filled = (bytes.min(total_bytes) * WIDTH)
        .checked_div(total_bytes)
        .unwrap_or(WIDTH);
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {done}/{total} objects, {:.1}/{:.1} MiB, {:.1} MiB/s",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        bytes as f64 / 1048576.0,
        total_bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / secs
    );
    let _ = err.flush();
}

/// One recording's chunking state.
struct Writer {
    id: RecordingId,
    store: DynStore,
    chain: HashChain,
    body: Sha256,
    encoder: Option<ChunkEncoder>,
    chunks: Vec<ChunkEntry>,
    offset: u64,
    /// The put of the last chunk prepared, still running.
    put: Option<(
        u32,
        tokio::task::JoinHandle<Result<(), object_store::Error>>,
    )>,
}

impl Writer {
    async fn finish_put(&mut self) -> anyhow::Result<()> {
        if let Some((seq, put)) = self.put.take() {
            put.await
                .context("put task")?
                .with_context(|| format!("storing chunk {seq}"))?;
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A failed import leaves no put running behind it.
        if let Some((_, put)) = self.put.take() {
            put.abort();
        }
    }
}

impl Importer {
    fn source_of(&self, key: &str, meta: &ObjectMeta) -> ImportSource {
        ImportSource {
            kind: self.source.kind.to_owned(),
            url: format!("{}/{key}", self.source.base),
            key: key.to_owned(),
            modified: OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(meta.last_modified.timestamp_millis()) * 1_000_000,
            )
            .ok(),
        }
    }

    async fn try_recording(&self, meta: &ObjectMeta, key: &str) -> anyhow::Result<Outcome> {
        let started_ms = (self.started.unix_timestamp_nanos() / 1_000_000) as i64;
        let age = started_ms - meta.last_modified.timestamp_millis();
        let recent = !self.min_age.is_zero() && age < self.min_age.as_millis() as i64;
        let still_written = || Outcome::Skipped {
            id: None,
            reason: format!(
                "still being written (modified {:.0} s ago, less than --min-age {} s)",
                (age.max(0) as f64) / 1000.0,
                self.min_age.as_secs()
            ),
        };
        if meta.size == 0 {
            return Ok(if recent {
                still_written()
            } else {
                Outcome::Skipped {
                    id: None,
                    reason: "empty: tsrecorder made the file but no header arrived".to_owned(),
                }
            });
        }
        // The header, from the first window.
        let window = (meta.size as usize).min(self.max_chunk_bytes.max(64 << 10));
        let mut pending = self.read(meta, 0, window).await?.to_vec();
        let mut read = pending.len() as u64;
        let header = memchr::memchr(b'\n', &pending)
            .ok_or_else(|| format!("no header line in the first {window} bytes"))
            .and_then(|end| {
                CastHeader::parse(&pending[..end])
                    .map_err(|e| format!("not an asciicast v2 recording: {e}"))
            });
        let header = match header {
            Ok(header) => header,
            Err(_) if recent => return Ok(still_written()),
            Err(reason) => return Ok(Outcome::Failed { reason }),
        };
        let region = routing::route(&self.routing, &header)
            .map(|rule| rule.region.clone())
            .unwrap_or_else(|| self.stores.home().to_string());
        let region = Region::new(&region).map_err(|e| anyhow::anyhow!("routing: {e}"))?;
        let store = self
            .stores
            .region(region.as_str())
            .map(|s| s.store.clone())
            .ok_or_else(|| anyhow::anyhow!("routed to region {region}, which is not configured"))?;
        let unix_ms = name_time_ms(key)
            .or_else(|| {
                header
                    .timestamp()
                    .and_then(|t| u64::try_from(t).ok())
                    .map(|t| t * 1000)
            })
            .unwrap_or_else(|| modified_ms(meta));
        let random = id_random(key);
        for (other, entry) in self.stores.iter() {
            let id = RecordingId::new(other, unix_ms, random);
            match reader::read_manifest(entry.store.as_ref(), &id).await {
                Ok(manifest) => {
                    self.complete(&entry.store, &id).await?;
                    if manifest.bytes != meta.size {
                        // tsrecorder wrote on after the import took it (a session idle for
                        // longer than --min-age); the stored recording is immutable.
                        return Ok(Outcome::Failed {
                            reason: format!(
                                "changed since it was imported as {id}: {} bytes then, {} now (tsrecorder was still writing it; a larger --min-age avoids this)",
                                manifest.bytes, meta.size
                            ),
                        });
                    }
                    return Ok(Outcome::Skipped {
                        id: Some(id.to_string()),
                        reason: format!("already imported as {id}"),
                    });
                }
                Err(reader::ReadError::NotFound { .. }) => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("checking region {other}")));
                }
            }
        }
        if recent {
            return Ok(still_written());
        }
        let id = RecordingId::new(&region, unix_ms, random);
        // Objects of an import that was interrupted before its manifest.
        let leftovers: Vec<Path> = store
            .list(Some(&ObjectKey::recording_prefix(&id)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .context("listing an earlier, unfinished import")?;
        for path in leftovers {
            match store.delete(&path).await {
                Ok(()) => {}
                Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("removing {path}"))),
            }
        }

        let mut w = Writer {
            chain: HashChain::new(&id),
            id: id.clone(),
            store: store.clone(),
            body: Sha256::new(),
            encoder: Some(ChunkEncoder::new(self.level).context("zstd")?),
            chunks: Vec::new(),
            offset: 0,
            put: None,
        };
        let size = meta.size;
        let max = self.max_chunk_bytes;
        let limit = max + self.max_line_bytes + 1;
        loop {
            while pending.len() < max && read < size {
                let want = (max - pending.len()).min((size - read) as usize);
                pending.extend_from_slice(&self.read(meta, read, want).await?);
                read += want as u64;
            }
            let mut len = chunk::next_chunk_len(&pending, max, read == size);
            // A line longer than the window: read on to its end, up to the line limit.
            while len.is_none() && read < size && pending.len() < limit {
                let want = (limit - pending.len()).min((size - read) as usize).min(max);
                pending.extend_from_slice(&self.read(meta, read, want).await?);
                read += want as u64;
                len = chunk::next_chunk_len(&pending, max, read == size);
            }
            if len.is_none() && pending.len() >= limit {
                len = Some(pending.len());
            }
            let Some(len) = len else { break };
            let rest = pending.split_off(len);
            let raw = std::mem::replace(&mut pending, rest);
            self.put_chunk(&mut w, raw).await?;
            if pending.is_empty() && read == size {
                break;
            }
        }

        w.finish_put().await?;
        let head = w.chain.head();
        let chunks = w.chunks.len() as u32;
        let cp = self
            .actor
            .key
            .checkpoint(&self.node_id, id.as_str(), chunks, w.offset, &head);
        self.create(&store, &ObjectKey::checkpoint(&id, chunks), cp.to_bytes())
            .await?;
        let source = self.source_of(key, meta);
        let started = id.started_at();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_owned(),
            recording_id: id.to_string(),
            region: region.to_string(),
            zone: self.zone.clone(),
            node_id: self.node_id.clone(),
            status: RecordingStatus::Imported,
            end_reason: None,
            protocol: "import".to_owned(),
            peer: None,
            sender: None,
            received_at: started,
            ended_at: source.modified.unwrap_or(started),
            header: header.into_value(),
            bytes: w.offset,
            events: w.chunks.iter().map(|c| c.events).sum(),
            malformed_lines: w.chunks.iter().map(|c| c.malformed_lines).sum(),
            partial_last_line: self.last_byte(meta).await? != b'\n',
            duration_seconds: w
                .chunks
                .iter()
                .rev()
                .find_map(|c| c.last_event_time)
                .unwrap_or(0.0),
            body_sha256: hex::encode(std::mem::take(&mut w.body).finalize()),
            chain_head: hex::encode(head),
            source: Some(source.clone()),
            chunks: std::mem::take(&mut w.chunks),
        };
        let bytes = serde_json::to_vec(&manifest).context("encoding the manifest")?;
        match put_create(
            store.as_ref(),
            &ObjectKey::manifest(&id),
            Bytes::from(bytes.clone()),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {
                return Ok(Outcome::Skipped {
                    id: None,
                    reason: format!("imported as {id} by another run at the same time"),
                });
            }
            Err(e) => return Err(anyhow::Error::new(e).context("storing the manifest")),
        }
        let seal = self.actor.key.seal(&self.node_id, id.as_str(), &bytes);
        self.create(&store, &ObjectKey::seal(&id), seal.to_bytes())
            .await?;
        if let Some(row) = CatalogRow::from_manifest(&manifest) {
            let row = serde_json::to_vec(&row).context("encoding the catalog row")?;
            put_overwrite(store.as_ref(), &ObjectKey::catalog(&id), Bytes::from(row))
                .await
                .context("storing the catalog row")?;
        }
        let record = crate::audit::Record {
            time: OffsetDateTime::now_utc(),
            node: "cli".to_owned(),
            actor: self.actor.name.clone(),
            via: "cli".to_owned(),
            action: "import".to_owned(),
            recording_id: Some(id.to_string()),
            query: Some(source.url),
            remote: "local".to_owned(),
        };
        crate::audit::write_one(&store, &self.actor.key, &record)
            .await
            .map_err(|e| anyhow::anyhow!("writing the audit record: {e}"))?;
        Ok(Outcome::Imported {
            id: id.to_string(),
            bytes: manifest.bytes,
        })
    }

    /// Tells running nodes of `region` about imported recordings (see `NOTICE_BATCH`). A
    /// notice that cannot be written only delays the listing to the nodes' next full scan, so
    /// it is a warning, not a failure.
    async fn notify(&self, region: &str, ids: Vec<String>) {
        let Some(store) = self.stores.region(region) else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let name = format!(
            "{}-{}-{}",
            self.node_id,
            now.unix_timestamp_nanos() / 1_000_000,
            ids.len()
        );
        let path = ObjectKey::notice(now, &name);
        let notice = serde_json::to_vec(&crate::catalog::Notice { ids }).unwrap_or_default();
        if let Err(e) = put_create(store.store.as_ref(), &path, Bytes::from(notice)).await {
            eprintln!(
                "castvault: warning: cannot store {path} ({e}); running nodes list these recordings at their next start"
            );
        }
    }

    /// Finishes an import that was stopped between its manifest and its catalog row: the seal
    /// over the stored manifest's exact bytes, and the row.
    async fn complete(&self, store: &DynStore, id: &RecordingId) -> anyhow::Result<()> {
        let row_path = ObjectKey::catalog(id);
        match store.head(&row_path).await {
            Ok(_) => return Ok(()),
            Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("checking {row_path}"))),
        }
        let path = ObjectKey::manifest(id);
        let bytes = match store.get(&path).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        }
        .with_context(|| format!("reading {path}"))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {path}"))?;
        let seal = self.actor.key.seal(&self.node_id, id.as_str(), &bytes);
        self.create(store, &ObjectKey::seal(id), seal.to_bytes())
            .await?;
        if let Some(row) = CatalogRow::from_manifest(&manifest) {
            let row = serde_json::to_vec(&row).context("encoding the catalog row")?;
            put_overwrite(store.as_ref(), &row_path, Bytes::from(row))
                .await
                .context("storing the catalog row")?;
        }
        Ok(())
    }

    /// Compresses, scans and hashes one chunk off the async threads, then stores it.
    async fn put_chunk(&self, w: &mut Writer, raw: Vec<u8>) -> anyhow::Result<()> {
        let seq = w.chunks.len() as u32;
        let mut encoder = w.encoder.take().context("no zstd context")?;
        let mut body = std::mem::take(&mut w.body);
        // Compression on one thread; the scan and both digests on another.
        let raw = Arc::new(raw);
        let to_compress = raw.clone();
        let compress = tokio::task::spawn_blocking(move || {
            let compressed = encoder.encode(&to_compress);
            (encoder, compressed)
        });
        let to_scan = raw.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let stats = ChunkStats::scan(&to_scan, seq == 0);
            let digest = chunk::digest(&to_scan);
            body.update(to_scan.as_slice());
            (body, stats, digest)
        });
        let (compressed, scanned) = tokio::join!(compress, scan);
        let (encoder, compressed) = compressed.context("compression task")?;
        let (body, stats, digest) = scanned.context("scan task")?;
        w.encoder = Some(encoder);
        w.body = body;
        let compressed = compressed.context("compressing")?;
        let raw_len = raw.len() as u64;
        let link = w.chain.push(&digest, seq, w.offset, raw_len);
        let entry = ChunkEntry::new(seq, w.offset, raw_len, &compressed, &stats, &digest, &link);
        // The previous chunk's put (and fsync) ran while this one was prepared; one at a time,
        // in order, so the chunks stored are always a prefix.
        w.finish_put().await?;
        let (store, path) = (w.store.clone(), ObjectKey::chunk(&w.id, seq));
        w.put = Some((
            seq,
            tokio::spawn(async move {
                put_create(store.as_ref(), &path, Bytes::from(compressed)).await
            }),
        ));
        w.chunks.push(entry);
        w.offset += raw_len;
        Ok(())
    }

    /// Reads exactly `len` bytes at `offset`; a short read means the object changed.
    async fn read(&self, meta: &ObjectMeta, offset: u64, len: usize) -> anyhow::Result<Bytes> {
        let got = self
            .source
            .store
            .get_range(&meta.location, offset..offset + len as u64)
            .await
            .with_context(|| format!("reading {}", meta.location))?;
        if got.len() != len {
            anyhow::bail!(
                "{} changed while being imported (read {} of {len} bytes at {offset})",
                meta.location,
                got.len()
            );
        }
        Ok(got)
    }

    async fn last_byte(&self, meta: &ObjectMeta) -> anyhow::Result<u8> {
        Ok(self.read(meta, meta.size - 1, 1).await?[0])
    }

    /// Stores an immutable object; one already there (same import, re-run) is kept.
    async fn create(&self, store: &DynStore, path: &Path, bytes: Vec<u8>) -> anyhow::Result<()> {
        match put_create(store.as_ref(), path, Bytes::from(bytes)).await {
            Ok(()) => Ok(()),
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("storing {path}"))),
        }
    }

    /// One Kubernetes API event: stored in this node's region, as `/v2/event` stores one, with
    /// castvault's id and `source` naming the original (its key and its tsrecorder id).
    async fn try_event(&self, meta: &ObjectMeta, key: &str) -> anyhow::Result<Outcome> {
        if meta.size as usize > crate::ingest::MAX_EVENT_BYTES {
            anyhow::bail!(
                "{} bytes, more than an event may have ({})",
                meta.size,
                crate::ingest::MAX_EVENT_BYTES
            );
        }
        let bytes = self.read(meta, 0, meta.size as usize).await?;
        let serde_json::Value::Object(mut wrapper) =
            serde_json::from_slice(&bytes).context("not a JSON object")?
        else {
            anyhow::bail!("not a JSON object");
        };
        let wrapper_time = wrapper
            .get("timestamp")
            .and_then(|t| t.as_str())
            .and_then(go_time_ms);
        let mut event = match wrapper.remove("event") {
            Some(serde_json::Value::Object(event)) => event,
            Some(_) => anyhow::bail!("its `event` is not an object"),
            // Not wrapped: the event itself.
            None => wrapper,
        };
        let unix_ms = name_time_ms(key)
            .or(wrapper_time)
            .unwrap_or_else(|| modified_ms(meta));
        let id = RecordingId::new(self.stores.home(), unix_ms, id_random(key));
        let original = event.insert("id".to_owned(), id.to_string().into());
        let mut source = serde_json::to_value(self.source_of(key, meta)).unwrap_or_default();
        if let (Some(s), Some(original)) = (source.as_object_mut(), original) {
            s.insert("id".to_owned(), original);
        }
        event.insert("source".to_owned(), source);
        let json = serde_json::to_vec(&event).context("encoding the event")?;
        let len = json.len() as u64;
        match put_create(
            self.stores.home_store().as_ref(),
            &ObjectKey::event(&id),
            Bytes::from(json),
        )
        .await
        {
            Ok(()) => Ok(Outcome::Imported {
                id: id.to_string(),
                bytes: len,
            }),
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => Ok(Outcome::Skipped {
                id: None,
                reason: format!("already imported as {id}"),
            }),
            Err(e) => Err(anyhow::Error::new(e).context("storing the event")),
        }
    }
}

/// Whether stderr is a terminal (the progress bar's default).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_recognized() {
        assert_eq!(
            classify("nABC/2026-07-29T11:50:50.033425744Z.cast"),
            Kind::Recording
        );
        assert_eq!(
            classify("nABC/events/2026-07-29T11:50:50Z.event"),
            Kind::Event
        );
        for other in [
            "check-write-access",
            ".events-exist",
            "state/tailscaled.state",
            "a/b/c.cast",
            "/x.cast",
            "n/.cast",
            "n/events/.event",
        ] {
            assert_eq!(classify(other), Kind::Other, "{other}");
        }
    }

    #[test]
    fn times_are_read_from_names_and_wrappers() {
        assert_eq!(
            name_time_ms("n/2026-07-29T11:50:50.033425744Z.cast"),
            Some(1_785_325_850_033)
        );
        assert_eq!(
            name_time_ms("n/2026-07-29T11:50:50Z.cast"),
            Some(1_785_325_850_000)
        );
        assert_eq!(name_time_ms("n/session-1.cast"), None);
        assert_eq!(
            go_time_ms("2026-07-29 10:44:42 +0000 UTC"),
            Some(1_785_321_882_000)
        );
        assert_eq!(
            go_time_ms("2026-07-29 12:44:42.5 +0200 CEST"),
            Some(1_785_321_882_500)
        );
        assert_eq!(go_time_ms("yesterday"), None);
    }

    #[test]
    fn ids_are_stable_per_key() {
        assert_eq!(id_random("n/a.cast"), id_random("n/a.cast"));
        assert_ne!(id_random("n/a.cast"), id_random("n/b.cast"));
    }
}
