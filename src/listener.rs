//! Accept loops: HTTP/1.1 and h2c prior knowledge on one port (hyper-util's auto builder sniffs
//! the HTTP/2 preface), optionally TLS, caps on connections in total and per address, HTTP
//! bounds (header sizes and times, h2 streams and resets), the peer address in each request's
//! extensions, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{LimitsConfig, PeerCounts};
use crate::ingest::Peer;
use crate::tls::HANDSHAKE_TIMEOUT;

/// Connections open at once per listener. Tailscale clients use one connection per recording
/// (two for the v2 probe and a v1 fallback), so this sits above `max_open_recordings`' default
/// and below the process's file-descriptor limit, which spool files share.
pub const MAX_CONNECTIONS: usize = 16_384;

/// h2 receive window per stream: large enough for a busy terminal's burst at full speed, small
/// enough that 10,000 streams cannot pin much memory if reading ever lags.
const H2_STREAM_WINDOW: u32 = 256 << 10;
/// Largest h2 DATA frame accepted (the protocol's default is 16 KiB): a fast stream arrives in
/// fewer frames, so fewer spool appends and journal records; a quarter of the stream window,
/// so a sender keeps frames in flight while it waits for window updates.
const H2_MAX_FRAME: u32 = 64 << 10;
/// h2 receive window per connection (one recording per connection in production).
const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// TCP keepalive: a v1 upload has no liveness signal and recordings have no idle timeout, so a
/// peer that vanished without a FIN is found by the kernel after about 60 s + 6 × 10 s.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_PROBES: u32 = 6;

/// HTTP/2 PING interval and timeout, to notice uploaders that vanished without a FIN.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connection over its peer's limit is kept to deliver the 429 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Refusals being answered at once; past it a connection over its limit is closed without an
/// answer, so a peer flooding connections cannot fill the listener with refusals.
const REFUSALS_IN_FLIGHT: usize = 256;

/// What one listener allows.
#[derive(Clone)]
pub struct Limits {
    /// Open connections in total; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Open connections per address; `None` for no per-address bound.
    pub per_peer: Option<PeerCounts>,
    pub h2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list and HTTP/1.1 read buffer.
    pub max_request_header_bytes: u32,
    pub h2_max_pending_reset_streams: usize,
    /// Time for an HTTP/1.1 request's headers to arrive.
    pub http_header_timeout: Duration,
    /// Serve HTTPS (HTTP/1.1 and h2 by ALPN) instead of cleartext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Limits {
    /// The ingest listener's limits from the config.
    pub fn ingest(config: &LimitsConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            per_peer: Some(PeerCounts::new(config.max_connections_per_peer)),
            h2_max_concurrent_streams: config.h2_max_concurrent_streams,
            max_request_header_bytes: config.max_request_header_bytes,
            h2_max_pending_reset_streams: config.h2_max_pending_reset_streams,
            http_header_timeout: config.http_header_timeout,
            tls: None,
        }
    }

    /// The web listener: the same HTTP bounds, no per-address bound (people share NAT
    /// addresses; the UI authenticates every request).
    pub fn web(config: &LimitsConfig, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        Self {
            per_peer: None,
            tls,
            ..Self::ingest(config)
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::ingest(&LimitsConfig::default())
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for open connections to close (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_bytes)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout)
        // A client that shuts its write side after the body still gets its answer.
        .half_close(true)
        .max_buf_size(limits.max_request_header_bytes as usize);
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit,
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(%peer, error = %e, "cannot set TCP keepalive");
        }
        let slot = match &limits.per_peer {
            Some(counts) => match counts.take(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    let Ok(refusal) = refusals.clone().try_acquire_owned() else {
                        continue;
                    };
                    let builder = builder.clone();
                    connections.spawn(async move {
                        tracing::debug!(%peer, "connection over the per-address limit");
                        let refuse = TowerToHyperService::new(tower::service_fn(|_req| async {
                            let mut response = axum::response::Response::new(
                                axum::body::Body::from("too many connections from your address\n"),
                            );
                            *response.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
                            response.headers_mut().insert(
                                axum::http::header::CONNECTION,
                                axum::http::HeaderValue::from_static("close"),
                            );
                            Ok::<_, std::convert::Infallible>(response)
                        }));
                        let conn = builder.serve_connection(TokioIo::new(stream), refuse);
                        let _ = tokio::time::timeout(REFUSAL_LINGER, conn).await;
                        drop(refusal);
                        drop(permit);
                    });
                    continue;
                }
            },
            None => None,
        };
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer))));
        let builder = builder.clone();
        let tls = limits.tls.clone();
        let stop = shutdown.clone();
        let first_byte_wait = limits.http_header_timeout;
        connections.spawn(async move {
            let result = match tls {
                None => {
                    // A connection that sends nothing (half-open, or held to exhaust slots)
                    // is closed after the header time limit; hyper's own timer starts only
                    // with the first byte.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(first_byte_wait, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {
                            run_connection(&builder, stream, service, &stop).await
                        }
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(Box::new(e) as _),
                        Err(_) => Err("nothing sent within the header time limit".into()),
                    }
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => run_connection(&builder, tls, service, &stop).await,
                        Ok(Err(e)) => Err(Box::new(e) as _),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one connection; once `stop` is cancelled it finishes the requests in flight and
/// closes (HTTP/2 GOAWAY, HTTP/1.1 close after the current response).
async fn run_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: TowerToHyperService<Router>,
    stop: &CancellationToken,
) -> Result<(), ConnError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}
