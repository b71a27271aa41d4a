//! Whether each region's store answers, as the uploader and a probe see it.
//!
//! A region is *down* from the first transient failure of a put or of the probe until the next
//! success. While the node's own region (or any region with uploads waiting) is down,
//! `/readyz` says not ready; under `storage_outage = "degrade"` streams keep being acked at
//! spool level meanwhile. When a region comes back, every upload waiting on it is retried at
//! once (see `Uploader::region_back`), so the spool drains without waiting out a backoff.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use castvault_storage::keys::ObjectKey;
use castvault_storage::store::{ErrorKind, Stores, error_kind};
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

pub const UPLOAD_RETRIES: &str = "castvault_upload_retries_total";
pub const REGION_UP: &str = "castvault_store_up";
pub const LEASE_TAKEOVERS: &str = "castvault_lease_takeovers_total";
pub const UPLOAD_FAILURES_REGION: &str = "castvault_region_upload_failures_total";

/// How often each store is probed while every store is up. Bounds how long an outage goes
/// unnoticed when nothing is uploading.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// How often while a store is down: bounds how late the spool starts draining after the store
/// returns (the drain bench noticed a store back 22–135 ms after it was, at 100 ms, of a
/// drain taking 0.7 s). One HEAD, without retries: against a refused connection it costs a
/// SYN, 40 a second; against a black hole it waits out [`PROBE_TIMEOUT`] first.
pub const PROBE_EVERY_WHILE_DOWN: Duration = Duration::from_millis(25);

/// Longest a probe may take before the store counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct RegionHealth {
    /// The last failure while down; `None` while up.
    down: Mutex<Option<String>>,
    retries: AtomicU64,
    failures: AtomicU64,
    takeovers: AtomicU64,
}

/// A metric name, its type, and how to read it off one region.
type Series = (&'static str, &'static str, fn(&RegionHealth) -> u64);

/// Per-region store health and counters.
#[derive(Debug, Default)]
pub struct Health {
    regions: BTreeMap<String, RegionHealth>,
    /// Told when a region comes back up (the uploader retries everything waiting on it).
    back: tokio::sync::Notify,
}

impl Health {
    pub fn new(stores: &Stores) -> Self {
        Self {
            regions: stores
                .iter()
                .map(|(r, _)| (r.to_string(), RegionHealth::default()))
                .collect(),
            back: tokio::sync::Notify::new(),
        }
    }

    fn down_lock(&self, region: &str) -> Option<std::sync::MutexGuard<'_, Option<String>>> {
        self.regions.get(region).map(|r| {
            r.down
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
    }

    /// A store call in `region` succeeded.
    pub fn up(&self, region: &str) {
        let was_down = self
            .down_lock(region)
            .is_some_and(|mut d| d.take().is_some());
        if was_down {
            tracing::info!(region, "store is reachable again");
            // One waiter (the uploader); a permit is kept if it is busy, so no return is missed.
            self.back.notify_one();
        }
    }

    /// A store call in `region` failed in a way worth retrying.
    pub fn down(&self, region: &str, error: &str) {
        if let Some(mut d) = self.down_lock(region) {
            if d.is_none() {
                tracing::warn!(region, error, "store is unreachable");
            }
            *d = Some(error.to_owned());
        }
    }

    pub fn is_up(&self, region: &str) -> bool {
        self.down_lock(region).is_some_and(|d| d.is_none())
    }

    /// Every region that is down, with its last error.
    pub fn down_regions(&self) -> Vec<(String, String)> {
        self.regions
            .iter()
            .filter_map(|(name, r)| {
                let d = r
                    .down
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                d.clone().map(|e| (name.clone(), e))
            })
            .collect()
    }

    pub fn retried(&self, region: &str) {
        if let Some(r) = self.regions.get(region) {
            r.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn failed(&self, region: &str) {
        if let Some(r) = self.regions.get(region) {
            r.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn took_over(&self, region: &str) {
        if let Some(r) = self.regions.get(region) {
            r.takeovers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resolves when some region comes back up.
    pub async fn some_region_back(&self) {
        self.back.notified().await;
    }

    /// Prometheus text for the per-region series.
    pub fn render(&self, out: &mut String) {
        let series: [Series; 4] = [
            (REGION_UP, "gauge", |r| {
                u64::from(
                    r.down
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .is_none(),
                )
            }),
            (UPLOAD_RETRIES, "counter", |r| {
                r.retries.load(Ordering::Relaxed)
            }),
            (UPLOAD_FAILURES_REGION, "counter", |r| {
                r.failures.load(Ordering::Relaxed)
            }),
            (LEASE_TAKEOVERS, "counter", |r| {
                r.takeovers.load(Ordering::Relaxed)
            }),
        ];
        for (name, kind, value) in series {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (region, r) in &self.regions {
                let _ = writeln!(out, "{name}{{region=\"{region}\"}} {}", value(r));
            }
        }
    }
}

/// Probes every region's store every [`PROBE_EVERY`] (every [`PROBE_EVERY_WHILE_DOWN`] while it
/// is down) until `stop`. Each region has its own loop, so a black-holed store, whose probe
/// waits out [`PROBE_TIMEOUT`], never delays noticing that another one came back.
pub async fn probe(health: std::sync::Arc<Health>, stores: Stores, stop: CancellationToken) {
    let key = ObjectKey::probe();
    let loops = stores.iter().map(|(region, store)| {
        let (health, stop, key) = (&health, &stop, &key);
        async move {
            loop {
                let answer = tokio::time::timeout(PROBE_TIMEOUT, store.probe.head(key)).await;
                match answer {
                    Ok(Ok(_)) => health.up(region.as_str()),
                    Ok(Err(e)) if error_kind(&e) == ErrorKind::NotFound => {
                        health.up(region.as_str());
                    }
                    Ok(Err(e)) => health.down(region.as_str(), &crate::upload::error_chain(&e)),
                    Err(_) => health.down(region.as_str(), "probe timed out"),
                }
                let every = if health.is_up(region.as_str()) {
                    PROBE_EVERY
                } else {
                    PROBE_EVERY_WHILE_DOWN
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        }
    });
    futures::future::join_all(loops).await;
}
