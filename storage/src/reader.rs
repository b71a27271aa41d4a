//! Reading a finalized recording back, verifying each chunk against its manifest entry (length,
//! SHA-256, hash chain) and the whole body against `body_sha256`.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::chunk;
use crate::keys::{ObjectKey, RecordingId};
use crate::manifest::{CatalogRow, ChunkEntry, HashChain, Manifest};
use crate::store::{ErrorKind, error_kind};

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("recording {id} not found (no manifest: unknown, or not finalized yet)")]
    NotFound { id: String },
    #[error("store error reading {path}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("recording {id}: {what}")]
    Corrupt { id: String, what: String },
    #[error("recording {id}: chunk {seq} does not decode")]
    Decode {
        id: String,
        seq: u32,
        #[source]
        source: chunk::ChunkError,
    },
    #[error("writing output")]
    Output(#[source] std::io::Error),
}

async fn get(store: &dyn ObjectStore, path: &object_store::path::Path) -> Result<Bytes, ReadError> {
    let result = async { store.get(path).await?.bytes().await }.await;
    result.map_err(|source| ReadError::Store {
        path: path.to_string(),
        source,
    })
}

/// Reads and parses a recording's manifest.
///
/// # Errors
/// [`ReadError::NotFound`] when there is no manifest; store and parse errors otherwise.
pub async fn read_manifest(
    store: &dyn ObjectStore,
    id: &RecordingId,
) -> Result<Manifest, ReadError> {
    Ok(read_manifest_bytes(store, id).await?.0)
}

/// [`read_manifest`], with the manifest's exact stored bytes (what its seal signs).
///
/// # Errors
/// As [`read_manifest`].
pub async fn read_manifest_bytes(
    store: &dyn ObjectStore,
    id: &RecordingId,
) -> Result<(Manifest, Bytes), ReadError> {
    let path = ObjectKey::manifest(id);
    let bytes = match get(store, &path).await {
        Err(ReadError::Store { source, .. }) if error_kind(&source) == ErrorKind::NotFound => {
            return Err(ReadError::NotFound { id: id.to_string() });
        }
        other => other?,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ReadError::Corrupt {
        id: id.to_string(),
        what: format!("manifest is not valid: {e}"),
    })?;
    if manifest.recording_id != id.as_str() {
        return Err(ReadError::Corrupt {
            id: id.to_string(),
            what: "manifest names another recording".into(),
        });
    }
    Ok((manifest, bytes))
}

/// A recording's body, exactly as received, one verified chunk at a time: each chunk's length,
/// SHA-256 and chain link are checked before it is yielded, and the byte count, chain head and
/// body digest after the last. Memory: one chunk. The first failed check ends the stream with
/// [`ReadError::Corrupt`] naming the chunk.
pub fn body_chunks<'a>(
    store: &'a dyn ObjectStore,
    manifest: &'a Manifest,
) -> impl futures::Stream<Item = Result<Bytes, ReadError>> + Send + 'a {
    struct Walk {
        next: usize,
        offset: u64,
        chain: Option<HashChain>,
        body: Sha256,
    }
    let start = Walk {
        next: 0,
        offset: 0,
        chain: None,
        body: Sha256::new(),
    };
    futures::stream::try_unfold(start, move |mut walk| async move {
        let id = RecordingId::parse(&manifest.recording_id).map_err(|e| ReadError::Corrupt {
            id: manifest.recording_id.clone(),
            what: e.to_string(),
        })?;
        let corrupt = |what: String| ReadError::Corrupt {
            id: id.to_string(),
            what,
        };
        let chain = walk.chain.get_or_insert_with(|| HashChain::new(&id));
        let Some(entry) = manifest.chunks.get(walk.next) else {
            if walk.offset != manifest.bytes || hex::encode(chain.head()) != manifest.chain_head {
                return Err(corrupt(
                    "byte count or chain head does not match the manifest".into(),
                ));
            }
            if hex::encode(walk.body.clone().finalize()) != manifest.body_sha256 {
                return Err(corrupt("body digest does not match the manifest".into()));
            }
            return Ok(None);
        };
        if entry.seq as usize != walk.next || entry.offset != walk.offset {
            return Err(corrupt(format!(
                "chunk table is out of order at entry {}",
                walk.next
            )));
        }
        let (raw, digest) = read_chunk(store, &id, entry).await?;
        if hex::encode(chain.push(&digest, entry.seq, entry.offset, entry.raw_len)) != entry.chain {
            return Err(corrupt(format!("hash chain breaks at chunk {}", entry.seq)));
        }
        walk.body.update(&raw);
        walk.offset += entry.raw_len;
        walk.next += 1;
        Ok(Some((raw, walk)))
    })
}

/// Reads one chunk and checks its compressed length and SHA-256 against its manifest entry
/// (random access for seeking; [`body_chunks`] also checks the chain and the whole body).
/// Returns the raw bytes and their digest.
///
/// # Errors
/// [`ReadError::Corrupt`] or [`ReadError::Decode`] on a failed check; store errors.
pub async fn read_chunk(
    store: &dyn ObjectStore,
    id: &RecordingId,
    entry: &crate::manifest::ChunkEntry,
) -> Result<(Bytes, [u8; 32]), ReadError> {
    let corrupt = |what: String| ReadError::Corrupt {
        id: id.to_string(),
        what,
    };
    let compressed = get(store, &ObjectKey::chunk(id, entry.seq)).await?;
    if compressed.len() as u64 != entry.compressed_len {
        return Err(corrupt(format!(
            "chunk {} has {} bytes, manifest says {}",
            entry.seq,
            compressed.len(),
            entry.compressed_len
        )));
    }
    if let Some(expected) = &entry.stored_sha256
        && &hex::encode(Sha256::digest(&compressed)) != expected
    {
        return Err(corrupt(format!(
            "chunk {}: the stored object's SHA-256 differs from the manifest",
            entry.seq
        )));
    }
    let capacity = usize::try_from(entry.raw_len).unwrap_or(usize::MAX);
    let raw = chunk::decode(&compressed, capacity).map_err(|source| ReadError::Decode {
        id: id.to_string(),
        seq: entry.seq,
        source,
    })?;
    let digest = chunk::digest(&raw);
    if raw.len() as u64 != entry.raw_len || hex::encode(digest) != entry.sha256 {
        return Err(corrupt(format!(
            "chunk {} does not match its digest",
            entry.seq
        )));
    }
    Ok((Bytes::from(raw), digest))
}

/// Writes a recording's verified body to `out` (see [`body_chunks`]).
///
/// # Errors
/// [`ReadError`] from the first failed check, or [`ReadError::Output`].
pub async fn write_body<W: AsyncWrite + Unpin>(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    out: &mut W,
) -> Result<(), ReadError> {
    let chunks = body_chunks(store, manifest);
    futures::pin_mut!(chunks);
    while let Some(raw) = chunks.try_next().await? {
        out.write_all(&raw).await.map_err(ReadError::Output)?;
    }
    out.flush().await.map_err(ReadError::Output)
}

/// Lists every catalog row in a store, oldest first. Rows that do not parse are skipped with a
/// warning: the catalog is a cache, the manifests are the truth.
///
/// # Errors
/// Store errors while listing or reading.
/// A recording's chunk table rebuilt from the chunks in the store, with what a manifest needs
/// beside it.
#[derive(Debug)]
pub struct Rebuilt {
    pub chunks: Vec<ChunkEntry>,
    pub chain_head: [u8; 32],
    pub body_sha256: String,
    pub bytes: u64,
    /// The last chunk ends inside a line.
    pub partial_last_line: bool,
}

/// Reads a recording's chunks back from the store, from chunk 0: `count` of them, or (with
/// `None`) up to the first missing one. One chunk in memory at a time.
///
/// # Errors
/// [`ReadError::Corrupt`] for a chunk missing within `count` or one that does not decode;
/// store errors.
pub async fn rebuild_chunk_table(
    store: &dyn ObjectStore,
    id: &RecordingId,
    count: Option<u32>,
) -> Result<Rebuilt, ReadError> {
    let mut chunks = Vec::with_capacity(count.unwrap_or(0) as usize);
    let mut chain = HashChain::new(id);
    let mut body = Sha256::new();
    let (mut offset, mut last_byte) = (0u64, None);
    for seq in 0..count.unwrap_or(u32::MAX) {
        let path = ObjectKey::chunk(id, seq);
        let stored = match async { store.get(&path).await?.bytes().await }.await {
            Ok(bytes) => bytes,
            Err(e) if error_kind(&e) == ErrorKind::NotFound && count.is_none() => break,
            Err(source) => {
                return Err(ReadError::Store {
                    path: path.to_string(),
                    source,
                });
            }
        };
        let raw = chunk::decode(&stored, chunk::MAX_DECODED_CHUNK_BYTES).map_err(|source| {
            ReadError::Decode {
                id: id.to_string(),
                seq,
                source,
            }
        })?;
        let stats = chunk::ChunkStats::scan(&raw, seq == 0);
        let digest = chunk::digest(&raw);
        let link = chain.push(&digest, seq, offset, raw.len() as u64);
        body.update(&raw);
        last_byte = raw.last().copied().or(last_byte);
        chunks.push(ChunkEntry::new(
            seq,
            offset,
            raw.len() as u64,
            &stored,
            &stats,
            &digest,
            &link,
        ));
        offset += raw.len() as u64;
    }
    Ok(Rebuilt {
        chunks,
        chain_head: chain.head(),
        body_sha256: hex::encode(body.finalize()),
        bytes: offset,
        partial_last_line: last_byte.is_some_and(|b| b != b'\n'),
    })
}

pub async fn list_catalog(store: &dyn ObjectStore) -> Result<Vec<CatalogRow>, ReadError> {
    let prefix = ObjectKey::catalog_prefix();
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| ReadError::Store {
            path: prefix.to_string(),
            source,
        })?;
    let mut rows = Vec::with_capacity(metas.len());
    for meta in metas {
        let bytes = get(store, &meta.location).await?;
        match serde_json::from_slice::<CatalogRow>(&bytes) {
            Ok(row) => rows.push(row),
            Err(e) => {
                tracing::warn!(path = %meta.location, error = %e, "skipping unreadable catalog row")
            }
        }
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(rows)
}
