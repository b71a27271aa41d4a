//! One conformance suite for every store castvault writes to: the local filesystem, memory, and
//! real Azurite. It checks the behaviours the recorder relies on: immutable create, overwrite
//! of mutable rows, not-found classification, listing by prefix, ranged reads, and a recording's
//! chunks read back byte-exact through the verifying reader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use castvault_storage::chunk::ChunkEncoder;
use castvault_storage::keys::{ObjectKey, RecordingId, Region};
use castvault_storage::manifest::{
    ChunkEntry, HashChain, MANIFEST_FORMAT, Manifest, RecordingStatus,
};
use castvault_storage::reader;
use castvault_storage::store::{self, DynStore, ErrorKind, error_kind, put_create, put_overwrite};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};

async fn conformance(store: DynStore) {
    let region = Region::new("eu-west").unwrap();
    let id = RecordingId::new(&region, 1_764_072_000_000, 42);
    let key = ObjectKey::chunk(&id, 0);

    put_create(store.as_ref(), &key, Bytes::from_static(b"one"))
        .await
        .unwrap();
    let again = put_create(store.as_ref(), &key, Bytes::from_static(b"two"))
        .await
        .unwrap_err();
    assert_eq!(error_kind(&again), ErrorKind::AlreadyExists);
    assert_eq!(store.get(&key).await.unwrap().bytes().await.unwrap(), "one");
    assert_eq!(store.get_range(&key, 1..3).await.unwrap(), "ne");

    let row = ObjectKey::catalog(&id);
    put_overwrite(store.as_ref(), &row, Bytes::from_static(b"live"))
        .await
        .unwrap();
    put_overwrite(store.as_ref(), &row, Bytes::from_static(b"done"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&row).await.unwrap().bytes().await.unwrap(),
        "done"
    );

    let missing = store.get(&ObjectKey::manifest(&id)).await.unwrap_err();
    assert_eq!(error_kind(&missing), ErrorKind::NotFound);
    assert!(matches!(
        reader::read_manifest(store.as_ref(), &id).await,
        Err(reader::ReadError::NotFound { .. })
    ));

    let listed: Vec<_> = store
        .list(Some(&ObjectKey::recording_prefix(&id)))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(ObjectKey::chunk_seq(&listed[0].location), Some(0));
    store.delete(&key).await.unwrap();

    // A two-chunk recording, written as the uploader writes it, read back verified.
    let body = common::corpus::generate(7, 100_000);
    let cut = body[..60_000].iter().rposition(|&b| b == b'\n').unwrap() + 1;
    let mut chain = HashChain::new(&id);
    let mut encoder = ChunkEncoder::new(3).unwrap();
    let mut chunks = Vec::new();
    for (seq, (offset, raw)) in [(0, &body[..cut]), (cut, &body[cut..])]
        .into_iter()
        .enumerate()
    {
        let z = encoder.encode(raw).unwrap();
        let digest = castvault_storage::chunk::digest(raw);
        let link = chain.push(&digest, seq as u32, offset as u64, raw.len() as u64);
        put_create(
            store.as_ref(),
            &ObjectKey::chunk(&id, seq as u32),
            Bytes::from(z.clone()),
        )
        .await
        .unwrap();
        chunks.push(ChunkEntry {
            seq: seq as u32,
            offset: offset as u64,
            raw_len: raw.len() as u64,
            compressed_len: z.len() as u64,
            stored_sha256: None,
            events: 0,
            malformed_lines: 0,
            first_event_time: None,
            last_event_time: None,
            sha256: hex::encode(digest),
            chain: hex::encode(link),
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        recording_id: id.to_string(),
        region: "eu-west".into(),
        zone: "a".into(),
        node_id: "n".into(),
        status: RecordingStatus::Complete,
        end_reason: None,
        protocol: "v2".into(),
        peer: None,
        sender: None,
        source: None,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
        ended_at: time::OffsetDateTime::UNIX_EPOCH,
        header: serde_json::json!({"version": 2}),
        bytes: body.len() as u64,
        events: 0,
        malformed_lines: 0,
        partial_last_line: false,
        duration_seconds: 0.0,
        body_sha256: hex::encode(Sha256::digest(&body)),
        chain_head: hex::encode(chain.head()),
        chunks,
    };
    put_create(
        store.as_ref(),
        &ObjectKey::manifest(&id),
        Bytes::from(serde_json::to_vec(&manifest).unwrap()),
    )
    .await
    .unwrap();
    let read = reader::read_manifest(store.as_ref(), &id).await.unwrap();
    let mut out = Vec::new();
    reader::write_body(store.as_ref(), &read, &mut out)
        .await
        .unwrap();
    assert_eq!(out, body);

    // Tampering with a stored chunk is caught and named.
    let mut tampered = manifest.clone();
    tampered.chunks[1].sha256 = hex::encode([0u8; 32]);
    let err = reader::write_body(store.as_ref(), &tampered, &mut Vec::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("chunk 1"), "{err}");
}

#[tokio::test]
async fn local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    conformance(store::open(&url, &BTreeMap::new()).unwrap()).await;
}

#[tokio::test]
async fn in_memory() {
    conformance(store::open("memory://", &BTreeMap::new()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite() {
    let azurite = common::Azurite::start().await;
    azurite.create_container("conformance").await;
    // Explicit account settings, the shape a real account uses (not the emulator shortcut).
    let options: BTreeMap<String, String> = [
        ("account_name", "devstoreaccount1".to_owned()),
        ("access_key", common::AZURITE_KEY.to_owned()),
        ("endpoint", format!("{}/devstoreaccount1", azurite.url)),
        ("allow_http", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    conformance(store::open("az://conformance", &options).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_on_moto() {
    let moto = common::Moto::start().await;
    moto.create_bucket("conformance").await;
    let s3 = store::open("s3://conformance", &moto.store_options()).unwrap();
    conformance(s3.clone()).await;

    conditional_updates(s3).await;
}

/// Leases need conditional updates on the object's version: a stale one must lose.
async fn conditional_updates(store: DynStore) {
    let path = object_store::path::Path::from("live/lease-test");
    let first = store
        .put_opts(&path, "a".into(), object_store::PutMode::Create.into())
        .await
        .unwrap();
    let update = object_store::UpdateVersion {
        e_tag: first.e_tag.clone(),
        version: first.version.clone(),
    };
    store
        .put_opts(
            &path,
            "b".into(),
            object_store::PutMode::Update(update.clone()).into(),
        )
        .await
        .unwrap();
    let stale = store
        .put_opts(
            &path,
            "c".into(),
            object_store::PutMode::Update(update).into(),
        )
        .await
        .unwrap_err();
    assert_eq!(error_kind(&stale), ErrorKind::Precondition, "{stale}");
}
