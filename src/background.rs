//! The background runtime: chunk compression, store puts and finalization run here, on threads
//! with a lower CPU priority than the ingest runtime's.
//!
//! Acks at `spool` level wait only for the journal, never for uploads, but on a small node the
//! two compete for the same cores: when many recordings cut a chunk at once, compression and
//! store writes (file creation, fsync) can hold every core for hundreds of milliseconds, and the
//! ack tail grows with them. On lower-priority threads that work fills the idle time instead;
//! under load the scheduler still gives it a share ([`BACKGROUND_NICE`]), so uploads keep moving
//! and the spool keeps draining.

use std::io;

/// Worker threads of the background runtime: enough to overlap a compression with store calls;
/// the blocking pool (compression, local-file puts) grows beside them up to
/// [`BACKGROUND_BLOCKING_THREADS`].
pub const BACKGROUND_WORKERS: usize = 2;

/// Blocking threads of the background runtime at most; as many as the uploader's 32 concurrent
/// recordings (`UPLOAD_CONCURRENCY`), each of which holds at most a compression and a scan at once.
pub const BACKGROUND_BLOCKING_THREADS: usize = 64;

/// The nice value of background threads. At 10 a busy background thread gets about a tenth of
/// a core against one busy ingest thread (Linux CFS weights 110 against 1024), and all of it when
/// ingest is idle. Raising a thread's nice value needs no privilege.
pub const BACKGROUND_NICE: i32 = 10;

/// Builds the background runtime.
///
/// # Errors
/// When the runtime's threads cannot be started.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(BACKGROUND_WORKERS)
        .max_blocking_threads(BACKGROUND_BLOCKING_THREADS)
        .thread_name("castvault-bg")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
}

/// Gives the calling thread the background priority. Linux applies a nice value per thread.
/// Failure only costs latency, so it is logged, never fatal.
pub fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE) {
        tracing::warn!(error = %e, "cannot lower a background thread's priority");
    }
}
