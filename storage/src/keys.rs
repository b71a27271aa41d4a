//! Ids and object keys. [`ObjectKey`] is the only place a key is spelled out.
//!
//! A recording id is `{unix_ms:012x}{random:016x}-{region}`: lowercase hex, so ids sort by start
//! time, then the home region, so any node finds the recording's store without a lookup. Ids that
//! arrive from outside are parsed with [`RecordingId::parse`], which accepts nothing that could
//! leave its key prefix (no `/`, no `.`, no uppercase, bounded length).
//!
//! ```text
//! v1/rec/{yyyy}/{mm}/{dd}/{recording_id}/chunk-{seq:08}.zst
//! v1/rec/{yyyy}/{mm}/{dd}/{recording_id}/manifest.json
//! v1/rec/{yyyy}/{mm}/{dd}/{recording_id}/index.json
//! v1/rec/{yyyy}/{mm}/{dd}/{recording_id}/checkpoint-{chunks:08}.json   signed chain checkpoint
//! v1/rec/{yyyy}/{mm}/{dd}/{recording_id}/manifest.sig.json             seal over the manifest
//! v1/keys/{key_id}.json                                                a node's public key
//! v1/live/{recording_id}.json                    the receiving node's lease
//! v1/probe                                         never written; read by health probes
//! v1/catalog/{yyyy}/{mm}/{dd}/{recording_id}.json
//! v1/events/{yyyy}/{mm}/{dd}/{event_id}.json
//! ```
//! The date is the id's own start time in UTC.

use std::fmt;

use object_store::path::Path;
use time::OffsetDateTime;

/// Longest region name; keeps ids and keys short and bounded.
pub const MAX_REGION_LEN: usize = 32;
const TIME_HEX: usize = 12;
const RANDOM_HEX: usize = 16;

/// Why an id or region was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid id {id:?}: expected {{12 hex time}}{{16 hex random}}-{{region}}")]
    InvalidId { id: String },
    #[error("invalid region {region:?}: 1 to {MAX_REGION_LEN} of a-z, 0-9 and inner '-'")]
    InvalidRegion { region: String },
}

/// A validated region name: `[a-z0-9]`, inner hyphens, at most [`MAX_REGION_LEN`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(String);

impl Region {
    /// # Errors
    /// [`KeyError::InvalidRegion`] when the name has other characters or is too long.
    pub fn new(name: &str) -> Result<Self, KeyError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_REGION_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(KeyError::InvalidRegion {
                region: name.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A time-sortable id naming its home region; used for recordings and for events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordingId(String);

/// Events share the id format of recordings.
pub type EventId = RecordingId;

impl RecordingId {
    /// Builds an id from a start time in unix milliseconds and 64 random bits.
    pub fn new(region: &Region, unix_ms: u64, random: u64) -> Self {
        let unix_ms = unix_ms & 0xffff_ffff_ffff;
        Self(format!("{unix_ms:012x}{random:016x}-{region}"))
    }

    /// # Errors
    /// [`KeyError::InvalidId`] for anything but the exact id format.
    pub fn parse(id: &str) -> Result<Self, KeyError> {
        let invalid = || KeyError::InvalidId {
            id: id.chars().take(80).collect(),
        };
        let head = TIME_HEX + RANDOM_HEX;
        if id.len() <= head + 1 || id.as_bytes()[head] != b'-' {
            return Err(invalid());
        }
        let hex_ok = id.as_bytes()[..head]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if !hex_ok || Region::new(&id[head + 1..]).is_err() {
            return Err(invalid());
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn region(&self) -> &str {
        &self.0[TIME_HEX + RANDOM_HEX + 1..]
    }

    /// Start time encoded in the id, in unix milliseconds.
    pub fn unix_ms(&self) -> u64 {
        u64::from_str_radix(&self.0[..TIME_HEX], 16).unwrap_or(0)
    }

    pub fn started_at(&self) -> OffsetDateTime {
        let nanos = i128::from(self.unix_ms()) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn date_path(&self) -> String {
        date_path(self.started_at())
    }
}

impl fmt::Display for RecordingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `yyyy/mm/dd` of a time, in UTC.
fn date_path(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{:04}/{:02}/{:02}", t.year(), u8::from(t.month()), t.day())
}

/// Names every object castvault writes.
pub struct ObjectKey;

/// The transcript's object name (see [`ObjectKey::transcript`]).
pub const TRANSCRIPT: &str = "transcript.jsonl.zst";

/// The uncompressed transcript's name, as earlier indexers wrote it.
pub const TRANSCRIPT_PLAIN: &str = "transcript.jsonl";

impl ObjectKey {
    /// Prefix holding all objects of one recording.
    pub fn recording_prefix(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}", id.date_path()))
    }

    pub fn chunk(id: &RecordingId, seq: u32) -> Path {
        Path::from(format!("v1/rec/{}/{id}/chunk-{seq:08}.zst", id.date_path()))
    }

    pub fn manifest(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/manifest.json", id.date_path()))
    }

    pub fn index(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/index.json", id.date_path()))
    }

    pub fn live(id: &RecordingId) -> Path {
        Path::from(format!("v1/live/{id}.json"))
    }

    /// A signed checkpoint of the first `chunks` chunks' chain.
    pub fn checkpoint(id: &RecordingId, chunks: u32) -> Path {
        Path::from(format!(
            "v1/rec/{}/{id}/checkpoint-{chunks:08}.json",
            id.date_path()
        ))
    }

    /// The seal over the manifest's bytes.
    pub fn seal(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/manifest.sig.json", id.date_path()))
    }

    /// The seal over the indexer's outputs (index and transcript).
    pub fn index_seal(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/index.sig.json", id.date_path()))
    }

    /// A node's published public key.
    pub fn public_key(key_id: &str) -> Path {
        Path::from(format!("v1/keys/{key_id}.json"))
    }

    pub fn live_prefix() -> Path {
        Path::from("v1/live")
    }

    /// The recording id a lease key names, if it is one.
    pub fn live_id(path: &Path) -> Option<RecordingId> {
        let name = path.filename()?.strip_suffix(".json")?;
        RecordingId::parse(name).ok()
    }

    /// A key that is never written: reading it tells whether the store answers.
    pub fn probe() -> Path {
        Path::from("v1/probe")
    }

    pub fn catalog(id: &RecordingId) -> Path {
        Path::from(format!("v1/catalog/{}/{id}.json", id.date_path()))
    }

    pub fn catalog_prefix() -> Path {
        Path::from("v1/catalog")
    }

    /// A notice that recordings were added to the catalog out of time order (by `castvault
    /// import`), written on `day`: `{"ids": [...]}`. Nodes read the notices of recent days with
    /// their recent catalog scans, so an import of old recordings is listed without a full scan.
    pub fn notice(day: OffsetDateTime, name: &str) -> Path {
        Path::from(format!("v1/notices/{}/{name}.json", date_path(day)))
    }

    /// The notices written on `day` (UTC).
    pub fn notices_day(day: OffsetDateTime) -> Path {
        Path::from(format!("v1/notices/{}", date_path(day)))
    }

    /// The Kubernetes API events of one day (UTC).
    pub fn events_day(day: OffsetDateTime) -> Path {
        Path::from(format!("v1/events/{}", date_path(day)))
    }

    /// The catalog rows of recordings that started on `day` (UTC).
    pub fn catalog_day(day: OffsetDateTime) -> Path {
        Path::from(format!("v1/catalog/{}", date_path(day)))
    }

    /// One batch of audit records written by `node` (already restricted to `[A-Za-z0-9._-]`).
    pub fn audit(day: OffsetDateTime, node: &str, seq: u64) -> Path {
        Path::from(format!(
            "v1/audit/{}/{node}-{seq:020}.jsonl",
            date_path(day)
        ))
    }

    /// The audit records of one day (UTC).
    pub fn audit_day(day: OffsetDateTime) -> Path {
        Path::from(format!("v1/audit/{}", date_path(day)))
    }

    /// A recording's transcript: what the screen showed, one JSON line `{"t":..,"text":..}` per
    /// screen line, written by the indexer.
    /// The indexer's transcript: JSON lines, zstd-compressed.
    pub fn transcript(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/{TRANSCRIPT}", id.date_path()))
    }

    /// Where indexers before the compressed transcript wrote it, uncompressed; still read.
    pub fn transcript_plain(id: &RecordingId) -> Path {
        Path::from(format!("v1/rec/{}/{id}/{TRANSCRIPT_PLAIN}", id.date_path()))
    }

    pub fn event(id: &EventId) -> Path {
        Path::from(format!("v1/events/{}/{id}.json", id.date_path()))
    }

    /// Parses the sequence number out of a chunk key's file name.
    pub fn chunk_seq(path: &Path) -> Option<u32> {
        let name = path.filename()?;
        let digits = name.strip_prefix("chunk-")?.strip_suffix(".zst")?;
        if digits.len() != 8 {
            return None;
        }
        digits.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> Region {
        Region::new("eu-west").unwrap()
    }

    #[test]
    fn ids_sort_by_time_and_round_trip() {
        let a = RecordingId::new(&region(), 1_764_000_000_000, u64::MAX);
        let b = RecordingId::new(&region(), 1_764_000_000_001, 0);
        assert!(a < b);
        assert_eq!(RecordingId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.region(), "eu-west");
        assert_eq!(a.unix_ms(), 1_764_000_000_000);
    }

    #[test]
    fn keys_follow_the_layout() {
        let id = RecordingId::new(&region(), 1_764_072_000_000, 7);
        assert_eq!(
            ObjectKey::chunk(&id, 3).as_ref(),
            format!("v1/rec/2025/11/25/{id}/chunk-00000003.zst")
        );
        assert_eq!(
            ObjectKey::catalog(&id).as_ref(),
            format!("v1/catalog/2025/11/25/{id}.json")
        );
        assert_eq!(ObjectKey::chunk_seq(&ObjectKey::chunk(&id, 42)), Some(42));
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "..",
            "../../etc/passwd",
            "0000000000000000000000000000-../x",
            "0000000000000000000000000000-",
            "0000000000000000000000000000-a/b",
            "000000000000000000000000000G-local",
            "0000000000000000000000000000-LOCAL",
            "0000000000000000000000000000_local",
        ] {
            assert!(RecordingId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Region::new("-a").is_err());
        assert!(Region::new(&"a".repeat(33)).is_err());
    }
}
