//! The web listener: health, readiness, metrics and the recordings API (`/api/v1`).
//!
//! Listing reads the store's catalog rows; one recording's data comes from its manifest and
//! chunks, verified as they are read. The browsing UI, search and live view build on this.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use castvault_storage::keys::RecordingId;
use castvault_storage::reader::{self, ReadError};
use castvault_storage::store::{DynStore, Stores, UnknownRegion};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditError, Record as AuditRecord};
use crate::auth::{Access, AuthError, Identity, Role};
use crate::catalog::{Catalog, CatalogError, Query};
use crate::ingest::Peer;
use crate::metrics::Metrics;
use crate::upload::Uploader;
use castvault_storage::manifest::CatalogRow;

/// Verified chunks queued between the store reader and a download's socket (each up to a
/// chunk's raw size).
const EXPORT_CHUNKS_IN_FLIGHT: usize = 2;

pub struct Web {
    pub stores: Stores,
    pub health: Arc<crate::health::Health>,
    pub catalog: Arc<Catalog>,
    pub access: Arc<Access>,
    pub audit: Audit,
    pub node_id: String,
    pub seek_cache: std::sync::Mutex<std::collections::VecDeque<(RecordingId, Arc<Seekable>)>>,
    pub uploader: Uploader,
    pub metrics: Arc<Metrics>,
    /// Cancelled once start-up (spool recovery) is done.
    pub ready: CancellationToken,
    pub draining: CancellationToken,
}

/// The API's one error type: maps every failure to a status code in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    NotLive(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::Catalog(CatalogError::BadQuery(_)) => {
                StatusCode::BAD_REQUEST
            }
            Self::Read(ReadError::NotFound { .. }) | Self::NotLive(_) | Self::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Audit(_) | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Read(ReadError::Corrupt { .. } | ReadError::Decode { .. }) | Self::Catalog(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Read(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": crate::upload::error_chain(&self) });
        (self.status(), axum::Json(body)).into_response()
    }
}

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/recordings", get(list))
        .route("/api/v1/recordings/{id}", get(manifest))
        .route("/api/v1/recordings/{id}/cast", get(cast))
        .route("/api/v1/recordings/{id}/bundle", get(bundle))
        .route("/api/v1/export", get(bulk_export))
        .route("/api/v1/recordings/{id}/window", get(window))
        .route("/api/v1/recordings/{id}/live", get(live))
        .route("/api/v1/uploads", get(uploads))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/events", get(events))
        .merge(crate::ui::routes())
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            authenticate,
        ))
        .with_state(web)
}

/// Paths anyone may reach: health, metrics, the login page and static assets.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/login" | "/logout"
    ) || path.starts_with("/assets/")
}

/// Authenticates every request but the public ones (see [`crate::auth`]). The API answers 401
/// or 403; pages send the browser to the login page.
async fn authenticate(
    State(web): State<Arc<Web>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if is_public(&path) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<Peer>()
        .map_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.0);
    match web.access.authenticate(request.headers(), peer).await {
        Ok(identity) => {
            request.extensions_mut().insert(Caller { identity, peer });
            next.run(request).await
        }
        Err(e) => {
            let status = match e {
                AuthError::Unauthenticated => StatusCode::UNAUTHORIZED,
                AuthError::NoGrant(_) => StatusCode::FORBIDDEN,
            };
            if path.starts_with("/api/") || status == StatusCode::FORBIDDEN {
                let body = serde_json::json!({ "error": e.to_string() });
                (status, axum::Json(body)).into_response()
            } else {
                let target = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                crate::ui::to_login(&target)
            }
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub peer: std::net::SocketAddr,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

impl Caller {
    /// Refuses callers below `role` with 403.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`].
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.identity.role >= role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{} may not do this (needs the {role:?} role)",
                self.identity.name
            )))
        }
    }
}

/// A finalized recording's manifest and index, parsed once for the seeks that follow.
pub struct Seekable {
    pub manifest: castvault_storage::manifest::Manifest,
    pub index: Option<crate::indexer::Index>,
}

/// Recordings whose manifest and index stay parsed in memory (an index is about 4 KiB per MiB
/// of output: 2 MB for a 500 MB recording), so seeking within one costs its chunks only.
const SEEK_CACHE: usize = 16;

/// A recording id whose region has no store on this node is unknown here.
impl From<UnknownRegion> for ApiError {
    fn from(e: UnknownRegion) -> Self {
        Self::NotFound(e.to_string())
    }
}

impl Web {
    /// For an export: the recording, if the caller may see it and is an auditor, with its
    /// store; the export is audited before anything is read.
    ///
    /// # Errors
    /// Not found, forbidden, or the audit log unavailable.
    async fn export_access(
        &self,
        caller: &Caller,
        id: &str,
        action: &str,
    ) -> Result<(RecordingId, DynStore), ApiError> {
        let id = self.visible_id(caller, id).await?;
        caller.require(Role::Auditor)?;
        self.audit(caller, action, Some(&id), None).await?;
        let store = self.store(&id)?.clone();
        Ok((id, store))
    }

    /// The store holding a recording: its home region's.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for a region not configured here.
    pub fn store(&self, id: &RecordingId) -> Result<&DynStore, ApiError> {
        Ok(self.stores.for_id(id)?)
    }

    /// A recording's manifest and index, from the cache or the store. Manifests never change
    /// once written; an entry without its index (not indexed yet) is read again next time.
    ///
    /// # Errors
    /// Read errors of the manifest.
    pub async fn seekable(&self, id: &RecordingId) -> Result<Arc<Seekable>, ApiError> {
        {
            let cache = self
                .seek_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, hit)) = cache.iter().find(|(k, s)| k == id && s.index.is_some()) {
                return Ok(hit.clone());
            }
        }
        let store = self.store(id)?;
        let (manifest, index) = tokio::join!(
            reader::read_manifest(store.as_ref(), id),
            crate::indexer::read_index(store, id)
        );
        let manifest = manifest?;
        let index = index
            .ok()
            .flatten()
            .filter(|i| i.chunks as usize == manifest.chunks.len());
        let seekable = Arc::new(Seekable { manifest, index });
        let mut cache = self
            .seek_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.retain(|(k, _)| k != id);
        if cache.len() >= SEEK_CACHE {
            cache.pop_front();
        }
        cache.push_back((id.clone(), seekable.clone()));
        Ok(seekable)
    }

    /// The catalog row of a recording the caller may see; 404 for one that does not exist or
    /// is out of the caller's scope alike, so a request reveals nothing.
    ///
    /// # Errors
    /// [`ApiError::NotFound`]; catalog errors.
    pub async fn visible(&self, caller: &Caller, id: &RecordingId) -> Result<CatalogRow, ApiError> {
        match self.catalog.get(id.to_string()).await? {
            Some(row) if caller.identity.may_see(&row) => Ok(row),
            _ => Err(ApiError::NotFound(format!("recording {id} not found"))),
        }
    }

    /// Parses a recording id from a request and checks the caller may see it (see
    /// [`Web::visible`]).
    ///
    /// # Errors
    /// [`ApiError::BadRequest`] for a malformed id; as [`Web::visible`].
    pub async fn visible_id(&self, caller: &Caller, id: &str) -> Result<RecordingId, ApiError> {
        let id = parse_id(id)?;
        self.visible(caller, &id).await?;
        Ok(id)
    }

    /// Writes an audit record; the request fails if it cannot be stored.
    ///
    /// # Errors
    /// [`ApiError::Audit`].
    pub async fn audit(
        &self,
        caller: &Caller,
        action: &str,
        recording_id: Option<&RecordingId>,
        query: Option<String>,
    ) -> Result<(), ApiError> {
        self.audit
            .record(AuditRecord {
                time: time::OffsetDateTime::now_utc(),
                node: self.node_id.clone(),
                actor: caller.identity.name.clone(),
                via: caller.identity.via.to_owned(),
                action: action.to_owned(),
                recording_id: recording_id.map(ToString::to_string),
                query,
                remote: caller.peer.to_string(),
            })
            .await?;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DayQuery {
    /// `YYYY-MM-DD` (UTC); default today.
    day: Option<String>,
}

fn parse_day(day: Option<&str>) -> Result<time::OffsetDateTime, ApiError> {
    match day {
        None => Ok(time::OffsetDateTime::now_utc()),
        Some(day) => Ok(time::Date::parse(
            day,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .map_err(|_| ApiError::BadRequest(format!("day {day:?} is not YYYY-MM-DD")))?
        .midnight()
        .assume_utc()),
    }
}

/// Kubernetes API events stored in one day (`?day=YYYY-MM-DD`, UTC; default today), oldest
/// first. Events carry no node tags to scope them by, so only callers with an unrestricted
/// scope see them; others get an empty list.
async fn events(
    State(web): State<Arc<Web>>,
    caller: Caller,
    query: Result<axum::extract::Query<DayQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let day = parse_day(query.day.as_deref())?;
    let scope = &caller.identity.scope;
    if scope.tags.is_some() || scope.users.is_some() || scope.regions.is_some() {
        return Ok(axum::Json(Vec::<serde_json::Value>::new()).into_response());
    }
    web.audit(&caller, "events", None, query.day.clone())
        .await?;
    let prefix = castvault_storage::keys::ObjectKey::events_day(day);
    let mut metas = Vec::new();
    for (region, entry) in web.stores.iter() {
        let listed = futures::TryStreamExt::try_collect::<Vec<_>>(entry.store.list(Some(&prefix)))
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!("listing events of region {region}: {e}"))
            })?;
        metas.extend(listed.into_iter().map(|m| (entry.store.clone(), m)));
    }
    metas.sort_by(|a, b| a.1.location.filename().cmp(&b.1.location.filename()));
    metas.truncate(MAX_EVENTS);
    let mut out = Vec::with_capacity(metas.len());
    for (store, meta) in metas {
        let bytes = async { store.get(&meta.location).await?.bytes().await }
            .await
            .map_err(|e| ApiError::Unavailable(format!("reading {}: {e}", meta.location)))?;
        if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            out.push(event);
        }
    }
    Ok(axum::Json(out).into_response())
}

/// Events returned by one request at most.
const MAX_EVENTS: usize = 10_000;

/// One day's audit records, for auditors and admins.
async fn audit_log(
    State(web): State<Arc<Web>>,
    caller: Caller,
    query: Result<axum::extract::Query<DayQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Auditor)?;
    let axum::extract::Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let day = match &query.day {
        None => time::OffsetDateTime::now_utc(),
        Some(day) => time::Date::parse(
            day,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .map_err(|_| ApiError::BadRequest(format!("day {day:?} is not YYYY-MM-DD")))?
        .midnight()
        .assume_utc(),
    };
    web.audit(&caller, "audit", None, query.day.clone()).await?;
    let mut records = Vec::new();
    for (region, entry) in web.stores.iter() {
        records.extend(
            crate::audit::read_day(&entry.store, day)
                .await
                .map_err(|e| {
                    ApiError::Unavailable(format!("reading the audit log of region {region}: {e}"))
                })?,
        );
    }
    Ok(axum::Json(records).into_response())
}

/// Ready means: started, not draining, and this node's region's store answers. A node that
/// cannot reach it still records (`degrade`) or refuses (`fail`), but a load balancer or
/// orchestrator should prefer a peer that can. Other regions' stores being down does not make
/// this node unready (it would take every region's nodes out for one region's outage); they
/// show in `castvault_store_up` and `/api/v1/uploads`.
async fn readyz(State(web): State<Arc<Web>>) -> Response {
    let home = web.stores.home().as_str();
    let down: Vec<_> = web
        .health
        .down_regions()
        .into_iter()
        .filter(|(region, _)| region == home)
        .collect();
    if web.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !web.ready.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    } else if !down.is_empty() {
        let text: String = down
            .iter()
            .map(|(region, error)| format!("store of region {region} unreachable: {error}\n"))
            .collect();
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let mut text = web.metrics.render();
    web.health.render(&mut text);
    {
        use crate::metrics::SPOOL_BYTES;
        use std::fmt::Write as _;
        let _ = writeln!(
            text,
            "# TYPE {SPOOL_BYTES} gauge\n{SPOOL_BYTES} {}",
            web.uploader.spool_bytes()
        );
    }
    if let Ok((rows, indexed)) = web.catalog.counts().await {
        use crate::metrics::{CATALOG_INDEXED, CATALOG_RECORDINGS};
        use std::fmt::Write as _;
        let _ = write!(
            text,
            "# TYPE {CATALOG_RECORDINGS} gauge\n{CATALOG_RECORDINGS} {rows}\n\
             # TYPE {CATALOG_INDEXED} gauge\n{CATALOG_INDEXED} {indexed}\n"
        );
    }
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Recordings matching the query string's filters, one page at a time (see [`Query`]).
async fn list(
    State(web): State<Arc<Web>>,
    caller: Caller,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref().unwrap_or(""))?;
    if query.q.is_some() {
        web.audit(&caller, "search", None, raw.clone()).await?;
    }
    let page = web
        .catalog
        .list(query, caller.identity.scope.clone())
        .await?;
    Ok(axum::Json(page).into_response())
}

fn parse_id(id: &str) -> Result<RecordingId, ApiError> {
    RecordingId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn manifest(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = web.visible_id(&caller, &id).await?;
    web.audit(&caller, "view", Some(&id), None).await?;
    Ok(axum::Json(reader::read_manifest(web.store(&id)?.as_ref(), &id).await?).into_response())
}

/// The recording exactly as received, streamed and verified chunk by chunk. A failed check
/// mid-download aborts the transfer, so a client never mistakes a short body for the whole.
async fn cast(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, store) = web.export_access(&caller, &id, "export").await?;
    let manifest = reader::read_manifest(store.as_ref(), &id).await?;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(EXPORT_CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        let chunks = reader::body_chunks(store.as_ref(), &manifest);
        futures::pin_mut!(chunks);
        while let Some(next) = chunks.next().await {
            let failed = next.is_err();
            if let Err(e) = &next {
                tracing::error!(recording_id = %manifest.recording_id, error = %e, "export failed mid-stream");
            }
            if tx.send(next.map_err(std::io::Error::other)).await.is_err() || failed {
                break;
            }
        }
    });
    let mut response = Response::new(Body::from_stream(tokio_stream_from(rx)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    Ok(response)
}

/// Bytes of a bundle buffered between its writer and the socket.
const BUNDLE_PIPE_BYTES: usize = 256 << 10;

/// The compliance bundle (tar) of a recording, for auditors; streamed, the recording last. A
/// failure mid-stream cuts the archive short, so it cannot pass for whole.
async fn bundle(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (id, store) = web.export_access(&caller, &id, "export-bundle").await?;
    let custody = crate::export::custody(&web.stores, &id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let exported_by = format!(
        "{} ({}) via {}",
        caller.identity.name, caller.identity.via, web.node_id
    );
    let bundle = crate::export::Bundle::gather(&store, &id, &custody, &exported_by)
        .await
        .map_err(|e| match e {
            crate::export::ExportError::Read(e) => ApiError::Read(e),
            other => ApiError::Unavailable(other.to_string()),
        })?;
    let (mut writer, reader) = tokio::io::duplex(BUNDLE_PIPE_BYTES);
    tokio::spawn(async move {
        if let Err(e) = bundle.write(&store, &mut writer).await {
            tracing::error!(recording_id = %bundle.id, error = %crate::upload::error_chain(&e), "bundle export failed mid-stream");
        }
    });
    let mut response = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(reader)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    if let Ok(value) =
        HeaderValue::from_str(&format!("attachment; filename=\"castvault-{id}.tar\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// Recordings one bulk export may hold: their ids are collected before streaming starts.
const MAX_BULK_EXPORT: usize = 10_000;

/// One archive of the compliance bundles of every finalized recording a list query matches
/// (the list API's parameters), for auditors. Streamed recording by recording; each export is
/// audited before it is read.
async fn bulk_export(
    State(web): State<Arc<Web>>,
    caller: Caller,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    caller.require(Role::Auditor)?;
    let mut query = Query::parse(raw.as_deref().unwrap_or(""))?;
    query.limit = Some(crate::catalog::MAX_PAGE);
    web.audit(&caller, "export-bulk", None, raw.clone()).await?;
    let mut ids = Vec::new();
    loop {
        let page = web
            .catalog
            .list(query.clone(), caller.identity.scope.clone())
            .await?;
        ids.extend(
            page.recordings
                .iter()
                .filter(|l| l.row.status != castvault_storage::manifest::RecordingStatus::Live)
                .filter_map(|l| RecordingId::parse(&l.row.id).ok()),
        );
        if ids.len() > MAX_BULK_EXPORT {
            return Err(ApiError::BadRequest(format!(
                "more than {MAX_BULK_EXPORT} recordings match; narrow the query"
            )));
        }
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
    }
    let (mut writer, reader) = tokio::io::duplex(BUNDLE_PIPE_BYTES);
    let exported_by = format!(
        "{} ({}) via {}",
        caller.identity.name, caller.identity.via, web.node_id
    );
    tokio::spawn(async move {
        let audit_web = web.clone();
        let audit_caller = caller.clone();
        let result = crate::export::write_many(
            &web.stores,
            &ids,
            &exported_by,
            |id| {
                let web = audit_web.clone();
                let caller = audit_caller.clone();
                async move {
                    web.audit(&caller, "export-bundle", Some(&id), None)
                        .await
                        .map_err(|e| crate::export::ExportError::Store(e.to_string()))
                }
            },
            &mut writer,
        )
        .await;
        if let Err(e) = result {
            tracing::error!(error = %crate::upload::error_chain(&e), "bulk export failed mid-stream");
        }
    });
    let mut response = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(reader)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"castvault-export.tar\""),
    );
    Ok(response)
}

/// A recording in progress, as server-sent events (see [`crate::live`]). Only the node
/// receiving the recording serves it; others answer 404.
async fn live(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = web.visible_id(&caller, &id).await?;
    let source = web.uploader.live(&id).ok_or_else(|| {
        ApiError::NotLive(format!("recording {id} is not being received by this node"))
    })?;
    let tail = crate::spool::Tail::open(source.file())
        .await
        .map_err(|e| ApiError::NotLive(format!("recording {id}: {e}")))?;
    web.audit(&caller, "live", Some(&id), None).await?;
    Ok(crate::live::follow(id, source, tail).into_response())
}

/// Snapshot spans one window holds (about 2 MiB of output): with snapshots at most
/// [`crate::indexer::SNAPSHOT_BYTES`] apart and inside chunks, a window reads at most two
/// chunks besides the manifest and the index.
pub const WINDOW_SNAPSHOTS: usize = 2;

/// Output one window carries at most (then it ends at a line of a new time): small enough for
/// the player to take at once, so the first frame after a seek comes quickly.
pub const WINDOW_BYTES: usize = 256 << 10;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowQuery {
    /// Seconds into the recording.
    #[serde(default)]
    from: f64,
}

/// A playable window of a recording from a time: an asciicast v2 document whose first event
/// paints the screen as it was at the start of the chunk holding `from` (from the index), then
/// that chunk's and the next chunk's events, with times relative to the window start.
/// Headers tell the player where the window sits: `x-castvault-window-start` (seconds into the
/// recording) and, when there is more, `x-castvault-next` (where the next window starts).
async fn window(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<WindowQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let id = web.visible_id(&caller, &id).await?;
    let (audited, seekable) = tokio::join!(
        web.audit(
            &caller,
            "view",
            Some(&id),
            Some(format!("from={}", query.from))
        ),
        web.seekable(&id)
    );
    audited?;
    let seekable = seekable?;
    let doc = build_window(
        web.store(&id)?,
        &id,
        &seekable.manifest,
        seekable.index.as_ref(),
        query.from,
    )
    .await?;
    let mut response = Response::new(Body::from(doc.body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    if let Ok(v) = HeaderValue::from_str(&doc.start.to_string()) {
        headers.insert("x-castvault-window-start", v);
    }
    if let Some(next) = doc
        .next
        .and_then(|n| HeaderValue::from_str(&n.to_string()).ok())
    {
        headers.insert("x-castvault-next", next);
    }
    Ok(response)
}

pub struct Window {
    pub body: Vec<u8>,
    /// The screen the window starts on (its first event paints it).
    pub screen: crate::indexer::Snapshot,
    /// Seconds into the recording where the window's time 0 is.
    pub start: f64,
    /// Where the next window starts, if the recording goes on.
    pub next: Option<f64>,
}

/// Builds the window holding `from` (see [`window`]): from the last snapshot at or before
/// `from` to the one [`WINDOW_SNAPSHOTS`] later (or the end), so the next window starts exactly
/// where this one ends, painted by its own snapshot. Only the time at the front of each line is
/// rewritten; lines that are not valid JSON events are left out (they are in the recording).
///
/// # Errors
/// Read errors of the chunks.
pub async fn build_window(
    store: &DynStore,
    id: &RecordingId,
    manifest: &castvault_storage::manifest::Manifest,
    index: Option<&crate::indexer::Index>,
    from: f64,
) -> Result<Window, ApiError> {
    use crate::indexer::Snapshot;
    // Not indexed yet: chunk starts, on a blank screen.
    let fallback: Vec<Snapshot>;
    let snapshots: &[Snapshot] = match index {
        Some(index) => &index.snapshots,
        None => {
            fallback = manifest
                .chunks
                .iter()
                .map(|c| Snapshot {
                    seq: c.seq,
                    offset: c.offset,
                    time: c.first_event_time.unwrap_or(0.0),
                    cols: 0,
                    rows: 0,
                    init: String::new(),
                })
                .collect();
            &fallback
        }
    };
    let first = snapshots.iter().rposition(|s| s.time <= from).unwrap_or(0);
    let Some(start) = snapshots.get(first) else {
        return Ok(Window {
            body: serde_json::to_vec(&manifest.header).unwrap_or_default(),
            screen: Snapshot {
                seq: 0,
                offset: 0,
                time: 0.0,
                cols: 0,
                rows: 0,
                init: String::new(),
            },
            start: 0.0,
            next: None,
        });
    };
    let end = snapshots.get(first + WINDOW_SNAPSHOTS);
    let end_offset = end.map_or(manifest.bytes, |s| s.offset);
    let mut raw = Vec::new();
    for entry in manifest
        .chunks
        .iter()
        .skip_while(|c| c.offset + c.raw_len <= start.offset)
        .take_while(|c| c.offset < end_offset)
    {
        let (chunk, _) = reader::read_chunk(store.as_ref(), id, entry).await?;
        let lo = usize::try_from(start.offset.saturating_sub(entry.offset)).unwrap_or(0);
        let hi = usize::try_from((end_offset - entry.offset).min(entry.raw_len)).unwrap_or(0);
        raw.extend_from_slice(chunk.get(lo..hi).unwrap_or_default());
    }
    // With a snapshot, the lines up to `from` are played into it on the server, so the window
    // starts exactly at `from` on the screen as it was then and the player replays nothing.
    let mut state = start.clone();
    let mut rest = &raw[..];
    let upto = raw
        .split_inclusive(|&b| b == b'\n')
        .take_while(|line| event_time(line).is_none_or(|t| t <= from))
        .map(<[u8]>::len)
        .sum::<usize>();
    if index.is_some() && upto > 0 {
        let (played, after) = raw.split_at(upto);
        let played = played.to_vec();
        let resumed = start.clone();
        state = tokio::task::spawn_blocking(move || {
            crate::indexer::Replay::resume(&resumed).map(|mut replay| {
                replay.feed(&played);
                replay.snapshot(resumed.seq, resumed.offset + played.len() as u64)
            })
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("replay task: {e}")))?
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        state.time = state.time.max(from.min(end.map_or(f64::MAX, |e| e.time)));
        rest = after;
    }
    let mut header = manifest.header.clone();
    if let Some(obj) = header.as_object_mut().filter(|_| state.cols > 0) {
        obj.insert("width".into(), state.cols.into());
        obj.insert("height".into(), state.rows.into());
    }
    let mut body = serde_json::to_vec(&header).unwrap_or_default();
    body.push(b'\n');
    if !state.init.is_empty() {
        let _ = serde_json::to_writer(&mut body, &(0.0, "o", &state.init));
        body.push(b'\n');
    }
    // At most WINDOW_BYTES of events, cut after the last line of one time, so the next window
    // (from that time) starts with exactly the lines this one left out.
    let mut next = end.map(|s| s.time);
    let mut emitted = 0;
    let mut lines = rest.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        retime(line, state.time, &mut body);
        emitted += line.len() + 1;
        if emitted >= WINDOW_BYTES
            && let Some(t) = event_time(line)
            && lines
                .peek()
                .and_then(|l| event_time(l))
                .is_some_and(|n| n > t)
        {
            next = Some(t);
            break;
        }
    }
    Ok(Window {
        body,
        start: state.time,
        screen: state,
        next,
    })
}

/// The time of an event line, if it starts like one.
fn event_time(line: &[u8]) -> Option<f64> {
    let line = line.trim_ascii();
    let comma = line.iter().position(|&b| b == b',')?;
    std::str::from_utf8(line.get(1..comma)?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Appends `line` with its time made relative to `start`, if it is a valid event line.
fn retime(line: &[u8], start: f64, out: &mut Vec<u8>) {
    let line = line.trim_ascii();
    if line.first() != Some(&b'[')
        || serde_json::from_slice::<(f64, serde::de::IgnoredAny, serde::de::IgnoredAny)>(line)
            .is_err()
    {
        return;
    }
    let (Some(comma), Some(t)) = (line.iter().position(|&b| b == b','), event_time(line)) else {
        return;
    };
    out.extend_from_slice(format!("[{:.6}", (t - start).max(0.0)).as_bytes());
    out.extend_from_slice(&line[comma..]);
    out.push(b'\n');
}

pub fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

async fn uploads(State(web): State<Arc<Web>>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    Ok(axum::Json(web.uploader.status()).into_response())
}
