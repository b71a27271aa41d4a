//! The chunker/uploader: cuts each recording's spooled bytes into chunks, compresses them with
//! pooled zstd contexts, writes them as immutable objects, and finalizes the recording with its
//! manifest and catalog row once its stream has ended and every byte is committed.
//!
//! One scheduler task looks at every recording each [`SCHEDULER_TICK`] (or when woken) and
//! starts work on those that are due: `chunk.max_bytes` pending, the oldest pending byte older
//! than `chunk.max_age`, or the stream ended. At most [`UPLOAD_CONCURRENCY`] recordings are
//! worked on at once and each by one task at a time, so chunks of a recording are committed in
//! order. A failed put is retried with exponential backoff and jitter, forever, and the failure
//! is visible (`/api/v1/uploads`, metrics, `Progress::error`); the spool keeps the bytes.
//! While a recording waits out a failure of its store, the chunks that come due are still cut,
//! compressed and hashed, and kept in its spool directory (staged), so the drain when the store
//! returns is puts only; staged chunks live in memory and spool only, and a restart
//! compresses again.
//!
//! After a crash the store may hold chunks the spool's chunk log does not list. Before writing
//! chunk `n` of a recovered recording (or when a put finds the key taken) the uploader reads the
//! stored chunk `n` and adopts it only if it is byte-for-byte the spool's bytes at that offset;
//! anything else is reported as corruption and never overwritten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use castvault_storage::cast::CastHeader;
use castvault_storage::chunk::{self, ChunkEncoder, ChunkStats, MAX_DECODED_CHUNK_BYTES};
use castvault_storage::keys::{ObjectKey, RecordingId};
use castvault_storage::manifest::{
    CatalogRow, ChunkEntry, HashChain, MANIFEST_FORMAT, Manifest, RecordingStatus,
};
use castvault_storage::reader::{self, read_manifest_bytes};
use castvault_storage::store::{
    DynStore, ErrorKind, Stores, UnknownRegion, error_kind, put_create, put_overwrite,
};
use object_store::ObjectStoreExt;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::catalog::Catalog;
use castvault_storage::signing::NodeKey;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::spool::{RecordingMeta, Recovered, SpoolError, SpoolFile, StreamEnd, StreamOutcome};

/// How often [`Uploader::quiet`] looks again: short next to an upload step, long next to the
/// check.
const QUIET_POLL: Duration = Duration::from_millis(10);

/// Recordings uploaded at once. Puts to the store spend most of their time waiting (fsync,
/// network), so this is above the core count; memory is bounded by [`UPLOAD_BUFFER_KIB`].
pub const UPLOAD_CONCURRENCY: usize = 32;

/// Raw chunk bytes held in memory by all uploads together (KiB): a chunk holds its share from
/// its cut until it is committed. 96 MiB lets 16 uploads pipeline 4 MiB chunks, and keeps the
/// uploader's worst case a quarter of a 10,000-stream node's 400 MiB budget.
pub const UPLOAD_BUFFER_KIB: u32 = 96 << 10;

/// Chunk puts one recording keeps in flight while it has a backlog (a drain after an outage,
/// a fast stream). Commits still happen in order; after a crash, a stored chunk past a gap is
/// adopted by reconciliation or removed by the orphan finalizer (it was never acked: acks
/// count the committed prefix only). Memory stays within [`UPLOAD_BUFFER_KIB`].
pub const PUTS_IN_FLIGHT: usize = 4;

/// Chunk puts in flight from this node at once, over all recordings (each keeps up to
/// [`PUTS_IN_FLIGHT`]). A store serves requests from a queue, and a lease renewal waits
/// behind every put queued before it: past a few dozen, more puts add only queueing, and a
/// drain after an outage would delay renewals past a short lease's life. 32 puts of 4 MiB
/// in flight still fill a 10 Gbit/s link at 100 ms a put.
pub const CHUNK_PUTS_AT_ONCE: usize = 32;

/// Staging chunks during an outage (see `Inner::stage`) adds their compressed size to the
/// spool's disk; it stops while free space is below this multiple of `min_free_disk_bytes`,
/// so it never brings admission's low-disk refusal closer than half way.
pub const STAGE_MIN_FREE_DISK_FACTOR: u64 = 2;

/// Chunks staged at once by all recordings: each keeps about 250 bytes in memory (digest,
/// stats, hash state) for as long as the outage lasts. 65,536 is up to 256 GiB of raw output
/// at 4 MiB a chunk in about 16 MiB; past it the drain compresses the rest.
pub const MAX_STAGED_CHUNKS: usize = 65_536;

/// How often the scheduler looks for due recordings when nobody wakes it; bounds how late a
/// time-based cut can be.
pub const SCHEDULER_TICK: Duration = Duration::from_millis(200);

/// The node's ingest rate is measured over windows at least this long (see [`RateMeter`]).
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// Chunks get the thorough setting only while the node received at most this many bytes a
/// second per core, in each of the last two [`RATE_WINDOW`]s (so a burst is still seen while
/// its backlog is compressed). Thorough compression costs about 4.7 ms of CPU per MiB more
/// than level 1 (about 160 against 570 MB/s on one core here), so at this rate it takes at
/// most about 8% of each core; a busier node spends its cores on ingest and commits.
const THOROUGH_MAX_RATE_PER_CORE: u64 = 16 << 20;

/// Lease renewals in flight at once (see [`keep_leases`]). A renewal is one small conditional
/// put; 64 renew 10,000 recordings' leases (every third of a 30 s lease) with room to spare,
/// without a drain's worth of requests queueing in front of the store.
const LEASE_RENEWALS_IN_FLIGHT: usize = 64;

/// Backoff after a failed upload: doubles from the first value up to the cap, with ±50% jitter
/// so a fleet recovering from an outage does not retry in lockstep.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Why an upload step failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("store: {op} {path}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("recording {recording_id}: {what}")]
    Corrupt { recording_id: String, what: String },
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
}

impl UploadError {
    fn store(
        op: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> Self + use<> {
        let path = path.to_string();
        move |source| Self::Store { op, path, source }
    }

    /// True when the store did not answer (worth marking the region down).
    fn transient(&self) -> bool {
        match self {
            Self::Store { source, .. } => error_kind(source) == ErrorKind::Transient,
            Self::Lease(e) => e.transient(),
            _ => false,
        }
    }
}

/// Chunking settings.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    pub max_chunk_bytes: usize,
    pub max_chunk_age: Duration,
    /// The zstd level of a chunk compressed while the node is behind (see [`compress_thorough`]).
    pub compression_level: i32,
    /// Chunks compressed while the node keeps up get [`ChunkEncoder::thorough`].
    pub adaptive_compression: bool,
    pub max_line_bytes: usize,
    /// This node, as named in leases.
    pub node_id: String,
    /// Lease lifetime (see `crate::lease`).
    pub lease_ttl: Duration,
    /// True when an ack may count bytes that are only in the spool (`ack = "spool"`, or
    /// `storage_outage = "degrade"` during an outage): spool bytes past a manifest another
    /// node wrote may then have been acked, and are kept.
    pub acks_from_spool: bool,
    /// Signs chain checkpoints and manifest seals (see `castvault_storage::signing`).
    pub signer: Arc<NodeKey>,
    /// A recording with chunks past its last checkpoint gets a new one this often.
    pub checkpoint_every: Duration,
    /// Admission refuses new streams below this much free spool disk; staging (see
    /// [`STAGE_MIN_FREE_DISK_FACTOR`]) stops well above it.
    pub min_free_disk_bytes: u64,
}

/// What a recording's stream can see of its upload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Bytes in committed chunks.
    pub committed: u64,
    pub finalized: bool,
    /// The last upload failure, cleared by the next success.
    pub error: Option<String>,
    /// Set when another node took the recording over: the stream must end, whatever the
    /// outage policy.
    pub lost: Option<String>,
}

/// Upload state of one recording, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UploadStatus {
    pub recording_id: String,
    /// The recording's home region, whose store it goes to.
    pub region: String,
    /// Whether that store answers right now.
    pub store_up: bool,
    pub received: u64,
    pub committed: u64,
    pub chunks: u32,
    pub stream_ended: bool,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Set when another node took the recording over; the spool keeps its bytes.
    pub lease_lost: Option<String>,
    /// Chunks compressed while the store was out of reach, waiting in the spool for it.
    pub staged_chunks: usize,
    pub staged_bytes: u64,
}

struct Upload {
    file: Arc<SpoolFile>,
    meta: RecordingMeta,
    /// The store of the recording's home region.
    store: DynStore,
    /// Whether that store takes leases (conditional updates).
    leased: bool,
    /// Serializes what is done to the lease object (acquire, renew, release), so that a
    /// renewal never races its own recording's release.
    lease_op: tokio::sync::Mutex<()>,
    state: Mutex<UploadState>,
    progress: watch::Sender<Progress>,
}

struct UploadState {
    next_seq: u32,
    committed: u64,
    chain: HashChain,
    body: Sha256,
    /// False until stored chunks past the chunk log were checked (recovered recordings).
    reconciled: bool,
    live_row_written: bool,
    /// A chunk-log append failed (disk full): finalize rebuilds the table from the store.
    chunk_log_incomplete: bool,
    /// Set when the recording was found in the spool at start.
    recovered: bool,
    /// When the pending bytes are due for a time-based cut (see [`age_cut_due`]).
    cut_due: Option<Instant>,
    end: Option<StreamEnd>,
    busy: bool,
    retry_at: Option<Instant>,
    /// The lease while held (stores with conditional updates only).
    lease: Option<crate::lease::Held>,
    /// Why the lease was lost; uploading stops for good.
    lease_lost: Option<String>,
    /// A renewal of the lease is in flight (see [`keep_leases`]).
    renewing: bool,
    /// The lease was released after the manifest was stored: never created again (a retry of
    /// a finalize whose spool removal failed has nothing left to guard).
    lease_released: bool,
    /// Lengths of chunks cut but not yet committed, by sequence number (at most
    /// [`PUTS_IN_FLIGHT`] plus the staged ones); dropped as they commit.
    planned: std::collections::BTreeMap<u32, u64>,
    /// Chunks compressed into the spool while the store was out of reach, in order from
    /// `next_seq`.
    staged: std::collections::VecDeque<Staged>,
    /// A manifest found in the store at reconciliation: another node finalized the recording.
    stored_manifest: Option<(Manifest, Bytes)>,
    /// Chunks covered by the last signed checkpoint, and when it was written.
    checkpointed: u32,
    checkpoint_at: Instant,
    attempts: u32,
    last_error: Option<String>,
}

/// A chunk compressed and hashed while its store was out of reach; its object waits in the
/// spool (`SpoolFile::stage`) so that the drain is puts only.
#[derive(Clone)]
struct Staged {
    seq: u32,
    offset: u64,
    raw_len: u64,
    stats: ChunkStats,
    digest: [u8; 32],
    body_after: Sha256,
    stored_len: u64,
}

/// What the scheduler starts for a recording.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Work {
    /// Cut, compress, put, commit and finalize.
    Upload,
    /// Its store failed and the retry is not due: compress the chunks that are due into the
    /// spool meanwhile, with the CPU the outage leaves idle.
    Stage,
}

/// Chunk puts started and not yet published, oldest first.
type InFlight = std::collections::VecDeque<(
    Prepared,
    tokio::task::JoinHandle<Result<(), object_store::Error>>,
)>;

/// The answer to a request for buffer budget.
enum Budget {
    Granted(tokio::sync::OwnedSemaphorePermit),
    /// Publishing the chunks in flight first found a chunk key taken: reconcile.
    KeyTaken,
    /// The uploader is shutting down.
    Closed,
}

/// The share of [`UPLOAD_BUFFER_KIB`] that `bytes` in memory take.
fn budget_kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, UPLOAD_BUFFER_KIB)
}

/// Starts the put of a prepared chunk; it goes once one of the node's
/// [`CHUNK_PUTS_AT_ONCE`] is free.
fn start_put(
    upload: &Upload,
    prepared: Prepared,
    puts: &Arc<Semaphore>,
) -> (
    Prepared,
    tokio::task::JoinHandle<Result<(), object_store::Error>>,
) {
    let path = ObjectKey::chunk(&upload.file.id, prepared.seq);
    let store = upload.store.clone();
    let bytes = prepared.compressed.clone();
    let puts = puts.clone();
    (
        prepared,
        tokio::spawn(async move {
            // Never closed; a closed one would only lift the limit.
            let _put = puts.acquire_owned().await.ok();
            put_create(store.as_ref(), &path, bytes).await
        }),
    )
}

/// A chunk compressed and hashed, ready to put.
struct Prepared {
    seq: u32,
    offset: u64,
    raw_len: u64,
    compressed: Bytes,
    stats: ChunkStats,
    digest: [u8; 32],
    /// The body digest state after this chunk.
    body_after: Sha256,
    /// This chunk's share of [`UPLOAD_BUFFER_KIB`], released when it is committed or dropped.
    buffer: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Upload {
    fn state(&self) -> MutexGuard<'_, UploadState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Inner {
    stores: Stores,
    health: Arc<Health>,
    config: UploadConfig,
    registry: Mutex<HashMap<RecordingId, Arc<Upload>>>,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    buffers: Arc<Semaphore>,
    /// See [`CHUNK_PUTS_AT_ONCE`].
    puts: Arc<Semaphore>,
    encoders: Mutex<Vec<ChunkEncoder>>,
    /// Pooled contexts of the thorough setting (see [`compress_thorough`]).
    thorough_encoders: Mutex<Vec<ChunkEncoder>>,
    /// Recordings due for upload that found every upload slot taken at the scheduler's last
    /// look: a backlog.
    waiting_for_slot: AtomicUsize,
    /// [`THOROUGH_MAX_RATE_PER_CORE`] times the cores this process may use.
    thorough_max_rate: u64,
    /// Bytes a second received in the busier of the last two [`RATE_WINDOW`]s.
    ingest_rate: AtomicU64,
    /// True while the node is in a burst (see [`defer_full_chunks`]): full chunks wait, and
    /// only aged, ended and checkpoint-due recordings upload.
    deferring: AtomicBool,
    /// Chunks staged by all uploads (see [`MAX_STAGED_CHUNKS`]).
    staged_chunks: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Told about every catalog row written, so listing sees it at once.
    catalog: Option<Arc<Catalog>>,
    /// The background runtime: catalog writes for new recordings go there, off ingest's
    /// runtime and its blocking pool.
    background: tokio::runtime::Handle,
}

/// A recording in the spool that a live viewer follows.
pub struct LiveSource {
    upload: Arc<Upload>,
}

impl LiveSource {
    pub fn file(&self) -> &Arc<SpoolFile> {
        &self.upload.file
    }

    /// Bytes in committed chunks: the prefix of the data file that is stored.
    pub fn committed(&self) -> u64 {
        self.upload.state().committed
    }

    /// True once the stream has ended and every byte of it is in the data file.
    pub fn ended(&self) -> bool {
        self.upload.state().end.is_some() && self.upload.file.settled()
    }
}

/// Handle to the uploader; cheap to clone.
#[derive(Clone)]
pub struct Uploader {
    inner: Arc<Inner>,
}

impl Uploader {
    /// Starts the scheduler on `background`; it stops when `stop` is cancelled. Every upload
    /// task, compression and store call runs on that runtime, so a node can keep it off the
    /// threads that read bodies and send acks (see `crate::background`).
    pub fn start(
        background: &tokio::runtime::Handle,
        stores: Stores,
        health: Arc<Health>,
        config: UploadConfig,
        metrics: Arc<Metrics>,
        catalog: Option<Arc<Catalog>>,
        stop: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            catalog,
            background: background.clone(),
            stores,
            health,
            config,
            registry: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            permits: Arc::new(Semaphore::new(UPLOAD_CONCURRENCY)),
            buffers: Arc::new(Semaphore::new(UPLOAD_BUFFER_KIB as usize)),
            puts: Arc::new(Semaphore::new(CHUNK_PUTS_AT_ONCE)),
            encoders: Mutex::new(Vec::new()),
            thorough_encoders: Mutex::new(Vec::new()),
            waiting_for_slot: AtomicUsize::new(0),
            thorough_max_rate: THOROUGH_MAX_RATE_PER_CORE
                * std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            ingest_rate: AtomicU64::new(u64::MAX),
            deferring: AtomicBool::new(false),
            staged_chunks: AtomicUsize::new(0),
            metrics,
        });
        background.spawn(run_scheduler(inner.clone(), stop.clone()));
        background.spawn(keep_leases(inner.clone(), stop.clone()));
        background.spawn(retry_when_back(inner.clone(), stop));
        Self { inner }
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<RecordingId, Arc<Upload>>> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts uploading a new recording; returns its progress.
    ///
    /// # Errors
    /// [`UnknownRegion`] when the id names a region without a store here.
    pub fn register(
        &self,
        file: Arc<SpoolFile>,
        meta: RecordingMeta,
    ) -> Result<watch::Receiver<Progress>, UnknownRegion> {
        let state = UploadState::new(&file.id, false);
        // This node's catalog lists the recording at once, so it can be watched live; the
        // store's row follows with the first chunk (see `needs_live_row`).
        if let Some(catalog) = self.inner.catalog.clone() {
            let header = CastHeader::from_value(meta.header.clone()).ok();
            let row = CatalogRow::live(&file.id, &meta.node_id, header.as_ref());
            self.inner.background.spawn(async move {
                if let Err(e) = catalog.upsert(vec![row]).await {
                    tracing::warn!(error = %error_chain(&e), "catalog update failed");
                }
            });
        }
        self.insert(file, meta, state)
    }

    /// Whether the store of `region` answers.
    pub fn region_up(&self, region: &str) -> bool {
        self.inner.health.is_up(region)
    }

    /// Resumes a recording found in the spool at start.
    ///
    /// # Errors
    /// [`UploadError`] when the spool cannot be read back.
    pub async fn resume(&self, recovered: Recovered) -> Result<(), UploadError> {
        let Recovered {
            file,
            meta,
            end,
            chunks,
        } = recovered;
        let committed = chunks.last().map_or(0, |c| c.offset + c.raw_len);
        let mut state = UploadState::new(&file.id, true);
        for entry in &chunks {
            let digest: [u8; 32] = hex::decode(&entry.sha256)
                .ok()
                .and_then(|d| d.try_into().ok())
                .unwrap_or_default();
            state
                .chain
                .push(&digest, entry.seq, entry.offset, entry.raw_len);
        }
        state.next_seq = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        state.committed = committed;
        // Rehash what is already committed, from the spool, in bounded pieces.
        let mut offset = 0;
        while offset < committed {
            let len = (committed - offset).min(1 << 20) as usize;
            state.body.update(file.read_at(offset, len).await?);
            offset += len as u64;
        }
        state.end = Some(end.unwrap_or_else(|| StreamEnd {
            outcome: StreamOutcome::Interrupted,
            reason: Some("the recorder stopped before the stream ended".to_owned()),
            bytes: file.received(),
            ended_at: OffsetDateTime::now_utc(),
        }));
        self.insert(file, meta, state)
            .map_err(|e| UploadError::Corrupt {
                recording_id: e.region.clone(),
                what: e.to_string(),
            })?;
        Ok(())
    }

    fn insert(
        &self,
        file: Arc<SpoolFile>,
        meta: RecordingMeta,
        state: UploadState,
    ) -> Result<watch::Receiver<Progress>, UnknownRegion> {
        let region = self
            .inner
            .stores
            .region(file.id.region())
            .ok_or_else(|| UnknownRegion {
                region: file.id.region().to_owned(),
            })?;
        let (store, leased) = (region.store.clone(), region.conditional_updates);
        let (progress, rx) = watch::channel(Progress {
            committed: state.committed,
            ..Progress::default()
        });
        let id = file.id.clone();
        let upload = Arc::new(Upload {
            file,
            meta,
            store,
            leased,
            lease_op: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
            progress,
        });
        self.registry().insert(id, upload);
        Metrics::add(&self.inner.metrics.recordings_pending, 1);
        self.inner.wake.notify_one();
        Ok(rx)
    }

    /// Marks a recording's stream as ended; the rest is cut and the recording finalized.
    pub fn end_stream(&self, id: &RecordingId, end: StreamEnd) {
        if let Some(upload) = self.registry().get(id) {
            upload.state().end = Some(end);
            // Its last bytes may still be on their way to the data file: look again as soon as
            // they are there, not at the next tick.
            upload.file.notify_when_settled(self.inner.wake.clone());
        }
        self.inner.wake.notify_one();
    }

    /// The recordings this node is receiving right now (or still uploading).
    /// True while chunks staged during an outage are going to a store that is back: the
    /// indexer waits, so the backlog's puts have the store and the CPU to themselves.
    pub fn draining_staged(&self) -> bool {
        self.inner.metrics.staged_bytes.load(Ordering::Relaxed) > 0
            && self.registry().values().any(|u| {
                let s = u.state();
                // Not one waiting out a failure: a store that answers probes but refuses puts
                // must not hold indexing up.
                !s.staged.is_empty()
                    && s.retry_at.is_none()
                    && self.inner.health.is_up(u.file.id.region())
            })
    }

    /// Waits while upload work is running (an upload slot is taken) or is being deferred in a
    /// burst (see [`defer_full_chunks`]), for at most `max`. The
    /// indexer calls it between steps: nice 19 alone still let it take about a third of the
    /// node's CPU during a burst of uploads (it runs whenever an upload thread blocks on a
    /// write, and shares the cores' caches), which cost the burst a quarter of its speed. The
    /// bound keeps indexing moving under sustained load.
    pub async fn quiet(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while (self.inner.permits.available_permits() < UPLOAD_CONCURRENCY
            || self.inner.deferring.load(Ordering::Relaxed))
            && Instant::now() < deadline
        {
            tokio::time::sleep(QUIET_POLL).await;
        }
    }

    pub fn live_ids(&self) -> Vec<RecordingId> {
        self.registry().keys().cloned().collect()
    }

    /// A recording this node is receiving right now, for the live view.
    pub fn live(&self, id: &RecordingId) -> Option<LiveSource> {
        self.registry().get(id).map(|upload| LiveSource {
            upload: upload.clone(),
        })
    }

    /// Asks the scheduler to look now (a recording may have passed `chunk.max_bytes`).
    pub fn poke(&self) {
        self.inner.wake.notify_one();
    }

    /// Bytes in the spool's data files of recordings not yet finalized.
    pub fn spool_bytes(&self) -> u64 {
        self.registry().values().map(|u| u.file.received()).sum()
    }

    /// Recordings not yet finalized.
    pub fn pending(&self) -> usize {
        self.registry().len()
    }

    /// Upload state of every recording not yet finalized.
    pub fn status(&self) -> Vec<UploadStatus> {
        let mut all: Vec<_> = self
            .registry()
            .values()
            .map(|u| {
                let s = u.state();
                UploadStatus {
                    recording_id: u.file.id.to_string(),
                    region: u.file.id.region().to_owned(),
                    store_up: self.inner.health.is_up(u.file.id.region()),
                    lease_lost: s.lease_lost.clone(),
                    received: u.file.received(),
                    committed: s.committed,
                    chunks: s.next_seq,
                    stream_ended: s.end.is_some(),
                    attempts: s.attempts,
                    last_error: s.last_error.clone(),
                    staged_chunks: s.staged.len(),
                    staged_bytes: s.staged.iter().map(|c| c.stored_len).sum(),
                }
            })
            .collect();
        all.sort_by(|a, b| a.recording_id.cmp(&b.recording_id));
        all
    }
}

impl UploadState {
    /// Where the next chunk to stage starts.
    fn staged_end(&self) -> u64 {
        self.staged
            .back()
            .map_or(self.committed, |c| c.offset + c.raw_len)
    }

    /// A live catalog row is written with a recording's first upload (its first cut, at most
    /// `chunk.max_age` after its first byte), and only while it is still being received: one
    /// that ends sooner goes straight to its final row. That spares short recordings a put (and
    /// the overwrite that replaces it) on the way in.
    fn needs_live_row(&self) -> bool {
        !self.live_row_written && self.end.is_none()
    }

    /// A fresh state; a recovered recording must first be reconciled with the store.
    fn new(id: &RecordingId, recovered: bool) -> Self {
        Self {
            next_seq: 0,
            committed: 0,
            chain: HashChain::new(id),
            body: Sha256::new(),
            reconciled: !recovered,
            live_row_written: recovered,
            chunk_log_incomplete: false,
            recovered,
            cut_due: None,
            end: None,
            busy: false,
            retry_at: None,
            lease: None,
            lease_lost: None,
            renewing: false,
            lease_released: false,
            planned: std::collections::BTreeMap::new(),
            staged: std::collections::VecDeque::new(),
            stored_manifest: None,
            checkpointed: 0,
            checkpoint_at: Instant::now(),
            attempts: 0,
            last_error: None,
        }
    }
}

async fn run_scheduler(inner: Arc<Inner>, stop: CancellationToken) {
    let mut rate = RateMeter::new(inner.metrics.bytes_received.load(Ordering::Relaxed));
    loop {
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(SCHEDULER_TICK) => {}
            () = stop.cancelled() => return,
        }
        let now = Instant::now();
        let received = inner.metrics.bytes_received.load(Ordering::Relaxed);
        if let Some(rate) = rate.sample(now, received) {
            inner.ingest_rate.store(rate, Ordering::Relaxed);
        }
        let defer = inner.deferring.load(Ordering::Relaxed);
        let mut backlog = 0u64;
        let due: Vec<(Arc<Upload>, Work)> = {
            let registry = inner
                .registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            registry
                .values()
                .filter_map(|u| {
                    let store_down = !inner.health.is_up(u.file.id.region());
                    let (work, pending) = take_if_due(u, now, &inner.config, store_down, defer);
                    backlog = backlog.saturating_add(pending);
                    Some((u.clone(), work?))
                })
                .collect()
        };
        inner.deferring.store(
            defer_full_chunks(
                inner.ingest_rate.load(Ordering::Relaxed),
                inner.thorough_max_rate,
                backlog,
                crate::spool::journal::memory_budget(),
            ),
            Ordering::Relaxed,
        );
        let mut waiting = 0;
        for (upload, work) in due {
            if stop.is_cancelled() {
                return;
            }
            let inner = inner.clone();
            let span = tracing::info_span!("upload", recording_id = %upload.file.id);
            let permit = match inner.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(tokio::sync::TryAcquireError::Closed) => return,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    // Every upload slot is taken (a drain after an outage): this recording
                    // waits for the next tick; `keep_leases` keeps its lease meanwhile.
                    upload.state().busy = false;
                    waiting += 1;
                    continue;
                }
            };
            tokio::spawn(
                async move {
                    match work {
                        Work::Upload => inner.process(&upload).await,
                        Work::Stage => inner.stage(&upload).await,
                    }
                    upload.state().busy = false;
                    drop(permit);
                    // A slot is free: whoever waits for one goes now, not at the next tick.
                    inner.wake.notify_one();
                }
                .instrument(span),
            );
        }
        inner.waiting_for_slot.store(waiting, Ordering::Relaxed);
    }
}

/// Renews every held lease as it comes due, apart from the uploads: a recording that waits for
/// an upload slot, out a backoff, for buffer budget or behind a slow put keeps its lease, or a
/// peer would finalize a recording this node is still receiving.
async fn keep_leases(inner: Arc<Inner>, stop: CancellationToken) {
    let tick =
        (inner.config.lease_ttl / 16).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let slots = Arc::new(Semaphore::new(LEASE_RENEWALS_IN_FLIGHT));
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = stop.cancelled() => return,
        }
        let now = Instant::now();
        let due: Vec<Arc<Upload>> = inner
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|u| {
                let mut s = u.state();
                let due = !s.renewing
                    && s.lease_lost.is_none()
                    && s.lease.as_ref().is_some_and(|l| now >= l.renew_at);
                s.renewing |= due;
                due
            })
            .cloned()
            .collect();
        for upload in due {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot,
                () = stop.cancelled() => return,
            };
            let Ok(slot) = slot else {
                return;
            };
            let inner = inner.clone();
            let span = tracing::info_span!("lease", recording_id = %upload.file.id);
            tokio::spawn(
                async move {
                    inner.renew_lease(&upload).await;
                    upload.state().renewing = false;
                    drop(slot);
                }
                .instrument(span),
            );
        }
    }
}

/// When a region's store comes back, retries every upload waiting on it at once: the spool
/// drains now, not after each recording's backoff.
async fn retry_when_back(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = inner.health.some_region_back() => {}
            () = stop.cancelled() => return,
        }
        let registry = inner
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for upload in registry.values() {
            if inner.health.is_up(upload.file.id.region()) {
                // The failures counted were the outage's: a failure now backs off afresh,
                // not by the outage's longest backoff.
                let mut s = upload.state();
                s.retry_at = None;
                s.attempts = 0;
            }
        }
        drop(registry);
        inner.wake.notify_one();
    }
}

/// Whether a chunk is compressed with [`ChunkEncoder::thorough`] (about 7% smaller than level
/// 1 on terminal output, at under a third of its speed) rather than at `compression_level`:
/// only while the node is lightly loaded and keeps up. Otherwise the fast level keeps
/// commits, and the acks at `storage` level that wait for them, moving. Not so when any of:
/// the node received more than `max_rate` bytes a second lately (see [`RateMeter`]), a
/// recording due for upload found every slot taken, or this recording has a whole chunk
/// more waiting after this one (it writes faster than chunks are compressed).
fn compress_thorough(
    adaptive: bool,
    pending_after: u64,
    max_chunk_bytes: u64,
    waiting_for_slot: usize,
    ingest_rate: u64,
    max_rate: u64,
) -> bool {
    adaptive && pending_after < max_chunk_bytes && waiting_for_slot == 0 && ingest_rate <= max_rate
}

/// Measures the node's ingest rate over windows of at least [`RATE_WINDOW`].
struct RateMeter {
    at: Instant,
    bytes: u64,
    /// Bytes a second in the window that ended last.
    last: u64,
}

impl RateMeter {
    /// The first window counts as busy: the rate before it is unknown.
    fn new(bytes: u64) -> Self {
        Self {
            at: Instant::now(),
            bytes,
            last: u64::MAX,
        }
    }

    /// Once a window has passed: the higher rate of it and the window before, in bytes a
    /// second, given the node's bytes received so far.
    fn sample(&mut self, now: Instant, bytes: u64) -> Option<u64> {
        let elapsed = now.checked_duration_since(self.at)?;
        if elapsed < RATE_WINDOW {
            return None;
        }
        let rate = (bytes.saturating_sub(self.bytes) as f64 / elapsed.as_secs_f64()) as u64;
        let busier = rate.max(self.last);
        (self.at, self.bytes, self.last) = (now, bytes, rate);
        Some(busier)
    }
}

/// When bytes pending since `now` are due for a time-based cut: somewhere in the last half of
/// `max_age`, never later. Streams that started together (a fleet reconnecting after a node
/// restart) would otherwise cut, compress and put in the same instant, every `max_age`, and
/// that burst is what a loaded node's ack tail is made of.
fn age_cut_due(now: Instant, max_age: Duration) -> Instant {
    now + max_age.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Whether full chunks wait during a burst: while ingest runs above what thorough compression
/// keeps up with (`busy_rate`, the node is busy receiving) and the bytes not yet uploaded
/// (`backlog`) fit in the spool's memory budget. Compression, hashing and indexing then run
/// after the burst instead of in its gaps: on two cores shared with a sender (the gateway
/// bench), capping that background work for the seconds of a recorded 1 GiB `cat` cut the
/// `cat` from 5.43-5.97 s to 4.30-4.41 s, while `SCHED_IDLE` instead of nice 10 made no
/// difference.
/// Time still bounds it: a recording's pending bytes are cut when `chunk.max_age` comes, and
/// that upload takes every full chunk written by then (see [`Inner::try_process`]).
/// An ingest rate not measured yet (`u64::MAX`, the first [`RATE_WINDOW`] after start) defers
/// nothing.
fn defer_full_chunks(ingest_rate: u64, busy_rate: u64, backlog: u64, budget: u64) -> bool {
    ingest_rate != u64::MAX && ingest_rate > busy_rate && backlog < budget
}

/// Marks the upload busy and returns the work it has to do now, if any, with the bytes it has
/// not uploaded yet. `defer`: full chunks wait (see [`defer_full_chunks`]).
fn take_if_due(
    upload: &Upload,
    now: Instant,
    config: &UploadConfig,
    store_down: bool,
    defer: bool,
) -> (Option<Work>, u64) {
    let mut s = upload.state();
    let pending = upload.file.written().saturating_sub(s.committed);
    if s.busy || s.lease_lost.is_some() {
        return (None, pending);
    }
    if pending > 0 && s.cut_due.is_none() {
        s.cut_due = Some(age_cut_due(now, config.max_chunk_age));
    }
    let aged = s.cut_due.is_some_and(|due| now >= due);
    let work = if s.retry_at.is_some_and(|at| at > now) {
        let unstaged = upload.file.written().saturating_sub(s.staged_end());
        let ended = s.end.is_some() && upload.file.settled();
        (store_down
            && s.reconciled
            && unstaged > 0
            && (ended || aged || unstaged >= config.max_chunk_bytes as u64))
            .then_some(Work::Stage)
    } else {
        let checkpoint_due =
            s.next_seq > s.checkpointed && s.checkpoint_at.elapsed() >= config.checkpoint_every;
        (!s.reconciled
            || checkpoint_due
            || s.end.is_some()
            || (pending >= config.max_chunk_bytes as u64 && !defer)
            || (pending > 0 && aged))
            .then_some(Work::Upload)
    };
    s.busy = work.is_some();
    (work, pending)
}

impl Inner {
    async fn process(&self, upload: &Upload) {
        let result = self.try_process(upload).await;
        self.settle(upload, result).await;
    }

    /// Renews a recording's lease if it is due (see [`keep_leases`]).
    async fn renew_lease(&self, upload: &Upload) {
        let _op = upload.lease_op.lock().await;
        let held = {
            let s = upload.state();
            match &s.lease {
                Some(held) if s.lease_lost.is_none() && Instant::now() >= held.renew_at => {
                    held.clone()
                }
                // Released (finalized) or lost meanwhile, or renewed already.
                _ => return,
            }
        };
        let ttl = self.config.lease_ttl;
        let (id, node) = (&upload.file.id, &self.config.node_id);
        let started = Instant::now();
        match crate::lease::keep(&upload.store, id, &upload.meta, node, &held, ttl).await {
            Ok(renewed) => {
                // Due at a third of its life; one landing a third later is close to a
                // takeover, and worth a line.
                let late = started.saturating_duration_since(held.renew_at) + started.elapsed();
                Metrics::add(&self.metrics.lease_renewals, 1);
                if late > ttl / 3 {
                    Metrics::add(&self.metrics.lease_renewals_late, 1);
                    tracing::warn!(recording_id = %id, ?late, took = ?started.elapsed(), "lease renewed late");
                }
                upload.state().lease = Some(renewed);
            }
            Err(crate::lease::LeaseError::Lost { holder, .. }) => {
                self.lose_lease(upload, &holder).await;
            }
            Err(e) => {
                // Tried again in an eighth of the lease's life: a few tries before a peer
                // could see it expire. An outage is reported once, by the health probe.
                Metrics::add(&self.metrics.lease_renewals_failed, 1);
                if self.health.is_up(id.region()) {
                    tracing::warn!(recording_id = %id, error = %error_chain(&e), "lease renewal failed; will retry");
                } else {
                    tracing::debug!(recording_id = %id, error = %error_chain(&e), "lease renewal failed; will retry");
                }
                if let Some(held) = upload.state().lease.as_mut() {
                    held.renew_at = Instant::now() + ttl / 8;
                }
            }
        }
    }

    /// Stops a recording whose lease another node holds, once: its staged chunks go, its spool
    /// stays, and its stream ends.
    async fn lose_lease(&self, upload: &Upload, holder: &str) {
        let message =
            format!("another node took the recording over ({holder}); the spool keeps its bytes");
        {
            let mut s = upload.state();
            if s.lease_lost.is_some() {
                return; // an upload step found what the lease keeper already handled
            }
            s.lease_lost = Some(message.clone());
        }
        tracing::error!(recording_id = %upload.file.id, %message, "lease lost; uploading stops");
        self.drop_staged(upload).await;
        upload.progress.send_modify(|p| p.lost = Some(message));
    }

    /// Records how an upload step ended: success clears the failure state; a lost lease stops
    /// the upload for good; any other failure backs off.
    async fn settle(&self, upload: &Upload, result: Result<(), UploadError>) {
        let region = upload.file.id.region();
        match result {
            Ok(()) => {
                self.health.up(region);
                let mut s = upload.state();
                s.attempts = 0;
                s.retry_at = None;
                if s.last_error.take().is_some() {
                    upload.progress.send_modify(|p| p.error = None);
                }
            }
            Err(UploadError::Lease(crate::lease::LeaseError::Lost { holder, .. })) => {
                self.lose_lease(upload, &holder).await;
            }
            Err(e) => {
                Metrics::add(&self.metrics.upload_failures, 1);
                self.health.failed(region);
                self.health.retried(region);
                if e.transient() {
                    self.health.down(region, &error_chain(&e));
                }
                let mut s = upload.state();
                s.attempts += 1;
                let backoff = RETRY_BACKOFF_FIRST
                    .saturating_mul(1 << s.attempts.min(16))
                    .min(RETRY_BACKOFF_CAP)
                    .mul_f64(rand::rng().random_range(0.5..1.5));
                s.retry_at = Some(Instant::now() + backoff);
                let message = error_chain(&e);
                s.last_error = Some(message.clone());
                if s.attempts >= 5 {
                    tracing::error!(recording_id = %upload.file.id, attempts = s.attempts, retry_in = ?backoff, error = %message, "upload keeps failing; spool keeps the bytes");
                } else {
                    tracing::warn!(recording_id = %upload.file.id, attempts = s.attempts, retry_in = ?backoff, error = %message, "upload failed; will retry");
                }
                upload.progress.send_modify(|p| p.error = Some(message));
            }
        }
    }

    /// Hands a catalog row just written to the store to the local catalog. The catalog is a
    /// cache that rescans the store, so a failure here is logged, not fatal.
    async fn note_row(&self, row: CatalogRow) {
        if let Some(catalog) = &self.catalog
            && let Err(e) = catalog.upsert(vec![row]).await
        {
            tracing::warn!(error = %error_chain(&e), "catalog update failed; the next scan repairs it");
        }
    }

    async fn try_process(&self, upload: &Upload) -> Result<(), UploadError> {
        let id = &upload.file.id;
        self.hold_lease(upload).await?;
        let needs_live_row = upload.state().needs_live_row();
        if needs_live_row {
            let header = CastHeader::from_value(upload.meta.header.clone()).ok();
            let row = CatalogRow::live(id, &upload.meta.node_id, header.as_ref());
            let path = ObjectKey::catalog(id);
            put_overwrite(upload.store.as_ref(), &path, json_bytes(&row))
                .await
                .map_err(UploadError::store("put", &path))?;
            self.note_row(row).await;
            upload.state().live_row_written = true;
        }
        if !upload.state().reconciled {
            self.reconcile(upload).await?;
        }
        let finalized_elsewhere = upload.state().stored_manifest.is_some();
        if finalized_elsewhere {
            return self.finalize(upload).await;
        }
        if !self.put_staged(upload).await? {
            return self.reconcile(upload).await;
        }
        // Two-stage pipeline: chunk n+1 is cut and compressed while chunk n is being put.
        let (mut offset, mut seq, mut body) = {
            let s = upload.state();
            (s.committed, s.next_seq, s.body.clone())
        };
        let mut in_flight = InFlight::with_capacity(PUTS_IN_FLIGHT);
        // When an aged cut comes, this upload takes every full chunk written by then, deferred
        // or not: no byte waits much past `chunk.max_age`.
        let mut drain_to = 0;
        loop {
            self.hold_lease(upload).await?;
            let (ended, aged) = {
                let s = upload.state();
                let aged = s.cut_due.is_some_and(|due| Instant::now() >= due);
                // The end of the data file is the recording's end only once the data writer
                // is done with everything the stream handed over.
                (s.end.is_some() && upload.file.settled(), aged)
            };
            if aged {
                drain_to = upload.file.written();
            }
            let take_full = offset < drain_to || !self.deferring.load(Ordering::Relaxed);
            let pending = upload.file.written().saturating_sub(offset);
            let full = take_full && pending >= self.config.max_chunk_bytes as u64;
            if pending == 0 || !(ended || aged || full) {
                break;
            }
            let want_kib = budget_kib(pending.min(self.config.max_chunk_bytes as u64));
            let buffer = match self.buffer(upload, want_kib, &mut in_flight).await? {
                Budget::Granted(buffer) => buffer,
                Budget::KeyTaken => return self.reconcile(upload).await,
                Budget::Closed => break,
            };
            let Some(raw) = self.next_raw(upload, seq, offset, pending, ended).await? else {
                break;
            };
            upload.state().planned.insert(seq, raw.len() as u64);
            let mut prepared = self.prepare(upload, seq, offset, raw, body, None).await?;
            prepared.buffer = Some(buffer);
            body = prepared.body_after.clone();
            offset += prepared.raw_len;
            seq += 1;
            if in_flight.len() >= PUTS_IN_FLIGHT
                && let Some((previous, put)) = in_flight.pop_front()
                && !self.publish(upload, previous, put).await?
            {
                // Someone else's chunk holds the key: check it, then start over from state.
                return self.reconcile(upload).await;
            }
            in_flight.push_back(start_put(upload, prepared, &self.puts));
        }
        // Commits happen in order: chunk n+1 counts only once chunk n is stored.
        if !self.publish_all(upload, &mut in_flight).await? {
            return self.reconcile(upload).await;
        }
        let checkpoint_due = {
            let s = upload.state();
            s.next_seq > s.checkpointed && s.checkpoint_at.elapsed() >= self.config.checkpoint_every
        };
        if checkpoint_due {
            self.checkpoint(upload).await?;
        }
        let (ended, committed) = {
            let s = upload.state();
            (s.end.is_some(), s.committed)
        };
        // Every byte the stream handed over must be in the data file and committed: the data
        // writer can lag the stream's end, or be retrying a write the disk refused.
        if ended && upload.file.settled() && committed == upload.file.written() {
            self.finalize(upload).await?;
        }
        Ok(())
    }

    /// Takes `kib` of the buffer budget. It never waits for budget while holding some: the
    /// chunks in flight are published first.
    async fn buffer(
        &self,
        upload: &Upload,
        kib: u32,
        in_flight: &mut InFlight,
    ) -> Result<Budget, UploadError> {
        if let Ok(buffer) = self.buffers.clone().try_acquire_many_owned(kib) {
            return Ok(Budget::Granted(buffer));
        }
        if !self.publish_all(upload, in_flight).await? {
            return Ok(Budget::KeyTaken);
        }
        Ok(match self.buffers.clone().acquire_many_owned(kib).await {
            Ok(buffer) => Budget::Granted(buffer),
            Err(_) => Budget::Closed,
        })
    }

    /// Publishes the chunks in flight, in order. False when a chunk key was taken.
    async fn publish_all(
        &self,
        upload: &Upload,
        in_flight: &mut InFlight,
    ) -> Result<bool, UploadError> {
        while let Some((previous, put)) = in_flight.pop_front() {
            if !self.publish(upload, previous, put).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The raw bytes of chunk `seq` at `offset`, or `None` to wait for the line to end. A chunk
    /// cut before (its put failed while later ones were in flight, or it was staged) is cut
    /// again at the same place, so a later chunk that did land is found identical and adopted.
    async fn next_raw(
        &self,
        upload: &Upload,
        seq: u32,
        offset: u64,
        pending: u64,
        ended: bool,
    ) -> Result<Option<Vec<u8>>, UploadError> {
        let planned = upload.state().planned.get(&seq).copied();
        match planned {
            Some(len) if len <= pending => {
                Ok(Some(upload.file.read_at(offset, len as usize).await?))
            }
            _ => self.cut(upload, offset, pending, ended).await,
        }
    }

    /// While the store is out of reach, cuts and compresses the chunks that are due into the
    /// spool, so that the drain when it returns is puts only. Staging only saves work: on any
    /// error it stops, and the upload compresses from the data file as usual. It leaves
    /// [`STAGE_MIN_FREE_DISK_FACTOR`] × the admission threshold of the disk free.
    async fn stage(&self, upload: &Upload) {
        loop {
            // The store is back: stop, so the drain starts now.
            if self.health.is_up(upload.file.id.region()) {
                return;
            }
            if self.staged_chunks.load(Ordering::Relaxed) >= MAX_STAGED_CHUNKS {
                return;
            }
            let (offset, seq, body, ended, aged) = {
                let s = upload.state();
                let (seq, body) = s.staged.back().map_or_else(
                    || (s.next_seq, s.body.clone()),
                    |last| (last.seq + 1, last.body_after.clone()),
                );
                (
                    s.staged_end(),
                    seq,
                    body,
                    s.end.is_some() && upload.file.settled(),
                    s.cut_due.is_some_and(|due| Instant::now() >= due),
                )
            };
            let pending = upload.file.written().saturating_sub(offset);
            if pending == 0 || !(ended || aged || pending >= self.config.max_chunk_bytes as u64) {
                return;
            }
            let min_free = self
                .config
                .min_free_disk_bytes
                .saturating_mul(STAGE_MIN_FREE_DISK_FACTOR);
            if upload.file.free_bytes().is_none_or(|free| free < min_free) {
                return;
            }
            let want_kib = budget_kib(pending.min(self.config.max_chunk_bytes as u64));
            let Ok(_buffer) = self.buffers.clone().acquire_many_owned(want_kib).await else {
                return;
            };
            let prepared = match self.next_raw(upload, seq, offset, pending, ended).await {
                Ok(Some(raw)) => self.prepare(upload, seq, offset, raw, body, None).await,
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let prepared = match prepared {
                Ok(prepared) => prepared,
                Err(e) => {
                    tracing::warn!(recording_id = %upload.file.id, error = %error_chain(&e), "cannot stage a chunk; it is compressed when the store is back");
                    return;
                }
            };
            let stored_len = prepared.compressed.len() as u64;
            if let Err(e) = upload.file.stage(seq, prepared.compressed).await {
                tracing::warn!(recording_id = %upload.file.id, error = %error_chain(&e), "cannot stage a chunk; it is compressed when the store is back");
                upload.file.unstage(seq).await;
                return;
            }
            Metrics::add(&self.metrics.staged_bytes, stored_len);
            self.staged_chunks.fetch_add(1, Ordering::Relaxed);
            let mut s = upload.state();
            s.planned.insert(seq, prepared.raw_len);
            s.staged.push_back(Staged {
                seq,
                offset,
                raw_len: prepared.raw_len,
                stats: prepared.stats,
                digest: prepared.digest,
                body_after: prepared.body_after,
                stored_len,
            });
            let end = offset + prepared.raw_len;
            s.cut_due = (upload.file.written() > end)
                .then(|| age_cut_due(Instant::now(), self.config.max_chunk_age));
        }
    }

    /// Puts the chunks staged during an outage, in order, [`PUTS_IN_FLIGHT`] at a time; each
    /// staged file goes once its chunk is committed. False when a chunk key was taken.
    async fn put_staged(&self, upload: &Upload) -> Result<bool, UploadError> {
        let staged: Vec<Staged> = {
            let s = upload.state();
            match s.staged.front() {
                None => return Ok(true),
                Some(first) if first.seq == s.next_seq && first.offset == s.committed => {
                    s.staged.iter().cloned().collect()
                }
                // Commits moved on without them (adopted chunks): compress again.
                Some(_) => Vec::new(),
            }
        };
        if staged.is_empty() {
            self.drop_staged(upload).await;
            return Ok(true);
        }
        let mut in_flight = InFlight::with_capacity(PUTS_IN_FLIGHT);
        for chunk in staged {
            // The lease may be lost meanwhile (`keep_leases` renews it).
            self.hold_lease(upload).await?;
            let buffer = match self
                .buffer(upload, budget_kib(chunk.stored_len), &mut in_flight)
                .await?
            {
                Budget::Granted(buffer) => buffer,
                Budget::KeyTaken => return Ok(false),
                Budget::Closed => break,
            };
            let compressed = match upload.file.staged(chunk.seq).await {
                Ok(compressed) => compressed,
                Err(e) => {
                    tracing::warn!(recording_id = %upload.file.id, error = %error_chain(&e), "cannot read a staged chunk; compressing again");
                    break;
                }
            };
            if in_flight.len() >= PUTS_IN_FLIGHT
                && let Some((previous, put)) = in_flight.pop_front()
                && !self.publish(upload, previous, put).await?
            {
                return Ok(false);
            }
            let prepared = Prepared {
                seq: chunk.seq,
                offset: chunk.offset,
                raw_len: chunk.raw_len,
                compressed,
                stats: chunk.stats,
                digest: chunk.digest,
                body_after: chunk.body_after,
                buffer: Some(buffer),
            };
            in_flight.push_back(start_put(upload, prepared, &self.puts));
        }
        if !self.publish_all(upload, &mut in_flight).await? {
            return Ok(false);
        }
        // Whatever is still staged could not be read: it is cut and compressed again.
        self.drop_staged(upload).await;
        Ok(true)
    }

    /// Gives up the staged chunks (their bytes are still in the data file).
    async fn drop_staged(&self, upload: &Upload) {
        let staged = std::mem::take(&mut upload.state().staged);
        for chunk in staged {
            Metrics::sub(&self.metrics.staged_bytes, chunk.stored_len);
            self.staged_chunks.fetch_sub(1, Ordering::Relaxed);
            upload.file.unstage(chunk.seq).await;
        }
    }

    /// Reads the next chunk's raw bytes from the spool, or `None` to wait for the line to end.
    async fn cut(
        &self,
        upload: &Upload,
        committed: u64,
        pending: u64,
        ended: bool,
    ) -> Result<Option<Vec<u8>>, UploadError> {
        let max = self.config.max_chunk_bytes;
        let first = pending.min(max as u64) as usize;
        let mut buf = upload.file.read_at(committed, first).await?;
        let mut len = chunk::next_chunk_len(&buf, max, ended && buf.len() as u64 == pending);
        if len.is_none() && pending > buf.len() as u64 {
            // The line at the window's end is longer than the window: read on to its end.
            let limit = (max + self.config.max_line_bytes + 1) as u64;
            let want = pending.min(limit) as usize;
            buf = upload.file.read_at(committed, want).await?;
            len = chunk::next_chunk_len(&buf, max, ended && buf.len() as u64 == pending);
            if len.is_none() && buf.len() as u64 == limit {
                len = Some(buf.len());
            }
        }
        Ok(len.map(|len| {
            buf.truncate(len);
            buf
        }))
    }

    /// Compresses a chunk and, at the same time on another thread, scans its lines and hashes
    /// it (the chunk digest and the running body digest).
    /// `stored` is the compressed object when it is already in the store (reconciliation).
    async fn prepare(
        &self,
        upload: &Upload,
        seq: u32,
        offset: u64,
        raw: Vec<u8>,
        body: Sha256,
        stored: Option<Bytes>,
    ) -> Result<Prepared, UploadError> {
        let corrupt = |what: String| UploadError::Corrupt {
            recording_id: upload.file.id.to_string(),
            what,
        };
        let raw = Arc::new(raw);
        let thorough = stored.is_none()
            && compress_thorough(
                self.config.adaptive_compression,
                upload
                    .file
                    .written()
                    .saturating_sub(offset + raw.len() as u64),
                self.config.max_chunk_bytes as u64,
                self.waiting_for_slot.load(Ordering::Relaxed),
                self.ingest_rate.load(Ordering::Relaxed),
                self.thorough_max_rate,
            );
        let encoder = match stored {
            Some(_) => None,
            None => Some(self.take_encoder(thorough)?),
        };
        let to_compress = raw.clone();
        let work = move || {
            let mut encoder = encoder?;
            let compressed = encoder.encode(&to_compress);
            Some((encoder, compressed))
        };
        let compress = match thorough.then(crate::background::spare).flatten() {
            Some(spare) => spare.spawn_blocking(work),
            None => tokio::task::spawn_blocking(work),
        };
        let to_scan = raw.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let stats = ChunkStats::scan(&to_scan, seq == 0);
            let digest = chunk::digest(&to_scan);
            let mut body = body;
            body.update(to_scan.as_slice());
            (stats, digest, body)
        });
        let (compressed, scanned) = tokio::join!(compress, scan);
        let compressed = match (
            compressed.map_err(|e| corrupt(format!("compression task failed: {e}")))?,
            stored,
        ) {
            (_, Some(stored)) => stored,
            (Some((encoder, compressed)), None) => {
                self.return_encoder(encoder, thorough);
                if thorough {
                    Metrics::add(&self.metrics.chunks_compressed_thorough, 1);
                }
                Bytes::from(compressed.map_err(|e| corrupt(format!("compression failed: {e}")))?)
            }
            (None, None) => return Err(corrupt("no compression context".to_owned())),
        };
        let (stats, digest, body_after) =
            scanned.map_err(|e| corrupt(format!("scan task failed: {e}")))?;
        Ok(Prepared {
            seq,
            offset,
            raw_len: raw.len() as u64,
            compressed,
            stats,
            digest,
            body_after,
            buffer: None,
        })
    }

    /// Waits for a chunk's put and records the commit. Returns false when its key was taken.
    async fn publish(
        &self,
        upload: &Upload,
        prepared: Prepared,
        put: tokio::task::JoinHandle<Result<(), object_store::Error>>,
    ) -> Result<bool, UploadError> {
        let path = ObjectKey::chunk(&upload.file.id, prepared.seq);
        let result = put.await.map_err(|e| UploadError::Corrupt {
            recording_id: upload.file.id.to_string(),
            what: format!("put task failed: {e}"),
        })?;
        match result {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {
                tracing::warn!(
                    seq = prepared.seq,
                    "chunk key already taken; checking the stored chunk"
                );
                upload.state().reconciled = false;
                return Ok(false);
            }
            Err(e) => return Err(UploadError::store("put", &path)(e)),
        }
        Metrics::add(&self.metrics.bytes_stored, prepared.compressed.len() as u64);
        self.apply_commit(upload, prepared).await?;
        Ok(true)
    }

    async fn apply_commit(&self, upload: &Upload, prepared: Prepared) -> Result<(), UploadError> {
        let Prepared {
            seq,
            offset,
            raw_len,
            compressed,
            stats,
            digest,
            body_after,
            buffer: _,
        } = prepared;
        let (entry, staged) = {
            let mut s = upload.state();
            let link = s.chain.push(&digest, seq, offset, raw_len);
            s.planned.remove(&seq);
            let staged = if s.staged.front().is_some_and(|c| c.seq == seq) {
                s.staged.pop_front()
            } else {
                None
            };
            s.body = body_after;
            s.next_seq = seq + 1;
            s.committed = offset + raw_len;
            s.cut_due = (upload.file.written() > s.committed)
                .then(|| age_cut_due(Instant::now(), self.config.max_chunk_age));
            (link, staged)
        };
        if let Some(staged) = staged {
            Metrics::sub(&self.metrics.staged_bytes, staged.stored_len);
            self.staged_chunks.fetch_sub(1, Ordering::Relaxed);
            // Off the commit path: the next put waits for this commit.
            let file = upload.file.clone();
            tokio::spawn(async move { file.unstage(seq).await });
        }
        // Hashing the stored object is kept out of the lock others take to read progress.
        let entry = ChunkEntry::new(seq, offset, raw_len, &compressed, &stats, &digest, &entry);
        if let Err(e) = upload.file.log_chunk(&entry).await {
            // The store holds the chunk; the log is only a cache of its manifest entry.
            tracing::warn!(seq, error = %e, "cannot append to the chunk log; the manifest will be rebuilt from the store");
            upload.state().chunk_log_incomplete = true;
        }
        upload.file.mark_stored(offset + raw_len);
        upload
            .progress
            .send_modify(|p| p.committed = offset + raw_len);
        Metrics::add(&self.metrics.chunks_committed, 1);
        Metrics::add(&self.metrics.bytes_committed, raw_len);
        Ok(())
    }

    /// Adopts chunks found in the store past the chunk log, if they match the spool exactly.
    async fn reconcile(&self, upload: &Upload) -> Result<(), UploadError> {
        let id = &upload.file.id;
        self.drop_staged(upload).await;
        loop {
            let (seq, offset) = {
                let s = upload.state();
                (s.next_seq, s.committed)
            };
            let path = ObjectKey::chunk(id, seq);
            let stored = match upload.store.get(&path).await {
                Ok(got) => got
                    .bytes()
                    .await
                    .map_err(UploadError::store("get", &path))?,
                Err(e) if error_kind(&e) == ErrorKind::NotFound => {
                    self.remove_past_gap(upload, seq).await?;
                    break;
                }
                Err(e) => return Err(UploadError::store("get", &path)(e)),
            };
            let corrupt = |what: String| UploadError::Corrupt {
                recording_id: id.to_string(),
                what,
            };
            let raw = chunk::decode(&stored, MAX_DECODED_CHUNK_BYTES)
                .map_err(|e| corrupt(format!("stored chunk {seq} does not decode: {e}")))?;
            let available = upload.file.written().saturating_sub(offset);
            if raw.len() as u64 > available || upload.file.read_at(offset, raw.len()).await? != raw
            {
                return Err(corrupt(format!(
                    "stored chunk {seq} differs from the spool; not overwriting it"
                )));
            }
            tracing::info!(recording_id = %id, seq, "adopted a chunk committed before a restart");
            let body = upload.state().body.clone();
            let prepared = self
                .prepare(upload, seq, offset, raw, body, Some(stored))
                .await?;
            self.apply_commit(upload, prepared).await?;
        }
        // Finalized elsewhere while this node was away (a peer took its lease over): no more
        // chunks go next to that manifest; the recording only concludes.
        match read_manifest_bytes(upload.store.as_ref(), id).await {
            Ok(stored) => {
                let mut s = upload.state();
                s.stored_manifest = Some(stored);
                s.end.get_or_insert_with(|| StreamEnd {
                    outcome: StreamOutcome::Interrupted,
                    reason: Some("finalized by another node".to_owned()),
                    bytes: upload.file.received(),
                    ended_at: OffsetDateTime::now_utc(),
                });
            }
            Err(castvault_storage::reader::ReadError::NotFound { .. }) => {}
            Err(e) => {
                return Err(UploadError::Corrupt {
                    recording_id: id.to_string(),
                    what: format!("cannot read its manifest: {}", error_chain(&e)),
                });
            }
        }
        upload.state().reconciled = true;
        Ok(())
    }

    async fn finalize(&self, upload: &Upload) -> Result<(), UploadError> {
        let id = &upload.file.id;
        let stored = upload.state().stored_manifest.clone();
        if let Some((manifest, bytes)) = stored {
            return self.conclude(upload, manifest, bytes).await;
        }
        let mut chunks = upload.file.chunk_log().await;
        let (end, recovered, chain_head, body_sha256, next_seq) = {
            let s = upload.state();
            let end = s.end.clone().ok_or_else(|| UploadError::Corrupt {
                recording_id: id.to_string(),
                what: "finalize before end".into(),
            })?;
            (
                end,
                s.recovered,
                s.chain.head(),
                hex::encode(s.body.clone().finalize()),
                s.next_seq,
            )
        };
        if upload.state().chunk_log_incomplete || chunks.len() != next_seq as usize {
            chunks = self.chunk_table_from_store(upload, next_seq).await?;
        }
        let bytes = upload.file.written();
        let partial_last_line = bytes > 0 && upload.file.read_at(bytes - 1, 1).await? != b"\n";
        let status = match (end.outcome, recovered) {
            (StreamOutcome::Complete, false) => RecordingStatus::Complete,
            (StreamOutcome::Complete, true) => RecordingStatus::Recovered,
            (StreamOutcome::Interrupted, _) => RecordingStatus::Interrupted,
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_owned(),
            recording_id: id.to_string(),
            region: id.region().to_owned(),
            zone: upload.meta.zone.clone(),
            node_id: upload.meta.node_id.clone(),
            status,
            end_reason: end.reason.clone(),
            protocol: upload.meta.protocol.clone(),
            peer: upload.meta.peer.clone(),
            sender: upload.meta.sender.clone(),
            source: None,
            received_at: upload.meta.received_at,
            ended_at: end.ended_at,
            header: upload.meta.header.clone(),
            bytes,
            events: chunks.iter().map(|c| c.events).sum(),
            malformed_lines: chunks.iter().map(|c| c.malformed_lines).sum(),
            partial_last_line,
            duration_seconds: chunks
                .iter()
                .rev()
                .find_map(|c| c.last_event_time)
                .unwrap_or(0.0),
            body_sha256,
            chain_head: hex::encode(chain_head),
            chunks,
        };
        // The final checkpoint and the manifest are independent objects: they go together. A
        // failure of either retries both; the manifest's conditional create then finds the one
        // stored, and the checkpoint is put again (kept if there).
        let checkpoint_due = upload.state().checkpointed < next_seq || next_seq == 0;
        let checkpoint = async {
            if checkpoint_due {
                self.checkpoint(upload).await?;
            }
            Ok::<(), UploadError>(())
        };
        let path = ObjectKey::manifest(id);
        let manifest_bytes = json_bytes(&manifest);
        let (checkpointed, created) = tokio::join!(
            checkpoint,
            put_create(upload.store.as_ref(), &path, manifest_bytes.clone())
        );
        let (manifest, manifest_bytes) = match created {
            Ok(()) => (manifest, manifest_bytes),
            // Finalized before a restart: the stored manifest stands, and the row follows it.
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {
                read_manifest_bytes(upload.store.as_ref(), id)
                    .await
                    .map_err(|e| UploadError::Corrupt {
                        recording_id: id.to_string(),
                        what: format!("a manifest exists but cannot be read: {}", error_chain(&e)),
                    })?
            }
            Err(e) => return Err(UploadError::store("put", &path)(e)),
        };
        checkpointed?;
        self.conclude(upload, manifest, manifest_bytes).await
    }

    /// Ends a recording whose manifest is stored (by this node or, after a lease takeover, by
    /// another): its seal (put again in case a node died between the manifest and its seal),
    /// its catalog row, its lease, its spool files.
    async fn conclude(
        &self,
        upload: &Upload,
        manifest: Manifest,
        manifest_bytes: Bytes,
    ) -> Result<(), UploadError> {
        let id = &upload.file.id;
        let bytes = upload.file.written();
        if manifest.bytes < bytes && !self.config.acks_from_spool {
            // Only acks at storage level were ever sent, and the manifest holds every chunk
            // this node committed, so the spool's tail was never acked.
            tracing::warn!(recording_id = %id, stored = manifest.bytes, spool = bytes, "another node finalized this recording; dropping the spool's unacked tail");
        } else if manifest.bytes < bytes {
            // Another node finalized it from fewer bytes than the spool holds (it took the
            // lease over while this node was away): keep the spool, say so, stop.
            let message = format!(
                "the stored manifest ({}, by {}) holds {} of the spool's {bytes} bytes; the spool keeps them",
                serde_json::to_value(manifest.status).unwrap_or_default(),
                manifest.end_reason.as_deref().unwrap_or("another node"),
                manifest.bytes
            );
            return Err(crate::lease::LeaseError::Lost {
                id: id.to_string(),
                holder: message,
            }
            .into());
        }
        let status = manifest.status;
        // The seal and the row both follow the manifest and not each other; the lease goes
        // only after both, so a node dying in between leaves a lease for a peer to conclude.
        let row = async {
            if let Some(row) = CatalogRow::from_manifest(&manifest) {
                let path = ObjectKey::catalog(id);
                put_overwrite(upload.store.as_ref(), &path, json_bytes(&row))
                    .await
                    .map_err(UploadError::store("put", &path))?;
                self.note_row(row).await;
            }
            Ok::<(), UploadError>(())
        };
        tokio::try_join!(self.seal(upload, &manifest_bytes), row)?;
        if upload.leased {
            let _op = upload.lease_op.lock().await;
            crate::lease::release(&upload.store, id).await?;
            let mut s = upload.state();
            s.lease = None;
            s.lease_released = true;
        }
        upload.file.remove().await?;
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        Metrics::sub(&self.metrics.recordings_pending, 1);
        Metrics::add(&self.metrics.recordings_finalized, 1);
        upload.progress.send_modify(|p| p.finalized = true);
        tracing::info!(recording_id = %id, ?status, bytes, chunks = manifest.chunks.len(), "recording finalized");
        Ok(())
    }

    /// Removes chunks stored past `gap`, the first missing sequence number: puts that landed
    /// while an earlier one failed (up to [`PUTS_IN_FLIGHT`] - 1 of them). They were never acked,
    /// since acks count only the committed prefix, and were cut at places a retry may not cut.
    async fn remove_past_gap(&self, upload: &Upload, gap: u32) -> Result<(), UploadError> {
        let planned = !upload.state().planned.is_empty();
        if planned {
            // Same process: the retry cuts at the same places and adopts them instead.
            return Ok(());
        }
        for seq in gap + 1..gap + PUTS_IN_FLIGHT as u32 {
            let path = ObjectKey::chunk(&upload.file.id, seq);
            match upload.store.delete(&path).await {
                Ok(()) => {}
                Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
                Err(e) => return Err(UploadError::store("delete", &path)(e)),
            }
        }
        Ok(())
    }

    /// Signs and stores a checkpoint of every chunk committed so far.
    async fn checkpoint(&self, upload: &Upload) -> Result<(), UploadError> {
        let id = &upload.file.id;
        let (chunks, bytes, head) = {
            let s = upload.state();
            (s.next_seq, s.committed, s.chain.head())
        };
        let cp =
            self.config
                .signer
                .checkpoint(&self.config.node_id, id.as_str(), chunks, bytes, &head);
        let path = ObjectKey::checkpoint(id, chunks);
        match put_create(upload.store.as_ref(), &path, Bytes::from(cp.to_bytes())).await {
            // The same chunks were checkpointed before a restart.
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(UploadError::store("put", &path)(e)),
        }
        let mut s = upload.state();
        s.checkpointed = chunks;
        s.checkpoint_at = Instant::now();
        Ok(())
    }

    /// Stores the seal over a manifest's exact bytes (kept if one is there already).
    async fn seal(&self, upload: &Upload, manifest: &[u8]) -> Result<(), UploadError> {
        let id = &upload.file.id;
        put_seal(
            upload.store.as_ref(),
            &self.config.signer,
            &self.config.node_id,
            id,
            manifest,
        )
        .await
        .map_err(UploadError::store("put", &ObjectKey::seal(id)))
    }

    /// Creates the recording's lease before its first put; fails once the lease is lost.
    /// Renewals are [`keep_leases`]' alone.
    async fn hold_lease(&self, upload: &Upload) -> Result<(), UploadError> {
        if !upload.leased {
            return Ok(());
        }
        let id = &upload.file.id;
        let lost = |holder: &str| {
            UploadError::Lease(crate::lease::LeaseError::Lost {
                id: id.to_string(),
                holder: holder.to_owned(),
            })
        };
        {
            let s = upload.state();
            if let Some(holder) = &s.lease_lost {
                return Err(lost(holder));
            }
            if s.lease.is_some() || s.lease_released {
                return Ok(());
            }
        }
        let _op = upload.lease_op.lock().await;
        let held = {
            let s = upload.state();
            s.lease.is_some() || s.lease_released
        };
        if held {
            return Ok(());
        }
        let (ttl, node) = (self.config.lease_ttl, &self.config.node_id);
        let held = crate::lease::acquire(&upload.store, id, &upload.meta, node, ttl).await?;
        upload.state().lease = Some(held);
        Ok(())
    }

    /// Rebuilds a recording's chunk table by reading its committed chunks back from the store
    /// (when the local chunk log could not be written).
    async fn chunk_table_from_store(
        &self,
        upload: &Upload,
        chunks: u32,
    ) -> Result<Vec<ChunkEntry>, UploadError> {
        let id = &upload.file.id;
        let rebuilt = reader::rebuild_chunk_table(upload.store.as_ref(), id, Some(chunks))
            .await
            .map_err(|e| UploadError::Corrupt {
                recording_id: id.to_string(),
                what: format!("reading its chunks back: {}", error_chain(&e)),
            })?;
        if rebuilt.chain_head != upload.state().chain.head() {
            return Err(UploadError::Corrupt {
                recording_id: id.to_string(),
                what: "chunks read back from the store do not match the committed chain".to_owned(),
            });
        }
        tracing::info!(chunks, "rebuilt the chunk table from the store");
        Ok(rebuilt.chunks)
    }

    fn encoder_pool(&self, thorough: bool) -> MutexGuard<'_, Vec<ChunkEncoder>> {
        if thorough {
            &self.thorough_encoders
        } else {
            &self.encoders
        }
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take_encoder(&self, thorough: bool) -> Result<ChunkEncoder, UploadError> {
        let pooled = self.encoder_pool(thorough).pop();
        match pooled {
            Some(encoder) => Ok(encoder),
            None => if thorough {
                ChunkEncoder::thorough()
            } else {
                ChunkEncoder::new(self.config.compression_level)
            }
            .map_err(|e| UploadError::Corrupt {
                recording_id: String::new(),
                what: format!("cannot create a zstd context: {e}"),
            }),
        }
    }

    fn return_encoder(&self, encoder: ChunkEncoder, thorough: bool) {
        let mut pool = self.encoder_pool(thorough);
        if pool.len() < UPLOAD_CONCURRENCY {
            pool.push(encoder);
        }
    }
}

/// Puts `node_id`'s seal over a manifest's exact stored bytes; a seal already there is kept.
pub(crate) async fn put_seal(
    store: &dyn object_store::ObjectStore,
    signer: &NodeKey,
    node_id: &str,
    id: &RecordingId,
    manifest: &[u8],
) -> Result<(), object_store::Error> {
    let seal = signer.seal(node_id, id.as_str(), manifest);
    match put_create(store, &ObjectKey::seal(id), Bytes::from(seal.to_bytes())).await {
        Err(e) if error_kind(&e) != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn json_bytes<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec_pretty(value).unwrap_or_default())
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Waits until every registered recording is finalized, or the deadline passes.
pub async fn drain(uploader: &Uploader, deadline: Duration) -> usize {
    let until = Instant::now() + deadline;
    while uploader.pending() > 0 && Instant::now() < until {
        uploader.poke();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    uploader.pending()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thorough_only_while_keeping_up() {
        const CHUNK: u64 = 4 << 20;
        const MAX: u64 = 32 << 20;
        // Keeping up: this chunk is the recording's last due, nobody waits, ingest is light.
        assert!(compress_thorough(true, 0, CHUNK, 0, 0, MAX));
        assert!(compress_thorough(true, CHUNK - 1, CHUNK, 0, MAX, MAX));
        // Off by config.
        assert!(!compress_thorough(false, 0, CHUNK, 0, 0, MAX));
        // A whole chunk more is waiting behind this one.
        assert!(!compress_thorough(true, CHUNK, CHUNK, 0, 0, MAX));
        // Recordings wait for an upload slot.
        assert!(!compress_thorough(true, 0, CHUNK, 1, 0, MAX));
        // Ingest is busy (or not measured yet).
        assert!(!compress_thorough(true, 0, CHUNK, 0, MAX + 1, MAX));
        assert!(!compress_thorough(true, 0, CHUNK, 0, u64::MAX, MAX));
    }

    #[test]
    fn full_chunks_wait_only_in_a_burst_that_fits_the_budget() {
        const BUSY: u64 = 32 << 20;
        const BUDGET: u64 = 2 << 30;
        assert!(defer_full_chunks(BUSY + 1, BUSY, 0, BUDGET));
        assert!(defer_full_chunks(u64::MAX - 1, BUSY, BUDGET - 1, BUDGET));
        // Not measured yet (just started).
        assert!(!defer_full_chunks(u64::MAX, BUSY, 0, BUDGET));
        // Ingest is not busy.
        assert!(!defer_full_chunks(BUSY, BUSY, 0, BUDGET));
        assert!(!defer_full_chunks(0, BUSY, 0, BUDGET));
        // The backlog fills the budget: uploads go on during the burst.
        assert!(!defer_full_chunks(BUSY + 1, BUSY, BUDGET, BUDGET));
        // No memory budget (memory unreadable): never defer.
        assert!(!defer_full_chunks(BUSY + 1, BUSY, 0, 0));
    }

    #[test]
    fn rate_meter_remembers_the_last_two_windows() {
        let t0 = Instant::now();
        let mut meter = RateMeter {
            at: t0,
            bytes: 0,
            last: 0,
        };
        assert_eq!(
            meter.sample(t0 + RATE_WINDOW / 2, 1 << 20),
            None,
            "within a window"
        );
        // 4 MiB in the first second, then nothing: the burst counts for one more window.
        assert_eq!(
            meter.sample(t0 + Duration::from_secs(1), 4 << 20),
            Some(4 << 20)
        );
        assert_eq!(
            meter.sample(t0 + Duration::from_secs(2), 4 << 20),
            Some(4 << 20)
        );
        assert_eq!(meter.sample(t0 + Duration::from_secs(3), 4 << 20), Some(0));
    }
}
