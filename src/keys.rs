//! Publishing this node's public signing key to every region's store, so any verifier can check
//! its checkpoints and seals (see `castvault_storage::signing`).

use std::time::Duration;

use bytes::Bytes;
use castvault_storage::keys::ObjectKey;
use castvault_storage::signing::PublicKeyRecord;
use castvault_storage::store::{ErrorKind, Stores, error_kind, put_create};

/// Wait between attempts for a store that did not take the key.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// Writes `record` as `v1/keys/{key_id}.json` to every region's store (conditional create:
/// a key once published is never replaced), retrying each store until it succeeds.
pub async fn publish(stores: Stores, record: PublicKeyRecord) {
    let path = ObjectKey::public_key(&record.key_id);
    let bytes = Bytes::from(serde_json::to_vec_pretty(&record).unwrap_or_default());
    let mut pending: Vec<_> = stores
        .iter()
        .map(|(r, s)| (r.clone(), s.store.clone()))
        .collect();
    while !pending.is_empty() {
        let mut left = Vec::new();
        for (region, store) in pending {
            match put_create(store.as_ref(), &path, bytes.clone()).await {
                Ok(()) => {
                    tracing::info!(%region, key_id = %record.key_id, "published the signing key")
                }
                Err(e) if error_kind(&e) == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!(%region, error = %crate::upload::error_chain(&e), "cannot publish the signing key yet");
                    left.push((region, store));
                }
            }
        }
        pending = left;
        if !pending.is_empty() {
            tokio::time::sleep(PUBLISH_RETRY).await;
        }
    }
}
