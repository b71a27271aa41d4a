//! The background runtime: chunk compression, store puts and finalization run here, on threads
//! with a lower CPU priority than the ingest runtime's.
//!
//! Acks at `spool` level wait only for the journal, never for uploads, but on a small node the
//! two compete for the same cores: when many recordings cut a chunk at once, compression and
//! store writes (file creation, fsync) can hold every core for hundreds of milliseconds, and the
//! ack tail grows with them. On lower-priority threads that work fills the idle time instead;
//! under load the scheduler still gives it a share ([`BACKGROUND_NICE`]), so uploads keep moving
//! and the spool keeps draining. The indexer runs lower still, on its own runtime
//! ([`spawn_indexer`]).

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
    set_nice(BACKGROUND_NICE);
}

/// Threads that run work meant only for spare CPU (see [`spare`]). Thorough compression is
/// used only below 16 MiB/s of ingest per core (`upload::THOROUGH_MAX_RATE_PER_CORE`); two
/// threads at about 160 MB/s each keep up with that on nodes of up to about 20 cores, and on a
/// bigger node a backlog here turns chunks back to the fast level (waiting uploads hold slots).
pub const SPARE_THREADS: usize = 2;

/// A pool of [`SPARE_THREADS`] blocking threads at the indexer's priority ([`INDEX_NICE`]),
/// for work that should use only spare CPU (a chunk's thorough compression), so that commits
/// and the acks waiting for them go first. A thread's nice value cannot be lowered again
/// without privilege, so such work gets threads of its own rather than borrowing one.
/// Started on first use; `None` if its threads could not be started.
pub fn spare() -> Option<tokio::runtime::Handle> {
    static SPARE: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    SPARE
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(SPARE_THREADS)
                .thread_name("castvault-spare")
                .on_thread_start(|| set_nice(INDEX_NICE))
                .build()
                .inspect_err(|e| tracing::warn!(error = %e, "cannot start the spare-CPU threads"))
                .ok()
        })
        .as_ref()
        .map(|runtime| runtime.handle().clone())
}

fn set_nice(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::warn!(error = %e, nice, "cannot lower a background thread's priority");
    }
}

/// The nice value of the indexer's threads, below the uploads': indexing is work that can
/// wait, and commits (what acks at `storage` level and a drain after an outage wait for) and
/// the sessions on the same host go first. At 19 a busy indexer thread gets about an eighth
/// of a core against a busy upload thread (CFS weights 15 against 110), all of an idle one.
pub const INDEX_NICE: i32 = 19;

/// Blocking threads of the indexer's runtime: one replay and the catalog writes beside it.
pub const INDEX_BLOCKING_THREADS: usize = 4;

/// Runs `task` on its own thread and single-threaded runtime at [`INDEX_NICE`], blocking pool
/// included, until it returns.
///
/// # Errors
/// When the thread or its runtime cannot be started.
pub fn spawn_indexer<F>(task: F) -> io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(INDEX_BLOCKING_THREADS)
        .thread_name("castvault-index")
        .on_thread_start(|| set_nice(INDEX_NICE))
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("castvault-index".to_owned())
        .spawn(move || {
            set_nice(INDEX_NICE);
            runtime.block_on(task);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spare work runs at the indexer's nice value on threads of its own.
    #[tokio::test]
    async fn spare_work_runs_at_index_priority() {
        let nice =
            || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(-100);
        let spare = spare().unwrap_or_else(|| panic!("spare threads"));
        assert_eq!(spare.spawn_blocking(nice).await.ok(), Some(INDEX_NICE));
        assert_ne!(nice(), INDEX_NICE, "the caller's thread keeps its priority");
    }
}
