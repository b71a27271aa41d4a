//! Accept loops: HTTP/1.1 and h2c prior knowledge on one port (hyper-util's auto builder sniffs
//! the HTTP/2 preface), a cap on connections, the peer address in each request's extensions,
//! and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ingest::Peer;

/// Connections open at once per listener. Tailscale clients use one connection per recording
/// (two for the v2 probe and a v1 fallback), so this sits above `max_open_recordings`' default
/// and below the process's file-descriptor limit, which spool files share.
pub const MAX_CONNECTIONS: usize = 16_384;

/// h2 receive window per stream: large enough for a busy terminal's burst at full speed, small
/// enough that 10,000 streams cannot pin much memory if reading ever lags.
const H2_STREAM_WINDOW: u32 = 256 << 10;
/// h2 receive window per connection (one recording per connection in production).
const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// Streams per h2 connection; real clients open one or two, load generators multiplex more.
const H2_MAX_STREAMS: u32 = 1024;
/// TCP keepalive: a v1 upload has no liveness signal and recordings have no idle timeout, so a
/// peer that vanished without a FIN is found by the kernel after about 60 s + 6 × 10 s.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_PROBES: u32 = 6;

/// HTTP/2 PING interval and timeout, to notice uploaders that vanished without a FIN.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for open connections to close (the caller bounds that wait).
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer))));
        let builder = builder.clone();
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
