//! Ingest: the Tailscale session-recording wire protocol (shared PROTOCOL.md; its section 6 is
//! the checklist this module follows).
//!
//! - `HEAD /v2/record`: 200 over HTTP/2, 404 over HTTP/1.1 (the client only trusts an h2 answer).
//! - `POST /v2/record` (h2c): admission first (503 + Retry-After so the client tries the next
//!   recorder), then 200 headers at once, because the client writes nothing until it has them.
//!   The response body is the ack stream: `{"ack":N}\n` whenever the acked offset moves and at
//!   least every [`ACK_HEARTBEAT`]; after the request body ends, one final ack, then the end of
//!   the response. A failure ends it with `{"ack":N,"error":"..."}\n` as the last frame.
//! - `POST /record` (HTTP/1.1, `Expect: 100-continue`, chunked): hyper sends `100 Continue` when
//!   the body is first polled, which is right after admission; 200 once the body has ended and
//!   every byte is durable at the ack level.
//! - `HEAD /v2/event` → 200; `POST /v2/event` stores one Kubernetes API request event.
//!
//! The body is read as fast as it arrives: each frame is queued for the spool's journal (no file
//! I/O on this task) and reading goes on; the commit, the data-file copy and the upload happen on
//! other threads, and acks follow the commit. Nothing per stream holds more than the frame in
//! hand and, until the header line ends, the header; queued frames count against the journal's
//! byte budget, which pushes back on every stream when the disk falls behind.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Request, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{head, post};
use castvault_storage::cast::CastHeader;
use castvault_storage::keys::{ObjectKey, RecordingId, Region};
use castvault_storage::manifest::Sender;
use castvault_storage::routing::{self, Rule};
use castvault_storage::store::{Stores, put_create};
use futures::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{Admission, Bucket, LimitsConfig, PeerCounts, PeerRate, PeerSlot, Refusal};
use crate::config::{AckLevel, OutagePolicy};
use crate::metrics::Metrics;
use crate::spool::{RecordingMeta, Spool, SpoolFile, StreamEnd, StreamOutcome};
use crate::upload::{Progress, Uploader, error_chain};

/// Longest gap between ack frames; the client gives up after 30 s without one.
pub const ACK_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the end of a stream waits for its last bytes to reach the ack level before the
/// final frame; well under the client's 30 s ack window, which keeps running meanwhile.
pub const FINAL_ACK_WAIT: Duration = Duration::from_secs(20);

/// Largest `/v2/event` body. The proxy sends the Kubernetes request body inside, base64.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// The TCP peer of a connection, set by the listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Everything ingest needs.
pub struct Ingest {
    pub spool: Spool,
    pub uploader: Uploader,
    pub stores: Stores,
    /// Home-region rules, and each region's failover regions (see `castvault_storage::routing`).
    pub routing: Vec<Rule>,
    pub failover: BTreeMap<String, Vec<String>>,
    pub metrics: Arc<Metrics>,
    pub ack: AckLevel,
    pub outage: OutagePolicy,
    pub node_id: String,
    pub zone: String,
    pub max_line_bytes: usize,
    pub min_free_disk_bytes: u64,
    /// Who may send (checked before any body byte is read).
    pub admission: Admission,
    /// Bounds per peer and per stream (see `crate::admission`).
    pub limits: LimitsConfig,
    /// Recordings open per address.
    pub peer_recordings: PeerCounts,
    /// `/v2/event` requests per address.
    pub event_rate: PeerRate,
    /// One permit per open recording.
    pub open_recordings: Arc<Semaphore>,
    /// Cancelled on SIGTERM: new recordings get 503.
    pub draining: CancellationToken,
    /// Cancelled when the drain deadline passes: open streams end with the error frame.
    pub close_streams: CancellationToken,
    pub streams: TaskTracker,
}

/// What the ack stream shows.
#[derive(Debug, Clone, Default)]
pub struct AckState {
    pub acked: u64,
    pub done: Option<Result<(), String>>,
}

/// What an open recording holds; released when it drops.
struct StreamSlot {
    _total: OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
}

/// How a stream ended, for the v1 response.
#[derive(Debug)]
enum StreamResult {
    Stored,
    /// Refused before anything was stored.
    Rejected(StatusCode, String),
    /// Ended with an error after storing what came before it.
    Failed(String),
    /// The client went away.
    Broken,
}

pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v2/record", head(probe_v2).post(record_v2))
        .route("/record", post(record_v1))
        .route(
            "/v2/event",
            head(|| async { StatusCode::OK })
                .post(event)
                .layer(DefaultBodyLimit::max(MAX_EVENT_BYTES)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            ingest.clone(),
            admit_sender,
        ))
        .fallback(|| async {
            refuse(
                StatusCode::NOT_FOUND,
                "not a recorder endpoint; expected /v2/record, /record or /v2/event",
            )
        })
        .with_state(ingest)
}

/// Admission (see `crate::admission`), before the handler reads any of the body. The sender's
/// identity goes on to the handler in the request's extensions.
async fn admit_sender(
    State(ingest): State<Arc<Ingest>>,
    peer: Option<axum::Extension<Peer>>,
    mut req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let Some(axum::Extension(Peer(peer))) = peer else {
        return refuse(StatusCode::FORBIDDEN, "sender address unknown");
    };
    match ingest.admission.admit(req.headers(), peer).await {
        Ok(sender) => {
            req.extensions_mut().insert(sender);
            next.run(req).await
        }
        Err(refusal) => {
            Metrics::add(&ingest.metrics.admission_refused, 1);
            let (status, message) = match refusal {
                Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, m),
                Refusal::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            };
            tracing::info!(%peer, %status, %message, "sender not admitted");
            refuse(status, &message)
        }
    }
}

async fn probe_v2(req: Request<Body>) -> StatusCode {
    if req.version() == Version::HTTP_2 {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl Ingest {
    /// A recording's home region: the first routing rule its header matches, else this node's
    /// region; if that region's store is down, its first failover region whose store is up.
    fn home_region(&self, header: &CastHeader) -> Region {
        let home = routing::route(&self.routing, header)
            .and_then(|rule| Region::new(&rule.region).ok())
            .unwrap_or_else(|| self.stores.home().clone());
        if self.uploader.region_up(home.as_str()) {
            return home;
        }
        let fallback = self
            .failover
            .get(home.as_str())
            .into_iter()
            .flatten()
            .find(|r| self.uploader.region_up(r))
            .and_then(|r| Region::new(r).ok());
        match fallback {
            Some(region) => {
                tracing::warn!(home = %home, failover = %region, "home region's store is down; recording in the failover region");
                region
            }
            None => home,
        }
    }

    /// Capacity, draining and disk space. Refusal is a 503 (429 for one peer over its share)
    /// before the body is read.
    fn admit(&self, peer: Option<SocketAddr>) -> Result<StreamSlot, Box<Response>> {
        let refused = |message: &str| {
            Metrics::add(&self.metrics.streams_refused, 1);
            Box::new(refuse(StatusCode::SERVICE_UNAVAILABLE, message))
        };
        if self.draining.is_cancelled() {
            return Err(refused("recorder is shutting down; try the next recorder"));
        }
        let peer_slot = match peer {
            Some(peer) => match self.peer_recordings.take(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    Metrics::add(&self.metrics.limits_refused, 1);
                    return Err(Box::new(refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!(
                            "too many open recordings from {} (limit {})",
                            peer.ip(),
                            self.limits.max_recordings_per_peer
                        ),
                    )));
                }
            },
            None => None,
        };
        let Ok(permit) = self.open_recordings.clone().try_acquire_owned() else {
            return Err(refused("recorder is at capacity; try the next recorder"));
        };
        if self
            .spool
            .free_bytes()
            .is_none_or(|free| free < self.min_free_disk_bytes)
        {
            return Err(refused(
                "recorder spool disk is full; try the next recorder",
            ));
        }
        Ok(StreamSlot {
            _total: permit,
            _peer: peer_slot,
        })
    }
}

async fn record_v2(
    State(ingest): State<Arc<Ingest>>,
    peer: Option<axum::Extension<Peer>>,
    sender: Option<axum::Extension<Sender>>,
    req: Request<Body>,
) -> Response {
    if req.version() != Version::HTTP_2 {
        return refuse(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "POST /v2/record needs HTTP/2; use POST /record",
        );
    }
    let peer = peer.map(|p| p.0.0);
    let permit = match ingest.admit(peer) {
        Ok(permit) => permit,
        Err(response) => return *response,
    };
    let (acks, rx) = watch::channel(AckState::default());
    let sender = sender.map(|s| s.0);
    let body = req.into_body();
    let tracker = ingest.streams.clone();
    tracker.spawn(async move {
        let result = receive(&ingest, body, "v2", peer, sender, &acks).await;
        drop(permit);
        acks.send_modify(|a| {
            a.done = Some(match result {
                StreamResult::Stored | StreamResult::Broken => Ok(()),
                StreamResult::Rejected(_, message) | StreamResult::Failed(message) => Err(message),
            });
        });
    });
    let mut response = Response::new(ack_body(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn record_v1(
    State(ingest): State<Arc<Ingest>>,
    peer: Option<axum::Extension<Peer>>,
    sender: Option<axum::Extension<Sender>>,
    req: Request<Body>,
) -> Response {
    let peer = peer.map(|p| p.0.0);
    let permit = match ingest.admit(peer) {
        Ok(permit) => permit,
        Err(response) => return *response,
    };
    let (acks, _rx) = watch::channel(AckState::default());
    let sender = sender.map(|s| s.0);
    let result = receive(&ingest, req.into_body(), "v1", peer, sender, &acks).await;
    drop(permit);
    match result {
        StreamResult::Stored | StreamResult::Broken => StatusCode::OK.into_response(),
        StreamResult::Rejected(status, message) => refuse(status, &message),
        StreamResult::Failed(message) => refuse(StatusCode::SERVICE_UNAVAILABLE, &message),
    }
}

/// The v2 response body: ack frames from `rx` and a heartbeat, until the stream is done.
fn ack_body(rx: watch::Receiver<AckState>) -> Body {
    let mut heartbeat = tokio::time::interval(ACK_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frames = futures::stream::unfold(Some((rx, heartbeat)), |state| async move {
        let (mut rx, mut heartbeat) = state?;
        let closed = tokio::select! {
            changed = rx.changed() => changed.is_err(),
            _ = heartbeat.tick() => false,
        };
        let s = rx.borrow_and_update().clone();
        let (frame, next) = match s.done {
            None if closed => (
                error_frame(s.acked, "recorder stream task ended unexpectedly"),
                None,
            ),
            None => (ack_frame(s.acked), Some((rx, heartbeat))),
            Some(Ok(())) => (ack_frame(s.acked), None),
            Some(Err(message)) => (error_frame(s.acked, &message), None),
        };
        Some((Ok::<_, Infallible>(frame), next))
    });
    Body::from_stream(frames)
}

fn ack_frame(acked: u64) -> Bytes {
    Bytes::from(format!("{{\"ack\":{acked}}}\n"))
}

fn error_frame(acked: u64, message: &str) -> Bytes {
    let frame = serde_json::json!({ "ack": acked, "error": message });
    Bytes::from(format!("{frame}\n"))
}

/// Why the body loop ended.
enum Ended {
    /// The client ended the body (END_STREAM or the last chunk).
    Complete,
    /// The client went away (reset, broken connection).
    ClientGone(String),
    /// The recorder ended the stream (bad input, storage failure, shutdown).
    Failed(String),
}

/// Frames awaiting their ack whose arrival times are kept for the ack-latency histogram; older
/// ones are dropped unmeasured, so a stream's memory stays fixed.
const ACK_LATENCY_SAMPLES: usize = 32;

/// A recording being received.
struct Active {
    file: Arc<SpoolFile>,
    durable: watch::Receiver<u64>,
    progress: watch::Receiver<Progress>,
    /// (end offset, arrival) of frames not yet acked.
    unacked: std::collections::VecDeque<(u64, std::time::Instant)>,
}

impl Active {
    fn arrived(&mut self, end: u64) {
        if self.unacked.len() == ACK_LATENCY_SAMPLES {
            self.unacked.pop_front();
        }
        self.unacked.push_back((end, std::time::Instant::now()));
    }

    /// Records the latency of every frame an ack sent now covers.
    fn acked(&mut self, acked: u64, metrics: &Metrics) {
        while let Some(&(end, arrived)) = self.unacked.front() {
            if end > acked {
                break;
            }
            metrics.ack_latency.observe(arrived.elapsed().as_secs_f64());
            self.unacked.pop_front();
        }
    }

    /// The offset an ack may count now, or the error that ends the stream.
    fn ack(&self, level: AckLevel, outage: OutagePolicy) -> Result<u64, String> {
        if let Some(reason) = self.file.failure() {
            return Err(format!("recorder cannot store the recording: {reason}"));
        }
        if let Some(lost) = &self.progress.borrow().lost {
            return Err(format!("recorder lost the recording: {lost}"));
        }
        let durable = *self.durable.borrow();
        match level {
            AckLevel::Spool => Ok(durable),
            AckLevel::Storage => {
                let progress = self.progress.borrow();
                match (&progress.error, outage) {
                    (None, _) => Ok(progress.committed),
                    (Some(_), OutagePolicy::Degrade) => Ok(progress.committed.max(durable)),
                    (Some(error), OutagePolicy::Fail) => {
                        Err(format!("recorder storage failed: {error}"))
                    }
                }
            }
        }
    }

    /// Sends the ack the recording has earned, if it moved, and times the frames it covers.
    fn forward(&mut self, ingest: &Ingest, acks: &watch::Sender<AckState>) -> Result<u64, String> {
        let acked = self.ack(ingest.ack, ingest.outage)?;
        if acks.send_if_modified(|s| raise_ack(s, acked, &ingest.metrics)) {
            self.acked(acked, &ingest.metrics);
        }
        Ok(acked)
    }

    async fn changed(&mut self) {
        tokio::select! {
            _ = self.durable.changed() => {}
            _ = self.progress.changed() => {}
        }
    }
}

async fn next_change(active: &mut Option<Active>) {
    match active {
        Some(active) => active.changed().await,
        None => std::future::pending().await,
    }
}

/// Tracks line lengths across frames.
struct LineLimit {
    max: usize,
    current: usize,
    /// Line ends in the last frame checked (events, for pacing).
    newlines: u64,
}

impl LineLimit {
    /// False once a line is longer than the limit.
    fn check(&mut self, data: &[u8]) -> bool {
        let mut start = 0;
        self.newlines = 0;
        for pos in memchr::memchr_iter(b'\n', data) {
            self.newlines += 1;
            if self.current + (pos - start) > self.max {
                return false;
            }
            self.current = 0;
            start = pos + 1;
        }
        self.current += data.len() - start;
        self.current <= self.max
    }
}

/// Receives one recording body; stores it and drives `acks`.
async fn receive(
    ingest: &Ingest,
    body: Body,
    protocol: &str,
    peer: Option<SocketAddr>,
    sender: Option<Sender>,
    acks: &watch::Sender<AckState>,
) -> StreamResult {
    Metrics::add(&ingest.metrics.streams_open, 1);
    Metrics::add(&ingest.metrics.streams_total, 1);
    let received_at = OffsetDateTime::now_utc();
    // The id names the home region, which the header decides: it is recorded once known.
    let span =
        tracing::info_span!("stream", recording_id = tracing::field::Empty, protocol, peer = ?peer);
    let from = From {
        protocol,
        peer,
        sender,
        received_at,
    };
    receive_recording(ingest, body, &from, acks)
        .instrument(span)
        .await
}

/// Where a stream comes from.
struct From<'a> {
    protocol: &'a str,
    peer: Option<SocketAddr>,
    sender: Option<Sender>,
    received_at: OffsetDateTime,
}

async fn receive_recording(
    ingest: &Ingest,
    body: Body,
    from: &From<'_>,
    acks: &watch::Sender<AckState>,
) -> StreamResult {
    let mut body = body.into_data_stream();
    let mut header_line: Vec<u8> = Vec::new();
    let mut active: Option<Active> = None;
    let mut lines = LineLimit {
        max: ingest.max_line_bytes,
        current: 0,
        newlines: 0,
    };
    let mut received: u64 = 0;
    let limits = &ingest.limits;
    // Both timers are made once: `select!` builds every branch's future on every turn, even a
    // disabled one, and this loop turns once per body frame.
    let header_timer = tokio::time::sleep(limits.header_timeout);
    tokio::pin!(header_timer);
    // Events beyond the per-stream rate are not dropped: the body is read more slowly, which
    // pushes back on the sender through HTTP/2 flow control or TCP.
    let mut pace = Bucket::new(limits.stream_events_per_second, limits.stream_event_burst);
    let pause = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(pause);
    let mut paused = false;

    // Phase 1: the body, until it ends, breaks or is refused.
    let ended: Ended = loop {
        tokio::select! {
            biased;
            () = ingest.close_streams.cancelled() => {
                break Ended::Failed("recorder shut down before the stream ended".to_owned());
            }
            () = &mut header_timer, if active.is_none() => {
                return finish_refused(ingest, StreamResult::Rejected(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("no asciicast header line within {:?}", limits.header_timeout),
                ));
            }
            () = &mut pause, if paused => {
                paused = false;
            }
            next = body.next(), if !paused => match next {
                Some(Ok(data)) => {
                    received += data.len() as u64;
                    Metrics::add(&ingest.metrics.bytes_received, data.len() as u64);
                    let line_ok = lines.check(&data);
                    let wait = pace.take(lines.newlines, std::time::Instant::now());
                    if !wait.is_zero() {
                        Metrics::add(&ingest.metrics.streams_throttled, 1);
                        pause.as_mut().reset(tokio::time::Instant::now() + wait);
                        paused = true;
                    }
                    if let Some(active) = &mut active {
                        active.arrived(active.file.received() + data.len() as u64);
                        if let Err(e) = ingest.spool.append(&active.file, data).await {
                            break Ended::Failed(format!("recorder cannot store the recording: {}", error_chain(&e)));
                        }
                    } else {
                        header_line.extend_from_slice(&data);
                        if let Some(pos) = memchr::memchr(b'\n', &header_line) {
                            match open_recording(ingest, from, &header_line[..pos]).await {
                                Ok(opened) => {
                                    if let Err(e) = ingest.spool.append(&opened.file, Bytes::from(std::mem::take(&mut header_line))).await {
                                        active = Some(opened);
                                        break Ended::Failed(format!("recorder cannot store the recording: {}", error_chain(&e)));
                                    }
                                    active = Some(opened);
                                }
                                Err(result) => return finish_refused(ingest, result),
                            }
                        } else if header_line.len() > limits.max_header_bytes {
                            return finish_refused(ingest, StreamResult::Rejected(
                                StatusCode::BAD_REQUEST,
                                format!("first line is longer than {} bytes; expected an asciicast v2 header", limits.max_header_bytes),
                            ));
                        }
                    }
                    if !line_ok {
                        break Ended::Failed(format!("a line is longer than the limit of {} bytes", ingest.max_line_bytes));
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "upload stream broke");
                    break Ended::ClientGone(format!("upload stream broke: {e}"));
                }
                None => break Ended::Complete,
            },
            () = next_change(&mut active) => {
                if let Some(a) = &mut active
                    && let Err(message) = a.forward(ingest, acks)
                {
                    break Ended::Failed(message);
                }
            }
        }
    };

    let (outcome, reason) = match &ended {
        Ended::Complete => (StreamOutcome::Complete, None),
        Ended::ClientGone(reason) | Ended::Failed(reason) => {
            (StreamOutcome::Interrupted, Some(reason.clone()))
        }
    };

    // A body that ended inside its first line: the whole body is the header, or it is refused.
    if active.is_none() {
        if outcome == StreamOutcome::Complete && !header_line.is_empty() {
            match open_recording(ingest, from, &header_line).await {
                Ok(opened) => {
                    if let Err(e) = ingest
                        .spool
                        .append(&opened.file, Bytes::from(std::mem::take(&mut header_line)))
                        .await
                    {
                        tracing::error!(error = %e, "cannot store a header-only recording");
                    }
                    active = Some(opened);
                }
                Err(result) => return finish_refused(ingest, result),
            }
        } else {
            let message = reason
                .unwrap_or_else(|| "empty body; expected an asciicast v2 header line".to_owned());
            // A body that broke (malformed chunked encoding, a client gone) is the sender's
            // doing; only the recorder's own failure asks the client to try elsewhere.
            let status = match ended {
                Ended::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
                Ended::Complete | Ended::ClientGone(_) => StatusCode::BAD_REQUEST,
            };
            return finish_refused(ingest, StreamResult::Rejected(status, message));
        }
    }
    let Some(mut active) = active else {
        return finish_refused(ingest, StreamResult::Broken);
    };

    // Phase 2: record the end, then bring the acked offset to the end and say so.
    let end = StreamEnd {
        outcome,
        reason: reason.clone(),
        bytes: active.file.received(),
        ended_at: OffsetDateTime::now_utc(),
    };
    let finish_error = ingest.spool.finish(&active.file, &end).await.err();
    ingest.uploader.end_stream(&active.file.id, end);
    Metrics::sub(&ingest.metrics.streams_open, 1);
    if let Some(e) = finish_error {
        return StreamResult::Failed(format!(
            "recorder cannot store the recording: {}",
            error_chain(&e)
        ));
    }
    match ended {
        Ended::Complete => {}
        Ended::ClientGone(reason) => {
            tracing::info!(%reason, bytes = received, "stream ended early");
            return StreamResult::Broken;
        }
        Ended::Failed(reason) => {
            tracing::info!(%reason, bytes = received, "stream ended early");
            return StreamResult::Failed(reason);
        }
    }
    let target = active.file.received();
    let reached = tokio::time::timeout(FINAL_ACK_WAIT, async {
        loop {
            if active.forward(ingest, acks)? >= target {
                return Ok(());
            }
            active.changed().await;
        }
    })
    .await;
    match reached {
        Ok(Ok(())) => {
            tracing::info!(bytes = target, "stream ended");
            StreamResult::Stored
        }
        Ok(Err(message)) => StreamResult::Failed(message),
        Err(_elapsed) => {
            let durable = *active.durable.borrow();
            match (ingest.ack, ingest.outage) {
                (AckLevel::Storage, OutagePolicy::Degrade) if durable >= target => {
                    tracing::warn!(bytes = target, "store is slow; final ack at spool level");
                    acks.send_if_modified(|s| raise_ack(s, durable, &ingest.metrics));
                    StreamResult::Stored
                }
                _ => StreamResult::Failed(
                    "recorder could not make the recording durable in time".to_owned(),
                ),
            }
        }
    }
}

/// Acks never go back: bytes acked at spool level during a storage outage (`degrade`) stay
/// acked when acks return to storage level and the store has not caught up yet.
fn raise_ack(state: &mut AckState, acked: u64, metrics: &Metrics) -> bool {
    if acked > state.acked {
        Metrics::add(&metrics.bytes_acked, acked - state.acked);
        state.acked = acked;
        true
    } else {
        false
    }
}

fn finish_refused(ingest: &Ingest, result: StreamResult) -> StreamResult {
    Metrics::sub(&ingest.metrics.streams_open, 1);
    if let StreamResult::Rejected(status, message) = &result {
        tracing::info!(%status, %message, "recording refused");
    }
    result
}

/// Validates the header line and opens the recording's spool files and upload.
async fn open_recording(
    ingest: &Ingest,
    from: &From<'_>,
    header_line: &[u8],
) -> Result<Active, StreamResult> {
    let header = CastHeader::parse(header_line).map_err(|e| {
        StreamResult::Rejected(
            StatusCode::BAD_REQUEST,
            format!("invalid asciicast header: {e}"),
        )
    })?;
    let region = ingest.home_region(&header);
    let id = &RecordingId::new(&region, unix_ms(from.received_at), rand::random());
    tracing::Span::current().record("recording_id", tracing::field::display(id));
    let meta = RecordingMeta {
        recording_id: id.to_string(),
        node_id: ingest.node_id.clone(),
        zone: ingest.zone.clone(),
        protocol: from.protocol.to_owned(),
        peer: from.peer.map(|p| p.to_string()),
        sender: from.sender.clone(),
        received_at: from.received_at,
        header: header.into_value(),
    };
    let file = ingest
        .spool
        .create(id.clone(), meta.clone())
        .await
        .map_err(|e| {
            let status = if e.is_resource_exhausted() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            tracing::error!(error = %error_chain(&e), "cannot open spool for a recording");
            StreamResult::Rejected(status, format!("recorder cannot store the recording: {e}"))
        })?;
    let progress = ingest.uploader.register(file.clone(), meta).map_err(|e| {
        StreamResult::Rejected(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("recorder cannot store the recording: {e}"),
        )
    })?;
    Ok(Active {
        unacked: std::collections::VecDeque::with_capacity(ACK_LATENCY_SAMPLES),
        durable: file.durable(),
        file,
        progress,
    })
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `POST /v2/event`: one Kubernetes API request event, stored before the 200.
async fn event(
    State(ingest): State<Arc<Ingest>>,
    peer: Option<axum::Extension<Peer>>,
    sender: Option<axum::Extension<Sender>>,
    body: Bytes,
) -> Response {
    if let Some(axum::Extension(Peer(peer))) = peer
        && !ingest.event_rate.allow(peer.ip())
    {
        Metrics::add(&ingest.metrics.limits_refused, 1);
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "more than {} events per second from {}",
                ingest.limits.events_per_second_per_peer,
                peer.ip()
            ),
        );
    }
    let Ok(serde_json::Value::Object(mut event)) =
        serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "event body must be one JSON object",
        );
    };
    let now = OffsetDateTime::now_utc();
    let id = RecordingId::new(ingest.stores.home(), unix_ms(now), rand::random());
    event.insert("id".to_owned(), serde_json::Value::String(id.to_string()));
    // The uploader as WhoIs names it; else by its address.
    let (node, node_id) = match sender.map(|s| s.0) {
        Some(s) if s.via == "whois" => (s.name, s.node_id.unwrap_or_default()),
        _ => (
            peer.map(|p| p.0.0.ip().to_string()).unwrap_or_default(),
            String::new(),
        ),
    };
    let destination = event
        .entry("destination")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(dest) = destination.as_object_mut() {
        let empty =
            |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).is_none_or(str::is_empty);
        if empty(dest.get("node")) {
            dest.insert("node".to_owned(), serde_json::Value::String(node));
        }
        if empty(dest.get("nodeID")) {
            dest.insert("nodeID".to_owned(), serde_json::Value::String(node_id));
        }
    }
    let bytes = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
    let path = ObjectKey::event(&id);
    match put_create(ingest.stores.home_store().as_ref(), &path, bytes).await {
        Ok(()) => {
            Metrics::add(&ingest.metrics.events_stored, 1);
            StatusCode::OK.into_response()
        }
        Err(e) => {
            tracing::error!(event_id = %id, error = %e, "cannot store event");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "recorder cannot store the event",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_limit_spans_frames() {
        let mut l = LineLimit {
            max: 4,
            current: 0,
            newlines: 0,
        };
        assert!(l.check(b"ab"));
        assert!(l.check(b"cd\nabcd\n"));
        assert!(l.check(b"abc"));
        assert!(!l.check(b"de"));
        let mut l = LineLimit {
            max: 4,
            current: 0,
            newlines: 0,
        };
        assert!(!l.check(b"abcdef\n"));
    }
}
