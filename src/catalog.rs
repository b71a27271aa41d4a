//! The catalog: an SQLite database (with FTS5) under the data directory that answers listing,
//! filtering and full-text search. It is a cache: every row comes from the store's catalog rows
//! (`v1/catalog/...`) and the indexer's transcripts, it is rebuilt from the store on start, and
//! deleting the file loses nothing.
//!
//! Kept current three ways: this node's uploader upserts a row whenever it writes one (a
//! recording starts or ends); a scan of the store's recent catalog days catches other nodes'
//! recordings every [`RECENT_SCAN_EVERY`], with the notices of recent days that name rows
//! written under older days (`castvault import`); a full scan runs on start and drops rows whose
//! recordings are gone from the store.
//!
//! Listing uses keyset pagination: the cursor is the last row's sort value and id, so page N
//! costs the same as page 1 at any catalog size.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use castvault_storage::keys::ObjectKey;
use castvault_storage::manifest::{CatalogRow, RecordingStatus};
use castvault_storage::store::{DynStore, Stores};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Semaphore;

/// Read connections kept open: queries run on the blocking pool, so this bounds both the
/// connections and the blocking threads listing and search can occupy at once.
const READ_CONNECTIONS: usize = 4;

/// How often the store's catalog rows of today and yesterday are re-read (recordings that
/// other nodes received).
pub const RECENT_SCAN_EVERY: Duration = Duration::from_secs(30);

/// Catalog rows fetched from the store at once during a scan.
const SCAN_FETCHES_IN_FLIGHT: usize = 32;

/// Rows written per transaction during a scan.
const SCAN_BATCH: usize = 500;

/// Notice names remembered as read; past this the set is cleared (a notice read again only
/// costs a catalog lookup per id).
const MAX_NOTICES_REMEMBERED: usize = 100_000;

/// Page size when the request names none, and the largest page served.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 500;

/// Search hits returned per recording in a list.
pub const HITS_PER_RECORDING: usize = 5;

/// Matching transcript blocks read per recording for its hits: in a list page (so a page of
/// 50 costs at most 50 × 4 × 16 KiB of text), and on one recording's player page.
const LIST_HIT_BLOCKS: usize = 4;
const PLAYER_HIT_BLOCKS: usize = 256;

/// Bumped whenever the schema changes; an older catalog is dropped and rebuilt from the store.
const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS recordings (
    id TEXT PRIMARY KEY,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    region TEXT NOT NULL,
    status TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    duration REAL NOT NULL,
    src_node TEXT,
    src_node_user TEXT,
    ssh_user TEXT,
    local_user TEXT,
    connection_id TEXT,
    row TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rec_started ON recordings(started_ms, id);
CREATE INDEX IF NOT EXISTS rec_duration ON recordings(duration, id);
CREATE INDEX IF NOT EXISTS rec_bytes ON recordings(bytes, id);
CREATE INDEX IF NOT EXISTS rec_src_node ON recordings(src_node, started_ms);
CREATE INDEX IF NOT EXISTS rec_src_node_user ON recordings(src_node_user, started_ms);
CREATE INDEX IF NOT EXISTS rec_ssh_user ON recordings(ssh_user, started_ms);
CREATE INDEX IF NOT EXISTS rec_local_user ON recordings(local_user, started_ms);
CREATE INDEX IF NOT EXISTS rec_connection ON recordings(connection_id);
CREATE INDEX IF NOT EXISTS rec_status ON recordings(status, started_ms);
CREATE TABLE IF NOT EXISTS tags (
    tag TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (tag, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_id ON tags(id);
CREATE TABLE IF NOT EXISTS indexed (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    complete INTEGER NOT NULL
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS transcript USING fts5(
    text,
    times UNINDEXED,
    tokenize = 'unicode61',
    detail = none
);
";

/// Transcript lines are indexed in blocks of about this many bytes: a block is one full-text
/// row, so a search touches one row per block instead of one per line, and the block's rowid
/// names its recording (see [`BLOCK_BITS`]).
const BLOCK_BYTES: usize = 16 << 10;

/// A block's rowid is `num << BLOCK_BITS | block`, where `num` is the recording's number in
/// `indexed`: searches and deletes of one recording are rowid ranges, and finding the
/// recordings that match reads rowids only. At most `1 << BLOCK_BITS` blocks per recording
/// (16 GiB of transcript); lines past that are not indexed.
const BLOCK_BITS: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog query")]
    Sql(#[from] rusqlite::Error),
    #[error("catalog task failed: {0}")]
    Task(String),
    #[error("bad query: {0}")]
    BadQuery(String),
    #[error("listing the store's catalog rows")]
    Store(#[source] object_store::Error),
}

/// Sort keys for listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SortKey {
    #[default]
    Started,
    Duration,
    Bytes,
}

impl SortKey {
    fn column(self) -> &'static str {
        match self {
            Self::Started => "started_ms",
            Self::Duration => "duration",
            Self::Bytes => "bytes",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// What a listing asks for. Every field is optional; names are the API's query parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// Started at or after (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub from: Option<OffsetDateTime>,
    /// Started before (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub to: Option<OffsetDateTime>,
    #[serde(rename = "srcNode")]
    pub src_node: Option<String>,
    /// Comma-separated; a recording must carry every one.
    #[serde(rename = "srcNodeTags")]
    pub src_node_tags: Option<String>,
    #[serde(rename = "srcNodeUser")]
    pub src_node_user: Option<String>,
    #[serde(rename = "sshUser")]
    pub ssh_user: Option<String>,
    #[serde(rename = "localUser")]
    pub local_user: Option<String>,
    #[serde(rename = "connectionID")]
    pub connection_id: Option<String>,
    pub region: Option<String>,
    pub status: Option<RecordingStatus>,
    /// Seconds.
    #[serde(rename = "minDuration")]
    pub min_duration: Option<f64>,
    #[serde(rename = "maxDuration")]
    pub max_duration: Option<f64>,
    #[serde(rename = "minBytes")]
    pub min_bytes: Option<u64>,
    #[serde(rename = "maxBytes")]
    pub max_bytes: Option<u64>,
    /// Full-text search in what the screen showed.
    pub q: Option<String>,
    #[serde(default)]
    pub sort: SortKey,
    #[serde(default)]
    pub order: Order,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl Query {
    /// Parses a query string, treating empty values as absent (an HTML form submits every
    /// field, filled or not).
    ///
    /// # Errors
    /// [`CatalogError::BadQuery`] naming the parameter that does not parse or is unknown.
    pub fn parse(raw: &str) -> Result<Self, CatalogError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str::<Vec<(String, String)>>(raw)
            .map_err(|e| CatalogError::BadQuery(e.to_string()))?
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        let cleaned = serde_urlencoded::to_string(&pairs)
            .map_err(|e| CatalogError::BadQuery(e.to_string()))?;
        serde_urlencoded::from_str(&cleaned).map_err(|e| CatalogError::BadQuery(e.to_string()))
    }
}

/// Who may see what: `None` in a field means no restriction on it. A row is visible when it
/// passes every restricted field.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The recording must carry at least one of these tags.
    pub tags: Option<Vec<String>>,
    /// The recording's `srcNodeUser` must be one of these.
    pub users: Option<Vec<String>>,
    pub regions: Option<Vec<String>>,
}

impl Scope {
    pub fn allows(&self, row: &CatalogRow) -> bool {
        self.tags
            .as_ref()
            .is_none_or(|t| row.src_node_tags.iter().any(|tag| t.contains(tag)))
            && self.users.as_ref().is_none_or(|u| {
                row.src_node_user
                    .as_ref()
                    .is_some_and(|user| u.contains(user))
            })
            && self
                .regions
                .as_ref()
                .is_none_or(|r| r.contains(&row.region))
    }
}

/// One search hit: a transcript line and the time in the recording it was on screen.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub time: f64,
    pub text: String,
}

/// One listed recording, with its search hits when the query had `q`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub row: CatalogRow,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hits: Vec<Hit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub recordings: Vec<Listed>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A transcript line to index: the time it was on screen and its text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TranscriptLine {
    pub t: f64,
    pub text: String,
}

pub struct Catalog {
    /// Woken on every upsert (the indexer waits on it).
    changed: tokio::sync::Notify,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    read_permits: Semaphore,
}

fn open_connection(path: &Path) -> Result<Connection, CatalogError> {
    let open = |path: &Path| -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            // A cache: drop what an older version made; the scans and the indexer refill it.
            conn.execute_batch(
                "DROP TABLE IF EXISTS transcript; DROP TABLE IF EXISTS indexed;
                 DROP TABLE IF EXISTS tags; DROP TABLE IF EXISTS recordings;",
            )?;
            conn.execute_batch(SCHEMA)?;
            conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        }
        // The scratch table `fts_query` tokenizes search text in: the transcript's tokenizer.
        conn.execute_batch(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_text USING fts5(
                 text, tokenize = 'unicode61', detail = none);
             CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms
                 USING fts5vocab(temp, query_text, row);",
        )?;
        Ok(conn)
    };
    open(path).map_err(|source| CatalogError::Open {
        path: path.to_owned(),
        source,
    })
}

fn status_name(status: RecordingStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn upsert_row(tx: &rusqlite::Transaction<'_>, row: &CatalogRow) -> rusqlite::Result<()> {
    let json = serde_json::to_string(row).unwrap_or_default();
    tx.execute(
        "INSERT INTO recordings (id, started_ms, ended_ms, region, status, bytes, duration,
             src_node, src_node_user, ssh_user, local_user, connection_id, row)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT(id) DO UPDATE SET started_ms = ?2, ended_ms = ?3, region = ?4, status = ?5,
             bytes = ?6, duration = ?7, src_node = ?8, src_node_user = ?9, ssh_user = ?10,
             local_user = ?11, connection_id = ?12, row = ?13",
        params![
            row.id,
            unix_ms(row.started_at),
            row.ended_at.map(unix_ms),
            row.region,
            status_name(row.status),
            i64::try_from(row.bytes).unwrap_or(i64::MAX),
            row.duration_seconds,
            row.src_node,
            row.src_node_user,
            row.ssh_user,
            row.local_user,
            row.connection_id,
            json,
        ],
    )?;
    tx.execute("DELETE FROM tags WHERE id = ?1", params![row.id])?;
    for tag in &row.src_node_tags {
        tx.execute(
            "INSERT OR IGNORE INTO tags (tag, id) VALUES (?1, ?2)",
            params![tag, row.id],
        )?;
    }
    Ok(())
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A cursor is the hex of `value \t id`, opaque to clients.
fn encode_cursor(value: &str, id: &str) -> String {
    hex::encode(format!("{value}\t{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(String, String), CatalogError> {
    let bad = || CatalogError::BadQuery("cursor is not one this server gave".into());
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (value, id) = text.split_once('\t').ok_or_else(bad)?;
    Ok((value.to_owned(), id.to_owned()))
}

/// An FTS5 query from user text: its tokens, as the transcript's tokenizer makes them (it runs
/// on the text in a scratch table, so accents, scripts and separators are split and folded
/// exactly as in the index), each quoted and all required. A block must hold every token;
/// where in the block is left to the hits, which look for whole words in lines. The index keeps
/// no positions (`detail = none`), so a common word's doclist is a list of block ids only
/// (reading it is what searching for one costs), and a phrase of several tokens cannot be
/// asked for: hence one quoted token at a time. Text of separators alone matches nothing.
fn fts_query(conn: &Connection, q: &str) -> rusqlite::Result<Option<String>> {
    if q.trim().is_empty() {
        return Ok(None);
    }
    conn.execute("DELETE FROM temp.query_text", [])?;
    conn.execute("INSERT INTO temp.query_text(text) VALUES (?1)", params![q])?;
    let mut stmt = conn.prepare_cached("SELECT term FROM temp.query_terms")?;
    let terms: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .map(|t| t.map(|t| format!("\"{}\"", t.replace('"', "\"\""))))
        .collect::<Result<_, _>>()?;
    Ok(Some(if terms.is_empty() {
        "\"\"".to_owned()
    } else {
        terms.join(" ")
    }))
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    ///
    /// # Errors
    /// [`CatalogError::Open`] when the file cannot be opened or its schema created.
    pub fn open(path: &Path) -> Result<Arc<Self>, CatalogError> {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let writer = open_connection(path)?;
        let readers = (0..READ_CONNECTIONS)
            .map(|_| open_connection(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            changed: tokio::sync::Notify::new(),
            writer: Mutex::new(writer),
            readers: Mutex::new(readers),
            read_permits: Semaphore::new(READ_CONNECTIONS),
        }))
    }

    /// Resolves at the next upsert after the call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    async fn write<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, CatalogError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = this
                .writer
                .lock()
                .map_err(|_| CatalogError::Task("catalog writer poisoned".into()))?;
            f(&mut conn).map_err(CatalogError::Sql)
        })
        .await
        .map_err(|e| CatalogError::Task(e.to_string()))?
    }

    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, CatalogError> + Send + 'static,
    ) -> Result<T, CatalogError> {
        let _permit = self
            .read_permits
            .acquire()
            .await
            .map_err(|e| CatalogError::Task(e.to_string()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this
                .readers
                .lock()
                .map_err(|_| CatalogError::Task("catalog readers poisoned".into()))?
                .pop()
                .ok_or_else(|| CatalogError::Task("no free catalog connection".into()))?;
            let result = f(&conn);
            if let Ok(mut readers) = this.readers.lock() {
                readers.push(conn);
            }
            result
        })
        .await
        .map_err(|e| CatalogError::Task(e.to_string()))?
    }

    /// Inserts or replaces rows.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn upsert(self: &Arc<Self>, rows: Vec<CatalogRow>) -> Result<(), CatalogError> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            for row in &rows {
                upsert_row(&tx, row)?;
            }
            tx.commit()
        })
        .await?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// A recording's transcript lines matching `q`, in time order, highlighted like
    /// [`Listed::hits`].
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn hits(
        self: &Arc<Self>,
        id: String,
        q: &str,
        limit: usize,
    ) -> Result<Vec<Hit>, CatalogError> {
        let words = query_words(q);
        let q = q.to_owned();
        self.read(move |conn| {
            let Some(fts) = fts_query(conn, &q)? else {
                return Ok(Vec::new());
            };
            block_hits(conn, &fts, &words, &id, limit, PLAYER_HIT_BLOCKS)
        })
        .await
    }

    /// Finalized recordings that have no transcript yet, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn unindexed(self: &Arc<Self>, limit: usize) -> Result<Vec<String>, CatalogError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT r.id FROM recordings r WHERE r.status != 'live'
                 AND NOT EXISTS (SELECT 1 FROM indexed i WHERE i.id = r.id AND i.complete = 1)
                 ORDER BY r.started_ms DESC LIMIT ?1",
            )?;
            let ids = stmt
                .query_map(params![limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    /// Replaces a recording's transcript with its full index (all its lines, in order).
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn set_transcript(
        self: &Arc<Self>,
        id: String,
        lines: Vec<TranscriptLine>,
    ) -> Result<(), CatalogError> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let (num, _) = recording_num(&tx, &id)?;
            delete_blocks(&tx, num)?;
            insert_blocks(&tx, &id, num, 0, &lines)?;
            tx.execute("UPDATE indexed SET complete = 1 WHERE id = ?1", params![id])?;
            tx.commit()
        })
        .await
    }

    /// Adds transcript lines of a recording still being received, after those added before.
    /// The recording stays due for its full index ([`Catalog::set_transcript`]) once it ends,
    /// which replaces these.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn append_transcript(
        self: &Arc<Self>,
        id: String,
        lines: Vec<TranscriptLine>,
    ) -> Result<(), CatalogError> {
        if lines.iter().all(|l| l.text.trim().is_empty()) {
            return Ok(());
        }
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let (num, complete) = recording_num(&tx, &id)?;
            if complete {
                // The full index is in: it holds these lines already.
                return Ok(());
            }
            let last: Option<i64> = tx.query_row(
                "SELECT max(rowid) FROM transcript WHERE rowid BETWEEN ?1 AND ?2",
                params![num << BLOCK_BITS, ((num + 1) << BLOCK_BITS) - 1],
                |r| r.get(0),
            )?;
            let first = last.map_or(0, |r| (r & ((1 << BLOCK_BITS) - 1)) + 1);
            insert_blocks(&tx, &id, num, first, &lines)?;
            tx.commit()
        })
        .await
    }

    /// One recording's row.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn get(self: &Arc<Self>, id: String) -> Result<Option<CatalogRow>, CatalogError> {
        self.read(move |conn| {
            let json: Option<String> = conn
                .query_row(
                    "SELECT row FROM recordings WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
        })
        .await
    }

    /// Recordings in the catalog, and how many of them have a transcript.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn counts(self: &Arc<Self>) -> Result<(u64, u64), CatalogError> {
        self.read(|conn| {
            let n = |sql: &str| -> rusqlite::Result<u64> {
                let n: i64 = conn.query_row(sql, [], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            };
            Ok((
                n("SELECT count(*) FROM recordings")?,
                n("SELECT count(*) FROM indexed WHERE complete = 1")?,
            ))
        })
        .await
    }

    /// One page of recordings matching `query` within `scope`.
    ///
    /// # Errors
    /// [`CatalogError::BadQuery`] for a bad cursor or limit; SQLite errors.
    pub async fn list(self: &Arc<Self>, query: Query, scope: Scope) -> Result<Page, CatalogError> {
        self.read(move |conn| list_page(conn, &query, &scope)).await
    }

    /// Reads every catalog row in the store (or only those of the given days) into the
    /// catalog. A full scan also removes rows whose recordings are gone from the store.
    ///
    /// # Errors
    /// Store listing errors; SQLite errors. Unreadable rows are skipped with a warning.
    pub async fn scan(
        self: &Arc<Self>,
        region: &str,
        store: &DynStore,
        days: Option<&[OffsetDateTime]>,
    ) -> Result<usize, CatalogError> {
        let prefixes = match days {
            None => vec![ObjectKey::catalog_prefix()],
            Some(days) => days.iter().map(|d| ObjectKey::catalog_day(*d)).collect(),
        };
        let mut seen = Vec::new();
        let mut batch = Vec::new();
        let mut total = 0;
        for prefix in prefixes {
            let metas: Vec<_> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(CatalogError::Store)?;
            let fetches = futures::stream::iter(metas.into_iter().map(|meta| {
                let store = store.clone();
                async move {
                    let got: Result<bytes::Bytes, object_store::Error> =
                        async { store.get(&meta.location).await?.bytes().await }.await;
                    (meta.location, got)
                }
            }))
            .buffer_unordered(SCAN_FETCHES_IN_FLIGHT);
            futures::pin_mut!(fetches);
            while let Some((location, got)) = fetches.next().await {
                let row = match got {
                    Ok(bytes) => {
                        serde_json::from_slice::<CatalogRow>(&bytes).map_err(|e| e.to_string())
                    }
                    // Removed between listing and reading.
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => Err(e.to_string()),
                };
                match row {
                    Ok(row) => {
                        if days.is_none() {
                            seen.push(row.id.clone());
                        }
                        batch.push(row);
                    }
                    Err(e) => {
                        tracing::warn!(path = %location, error = %e, "skipping unreadable catalog row");
                    }
                }
                if batch.len() >= SCAN_BATCH {
                    total += batch.len();
                    self.upsert(std::mem::take(&mut batch)).await?;
                }
            }
        }
        total += batch.len();
        self.upsert(batch).await?;
        if days.is_none() {
            let region = region.to_owned();
            self.write(move |conn| {
                let tx = conn.transaction()?;
                tx.execute_batch(
                    "CREATE TEMP TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY); DELETE FROM seen;",
                )?;
                {
                    let mut insert = tx.prepare("INSERT OR IGNORE INTO seen (id) VALUES (?1)")?;
                    for id in &seen {
                        insert.execute(params![id])?;
                    }
                }
                // Live rows may be this node's own, listed before the store has their row.
                // Only this region's rows: another region's store was not listed.
                tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS scanned (region TEXT); DELETE FROM scanned;")?;
                tx.execute("INSERT INTO scanned (region) VALUES (?1)", params![region])?;
                let gone = "SELECT id FROM recordings WHERE status != 'live' AND region IN (SELECT region FROM scanned) AND id NOT IN (SELECT id FROM seen)";
                tx.execute(&format!("DELETE FROM tags WHERE id IN ({gone})"), [])?;
                let nums: Vec<i64> = tx
                    .prepare(&format!("SELECT num FROM indexed WHERE id IN ({gone})"))?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for num in nums {
                    delete_blocks(&tx, num)?;
                }
                tx.execute(&format!("DELETE FROM indexed WHERE id IN ({gone})"), [])?;
                tx.execute(&format!("DELETE FROM recordings WHERE id IN ({gone})"), [])?;
                tx.commit()
            })
            .await?;
        }
        Ok(total)
    }
}

/// The body of an [`ObjectKey::notice`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Notice {
    pub ids: Vec<String>,
}

impl Catalog {
    /// Reads the notices of `days` not in `done` (and adds them there): the catalog rows of
    /// recordings they name that this catalog lacks are fetched and added.
    ///
    /// # Errors
    /// Store listing errors; SQLite errors. Unreadable notices and rows are skipped.
    pub async fn scan_notices(
        self: &Arc<Self>,
        store: &DynStore,
        days: &[OffsetDateTime],
        done: &mut std::collections::HashSet<String>,
    ) -> Result<usize, CatalogError> {
        let mut added = 0;
        for day in days {
            let metas: Vec<_> = store
                .list(Some(&ObjectKey::notices_day(*day)))
                .try_collect()
                .await
                .map_err(CatalogError::Store)?;
            for meta in metas {
                if done.contains(meta.location.as_ref()) {
                    continue;
                }
                let notice = match store.get(&meta.location).await {
                    Ok(got) => got.bytes().await.map_err(CatalogError::Store)?,
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(CatalogError::Store(e)),
                };
                let ids = match serde_json::from_slice::<Notice>(&notice) {
                    Ok(n) => n.ids,
                    Err(e) => {
                        tracing::warn!(path = %meta.location, error = %e, "skipping unreadable notice");
                        Vec::new()
                    }
                };
                let mut rows = Vec::new();
                for id in ids {
                    let Ok(rid) = castvault_storage::keys::RecordingId::parse(&id) else {
                        continue;
                    };
                    if self.get(id).await?.is_some() {
                        continue;
                    }
                    // The row itself, not the notice, says what there is: a recording deleted
                    // since has no row and is not listed.
                    match store.get(&ObjectKey::catalog(&rid)).await {
                        Ok(got) => {
                            let bytes = got.bytes().await.map_err(CatalogError::Store)?;
                            if let Ok(row) = serde_json::from_slice::<CatalogRow>(&bytes) {
                                rows.push(row);
                            }
                        }
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(CatalogError::Store(e)),
                    }
                }
                added += rows.len();
                self.upsert(rows).await?;
                done.insert(meta.location.to_string());
            }
        }
        Ok(added)
    }
}

/// Groups non-empty transcript lines into blocks of about [`BLOCK_BYTES`]: each block is its
/// lines joined by newlines, and their times, space-separated, in the same order.
fn blocks(lines: &[TranscriptLine]) -> impl Iterator<Item = (String, String)> + '_ {
    let mut lines = lines
        .iter()
        .filter(|l| !l.text.trim().is_empty())
        .peekable();
    std::iter::from_fn(move || {
        lines.peek()?;
        let (mut text, mut times) = (String::new(), String::new());
        while let Some(line) =
            lines.next_if(|l| text.is_empty() || text.len() + l.text.len() < BLOCK_BYTES)
        {
            if !text.is_empty() {
                text.push('\n');
                times.push(' ');
            }
            // Newlines inside a line would shift the lines against their times.
            text.push_str(&line.text.replace('\n', " "));
            let _ = write!(times, "{:.3}", line.t);
        }
        Some((text, times))
    })
}

/// A recording's number in `indexed` and whether its full index is in; a recording without
/// one gets the next number, as not complete.
fn recording_num(tx: &rusqlite::Transaction<'_>, id: &str) -> rusqlite::Result<(i64, bool)> {
    let existing = tx
        .query_row(
            "SELECT num, complete FROM indexed WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some(found) = existing {
        return Ok(found);
    }
    let num: i64 = tx.query_row("SELECT coalesce(max(num), 0) + 1 FROM indexed", [], |r| {
        r.get(0)
    })?;
    tx.execute(
        "INSERT INTO indexed (id, num, complete) VALUES (?1, ?2, 0)",
        params![id, num],
    )?;
    Ok((num, false))
}

/// Writes `lines` as blocks of recording `num`, numbered from `first`.
fn insert_blocks(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    num: i64,
    first: i64,
    lines: &[TranscriptLine],
) -> rusqlite::Result<()> {
    let mut insert =
        tx.prepare("INSERT INTO transcript (rowid, text, times) VALUES (?1, ?2, ?3)")?;
    for (n, (text, times)) in blocks(lines).enumerate() {
        let block = first + n as i64;
        if block >= 1 << BLOCK_BITS {
            tracing::warn!(recording_id = %id, "transcript too long; the rest is not searchable");
            break;
        }
        insert.execute(params![(num << BLOCK_BITS) | block, text, times])?;
    }
    Ok(())
}

fn delete_blocks(tx: &rusqlite::Transaction<'_>, num: i64) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM transcript WHERE rowid BETWEEN ?1 AND ?2",
        params![num << BLOCK_BITS, ((num + 1) << BLOCK_BITS) - 1],
    )?;
    Ok(())
}

/// The words of a search, ASCII-lowercased, for finding and marking them in lines.
fn query_words(q: &str) -> Vec<String> {
    q.split_whitespace()
        .map(|w| w.trim_matches('"').to_ascii_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// `line` with every occurrence of `words` (ASCII case-insensitive) between \u{1} and \u{2},
/// or `None` unless it holds all of them (any of them, with `any`).
fn mark(line: &str, words: &[String], any: bool) -> Option<String> {
    let lower = line.to_ascii_lowercase();
    let mut marked = vec![false; line.len()];
    let mut found = 0;
    for word in words {
        let mut seen = false;
        for (at, _) in lower.match_indices(word.as_str()) {
            marked[at..at + word.len()]
                .iter_mut()
                .for_each(|m| *m = true);
            seen = true;
        }
        found += usize::from(seen);
    }
    if found == 0 || (!any && found < words.len()) {
        return None;
    }
    let mut out = String::with_capacity(line.len() + 8);
    let mut inside = false;
    for (i, c) in line.char_indices() {
        if marked[i] != inside {
            out.push(if marked[i] { '\u{1}' } else { '\u{2}' });
            inside = marked[i];
        }
        out.push(c);
    }
    if inside {
        out.push('\u{2}');
    }
    Some(out)
}

/// A recording's transcript lines matching the search, in time order, at most `limit`, the
/// matched words between \u{1} and \u{2}. Full-text search finds the blocks; lines are picked
/// and marked here, which reads only the blocks that match instead of tokenizing them again.
/// Lines holding every word come first; when a block matched with its words on different
/// lines, lines holding any of them stand in.
fn block_hits(
    conn: &Connection,
    fts: &str,
    words: &[String],
    id: &str,
    limit: usize,
    max_blocks: usize,
) -> Result<Vec<Hit>, CatalogError> {
    let Some(num): Option<i64> = conn
        .query_row("SELECT num FROM indexed WHERE id = ?1", params![id], |r| {
            r.get(0)
        })
        .optional()?
    else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare_cached(
        "SELECT times, text FROM transcript
         WHERE transcript MATCH ?1 AND rowid BETWEEN ?2 AND ?3 ORDER BY rowid",
    )?;
    let mut rows = stmt.query(params![
        fts,
        num << BLOCK_BITS,
        ((num + 1) << BLOCK_BITS) - 1
    ])?;
    let (mut hits, mut partial) = (Vec::new(), Vec::new());
    let mut blocks_read = 0;
    while let Some(row) = rows.next()? {
        blocks_read += 1;
        if blocks_read > max_blocks {
            break;
        }
        let times: String = row.get(0)?;
        let text: String = row.get(1)?;
        for (line, time) in text.split('\n').zip(times.split(' ')) {
            let time = time.parse().unwrap_or(0.0);
            if let Some(text) = mark(line, words, false) {
                hits.push(Hit { time, text });
                if hits.len() >= limit {
                    return Ok(hits);
                }
            } else if partial.len() < limit
                && let Some(text) = mark(line, words, true)
            {
                partial.push(Hit { time, text });
            }
        }
    }
    if hits.is_empty() {
        return Ok(partial);
    }
    Ok(hits)
}

/// A WHERE clause under construction: clauses joined by AND, with numbered parameters.
#[derive(Default)]
struct Where {
    wheres: Vec<String>,
    args: Vec<rusqlite::types::Value>,
}

impl Where {
    /// Adds a parameter and returns its placeholder.
    fn mark(&mut self, value: rusqlite::types::Value) -> String {
        self.args.push(value);
        format!("?{}", self.args.len())
    }

    /// Adds a clause whose one `?` is `value`.
    fn push(&mut self, clause: &str, value: rusqlite::types::Value) {
        let mark = self.mark(value);
        self.wheres.push(clause.replacen('?', &mark, 1));
    }

    /// Placeholders for a set of strings (`NULL` for an empty set, which matches nothing).
    fn set(&mut self, values: &[String]) -> String {
        if values.is_empty() {
            return "NULL".to_owned();
        }
        let marks: Vec<String> = values
            .iter()
            .map(|v| self.mark(rusqlite::types::Value::Text(v.clone())))
            .collect();
        marks.join(",")
    }
}

/// Keeps the catalog current until `stop`: a full scan of the store first (which also drops
/// rows whose recordings are gone), then the recent days every [`RECENT_SCAN_EVERY`].
pub async fn keep_current(
    catalog: Arc<Catalog>,
    stores: Stores,
    stop: tokio_util::sync::CancellationToken,
) {
    for (region, entry) in stores.iter() {
        let started = std::time::Instant::now();
        match catalog.scan(region.as_str(), &entry.store, None).await {
            Ok(rows) => tracing::info!(
                %region,
                rows,
                seconds = started.elapsed().as_secs_f64(),
                "catalog rebuilt from the store"
            ),
            Err(e) => {
                tracing::warn!(%region, error = %crate::upload::error_chain(&e), "catalog scan failed; retrying with the recent scans")
            }
        }
    }
    // Notices read so far (those of the last two days, so the set stays small in practice).
    let mut notices = std::collections::HashSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RECENT_SCAN_EVERY) => {}
        }
        let now = OffsetDateTime::now_utc();
        let days = [now - time::Duration::days(1), now];
        for (region, entry) in stores.iter() {
            if let Err(e) = catalog
                .scan(region.as_str(), &entry.store, Some(&days))
                .await
            {
                tracing::warn!(%region, error = %crate::upload::error_chain(&e), "recent catalog scan failed");
            }
            match catalog
                .scan_notices(&entry.store, &days, &mut notices)
                .await
            {
                Ok(0) => {}
                Ok(added) => tracing::info!(%region, added, "catalog rows added from notices"),
                Err(e) => {
                    tracing::warn!(%region, error = %crate::upload::error_chain(&e), "notice scan failed");
                }
            }
        }
        if notices.len() > MAX_NOTICES_REMEMBERED {
            // Re-reading a notice costs a lookup per id; forgetting bounds the memory.
            notices.clear();
        }
    }
}

fn list_page(conn: &Connection, query: &Query, scope: &Scope) -> Result<Page, CatalogError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(CatalogError::BadQuery(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    use rusqlite::types::Value as V;
    let mut w = Where::default();
    if let Some(t) = query.from {
        w.push("r.started_ms >= ?", V::Integer(unix_ms(t)));
    }
    if let Some(t) = query.to {
        w.push("r.started_ms < ?", V::Integer(unix_ms(t)));
    }
    for (value, column) in [
        (&query.src_node, "r.src_node"),
        (&query.src_node_user, "r.src_node_user"),
        (&query.ssh_user, "r.ssh_user"),
        (&query.local_user, "r.local_user"),
        (&query.connection_id, "r.connection_id"),
        (&query.region, "r.region"),
    ] {
        if let Some(v) = value {
            w.push(&format!("{column} = ?"), V::Text(v.clone()));
        }
    }
    if let Some(status) = query.status {
        w.push("r.status = ?", V::Text(status_name(status)));
    }
    if let Some(tags) = &query.src_node_tags {
        for tag in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            w.push(
                "EXISTS (SELECT 1 FROM tags t WHERE t.id = r.id AND t.tag = ?)",
                V::Text(tag.to_owned()),
            );
        }
    }
    if let Some(d) = query.min_duration {
        w.push("r.duration >= ?", V::Real(d));
    }
    if let Some(d) = query.max_duration {
        w.push("r.duration <= ?", V::Real(d));
    }
    let int = |b: u64| V::Integer(i64::try_from(b).unwrap_or(i64::MAX));
    if let Some(b) = query.min_bytes {
        w.push("r.bytes >= ?", int(b));
    }
    if let Some(b) = query.max_bytes {
        w.push("r.bytes <= ?", int(b));
    }
    // Scope is part of the query, so pages stay full and nothing out of scope shows.
    if let Some(tags) = &scope.tags {
        let set = w.set(tags);
        w.wheres.push(format!(
            "EXISTS (SELECT 1 FROM tags t WHERE t.id = r.id AND t.tag IN ({set}))"
        ));
    }
    for (allowed, column) in [
        (&scope.users, "r.src_node_user"),
        (&scope.regions, "r.region"),
    ] {
        if let Some(values) = allowed {
            let set = w.set(values);
            w.wheres.push(format!("{column} IN ({set})"));
        }
    }
    let fts = match query.q.as_deref() {
        Some(q) => fts_query(conn, q)?,
        None => None,
    };
    if let Some(fts) = &fts {
        // Rowids only: which recordings match, without reading any block's content.
        w.push(
            &format!(
                "r.id IN (SELECT i.id FROM indexed i WHERE i.num IN \
                 (SELECT rowid >> {BLOCK_BITS} FROM transcript WHERE transcript MATCH ?))"
            ),
            V::Text(fts.clone()),
        );
    }
    let column = query.sort.column();
    let (cmp, dir) = match query.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    if let Some(cursor) = &query.cursor {
        let (value, id) = decode_cursor(cursor)?;
        let value =
            match query.sort {
                SortKey::Duration => V::Real(value.parse().map_err(|_| {
                    CatalogError::BadQuery("cursor does not match the sort".into())
                })?),
                _ => V::Integer(value.parse().map_err(|_| {
                    CatalogError::BadQuery("cursor does not match the sort".into())
                })?),
            };
        let v = w.mark(value);
        let i = w.mark(V::Text(id));
        w.wheres
            .push(format!("(r.{column}, r.id) {cmp} ({v}, {i})"));
    }
    let sql = format!(
        "SELECT r.row, r.{column} FROM recordings r {} ORDER BY r.{column} {dir}, r.id {dir} LIMIT {}",
        if w.wheres.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", w.wheres.join(" AND "))
        },
        limit + 1
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows: Vec<(String, String)> = stmt
        .query_map(params_from_iter(w.args.iter()), |r| {
            let sort_value = match r.get_ref(1)? {
                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                other => other.as_i64().map(|i| i.to_string()).unwrap_or_default(),
            };
            Ok((r.get::<_, String>(0)?, sort_value))
        })?
        .collect::<Result<_, _>>()?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let mut recordings = Vec::with_capacity(rows.len());
    let mut next = None;
    for (json, sort_value) in rows {
        let Ok(row) = serde_json::from_str::<CatalogRow>(&json) else {
            continue;
        };
        if more {
            next = Some(encode_cursor(&sort_value, &row.id));
        }
        recordings.push(Listed {
            row,
            hits: Vec::new(),
        });
    }
    if let Some(fts) = &fts {
        let words = query_words(query.q.as_deref().unwrap_or(""));
        for listed in &mut recordings {
            listed.hits = block_hits(
                conn,
                fts,
                &words,
                &listed.row.id,
                HITS_PER_RECORDING,
                LIST_HIT_BLOCKS,
            )?;
        }
    }
    Ok(Page { recordings, next })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use castvault_storage::keys::{RecordingId, Region};

    fn row(n: u64, user: &str, tags: &[&str], status: RecordingStatus, bytes: u64) -> CatalogRow {
        let id = RecordingId::new(
            &Region::new("local").unwrap(),
            1_764_000_000_000 + n * 1000,
            n,
        );
        let mut row = CatalogRow::live(&id, "node-a", None);
        row.status = status;
        row.src_node = Some(format!("host-{}", n % 3));
        row.src_node_user = Some(format!("{user}@example.com"));
        row.ssh_user = Some(user.to_owned());
        row.local_user = Some("root".to_owned());
        row.connection_id = Some(format!("conn-{n}"));
        row.src_node_tags = tags.iter().map(|t| (*t).to_owned()).collect();
        row.bytes = bytes;
        row.duration_seconds = n as f64;
        row
    }

    fn urlencode(s: &str) -> String {
        serde_urlencoded::to_string([("", s)]).unwrap()[1..].to_owned()
    }

    async fn ids(catalog: &Arc<Catalog>, query: Query, scope: Scope) -> Vec<String> {
        catalog
            .list(query, scope)
            .await
            .unwrap()
            .recordings
            .into_iter()
            .map(|l| l.row.id)
            .collect()
    }

    #[tokio::test]
    async fn filters_pages_scopes_and_search() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let rows: Vec<CatalogRow> = (0..30)
            .map(|n| {
                let (user, tags): (&str, &[&str]) = if n % 2 == 0 {
                    ("alice", &["tag:prod", "tag:db"])
                } else {
                    ("bob", &["tag:dev"])
                };
                let status = if n == 29 {
                    RecordingStatus::Live
                } else {
                    RecordingStatus::Complete
                };
                row(n, user, tags, status, n * 100)
            })
            .collect();
        catalog.upsert(rows.clone()).await.unwrap();
        assert_eq!(catalog.counts().await.unwrap().0, 30);

        // Default: newest first; pages of 7 walk every row once.
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = catalog
                .list(
                    Query {
                        limit: Some(7),
                        cursor: cursor.clone(),
                        ..Query::default()
                    },
                    Scope::default(),
                )
                .await
                .unwrap();
            seen.extend(page.recordings.into_iter().map(|l| l.row.id));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut expected: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        expected.reverse();
        assert_eq!(seen, expected);

        let all = Scope::default();
        let parse = |raw: &str| Query::parse(raw).unwrap();
        let from = rows[5]
            .started_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let to = rows[8]
            .started_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let cases = [
            ("sshUser=bob".to_owned(), 15),
            ("srcNodeTags=tag%3Aprod%2Ctag%3Adb".to_owned(), 15),
            ("srcNodeTags=tag%3Aprod%2Ctag%3Adev".to_owned(), 0),
            ("status=live".to_owned(), 1),
            ("connectionID=conn-4".to_owned(), 1),
            ("srcNode=host-1".to_owned(), 10),
            ("srcNodeUser=alice%40example.com".to_owned(), 15),
            ("localUser=root&sshUser=".to_owned(), 30),
            ("region=elsewhere".to_owned(), 0),
            ("minDuration=10&maxDuration=12".to_owned(), 3),
            ("minBytes=2500".to_owned(), 5),
            ("maxBytes=250".to_owned(), 3),
            (
                format!("from={}&to={}", urlencode(&from), urlencode(&to)),
                3,
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                ids(&catalog, parse(&raw), all.clone()).await.len(),
                expected,
                "{raw}"
            );
        }
        assert!(matches!(
            Query::parse("nope=1"),
            Err(CatalogError::BadQuery(_))
        ));
        assert!(matches!(
            Query::parse("minBytes=lots"),
            Err(CatalogError::BadQuery(_))
        ));
        let by_bytes = ids(&catalog, parse("sort=bytes&order=asc&limit=2"), all.clone()).await;
        assert_eq!(by_bytes, vec![rows[0].id.clone(), rows[1].id.clone()]);
        let first = catalog
            .list(parse("sort=duration&limit=2"), all.clone())
            .await
            .unwrap();
        let mut next = parse("sort=duration&limit=2");
        next.cursor = first.next.clone();
        let second = catalog.list(next, all.clone()).await.unwrap();
        assert_eq!(second.recordings[0].row.id, rows[27].id);
        let q = |text: &str| parse(&format!("q={}", urlencode(text)));

        // Scope: a viewer of tag:dev sees only bob's recordings, whatever the filter asks.
        let dev = Scope {
            tags: Some(vec!["tag:dev".into()]),
            ..Scope::default()
        };
        assert_eq!(ids(&catalog, Query::default(), dev.clone()).await.len(), 15);
        assert!(
            ids(&catalog, parse("sshUser=alice"), dev.clone())
                .await
                .is_empty()
        );
        let nobody = Scope {
            users: Some(Vec::new()),
            ..Scope::default()
        };
        assert!(ids(&catalog, Query::default(), nobody).await.is_empty());

        // Full-text search with hits mapped to times; FTS syntax in the input is literal.
        catalog
            .set_transcript(
                rows[4].id.clone(),
                vec![
                    TranscriptLine {
                        t: 1.5,
                        text: "$ sudo systemctl restart postgres".into(),
                    },
                    TranscriptLine {
                        t: 2.0,
                        text: "done".into(),
                    },
                    TranscriptLine {
                        t: 3.0,
                        text: "ssh db-prod.internal  # needle-7b3c9e café e\u{301}té ²".into(),
                    },
                ],
            )
            .await
            .unwrap();
        // Words the tokenizer splits, accents (precomposed and combining), other digits;
        // separators alone match nothing.
        for (text, found) in [
            ("needle-7b3c9e", 1),
            ("db-prod.internal", 1),
            ("café", 1),
            ("e\u{301}té", 1),
            ("²", 1),
            ("needle-0000", 0),
            ("--", 0),
            ("\"", 0),
        ] {
            let page = catalog.list(q(text), all.clone()).await.unwrap();
            assert_eq!(page.recordings.len(), found, "{text:?}");
        }
        let page = catalog
            .list(q("restart postgres"), all.clone())
            .await
            .unwrap();
        assert_eq!(page.recordings.len(), 1);
        assert_eq!(page.recordings[0].hits[0].time, 1.5);
        assert!(
            page.recordings[0].hits[0]
                .text
                .contains("\u{1}restart\u{2}")
        );
        assert!(
            catalog
                .list(q("\"AND OR NEAR("), all.clone())
                .await
                .unwrap()
                .recordings
                .is_empty()
        );
        assert!(
            catalog
                .list(q("postgres"), dev)
                .await
                .unwrap()
                .recordings
                .is_empty()
        );
        assert!(matches!(
            catalog.list(parse("cursor=zz"), all).await,
            Err(CatalogError::BadQuery(_))
        ));
    }

    #[tokio::test]
    async fn transcripts_span_blocks_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        let r = row(1, "alice", &[], RecordingStatus::Complete, 1);
        catalog.upsert(vec![r.clone()]).await.unwrap();
        let lines: Vec<TranscriptLine> = (0..5000)
            .map(|i| TranscriptLine {
                t: f64::from(i),
                text: format!("line {i} of a long transcript marker{i}"),
            })
            .collect();
        assert!(
            blocks(&lines).count() > 10,
            "5000 lines must span many blocks"
        );
        catalog.set_transcript(r.id.clone(), lines).await.unwrap();
        let hits = catalog.hits(r.id.clone(), "marker4321", 10).await.unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].time, 4321.0);
        assert!(hits[0].text.contains("\u{1}marker4321\u{2}"));
        assert_eq!(
            mark("Restart the RESTART", &query_words("restart"), false).unwrap(),
            "\u{1}Restart\u{2} the \u{1}RESTART\u{2}"
        );
        assert_eq!(mark("only one", &query_words("one two"), false), None);
        assert!(mark("only one", &query_words("one two"), true).is_some());
        assert_eq!(
            catalog
                .hits(r.id.clone(), "transcript", 7)
                .await
                .unwrap()
                .len(),
            7
        );
        assert_eq!(catalog.counts().await.unwrap(), (1, 1));
        catalog
            .set_transcript(
                r.id.clone(),
                vec![TranscriptLine {
                    t: 9.0,
                    text: "fresh".into(),
                }],
            )
            .await
            .unwrap();
        assert!(
            catalog
                .hits(r.id.clone(), "marker4321", 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            catalog.hits(r.id.clone(), "fresh", 10).await.unwrap()[0].time,
            9.0
        );

        // A catalog from an older schema is dropped on open and refilled by the scans.
        drop(catalog);
        let conn = Connection::open(dir.path().join("c.sqlite")).unwrap();
        conn.execute_batch("PRAGMA user_version = 1").unwrap();
        drop(conn);
        let catalog = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
        assert_eq!(catalog.counts().await.unwrap().0, 0);
    }
}
