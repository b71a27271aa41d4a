//! Recovery paths of the uploader, on the real spool, uploader and a real local store: what a
//! restart finds in the store that the spool's chunk log does not know about.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../benches/corpus/mod.rs"]
#[allow(dead_code)]
mod corpus;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use castvault::health::Health;
use castvault::metrics::Metrics;
use castvault::spool::{RecordingMeta, Spool};
use castvault::upload::{UploadConfig, Uploader};
use castvault_storage::chunk::ChunkEncoder;
use castvault_storage::keys::{ObjectKey, RecordingId, Region};
use castvault_storage::manifest::RecordingStatus;
use castvault_storage::reader;
use castvault_storage::signing::NodeKey;
use castvault_storage::store::{self, DynStore, Stores, put_create};
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

struct Setup {
    _dir: tempfile::TempDir,
    spool_dir: std::path::PathBuf,
    store: DynStore,
    id: RecordingId,
    body: Vec<u8>,
}

/// A recording whose stream was cut by a crash: all of `body` is in the spool, nothing uploaded.
async fn crashed_recording() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let store = store::open(
        &format!("file://{}", dir.path().join("store").display()),
        &BTreeMap::new(),
    )
    .unwrap();
    let id = RecordingId::new(&Region::new("local").unwrap(), 1_764_072_000_000, 9);
    let body = corpus::generate(5, 300 << 10);
    let spool = Spool::open(spool_dir.clone()).unwrap();
    let meta = RecordingMeta {
        recording_id: id.to_string(),
        node_id: "node-a".into(),
        zone: "z1".into(),
        protocol: "v2".into(),
        peer: None,
        sender: None,
        received_at: time::OffsetDateTime::now_utc(),
        header: serde_json::from_slice(&body[..body.iter().position(|&b| b == b'\n').unwrap()])
            .unwrap(),
    };
    let file = spool.create(id.clone(), meta).await.unwrap();
    spool
        .append(&file, Bytes::from(body.clone()))
        .await
        .unwrap();
    file.durable()
        .wait_for(|&d| d == body.len() as u64)
        .await
        .unwrap();
    Setup {
        _dir: dir,
        spool_dir,
        store,
        id,
        body,
    }
}

/// A restarted node: the spool recovered and handed to a new uploader.
async fn restart(setup: &Setup) -> Uploader {
    let spool = Spool::open(setup.spool_dir.clone()).unwrap();
    let config = UploadConfig {
        max_chunk_bytes: 64 << 10,
        max_chunk_age: Duration::from_millis(100),
        compression_level: 1,
        adaptive_compression: true,
        max_line_bytes: 1 << 20,
        node_id: "node-a".into(),
        lease_ttl: Duration::from_secs(30),
        acks_from_spool: true,
        signer: Arc::new(NodeKey::load_or_create(&setup.spool_dir.join("../keys")).unwrap()),
        checkpoint_every: Duration::from_secs(60),
        min_free_disk_bytes: 256 << 20,
    };
    let stores = Stores::single(Region::new("local").unwrap(), setup.store.clone());
    let uploader = Uploader::start(
        &tokio::runtime::Handle::current(),
        stores.clone(),
        Arc::new(Health::new(&stores)),
        config,
        Arc::new(Metrics::default()),
        None,
        CancellationToken::new(),
    );
    for recovered in spool.recover().unwrap() {
        uploader.resume(recovered).await.unwrap();
    }
    uploader
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first `n` bytes of whole lines of `body`.
fn whole_lines(body: &[u8], n: usize) -> &[u8] {
    &body[..=body[..n].iter().rposition(|&b| b == b'\n').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_chunk_the_log_missed_is_adopted_when_identical() {
    let setup = crashed_recording().await;
    // The crash came after chunk 0's put and before its chunk-log line.
    let chunk0 = whole_lines(&setup.body, 100 << 10);
    let z = ChunkEncoder::new(1).unwrap().encode(chunk0).unwrap();
    put_create(
        setup.store.as_ref(),
        &ObjectKey::chunk(&setup.id, 0),
        Bytes::from(z.clone()),
    )
    .await
    .unwrap();

    let uploader = restart(&setup).await;
    wait_until("finalize", || uploader.pending() == 0).await;
    let manifest = reader::read_manifest(setup.store.as_ref(), &setup.id)
        .await
        .unwrap();
    assert_eq!(manifest.status, RecordingStatus::Interrupted);
    assert_eq!(
        manifest.chunks[0].raw_len,
        chunk0.len() as u64,
        "chunk 0 must be the stored one"
    );
    assert_eq!(manifest.chunks[0].compressed_len, z.len() as u64);
    assert!(manifest.chunks.len() > 1);
    let mut exported = Vec::new();
    reader::write_body(setup.store.as_ref(), &manifest, &mut exported)
        .await
        .unwrap();
    assert_eq!(exported, setup.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_chunk_that_differs_is_never_overwritten_and_the_failure_is_visible() {
    let setup = crashed_recording().await;
    let mut other = whole_lines(&setup.body, 50 << 10).to_vec();
    other[200] ^= 0x20;
    let z = ChunkEncoder::new(1).unwrap().encode(&other).unwrap();
    let key = ObjectKey::chunk(&setup.id, 0);
    put_create(setup.store.as_ref(), &key, Bytes::from(z.clone()))
        .await
        .unwrap();

    let uploader = restart(&setup).await;
    wait_until("the failure to show", || {
        uploader.status().iter().any(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("differs from the spool"))
        })
    })
    .await;

    let stored = setup.store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(stored, z, "the stored chunk was overwritten");
    assert_eq!(
        uploader.pending(),
        1,
        "a recording that cannot be uploaded is never dropped"
    );
    assert!(
        reader::read_manifest(setup.store.as_ref(), &setup.id)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_already_stored_wins_and_the_catalog_row_follows_it() {
    let setup = crashed_recording().await;
    // A first restart finalizes the recording but "crashes" before removing the spool: keep a
    // copy of the spool directory and put it back afterwards.
    let copy = setup.spool_dir.with_extension("copy");
    copy_dir(&setup.spool_dir, &copy);
    let first = restart(&setup).await;
    wait_until("finalize", || first.pending() == 0).await;
    let mut manifest = reader::read_manifest(setup.store.as_ref(), &setup.id)
        .await
        .unwrap();
    drop(first);
    std::fs::remove_dir_all(&setup.spool_dir).unwrap();
    std::fs::rename(&copy, &setup.spool_dir).unwrap();
    // Mark the stored manifest so we can tell which one the catalog row follows.
    manifest.end_reason = Some("finalized before the crash".into());
    let key = ObjectKey::manifest(&setup.id);
    setup.store.delete(&key).await.unwrap();
    put_create(
        setup.store.as_ref(),
        &key,
        Bytes::from(serde_json::to_vec(&manifest).unwrap()),
    )
    .await
    .unwrap();

    let second = restart(&setup).await;
    wait_until("finalize again", || second.pending() == 0).await;
    let stored = reader::read_manifest(setup.store.as_ref(), &setup.id)
        .await
        .unwrap();
    assert_eq!(
        stored.end_reason.as_deref(),
        Some("finalized before the crash")
    );
    let rows = reader::list_catalog(setup.store.as_ref()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].end_reason.as_deref(),
        Some("finalized before the crash")
    );
    assert!(
        !setup.spool_dir.join(setup.id.as_str()).exists(),
        "spool removed after finalize"
    );
}

/// A node that died between storing the manifest and its seal: the restart seals the stored
/// manifest's exact bytes (the export and `verify` need the seal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_left_unsealed_by_a_crash_is_sealed_on_restart() {
    let setup = crashed_recording().await;
    let copy = setup.spool_dir.with_extension("copy");
    copy_dir(&setup.spool_dir, &copy);
    let first = restart(&setup).await;
    wait_until("finalize", || first.pending() == 0).await;
    drop(first);
    std::fs::remove_dir_all(&setup.spool_dir).unwrap();
    std::fs::rename(&copy, &setup.spool_dir).unwrap();
    let seal_key = ObjectKey::seal(&setup.id);
    setup.store.delete(&seal_key).await.unwrap();

    let second = restart(&setup).await;
    wait_until("finalize again", || second.pending() == 0).await;
    let manifest = setup
        .store
        .get(&ObjectKey::manifest(&setup.id))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let seal = setup.store.get(&seal_key).await.expect("sealed again");
    let seal: castvault_storage::signing::Seal =
        serde_json::from_slice(&seal.bytes().await.unwrap()).unwrap();
    use sha2::Digest;
    assert_eq!(
        seal.manifest_sha256,
        hex::encode(sha2::Sha256::digest(&manifest))
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
