//! Compliance bundles (see `castvault_storage::bundle` for the layout): gathered from a
//! recording's stored objects and streamed as a tar archive, the recording itself last and one
//! verified chunk at a time, so memory does not grow with the recording.

use std::collections::BTreeSet;

use bytes::Bytes;
use castvault_storage::bundle::{self, END};
use castvault_storage::keys::{ObjectKey, RecordingId};
use castvault_storage::manifest::Manifest;
use castvault_storage::reader;
use castvault_storage::signing::{Checkpoint, Seal};
use castvault_storage::store::{DynStore, ErrorKind, Stores, error_kind};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::audit::Record;

/// Audit days scanned for a recording's chain of custody, from its start day on.
pub const CUSTODY_DAYS: i64 = 400;

/// Why a bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(#[from] reader::ReadError),
    #[error("store: {0}")]
    Store(String),
    #[error("recording {0} has no sealed manifest")]
    Unsealed(String),
    #[error("writing the bundle")]
    Write(#[source] std::io::Error),
    #[error("indexing for the transcript: {0}")]
    Transcript(String),
}

async fn get(
    store: &DynStore,
    path: &object_store::path::Path,
) -> Result<Option<Bytes>, ExportError> {
    match async { store.get(path).await?.bytes().await }.await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if error_kind(&e) == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ExportError::Store(format!("{path}: {e}"))),
    }
}

/// A bundle ready to stream: its small files, and the manifest the recording is read by.
pub struct Bundle {
    pub id: RecordingId,
    pub manifest: Manifest,
    /// Every file but the recording and the transcript, with its contents, in archive order.
    files: Vec<(String, Bytes)>,
    /// The transcript, spooled to a temporary file (it grows with the recording).
    transcript: TranscriptFile,
}

/// The access records of one recording, from every region's audit log.
pub async fn custody(stores: &Stores, id: &RecordingId) -> Result<Vec<Record>, ExportError> {
    let mut records = Vec::new();
    let start = id.started_at();
    let today = OffsetDateTime::now_utc();
    let days = ((today - start).whole_days() + 1).clamp(1, CUSTODY_DAYS);
    for (_, region) in stores.iter() {
        for d in 0..days {
            let day = start + time::Duration::days(d);
            let found = crate::audit::read_day(&region.store, day)
                .await
                .map_err(|e| ExportError::Store(e.to_string()))?;
            records.extend(
                found
                    .into_iter()
                    .filter(|r| r.recording_id.as_deref() == Some(id.as_str())),
            );
        }
    }
    records.sort_by_key(|r| r.time);
    Ok(records)
}

const README: &str = "castvault compliance bundle
===========================

This archive holds one recorded session and what is needed to prove it complete and unaltered,
without castvault running.

  recording.cast      the session exactly as the client sent it (asciicast v2)
  transcript.txt      what the screen showed, as text (derived; for reading and search)
  summary.json        who, when, where, how long, how big
  manifest.json       the recording's manifest: every chunk's offset, length, SHA-256, hash chain
  manifest.sig.json   the recorder node's Ed25519 signature over the manifest's SHA-256
  checkpoints/        signed checkpoints of the hash chain, written while the session ran
  keys/               the public keys that made those signatures
  custody.jsonl       every recorded access to this recording (audit log)
  SHA256SUMS          the SHA-256 of every file above

With castvault:  castvault verify --bundle THIS.tar
  checks SHA256SUMS, the signature, every chunk's digest and the hash chain, the event stream
  and every checkpoint, and exits non-zero naming the first failure.

By hand:
  1. sha256sum -c SHA256SUMS            (in this directory) every file is as exported.
  2. sha256sum recording.cast           equals body_sha256 in manifest.json.
  3. sha256sum manifest.json            equals manifest_sha256 in manifest.sig.json, and the
     signature (hex, Ed25519) verifies with the public key named by key_id (keys/KEY_ID.json,
     hex) over these lines, each ending in a newline:
       castvault-seal-v1
       <format>
       <recording_id>
       <manifest_sha256>
       <signed_at>
       <node_id>
       <key_id>
  4. For each chunk in manifest.json, the bytes of recording.cast from offset for raw_len have
     SHA-256 sha256, and chain = SHA-256(previous chain || sha256 || seq || offset || raw_len),
     the three numbers as 8-byte big-endian, starting from
     SHA-256(\"castvault-chain-v1\" || 0x00 || recording_id). The last link is chain_head.
";

fn json_line<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

impl Bundle {
    /// Gathers everything but the recording's body.
    ///
    /// # Errors
    /// [`ExportError`] for a missing or unsealed recording and store errors.
    pub async fn gather(
        store: &DynStore,
        id: &RecordingId,
        custody: &[Record],
        exported_by: &str,
    ) -> Result<Self, ExportError> {
        let manifest = reader::read_manifest(store.as_ref(), id).await?;
        let manifest_bytes = get(store, &ObjectKey::manifest(id))
            .await?
            .ok_or_else(|| ExportError::Unsealed(id.to_string()))?;
        let seal_bytes = get(store, &ObjectKey::seal(id))
            .await?
            .ok_or_else(|| ExportError::Unsealed(id.to_string()))?;
        let mut key_ids = BTreeSet::new();
        if let Some(seal) = Seal::parse_canonical(&seal_bytes) {
            key_ids.insert(seal.signed.key_id);
        }
        let prefix = ObjectKey::recording_prefix(id);
        let mut names: Vec<String> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location.filename().unwrap_or_default().to_owned())
            .try_collect()
            .await
            .map_err(|e| ExportError::Store(e.to_string()))?;
        names.retain(|n| n.starts_with("checkpoint-"));
        names.sort();
        let mut checkpoints = Vec::new();
        for name in names {
            if let Some(bytes) = get(store, &prefix.clone().join(name.as_str())).await? {
                if let Some(cp) = Checkpoint::parse_canonical(&bytes) {
                    key_ids.insert(cp.signed.key_id);
                }
                checkpoints.push((format!("checkpoints/{name}"), bytes));
            }
        }
        let mut keys = Vec::new();
        for key_id in key_ids {
            if let Some(bytes) = get(store, &ObjectKey::public_key(&key_id)).await? {
                keys.push((format!("keys/{key_id}.json"), bytes));
            }
        }
        let transcript = TranscriptFile::make(store, id, &manifest).await?;
        let summary = summary(&manifest, exported_by);
        let custody: Vec<u8> = custody.iter().flat_map(json_line).collect();
        let mut files: Vec<(String, Bytes)> = vec![
            (
                "README.txt".to_owned(),
                Bytes::from_static(README.as_bytes()),
            ),
            ("manifest.json".to_owned(), manifest_bytes),
            ("manifest.sig.json".to_owned(), seal_bytes),
            (
                "summary.json".to_owned(),
                Bytes::from(serde_json::to_vec_pretty(&summary).unwrap_or_default()),
            ),
            ("custody.jsonl".to_owned(), Bytes::from(custody)),
        ];
        files.extend(checkpoints);
        files.extend(keys);
        let mut sums = String::new();
        for (name, bytes) in &files {
            sums.push_str(&format!("{}  {name}\n", hex::encode(Sha256::digest(bytes))));
        }
        sums.push_str(&format!("{}  transcript.txt\n", transcript.sha256));
        sums.push_str(&format!("{}  recording.cast\n", manifest.body_sha256));
        files.insert(1, ("SHA256SUMS".to_owned(), Bytes::from(sums)));
        Ok(Self {
            id: id.clone(),
            manifest,
            files,
            transcript,
        })
    }

    /// Streams the archive: the small files, then the recording one verified chunk at a time.
    ///
    /// # Errors
    /// [`ExportError`] on a read, verification or write failure; the archive is then cut short,
    /// so it can never pass for whole.
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        store: &DynStore,
        out: &mut W,
    ) -> Result<(), ExportError> {
        self.write_entries(store, out).await?;
        finish(out).await
    }

    /// Writes this recording's directory into an archive (no end blocks).
    ///
    /// # Errors
    /// As [`Self::write`].
    pub async fn write_entries<W: AsyncWrite + Unpin>(
        &self,
        store: &DynStore,
        out: &mut W,
    ) -> Result<(), ExportError> {
        let mtime = u64::try_from(self.manifest.ended_at.unix_timestamp()).unwrap_or(0);
        let dir = self.id.as_str();
        for (name, bytes) in &self.files {
            write_file_header(out, &format!("{dir}/{name}"), bytes.len() as u64, mtime).await?;
            out.write_all(bytes).await.map_err(ExportError::Write)?;
            pad(out, bytes.len() as u64).await?;
        }
        write_file_header(
            out,
            &format!("{dir}/transcript.txt"),
            self.transcript.size,
            mtime,
        )
        .await?;
        let mut file = tokio::fs::File::open(&self.transcript.path)
            .await
            .map_err(ExportError::Write)?;
        let copied = tokio::io::copy(&mut file, out)
            .await
            .map_err(ExportError::Write)?;
        if copied != self.transcript.size {
            return Err(ExportError::Transcript(
                "the transcript file changed".to_owned(),
            ));
        }
        pad(out, self.transcript.size).await?;
        write_file_header(
            out,
            &format!("{dir}/recording.cast"),
            self.manifest.bytes,
            mtime,
        )
        .await?;
        let chunks = reader::body_chunks(store.as_ref(), &self.manifest);
        futures::pin_mut!(chunks);
        while let Some(chunk) = chunks.next().await {
            out.write_all(&chunk?).await.map_err(ExportError::Write)?;
        }
        pad(out, self.manifest.bytes).await
    }
}

/// A recording's JSON summary: who, when, where, how long, how big.
pub fn summary(manifest: &Manifest, exported_by: &str) -> serde_json::Value {
    let header = |k: &str| manifest.header.get(k).cloned().unwrap_or_default();
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    serde_json::json!({
        "recording_id": manifest.recording_id,
        "status": manifest.status,
        "region": manifest.region,
        "zone": manifest.zone,
        "recorded_by": manifest.node_id,
        "received_at": rfc3339(manifest.received_at),
        "ended_at": rfc3339(manifest.ended_at),
        "end_reason": manifest.end_reason,
        "duration_seconds": manifest.duration_seconds,
        "bytes": manifest.bytes,
        "events": manifest.events,
        "sha256": manifest.body_sha256,
        "srcNode": header("srcNode"),
        "srcNodeUser": header("srcNodeUser"),
        "srcNodeTags": header("srcNodeTags"),
        "sshUser": header("sshUser"),
        "localUser": header("localUser"),
        "connectionID": header("connectionID"),
        "exported_at": rfc3339(OffsetDateTime::now_utc()),
        "exported_by": exported_by,
    })
}

/// Writes a recording's plain-text transcript (the indexer's, else replayed now) to `out`,
/// with flat memory.
///
/// # Errors
/// Read and write errors.
pub async fn write_transcript<W: AsyncWrite + Unpin>(
    store: &DynStore,
    id: &RecordingId,
    out: &mut W,
) -> Result<(), ExportError> {
    let manifest = reader::read_manifest(store.as_ref(), id).await?;
    let transcript = TranscriptFile::make(store, id, &manifest).await?;
    let mut file = tokio::fs::File::open(&transcript.path)
        .await
        .map_err(ExportError::Write)?;
    tokio::io::copy(&mut file, out)
        .await
        .map_err(ExportError::Write)?;
    out.flush().await.map_err(ExportError::Write)
}

/// Ends an archive.
///
/// # Errors
/// Write errors.
pub async fn finish<W: AsyncWrite + Unpin>(out: &mut W) -> Result<(), ExportError> {
    out.write_all(&END).await.map_err(ExportError::Write)?;
    out.flush().await.map_err(ExportError::Write)
}

/// Streams one archive holding the bundle of every recording in `ids`, in order: each is
/// gathered, audited by `audit` first (so its custody shows this export), and written before
/// the next is read, so memory does not grow with their number.
///
/// # Errors
/// The first failure; the archive is then cut short.
pub async fn write_many<W, A, F>(
    stores: &Stores,
    ids: &[RecordingId],
    exported_by: &str,
    mut audit: A,
    out: &mut W,
) -> Result<(), ExportError>
where
    W: AsyncWrite + Unpin,
    A: FnMut(RecordingId) -> F,
    F: std::future::Future<Output = Result<(), ExportError>>,
{
    for id in ids {
        audit(id.clone()).await?;
        let store = stores
            .for_id(id)
            .map_err(|e| ExportError::Store(e.to_string()))?;
        let custody = custody(stores, id).await?;
        let bundle = Bundle::gather(store, id, &custody, exported_by).await?;
        bundle.write_entries(store, out).await?;
    }
    finish(out).await
}

async fn write_file_header<W: AsyncWrite + Unpin>(
    out: &mut W,
    name: &str,
    size: u64,
    mtime: u64,
) -> Result<(), ExportError> {
    let header = bundle::header(name, size, mtime).ok_or_else(|| {
        ExportError::Write(std::io::Error::other(format!(
            "name too long for tar: {name}"
        )))
    })?;
    out.write_all(&header).await.map_err(ExportError::Write)
}

async fn pad<W: AsyncWrite + Unpin>(out: &mut W, size: u64) -> Result<(), ExportError> {
    let zeros = [0u8; bundle::BLOCK];
    out.write_all(&zeros[..bundle::padding(size)])
        .await
        .map_err(ExportError::Write)
}

/// A recording's transcript as plain text in a temporary file, removed on drop: from the
/// indexer's stored transcript when there is one, else replayed now. Either way it is produced
/// line by line, so memory does not grow with the recording.
struct TranscriptFile {
    path: std::path::PathBuf,
    size: u64,
    sha256: String,
}

impl Drop for TranscriptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Longest transcript line carried between two pieces of a streamed stored transcript.
const MAX_TRANSCRIPT_LINE: usize = 16 << 20;

impl TranscriptFile {
    async fn make(
        store: &DynStore,
        id: &RecordingId,
        manifest: &Manifest,
    ) -> Result<Self, ExportError> {
        let path = std::env::temp_dir().join(format!(
            "castvault-transcript-{id}-{:016x}.txt",
            rand::random::<u64>()
        ));
        let mut this = Self {
            path,
            size: 0,
            sha256: String::new(),
        };
        let file = tokio::fs::File::create(&this.path)
            .await
            .map_err(ExportError::Write)?;
        let mut out = tokio::io::BufWriter::new(file);
        let mut hash = Sha256::new();
        let write = |text: &str, out_buf: &mut Vec<u8>| {
            out_buf.extend_from_slice(text.as_bytes());
            out_buf.push(b'\n');
        };
        let mut pending = Vec::new();
        let mut stored = match store.get(&ObjectKey::transcript(id)).await {
            Ok(got) => Some((got, true)),
            Err(e) if error_kind(&e) == ErrorKind::NotFound => None,
            Err(e) => return Err(ExportError::Store(e.to_string())),
        };
        if stored.is_none() {
            // Written uncompressed by earlier indexers.
            stored = match store.get(&ObjectKey::transcript_plain(id)).await {
                Ok(got) => Some((got, false)),
                Err(e) if error_kind(&e) == ErrorKind::NotFound => None,
                Err(e) => return Err(ExportError::Store(e.to_string())),
            };
        }
        match stored {
            Some((got, compressed)) => {
                let mut decoder = match compressed {
                    true => Some(
                        castvault_storage::chunk::StreamDecoder::new()
                            .map_err(|e| ExportError::Transcript(e.to_string()))?,
                    ),
                    false => None,
                };
                let mut stream = got.into_stream();
                let mut carry: Vec<u8> = Vec::new();
                while let Some(piece) = stream
                    .try_next()
                    .await
                    .map_err(|e| ExportError::Store(e.to_string()))?
                {
                    match decoder.as_mut() {
                        Some(d) => d
                            .feed(&piece, &mut carry)
                            .map_err(|e| ExportError::Transcript(e.to_string()))?,
                        None => carry.extend_from_slice(&piece),
                    }
                    let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                    for line in carry[..end]
                        .split(|&b| b == b'\n')
                        .filter(|l| !l.is_empty())
                    {
                        if let Ok(line) =
                            serde_json::from_slice::<crate::catalog::TranscriptLine>(line)
                        {
                            write(&line.text, &mut pending);
                        }
                    }
                    carry.drain(..end);
                    if carry.len() > MAX_TRANSCRIPT_LINE {
                        return Err(ExportError::Transcript(
                            "a transcript line is too long".to_owned(),
                        ));
                    }
                    this.flush(&mut out, &mut hash, &mut pending).await?;
                }
            }
            None => {
                let mut replay = crate::indexer::Replay::new()
                    .map_err(|e| ExportError::Transcript(e.to_string()))?;
                let chunks = reader::body_chunks(store.as_ref(), manifest);
                futures::pin_mut!(chunks);
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk?;
                    // Terminal replay is CPU work: keep it off the threads serving requests.
                    tokio::task::block_in_place(|| replay.feed(&chunk));
                    for line in std::mem::take(&mut replay.lines) {
                        write(&line.text, &mut pending);
                    }
                    this.flush(&mut out, &mut hash, &mut pending).await?;
                }
                for line in replay.finish() {
                    write(&line.text, &mut pending);
                }
                this.flush(&mut out, &mut hash, &mut pending).await?;
            }
        }
        out.flush().await.map_err(ExportError::Write)?;
        this.sha256 = hex::encode(hash.finalize());
        Ok(this)
    }

    async fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
        hash: &mut Sha256,
        pending: &mut Vec<u8>,
    ) -> Result<(), ExportError> {
        hash.update(&pending[..]);
        self.size += pending.len() as u64;
        out.write_all(pending).await.map_err(ExportError::Write)?;
        pending.clear();
        Ok(())
    }
}
