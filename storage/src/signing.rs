//! Node signing keys (Ed25519), signed checkpoints of a recording's hash chain, and the seal
//! over its manifest.
//!
//! - A node's keys live in `{data_dir}/keys/`: `{key_id}.seed` (the 32-byte Ed25519 seed, hex,
//!   mode 0600) and `current` (the key id in use). `key_id` is the first 16 hex digits of the
//!   SHA-256 of the public key. Rotation writes a new seed and points `current` at it; old
//!   seeds may be deleted, since verification needs only the public keys, which every node
//!   publishes to each store it writes to as `v1/keys/{key_id}.json` (conditional create, never
//!   replaced).
//! - A checkpoint (`checkpoint-{chunks:08}.json` beside the chunks) signs the chain head after
//!   the first `chunks` chunks, with their byte count: written at least every
//!   [`CHECKPOINT_EVERY`] while a recording is active and once more at its end. A recording
//!   whose node died verifies up to its last checkpoint.
//! - The seal (`manifest.sig.json`) signs the SHA-256 of the manifest's exact bytes.
//!
//! Every signature covers a fixed, line-based message (never re-serialized JSON), so a verifier
//! needs only the fields, and its own SHA-256 and Ed25519.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A recording's chain is checkpointed at least this often while chunks are committed.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

pub const CHECKPOINT_FORMAT: &str = "castvault-checkpoint/1";
pub const SEAL_FORMAT: &str = "castvault-seal/1";
/// The indexer's seal over its outputs (`index.sig.json`).
pub const INDEX_SEAL_FORMAT: &str = "castvault-index-seal/1";
pub const KEY_FORMAT: &str = "castvault-key/1";

/// Why a key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a 32-byte hex Ed25519 seed")]
    Malformed { path: PathBuf },
}

/// A node's signing key.
pub struct NodeKey {
    key_id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The public half of a key, as published to stores and bundled with exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyRecord {
    pub format: String,
    pub key_id: String,
    pub algorithm: String,
    /// Hex of the 32-byte Ed25519 public key.
    pub public_key: String,
    pub node_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A signature and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub node_id: String,
    pub key_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: OffsetDateTime,
    /// Hex Ed25519 signature of the object's message.
    pub signature: String,
}

/// A signed checkpoint of a recording's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: String,
    pub recording_id: String,
    /// Chunks covered: `0..chunks`.
    pub chunks: u32,
    /// Raw bytes in those chunks.
    pub bytes: u64,
    /// Hex chain link after chunk `chunks - 1` (the chain's start for zero chunks).
    pub chain_head: String,
    #[serde(flatten)]
    pub signed: Signed,
}

/// The seal over a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub format: String,
    pub recording_id: String,
    /// Hex SHA-256 of the manifest object's exact bytes.
    pub manifest_sha256: String,
    #[serde(flatten)]
    pub signed: Signed,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Checkpoint {
    /// The stored form: compact JSON in field order. A verifier re-serializes what it parsed
    /// and requires the same bytes, so no byte of the object can change unnoticed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a stored checkpoint, refusing any form but [`Self::to_bytes`]'s.
    pub fn parse_canonical(bytes: &[u8]) -> Option<Self> {
        let parsed: Self = serde_json::from_slice(bytes).ok()?;
        (parsed.to_bytes() == bytes).then_some(parsed)
    }

    /// The exact bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "castvault-checkpoint-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.format,
            self.recording_id,
            self.chunks,
            self.bytes,
            self.chain_head,
            rfc3339(self.signed.signed_at),
            self.signed.node_id,
            self.signed.key_id
        )
        .into_bytes()
    }
}

impl Seal {
    /// The stored form (see [`Checkpoint::to_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a stored seal, refusing any form but [`Self::to_bytes`]'s.
    pub fn parse_canonical(bytes: &[u8]) -> Option<Self> {
        let parsed: Self = serde_json::from_slice(bytes).ok()?;
        (parsed.to_bytes() == bytes).then_some(parsed)
    }

    /// The exact bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "castvault-seal-v1\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.format,
            self.recording_id,
            self.manifest_sha256,
            rfc3339(self.signed.signed_at),
            self.signed.node_id,
            self.signed.key_id
        )
        .into_bytes()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

fn key_id_of(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

impl NodeKey {
    fn from_seed(seed: &[u8; 32]) -> Option<Self> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).ok()?;
        Some(Self {
            key_id: key_id_of(pair.public_key().as_ref()),
            pair,
        })
    }

    /// Loads the current key from `dir`, making one if there is none.
    ///
    /// # Errors
    /// [`KeyError`] when the directory or a key file cannot be read or written.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        let current = dir.join("current");
        match std::fs::read_to_string(&current) {
            Ok(id) => Self::load(dir, id.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::rotate(dir),
            Err(e) => Err(io(&current)(e)),
        }
    }

    fn load(dir: &Path, key_id: &str) -> Result<Self, KeyError> {
        let path = dir.join(format!("{key_id}.seed"));
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Malformed { path: path.clone() })?;
        Self::from_seed(&seed).ok_or(KeyError::Malformed { path })
    }

    /// Makes a new key and makes it current; earlier keys stay on disk.
    ///
    /// # Errors
    /// [`KeyError::Io`] when the key files cannot be written.
    pub fn rotate(dir: &Path) -> Result<Self, KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let seed: [u8; 32] = rand_seed();
        let key = Self::from_seed(&seed).ok_or_else(|| KeyError::Malformed {
            path: dir.to_owned(),
        })?;
        let path = dir.join(format!("{}.seed", key.key_id));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(hex::encode(seed).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&path))?;
        let tmp = dir.join("current.tmp");
        std::fs::write(&tmp, &key.key_id).map_err(io(&tmp))?;
        let current = dir.join("current");
        std::fs::rename(&tmp, &current).map_err(io(&current))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(key)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs `message` as is; hex of the signature.
    pub fn sign_raw(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }

    pub fn public_record(&self, node_id: &str) -> PublicKeyRecord {
        PublicKeyRecord {
            format: KEY_FORMAT.to_owned(),
            key_id: self.key_id.clone(),
            algorithm: "ed25519".to_owned(),
            public_key: hex::encode(self.pair.public_key().as_ref()),
            node_id: node_id.to_owned(),
            created_at: OffsetDateTime::now_utc(),
        }
    }

    /// Who signs, and when; the signature is filled in once the message is complete.
    fn unsigned(&self, node_id: &str) -> Signed {
        Signed {
            node_id: node_id.to_owned(),
            key_id: self.key_id.clone(),
            // Whole seconds: the message's time stamp must survive its JSON round trip exactly.
            signed_at: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            signature: String::new(),
        }
    }

    /// Signs a checkpoint of the first `chunks` chunks.
    pub fn checkpoint(
        &self,
        node_id: &str,
        recording_id: &str,
        chunks: u32,
        bytes: u64,
        chain_head: &[u8; 32],
    ) -> Checkpoint {
        let mut cp = Checkpoint {
            format: CHECKPOINT_FORMAT.to_owned(),
            recording_id: recording_id.to_owned(),
            chunks,
            bytes,
            chain_head: hex::encode(chain_head),
            signed: self.unsigned(node_id),
        };
        cp.signed.signature = self.sign_raw(&cp.message());
        cp
    }

    /// Seals a manifest's exact bytes.
    pub fn seal(&self, node_id: &str, recording_id: &str, manifest: &[u8]) -> Seal {
        self.seal_digest(
            SEAL_FORMAT,
            node_id,
            recording_id,
            hex::encode(Sha256::digest(manifest)),
        )
    }

    /// Signs a digest (hex) as a seal of the given format.
    pub fn seal_digest(
        &self,
        format: &str,
        node_id: &str,
        recording_id: &str,
        digest: String,
    ) -> Seal {
        let mut seal = Seal {
            format: format.to_owned(),
            recording_id: recording_id.to_owned(),
            manifest_sha256: digest,
            signed: self.unsigned(node_id),
        };
        seal.signed.signature = self.sign_raw(&seal.message());
        seal
    }
}

fn rand_seed() -> [u8; 32] {
    let rng = ring::rand::SystemRandom::new();
    let mut seed = [0u8; 32];
    // SystemRandom reads the OS's CSPRNG; it does not fail on Linux after boot.
    let _ = ring::rand::SecureRandom::fill(&rng, &mut seed);
    seed
}

/// Whether `signature` (hex) is `key`'s signature of `message`.
pub fn verify(key: &PublicKeyRecord, message: &[u8], signature: &str) -> bool {
    let (Ok(public), Ok(sig)) = (hex::decode(&key.public_key), hex::decode(signature)) else {
        return false;
    };
    // Only the lowercase hex this module writes: another spelling of the same bytes would be a
    // changed object that still verifies.
    key.algorithm == "ed25519"
        && hex::encode(&sig) == signature
        && key_id_of(&public) == key.key_id
        && UnparsedPublicKey::new(&ED25519, public)
            .verify(message, &sig)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let key = NodeKey::load_or_create(dir.path()).unwrap();
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        let public = key.public_record("n1");
        let cp = key.checkpoint("n1", "rec", 3, 100, &[7; 32]);
        assert!(verify(&public, &cp.message(), &cp.signed.signature));
        let json = serde_json::to_vec(&cp).unwrap();
        let back: Checkpoint = serde_json::from_slice(&json).unwrap();
        assert!(verify(&public, &back.message(), &back.signed.signature));
        let mut forged = back.clone();
        forged.bytes += 1;
        assert!(!verify(
            &public,
            &forged.message(),
            &forged.signed.signature
        ));
        let seal = key.seal("n1", "rec", b"manifest bytes");
        assert!(verify(&public, &seal.message(), &seal.signed.signature));
        let rotated = NodeKey::rotate(dir.path()).unwrap();
        assert_ne!(rotated.key_id(), key.key_id());
        assert_eq!(
            NodeKey::load_or_create(dir.path()).unwrap().key_id(),
            rotated.key_id()
        );
        assert!(!verify(
            &rotated.public_record("n1"),
            &seal.message(),
            &seal.signed.signature
        ));
    }
}
