//! Prometheus metrics. Every metric name is a const here; values are plain atomics so the hot
//! path pays one relaxed add.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

pub const STREAMS_OPEN: &str = "castvault_streams_open";
pub const STREAMS_TOTAL: &str = "castvault_streams_total";
pub const STREAMS_REFUSED: &str = "castvault_streams_refused_total";
pub const BYTES_RECEIVED: &str = "castvault_bytes_received_total";
pub const BYTES_ACKED: &str = "castvault_bytes_acked_total";
pub const SPOOL_BYTES: &str = "castvault_spool_bytes";
pub const STAGED_BYTES: &str = "castvault_spool_staged_bytes";
pub const CHUNKS_COMMITTED: &str = "castvault_chunks_committed_total";
pub const CHUNKS_THOROUGH: &str = "castvault_chunks_compressed_thorough_total";
pub const BYTES_COMMITTED: &str = "castvault_bytes_committed_total";
pub const BYTES_STORED: &str = "castvault_bytes_stored_total";
pub const UPLOAD_FAILURES: &str = "castvault_upload_failures_total";
pub const RECORDINGS_FINALIZED: &str = "castvault_recordings_finalized_total";
pub const RECORDINGS_PENDING: &str = "castvault_recordings_pending_upload";
pub const ADMISSION_REFUSED: &str = "castvault_ingest_admission_refused_total";
pub const LIMITS_REFUSED: &str = "castvault_ingest_limit_refusals_total";
pub const STREAMS_THROTTLED: &str = "castvault_ingest_stream_throttled_total";
pub const EVENTS_STORED: &str = "castvault_k8s_events_stored_total";
pub const ACK_LATENCY: &str = "castvault_ack_latency_seconds";
pub const JOURNAL_COMMIT: &str = "castvault_spool_journal_commit_seconds";
pub const LEASE_RENEWALS: &str = "castvault_lease_renewals_total";
pub const LEASE_RENEWALS_FAILED: &str = "castvault_lease_renewals_failed_total";
pub const LEASE_RENEWALS_LATE: &str = "castvault_lease_renewals_late_total";
pub const CATALOG_RECORDINGS: &str = "castvault_catalog_recordings";
pub const CATALOG_INDEXED: &str = "castvault_catalog_recordings_indexed";

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const ACK_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A Prometheus histogram of plain atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    /// One count per bucket of [`ACK_LATENCY_BUCKETS`], plus `+Inf`.
    buckets: [AtomicU64; 13],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let bucket = ACK_LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(ACK_LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = ACK_LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// The node's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    pub streams_open: AtomicU64,
    pub streams_total: AtomicU64,
    pub streams_refused: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Bytes covered by acks sent (at the node's ack level; spool level in a `degrade` outage).
    pub bytes_acked: AtomicU64,
    pub chunks_committed: AtomicU64,
    /// Chunks compressed with the thorough setting (the rest at `compression_level`).
    pub chunks_compressed_thorough: AtomicU64,
    pub bytes_committed: AtomicU64,
    pub bytes_stored: AtomicU64,
    /// Compressed chunks kept in the spool while their store is out of reach.
    pub staged_bytes: AtomicU64,
    pub upload_failures: AtomicU64,
    pub recordings_finalized: AtomicU64,
    pub recordings_pending: AtomicU64,
    pub events_stored: AtomicU64,
    /// Requests refused by admission (403/503 before the body).
    pub admission_refused: AtomicU64,
    /// Requests refused for a per-peer limit (429).
    pub limits_refused: AtomicU64,
    /// Times a stream's reading was paused for its event rate.
    pub streams_throttled: AtomicU64,
    /// Lease renewals that succeeded, failed (the store did not answer), and that landed past
    /// two thirds of the lease's life: late ones come before peers take recordings over.
    pub lease_renewals: AtomicU64,
    pub lease_renewals_failed: AtomicU64,
    pub lease_renewals_late: AtomicU64,
    /// From a frame's arrival until an ack covering it is issued (for v1: until it is durable).
    pub ack_latency: Histogram,
    /// One spool journal commit round (write and fdatasync), which every spool-level ack waits
    /// for; shared with the journal writer.
    pub journal_commit: std::sync::Arc<Histogram>,
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
        let rows: [(&str, &str, &AtomicU64); 20] = [
            (STREAMS_OPEN, "gauge", &self.streams_open),
            (STREAMS_TOTAL, "counter", &self.streams_total),
            (STREAMS_REFUSED, "counter", &self.streams_refused),
            (BYTES_RECEIVED, "counter", &self.bytes_received),
            (BYTES_ACKED, "counter", &self.bytes_acked),
            (CHUNKS_COMMITTED, "counter", &self.chunks_committed),
            (CHUNKS_THOROUGH, "counter", &self.chunks_compressed_thorough),
            (BYTES_COMMITTED, "counter", &self.bytes_committed),
            (BYTES_STORED, "counter", &self.bytes_stored),
            (STAGED_BYTES, "gauge", &self.staged_bytes),
            (UPLOAD_FAILURES, "counter", &self.upload_failures),
            (RECORDINGS_FINALIZED, "counter", &self.recordings_finalized),
            (RECORDINGS_PENDING, "gauge", &self.recordings_pending),
            (EVENTS_STORED, "counter", &self.events_stored),
            (ADMISSION_REFUSED, "counter", &self.admission_refused),
            (LIMITS_REFUSED, "counter", &self.limits_refused),
            (STREAMS_THROTTLED, "counter", &self.streams_throttled),
            (LEASE_RENEWALS, "counter", &self.lease_renewals),
            (
                LEASE_RENEWALS_FAILED,
                "counter",
                &self.lease_renewals_failed,
            ),
            (LEASE_RENEWALS_LATE, "counter", &self.lease_renewals_late),
        ];
        let mut out = String::new();
        for (name, kind, value) in rows {
            let _ = writeln!(
                out,
                "# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.ack_latency.render(ACK_LATENCY, &mut out);
        self.journal_commit.render(JOURNAL_COMMIT, &mut out);
        out
    }
}
