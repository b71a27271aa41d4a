//! Verifying a recording: in a store, or from the parts of an export bundle.
//!
//! What is checked, in order, stopping at the first failure (which names the object and, for
//! the body, the first bad chunk):
//! 1. the seal: the manifest's exact bytes against the signature of a published key;
//! 2. every chunk, in order: present, its compressed length, that it decodes, its raw length,
//!    offset, SHA-256 and chain link, and its lines: a v2 header first (equal to the manifest's),
//!    then events with known codes and times that never go back, counted as the manifest
//!    counts them;
//! 3. the totals: bytes, events, malformed lines, the body's SHA-256, the chain head;
//! 4. every checkpoint's signature, and that its chain head and byte count are those of the
//!    chunks it covers;
//! 5. in a store, that the recording holds no object it should not (an appended chunk, a
//!    stray file), and the indexer's outputs against their seal.
//!
//! A recording with no manifest (its node died and nobody finalized it yet) verifies up to its
//! last checkpoint and is reported as interrupted, not as tampered.

use std::collections::HashMap;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

use crate::cast::{CastHeader, EventCode, parse_event};
use crate::chunk::{self, MAX_DECODED_CHUNK_BYTES};
use crate::keys::{ObjectKey, RecordingId};
use crate::manifest::{ChunkEntry, HashChain, Manifest};
use crate::signing::{self, Checkpoint, PublicKeyRecord, Seal};
use crate::store::{ErrorKind, error_kind};

/// The result of a verification: what was checked, and the first failure, if any.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: Vec<String>,
    pub failure: Option<String>,
    /// `complete`, `interrupted` or `recovered` (from the manifest), or `interrupted (no
    /// manifest)` for a recording verified up to its last checkpoint.
    pub status: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    fn check(&mut self, line: impl Into<String>) {
        self.checked.push(line.into());
    }
}

/// A verification failure, as text naming what is wrong.
type Fail = String;

/// Public keys by id.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    keys: HashMap<String, PublicKeyRecord>,
}

impl KeyRing {
    pub fn insert(&mut self, record: PublicKeyRecord) {
        self.keys.insert(record.key_id.clone(), record);
    }

    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    pub fn get(&self, key_id: &str) -> Option<&PublicKeyRecord> {
        self.keys.get(key_id)
    }

    pub fn records(&self) -> impl Iterator<Item = &PublicKeyRecord> {
        self.keys.values()
    }

    /// Loads the published key `key_id` from `store` if it is not known yet.
    async fn load(&mut self, store: &dyn ObjectStore, key_id: &str) -> Result<(), Fail> {
        if self.keys.contains_key(key_id) || !is_key_id(key_id) {
            return Ok(());
        }
        let path = ObjectKey::public_key(key_id);
        match get(store, &path).await? {
            Some(bytes) => {
                let record: PublicKeyRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("public key {path} is not valid: {e}"))?;
                if record.key_id != key_id {
                    return Err(format!("public key {path} names key {}", record.key_id));
                }
                self.insert(record);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn is_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn get(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
) -> Result<Option<Bytes>, Fail> {
    match async { store.get(path).await?.bytes().await }.await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if error_kind(&e) == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {path}: {e}")),
    }
}

fn check_signature(
    keys: &KeyRing,
    what: &str,
    key_id: &str,
    message: &[u8],
    signature: &str,
) -> Result<String, Fail> {
    let key = keys
        .get(key_id)
        .ok_or_else(|| format!("{what}: signed by unknown key {key_id}"))?;
    if signing::verify(key, message, signature) {
        Ok(format!(
            "{what}: signature by {} (key {key_id}) valid",
            key.node_id
        ))
    } else {
        Err(format!("{what}: signature does not verify (key {key_id})"))
    }
}

/// Lines with their newline (the last may lack one), found with memchr (`split_inclusive`
/// tests a closure per byte).
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', self.rest).map_or(self.rest.len(), |i| i + 1);
        let (line, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(line)
    }
}

/// Checks a seal over `manifest_bytes` and parses the manifest.
///
/// # Errors
/// The failure, as text.
pub fn check_manifest(
    id: &str,
    manifest_bytes: &[u8],
    seal_bytes: &[u8],
    keys: &KeyRing,
    report: &mut Report,
) -> Result<Manifest, Fail> {
    let seal = Seal::parse_canonical(seal_bytes)
        .ok_or("manifest.sig.json: not a valid seal in its stored form")?;
    if seal.format != signing::SEAL_FORMAT || seal.recording_id != id {
        return Err("manifest seal is for another object".to_owned());
    }
    let digest = hex::encode(Sha256::digest(manifest_bytes));
    if digest != seal.manifest_sha256 {
        return Err(
            "manifest: its SHA-256 is not the sealed one (the manifest was changed)".to_owned(),
        );
    }
    report.check(check_signature(
        keys,
        "manifest seal",
        &seal.signed.key_id,
        &seal.message(),
        &seal.signed.signature,
    )?);
    let manifest: Manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| format!("manifest is not valid: {e}"))?;
    if manifest.recording_id != id {
        return Err(format!(
            "manifest names recording {}",
            manifest.recording_id
        ));
    }
    Ok(manifest)
}

/// Checks the body chunk by chunk against a manifest; memory is one chunk.
pub struct BodyCheck<'m> {
    manifest: &'m Manifest,
    chain: HashChain,
    offset: u64,
    next: usize,
    events: u64,
    malformed: u64,
    last_time: Option<f64>,
    last_byte: Option<u8>,
    /// Chain link and byte offset after each chunk (for checkpoints).
    links: Vec<([u8; 32], u64)>,
    start: [u8; 32],
}

impl<'m> BodyCheck<'m> {
    pub fn new(id: &RecordingId, manifest: &'m Manifest) -> Self {
        let chain = HashChain::new(id);
        Self {
            start: chain.head(),
            manifest,
            chain,
            offset: 0,
            next: 0,
            events: 0,
            malformed: 0,
            last_time: None,
            last_byte: None,
            links: Vec::with_capacity(manifest.chunks.len()),
        }
    }

    /// The manifest entry of the next chunk to feed.
    pub fn next_entry(&self) -> Option<&'m ChunkEntry> {
        self.manifest.chunks.get(self.next)
    }

    /// Checks the next chunk's raw bytes. `stored` is the stored object, when it was read.
    ///
    /// # Errors
    /// The failure, naming the chunk.
    pub fn chunk(&mut self, raw: &[u8], stored: Option<&[u8]>) -> Result<(), Fail> {
        let Some(entry) = self.next_entry() else {
            return Err("more chunks than the manifest lists".to_owned());
        };
        let seq = entry.seq;
        let bad = |what: &str| format!("chunk {seq}: {what}");
        if entry.seq as usize != self.next {
            return Err(bad("out of sequence in the manifest"));
        }
        if let Some(stored) = stored {
            if stored.len() as u64 != entry.compressed_len {
                return Err(bad(&format!(
                    "stored size {}, manifest says {}",
                    stored.len(),
                    entry.compressed_len
                )));
            }
            if let Some(expected) = &entry.stored_sha256
                && &hex::encode(Sha256::digest(stored)) != expected
            {
                return Err(bad("the stored object's SHA-256 differs from the manifest"));
            }
        }
        if entry.offset != self.offset || raw.len() as u64 != entry.raw_len {
            return Err(bad("offset or length differs from the manifest"));
        }
        let digest = chunk::digest(raw);
        if hex::encode(digest) != entry.sha256 {
            return Err(bad(
                "SHA-256 differs from the manifest (the chunk was changed)",
            ));
        }
        let link = self.chain.push(&digest, seq, entry.offset, entry.raw_len);
        if hex::encode(link) != entry.chain {
            return Err(bad("hash chain link differs from the manifest"));
        }
        self.lines(raw, seq == 0, entry)?;
        self.offset += raw.len() as u64;
        self.last_byte = raw.last().copied().or(self.last_byte);
        self.links.push((link, self.offset));
        self.next += 1;
        Ok(())
    }

    fn lines(&mut self, raw: &[u8], header_first: bool, entry: &ChunkEntry) -> Result<(), Fail> {
        let seq = entry.seq;
        let mut lines = Lines { rest: raw };
        if header_first {
            let line = lines.next().unwrap_or_default();
            let header = CastHeader::parse(line.trim_ascii())
                .map_err(|e| format!("chunk 0: the header is not an asciicast v2 header: {e}"))?;
            if header.into_value() != self.manifest.header {
                return Err("chunk 0: the header differs from the manifest's".to_owned());
            }
        }
        let (mut events, mut malformed) = (0u64, 0u64);
        let (mut first, mut last) = (None, None);
        for line in lines {
            if line.last() != Some(&b'\n') {
                if seq as usize + 1 != self.manifest.chunks.len() {
                    return Err(format!(
                        "chunk {seq}: ends inside a line but is not the last chunk"
                    ));
                }
                break;
            }
            if line.trim_ascii().is_empty() {
                continue;
            }
            match parse_event(line) {
                Some((t, code)) => {
                    if code == EventCode::Other {
                        return Err(format!(
                            "chunk {seq}: unknown event code in {}",
                            preview(line)
                        ));
                    }
                    if self.last_time.is_some_and(|l| t < l) {
                        return Err(format!(
                            "chunk {seq}: event time goes back at {}",
                            preview(line)
                        ));
                    }
                    self.last_time = Some(t);
                    first.get_or_insert(t);
                    last = Some(t);
                    events += 1;
                }
                None => malformed += 1,
            }
        }
        if events != entry.events
            || malformed != entry.malformed_lines
            || first != entry.first_event_time
            || last != entry.last_event_time
        {
            return Err(format!(
                "chunk {seq}: its events differ from the manifest's counts"
            ));
        }
        self.events += events;
        self.malformed += malformed;
        Ok(())
    }

    /// Checks the totals once every chunk was fed.
    ///
    /// # Errors
    /// The failure.
    pub fn finish(&mut self, report: &mut Report) -> Result<(), Fail> {
        let m = self.manifest;
        if self.next != m.chunks.len() {
            return Err(format!("chunk {}: missing", self.next));
        }
        if self.offset != m.bytes {
            return Err(format!(
                "body has {} bytes, manifest says {}",
                self.offset, m.bytes
            ));
        }
        if self.events != m.events || self.malformed != m.malformed_lines {
            return Err("event counts differ from the manifest's".to_owned());
        }
        // The body's SHA-256 is not recomputed: every raw byte is covered by its chunk's
        // digest and the chain (which the seal signs), so it would cost a second pass over
        // the body and prove nothing more. A bundle's SHA256SUMS check does compare it.
        if hex::encode(self.chain.head()) != m.chain_head {
            return Err("chain head differs from the manifest".to_owned());
        }
        if self.last_byte.is_some_and(|b| b != b'\n') != m.partial_last_line {
            return Err("partial last line differs from the manifest".to_owned());
        }
        report.check(format!(
            "body: {} chunks, {} bytes, {} events ({} malformed lines as received): digests, chain, header and event times verified",
            m.chunks.len(),
            m.bytes,
            m.events,
            m.malformed_lines
        ));
        Ok(())
    }

    /// Checks a checkpoint against the chunks fed so far.
    ///
    /// # Errors
    /// The failure.
    pub fn checkpoint(
        &self,
        cp: &Checkpoint,
        keys: &KeyRing,
        report: &mut Report,
    ) -> Result<(), Fail> {
        let what = format!("checkpoint of {} chunks", cp.chunks);
        let (link, bytes) = match cp.chunks {
            0 => (self.start, 0),
            n => *self
                .links
                .get(n as usize - 1)
                .ok_or_else(|| format!("{what}: covers chunks the recording does not have"))?,
        };
        if hex::encode(link) != cp.chain_head || bytes != cp.bytes {
            return Err(format!(
                "{what}: chain head or byte count differs from the chunks"
            ));
        }
        report.check(check_signature(
            keys,
            &what,
            &cp.signed.key_id,
            &cp.message(),
            &cp.signed.signature,
        )?);
        Ok(())
    }
}

fn preview(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned()
}

/// Object names a recording's prefix may hold besides its chunks.
const KNOWN_OBJECTS: [&str; 6] = [
    "manifest.json",
    "manifest.sig.json",
    "index.json",
    crate::keys::TRANSCRIPT,
    crate::keys::TRANSCRIPT_PLAIN,
    "index.sig.json",
];

/// Verifies a recording in a store; keys come from `keys` or the store's published keys.
pub async fn verify_stored(store: &dyn ObjectStore, id: &RecordingId, mut keys: KeyRing) -> Report {
    let mut report = Report::default();
    if let Err(failure) = verify_stored_inner(store, id, &mut keys, &mut report).await {
        report.failure = Some(failure);
    }
    report
}

async fn verify_stored_inner(
    store: &dyn ObjectStore,
    id: &RecordingId,
    keys: &mut KeyRing,
    report: &mut Report,
) -> Result<(), Fail> {
    let prefix = ObjectKey::recording_prefix(id);
    let listed: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| format!("cannot list {prefix}: {e}"))?;
    let mut names: Vec<String> = listed
        .iter()
        .filter_map(|m| m.location.filename().map(str::to_owned))
        .collect();
    names.sort();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for name in names.iter().filter(|n| n.starts_with("checkpoint-")) {
        let path = prefix.clone().join(name.as_str());
        let bytes = get(store, &path)
            .await?
            .ok_or_else(|| format!("{name}: vanished"))?;
        let cp = Checkpoint::parse_canonical(&bytes)
            .ok_or_else(|| format!("{name}: not a valid checkpoint in its stored form"))?;
        if cp.format != signing::CHECKPOINT_FORMAT
            || cp.recording_id != id.as_str()
            || name != &format!("checkpoint-{:08}.json", cp.chunks)
        {
            return Err(format!("{name}: names another recording or place"));
        }
        keys.load(store, &cp.signed.key_id).await?;
        checkpoints.push(cp);
    }
    let manifest_bytes = get(store, &ObjectKey::manifest(id)).await?;
    let Some(manifest_bytes) = manifest_bytes else {
        return verify_unfinished(store, id, keys, report, &names, &checkpoints).await;
    };
    let seal_bytes = get(store, &ObjectKey::seal(id))
        .await?
        .ok_or("manifest.sig.json: missing (the manifest is not sealed)")?;
    if let Some(seal) = Seal::parse_canonical(&seal_bytes) {
        keys.load(store, &seal.signed.key_id).await?;
    }
    let manifest = check_manifest(id.as_str(), &manifest_bytes, &seal_bytes, keys, report)?;
    report.status = Some(
        serde_json::to_value(manifest.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    );
    // Nothing that should not be there.
    let chunk_names: Vec<String> = (0..manifest.chunks.len())
        .map(|seq| format!("chunk-{seq:08}.zst"))
        .collect();
    for name in &names {
        let known = KNOWN_OBJECTS.contains(&name.as_str())
            || chunk_names.contains(name)
            || (name.starts_with("checkpoint-") && name.ends_with(".json"));
        if !known {
            return Err(format!(
                "{name}: not part of the recording (an appended or stray object)"
            ));
        }
    }
    let mut body = BodyCheck::new(id, &manifest);
    let mut decoder = chunk::ChunkDecoder::new().map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    while let Some(entry) = body.next_entry() {
        let path = ObjectKey::chunk(id, entry.seq);
        let stored = get(store, &path)
            .await?
            .ok_or_else(|| format!("chunk {}: missing", entry.seq))?;
        let capacity = usize::try_from(entry.raw_len).unwrap_or(MAX_DECODED_CHUNK_BYTES);
        decoder
            .decode_into(&stored, capacity, &mut raw)
            .map_err(|e| format!("chunk {}: does not decode: {e}", entry.seq))?;
        body.chunk(&raw, Some(&stored))?;
    }
    body.finish(report)?;
    for cp in &checkpoints {
        body.checkpoint(cp, keys, report)?;
    }
    check_index(store, id, keys, report, &names).await
}

/// The indexer's outputs, if any, against their seal.
async fn check_index(
    store: &dyn ObjectStore,
    id: &RecordingId,
    keys: &mut KeyRing,
    report: &mut Report,
    names: &[String],
) -> Result<(), Fail> {
    let has = |n: &str| names.iter().any(|x| x == n);
    let (compressed, plain) = (
        has(crate::keys::TRANSCRIPT),
        has(crate::keys::TRANSCRIPT_PLAIN),
    );
    if !has("index.json") && !compressed && !plain && !has("index.sig.json") {
        return Ok(());
    }
    if compressed && plain {
        return Err(format!(
            "{} and {}: a recording has one transcript",
            crate::keys::TRANSCRIPT,
            crate::keys::TRANSCRIPT_PLAIN
        ));
    }
    let seal_bytes = get(store, &ObjectKey::index_seal(id))
        .await?
        .ok_or("index.sig.json: missing (the index is not sealed)")?;
    let seal = Seal::parse_canonical(&seal_bytes)
        .ok_or("index.sig.json: not a valid seal in its stored form")?;
    keys.load(store, &seal.signed.key_id).await?;
    // Hashed as they stream: a long recording's transcript is large.
    let index = sha256_streamed(store, &ObjectKey::index(id)).await?;
    let transcript_path = if plain {
        ObjectKey::transcript_plain(id)
    } else {
        ObjectKey::transcript(id)
    };
    let transcript = sha256_streamed(store, &transcript_path).await?;
    let mut h = Sha256::new();
    h.update(index);
    h.update(transcript);
    let digest = hex::encode(h.finalize());
    if seal.format != signing::INDEX_SEAL_FORMAT
        || seal.recording_id != id.as_str()
        || seal.manifest_sha256 != digest
    {
        return Err("index.json or the transcript differs from its seal".to_owned());
    }
    report.check(check_signature(
        keys,
        "index seal",
        &seal.signed.key_id,
        &seal.message(),
        &seal.signed.signature,
    )?);
    Ok(())
}

/// The SHA-256 of an object (of nothing, when it is absent), read as a stream.
async fn sha256_streamed(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
) -> Result<[u8; 32], Fail> {
    let mut h = Sha256::new();
    match store.get(path).await {
        Ok(got) => {
            let mut stream = got.into_stream();
            while let Some(piece) = stream
                .try_next()
                .await
                .map_err(|e| format!("cannot read {path}: {e}"))?
            {
                h.update(&piece);
            }
        }
        Err(e) if error_kind(&e) == ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {path}: {e}")),
    }
    Ok(h.finalize().into())
}

/// What the index seal signs: the SHA-256 of the index's and the transcript's SHA-256s.
pub fn index_digest(index: &[u8], transcript: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(Sha256::digest(index));
    h.update(Sha256::digest(transcript));
    hex::encode(h.finalize())
}

/// A recording without a manifest: its chunks up to the last checkpoint.
async fn verify_unfinished(
    store: &dyn ObjectStore,
    id: &RecordingId,
    keys: &KeyRing,
    report: &mut Report,
    names: &[String],
    checkpoints: &[Checkpoint],
) -> Result<(), Fail> {
    let last = checkpoints
        .iter()
        .max_by_key(|c| c.chunks)
        .ok_or("no manifest and no checkpoint: nothing is signed")?;
    report.check(check_signature(
        keys,
        &format!("checkpoint of {} chunks", last.chunks),
        &last.signed.key_id,
        &last.message(),
        &last.signed.signature,
    )?);
    let mut chain = HashChain::new(id);
    let mut offset = 0u64;
    let mut last_time: Option<f64> = None;
    for seq in 0..last.chunks {
        let stored = get(store, &ObjectKey::chunk(id, seq))
            .await?
            .ok_or_else(|| format!("chunk {seq}: missing"))?;
        let raw = chunk::decode(&stored, MAX_DECODED_CHUNK_BYTES)
            .map_err(|e| format!("chunk {seq}: does not decode: {e}"))?;
        chain.push(&chunk::digest(&raw), seq, offset, raw.len() as u64);
        let mut lines = Lines { rest: &raw };
        if seq == 0 {
            let header = lines.next().unwrap_or_default();
            CastHeader::parse(header.trim_ascii())
                .map_err(|e| format!("chunk 0: the header is not valid: {e}"))?;
        }
        for line in lines.filter(|l| l.last() == Some(&b'\n') && !l.trim_ascii().is_empty()) {
            if let Some((t, code)) = parse_event(line) {
                if code == EventCode::Other || last_time.is_some_and(|l| t < l) {
                    return Err(format!("chunk {seq}: malformed event {}", preview(line)));
                }
                last_time = Some(t);
            }
        }
        offset += raw.len() as u64;
    }
    if hex::encode(chain.head()) != last.chain_head || offset != last.bytes {
        return Err(format!(
            "chunks 0..{}: differ from the checkpoint",
            last.chunks
        ));
    }
    let later = names
        .iter()
        .filter(|n| n.starts_with("chunk-"))
        .count()
        .saturating_sub(last.chunks as usize);
    report.check(format!(
        "body: {} chunks, {offset} bytes verified against the last checkpoint; {later} later chunks are not covered by a signature",
        last.chunks
    ));
    report.status = Some("interrupted (no manifest: not finalized)".to_owned());
    Ok(())
}
