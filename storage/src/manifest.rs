//! The manifest (written once, with conditional create, when a recording is finalized) and the
//! catalog row written beside it.
//!
//! Hash chain: `link[-1] = SHA-256("castvault-chain-v1\0" || recording_id)` and
//! `link[n] = SHA-256(link[n-1] || sha256(raw chunk n) || be64(seq) || be64(offset) || be64(raw_len))`.
//! The chain head is the last link. Binding the id, sequence and offset into each link means a
//! chunk cannot be moved to another place or another recording without breaking the chain.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::cast::CastHeader;
use crate::chunk::ChunkStats;
use crate::keys::RecordingId;

/// Value of [`Manifest::format`].
pub const MANIFEST_FORMAT: &str = "castvault-manifest/1";

/// How a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingStatus {
    /// Still being received (catalog rows only; never in a manifest).
    Live,
    /// The client ended the body cleanly and the receiving node finalized it.
    Complete,
    /// The stream broke (client reset, refused input, node crash mid-stream); everything that
    /// arrived before the break is stored.
    Interrupted,
    /// The client ended cleanly, but the node crashed before finalizing; finalized on restart.
    Recovered,
    /// Brought in by `castvault import` from another recorder's storage (tsrecorder); the
    /// manifest's `source` names where it came from.
    Imported,
}

/// One chunk's entry in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub seq: u32,
    /// Offset of the chunk's first raw byte in the recording body.
    pub offset: u64,
    pub raw_len: u64,
    pub compressed_len: u64,
    /// Hex SHA-256 of the stored (compressed) object, so no byte of it can change even where
    /// the change would decode to the same raw bytes (a zstd frame header field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_sha256: Option<String>,
    pub events: u64,
    pub malformed_lines: u64,
    pub first_event_time: Option<f64>,
    pub last_event_time: Option<f64>,
    /// Hex SHA-256 of the raw bytes.
    pub sha256: String,
    /// Hex hash-chain link after this chunk.
    pub chain: String,
}

impl ChunkEntry {
    /// The entry of a chunk at `offset` whose raw bytes hash to `digest`, stored as `stored`,
    /// with its chain link.
    pub fn new(
        seq: u32,
        offset: u64,
        raw_len: u64,
        stored: &[u8],
        stats: &ChunkStats,
        digest: &[u8; 32],
        link: &[u8; 32],
    ) -> Self {
        Self {
            seq,
            offset,
            raw_len,
            compressed_len: stored.len() as u64,
            stored_sha256: Some(hex::encode(Sha256::digest(stored))),
            events: stats.events,
            malformed_lines: stats.malformed_lines,
            first_event_time: stats.first_event_time,
            last_event_time: stats.last_event_time,
            sha256: hex::encode(digest),
            chain: hex::encode(link),
        }
    }
}

/// The uploading node (the SSH server or API proxy that sent the recording), as ingest
/// admission identified it. tsrecorder writes the same facts into the header as `dstNode` and
/// `dstNodeID`; castvault keeps the header byte-exact and records them here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// How it was identified: `whois` (tailscaled), `token` (a bearer token) or `address`
    /// (an allowed network only).
    pub via: String,
    /// The node's MagicDNS name (`whois`), the token's name (`token`), or the peer address.
    pub name: String,
    /// The node's stable id (`whois` only); tsrecorder's `dstNodeID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The node's tags (`whois` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The node owner's login (`whois` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The object an imported recording was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSource {
    /// What was imported: `tsrecorder-dir` or `tsrecorder-s3`.
    pub kind: String,
    /// The object's full location (`file:///...` or `s3://bucket/key`).
    pub url: String,
    /// Its key below the imported root (`<stableNodeID>/<time>.cast`); the import's identity.
    pub key: String,
    /// Its last modification time in the source, when known.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub modified: Option<OffsetDateTime>,
}

/// The manifest of a finalized recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub recording_id: String,
    pub region: String,
    pub zone: String,
    pub node_id: String,
    pub status: RecordingStatus,
    /// Why the stream ended, when it did not end cleanly.
    pub end_reason: Option<String>,
    /// `v1` (`POST /record`) or `v2` (`POST /v2/record`).
    pub protocol: String,
    /// TCP peer that uploaded the recording.
    pub peer: Option<String>,
    /// Who the uploader is, as admission established it (absent in recordings made before
    /// admission recorded it, and then left out of the manifest's canonical form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<Sender>,
    /// Where an imported recording came from (status `imported` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImportSource>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub ended_at: OffsetDateTime,
    /// The header object as received (`null` if the stream ended before a valid header).
    pub header: Value,
    pub bytes: u64,
    pub events: u64,
    pub malformed_lines: u64,
    pub partial_last_line: bool,
    /// Last event time, in seconds from the start.
    pub duration_seconds: f64,
    pub body_sha256: String,
    pub chain_head: String,
    pub chunks: Vec<ChunkEntry>,
}

/// Running hash chain over a recording's chunks.
#[derive(Debug, Clone)]
pub struct HashChain {
    link: [u8; 32],
}

impl HashChain {
    pub fn new(id: &RecordingId) -> Self {
        let mut h = Sha256::new();
        h.update(b"castvault-chain-v1\0");
        h.update(id.as_str().as_bytes());
        Self {
            link: h.finalize().into(),
        }
    }

    /// Extends the chain with one chunk and returns the new link.
    pub fn push(
        &mut self,
        chunk_sha256: &[u8; 32],
        seq: u32,
        offset: u64,
        raw_len: u64,
    ) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.link);
        h.update(chunk_sha256);
        h.update(u64::from(seq).to_be_bytes());
        h.update(offset.to_be_bytes());
        h.update(raw_len.to_be_bytes());
        self.link = h.finalize().into();
        self.link
    }

    pub fn head(&self) -> [u8; 32] {
        self.link
    }
}

/// A catalog row: the summary of one recording that listing and search read. It is a cache of
/// the manifest; it is overwritten as the recording goes from `live` to its final status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogRow {
    pub id: String,
    pub status: RecordingStatus,
    pub region: String,
    pub node_id: String,
    pub bytes: u64,
    pub events: u64,
    pub duration_seconds: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    #[serde(rename = "srcNode")]
    pub src_node: Option<String>,
    #[serde(rename = "srcNodeID")]
    pub src_node_id: Option<String>,
    #[serde(rename = "srcNodeTags")]
    pub src_node_tags: Vec<String>,
    #[serde(rename = "srcNodeUser")]
    pub src_node_user: Option<String>,
    #[serde(rename = "srcNodeUserID")]
    pub src_node_user_id: Option<i64>,
    #[serde(rename = "sshUser")]
    pub ssh_user: Option<String>,
    #[serde(rename = "localUser")]
    pub local_user: Option<String>,
    #[serde(rename = "connectionID")]
    pub connection_id: Option<String>,
    pub command: Option<String>,
    pub end_reason: Option<String>,
}

impl CatalogRow {
    /// The row of a recording that has just started.
    pub fn live(id: &RecordingId, node_id: &str, header: Option<&CastHeader>) -> Self {
        let s = |k: &str| header.and_then(|h| h.str_field(k)).map(str::to_owned);
        Self {
            id: id.to_string(),
            status: RecordingStatus::Live,
            region: id.region().to_owned(),
            node_id: node_id.to_owned(),
            bytes: 0,
            events: 0,
            duration_seconds: 0.0,
            started_at: header
                .and_then(CastHeader::timestamp)
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                .unwrap_or_else(|| id.started_at()),
            ended_at: None,
            src_node: s("srcNode"),
            src_node_id: s("srcNodeID"),
            src_node_tags: header.map(CastHeader::src_node_tags).unwrap_or_default(),
            src_node_user: s("srcNodeUser"),
            src_node_user_id: header.and_then(CastHeader::src_node_user_id),
            ssh_user: s("sshUser"),
            local_user: s("localUser"),
            connection_id: s("connectionID"),
            command: s("command"),
            end_reason: None,
        }
    }

    /// The row of a finalized recording.
    pub fn from_manifest(m: &Manifest) -> Option<Self> {
        let id = RecordingId::parse(&m.recording_id).ok()?;
        let header = CastHeader::from_value(m.header.clone()).ok();
        let mut row = Self::live(&id, &m.node_id, header.as_ref());
        row.status = m.status;
        row.bytes = m.bytes;
        row.events = m.events;
        row.duration_seconds = m.duration_seconds;
        row.ended_at = Some(m.ended_at);
        row.end_reason.clone_from(&m.end_reason);
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Region;

    #[test]
    fn chain_binds_position_and_recording() {
        let region = Region::new("local").unwrap();
        let a = RecordingId::new(&region, 1, 1);
        let b = RecordingId::new(&region, 1, 2);
        let d = [7u8; 32];
        let (mut ca, mut cb, mut cc) = (HashChain::new(&a), HashChain::new(&b), HashChain::new(&a));
        assert_ne!(ca.push(&d, 0, 0, 10), cb.push(&d, 0, 0, 10));
        assert_ne!(ca.head(), cc.push(&d, 0, 1, 10));
    }
}
