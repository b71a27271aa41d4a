//! Prometheus metrics. Every metric name is a const here; values are plain atomics so the hot
//! path pays one relaxed add.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

pub const STREAMS_OPEN: &str = "castvault_streams_open";
pub const STREAMS_TOTAL: &str = "castvault_streams_total";
pub const STREAMS_REFUSED: &str = "castvault_streams_refused_total";
pub const BYTES_RECEIVED: &str = "castvault_bytes_received_total";
pub const CHUNKS_COMMITTED: &str = "castvault_chunks_committed_total";
pub const BYTES_COMMITTED: &str = "castvault_bytes_committed_total";
pub const BYTES_STORED: &str = "castvault_bytes_stored_total";
pub const UPLOAD_FAILURES: &str = "castvault_upload_failures_total";
pub const RECORDINGS_FINALIZED: &str = "castvault_recordings_finalized_total";
pub const RECORDINGS_PENDING: &str = "castvault_recordings_pending_upload";
pub const EVENTS_STORED: &str = "castvault_k8s_events_stored_total";

/// The node's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    pub streams_open: AtomicU64,
    pub streams_total: AtomicU64,
    pub streams_refused: AtomicU64,
    pub bytes_received: AtomicU64,
    pub chunks_committed: AtomicU64,
    pub bytes_committed: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub upload_failures: AtomicU64,
    pub recordings_finalized: AtomicU64,
    pub recordings_pending: AtomicU64,
    pub events_stored: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(gauge: &AtomicU64, n: u64) {
        gauge.fetch_sub(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 11] = [
            (STREAMS_OPEN, "gauge", &self.streams_open),
            (STREAMS_TOTAL, "counter", &self.streams_total),
            (STREAMS_REFUSED, "counter", &self.streams_refused),
            (BYTES_RECEIVED, "counter", &self.bytes_received),
            (CHUNKS_COMMITTED, "counter", &self.chunks_committed),
            (BYTES_COMMITTED, "counter", &self.bytes_committed),
            (BYTES_STORED, "counter", &self.bytes_stored),
            (UPLOAD_FAILURES, "counter", &self.upload_failures),
            (RECORDINGS_FINALIZED, "counter", &self.recordings_finalized),
            (RECORDINGS_PENDING, "gauge", &self.recordings_pending),
            (EVENTS_STORED, "counter", &self.events_stored),
        ];
        let mut out = String::new();
        for (name, kind, value) in rows {
            let _ = writeln!(
                out,
                "# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}
