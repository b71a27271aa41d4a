//! The web listener: health, readiness, metrics and the recordings API (`/api/v1`).
//!
//! Listing reads the store's catalog rows; one recording's data comes from its manifest and
//! chunks, verified as they are read. The browsing UI, search and live view build on this.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use castvault_storage::keys::RecordingId;
use castvault_storage::reader::{self, ReadError};
use castvault_storage::store::DynStore;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::upload::Uploader;

/// Verified chunks queued between the store reader and a download's socket (each up to a
/// chunk's raw size).
const EXPORT_CHUNKS_IN_FLIGHT: usize = 2;

pub struct Web {
    pub store: DynStore,
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Read(ReadError::NotFound { .. }) => StatusCode::NOT_FOUND,
            Self::Read(ReadError::Corrupt { .. } | ReadError::Decode { .. }) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Read(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = serde_json::json!({ "error": crate::upload::error_chain(&self) });
        (status, axum::Json(body)).into_response()
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
        .route("/api/v1/uploads", get(uploads))
        .with_state(web)
}

async fn readyz(State(web): State<Arc<Web>>) -> Response {
    if web.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !web.ready.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let mut response = web.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn list(State(web): State<Arc<Web>>) -> Result<Response, ApiError> {
    Ok(axum::Json(reader::list_catalog(web.store.as_ref()).await?).into_response())
}

fn parse_id(id: &str) -> Result<RecordingId, ApiError> {
    RecordingId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn manifest(
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(reader::read_manifest(web.store.as_ref(), &id).await?).into_response())
}

/// The recording exactly as received, streamed and verified chunk by chunk. A failed check
/// mid-download aborts the transfer, so a client never mistakes a short body for the whole.
async fn cast(State(web): State<Arc<Web>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let manifest = reader::read_manifest(web.store.as_ref(), &id).await?;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(EXPORT_CHUNKS_IN_FLIGHT);
    let store = web.store.clone();
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

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

async fn uploads(State(web): State<Arc<Web>>) -> Response {
    axum::Json(web.uploader.status()).into_response()
}
