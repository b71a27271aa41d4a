//! Wiring: builds the stages from the config, recovers the spool, serves both listeners, and
//! shuts down in a fixed order.
//!
//! Shutdown (SIGTERM): stop accepting (new recordings get 503 and the client tries the next
//! recorder; `/readyz` turns 503), let streams in flight run for `drain_timeout`, then end the
//! rest with the final error frame, then give the uploader `upload_grace`; whatever is still in
//! the spool resumes on the next start. `drain_timeout + upload_grace` (25 s by default) stays
//! under Kubernetes' default 30 s termination grace period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, PeerCounts, PeerRate};
use crate::audit::Audit;
use crate::auth::Access;
use crate::catalog::{self, Catalog};
use crate::config::Config;
use crate::health::Health;
use crate::indexer;
use crate::ingest::{self, Ingest};
use crate::lease::Sweeper;
use crate::listener;
use crate::metrics::Metrics;
use crate::playback::{self, Web};
use crate::spool::Spool;
use crate::upload::{self, UploadConfig, Uploader};
use castvault_storage::signing::NodeKey;

/// After the drain deadline, how long closed streams get to send their final frame.
const CLOSE_STREAMS_WAIT: Duration = Duration::from_secs(3);

/// The two bound listeners.
pub struct Listeners {
    pub ingest: TcpListener,
    pub web: TcpListener,
}

/// Runs a recorder node until `shutdown` is cancelled and the drain is done.
///
/// # Errors
/// Start-up failures: invalid config, store or spool that cannot be opened.
pub async fn run(
    config: Config,
    background: &tokio::runtime::Handle,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let problems = config.validate();
    anyhow::ensure!(
        problems.is_empty(),
        "invalid config: {}",
        problems.join("; ")
    );
    let region = config.region().map_err(anyhow::Error::msg)?;
    let store_url = config.store_url();
    let stores = config
        .open_stores()
        .map_err(anyhow::Error::msg)
        .context("opening the stores")?;
    let store = stores.home_store().clone();
    let health = Arc::new(Health::new(&stores));
    let signer = Arc::new(
        NodeKey::load_or_create(&config.data_dir.join("keys"))
            .context("loading the signing key")?,
    );
    background.spawn(crate::keys::publish(
        stores.clone(),
        signer.public_record(&config.node_id),
    ));
    let spool = Spool::open(config.spool_dir()).context("opening the spool")?;
    let metrics = Arc::new(Metrics {
        journal_commit: spool.commit_seconds(),
        ..Metrics::default()
    });
    let catalog = Catalog::open(&config.catalog_path()).context("opening the catalog")?;
    let upload_stop = CancellationToken::new();
    let uploader = Uploader::start(
        background,
        stores.clone(),
        health.clone(),
        UploadConfig {
            max_chunk_bytes: config.chunk.max_bytes,
            max_chunk_age: config.chunk.max_age,
            compression_level: config.chunk.compression_level,
            adaptive_compression: config.chunk.adaptive_compression,
            max_line_bytes: config.max_line_bytes,
            node_id: config.node_id.clone(),
            lease_ttl: config.lease_ttl,
            acks_from_spool: config.ack_level() == crate::config::AckLevel::Spool
                || config.storage_outage == crate::config::OutagePolicy::Degrade,
            signer: signer.clone(),
            checkpoint_every: config.checkpoint_every,
            min_free_disk_bytes: config.min_free_disk_bytes,
        },
        metrics.clone(),
        Some(catalog.clone()),
        upload_stop.clone(),
    );
    background.spawn(catalog::keep_current(
        catalog.clone(),
        stores.clone(),
        upload_stop.clone(),
    ));
    background.spawn(crate::health::probe(
        health.clone(),
        stores.clone(),
        upload_stop.clone(),
    ));
    background.spawn(
        Sweeper {
            stores: stores.clone(),
            uploader: uploader.clone(),
            catalog: catalog.clone(),
            health: health.clone(),
            node_id: config.node_id.clone(),
            zone: config.zone.clone(),
            ttl: config.lease_ttl,
            signer: signer.clone(),
        }
        .run(upload_stop.clone()),
    );
    crate::background::spawn_indexer(indexer::run(
        stores.clone(),
        catalog.clone(),
        uploader.clone(),
        indexer::Signer {
            key: signer.clone(),
            node_id: config.node_id.clone(),
        },
        upload_stop.clone(),
    ))
    .context("starting the indexer")?;
    let ready = CancellationToken::new();
    let draining = CancellationToken::new();
    let web_stop = CancellationToken::new();
    let access =
        Arc::new(Access::new(&config.access, &config.data_dir).context("setting up web access")?);
    let web = Arc::new(Web {
        stores: stores.clone(),
        health: health.clone(),
        catalog: catalog.clone(),
        access,
        audit: Audit::start(store, &config.node_id, signer.clone()),
        node_id: config.node_id.clone(),
        seek_cache: std::sync::Mutex::default(),
        uploader: uploader.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        draining: draining.clone(),
    });
    let tls = match &config.web_tls {
        Some(tls) => Some(
            crate::tls::acceptor(tls, web_stop.clone())
                .map_err(anyhow::Error::msg)
                .context("loading the web TLS certificate")?,
        ),
        None => None,
    };
    let web_task = tokio::spawn(listener::serve(
        listeners.web,
        playback::router(web),
        web_stop.clone(),
        listener::Limits::web(&config.limits, tls),
    ));

    let recovered = spool.recover().context("reading the spool")?;
    let recovered_count = recovered.len();
    for recording in recovered {
        let id = recording.file.id.clone();
        uploader
            .resume(recording)
            .await
            .with_context(|| format!("resuming recording {id} from the spool"))?;
    }
    tracing::info!(
        node_id = %config.node_id, region = %region, store = %store_url, ack = ?config.ack_level(),
        recovered = recovered_count, "recorder ready"
    );

    let ingest = Arc::new(Ingest {
        spool,
        uploader: uploader.clone(),
        stores,
        routing: config.routing.clone(),
        failover: config
            .regions
            .iter()
            .map(|(name, r)| (name.clone(), r.failover.clone()))
            .collect(),
        metrics,
        ack: config.ack_level(),
        outage: config.storage_outage,
        node_id: config.node_id.clone(),
        zone: config.zone.clone(),
        max_line_bytes: config.max_line_bytes,
        min_free_disk_bytes: config.min_free_disk_bytes,
        admission: Admission::new(&config.admission),
        limits: config.limits.clone(),
        peer_recordings: PeerCounts::new(config.limits.max_recordings_per_peer),
        event_rate: PeerRate::new(config.limits.events_per_second_per_peer),
        open_recordings: Arc::new(Semaphore::new(config.max_open_recordings)),
        draining: draining.clone(),
        close_streams: CancellationToken::new(),
        streams: TaskTracker::new(),
    });
    let ingest_stop = CancellationToken::new();
    let mut ingest_task = tokio::spawn(listener::serve(
        listeners.ingest,
        ingest::router(ingest.clone()),
        ingest_stop.clone(),
        listener::Limits::ingest(&config.limits),
    ));
    ready.cancel();

    shutdown.cancelled().await;
    tracing::info!(drain_timeout = ?config.drain_timeout, "draining: refusing new recordings");
    draining.cancel();
    ingest_stop.cancel();
    ingest.streams.close();
    let drained = tokio::time::timeout(config.drain_timeout, async {
        ingest.streams.wait().await;
        let _ = (&mut ingest_task).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain deadline passed: ending open streams with an error frame");
        ingest.close_streams.cancel();
        let _ = tokio::time::timeout(CLOSE_STREAMS_WAIT, async {
            ingest.streams.wait().await;
            let _ = ingest_task.await;
        })
        .await;
    }
    let left = upload::drain(&uploader, config.upload_grace).await;
    if left > 0 {
        tracing::warn!(
            recordings = left,
            "upload grace ended; the rest resumes from the spool on restart"
        );
    }
    upload_stop.cancel();
    web_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), web_task).await;
    tracing::info!("stopped");
    Ok(())
}
