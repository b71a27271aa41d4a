//! Leases on recordings being received, and finalizing the orphans of a node that died.
//!
//! Before a recording's first chunk goes to the store, the receiving node creates
//! `v1/live/{id}.json` (conditional create) holding the recording's metadata, and renews it every
//! third of `lease_ttl` by a conditional update on the ETag it last wrote (one task per node,
//! `upload::keep_leases`, apart from the uploads, so no upload step can delay a renewal). The
//! lease is deleted once the manifest is stored.
//!
//! Every node of a region sweeps the region's leases every quarter of `lease_ttl`. A lease whose
//! ETag this node has seen unchanged for a whole `lease_ttl` on its own monotonic clock (so no
//! two nodes' clocks are compared), and whose `renewed_at` is also more than `lease_ttl` old, is
//! taken over: the sweeper overwrites it on that ETag, naming itself. Only one node can win that
//! conditional update, so one node finalizes: it reads the committed chunks back (the contiguous
//! prefix from chunk 0; chunks stored past a gap were never acked and are removed), writes the manifest
//! with status `interrupted` (a conditional create, so a manifest written meanwhile wins), the
//! catalog row, and deletes the lease. A node that cannot list a region forgets what it had
//! seen there, so a store outage never counts towards an expiry.
//!
//! A node that loses its lease (its renewal fails on the ETag) stops uploading that recording,
//! ends its stream with the final error frame, and keeps its spool files: nothing is deleted.
//!
//! The local-disk store has no conditional updates: it is single-node. Leases are not written
//! there and nobody sweeps; a node that dies finalizes its own recordings from its spool when it
//! restarts (`recovered` or `interrupted`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use castvault_storage::keys::{ObjectKey, RecordingId};
use castvault_storage::manifest::{CatalogRow, MANIFEST_FORMAT, Manifest, RecordingStatus};
use castvault_storage::signing::NodeKey;
use castvault_storage::store::{
    DynStore, ErrorKind, Stores, error_kind, put_create, put_overwrite,
};
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::health::Health;
use crate::spool::RecordingMeta;
use crate::upload::{Uploader, error_chain};

/// What a lease object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    /// The node receiving the recording, or the node finalizing it after a takeover.
    pub holder: String,
    pub zone: String,
    #[serde(with = "time::serde::rfc3339")]
    pub renewed_at: OffsetDateTime,
    pub ttl_ms: u64,
    /// Set when `holder` took the lease over from a node that stopped renewing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_from: Option<String>,
    pub meta: RecordingMeta,
}

impl Lease {
    /// The lease of a recording this node receives, renewed now.
    fn held_by(node_id: &str, meta: &RecordingMeta, ttl: Duration) -> Self {
        Self {
            holder: node_id.to_owned(),
            zone: meta.zone.clone(),
            renewed_at: OffsetDateTime::now_utc(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            taken_over_from: None,
            meta: meta.clone(),
        }
    }
}

/// Why a lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease of {id} is held by {holder}")]
    Lost { id: String, holder: String },
    #[error("lease {op} {path}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
}

impl LeaseError {
    fn store(
        op: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> Self + use<> {
        let path = path.to_string();
        move |source| Self::Store { op, path, source }
    }

    /// True for failures worth retrying (the store did not answer).
    pub fn transient(&self) -> bool {
        matches!(self, Self::Store { source, .. } if error_kind(source) == ErrorKind::Transient)
    }
}

/// A lease this node holds: the version (ETag, and the generation GCS needs) it last wrote,
/// and when to renew.
#[derive(Debug, Clone)]
pub struct Held {
    version: UpdateVersion,
    pub renew_at: Instant,
}

fn lease_bytes(lease: &Lease) -> Bytes {
    Bytes::from(serde_json::to_vec(lease).unwrap_or_default())
}

fn renew_after(ttl: Duration) -> Instant {
    Instant::now() + ttl / 3
}

/// Creates the lease of a recording this node receives, or takes back its own after a restart.
///
/// # Errors
/// [`LeaseError::Lost`] when another node holds it; store errors.
pub async fn acquire(
    store: &DynStore,
    id: &RecordingId,
    meta: &RecordingMeta,
    node_id: &str,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let path = ObjectKey::live(id);
    let lease = Lease::held_by(node_id, meta, ttl);
    let created = store
        .put_opts(
            &path,
            PutPayload::from(lease_bytes(&lease)),
            PutMode::Create.into(),
        )
        .await;
    match created {
        Ok(put) => Ok(Held {
            version: UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            },
            renew_at: renew_after(ttl),
        }),
        Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {
            // Ours from before a restart, or someone else's.
            let got = store
                .get(&path)
                .await
                .map_err(LeaseError::store("get", &path))?;
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got.bytes().await.map_err(LeaseError::store("get", &path))?;
            let current: Lease = serde_json::from_slice(&bytes).map_err(|_| LeaseError::Lost {
                id: id.to_string(),
                holder: "an unreadable lease".to_owned(),
            })?;
            if current.holder != node_id || current.taken_over_from.is_some() {
                return Err(LeaseError::Lost {
                    id: id.to_string(),
                    holder: current.holder,
                });
            }
            renew(store, id, &lease, version, ttl).await
        }
        Err(e) => Err(LeaseError::store("create", &path)(e)),
    }
}

async fn renew(
    store: &DynStore,
    id: &RecordingId,
    lease: &Lease,
    version: UpdateVersion,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let path = ObjectKey::live(id);
    let mode = PutMode::Update(version);
    match store
        .put_opts(
            &path,
            PutPayload::from(lease_bytes(lease)),
            PutOptions::from(mode),
        )
        .await
    {
        Ok(put) => Ok(Held {
            version: UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            },
            renew_at: renew_after(ttl),
        }),
        Err(e)
            if matches!(
                error_kind(&e),
                ErrorKind::Precondition | ErrorKind::NotFound
            ) =>
        {
            Err(LeaseError::Lost {
                id: id.to_string(),
                holder: "another node (the lease changed)".to_owned(),
            })
        }
        Err(e) => Err(LeaseError::store("renew", &path)(e)),
    }
}

/// Renews a held lease.
///
/// # Errors
/// [`LeaseError::Lost`] when it changed under us; store errors.
pub async fn keep(
    store: &DynStore,
    id: &RecordingId,
    meta: &RecordingMeta,
    node_id: &str,
    held: &Held,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let lease = Lease::held_by(node_id, meta, ttl);
    match renew(store, id, &lease, held.version.clone(), ttl).await {
        Err(LeaseError::Lost { .. }) => {
            // The lease changed or vanished under us. A peer that took it over has written
            // (or is writing) the manifest, and its lease names it; a store that lost or
            // rolled back our last write (an emulator killed mid-flush) has neither, and the
            // lease is taken back.
            let manifest = ObjectKey::manifest(id);
            match store.head(&manifest).await {
                Ok(_) => Err(LeaseError::Lost {
                    id: id.to_string(),
                    holder: "another node (the recording has a manifest)".to_owned(),
                }),
                Err(e) if error_kind(&e) == ErrorKind::NotFound => {
                    acquire(store, id, meta, node_id, ttl).await
                }
                Err(e) => Err(LeaseError::store("head", &manifest)(e)),
            }
        }
        other => other,
    }
}

/// Deletes a lease once its recording's manifest is stored.
///
/// # Errors
/// Store errors other than not-found.
pub async fn release(store: &DynStore, id: &RecordingId) -> Result<(), LeaseError> {
    let path = ObjectKey::live(id);
    match store.delete(&path).await {
        Ok(()) => Ok(()),
        Err(e) if error_kind(&e) == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LeaseError::store("delete", &path)(e)),
    }
}

/// Everything the sweeper needs.
pub struct Sweeper {
    pub stores: Stores,
    pub uploader: Uploader,
    pub catalog: Arc<Catalog>,
    pub health: Arc<Health>,
    pub node_id: String,
    pub zone: String,
    pub ttl: Duration,
    /// Seals the manifests of orphans this node finalizes.
    pub signer: Arc<NodeKey>,
}

/// One lease as a sweeper saw it.
struct Seen {
    etag: Option<String>,
    since: Instant,
}

impl Sweeper {
    /// Sweeps this node's own region until `stop` (other regions have their own nodes).
    pub async fn run(self, stop: CancellationToken) {
        let region = self.stores.home().clone();
        let Some(entry) = self.stores.region(region.as_str()).cloned() else {
            return;
        };
        if !entry.conditional_updates {
            tracing::info!(store = %entry.url, "store has no conditional updates: single-node mode, no lease sweeps");
            return;
        }
        let mut seen: HashMap<RecordingId, Seen> = HashMap::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.ttl / 4) => {}
            }
            if let Err(e) = self.sweep(&entry.store, &mut seen).await {
                tracing::warn!(error = %error_chain(&e), "lease sweep failed; forgetting what was seen");
                seen.clear();
            }
        }
    }

    async fn sweep(
        &self,
        store: &DynStore,
        seen: &mut HashMap<RecordingId, Seen>,
    ) -> Result<(), object_store::Error> {
        let metas: Vec<_> = store
            .list(Some(&ObjectKey::live_prefix()))
            .try_collect()
            .await?;
        let mine: std::collections::HashSet<RecordingId> =
            self.uploader.live_ids().into_iter().collect();
        let now = Instant::now();
        let mut present = std::collections::HashSet::new();
        for meta in metas {
            let Some(id) = ObjectKey::live_id(&meta.location) else {
                continue;
            };
            present.insert(id.clone());
            if mine.contains(&id) {
                seen.remove(&id);
                continue;
            }
            let entry = seen.entry(id.clone()).or_insert_with(|| Seen {
                etag: meta.e_tag.clone(),
                since: now,
            });
            if entry.etag != meta.e_tag {
                *entry = Seen {
                    etag: meta.e_tag.clone(),
                    since: now,
                };
                continue;
            }
            if now.duration_since(entry.since) < self.ttl {
                continue;
            }
            match self.take_over(store, &id).await {
                // Finalized, or not expired after all, or another node won it: look afresh.
                Ok(_) => {
                    seen.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(recording_id = %id, error = %e, "finalizing an orphan failed; will retry");
                }
            }
        }
        seen.retain(|id, _| present.contains(id));
        Ok(())
    }

    /// Takes over an expired lease and finalizes its recording. `Ok(false)` when the lease is
    /// not expired after all, or another node won it.
    async fn take_over(&self, store: &DynStore, id: &RecordingId) -> Result<bool, String> {
        let path = ObjectKey::live(id);
        let got = match store.get(&path).await {
            Ok(got) => got,
            Err(e) if error_kind(&e) == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(error_chain(&e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| error_chain(&e))?;
        let lease: Lease =
            serde_json::from_slice(&bytes).map_err(|e| format!("unreadable lease: {e}"))?;
        let wall_expired = OffsetDateTime::now_utc() - lease.renewed_at
            > time::Duration::milliseconds(i64::try_from(lease.ttl_ms).unwrap_or(i64::MAX));
        // A takeover by a node that then died too is expired like any other lease.
        if !wall_expired {
            return Ok(false);
        }
        let previous = lease.holder.clone();
        let mine = Lease {
            holder: self.node_id.clone(),
            zone: self.zone.clone(),
            renewed_at: OffsetDateTime::now_utc(),
            taken_over_from: Some(previous.clone()),
            ..lease.clone()
        };
        // The same conditional update a renewal makes: only one node can win it.
        match renew(store, id, &mine, version, self.ttl).await {
            Ok(_) => {}
            Err(LeaseError::Lost { .. }) => return Ok(false),
            Err(e) => return Err(error_chain(&e)),
        }
        self.health.took_over(id.region());
        tracing::warn!(recording_id = %id, from = %previous, "lease expired; finalizing the orphan from its committed chunks");
        let reason = format!(
            "node {previous} stopped renewing its lease; finalized by {} from the committed chunks",
            self.node_id
        );
        let manifest =
            finalize_orphan(store, id, &lease, &reason, &self.signer, &self.node_id).await?;
        if let Some(row) = CatalogRow::from_manifest(&manifest) {
            let row_path = ObjectKey::catalog(id);
            let bytes = Bytes::from(serde_json::to_vec_pretty(&row).unwrap_or_default());
            put_overwrite(store.as_ref(), &row_path, bytes)
                .await
                .map_err(|e| error_chain(&e))?;
            if let Err(e) = self.catalog.upsert(vec![row]).await {
                tracing::warn!(error = %error_chain(&e), "catalog update failed; the next scan repairs it");
            }
        }
        release(store, id).await.map_err(|e| error_chain(&e))?;
        tracing::info!(recording_id = %id, chunks = manifest.chunks.len(), bytes = manifest.bytes, "orphan finalized as interrupted");
        Ok(true)
    }
}

/// Writes the manifest of a recording whose node died, from the chunks in the store, and its
/// seal. A manifest already there (the node finished after all) wins and is returned, sealed
/// if the node died between the two puts.
///
/// # Errors
/// Store errors and chunks that do not decode, as text.
pub async fn finalize_orphan(
    store: &DynStore,
    id: &RecordingId,
    lease: &Lease,
    reason: &str,
    signer: &NodeKey,
    node_id: &str,
) -> Result<Manifest, String> {
    let manifest_path = ObjectKey::manifest(id);
    let sealed = |manifest: Manifest, bytes: Bytes| async move {
        crate::upload::put_seal(store.as_ref(), signer, node_id, id, &bytes)
            .await
            .map_err(|e| format!("put {}: {}", ObjectKey::seal(id), error_chain(&e)))?;
        Ok::<_, String>(manifest)
    };
    if let Ok((existing, bytes)) =
        castvault_storage::reader::read_manifest_bytes(store.as_ref(), id).await
    {
        return sealed(existing, bytes).await;
    }
    let rebuilt = castvault_storage::reader::rebuild_chunk_table(store.as_ref(), id, None)
        .await
        .map_err(|e| error_chain(&e))?;
    // Chunks past the first gap were never acked (acks count the committed prefix): puts that
    // landed while an earlier one failed. They are not the recording's.
    let gap = u32::try_from(rebuilt.chunks.len()).unwrap_or(u32::MAX);
    for stray in gap + 1..gap + crate::upload::PUTS_IN_FLIGHT as u32 {
        match store.delete(&ObjectKey::chunk(id, stray)).await {
            Ok(()) => {}
            Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "removing chunk {stray} past the gap: {}",
                    error_chain(&e)
                ));
            }
        }
    }
    let table = rebuilt.chunks;
    let meta = &lease.meta;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        recording_id: id.to_string(),
        region: id.region().to_owned(),
        zone: meta.zone.clone(),
        node_id: meta.node_id.clone(),
        status: RecordingStatus::Interrupted,
        end_reason: Some(reason.to_owned()),
        protocol: meta.protocol.clone(),
        peer: meta.peer.clone(),
        sender: meta.sender.clone(),
        source: None,
        received_at: meta.received_at,
        ended_at: lease.renewed_at,
        header: meta.header.clone(),
        bytes: rebuilt.bytes,
        events: table.iter().map(|c| c.events).sum(),
        malformed_lines: table.iter().map(|c| c.malformed_lines).sum(),
        partial_last_line: rebuilt.partial_last_line,
        duration_seconds: table
            .iter()
            .rev()
            .find_map(|c| c.last_event_time)
            .unwrap_or(0.0),
        body_sha256: rebuilt.body_sha256,
        chain_head: hex::encode(rebuilt.chain_head),
        chunks: table,
    };
    let bytes = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
    match put_create(store.as_ref(), &manifest_path, bytes.clone()).await {
        Ok(()) => sealed(manifest, bytes).await,
        Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {
            let (existing, bytes) =
                castvault_storage::reader::read_manifest_bytes(store.as_ref(), id)
                    .await
                    .map_err(|e| error_chain(&e))?;
            sealed(existing, bytes).await
        }
        Err(e) => Err(format!("put {manifest_path}: {}", error_chain(&e))),
    }
}
